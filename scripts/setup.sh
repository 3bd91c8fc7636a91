#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv/ at the repo root.
# Idempotent: a stamp records the hash of pyproject.toml; nothing is reinstalled while it matches.
# The test-only tools (.venv-tools: checkov) are built by scripts/test.sh, not here: the demo needs none.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" - <<'PY' || { echo "msmae-ray needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

stamp=.venv/.msmae-setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi

echo "[setup] creating .venv and installing msmae-ray with pinned dependencies (first run: a few minutes)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --progress-bar off -e ".[test]"
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, timm, ray, mlflow; print(f"torch {torch.__version__}, timm {timm.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}")')"
