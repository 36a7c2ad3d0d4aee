"""Simulator throughput: each env backend vs raw C MuJoCo physics on the same model, same run.

For each robot, number of worlds N and backend (`mjwarp`: MuJoCo Warp, `mujoco`: C MuJoCo through
tasks/physics_mujoco.py) it prints
    physics  world-steps/s  of the backend's physics alone (env.physics_step: one control step =
             decimation physics steps; for mjwarp the captured graph; the PD targets written before)
    env      control steps/s of env.step (physics + obs + reward + done bookkeeping), x N worlds,
             with reset_done() every 5 control steps as the trainer calls it
    C        world-steps/s  of raw C MuJoCo physics (mujoco.rollout with --threads threads, the
             same count the `mujoco` backend uses) from the same initial states with the same PD
             targets, 30 control steps per rollout call: the limit on a CPU
    physics / C    the backend's physics against the raw limit
    env / C        env.step control steps/s against the raw limit in control steps/s
    eager    (with --eager, mjwarp only) world-steps/s of the same physics stepped eagerly, kernel
             by kernel, instead of replaying the captured graph
Random actions in [-1, 1]; N = 1, 64, 256 on CPU, plus 1024, 4096, 16384 when CUDA is available.
Physics and C MuJoCo restart from reset states every --reset-every control steps (default 30, 1 s):
a humanoid left lying on the floor under random full-range PD targets for several seconds becomes
numerically unstable in both engines, and timing exploded worlds measures nothing useful.

    python bench/bench_sim.py --robots ant humanoid --num-envs 1 64 256 --steps 200
"""

import argparse
import os
import sys
import time

import mujoco
import numpy as np
import torch
from mujoco import rollout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tasks import ROBOTS, make_env  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_env(env, steps, warmup, reset_every):
    """Physics alone, then env.step, on the same random actions. Worlds restart from a reset every
    `reset_every` control steps (untimed) for the physics, and env.step runs with reset_done() every
    5 control steps as the trainer calls it: both measure bodies moving from reset, not worlds that
    have fallen and lain on the floor under random actions for many seconds."""
    generator = torch.Generator(device=env.device).manual_seed(0)
    actions = torch.rand(steps + warmup, env.num_envs, env.num_actions, device=env.device, generator=generator) * 2 - 1
    env.reset()
    for t in range(warmup):
        env.step(actions[t])
    elapsed = 0.0
    for first in range(0, steps, reset_every):
        env.reset()
        sync(env.device)
        start = time.perf_counter()
        for t in range(first, min(first + reset_every, steps)):
            env.sim.ctrl.copy_(env.pd_offset + env.pd_scale * actions[warmup + t])
            env.physics_step()
        sync(env.device)
        elapsed += time.perf_counter() - start
    physics_rate = steps * env.decimation * env.num_envs / elapsed

    env.reset()
    sync(env.device)
    start = time.perf_counter()
    for t in range(steps):
        env.step(actions[warmup + t])
        if (t + 1) % 5 == 0:
            env.reset_done()
    sync(env.device)
    control_rate = steps * env.num_envs / (time.perf_counter() - start)
    return physics_rate, control_rate, actions[warmup:]


def time_eager_physics(env, steps):
    env.reset()
    sync(env.device)
    start = time.perf_counter()
    for _ in range(steps):
        env.physics._launch(None, env.physics.step_eager)
    sync(env.device)
    return steps * env.decimation * env.num_envs / (time.perf_counter() - start)


