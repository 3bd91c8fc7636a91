#!/usr/bin/env bash
# The long comparison on a lent GPU box (torch + timm only; no Ray, no MLflow), in calls that each
# fit the box's 10-minute command cap. Does the attention rule help? The rows hold the CLS term
# fixed: attention (msmae_ft_all) vs uniform (msmae_uniform_ft_all) vs random (mae_cls), beside
# MAE on its own settings, MSMAE with SAM fine-tuning (refreshed and frozen maps), the supervised
# ViT at equal passes and at equal training FLOPs, and ResNet-18:
#
#   bash benchmarks/gpu_long.sh pretrain     # every pre-training (4 rules), saved under $OUT/pretrained; resumable:
#                                            #   a call cut by the cap leaves a checkpoint, run it again until it says done
#   bash benchmarks/gpu_long.sh finetune     # every pre-trained method fine-tuned from them
#   bash benchmarks/gpu_long.sh supervised   # the supervised ViT (PRE + FT epochs, and at equal FLOPs) and ResNet-18
#   bash benchmarks/gpu_long.sh report       # the table of everything in $OUT/btmd.jsonl
#
# Every step is resumable (finished runs are lines of $OUT/btmd.jsonl and are skipped), so a step
# cut by the cap is simply run again. The checkpoints stay on the warm machine between calls
# ($OUT is under the repository); the run tool's `carry` must name the bundle: bundles/btmd-dedup-128.pt,
# made here from the de-duplicated ingest (`.venv/bin/python benchmarks/make_bundle.py
# results/dedup-data/btmd --out bundles/btmd-dedup-128.pt --name btmd --side 128`, the same split
# as the CPU table). Estimates from the 2026-11-26 H100 runs of ViT-S/8 at 112 px: 0.8 s per epoch
# either stage, batch 256 -> one 200-epoch pre-training ~3 min, so `pretrain` takes 2 calls.
# Defaults: ViT-S/8 at 112 px, 200 + 50 epochs (supervised: 250; equal FLOPs: fewer), 1 seed, the
# paper's layer decay, SAM from 13 % of pre-training once the CLS head's validation balanced accuracy
# reaches 0.5; one learning rate (PRETRAIN_BLR, FINETUNE_BLR: pass what the CPU grid chose).
# Everything goes to $OUT (default results/gpu-long).
set -uo pipefail
STEP=${1:?usage: gpu_long.sh pretrain|finetune|supervised|report}
OUT=${OUT:-results/gpu-long}
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-bundles/btmd-dedup-128.pt}
PRE=${PRE_EPOCHS:-200} FT=${FT_EPOCHS:-50} SEEDS=${SEEDS:-0}
PRESET=${PRESET:-small} IMG=${IMG:-112} PATCH=${PATCH:-8} BATCH=${BATCH:-256}
DEVICE=${DEVICE:-cuda} CAP=${CAP_SECONDS:-570}
PRETRAINED="msmae_ft_all msmae msmae_frozen_maps msmae_uniform_ft_all mae_cls mae"
SUPERVISED="supervised_eqflops supervised resnet18"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
[ -f "$BUNDLE" ] || { echo "missing bundle $BUNDLE (carry it, or make it: see the header)"; exit 2; }

compare() {  # log-name, then compare.py arguments; a hard stop inside the command cap
  local name=$1; shift
  { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } >> "$OUT/environment.txt" 2>&1
  timeout "$CAP" "$PY" benchmarks/compare.py --bundle "$BUNDLE" --preset "$PRESET" --img-size "$IMG" --patch-size "$PATCH" \
    --batch-size "$BATCH" --pretrain-epochs "$PRE" --finetune-epochs "$FT" --seeds $SEEDS --device "$DEVICE" \
    --sam-start-fraction 0.13 --sam-gate 0.5 --layer-decay "${LAYER_DECAY:-0.75}" --pretrained-dir "$OUT/pretrained" \
    --pretrain-blr "${PRETRAIN_BLR:-1e-3}" --finetune-blr "${FINETUNE_BLR:-1e-3}" \
    --out "$OUT/btmd.jsonl" "$@" 2>&1 | tee -a "$OUT/$name.log"
  return "${PIPESTATUS[0]}"
}

case $STEP in
  pretrain)   compare pretrain --methods msmae_ft_all msmae_uniform_ft_all mae_cls mae --stage pretrain --checkpoint-every 10 ;;
  finetune)   compare finetune --methods $PRETRAINED ;;
  supervised) compare supervised --methods $SUPERVISED ;;
  report)     "$PY" benchmarks/compare.py report "$OUT/btmd.jsonl" --out "$OUT/tables.md" ;;
  *) echo "unknown step $STEP: pretrain | finetune | supervised | report"; exit 2 ;;
esac
