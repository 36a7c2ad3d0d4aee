"""Scaling with torchrun: the training scripts' SPS with 1 process and with several, in the same run.

Each run trains for --iterations iterations with --num-envs worlds per process (weak scaling: every rank
simulates its own worlds); the figure is the total SPS over all ranks (simulator steps for the trainer,
control steps for llc_pretrain.py) from the second iteration on (the first one warms up). The 1-process
row runs the script without torchrun (no process group); the others run
`python -m torch.distributed.run --standalone --nproc_per_node P`.
    CPU (gloo)   P = 1 and 2 (--processes); the simulator's threads share the cores evenly (--sim-threads =
                 cores / P) and torch runs 1 thread per process (--torch-threads 1, OMP_NUM_THREADS=1, what
                 torchrun sets), so every row uses the same cores
    CUDA (NCCL)  one process per GPU: P = 1 and the number of GPUs (a 1-GPU machine has the 1-process row only)
    ratio = SPS / SPS of 1 process (P would be perfect scaling)

    python bench/bench_scaling.py --script trainer --num-envs 64 --iterations 6
"""

import argparse
import os
import re
import subprocess
import sys

import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from bench.bench_sim import cpu_model_name  # noqa: E402

SCRIPTS = {  # script, flags of a small job, the progress line's step and SPS figures
    "trainer": ("hrl_ppo_continuous.py", ["--env-backend", "auto", "--checkpoint-interval", "1000000"],
                r"step (\d+) SPS (\d+)"),
    "llc_pretrain": ("llc_pretrain.py", ["--env-backend", "auto", "--save-interval", "1000000"],
                     r"step (\d+) SPS (\d+)"),
}


def steady_sps(stdout: str, pattern: str) -> float:
    """SPS over iterations 2..n from the cumulative (step, SPS) of each progress line: elapsed = step / SPS."""
    points = [(int(step), int(sps)) for step, sps in re.findall(pattern, stdout)]
    if len(points) < 2:
        raise RuntimeError(f"need 2 progress lines, got:\n{stdout[-2000:]}")
    (first_step, first_sps), (last_step, last_sps) = points[0], points[-1]
    return (last_step - first_step) / (last_step / last_sps - first_step / first_sps)


def run(script: str, processes: int, num_envs: int, iterations: int, cuda: bool, cores: int, workdir: str):
    path, flags, pattern = SCRIPTS[script]
    steps_per_env = 32 if script == "llc_pretrain" else 32 * 5  # --num-steps 32 (x k = 5 for the trainer)
    total = iterations * processes * num_envs * steps_per_env
    args = [os.path.join(REPO_DIR, path), *flags, "--num-envs", str(num_envs), "--total-timesteps", str(total)]
    args += ["--torch-threads", "1"] + ([] if cuda else ["--no-cuda", "--sim-threads", str(max(1, cores // processes))])
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_DIR)
    result = subprocess.run([*launcher, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(launcher + args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return steady_sps(result.stdout, pattern)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", choices=sorted(SCRIPTS), nargs="+", default=["trainer", "llc_pretrain"])
    parser.add_argument("--num-envs", type=int, default=None, help="worlds per process (default: 4096 on CUDA, 64 on the CPU)")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--processes", type=int, default=2, help="the CPU's largest row (CUDA: the number of GPUs)")
    parser.add_argument("--no-cuda", action="store_true", help="the CPU rows even on a CUDA machine")
    parser.add_argument("--workdir", default=None, help="where the runs write runs/ (default: a temporary folder)")
    options = parser.parse_args()
    import tempfile

    cuda = torch.cuda.is_available() and not options.no_cuda
    counts = [1] + ([torch.cuda.device_count()] if torch.cuda.device_count() > 1 else []) if cuda \
        else sorted({1, options.processes})
    num_envs = options.num_envs or (4096 if cuda else 64)
    cores = os.cpu_count() or 1
    hardware = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else f"{cpu_model_name()}, {cores} cores"
    print(f"torchrun scaling on {hardware} ({'NCCL' if cuda else 'gloo'}), {num_envs} envs per process, "
          f"{options.iterations} iterations, SPS from iteration 2 on")
    print(f"{'script':>14} {'processes':>9} {'envs total':>10} {'SPS total':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as scratch:
        for script in options.script:
            reference = None
            for processes in counts:
                sps = run(script, processes, num_envs, options.iterations, cuda, cores, options.workdir or scratch)
                reference = reference or sps
                print(f"{script:>14} {processes:>9} {processes * num_envs:>10} {sps:>10,.0f} {sps / reference:>6.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
