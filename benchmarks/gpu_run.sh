#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (about 8 minutes on one H200):
#   1. the GPU tests (pinned snapshot; the load into CUDA tensors through pinned pieces, from
#      the local store and moto);
#   2. benchmarks/gpu_bench.py (its section 4: the load into CUDA tensors against the card's
#      pinned and pageable host-to-device rates);
#   3. torchtitan's llama3 debug model on 1 GPU with ShardckptCheckpointManager (the trainer
#      of examples/torchtitan_train.py, checkpoints in a local folder): TITAN_STEPS steps
#      without checkpointing; the same with a checkpoint every TITAN_INTERVAL steps, killed
#      (SIGKILL) once step TITAN_KILL_AT is committed; resumed from it to TITAN_STEPS. Prints
#      the step times with and without checkpointing and the resume's load GB/s.
# Everything lands in OUT_DIR: gpu_info.txt, gpu_tests.log, gpu_bench.json/.log, titan_*.log,
# titan.json.
#
# What the machine's image lacks (shardckpt's boto3 and crc32c, moto's server, torchtitan and
# the packages its trainer imports) travels as wheels in .whl/ (ignored by git): fill it here
# with `benchmarks/gpu_wheels.sh --titan` (16 MiB) and carry it (`run` with carry [".whl"]).
#   benchmarks/gpu_run.sh [OUT_DIR]                     (default benchmarks/results)
# Settings (environment): TITAN_STEPS (300), TITAN_KILL_AT (200), TITAN_INTERVAL (50),
# TITAN_SEQ (2048), TITAN_BATCH (8), BENCH_ARGS (extra gpu_bench arguments), SKIP (parts to
# leave out, e.g. "tests bench"), PYTHON (python3). A CPU dry run (the tests and gpu_bench
# skip themselves without CUDA; torchtitan runs on the CPU through the example's shims):
#   TITAN_STEPS=12 TITAN_KILL_AT=10 TITAN_INTERVAL=5 TITAN_SEQ=64 TITAN_BATCH=2 \
#       benchmarks/gpu_run.sh /tmp/gpu-dry
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
python=${PYTHON:-python3}
site=${GPU_SITE:-/tmp/shardckpt-site}
steps=${TITAN_STEPS:-300} kill_at=${TITAN_KILL_AT:-200} interval=${TITAN_INTERVAL:-50}
seq_len=${TITAN_SEQ:-2048} batch=${TITAN_BATCH:-8}
mkdir -p "$out"
out=$(cd "$out" && pwd)
say() { echo "gpu_run: $*"; }
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }

PYTHON="$python" benchmarks/gpu_wheels.sh --install "$site"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total --format=csv
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    nproc
    free -g | head -2
} 2>&1 | tee "$out/gpu_info.txt"

# -- 1, 2: the GPU tests and gpu_bench ---------------------------------------------------------
skip tests || timeout 150 "$python" -m pytest -q -p no:cacheprovider \
    tests/checkpointer/test_gpu.py tests/writer/test_device_load.py 2>&1 | tee "$out/gpu_tests.log"
# shellcheck disable=SC2086
skip bench || timeout 240 "$python" -m benchmarks.gpu_bench --reps 2 ${BENCH_ARGS:-} \
    --out "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
skip titan && exit 0

# -- 3: torchtitan ---------------------------------------------------------------------------------
work=$(mktemp -d)
run_pid=""
kill_run() { # the trainer (timeout's child) first, then timeout: SIGKILL, no goodbye
    [ -n "$run_pid" ] && kill -KILL $(ps -o pid= --ppid "$run_pid") "$run_pid" 2>/dev/null
}
trap 'kill_run; rm -rf "$work"' EXIT
titan() { # LOG, then torchtitan arguments; one rank, no launcher; run it in a subshell (exec)
    local log=$1
    shift
    RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 \
        MASTER_PORT=$((29500 + RANDOM % 1000)) exec timeout 150 "$python" examples/torchtitan_train.py \
        --training.steps "$steps" --training.seq_len "$seq_len" \
        --training.local_batch_size "$batch" --checkpoint.folder "$work/ckpt" \
        --checkpoint.interval "$interval" --dump_folder "$work/dump" "$@" >"$out/$log" 2>&1
}
say "torchtitan: $steps steps without checkpointing"
(titan titan_plain.log --checkpoint.no-enable) || say "the run without checkpointing failed: see titan_plain.log"

