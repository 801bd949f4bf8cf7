#!/usr/bin/env bash
# The scale run, for a lent GPU machine (16 cores, no network; about 6 minutes): SeaweedFS and
# 8 ranks holding 2 GiB each (16 GiB per save), shardckpt against s3torchconnector's DCP
# writer/reader (s3tc-t8), DCP's FsspecWriter/FsspecReader over s3fs (dcp-fsspec) and the raw
# PUT/GET limit, alternating, through `python -m benchmarks --server seaweedfs --world-sizes 8`.
# Everything lands in OUT_DIR: gpu_scale.json (results), .png, gpu_scale.log.
#
# What the machine's image lacks travels as wheels in .whl/ (ignored by git; fill it here with
# benchmarks/gpu_wheels.sh and carry it: `run` with carry [".whl"]). They are installed into
# SCALE_SITE, and SeaweedFS's binary unpacked there; a peer whose packages are missing or do
# not import is left out with the reason printed; shardckpt's own (boto3, crc32c) and the
# server are required.
#   benchmarks/gpu_scale.sh [OUT_DIR]                          (default benchmarks/results)
# Settings (environment): SCALE_WORLD_SIZES (8), SCALE_WORKLOAD (16gib-128: in all, over the
# ranks), SCALE_REPS (2), SCALE_CAP_S (90: a system slower than that per save+load runs once),
# SCALE_TIMEOUT_S (540), PYTHON (python3). A CPU dry run at a tiny size:
#   SCALE_WORLD_SIZES=2 SCALE_WORKLOAD=64mib-16 benchmarks/gpu_scale.sh /tmp/scale-dry
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
python=${PYTHON:-python3}
site=${SCALE_SITE:-/tmp/shardckpt-site}
mkdir -p "$out"
exec > >(tee "$out/gpu_scale.log") 2>&1
say() { echo "gpu_scale: $*"; }

# -- what travels in .whl/ ---------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    pip_install() {
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$@" >/dev/null 2>&1
    }
    if ! pip_install .whl/*.whl; then # one by one: keep what installs on this Python
        for wheel in .whl/*.whl; do
            pip_install "$wheel" || say "wheel $(basename "$wheel") does not install here: left out"
        done
    fi
fi
if [ -s .whl/weed.xz ] && ! command -v weed >/dev/null; then
    mkdir -p "$site/bin"
    "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"), 1 << 24)' \
        .whl/weed.xz "$site/bin/weed" && chmod +x "$site/bin/weed"
fi
export PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"

# -- what can run ------------------------------------------------------------------------------
why_not() { "$python" -c "$1" 2>&1 >/dev/null | tail -1; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    echo "$(nproc) CPUs; $(free -g | awk '/Mem:/ {print $2}') GiB memory"
    df -h "${TMPDIR:-/tmp}" | tail -1
    "$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
} | sed 's/^/gpu_scale: /'
problem=$(why_not 'import boto3, crc32c, torch, shardckpt, benchmarks')
if [ -n "$problem" ]; then
    say "cannot run shardckpt here: $problem"
    exit 1
fi
if ! command -v weed >/dev/null; then
    say "cannot run: no SeaweedFS binary (weed) on PATH and none in .whl/weed.xz"
    exit 1
fi
systems=shardckpt,raw
problem=$(why_not 'import s3torchconnector.dcp')
if [ -z "$problem" ]; then systems+=,s3tc-t8; else say "s3tc-t8 left out: $problem"; fi
# Imported here (not in their own environment, see benchmarks/peer_env.py), or left out.
problem=$(why_not 'import s3fs, aiobotocore.session, torch.distributed.checkpoint._fsspec_filesystem')
if [ -z "$problem" ]; then systems+=,dcp-fsspec; else say "dcp-fsspec left out: $problem"; fi
say "$(weed version 2>/dev/null | head -1); systems $systems"

# -- the run -----------------------------------------------------------------------------------
timeout "${SCALE_TIMEOUT_S:-540}" "$python" -m benchmarks --server seaweedfs \
    --world-sizes "${SCALE_WORLD_SIZES:-8}" --workloads "${SCALE_WORKLOAD:-16gib-128}" \
    --reps "${SCALE_REPS:-2}" --cap-seconds "${SCALE_CAP_S:-90}" --no-count \
    --systems "$systems" --name gpu_scale --out-dir "$out"
status=$?
[ $status -eq 124 ] && say "stopped at SCALE_TIMEOUT_S=${SCALE_TIMEOUT_S:-540}s"
exit $status
