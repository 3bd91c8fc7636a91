#!/usr/bin/env bash
# The comparison on a GPU box, from the repository root, in one go (about 520 s in all):
#   1. the method tests and the comparison harness's tests on CUDA (tests/msmae, then
#      tests/comparison, MSMAE_TEST_DEVICE=cuda);
#   2. benchmarks/compare.py on BTMD, then on HAM10000: every method, 3 seeds, epochs fitted
#      to the time left (--fit-epochs; never more than MAX_EPOCHS per stage);
#   3. the tables of both.
# Needs torch, torchvision, timm, numpy and pytest only, plus the two bundles (bundles/*.pt,
# made with benchmarks/make_bundle.py; see docs/compare.md). Everything goes to $OUT
# (default results/gpu): JSON lines, logs, tables.md.
set -uo pipefail

OUT=${OUT:-results/gpu}
PY=${PYTHON:-python3}
TOTAL=${TOTAL_SECONDS:-520}      # the whole script
MAX_EPOCHS=${MAX_EPOCHS:-40}     # per stage; supervised gets twice this at most
SEEDS=${SEEDS:-"0 1 2"}
BTMD=${BTMD_BUNDLE:-bundles/btmd-112.pt}
HAM=${HAM_BUNDLE:-bundles/ham10000-112.pt}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-small} IMG=${IMG:-112} PATCH=${PATCH:-8} BATCH=${BATCH:-256}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  $PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"; } \
  2>&1 | tee "$OUT/environment.txt"
for f in "$BTMD" "$HAM"; do [ -f "$f" ] || { echo "missing bundle $f" | tee -a "$OUT/environment.txt"; exit 2; }; done

TEST_STATUS=skipped
if [ -z "${SKIP_TESTS:-}" ]; then
  TEST_STATUS=0
  : > "$OUT/tests.txt"
  for suite in tests/msmae tests/comparison; do
    echo "== $suite on $DEVICE" | tee -a "$OUT/tests.txt"
    MSMAE_TEST_DEVICE=$DEVICE timeout 150 $PY -m pytest "$suite" -q -x --confcutdir "$suite" -p no:cacheprovider -o addopts= \
      >> "$OUT/tests.txt" 2>&1 || TEST_STATUS=$?
  done
  grep -E '^== |[0-9]+ (passed|failed|errors?)' "$OUT/tests.txt"  # each suite's summary line
  echo "tests exit $TEST_STATUS, $(( $(date +%s) - START ))s elapsed"
fi

compare() {  # dataset bundle budget_seconds
  local name=$1 bundle=$2 budget=$3
  echo "== compare $name: budget ${budget}s"
  # a hard stop 30 s after the budget: finished runs are already in the JSON lines
  timeout $(( budget + 30 )) $PY benchmarks/compare.py --bundle "$bundle" --preset "$PRESET" --img-size "$IMG" --patch-size "$PATCH" \
    --pretrain-epochs "$MAX_EPOCHS" --finetune-epochs "$MAX_EPOCHS" --seeds $SEEDS --batch-size "$BATCH" \
    --device "$DEVICE" --time-budget "$budget" --fit-epochs --out "$OUT/$name.jsonl" 2>&1 | tee "$OUT/$name.log"
}

# BTMD has 3996 training images, HAM10000 5558: split what is left in that proportion
# (15 s each for start-up, decoding and step timing).
L=$(( $(left) - 10 ))
compare btmd "$BTMD" $(( (L - 30) * 42 / 100 + 15 ))
compare ham10000 "$HAM" $(( $(left) - 10 ))

echo "== tables"
$PY benchmarks/compare.py report "$OUT"/btmd.jsonl "$OUT"/ham10000.jsonl --out "$OUT/tables.md"
echo "total $(( $(date +%s) - START ))s; tests exit $TEST_STATUS"
