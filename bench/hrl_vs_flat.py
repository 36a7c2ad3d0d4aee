"""Hierarchical PPO over the frozen LLC vs flat PPO on joint actions, same simulator-step budget.

Runs hrl_ppo_continuous.py as subprocesses for every (task, method, seed), `--jobs` at a time, then
reads `charts/episodic_return` against the global step (simulator steps) from the TensorBoard event
files and writes a figure (one panel per task: mean over seeds, band = min..max) and a markdown
table (final return, simulator steps to reach a threshold, wall time per run).

    method hrl:  the trainer's defaults (LLC checkpoints/llc_{robot}.pt, k = 5)
    method flat: the same defaults with --llc-checkpoint none (PPO on joint actions, k = 1)

The trainer writes runs/{run_name}/ relative to its working directory, so every run is started
with cwd = RUNS_DIR; its console output goes to RUNS_DIR/logs/. RUNS_DIR/runs_summary.json records
the command, the wall time and the exit status of each run, and the machine.

    python bench/hrl_vs_flat.py --runs-dir /tmp/hrl_vs_flat --total-timesteps 409600 --num-envs 64
    python bench/hrl_vs_flat.py --plot-only /tmp/hrl_vs_flat      # rebuild figure and table
"""

import argparse
import concurrent.futures
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = os.path.join(REPO_DIR, "hrl_ppo_continuous.py")
METHOD_FLAGS = {"hrl": [], "flat": ["--llc-checkpoint", "none"]}  # the only difference between methods
METHOD_LABELS = {"hrl": "hierarchical PPO over the frozen LLC (k = 5)", "flat": "flat PPO on joint actions (k = 1)"}
METHOD_COLORS = {"hrl": "tab:blue", "flat": "tab:orange"}
RETURN_KEY = "charts/episodic_return"
RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="hrl_vs_flat_runs", help="output folder for runs/, logs/ and runs_summary.json (keep it outside the repository)")
    parser.add_argument("--plot-only", metavar="RUNS_DIR", default=None, help="do not train: rebuild the figure and table from the runs in RUNS_DIR")
    parser.add_argument("--robot", default="ant")
    parser.add_argument("--tasks", nargs="+", default=["heading", "location"])
    parser.add_argument("--methods", nargs="+", default=["hrl", "flat"], choices=sorted(METHOD_FLAGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--total-timesteps", type=int, default=409600, help="simulator (control) steps per run, the same for every method")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--threads-per-job", type=int, default=1, help="OMP_NUM_THREADS / MKL_NUM_THREADS of each run (1 avoids oversubscribing the cores)")
    parser.add_argument("--extra", default="", help="further trainer flags for every run, one quoted string (e.g. '--no-cuda')")
    parser.add_argument("--last-points", type=int, default=3, help="final return of a run = mean of its last this many logged returns")
    parser.add_argument("--threshold-fraction", type=float, default=0.5,
                        help="per task, threshold = start + this fraction of (best method's final mean - start), "
                             "start = mean of the first logged return of every run of the task")
    parser.add_argument("--out-png", default=os.path.join(REPO_DIR, "docs", "hrl_vs_flat.png"))
    parser.add_argument("--out-md", default=os.path.join(REPO_DIR, "docs", "hrl_vs_flat.md"),
                        help=f"markdown file; the part between {RESULTS_BEGIN} and {RESULTS_END} is replaced (the file is created if missing)")
    args = parser.parse_args()
    if args.jobs < 1 or args.threads_per_job < 1 or args.num_envs < 1 or args.total_timesteps < 1:
        parser.error(f"--jobs {args.jobs}, --threads-per-job {args.threads_per_job}, --num-envs {args.num_envs} and "
                     f"--total-timesteps {args.total_timesteps} must all be >= 1")
    if not 0.0 < args.threshold_fraction <= 1.0:
        parser.error(f"--threshold-fraction must lie in (0, 1], got {args.threshold_fraction}")
    return args


# ---------------------------------------------------------------------------------------------
# Running the trainer
# ---------------------------------------------------------------------------------------------
def machine_description() -> dict:
    import torch

    cpu_model = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    return {"cpu": cpu_model, "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def run_command(args, task: str, method: str, seed: int) -> list:
    return ([sys.executable, TRAINER, "--robot", args.robot, "--task", task, "--seed", str(seed), "--exp-name", method,
             "--num-envs", str(args.num_envs), "--total-timesteps", str(args.total_timesteps),
             "--checkpoint-interval", "1000000"]  # one checkpoint, at the end
            + METHOD_FLAGS[method] + shlex.split(args.extra))


def run_one(args, runs_dir: str, task: str, method: str, seed: int) -> dict:
    command = run_command(args, task, method, seed)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_job), MKL_NUM_THREADS=str(args.threads_per_job))
    log_path = os.path.join(runs_dir, "logs", f"{args.robot}-{task}__{method}__{seed}.log")
    start = time.time()
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, cwd=runs_dir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall_s = time.time() - start
    print(f"{task:9s} {method:5s} seed {seed}: exit {returncode}, {wall_s / 60:.1f} min  ({log_path})", flush=True)
    return {"task": task, "method": method, "seed": seed, "command": shlex.join(command), "wall_s": wall_s,
            "returncode": returncode, "log": log_path}


