#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv/ at the repo root.
# Idempotent: a stamp records the hash of pyproject.toml; nothing is reinstalled while it matches.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" - <<'PY' || { echo "msmae-ray needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# Test tools that cannot share .venv (checkov pins packaging/networkx below torch's and ray's
# needs) get a venv of their own, from the exact list in scripts/requirements-tools.txt.
tools_stamp=.venv-tools/.msmae-setup-stamp
tools_want=$(sha256sum scripts/requirements-tools.txt | cut -d' ' -f1)
if [ -x .venv-tools/bin/checkov ] && [ -f "$tools_stamp" ] && [ "$(cat "$tools_stamp")" = "$tools_want" ]; then
  echo "[setup] .venv-tools is up to date"
else
  echo "[setup] creating .venv-tools (checkov for the manifest tests)"
  [ -x .venv-tools/bin/python ] || "$PYTHON" -m venv .venv-tools
  .venv-tools/bin/python -m pip install --quiet --upgrade pip
  .venv-tools/bin/python -m pip install --quiet --progress-bar off -r scripts/requirements-tools.txt
  echo "$tools_want" > "$tools_stamp"
fi

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
