#!/usr/bin/env bash
# Does longer pre-training help, and does the masking rule matter once it does? On a 2-core CPU,
# from the repository root: one long pre-training per rule (attention: msmae_ft_all, uniform:
# msmae_uniform_ft_all, random: mae_cls; all with the CLS term) of PRE epochs (default 400),
# the encoder kept after each of SNAPSHOTS epochs, each fine-tuned on all tokens for FT epochs;
# then the supervised ViT at the FLOPs of each point (supervised_eqflops with --pretrain-epochs E);
# then the table of test macro-F1 against pre-training length (compare.py report).
#
# Resumable at two levels: the pre-training saves its whole state every CHECKPOINT_EVERY epochs
# into $OUT/pretrained and resumes from there; finished fine-tunings are lines of $OUT/curve.jsonl
# and are skipped. Stop it any time and run it again.
#
# Cost on this machine (step times of 2026-12-02, nice'd beside other work; tiny ViT, 48 px,
# batch 64, BTMD's 3,996 training images; see cpu_dedup.sh): a pre-training epoch ~13 s with the
# CLS head's validation pass, so 400 epochs ~90 min per rule (4.4 h for three); an all-token
# fine-tuning epoch ~23 s, so 12 fine-tunings of 10 epochs ~46 min; supervised_eqflops at the
# FLOPs of E + 10 epochs trains ~0.38 E + 10 epochs (29, 48, 87, 164 for E = 50 ... 400), ~2.1 h
# together. About 7.3 h in all: a background job over several sessions. SMOKE=1 took 41 s.
#
# In parts, for sessions shorter than that: RULES names the rules to pre-train in this call (empty:
# none) and SUPERVISED_AT the pre-training lengths to give a supervised row (default SNAPSHOTS;
# empty: none). A rule's pre-training resumes from $OUT/pretrained, which only a machine that keeps
# $OUT has; elsewhere start a rule only with its whole run ahead (~95 min at 2 threads). THREADS
# (default 2): two calls at THREADS=1 side by side do ~1.45x the work of one at 2 threads (see
# cpu_dedup.sh), e.g. on 2 cores:
#   RULES=msmae_ft_all SUPERVISED_AT= THREADS=1 bash benchmarks/cpu_pretrain_curve.sh &
#   RULES=msmae_uniform_ft_all SUPERVISED_AT= THREADS=1 bash benchmarks/cpu_pretrain_curve.sh
# Needs the de-duplicated BTMD bundle and learning-rate grid of benchmarks/cpu_dedup.sh: each rule
# pre-trains at the base lr that grid chose for it, the supervised rows at supervised_eqflops' choice
# (read from LR_FROM, default results/dedup/btmd.jsonl, by `compare.py chosen-lr`); the script stops
# if that grid has not finished. PRETRAIN_BLR / SUPERVISED_BLR set one rate by hand instead.
set -euo pipefail
OUT=${OUT:-results/curve}
PY=${PYTHON:-.venv/bin/python}
BUNDLE=${BUNDLE:-bundles/btmd-dedup-64.pt}
PRE=${PRE_EPOCHS:-400} FT=${FT_EPOCHS:-10} SEEDS=${SEEDS:-0}
SNAPSHOTS=${SNAPSHOTS:-"50 100 200 400"} CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-10}
RULES=${RULES-"msmae_ft_all msmae_uniform_ft_all mae_cls"}
SUPERVISED_AT=${SUPERVISED_AT-$SNAPSHOTS} THREADS=${THREADS:-2}
LR_FROM=${LR_FROM:-results/dedup/btmd.jsonl}
if [ -n "${SMOKE:-}" ]; then  # minutes: 4 epochs, snapshots 2 and 4, one rule
  PRE=4 FT=1 SNAPSHOTS="2 4" SUPERVISED_AT="2 4" CHECKPOINT_EVERY=1 RULES=${SMOKE_RULES:-msmae_ft_all} OUT=$OUT-smoke
  PRETRAIN_BLR=${PRETRAIN_BLR:-1e-3} SUPERVISED_BLR=${SUPERVISED_BLR:-1e-3}
fi
blr_for() {  # METHOD FIXED: FIXED if set, else the lr cpu_dedup.sh's grid chose for METHOD (stops the script if it cannot say)
  if [ -n "$2" ]; then echo "$2"; return; fi
  [ -f "$LR_FROM" ] || { echo "no $LR_FROM: run benchmarks/cpu_dedup.sh first (its grid chooses each rule's lr), or set PRETRAIN_BLR and SUPERVISED_BLR" >&2; exit 2; }
  "$PY" benchmarks/compare.py chosen-lr "$LR_FROM" "$1" || exit 2
}
mkdir -p "$OUT"
[ -f "$BUNDLE" ] || { echo "missing bundle $BUNDLE: run benchmarks/cpu_dedup.sh first (it makes it)"; exit 2; }
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
common=(--bundle "$BUNDLE" --preset tiny --img-size 48 --patch-size 8 --batch-size 64 --finetune-epochs "$FT" --seeds $SEEDS
        --sam-start-fraction 0.1 --sam-gate 0.5 --layer-decay 1.0 --device cpu --threads "$THREADS" --out "$OUT/curve.jsonl")

declare -A blr
for rule in $RULES ${SUPERVISED_AT:+supervised_eqflops}; do  # every rate known before the first epoch: a missing grid stops nothing half-way
  fixed=${PRETRAIN_BLR:-}; [ "$rule" = supervised_eqflops ] && fixed=${SUPERVISED_BLR:-}
  blr[$rule]=$(blr_for "$rule" "${fixed:-}")
done
for rule in $RULES; do
  echo "== $rule: pre-training $PRE epochs at blr ${blr[$rule]}, snapshots $SNAPSHOTS, fine-tuning $FT epochs from each"
  "$PY" benchmarks/compare.py "${common[@]}" --pretrain-epochs "$PRE" --methods "$rule" --pretrain-blr "${blr[$rule]}" \
    --pretrained-dir "$OUT/pretrained" --checkpoint-every "$CHECKPOINT_EVERY" --snapshots $SNAPSHOTS 2>&1 | tee -a "$OUT/curve.log"
done
for e in $SUPERVISED_AT; do  # the supervised ViT at the training FLOPs of E pre-training + FT fine-tuning epochs
  echo "== supervised_eqflops at the FLOPs of $e + $FT epochs, blr ${blr[supervised_eqflops]}"
  "$PY" benchmarks/compare.py "${common[@]}" --pretrain-epochs "$e" --methods supervised_eqflops --finetune-blr "${blr[supervised_eqflops]}" \
    2>&1 | tee -a "$OUT/curve.log"
done
"$PY" benchmarks/compare.py report "$OUT/curve.jsonl" --out "$OUT/curve.md"
