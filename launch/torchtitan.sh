#!/usr/bin/env bash
# torchtitan's trainer (llama3 debug model) checkpointing to S3 through shardckpt: train, kill
# the whole run (SIGKILL, no goodbye) once a checkpoint is committed, then resume it.
#
#   ./launch/torchtitan.sh                     # starts a local moto S3 server for the run
#   ENDPOINT=http://127.0.0.1:9000 CKPT=s3://bucket/run ./launch/torchtitan.sh
#
# Variables:
#   ENDPOINT   S3 endpoint URL; unset: a moto server is started here (credentials in its env)
#   CKPT       checkpoint folder (default: s3://titan/run-<pid> on the moto server)
#   NPROC      ranks (default 2; gloo on the CPU, NCCL on GPUs)
#   STEPS      training steps (default 20); checkpoints every 5 steps, the last 2 kept
#   KILL_AT    the committed step after which the first run is killed (default 10)
# Needs `pip install -e '.[torchtitan,test]'` (moto). Extra arguments go to torchtitan.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1  # the log is watched for the commit of step KILL_AT
NPROC="${NPROC:-2}"
STEPS="${STEPS:-20}"
KILL_AT="${KILL_AT:-10}"
WORK="$(mktemp -d)"
SERVER=""
RUN=""
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1"); do
        echo "$child"
        descendants "$child"
    done
}
cleanup() {
    [ -n "$RUN" ] && kill -KILL "$RUN" $(descendants "$RUN") 2>/dev/null || true
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${ENDPOINT:-}" ]; then
    python - "$WORK/server.env" <<'PY' &
import signal, sys
from shardckpt.testing import servers as devserver
server = devserver.start_moto()
server.create_bucket("titan")
with open(sys.argv[1] + ".tmp", "w") as f:
    for k, v in {**server.env, "ENDPOINT": server.endpoint}.items():
        f.write(f"export {k}={v}\n")
__import__("os").rename(sys.argv[1] + ".tmp", sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    server.proc.wait()
finally:
    server.stop()
PY
    SERVER=$!
    for _ in $(seq 100); do [ -f "$WORK/server.env" ] && break; sleep 0.2; done
    # shellcheck disable=SC1091
    source "$WORK/server.env"
    CKPT="${CKPT:-s3://titan/run-$$}"
fi
: "${CKPT:?set CKPT to the checkpoint folder, e.g. s3://bucket/run}"
echo "torchtitan.sh: $NPROC ranks, checkpoints under $CKPT at $ENDPOINT" >&2

train() {
    python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
        examples/torchtitan_train.py --checkpoint.folder "$CKPT" \
        --checkpoint.endpoint "$ENDPOINT" --training.steps "$STEPS" "$@"
}

# 1: train, killed (every process of it) once step KILL_AT is committed
bash -c "$(declare -f train); $(declare -p CKPT ENDPOINT NPROC STEPS); train $*" \
    >"$WORK/first.log" 2>&1 &
RUN=$!
committed="committed .*step-$(printf '%010d' "$KILL_AT")/manifest.json"
until grep -q "$committed" "$WORK/first.log"; do
    if ! kill -0 "$RUN" 2>/dev/null; then
        echo "torchtitan.sh: the first run ended before step $KILL_AT was committed:" >&2
        tail -40 "$WORK/first.log" >&2
        exit 1
    fi
    sleep 0.2
done
# torchrun starts each rank in a session of its own: kill the whole tree, by process id
kill -KILL "$RUN" $(descendants "$RUN") 2>/dev/null
wait "$RUN" 2>/dev/null || true
RUN=""
echo "torchtitan.sh: killed the first run after step $KILL_AT was committed; resuming" >&2

# 2: the same command resumes from the newest committed step
train "$@" 2>&1 | tee "$WORK/second.log" |
    { grep -E "Training starts at step|shardckpt: loading|step: *$STEPS " >&2 || true; }
grep -q "Training starts at step" "$WORK/second.log"
echo "torchtitan.sh: $(grep -o 'Training starts at step [0-9]*' "$WORK/second.log" | head -1), trained to step $STEPS" >&2
