#!/usr/bin/env bash
# Does SAM help when its maps find the lesion? HAM10000 on a 2-core CPU machine, from the repository root:
# MSMAE pre-training by the attention rule with the paper's map source (cls_attention) and with BEST (the source
# that localised best in benchmarks/lesion_maps.py), and by the uniform rule (CLS term kept), each + all-token
# fine-tuning, 3 seeds, class-balanced loss, the tiny ViT at 48 px. Every pre-trained encoder's maps are scored
# against the validation lesion masks (--lesion-sources) and the report pairs seeds for CIs and McNemar.
# Resumable: finished runs are lines of $OUT/ham10000-rules.jsonl and a re-run skips them.
#
#   BEST=rollout bash benchmarks/cpu_lesion_rules.sh
#
# Cost (2026-12-06, 2 cores shared with other work): ~4-5 min per run at PRE 8 + FT 4, 9 runs.
set -euo pipefail

BEST=${BEST:?"BEST: the best-localising map source (see docs/results.md, 'Do the maps find the lesion?')"}
OUT=${OUT:-results/lesion}
BUNDLE=${BUNDLE:-bundles/ham10000-dedup-64-masks.pt}
PY=${PYTHON:-.venv/bin/python}
PRE=${PRE_EPOCHS:-8} FT=${FT_EPOCHS:-4}
SEEDS=${SEEDS:-"0 1 2"}
SOURCES=${LESION_SOURCES:-"cls_attention rollout grad_attention"}   # occlusion: ~100 s per scoring of 1,191 images here
[ -f "$BUNDLE" ] || { echo "$BUNDLE: make it first (docs/results.md shows the ingest and make_bundle.py --masks commands)"; exit 2; }
mkdir -p "$OUT"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
common=(--bundle "$BUNDLE" --preset tiny --img-size 48 --patch-size 8 --batch-size 64 --pretrain-epochs "$PRE" --finetune-epochs "$FT"
        --sam-start-fraction 0.1 --sam-gate 0.5 --layer-decay 1.0 --class-balance --device cpu --threads 2
        --lesion-sources $SOURCES --out "$OUT/ham10000-rules.jsonl")
for seed in $SEEDS; do   # seed-major: a stopped run leaves whole seeds of every row
  "$PY" benchmarks/compare.py "${common[@]}" --seeds "$seed" --methods msmae_ft_all msmae_uniform_ft_all 2>&1 | tee -a "$OUT/ham10000-rules.log"
  "$PY" benchmarks/compare.py "${common[@]}" --seeds "$seed" --methods msmae_ft_all --map-source "$BEST" 2>&1 | tee -a "$OUT/ham10000-rules.log"
done
"$PY" benchmarks/compare.py report "$OUT/ham10000-rules.jsonl" --out "$OUT/ham10000-rules.md"
