#!/usr/bin/env bash
# Build the container image and try it, on a Debian host with no Docker and no container
# registry (root, podman from Debian's packages, a base image made with debootstrap).
#
#   sudo bash cluster/build_local.sh                   # base (if missing), GPU image, CPU image (if its index answers), checks
#   sudo bash cluster/build_local.sh --no-checks       # build only
#   sudo bash cluster/build_local.sh --base docker.io/library/python:3.11.14-slim-bookworm   # a given base instead of debootstrap
#   sudo bash cluster/build_local.sh --checks-only     # the checks against images already built
#
# Idempotent: the base is made once (podman image localhost/msmae-base:bookworm), podman's layer
# cache keeps the ~7 GB dependency layer, so a second run rebuilds only what changed (a source
# change: the last layer, seconds) and re-runs the checks. Prints each phase's time and the
# image sizes at the end. Cold: ~25 GB of disk at peak, 20-30 min on 2 cores.
#
# The checks, against the GPU image (it runs on CPU too):
#   1. `msmae --help`;
#   2. a one-epoch-per-stage demo `msmae run` on the bundled sample as uid 10001, read-only root
#      filesystem, no capabilities, no privilege escalation, a mounted workdir;
#   3. the KubeRay path: a Ray head container (num-cpus 0, like the manifests' head) and a worker
#      container joined as one Ray cluster with token authentication, an MLflow server in a
#      third container, and `msmae run` submitted with `ray job submit` from a fourth (as the
#      RayJob's submitter pod does); the job must succeed and register the model.
# The containers of check 3 share one network namespace with no interface but loopback (the
# head on 127.0.0.2, the worker on 127.0.0.3, MLflow on 127.0.0.1): nothing leaves the machine.
#
# Frictions this script handles (a VM with a hybrid cgroup layout): podman runs with
# `--runtime runc` (crun rejects the layout) and explicit nofile/nproc ulimits; tmpfs mounts for
# $HOME are chowned to uid 10001 (`U`: Ray writes ~/.ray); Debian's Python installs into a venv.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
BASE=""
CHECKS=1
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --base) BASE="$2"; shift 2 ;;
    --no-checks) CHECKS=0; shift ;;
    --checks-only) BUILD=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done

[ "$(id -u)" = 0 ] || { echo "build_local.sh: run as root (rootful podman, debootstrap)" >&2; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
IMAGE=${MSMAE_IMAGE:-ghcr.io/msmae-ray/msmae-ray:$VERSION}
IMAGE_CPU=${MSMAE_IMAGE_CPU:-$IMAGE-cpu}
LOCAL_BASE=localhost/msmae-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
WORK=${MSMAE_BUILD_WORK:-/var/tmp/msmae-build-local}
PODMAN=(podman --runtime runc)
# Explicit limits (podman's defaults fail on such VMs), no higher than this shell's hard limits
# (runc cannot raise them: "error setting rlimit type 7").
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 65536 ] && NOFILE=65536
NPROC=$(ulimit -Hu); [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ] && NPROC=32768
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")
# How every check container runs: as the pods do (uid 10001, read-only root, no capabilities).
SECURE=(--user 10001:10001 --read-only --cap-drop ALL --security-opt no-new-privileges
        --tmpfs /tmp:rw,size=4g,mode=1777 --tmpfs /home/msmae:rw,size=1g,U "${ULIMITS[@]}")

