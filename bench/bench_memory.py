"""Peak memory of one full trainer iteration against the number of worlds N: MiB per 1,000 worlds
and the largest N that fits a memory budget.

Each N runs in a fresh Python process (a process's peak resident set never goes down, and CUDA
caches would carry over from one N to the next). The process builds what the trainer builds with
its default flags: the env (--backend, default `auto`: MuJoCo Warp on CUDA, C MuJoCo on the CPU), the frozen
LLC (checkpoints/llc_{robot}.pt when it exists, else an untrained LLC of llc_pretrain.py's sizes,
as `bench/bench_hrl.py --llc-checkpoint random`), the policy, Adam and the rollout storage of
--num-steps high-level steps; then it runs --iterations full iterations (rollout(), compute_gae(),
update_policy(), all from hrl_ppo_continuous.py through bench/bench_hrl.py) and reads its peak:
    CPU   the process's peak resident set (ru_maxrss): host memory of the simulator, torch, the
          Python interpreter and its libraries
    CUDA  torch's peak (torch.cuda.max_memory_reserved: what its caching allocator held) plus
          MuJoCo Warp's arrays (the high-water mark of Warp's CUDA memory pool, or, where Warp
          allocates without a pool, the growth of the device's used memory over the env's
          construction less torch's part of it); the larger of that sum and the device's used
          memory after the iteration less before anything was built (torch.cuda.mem_get_info, which
          also sees cuBLAS workspaces and graph allocations) is the peak. The CUDA context itself
          (a few hundred MiB, present before the first measurement) is not counted.
A least-squares line through (N, peak) gives MiB per 1,000 worlds (its slope) and the part that does
not grow with N (its intercept); the largest N whose predicted peak fits in --budget-gib follows
from them. The fit extrapolates: from small N on a CPU it is an estimate of the GPU's figure, not a
measurement of it. The CPU's peak is host memory; with `--backend mjwarp` it holds the same MuJoCo
Warp arrays (contacts, constraints) that a GPU holds, with the default C MuJoCo backend it does not.

    python bench/bench_memory.py --robots humanoid ant --num-envs 64 128 256 512
    python bench/bench_memory.py --robots humanoid --backend mjwarp --num-envs 64 128 256 512
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "memory-result "  # the line a child process prints its measurement on
MIB = 1024 ** 2


# ---------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------
def fit_line(num_envs, peak_mib):
    """Least-squares line peak = intercept + slope * N: (slope in MiB per world, intercept in MiB)."""
    if len(set(num_envs)) < 2:
        raise ValueError(f"a line needs peaks at two or more different N, got N = {list(num_envs)}")
    slope, intercept = np.polyfit(np.asarray(num_envs, dtype=float), np.asarray(peak_mib, dtype=float), 1)
    return float(slope), float(intercept)


def largest_fitting(slope_mib, intercept_mib, budget_mib):
    """The largest whole N whose predicted peak intercept + slope * N is at most budget_mib; None when
    memory does not grow with N (slope <= 0), 0 when even the intercept does not fit."""
    if slope_mib <= 0:
        return None
    return max(0, int(np.floor((budget_mib - intercept_mib) / slope_mib)))


# ---------------------------------------------------------------------------------------------
# One N, in its own process
# ---------------------------------------------------------------------------------------------
def build_iteration(robot, task, num_envs, num_steps, device, backend, sim_threads):
    """The trainer's iteration on `num_envs` worlds, as bench/bench_hrl.py builds it; and the LLC's name."""
    sys.path.insert(0, REPO_DIR)
    from bench.bench_hrl import make_trainer_iteration, random_llc, trainer_args
    from llc import load_llc
    from tasks import make_env

    env = make_env(robot, task, num_envs, device=str(device), seed=0, backend=backend, sim_threads=sim_threads)
    llc_path = os.path.join(REPO_DIR, "checkpoints", f"llc_{robot}.pt")
    if os.path.isfile(llc_path):
        llc, llc_name = load_llc(llc_path, device=str(device)), os.path.relpath(llc_path, REPO_DIR)
        llc.check_env(env.num_obs, env.get_task_obs_size())
    else:
        llc, llc_name = random_llc(robot, env, device), "random (untrained, llc_pretrain.py's sizes)"
    _, iteration = make_trainer_iteration(env, llc, trainer_args(num_steps, num_envs))
    return env, iteration, llc_name


def device_used_mib(torch, device):
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / MIB


def warp_pool_peak_mib(device):
    """The high-water mark of Warp's CUDA memory pool on `device`, or None where Warp uses no pool."""
    import warp as wp

    wp_device = f"cuda:{device.index}"
    if not (wp.is_mempool_supported(wp_device) and wp.is_mempool_enabled(wp_device)):
        return None
    return wp.get_mempool_used_mem_high(wp_device) / MIB


