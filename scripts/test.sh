#!/usr/bin/env bash
# Set up .venv (idempotent) and the test-only tools, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# Test tools that cannot share .venv (checkov pins packaging/networkx below torch's and ray's
# needs) get a venv of their own, from the exact list in scripts/requirements-tools.txt.
tools_stamp=.venv-tools/.msmae-setup-stamp
tools_want=$(sha256sum scripts/requirements-tools.txt | cut -d' ' -f1)
if [ -x .venv-tools/bin/checkov ] && [ -f "$tools_stamp" ] && [ "$(cat "$tools_stamp")" = "$tools_want" ]; then
  echo "[test] .venv-tools is up to date"
else
  echo "[test] creating .venv-tools (checkov for the manifest tests)"
  [ -x .venv-tools/bin/python ] || "$PYTHON" -m venv .venv-tools
  .venv-tools/bin/python -m pip install --quiet --upgrade pip
  .venv-tools/bin/python -m pip install --quiet --progress-bar off -r scripts/requirements-tools.txt
  echo "$tools_want" > "$tools_stamp"
fi

exec .venv/bin/python -m pytest "$@"