SUMMARY=()
T0=$(date +%s)
say() { printf '\n[build_local %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
timed() {  # timed LABEL command...: run it, note how long it took
  local label=$1 start=$SECONDS
  shift
  "$@"
  SUMMARY+=("$(printf '%-44s %5d s' "$label" $((SECONDS - start)))")
}
human() { numfmt --to=iec --suffix=B "$1" 2>/dev/null || echo "$1 B"; }
finish() {  # finish [exit status]
  local rc=${1:-$?}
  [ "${#SUMMARY[@]}" -gt 0 ] && { echo; echo "== times (total $(( $(date +%s) - T0 )) s)"; printf '  %s\n' "${SUMMARY[@]}"; }
  echo "== images"
  for image in "$IMAGE" "$IMAGE_CPU" "${BASE:-$LOCAL_BASE}"; do
    if "${PODMAN[@]}" image exists "$image" 2>/dev/null; then
      printf '  %-48s %s\n' "$image" "$(human "$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image")")"
    fi
  done
  [ $rc = 0 ] && echo "== build_local.sh: OK" || echo "== build_local.sh: FAILED (exit $rc)"
}
trap 'finish $?' EXIT

# ------------------------------------------------------------------ tools

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[ -n "$BASE" ] || command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  say "installing ${need[*]} from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# ------------------------------------------------------------------ base

make_base() {  # a minimal Debian bookworm with Python 3.11 and venv, as a podman image
  local rootfs
  rootfs=$(mktemp -d /var/tmp/msmae-base.XXXXXX)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR"
  cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" --numeric-owner -c . | "${PODMAN[@]}" import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
}

if [ "$BUILD" = 1 ]; then
  if [ -n "$BASE" ]; then
    "${PODMAN[@]}" image exists "$BASE" || timed "pull base $BASE" "${PODMAN[@]}" pull "$BASE"
  else
    BASE=$LOCAL_BASE
    if "${PODMAN[@]}" image exists "$BASE"; then
      say "base $BASE exists (remove it with 'podman rmi $BASE' to make it anew)"
    else
      say "making the base $BASE with debootstrap (Debian bookworm, Python 3.11)"
      timed "base (debootstrap + import)" make_base
    fi
  fi

  # ---------------------------------------------------------------- images

  # The host's CA bundle for pip, mounted into the build's RUN steps only (not into the image):
  # where TLS to the package index is intercepted, the base's own bundle does not trust it.
  HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
  BUILD_MOUNTS=()
  if [ -f "$HOST_CA" ]; then
    PIP_CONF_DIR=$(mktemp -d)
    printf '[global]\ncert = /run/host-ca.crt\n' > "$PIP_CONF_DIR/pip.conf"
    chmod 755 "$PIP_CONF_DIR" && chmod 644 "$PIP_CONF_DIR/pip.conf"
    BUILD_MOUNTS=(-v "$(readlink -f "$HOST_CA"):/run/host-ca.crt:ro" -v "$PIP_CONF_DIR/pip.conf:/etc/pip.conf:ro")
  fi
  build() {  # build TAG [build args...]
    local tag=$1
    shift
    "${PODMAN[@]}" build --layers --from "$BASE" "${ULIMITS[@]}" "${BUILD_MOUNTS[@]}" -f cluster/Dockerfile "$@" -t "$tag" .
  }
  say "building $IMAGE (torch from PyPI: the CUDA wheels)"
  timed "build GPU image" build "$IMAGE"

  # PyPI's torch/torchvision wheels for Linux x86_64 are CUDA builds (their C++ extensions link
  # libtorch_cuda): a CPU image needs an index that serves the +cpu wheels.
  if python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=15)" "$TORCH_CPU_INDEX" 2>/dev/null; then
    say "building $IMAGE_CPU (torch's CPU wheels from $TORCH_CPU_INDEX)"
    timed "build CPU image" build "$IMAGE_CPU" --build-arg "TORCH_INDEX_URL=$TORCH_CPU_INDEX"
  else
    say "CPU image NOT built: $TORCH_CPU_INDEX does not answer from here (PyPI has no CPU torch wheel for Linux x86_64; set TORCH_CPU_INDEX to a mirror of it)"
    SUMMARY+=("CPU image: not built ($TORCH_CPU_INDEX unreachable)")
  fi
fi

[ "$CHECKS" = 1 ] || exit 0

# ------------------------------------------------------------------ checks