def train_all(args, runs_dir: str):
    os.makedirs(os.path.join(runs_dir, "logs"), exist_ok=True)
    # seed-major order: if the batch is cut short, the finished seeds are complete for every task and method
    jobs = [(task, method, seed) for seed in args.seeds for task in args.tasks for method in args.methods]
    summary = {"bench_command": shlex.join([sys.executable] + sys.argv), "threads_per_job": args.threads_per_job,
               "jobs": args.jobs, "machine": machine_description(), "start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "runs": []}
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args, runs_dir, *job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            summary["runs"].append(future.result())
            summary["total_wall_s"] = time.time() - start
            with open(os.path.join(runs_dir, "runs_summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
    failed = [run for run in summary["runs"] if run["returncode"] != 0]
    if failed:
        print(f"{len(failed)} run(s) failed, see their logs: " + ", ".join(run["log"] for run in failed))
    print(f"all runs: {summary['total_wall_s'] / 60:.1f} min")


# ---------------------------------------------------------------------------------------------
# Reading the results
# ---------------------------------------------------------------------------------------------
def read_returns(run_dir: str):
    """(steps, returns) of charts/episodic_return, steps in simulator steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0 = keep every point
    accumulator.Reload()
    if RETURN_KEY not in accumulator.Tags()["scalars"]:
        return np.zeros(0), np.zeros(0)
    events = accumulator.Scalars(RETURN_KEY)
    return np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], dtype=np.float64)


def collect_runs(runs_dir: str, robot: str) -> dict:
    """{(task, method, seed): (steps, returns)}; of repeated runs, the latest (by the run name's time) wins."""
    events_root = os.path.join(runs_dir, "runs")
    if not os.path.isdir(events_root):
        raise SystemExit(f"error: no runs/ folder in {runs_dir}: expected {events_root} with the trainer's run folders")
    latest = {}
    for run_name in sorted(os.listdir(events_root)):
        parts = run_name.split("__")  # {robot}-{task}__{exp_name}__{seed}__{unix time}
        if len(parts) != 4 or parts[1] not in METHOD_FLAGS or not parts[0].startswith(f"{robot}-"):
            continue
        key = (parts[0][len(robot) + 1:], parts[1], int(parts[2]))
        if key not in latest or int(parts[3]) > latest[key][0]:
            latest[key] = (int(parts[3]), run_name)
    if not latest:
        raise SystemExit(f"error: no runs named {robot}-<task>__<hrl|flat>__<seed>__<time> in {events_root}")
    return {key: read_returns(os.path.join(events_root, run_name)) for key, (_, run_name) in sorted(latest.items())}


def final_return(returns: np.ndarray, last_points: int) -> float:
    return float(np.mean(returns[-last_points:])) if len(returns) else float("nan")


def first_step_reaching(steps: np.ndarray, returns: np.ndarray, threshold: float):
    reached = np.nonzero(returns >= threshold)[0]
    return int(steps[reached[0]]) if len(reached) else None


def seed_band(curves: list):
    """Mean, min and max over seeds on a common step grid (each curve linearly interpolated inside its
    own logged range; the grid stops where the shortest curve stops)."""
    curves = [(s, r) for s, r in curves if len(s)]
    if not curves:
        return None
    grid = np.unique(np.concatenate([s for s, _ in curves]))
    grid = grid[(grid >= max(s[0] for s, _ in curves)) & (grid <= min(s[-1] for s, _ in curves))]
    values = np.stack([np.interp(grid, s, r) for s, r in curves])
    return grid, values.mean(0), values.min(0), values.max(0)


def task_threshold(task_runs: list, best_final_mean: float, fraction: float):
    """Return level `fraction` of the way from the early return (mean of the first logged return of
    every run of the task, both methods) to the best final mean; None when nothing improved. The early
    return is the reference, not 0: a task can pay well for standing still (heading: facing reward)."""
    early_return = float(np.mean([r[0] for _, r in task_runs if len(r)]))
    if not best_final_mean > early_return:
        return None
    return early_return + fraction * (best_final_mean - early_return)


def summarise(results: dict, args) -> dict:
    """Per task and method: final returns per seed, threshold, steps to reach it per seed."""
    tasks = sorted({task for task, _, _ in results}, key=lambda t: (args.tasks.index(t) if t in args.tasks else 99, t))
    methods = [m for m in METHOD_FLAGS if any(key[1] == m for key in results)]
    table = {}
    for task in tasks:
        finals = {m: {seed: final_return(r, args.last_points) for (t, mm, seed), (_, r) in results.items() if t == task and mm == m}
                  for m in methods}
        best_final_mean = max(np.nanmean(list(f.values())) for f in finals.values() if f)
        threshold = task_threshold([run for key, run in results.items() if key[0] == task], best_final_mean, args.threshold_fraction)
        for m in methods:
            runs = {seed: results[(task, m, seed)] for seed in sorted(finals[m])}
            table[(task, m)] = {"finals": finals[m], "threshold": threshold,
                                "steps_to_threshold": {seed: first_step_reaching(s, r, threshold) if threshold is not None else None
                                                       for seed, (s, r) in runs.items()},
                                "points": {seed: len(s) for seed, (s, _) in runs.items()}}
    return {"tasks": tasks, "methods": methods, "rows": table}


# ---------------------------------------------------------------------------------------------
# Figure and table
# ---------------------------------------------------------------------------------------------
def plot(results: dict, summary: dict, args, out_png: str):
    tasks, methods = summary["tasks"], summary["methods"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            curves = [results[key] for key in sorted(results) if key[0] == task and key[1] == method]
            band = seed_band(curves)
            if band is None:
                continue
            grid, mean, low, high = band
            seeds_with_data = sum(1 for steps, _ in curves if len(steps))
            ax.plot(grid, mean, color=METHOD_COLORS[method], label=f"{METHOD_LABELS[method]}, {seeds_with_data} seeds")
            ax.fill_between(grid, low, high, color=METHOD_COLORS[method], alpha=0.2, linewidth=0)
            for steps, returns in curves:  # each seed, also where a shorter run ends the band
                ax.plot(steps, returns, color=METHOD_COLORS[method], alpha=0.35, linewidth=0.6)
        threshold = summary["rows"][(task, methods[0])]["threshold"]
        if threshold is not None:
            ax.axhline(threshold, color="gray", linestyle=":", linewidth=1, label=f"threshold {threshold:.0f}")
        ax.set_title(f"{args.robot}, task {task}")
        ax.set_xlabel("simulator (control) steps")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda steps, _: f"{steps / 1e3:.0f}k"))
        ax.set_ylabel("episodic task return (training)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("thick: mean over seeds, band: min..max over seeds, thin: each seed", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    print(f"figure: {out_png}")


def format_steps(steps_by_seed: dict) -> str:
    reached = [s for s in steps_by_seed.values() if s is not None]
    if not reached:
        return f"not reached (0/{len(steps_by_seed)} seeds)"
    return f"{np.mean(reached) / 1e3:.0f}k ({len(reached)}/{len(steps_by_seed)} seeds; per seed: " + ", ".join(
        "not reached" if s is None else f"{s / 1e3:.0f}k" for s in steps_by_seed.values()) + ")"


def results_markdown(summary: dict, run_log: dict, args) -> str:
    lines = [f"Final return = mean of the last {args.last_points} logged `{RETURN_KEY}` points of a run; "
             "mean ± std (sample std) over seeds. Threshold per task = early + "
             f"{args.threshold_fraction:g} x (better method's final mean - early), early = mean of the first logged "
             "return of all runs of the task; steps to reach it = the first logged point at or above it, averaged "
             "over the seeds that reached it.", "",
             "| task | method | final return | per seed | simulator steps to threshold | logged points per run | wall time per run |",
             "|-|-|-|-|-|-|-|"]
    for (task, method), row in summary["rows"].items():
        finals = np.array(list(row["finals"].values()))
        std = finals.std(ddof=1) if len(finals) > 1 else float("nan")
        walls = [run["wall_s"] for run in run_log.get("runs", []) if run["task"] == task and run["method"] == method]
        wall = f"{np.mean(walls) / 60:.1f} min" if walls else "n/a"
        threshold = "n/a (no method improved on the early return)" if row["threshold"] is None else f"{row['threshold']:.0f}: {format_steps(row['steps_to_threshold'])}"
        lines.append(f"| {task} | {method} | {finals.mean():.1f} ± {std:.1f} | "
                     + ", ".join(f"{v:.1f}" for v in finals) + f" | {threshold} | "
                     + ", ".join(str(n) for n in row["points"].values()) + f" | {wall} |")
    if run_log:
        machine = run_log["machine"]
        lines += ["", f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, "
                  f"{'GPU ' + machine['gpu'] if machine['gpu'] else 'no GPU'}; Python {machine['python']}, torch {machine['torch']}; "
                  f"{run_log['jobs']} runs in parallel, {run_log['threads_per_job']} thread(s) each. "
                  f"All {len(run_log['runs'])} runs: {run_log['total_wall_s'] / 60:.1f} min wall time (started {run_log['start']}).",
                  "", f"Command: `{run_log['bench_command']}`"]
    return "\n".join(lines)


def write_markdown(out_md: str, block: str):
    text = open(out_md).read() if os.path.exists(out_md) else f"# Hierarchical vs flat PPO\n\n{RESULTS_BEGIN}\n{RESULTS_END}\n"
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise SystemExit(f"error: {out_md} lacks the markers {RESULTS_BEGIN} and {RESULTS_END} around the results table")
    head, rest = text.split(RESULTS_BEGIN, 1)
    tail = rest.split(RESULTS_END, 1)[1]
    with open(out_md, "w") as f:
        f.write(f"{head}{RESULTS_BEGIN}\n{block}\n{RESULTS_END}{tail}")
    print(f"table: {out_md}")


def report(runs_dir: str, args):
    results = collect_runs(runs_dir, args.robot)
    summary = summarise(results, args)
    summary_path = os.path.join(runs_dir, "runs_summary.json")
    run_log = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    plot(results, summary, args, args.out_png)
    block = results_markdown(summary, run_log, args)
    print(block)
    write_markdown(args.out_md, block)


if __name__ == "__main__":
    args = parse_args()
    if args.plot_only:
        report(os.path.abspath(args.plot_only), args)
    else:
        runs_dir = os.path.abspath(args.runs_dir)
        train_all(args, runs_dir)
        report(runs_dir, args)
