#!/usr/bin/env bash
# The comparison on a CPU machine, from the repository root: BTMD, then HAM10000, every
# method, 3 seeds, each dataset fitted to about an hour (--time-budget + --fit-epochs), then
# the tables of both. Sized for 2 cores; on a bigger machine the same budget buys more epochs.
#
# Ingests the datasets (validation for selection, test for the report; HAM10000 split by
# lesion) and makes 64 px bundles (trained at 48 px, patch 8: 36 tokens) where they do not exist yet, so a fresh checkout needs only
# `bash scripts/setup.sh` and the datasets. Everything it writes goes to $OUT (default
# results/cpu): JSON lines, logs, tables.md.
set -euo pipefail

OUT=${OUT:-results/cpu}
WORK=${WORK:-results/cpu-data}                 # ingested datasets (kept between runs)
SHARED=${SHARED:-../shared/datasets}
PY=${PYTHON:-.venv/bin/python}
MSMAE=${MSMAE:-.venv/bin/msmae}
BUDGET=${BUDGET_SECONDS:-3900}                 # per dataset; runs end ~15 % inside it
MAX_EPOCHS=${MAX_EPOCHS:-40}                   # per stage; --fit-epochs scales down from here
SEEDS=${SEEDS:-"0 1 2"}
PRESET=${PRESET:-tiny} IMG=${IMG:-48} PATCH=${PATCH:-8} BATCH=${BATCH:-64}
SIDE=${SIDE:-64}                               # stored bundle side; crops are resized to IMG
mkdir -p "$OUT" "$WORK" bundles

source "$(dirname "${BASH_SOURCE[0]}")/lib/bundle.sh"   # bundle NAME PATH: ingest and bundle on first use

for name in btmd ham10000; do
  path=$(bundle "$name" "bundles/$name-$SIDE.pt")
  echo "== compare $name ($path): budget ${BUDGET}s"
  "$PY" benchmarks/compare.py --bundle "$path" --preset "$PRESET" --img-size "$IMG" --patch-size "$PATCH" \
    --pretrain-epochs "$MAX_EPOCHS" --finetune-epochs "$MAX_EPOCHS" --seeds $SEEDS --batch-size "$BATCH" \
    --device cpu --time-budget "$BUDGET" --fit-epochs --out "$OUT/$name.jsonl" 2>&1 | tee "$OUT/$name.log"
done

echo "== tables"
"$PY" benchmarks/compare.py report "$OUT"/btmd.jsonl "$OUT"/ham10000.jsonl --out "$OUT/tables.md" \
  --mlflow-uri "sqlite:///$(cd "$OUT" && pwd)/mlflow.db"