PREFIX=msmae-local
cleanup_containers() {  # the head last: the others live in its network namespace
  for name in solo submit worker mlflow head; do
    "${PODMAN[@]}" rm -f -t 10 "$PREFIX-$name" >/dev/null 2>&1 || true
  done
}
cleanup_containers
trap 'rc=$?; cleanup_containers; finish $rc' EXIT
rm -rf "$WORK" && mkdir -p "$WORK"/{solo,shared,mlflow,ray-head,ray-worker}
chown -R 10001:10001 "$WORK"

help_check() {
  local out
  out=$("${PODMAN[@]}" run --rm "${SECURE[@]}" "$IMAGE" --help)
  grep -q ' run ' <<<"$out" || { echo "msmae --help lists no run command:" >&2; echo "$out" >&2; exit 1; }
}
say "check 1: msmae --help"
timed "check: --help" help_check

# Demo-sized: the demo preset on the bundled sample, one epoch per stage.
SHORT=(--set pretrain.epochs=1 --set pretrain.warmup_epochs=0 --set pretrain.masking.sam_start=0
       --set finetune.epochs=1 --set finetune.warmup_epochs=0)
say "check 2: demo msmae run as uid 10001, read-only root, no capabilities, workdir mounted"
timed "check: msmae run (1 container)" "${PODMAN[@]}" run --rm --name "$PREFIX-solo" "${SECURE[@]}" --shm-size 2g \
    -v "$WORK/solo:/mnt/shared" "$IMAGE" \
    run --data /opt/msmae-ray/data/sample/btmd --config demo --workdir /mnt/shared/demo "${SHORT[@]}"
test -f "$WORK/solo/demo/last_run.json" || { echo "the run left no last_run.json in the mounted workdir" >&2; exit 1; }

say "check 3: Ray head + worker containers, MLflow in a third, msmae run submitted with ray job submit"
TOKEN_ENV=$(mktemp)
chmod 600 "$TOKEN_ENV"
# Every ray command carries the token (token auth, as the manifests' authOptions). The agent
# timeout: a raylet gives up when its dashboard agent has not written its port file within
# 15 s, which a busy 2-core machine misses; Ray reads this knob for that wait (and for the
# agent's registration).
printf 'RAY_AUTH_MODE=token\nRAY_AUTH_TOKEN=%s\nRAY_USAGE_STATS_ENABLED=0\nRAY_agent_register_timeout_ms=120000\n' \
    "$(python3 -c 'import secrets; print(secrets.token_hex(32))')" > "$TOKEN_ENV"