def measure_cuda(torch, args, device):
    torch.cuda.init()
    used_before = device_used_mib(torch, device)
    env, iteration, llc_name = build_iteration(args.robot, args.task, args.child_num_envs, args.num_steps, device,
                                               args.backend, args.sim_threads)
    used_after_env = device_used_mib(torch, device)
    reserved_after_env = torch.cuda.memory_reserved(device) / MIB
    for _ in range(args.iterations):
        iteration()
    torch.cuda.synchronize(device)
    torch_reserved = torch.cuda.max_memory_reserved(device) / MIB
    warp = warp_pool_peak_mib(device)
    if warp is None:  # Warp allocated with cudaMalloc: its arrays are what the env's construction added beyond torch's
        warp = max(0.0, used_after_env - used_before - reserved_after_env)
    device_used = device_used_mib(torch, device) - used_before
    return env, llc_name, {"torch_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
                           "torch_reserved_mib": torch_reserved, "warp_mib": warp, "device_used_mib": device_used,
                           "peak_mib": max(torch_reserved + warp, device_used)}


def measure_cpu(args, device):
    env, iteration, llc_name = build_iteration(args.robot, args.task, args.child_num_envs, args.num_steps, device,
                                               args.backend, args.sim_threads)
    for _ in range(args.iterations):
        iteration()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return env, llc_name, {"peak_mib": peak_kib / 1024}


def run_child(args):
    """Measure one N and print it as one JSON line after RESULT_PREFIX."""
    import torch

    sys.path.insert(0, REPO_DIR)
    from hrl_ppo_continuous import flush_denormals_on_cpu

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    flush_denormals_on_cpu(device)  # as the trainer
    start = time.perf_counter()
    env, llc_name, result = measure_cuda(torch, args, device) if device.type == "cuda" else measure_cpu(args, device)
    result.update(num_envs=args.child_num_envs, seconds=time.perf_counter() - start, backend=env.describe_backend(),
                  llc=llc_name)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: one process per N, the table and the fit
# ---------------------------------------------------------------------------------------------
def child_command(args, robot, num_envs):
    return [sys.executable, os.path.abspath(__file__), "--child-num-envs", str(num_envs), "--robots", robot,
            "--task", args.task, "--num-steps", str(args.num_steps), "--iterations", str(args.iterations),
            "--device", args.device, "--backend", args.backend, "--torch-threads", str(args.torch_threads)] + \
           (["--sim-threads", str(args.sim_threads)] if args.sim_threads else [])


