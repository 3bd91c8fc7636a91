#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv (idempotent), then run MSMAE end to end on the
# bundled BTMD sample with the `demo` preset (local Ray, MLflow on SQLite in ./msmae-work).
# Extra arguments go to `msmae run` (e.g. --set finetune.epochs=5, --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/msmae run --data data/sample/btmd --config demo --workdir msmae-work "$@"
