#!/usr/bin/env bash
# The de-duplicated comparison on a 2-core CPU machine, from the repository root: every row
# (controls, the equal-FLOPs supervised ViT, ResNet-18), 3 seeds, each method's learning rate
# chosen on validation from LR_GRID (seed 0; the other seeds train at the chosen rate), a
# short schedule, the tiny ViT at 48 px. Resumable: every finished run is a line of
# $OUT/$DATASET.jsonl and a re-run skips it, so the script can run across sessions (stop it
# any time; the run in progress is lost, nothing else).
#
#   bash benchmarks/cpu_dedup.sh                       # BTMD, every row
#   DATASET=ham10000 bash benchmarks/cpu_dedup.sh      # HAM10000, the main rows, class-balanced loss
#
# Data: ingests from ../shared/datasets into a FRESH folder ($WORK, default results/dedup-data:
# near-copies held in one split) and bundles at 64 px; make_bundle.py refuses a folder ingested
# before near-copies were held together.
#
# Cost. Step times measured 2026-12-02 on this 2-core machine, nice'd beside other work
# (comparison.budget.calibrate, tiny ViT at 48 px, batch 64; BTMD 3,996 training images = 62
# steps): one epoch of MSMAE/MAE pre-training 12.9 s (random) / 11.6 s (SAM), all-token
# fine-tuning 22.4 s, SAM fine-tuning 7.6 s, ResNet-18 31.1 s; a validation pass 0.8 s, a map
# refresh 3.5 s. At PRE 8 + FT 4 one seed at one learning rate of all ten rows is ~31 min
# (supervised 12 epochs ~4.6 min, supervised_eqflops 7 epochs ~2.7 min, resnet18 ~6.4 min, each
# pre-training ~1.8 min, each all-token fine-tuning ~1.6 min, SAM fine-tuning ~0.6 min), so
# 4 grid values + 2 more seeds = 6 x 31 min ~ 3.1 h for BTMD (up to ~0.2 h more where msmae,
# msmae_frozen_maps and msmae_ft_all choose different rates and cannot share a pre-training).
# The grid's top value, 1.6e-2, was added after seven of ten BTMD rows chose 4e-3, then the top.
# HAM10000 (5,558 training images, 8 rows): ~6 x 39 min ~ 3.9 h. SMOKE=1 took 42 s (320 images).
# THREADS (default 2): torch threads. Two jobs at THREADS=1 side by side (say this script and
# cpu_pretrain_curve.sh) get 1.3-1.45x the work of one job at 2 threads out of 2 cores (pre-training,
# tiny ViT at 48 px: HAM10000 387 img/s alone at 2 threads vs 280 + 280 img/s as two 1-thread jobs;
# BTMD 310 vs 202 + 202 img/s; the losses are the same at either thread count), at the cost of
# longer wall times per run. A 1-thread job beside a 2-thread one takes about a third of the
# 2-thread job's speed (BTMD curve 310 -> 180-210 img/s), even at nice 19.
set -euo pipefail

DATASET=${DATASET:-btmd}
OUT=${OUT:-results/dedup}
WORK=${WORK:-results/dedup-data}
SHARED=${SHARED:-../shared/datasets}
PY=${PYTHON:-.venv/bin/python}
MSMAE=${MSMAE:-.venv/bin/msmae}
PRE=${PRE_EPOCHS:-8} FT=${FT_EPOCHS:-4}
SEEDS=${SEEDS:-"0 1 2"}
LR_GRID=${LR_GRID:-"2.5e-4 1e-3 4e-3 1.6e-2"}   # base lr (lr = blr * batch / 256) of each method's tuned stage
PRESET=${PRESET:-tiny} IMG=${IMG:-48} PATCH=${PATCH:-8} BATCH=${BATCH:-64} SIDE=${SIDE:-64}
THREADS=${THREADS:-2}
ALL_ROWS="supervised supervised_eqflops resnet18 mae mae_cls msmae msmae_frozen_maps msmae_ft_all msmae_uniform_ft_all msmae_released"
MAIN_ROWS="supervised supervised_eqflops resnet18 mae mae_cls msmae msmae_ft_all msmae_uniform_ft_all"
case $DATASET in
  btmd) METHODS=${METHODS:-$ALL_ROWS}; EXTRA_ARGS=() ;;
  ham10000) METHODS=${METHODS:-$MAIN_ROWS}; EXTRA_ARGS=(--class-balance) ;;
  *) echo "DATASET: btmd or ham10000"; exit 2 ;;
esac
# SMOKE=1: prove the script end to end in minutes (1 seed, 1 + 1 epochs, grid of 1, 2 methods, own files)
if [ -n "${SMOKE:-}" ]; then
  PRE=1 FT=1 SEEDS=0 LR_GRID=1e-3 METHODS=${SMOKE_METHODS:-"supervised_eqflops msmae_ft_all"} OUT=$OUT-smoke
fi
BUNDLES=${BUNDLES:-bundles}
mkdir -p "$OUT" "$WORK" "$BUNDLES"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}   # spinning OpenMP threads slow a shared 2-core machine 3-4x

source "$(dirname "${BASH_SOURCE[0]}")/lib/bundle.sh"   # bundle NAME PATH: ingest and bundle on first use

path=${BUNDLE:-$(bundle "$DATASET" "$BUNDLES/$DATASET-dedup-$SIDE.pt")}
n_methods=$(wc -w <<< "$METHODS"); n_seeds=$(wc -w <<< "$SEEDS"); n_grid=$(wc -w <<< "$LR_GRID")
echo "== $DATASET ($path): $n_methods methods x ($n_grid grid values on the first seed + $((n_seeds - 1)) seeds), $PRE + $FT epochs -> $OUT/$DATASET.jsonl"
"$PY" benchmarks/compare.py --bundle "$path" --preset "$PRESET" --img-size "$IMG" --patch-size "$PATCH" --batch-size "$BATCH" \
  --pretrain-epochs "$PRE" --finetune-epochs "$FT" --seeds $SEEDS --methods $METHODS --lr-grid $LR_GRID \
  --sam-start-fraction 0.1 --sam-gate 0.5 --layer-decay 1.0 --device cpu --threads "$THREADS" "${EXTRA_ARGS[@]}" ${EXTRA:-} \
  --out "$OUT/$DATASET.jsonl" 2>&1 | tee -a "$OUT/$DATASET.log"
"$PY" benchmarks/compare.py report "$OUT/$DATASET.jsonl" --out "$OUT/$DATASET.md"