trap 'rc=$?; cleanup_containers; rm -f "$TOKEN_ENV"; finish $rc' EXIT
NET=(--network "container:$PREFIX-head")
# Fixed ports: the two nodes share one network namespace, so no port may be shared.
node_ports() {  # node_ports BASE: the ports a node opens besides its GCS/dashboard
  echo --node-manager-port $(( $1 + 1 )) --object-manager-port $(( $1 + 2 )) --dashboard-agent-listen-port $(( $1 + 3 )) \
       --dashboard-agent-grpc-port $(( $1 + 4 )) --runtime-env-agent-port $(( $1 + 5 )) --metrics-export-port $(( $1 + 6 ))
}
wait_for() {  # wait_for SECONDS CONTAINER COMMAND...: until the command succeeds in the container (false if it exits)
  local deadline=$((SECONDS + $1)) name=$2
  shift 2
  while [ $SECONDS -lt $deadline ]; do
    [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" = true ] || return 1
    "${PODMAN[@]}" exec --env-file "$TOKEN_ENV" "$name" "$@" >/dev/null 2>&1 && return 0
    sleep 3
  done
  return 1
}
wait_for_log() {  # wait_for_log SECONDS CONTAINER TEXT: until the container's output shows TEXT (false if it exits)
  local deadline=$((SECONDS + $1)) name=$2 text=$3
  while [ $SECONDS -lt $deadline ]; do
    "${PODMAN[@]}" logs "$name" 2>&1 | grep -qF "$text" && return 0
    [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" = true ] || return 1
    sleep 2
  done
  return 1
}
alive_nodes() {
  "${PODMAN[@]}" exec --env-file "$TOKEN_ENV" "$PREFIX-head" ray list nodes --address http://127.0.0.1:8265 \
      --filter state=ALIVE --format json 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0
}
start_cluster() {
  # The head: no task slots (num-cpus 0, like the manifests' head): it runs the GCS, the
  # dashboard/job server and the job's driver; its network namespace is loopback only.
  # /tmp/ray (Ray's logs) on the host, as the pods' emptyDir, so that a failure can be read.
  "${PODMAN[@]}" run -d --name "$PREFIX-head" --network none "${SECURE[@]}" --shm-size 1g --env-file "$TOKEN_ENV" \
      -v "$WORK/shared:/mnt/shared" -v "$WORK/ray-head:/tmp/ray" --entrypoint ray "$IMAGE" \
      start --head --block --node-ip-address 127.0.0.2 --port 6379 --dashboard-host 127.0.0.1 --dashboard-port 8265 \
      --ray-client-server-port 10001 --num-cpus 0 --num-gpus 0 --object-store-memory 300000000 --disable-usage-stats \
      $(node_ports 20000) >/dev/null
  # One at a time: each node's start-up (a dozen Python processes importing Ray) must meet
  # Ray's fixed 30 s deadline, and on a busy 2-core machine two at once can miss it. The head
  # first, fully started ("Ray runtime started", not only its job server), then the worker,
  # then MLflow.
  wait_for_log 180 "$PREFIX-head" "Ray runtime started" || return 1
  # The worker: 4 logical CPUs on 2 cores (2 Train workers + Ray Data's tasks; see STACK.md).
  "${PODMAN[@]}" run -d --name "$PREFIX-worker" "${NET[@]}" "${SECURE[@]}" --shm-size 2g --env-file "$TOKEN_ENV" \
      -v "$WORK/shared:/mnt/shared" -v "$WORK/ray-worker:/tmp/ray" --entrypoint ray "$IMAGE" \
      start --block --address 127.0.0.2:6379 --node-ip-address 127.0.0.3 --num-cpus 4 --object-store-memory 500000000 \
      --disable-usage-stats $(node_ports 21000) >/dev/null
  wait_for_log 180 "$PREFIX-worker" "Ray runtime started" || return 1
  local deadline=$((SECONDS + 120)) name
  while [ $SECONDS -lt $deadline ] && [ "$(alive_nodes)" != 2 ]; do
    for name in head worker; do  # `ray start --block` exits when its node gives up
      [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$PREFIX-$name" 2>/dev/null)" = true ] || return 1
    done
    sleep 3
  done
  [ "$(alive_nodes)" = 2 ] || return 1
  "${PODMAN[@]}" run -d --name "$PREFIX-mlflow" "${NET[@]}" "${SECURE[@]}" -v "$WORK/mlflow:/mnt/mlflow" --entrypoint mlflow "$IMAGE" \
      server --backend-store-uri sqlite:////mnt/mlflow/mlflow.db --artifacts-destination /mnt/mlflow/artifacts \
      --host 127.0.0.1 --port 5000 --workers 1 >/dev/null
  wait_for 180 "$PREFIX-mlflow" wget -q -O /dev/null http://127.0.0.1:5000/health
}
# Three tries: on a loaded 2-core machine (and under `nice`) a Ray node can miss its fixed 30 s
# start-up deadline (its dashboard agent too slow to write its port file): the node gives up.
# tests/test_cluster_two_node.py retries for the same reason.
cluster_up() {
  local attempt
  for attempt in 1 2 3; do
    start_cluster && break
    echo "attempt $attempt: the cluster did not come up ($(alive_nodes) alive nodes); the containers said:" >&2
    for name in head worker mlflow; do
      echo "--- $name" >&2
      "${PODMAN[@]}" logs --tail 15 "$PREFIX-$name" 2>&1 | grep -v '^  ' >&2 || true
    done
    cleanup_containers
    [ "$attempt" != 3 ] || exit 1
    rm -rf "$WORK"/ray-head/* "$WORK"/ray-worker/*
  done
  "${PODMAN[@]}" exec --env-file "$TOKEN_ENV" "$PREFIX-head" ray status --address 127.0.0.2:6379
  # Token authentication is on: the job server refuses a request without the token.
  local code
  code=$("${PODMAN[@]}" exec "$PREFIX-head" python -c "
import urllib.request, urllib.error
try:
    urllib.request.urlopen('http://127.0.0.1:8265/api/jobs/', timeout=20); print(200)
except urllib.error.HTTPError as e:
    print(e.code)")
  [ "$code" = 401 ] || { echo "the job server answered $code without a token (expected 401)" >&2; exit 1; }
  echo "job server without the token: HTTP $code"
}
timed "check: Ray cluster (2 containers) + MLflow up" cluster_up

MODEL=msmae-local-cluster
SUBMISSION=msmae-run-$(date +%s)
job() {
  # As the RayJob's submitter pod: `ray job submit` to the head, the entrypoint `msmae run …`,
  # the tracking URI in the runtime environment's env_vars (cluster/jobs/rayjob-run.yaml).
  "${PODMAN[@]}" run --rm --name "$PREFIX-submit" "${NET[@]}" "${SECURE[@]}" --env-file "$TOKEN_ENV" --entrypoint ray "$IMAGE" \
      job submit --address http://127.0.0.1:8265 --submission-id "$SUBMISSION" \
      --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}}' -- \
      msmae run --data /opt/msmae-ray/data/sample/btmd --config demo --workdir /mnt/shared/runs/local \
      --tracking-uri http://127.0.0.1:5000 --train-workers 2 "${SHORT[@]}" \
      --set "tracking.model_name=$MODEL" --set "tracking.experiment=$MODEL" | tee "$WORK/job.log"
}
timed "check: ray job submit msmae run (2-node)" job
# The job server's record of the submission (REST, with the token).
status=$("${PODMAN[@]}" exec --env-file "$TOKEN_ENV" "$PREFIX-head" python -c "
import json, os, urllib.request
request = urllib.request.Request('http://127.0.0.1:8265/api/jobs/$SUBMISSION', headers={'Authorization': 'Bearer ' + os.environ['RAY_AUTH_TOKEN']})
print(json.load(urllib.request.urlopen(request, timeout=30))['status'])")
echo "job $SUBMISSION: $status"
[ "$status" = SUCCEEDED ] || { echo "job $SUBMISSION did not succeed" >&2; exit 1; }
grep -q "registered $MODEL version 1" "$WORK/job.log" || { echo "the job's log does not say the model was registered" >&2; exit 1; }
# The registry's own record, from the MLflow server.
"${PODMAN[@]}" exec "$PREFIX-head" python -c "
import json, sys, urllib.request
got = json.load(urllib.request.urlopen('http://127.0.0.1:5000/api/2.0/mlflow/registered-models/get?name=$MODEL', timeout=20))
versions = got['registered_model'].get('latest_versions', [])
assert versions and versions[-1]['status'] == 'READY', got
print('MLflow registry: $MODEL version', versions[-1]['version'], versions[-1]['status'])"
# Both nodes took part: the Train workers ran on the worker container (the head has no CPUs).
"${PODMAN[@]}" exec --env-file "$TOKEN_ENV" "$PREFIX-head" ray list actors --address http://127.0.0.1:8265 --detail \
    --filter class_name=RayTrainWorker --limit 1000 --format json \
    | python3 -c 'import json,sys; a=json.load(sys.stdin); print(len(a), "Train worker actors on node(s)", sorted({x["node_id"][:8] for x in a}))'