def measure_in_subprocess(args, robot, num_envs):
    """The child's result dict, or {"error": text} when it failed or ran past --timeout."""
    try:
        done = subprocess.run(child_command(args, robot, num_envs), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past --timeout {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    last_lines = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit code {done.returncode}: " + " | ".join(last_lines)}


def print_row(num_envs, result, cuda):
    if "error" in result:
        print(f"{num_envs:>7}  failed: {result['error']}", flush=True)
        return
    extra = "".join(f" {result[key]:>12,.1f}" for key in ("torch_allocated_mib", "torch_reserved_mib", "warp_mib",
                                                           "device_used_mib")) if cuda else ""
    print(f"{num_envs:>7} {result['peak_mib']:>12,.1f}{extra} {result['seconds']:>9.1f}", flush=True)


def print_fit(measured, budget_gib):
    """The line through the measured (N, peak MiB) pairs and the largest N within the budget."""
    if len(measured) < 2:
        print("fit: needs two or more measured N")
        return
    ns, peaks = zip(*measured)
    slope, intercept = fit_line(ns, peaks)
    worst = max(abs(peak - (intercept + slope * n)) for n, peak in measured)
    print(f"fit: {slope * 1000:,.1f} MiB per 1,000 worlds + {intercept:,.1f} MiB "
          f"(N = {min(ns)}..{max(ns)}, largest residual {worst:,.1f} MiB)")
    largest = largest_fitting(slope, intercept, budget_gib * 1024)
    if largest is None:
        print(f"largest N within {budget_gib:g} GiB: the peak did not grow with N here (slope {slope:.3g} MiB per world)")
    else:
        print(f"largest N within {budget_gib:g} GiB: {largest:,} worlds (extrapolated from the fit)")


def run_parent(args):
    import torch

    sys.path.insert(0, REPO_DIR)
    from bench.bench_sim import cpu_model_name

    cuda = args.device.startswith("cuda")
    where = f"{args.device} ({torch.cuda.get_device_name(args.device)})" if cuda else f"cpu ({cpu_model_name()})"
    measure = "torch peak reserved + Warp's arrays, or the device's used memory if larger" if cuda else \
        "peak resident set of the process (host memory)"
    print(f"device {where}, {os.cpu_count()} CPU cores, torch {torch.__version__}; one process per N, "
          f"{args.iterations} trainer iteration(s) of {args.num_steps} high-level steps x k = 5; peak = {measure}")
    extra = "".join(f" {name:>12}" for name in ("torch alloc", "torch resv", "Warp", "device used")) if cuda else ""
    for robot in args.robots:
        measured, described = [], False
        for num_envs in args.num_envs:
            result = measure_in_subprocess(args, robot, num_envs)
            if not described and "error" not in result:
                print(f"robot {robot}, task {args.task}, {result['backend']}, LLC {result['llc']}")
                print(f"{'N':>7} {'peak MiB':>12}{extra} {'seconds':>9}", flush=True)
                described = True
            print_row(num_envs, result, cuda)
            if "error" not in result:
                measured.append((num_envs, result["peak_mib"]))
        print_fit(measured, args.budget_gib)


def parse_args(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robots", nargs="+", default=["humanoid"], choices=["ant", "humanoid"])
    parser.add_argument("--task", default="heading", choices=["heading", "location", "none"])
    parser.add_argument("--num-envs", nargs="+", type=int, default=None,
                        help="worlds (default 64 128 256 512 on the CPU, 1024 4096 16384 on CUDA)")
    parser.add_argument("--num-steps", type=int, default=32,
                        help="high-level steps per world per iteration (the trainer's)")
    parser.add_argument("--iterations", type=int, default=1,
                        help="trainer iterations per N (Adam's state is made in the first)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "mjwarp", "mujoco"],
                        help="auto: mjwarp on CUDA, mujoco on the CPU; "
                             "mjwarp on the CPU holds MuJoCo Warp's arrays in host memory")
    parser.add_argument("--sim-threads", type=int, default=None, help="C MuJoCo threads (default: all cores)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads (0: torch's default), as bench_hrl.py")
    parser.add_argument("--budget-gib", type=float, default=40.0, help="memory budget for the largest-N line")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one N may take before it counts as failed")
    parser.add_argument("--child-num-envs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_envs is None:
        args.num_envs = [1024, 4096, 16384] if args.device.startswith("cuda") else [64, 128, 256, 512]
    if min(args.num_envs) < 1 or args.num_steps < 1 or args.iterations < 1:
        parser.error(f"--num-envs {args.num_envs}, --num-steps {args.num_steps} and --iterations {args.iterations} "
                     "must be >= 1")
    args.robot = args.robots[0]
    return args


def main():
    args = parse_args()
    if args.child_num_envs is not None:
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