say "torchtitan: with a checkpoint every $interval steps, killed once step $kill_at is committed"
(titan titan_first.log) &
run_pid=$!
committed="committed .*step-$(printf '%010d' "$kill_at")/manifest.json"
until grep -q "$committed" "$out/titan_first.log" 2>/dev/null; do
    kill -0 "$run_pid" 2>/dev/null || break
    sleep 0.2
done
if kill -0 "$run_pid" 2>/dev/null && kill_run; then
    say "killed after step $kill_at was committed; resuming"
else
    say "the first run ended before step $kill_at was committed: see titan_first.log"
fi
wait "$run_pid" 2>/dev/null
run_pid=""
(titan titan_resumed.log) || say "the resumed run failed: see titan_resumed.log"

"$python" - "$out" "$((seq_len * batch))" "$interval" <<'EOF'
import json, re, statistics, sys

out, tokens, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ansi = re.compile(r"\x1b\[[0-9;]*m")


def read(name):
    try:
        with open(f"{out}/{name}") as f:
            return ansi.sub("", f.read())
    except OSError:
        return ""


def step_times(text, warmup=5):
    """Seconds per step from torchtitan's tps (log_freq 1: the time since the last step's
    line, which includes the previous step's checkpoint save), less the run's first steps."""
    found = re.findall(r"step:\s*(\d+)\s.*?tps: ([\d,]+)", text)[warmup:]
    return {int(s): tokens / int(t.replace(",", "")) for s, t in found if t.replace(",", "") != "0"}


def summary(steady):
    after_save = [t for s, t in steady.items() if (s - 1) % interval == 0]
    others = [t for s, t in steady.items() if (s - 1) % interval != 0]
    return {
        "steps": len(steady),  # timed: each run's first steps left out
        "median_step_s": statistics.median(steady.values()) if steady else None,
        "mean_step_s": statistics.mean(steady.values()) if steady else None,
        "median_step_after_save_s": statistics.median(after_save) if after_save else None,
        "median_step_between_saves_s": statistics.median(others) if others else None,
    }


plain, first, resumed = (read(f"titan_{n}.log") for n in ("plain", "first", "resumed"))
result = {
    "without_checkpointing": summary(step_times(plain)),
    "with_checkpointing": summary({**step_times(first), **step_times(resumed)}),
    "resumed_at": [int(s) for s in re.findall(r"Training starts at step (\d+)", resumed)],
    "loads": [json.loads(j) for j in re.findall(r"shardckpt load (\{.*\})", resumed)],
    "saves": [json.loads(j) for j in re.findall(r"shardckpt save (\{.*\})", first + resumed)],
}
with open(f"{out}/titan.json", "w") as f:
    json.dump(result, f, indent=2)
ms = lambda v: f"{v * 1e3:.1f} ms" if v is not None else "n/a"
for name in ("without_checkpointing", "with_checkpointing"):
    r = result[name]
    print(
        f"gpu_run: torchtitan {name.replace('_', ' ')}: {r['steps']} steps, median {ms(r['median_step_s'])}, "
        f"mean {ms(r['mean_step_s'])}; right after a save {ms(r['median_step_after_save_s'])}, "
        f"between saves {ms(r['median_step_between_saves_s'])}"
    )
print(f"gpu_run: resumed at step {result['resumed_at'] or 'n/a'}")
for load in result["loads"]:
    print(
        f"gpu_run: load of step {load.get('step')}: {load.get('bytes', 0) / 2**20:.0f} MiB in "
        f"{load.get('seconds', 0):.2f} s = {load.get('gbps', 0):.2f} GB/s"
    )
EOF
