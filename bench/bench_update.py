"""The PPO update on the CPU with and without subnormal floats in the optimiser state.

A ReLU unit that stops firing (a dead unit) gives its outgoing weights exactly zero gradients; Adam's
first moment of those weights then decays by beta1 = 0.9 per step and spends about 150 steps in the
subnormal range (|x| < 1.2e-38) on its way to zero, where every CPU operation on it is 10-100 times
slower. A flat humanoid run accumulates hundreds of such weights. The trainer flushes subnormals
to zero on the CPU (`hrl_ppo_continuous.flush_denormals_on_cpu`). This benchmark times one `ppo_update` of the
trainer (humanoid sizes: 228 observations, 28 actions, [1024, 512] networks, 64 envs x 32 steps,
6 epochs x 8 minibatches) in three states, in the same run:
    reference     no dead units: nothing subnormal
    dead units    a fraction of the critic's first-layer units dead, their outgoing weights' Adam
                  first moments subnormal, with the trainer's CPU setting (as the trainer runs)
    unflushed     the same state without flushing subnormals (a process that never flushes): the cost
                  the setting removes
`dead / reference` near 1 is the expected result; a value well above 1 is a regression.

Then, the update where it was slow: inside a process that steps the flat humanoid on MuJoCo Warp on
the CPU (the trainer's rollout() and update_policy(), --num-envs x --num-steps, best of --repeat),
while --neighbours busy processes occupy cores as other jobs on a shared machine do. One child
process per setting, since torch's OpenMP runtime reads its wait policy once, at start-up:
    scripts' setting      OMP_WAIT_POLICY=PASSIVE (openmp_policy.py), torch's default threads
    libgomp's default     its threads spin after every operation, torch's default threads
    1 torch thread        the scripts' setting with --torch-threads 1
`libgomp's default / scripts' setting` well above 1 with neighbours is the slowdown the setting
removes; a value near 1 for the scripts' own row against 1 thread says nothing is left of it.

    python bench/bench_update.py --dead-fraction 0.25
    python bench/bench_update.py --neighbours 1 --repeat 2
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
import openmp_policy  # noqa: E402

if "--child" not in sys.argv:  # a measuring process runs under the policy its parent chose
    openmp_policy.wait_passively()  # as the scripts, before torch loads its OpenMP runtime
import torch  # noqa: E402

from bench.bench_sim import cpu_model_name  # noqa: E402
from hrl_ppo_continuous import Agent, Args, RolloutStorage, flush_denormals_on_cpu, update_policy  # noqa: E402

OBS, ACTIONS = 228, 28  # the flat humanoid on the heading task
SUBNORMAL = 1e-40  # float32 subnormal


def make_update(dead_fraction: float, num_envs: int, num_steps: int, seed: int = 0):
    """Agent, optimiser and one rollout batch; the chosen critic units dead with subnormal Adam state."""
    torch.manual_seed(seed)
    args = replace(Args(), num_steps=num_steps)
    agent = Agent(OBS, ACTIONS, args.hidden_sizes, args.init_log_std)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-8)
    batch = num_envs * num_steps
    b_obs = torch.randn(batch, OBS)
    with torch.no_grad():
        b_actions, b_logprobs, _, _, _ = agent.get_action_and_value(b_obs)
    b_returns = torch.randn(batch)
    storage = RolloutStorage(b_obs[None], b_actions[None], b_logprobs[None], torch.zeros(1, batch), torch.zeros(1, batch),
                             (b_returns + 0.1 * torch.randn(batch))[None], torch.zeros(1, batch), torch.zeros(1, batch))
    data = (storage, torch.randn(1, batch), b_returns[None])
    update_policy(agent, optimizer, *data, args, batch // args.num_minibatches)  # creates Adam's state
    first_layer, second_layer = agent.critic[0], agent.critic[2]
    dead = torch.rand(first_layer.out_features) < dead_fraction
    with torch.no_grad():
        first_layer.bias[dead] = -1e4  # never fires: zero gradient to the weights it feeds
        optimizer.state[second_layer.weight]["exp_avg"][:, dead] = SUBNORMAL
    return lambda: update_policy(agent, optimizer, *data, args, batch // args.num_minibatches)


def time_update(update) -> float:
    start = time.perf_counter()
    update()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The update inside a MuJoCo Warp process on a busy CPU
# ---------------------------------------------------------------------------------------------
SETTINGS = (  # row name, OpenMP wait policy (None: libgomp's default), torch threads (0: torch's default)
    ("scripts' setting", openmp_policy.SCRIPTS_POLICY, 0),
    ("libgomp's default (spins)", None, 0),
    ("scripts' setting, 1 torch thread", openmp_policy.SCRIPTS_POLICY, 1),
)


def child_measurement(num_envs: int, num_steps: int, repeat: int) -> dict:
    """In this process: the flat humanoid on MuJoCo Warp (CPU), the trainer's rollout and update, best of `repeat`."""
    from bench.bench_hrl import make_trainer_parts, trainer_args
    from tasks import make_env

    env = make_env("humanoid", "heading", num_envs, device="cpu", seed=0, backend="mjwarp")
    _, rollout_part, update_part = make_trainer_parts(env, None, trainer_args(num_steps, num_envs))
    rollout_part()
    update_part()  # warm-up: allocator, Adam's state
    times = {"rollout": [], "update": []}
    for _ in range(repeat):
        for name, part in (("rollout", rollout_part), ("update", update_part)):
            start = time.perf_counter()
            part()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()} | {"threads": torch.get_num_threads()}


