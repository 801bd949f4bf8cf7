#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine with PyTorch (a few minutes on one H100):
# the GPU tests, then benchmarks/gpu_bench.py. Everything it measures lands in OUT_DIR.
#   benchmarks/gpu_run.sh [OUT_DIR]   (default benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    nproc; free -g | head -2
} 2>&1 | tee "$out/gpu_info.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/checkpointer/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
timeout 360 python3 -m benchmarks.gpu_bench --out "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
