#!/usr/bin/env bash
# One node, many GPUs: train with async S3 checkpoints.
#
#   CKPT=s3://my-bucket/run-1 NPROC=8 ./launch/torchrun.sh [extra train.py args]
#
# Variables:
#   CKPT       checkpoint root (required): s3://bucket/prefix, file:///dir or a path
#   NPROC      processes (GPUs) on this node (default: number of GPUs, else 2)
#   AWS_REGION / AWS_ENDPOINT_URL / AWS_PROFILE   as for any AWS client (optional)
set -euo pipefail
: "${CKPT:?set CKPT to the checkpoint root, e.g. s3://my-bucket/run-1}"
if [ -z "${NPROC:-}" ]; then
    # `nvidia-smi -L` prints one "GPU i: ..." line per GPU; without the tool (or a GPU) use 2.
    NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [ "$NPROC" -gt 0 ] || NPROC=2
fi
command -v torchrun >/dev/null || { echo "torchrun.sh: torchrun not found: install torch (pip install -e .) in this environment" >&2; exit 1; }
echo "torchrun.sh: $NPROC processes, checkpoints under $CKPT" >&2
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc-per-node "$NPROC" examples/train.py --ckpt "$CKPT" "$@"