def time_c_mujoco(env, actions, nthread, reset_every):
    """Plain C MuJoCo on the env's MjModel: initial states from the env's reset, the same PD targets
    held for each control step, restarted from those states every `reset_every` control steps."""
    mjm, n = env.mjm, env.num_envs
    env.reset()
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
    data = mujoco.MjData(mjm)
    initial_state = np.empty((n, mujoco.mj_stateSize(mjm, spec)))
    for world in range(n):
        data.qpos[:] = env.sim.qpos[world].double().cpu().numpy()
        data.qvel[:] = env.sim.qvel[world].double().cpu().numpy()
        mujoco.mj_getState(mjm, data, initial_state[world], spec)
    pd_targets = (env.pd_offset + env.pd_scale * actions).double().cpu().numpy()  # [steps, N, nu]
    control = np.repeat(pd_targets.transpose(1, 0, 2), env.decimation, axis=1)  # [N, steps * decimation, nu]
    datas = [mujoco.MjData(mjm) for _ in range(nthread)]
    chunk = reset_every * env.decimation
    elapsed = 0.0
    with rollout.Rollout(nthread=nthread) as pool:
        pool.rollout(mjm, datas, initial_state[:, :], control[:, :2])  # warm-up (thread pool start)
        for first in range(0, control.shape[1], chunk):
            start = time.perf_counter()
            pool.rollout(mjm, datas, initial_state, control[:, first : first + chunk])
            elapsed += time.perf_counter() - start
    return control.shape[0] * control.shape[1] / elapsed


def cpu_model_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robots", nargs="+", default=["ant"], choices=ROBOTS)
    parser.add_argument("--num-envs", nargs="+", type=int, default=None,
                        help="worlds per env (default 1 64 256, plus 1024 4096 16384 on CUDA)")
    parser.add_argument("--steps", type=int, default=200, help="timed control steps per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="untimed control steps first")
    parser.add_argument("--reset-every", type=int, default=30, help="physics and C MuJoCo restart from a reset every this many control steps")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                        help="device of the mjwarp backend (the mujoco backend runs on the CPU)")
    parser.add_argument("--backends", nargs="+", default=["mjwarp", "mujoco"], choices=["mjwarp", "mujoco"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="C MuJoCo threads: the mujoco backend's sim_threads and the raw rollout reference")
    parser.add_argument("--no-reference", action="store_true", help="skip the C MuJoCo reference")
    parser.add_argument("--eager", action="store_true", help="also time eager (not captured) physics")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads (0: torch's default); the env's tensor ops are small, and on a small "
                             "or shared CPU more threads contend with the simulator's")
    args = parser.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    num_envs = args.num_envs or ([1, 64, 256] + ([1024, 4096, 16384] if args.device.startswith("cuda") else []))
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model_name()
    print(f"device {args.device} ({device_name}), {os.cpu_count()} CPU cores, {args.steps} control steps, "
          f"C MuJoCo {mujoco.__version__} with {args.threads} threads, torch {torch.get_num_threads()} threads, "
          f"restart every {args.reset_every} control steps")
    header = f"{'robot':>8} {'backend':>7} {'N':>6} {'physics world-steps/s':>22} {'env control steps/s':>20} " \
             f"{'C MuJoCo world-steps/s':>23} {'physics / C':>11} {'env / C':>7}" + \
             (f" {'eager world-steps/s':>20}" if args.eager else "")
    print(header)
    for robot in args.robots:
        for n in num_envs:
            c_rate = None
            for backend in args.backends:
                device = args.device if backend == "mjwarp" else "cpu"
                env = make_env(robot, "none", n, device=device, seed=0, backend=backend, sim_threads=args.threads)
                physics_rate, control_rate, actions = time_env(env, args.steps, args.warmup, args.reset_every)
                if c_rate is None:
                    c_rate = float("nan") if args.no_reference else time_c_mujoco(env, actions, args.threads, args.reset_every)
                eager = ""
                if args.eager:
                    eager = f" {time_eager_physics(env, max(1, args.steps // 4)):>20,.0f}" if backend == "mjwarp" else f" {'-':>20}"
                print(f"{robot:>8} {backend:>7} {n:>6} {physics_rate:>22,.0f} {control_rate:>20,.0f} {c_rate:>23,.0f} "
                      f"{physics_rate / c_rate:>11.2f} {control_rate * env.decimation / c_rate:>7.2f}{eager}", flush=True)
                del env


if __name__ == "__main__":
    main()
