#!/usr/bin/env bash
# The GPU check: one command that, on a CUDA machine with the project's requirements installed, prints
# the hardware, compiles MuJoCo Warp's kernels once (timed), runs the CUDA-marked tests, the benchmarks
# at GPU sizes and the memory measurement, and writes every step's output to a folder.
#
#   bench/gpu_check.sh [--dry-run] [OUT_DIR]
#
# OUT_DIR: the argument, else $OUT when set, else gpu_check_out/. It receives one log per step and
# summary.txt (each step's exit code and seconds): 8 files. Every step runs under its own timeout,
# cut to what is left of the total budget (GPU_CHECK_BUDGET_S, default 470 s, so the whole check ends
# within 8 minutes); a step with less than 20 s left is skipped and says so in summary.txt. A failing
# or timed-out step does not stop the next one. --dry-run lists the steps, their timeouts and commands,
# and runs nothing (no GPU needed). PYTHON selects the interpreter (default: python, else python3).
#
# The first step after the hardware compiles MuJoCo Warp's CUDA kernels for both robots into Warp's
# kernel cache (~/.cache/warp): minutes on a cold cache, seconds once cached. Its log gives the time
# per robot, and the later steps then load the kernels instead of compiling them inside their timeouts.
set -u

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY_RUN=1
    shift
fi
OUT_DIR=${1:-${OUT:-gpu_check_out}}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
MIN_STEP_S=20
cd "$(dirname "$0")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python || command -v python3 || echo python3)
fi
START_S=$(date +%s)

# the two Python steps, written where they leave $OUT_DIR alone (it holds the 8 files that come back)
SNIPPETS=$(mktemp -d)
trap 'rm -rf "$SNIPPETS"' EXIT
cat >"$SNIPPETS/hardware.py" <<'PY'
import os, platform, torch
print(f"python {platform.python_version()}, {os.cpu_count()} CPU cores")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info(0)
    print(f"device 0: {torch.cuda.get_device_name(0)}, {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
for name in ("warp", "mujoco", "mujoco_warp", "torchrl", "tensordict", "tyro", "numpy"):
    try:
        print(f"{name} {getattr(__import__(name), '__version__', '(no __version__)')}")
    except Exception as err:
        print(f"{name}: not importable ({type(err).__name__}: {err})")
PY
cat >"$SNIPPETS/warmup.py" <<'PY'
import time
import torch
import warp as wp
from tasks import make_env
print(f"Warp kernel cache: {wp.config.kernel_cache_dir}")
for robot in ("ant", "humanoid"):
    start = time.perf_counter()
    env = make_env(robot, "heading", 16, device="cuda:0", seed=0, backend="mjwarp")
    for _ in range(3):
        env.step(torch.zeros(env.num_envs, env.num_actions, device=env.device))
    torch.cuda.synchronize()
    print(f"{robot}: kernels loaded (compiled on a cold cache), graphs captured and 3 control steps in "
          f"{time.perf_counter() - start:.1f} s ({env.describe_backend()})", flush=True)
PY

# name | timeout in seconds | command (run with bash -c from the repository root); in order of importance, since
# the last ones are the first to be cut when the budget runs short
STEPS=(
    "hardware|60|nvidia-smi; $PYTHON $SNIPPETS/hardware.py"
    "warmup|240|PYTHONPATH=. $PYTHON $SNIPPETS/warmup.py"
    "tests|240|$PYTHON -m pytest tests -m cuda -q -ra --continue-on-collection-errors"
    "bench_hrl_humanoid|120|$PYTHON bench/bench_hrl.py --robot humanoid --llc-checkpoint random --num-envs 1024 4096 16384"
    "bench_memory|150|$PYTHON bench/bench_memory.py --robots humanoid ant --num-envs 1024 4096 16384 --timeout 75"
    "bench_hrl_ant|90|$PYTHON bench/bench_hrl.py --robot ant --num-envs 1024 4096 16384"
    "bench_sim|60|$PYTHON bench/bench_sim.py --robots ant humanoid --num-envs 1024 4096 16384 --backends mjwarp \
--no-reference --steps 100"
    "bench_hrl_graph|90|$PYTHON bench/bench_hrl.py --robot humanoid --llc-checkpoint random --num-envs 4096 --no-torchrl \
--cuda-graph"
)

run_step() {
    local name=$1 limit=$2 command=$3
    local left=$((BUDGET_S - ($(date +%s) - START_S)))
    if [ "$left" -lt "$limit" ]; then
        limit=$left
    fi
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        printf '%-20s skipped: %s s of the %s s budget left\n' "$name" "$left" "$BUDGET_S" | tee -a "$OUT_DIR/summary.txt"
        return
    fi
    local step_start=$(date +%s)
    echo "== $name (timeout ${limit} s): $command" >"$OUT_DIR/$name.log"
    PYTHONUNBUFFERED=1 timeout -k 10 "$limit" bash -c "$command" >>"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note=" (timed out)"
    fi
    printf '%-20s exit %3s%s, %s s\n' "$name" "$rc" "$note" "$(($(date +%s) - step_start))" | tee -a "$OUT_DIR/summary.txt"
}

if [ "$DRY_RUN" -eq 1 ]; then
    echo "gpu check, dry run: output to $OUT_DIR, total budget $BUDGET_S s"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit command <<<"$step"
        printf '%-20s timeout %3s s: %s\n' "$name" "$limit" "$command"
    done
    exit 0
fi

mkdir -p "$OUT_DIR" || exit 1
: >"$OUT_DIR/summary.txt"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null)
echo "gpu check: output to $OUT_DIR, total budget $BUDGET_S s, $(date -u +%FT%TZ), commit $COMMIT" \
    | tee -a "$OUT_DIR/summary.txt"
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    run_step "$name" "$limit" "$command"
done
echo "total $(($(date +%s) - START_S)) s; logs in $OUT_DIR" | tee -a "$OUT_DIR/summary.txt"
