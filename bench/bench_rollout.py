"""What the trainer's rollout costs on top of the physics, in simulator steps per second.

For each number of worlds N and env backend (`mjwarp`, `mujoco`), on the same robot and task
(heading) in the same run:
    physics   the backend's physics alone (env.physics_step; for mjwarp the captured graph)
    env.step  env.step with fixed random actions (physics + PD targets + obs + reward + flags)
    rollout   the trainer's rollout() (hrl_ppo_continuous.py): policy forward pass, the
              hierarchical step (k LLC forward passes and env.step calls, reward aggregation),
              bootstrap value, episode statistics, reset_done(), storage writes
    flat      the same loop without an LLC (k = 1), as the flat baseline runs it
    C         raw C MuJoCo physics (mujoco.rollout with --threads threads, the mujoco backend's
              count), same initial states and actions: the limit on a CPU
    rollout / physics   the fraction of the backend's physics speed the trainer keeps
    env.step / C        env.step against the raw C MuJoCo limit
Simulator steps = control steps x worlds. The policy is untrained (random weights), which costs
the same as a trained one.

    python bench/bench_rollout.py --robot ant --num-envs 1 64 256 --high-level-steps 20
"""

import argparse
import os
import sys
import time

import mujoco
import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from bench.bench_sim import cpu_model_name, sync, time_c_mujoco  # noqa: E402
from hrl_ppo_continuous import Agent, EpisodeStats, RolloutStorage, rollout  # noqa: E402
from llc import load_llc  # noqa: E402
from tasks import ROBOTS, make_env  # noqa: E402

LLC_STEPS = 5  # k, the trainer's default


def time_steps(step_fn, count, device):
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        step_fn()
    sync(device)
    return time.perf_counter() - start


def time_physics(env, control_steps):
    env.reset()
    env.physics_step()  # warm-up
    return control_steps * env.num_envs / time_steps(env.physics_step, control_steps, env.device)


def fixed_actions(env):
    return torch.rand(env.num_envs, env.num_actions, device=env.device, generator=torch.Generator(env.device).manual_seed(0)) * 2 - 1


def time_raw_c_mujoco(env, control_steps, threads):
    """Raw C MuJoCo on the env's model, the fixed actions held, in control steps/s (x N worlds)."""
    actions = fixed_actions(env).expand(control_steps, -1, -1)
    return time_c_mujoco(env, actions, threads, reset_every=control_steps) / env.decimation


def time_env_step(env, control_steps):
    actions = fixed_actions(env)
    env.reset()

    def step():
        env.step(actions)
        env.reset_done()

    step()  # warm-up
    return control_steps * env.num_envs / time_steps(step, control_steps, env.device)


def time_rollout(env, llc, high_level_steps):
    """The trainer's rollout() over `high_level_steps` high-level steps per world."""
    llc_steps = 1 if llc is None else LLC_STEPS
    action_size = env.num_actions if llc is None else llc.latent_dim
    agent = Agent(env.num_obs, action_size).to(env.device)
    stats = EpisodeStats(env.num_envs, env.device)
    storage = RolloutStorage.allocate(high_level_steps, env.num_envs, env.num_obs, action_size, env.device)
    warm_up = RolloutStorage.allocate(1, env.num_envs, env.num_obs, action_size, env.device)
    task_obs_size = env.get_task_obs_size()
    state = {"obs": rollout(env, llc, agent, env.reset()["obs"], warm_up, llc_steps, task_obs_size, 0.0, stats)}

    def run():
        state["obs"] = rollout(env, llc, agent, state["obs"], storage, llc_steps, task_obs_size, 0.0, stats)

    return high_level_steps * llc_steps * env.num_envs / time_steps(run, 1, env.device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robot", default="ant", choices=ROBOTS)
    parser.add_argument("--llc-checkpoint", default=None, help="default checkpoints/llc_{robot}.pt")
    parser.add_argument("--num-envs", nargs="+", type=int, default=None,
                        help="worlds (default 1 64 256, plus 1024 4096 16384 on CUDA)")
    parser.add_argument("--high-level-steps", type=int, default=20, help=f"timed high-level steps (x {LLC_STEPS} control steps)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                        help="device of the mjwarp backend and the networks (the mujoco backend runs on the CPU)")
    parser.add_argument("--backends", nargs="+", default=["mjwarp", "mujoco"], choices=["mjwarp", "mujoco"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="C MuJoCo threads: the mujoco backend's sim_threads and the raw rollout reference")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads (0: torch's default); the env's tensor ops are small, and on a small "
                             "or shared CPU more threads contend with the simulator's")
    args = parser.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    llc_path = args.llc_checkpoint or os.path.join(REPO_DIR, "checkpoints", f"llc_{args.robot}.pt")
    llc = load_llc(llc_path, device=args.device)
    num_envs = args.num_envs or ([1, 64, 256] + ([1024, 4096, 16384] if args.device.startswith("cuda") else []))
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model_name()
    control_steps = args.high_level_steps * LLC_STEPS
    print(f"device {args.device} ({device_name}), {os.cpu_count()} CPU cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; robot {args.robot}, task heading, LLC {os.path.relpath(llc_path)}, "
          f"k = {LLC_STEPS}, {control_steps} control steps per measurement")
    print(f"C MuJoCo {mujoco.__version__} with {args.threads} threads")
    print(f"{'N':>6} {'backend':>7} {'physics':>10} {'env.step':>10} {'rollout':>10} {'flat':>10} {'C':>10} "
          f"{'rollout / physics':>18} {'env.step / C':>13}  (simulator steps/s)")
    for n in num_envs:
        c_rate = None
        for backend in args.backends:
            if backend == "mujoco" and args.device != "cpu":
                continue  # the networks and the env must share a device
            env = make_env(args.robot, "heading", n, device=args.device, seed=0, backend=backend, sim_threads=args.threads)
            if c_rate is None:
                c_rate = time_raw_c_mujoco(env, control_steps, args.threads)
            physics = time_physics(env, control_steps)
            env_step = time_env_step(env, control_steps)
            rollout = time_rollout(env, llc, args.high_level_steps)
            flat = time_rollout(env, None, control_steps)
            print(f"{n:>6} {backend:>7} {physics:>10,.0f} {env_step:>10,.0f} {rollout:>10,.0f} {flat:>10,.0f} {c_rate:>10,.0f} "
                  f"{rollout / physics:>18.2f} {env_step / c_rate:>13.2f}", flush=True)
            del env


if __name__ == "__main__":
    main()