def run_child(kind: str, args, policy=openmp_policy.SCRIPTS_POLICY, torch_threads: int = 0):
    """This script as a new process measuring `kind` under the OpenMP wait `policy` (None: libgomp's default);
    returns what it printed last (JSON)."""
    env = {name: value for name, value in os.environ.items() if name != openmp_policy.POLICY_VARIABLE}
    if policy is not None:
        env[openmp_policy.POLICY_VARIABLE] = policy
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--num-envs", str(args.num_envs),
               "--num-steps", str(args.num_steps), "--repeat", str(args.repeat), "--threads", str(torch_threads),
               "--dead-fraction", str(args.dead_fraction)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the process measuring {kind} ({policy or 'default'} wait policy) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def busy_neighbours(count: int) -> list:
    """`count` processes that keep one core busy each, as other jobs on a shared machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def measure_busy_cpu(args):
    neighbours = busy_neighbours(args.neighbours)
    try:
        rows = [(name, run_child("mjwarp", args, policy, threads)) for name, policy, threads in SETTINGS]
    finally:
        for process in neighbours:
            process.kill()
            process.wait()
    print(f"\nflat humanoid on MuJoCo Warp (CPU), {args.num_envs} envs x {args.num_steps} steps, the trainer's rollout "
          f"and update, best of {args.repeat}, beside {args.neighbours} busy process(es) on {os.cpu_count()} cores")
    print("| setting | torch threads | rollout (s) | update (s) | update / scripts' setting |")
    print("|-|-|-|-|-|")
    reference = rows[0][1]["update"]
    for name, row in rows:
        print(f"| {name} | {row['threads']} | {row['rollout']:.2f} | {row['update']:.2f} | {row['update'] / reference:.2f} |")


def measure_subnormals(args):
    """The trainer flushes before torch's threads exist (they copy the setting when created, see
    flush_denormals_on_cpu): flushed rows here, the unflushed one in a process that never flushes."""
    trainer_flushes = flush_denormals_on_cpu(torch.device("cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (args.num_envs, args.num_steps)
    reference = time_update(make_update(0.0, *sizes))
    dead = time_update(make_update(args.dead_fraction, *sizes))
    unflushed = run_child("unflushed", args, torch_threads=args.threads)["update"]
    print(f"CPU {cpu_model_name()}, torch {torch.__version__} with {torch.get_num_threads()} threads; one PPO update "
          f"of {args.num_envs * args.num_steps} transitions, humanoid sizes, {args.dead_fraction:.0%} of the critic's "
          f"first-layer units dead; trainer flushes subnormals: {trainer_flushes}")
    print("| state | update (s) | / reference |")
    print("|-|-|-|")
    for name, seconds in (("reference (no dead units)", reference), ("dead units, trainer's setting", dead),
                          ("dead units, subnormals not flushed", unflushed)):
        print(f"| {name} | {seconds:.2f} | {seconds / reference:.2f} |")


def child(kind: str, args) -> dict:
    if kind == "mjwarp":
        flush_denormals_on_cpu(torch.device("cpu"))  # as the trainer
        return child_measurement(args.num_envs, args.num_steps, args.repeat)
    return {"update": time_update(make_update(args.dead_fraction, args.num_envs, args.num_steps))}  # never flushed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dead-fraction", type=float, default=0.25, help="fraction of dead critic units")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--num-envs", type=int, default=64, help="worlds (the rollout batch is envs x steps)")
    parser.add_argument("--num-steps", type=int, default=32, help="high-level steps per rollout")
    parser.add_argument("--neighbours", type=int, default=1, help="busy processes beside the MuJoCo Warp measurement")
    parser.add_argument("--repeat", type=int, default=1, help="rollouts and updates per setting (the best is shown)")
    parser.add_argument("--child", choices=("mjwarp", "unflushed"), help=argparse.SUPPRESS)  # a measuring process
    args = parser.parse_args()
    if args.child:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args)))
        return
    measure_subnormals(args)
    measure_busy_cpu(args)


if __name__ == "__main__":
    main()
