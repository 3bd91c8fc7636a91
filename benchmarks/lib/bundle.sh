# Sourced by the CPU comparison scripts (cpu_compare.sh, cpu_dedup.sh): one way to ingest BTMD and
# HAM10000 from the shared datasets and bundle them, so every table is made from the same splits.
# The caller sets WORK (ingested datasets), SHARED (the raw datasets), MSMAE, PY and SIDE.

bundle() {  # name, bundle path -> that path; ingests into $WORK/name and bundles on first use
  local name=$1 out=$2 data="$WORK/$1"
  if [ ! -f "$out" ]; then
    if [ ! -f "$data/dataset.json" ]; then
      case $name in
        btmd) "$MSMAE" ingest --data "$SHARED/btmd/Training" --out "$data" --val 0.15 --test 0.15 --seed 0 >&2 ;;
        ham10000) "$MSMAE" ingest --manifest "$SHARED/ham10000/HAM10000_metadata.csv" \
            --image-root "$SHARED/ham10000/images" --image-col image_id --label-col dx \
            --group-col lesion_id --out "$data" --val 0.15 --test 0.15 --seed 0 --max-side 160 >&2 ;;
        *) echo "bundle: no ingest rule for dataset '$name' (btmd or ham10000)" >&2; return 2 ;;
      esac
    fi
    "$PY" benchmarks/make_bundle.py "$data" --out "$out" --name "$name" --side "$SIDE" >&2
  fi
  echo "$out"
}
