#!/usr/bin/env bash
# MSMAE against the supervised ViT at a long schedule on a lent GPU box (torch + timm only; no
# Ray, no MLflow), in calls that each fit the box's 10-minute command cap:
#
#   bash benchmarks/gpu_long.sh pretrain     # MSMAE pre-training, saved under $OUT/pretrained   (~3 min, H100)
#   bash benchmarks/gpu_long.sh finetune     # msmae_ft_all and msmae fine-tuned from it           (~1.5 min)
#   bash benchmarks/gpu_long.sh supervised   # the supervised ViT, PRE + FT epochs                 (~3.5 min)
#   bash benchmarks/gpu_long.sh report       # the table of everything in $OUT/btmd.jsonl
#
# The checkpoints stay on the warm machine between calls ($OUT is under the repository); the
# run tool's `carry` must name the bundle: bundles/btmd-128.pt (27.6 MiB, made here with
# `.venv/bin/python benchmarks/make_bundle.py results/cpu-data/btmd --out bundles/btmd-128.pt
# --name btmd --side 128`, the same split as the CPU table). Estimates from the 2026-11-26 H100
# runs of ViT-S/8 at 112 px (0.8 s per epoch either stage, batch 256).
# Defaults: ViT-S/8 at 112 px, 200 + 50 epochs (supervised: 250), 1 seed, the paper's layer
# decay, SAM from 13 % of pre-training (the paper's 40/300) once the CLS head's validation
# balanced accuracy reaches 0.5. Everything goes to $OUT (default results/gpu-long).
set -uo pipefail
STEP=${1:?usage: gpu_long.sh pretrain|finetune|supervised|report}
OUT=${OUT:-results/gpu-long}
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-bundles/btmd-128.pt}
PRE=${PRE_EPOCHS:-200} FT=${FT_EPOCHS:-50} SEEDS=${SEEDS:-0}
PRESET=${PRESET:-small} IMG=${IMG:-112} PATCH=${PATCH:-8} BATCH=${BATCH:-256}
DEVICE=${DEVICE:-cuda} CAP=${CAP_SECONDS:-570}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
[ -f "$BUNDLE" ] || { echo "missing bundle $BUNDLE (carry it, or make it: see the header)"; exit 2; }

compare() {  # log-name, then compare.py arguments; a hard stop inside the command cap
  local name=$1; shift
  { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } >> "$OUT/environment.txt" 2>&1
  timeout "$CAP" "$PY" benchmarks/compare.py --bundle "$BUNDLE" --preset "$PRESET" --img-size "$IMG" --patch-size "$PATCH" \
    --batch-size "$BATCH" --pretrain-epochs "$PRE" --finetune-epochs "$FT" --seeds $SEEDS --device "$DEVICE" \
    --sam-start-fraction 0.13 --sam-gate 0.5 --layer-decay "${LAYER_DECAY:-0.75}" --pretrained-dir "$OUT/pretrained" \
    --out "$OUT/btmd.jsonl" "$@" 2>&1 | tee -a "$OUT/$name.log"
  return "${PIPESTATUS[0]}"
}

case $STEP in
  pretrain)   compare pretrain --methods msmae_ft_all --stage pretrain ;;
  finetune)   compare finetune --methods msmae_ft_all msmae ;;
  supervised) compare supervised --methods supervised ;;
  report)     "$PY" benchmarks/compare.py report "$OUT/btmd.jsonl" --out "$OUT/tables.md" ;;
  *) echo "unknown step $STEP: pretrain | finetune | supervised | report"; exit 2 ;;
esac
