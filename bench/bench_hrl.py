"""The hierarchical loop against its physics limit and against the same loop built with torchrl.

For one robot, task and backend, and each number of worlds N, in the same run (simulator steps =
control steps x worlds, per second):
    (a) physics   the backend's own stepping with fixed controls: for `mujoco`, raw C MuJoCo
                  (mujoco.rollout on the env's model with the backend's thread count, worlds
                  restarted from reset states every 30 control steps, as bench/bench_sim.py); for
                  `mjwarp`, env.physics_step (the captured graph)
    (b) hier.     the trainer's hierarchical_step with the frozen LLC and fixed latents, then
                  reset_done(): physics + PD targets + observations + reward + flags + LLC
    (c) trainer   one full trainer iteration: rollout() (policy, hierarchical steps, values,
                  storage), compute_gae() and update_policy() (the PPO epochs), all imported from
                  hrl_ppo_continuous.py with its default Args (--num-steps high-level steps)
    (d) torchrl   the same k-step loop built with torchrl: the env wrapped as a batched torchrl
                  EnvBase on the same device, the LLC as a transform that turns (observation,
                  latent) into joint actions at every inner step, under torchrl's MultiAction
                  transform replaying the fixed latent k times; step_and_maybe_reset once per
                  high-level step. Needs `pip install torchrl` (0.14.1 measured); skipped when absent
(b), (c) and (d) run the same number of simulator steps (--num-steps x k per world). The policy
is untrained (random weights), which costs the same as a trained one. `physics_step` is the
backend's env.physics_step (for `mujoco` with its numpy glue and body sensors), for reference.
--repeat R keeps the best of R timings of each (a busy machine). With --profile, where (b) and (c)
spend their time (exclusive wall time per part). --compile, --fused-adam and --cuda-graph set the trainer's
flags of the same names (README "Trainer speed"): an A/B of them is two runs, e.g. --compile none and
--compile update.

    python bench/bench_hrl.py --robot ant --backend mujoco --num-envs 16 64 256
    python bench/bench_hrl.py --robot humanoid --llc-checkpoint random --num-envs 64 256 --profile
    python bench/bench_hrl.py --robot ant --num-envs 256 --compile update
    python bench/bench_hrl.py --device cuda:0 --robot humanoid --llc-checkpoint random --num-envs 4096 --cuda-graph
"""

import argparse
import collections
import os
import sys
import time
from dataclasses import replace

import mujoco
import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from bench.bench_rollout import fixed_actions, time_steps  # noqa: E402
from bench.bench_sim import cpu_model_name, sync, time_c_mujoco  # noqa: E402
from hrl_ppo_continuous import (Agent, Args, EpisodeStats, RolloutStorage, compile_llc, compute_gae,  # noqa: E402
                                flush_denormals_on_cpu, make_high_level_step, make_optimizer, rollout, update_policy)
from llc import build_llc, load_llc  # noqa: E402
from tasks import ROBOTS, TASKS, load_robot, make_env  # noqa: E402

LLC_STEPS = 5  # k, the trainer's default
RESET_EVERY = 30  # control steps between restarts of the raw physics reference


# ---------------------------------------------------------------------------------------------
# The frozen LLC
# ---------------------------------------------------------------------------------------------
def random_llc(robot, env, device):
    """An untrained LLC of the sizes llc_pretrain.py trains for the robot (its default flags), for timing."""
    from llc_pretrain import Args as PretrainArgs

    defaults = PretrainArgs()
    torch.manual_seed(0)
    llc = build_llc(env.num_obs - env.get_task_obs_size(), load_robot(robot).LLC_LATENT_DIM, env.num_actions,
                    arch=defaults.llc_arch, hidden=defaults.llc_hidden, activation=defaults.llc_activation,
                    style_hidden=defaults.llc_style_hidden, style_dim=defaults.llc_style_dim)
    return llc.to(device).freeze()


def fixed_latents(env, llc):
    generator = torch.Generator(env.device).manual_seed(1)
    z = torch.randn(env.num_envs, llc.latent_dim, device=env.device, generator=generator)
    return torch.nn.functional.normalize(z, dim=-1)


# ---------------------------------------------------------------------------------------------
# (a) physics
# ---------------------------------------------------------------------------------------------
def time_raw_physics(env, backend, control_steps, threads):
    """(a) in control steps/s x N."""
    if backend == "mujoco":
        actions = fixed_actions(env).expand(control_steps, -1, -1)
        return time_c_mujoco(env, actions, threads, reset_every=min(RESET_EVERY, control_steps)) / env.decimation
    return time_physics_step(env, control_steps)


def time_physics_step(env, control_steps):
    """env.physics_step with the fixed PD targets, restarted every RESET_EVERY control steps (untimed)."""
    actions = fixed_actions(env)
    elapsed = 0.0
    for first in range(0, control_steps, RESET_EVERY):
        env.reset()
        env.sim.ctrl.copy_(env.pd_offset + env.pd_scale * actions)
        env.physics_step()  # warm-up (first call: graph capture or thread pool start)
        elapsed += time_steps(env.physics_step, min(RESET_EVERY, control_steps - first), env.device)
    return control_steps * env.num_envs / elapsed


# ---------------------------------------------------------------------------------------------
# (b) the hierarchical rollout with fixed latents
# ---------------------------------------------------------------------------------------------
def time_hierarchical(env, llc, high_level_steps, cuda_graph=False):
    z = fixed_latents(env, llc)
    step = make_high_level_step(env, llc, LLC_STEPS, env.get_task_obs_size(), 0.0, llc.latent_dim, cuda_graph)
    state = {"obs": env.reset()["obs"]}

    def high_level_step():
        step(z, state["obs"])
        state["obs"] = env.reset_done()["obs"]

    high_level_step()  # warm-up
    return high_level_steps * LLC_STEPS * env.num_envs / time_steps(high_level_step, high_level_steps, env.device)


# ---------------------------------------------------------------------------------------------
# (c) the trainer's iteration
# ---------------------------------------------------------------------------------------------
def trainer_args(high_level_steps, num_envs, speed_flags=None):
    """The trainer's default Args with --num-steps and the speed flags (compile, fused_adam, cuda_graph) given."""
    args = replace(Args(), num_steps=high_level_steps, **(speed_flags or {}))
    batch = num_envs * high_level_steps
    if batch % args.num_minibatches or batch < 2 * args.num_minibatches:
        raise SystemExit(f"--num-envs {num_envs} x --num-steps {high_level_steps} must be a multiple of the trainer's "
                         f"{args.num_minibatches} minibatches of at least 2 (advantages are normalised per minibatch)")
    return args


def make_trainer_parts(env, llc, args):
    """The trainer's rollout() and its GAE + update_policy(), as two calls; llc None: flat PPO (k = 1)."""
    action_size, llc_steps = (env.num_actions, 1) if llc is None else (llc.latent_dim, LLC_STEPS)
    agent = Agent(env.num_obs, action_size, args.hidden_sizes, args.init_log_std, args.learned_log_std,
                  args.normalize_obs, args.normalize_value).to(env.device)
    optimizer = make_optimizer(agent, args)
    storage = RolloutStorage.allocate(args.num_steps, env.num_envs, env.num_obs, action_size, env.device)
    stats = EpisodeStats(env.num_envs, env.device)
    task_obs_size = env.get_task_obs_size()
    minibatch_size = env.num_envs * args.num_steps // args.num_minibatches
    high_level_step = make_high_level_step(env, llc, llc_steps, task_obs_size, 0.0, action_size, args.cuda_graph)
    state = {"obs": env.reset()["obs"]}

    def rollout_part():
        state["obs"] = rollout(env, llc, agent, state["obs"], storage, llc_steps, task_obs_size, 0.0, stats,
                               high_level_step)

    def update_part():
        advantages, returns = compute_gae(storage.rewards, storage.values, storage.next_values, storage.dones,
                                          args.gamma, args.gae_lambda)
        metrics = update_policy(agent, optimizer, storage, advantages, returns, args, minibatch_size)
        torch.stack([value.float() for value in metrics.values()]).cpu()  # the trainer's one logging transfer

    return agent, rollout_part, update_part


def make_trainer_iteration(env, llc, args):
    agent, rollout_part, update_part = make_trainer_parts(env, llc, args)

    def iteration():
        rollout_part()
        update_part()

    return agent, iteration


def time_trainer(env, llc, args, repeat=1):
    _, iteration = make_trainer_iteration(env, llc, args)
    iteration()  # warm-up: allocator, Adam's state
    return max(args.num_steps * LLC_STEPS * env.num_envs / time_steps(iteration, 1, env.device) for _ in range(repeat))


# ---------------------------------------------------------------------------------------------
# (d) the same loop with torchrl
# ---------------------------------------------------------------------------------------------
def torchrl_unavailable():
    """None when torchrl imports, else why not."""
    try:
        import tensordict  # noqa: F401
        import torchrl  # noqa: F401
    except Exception as err:  # ImportError, or a release built against another torch
        return f"{type(err).__name__}: {err}".splitlines()[0][:100]
    return None


def make_torchrl_env(env, llc):
    """The env as a batched torchrl EnvBase, with the LLC in the loop under MultiAction."""
    from tensordict import TensorDict
    from torchrl.data import Bounded, Composite, Unbounded
    from torchrl.envs import Compose, EnvBase, MultiAction, Transform, TransformedEnv

    n, device = env.num_envs, env.device
    llc_obs_size = env.num_obs - env.get_task_obs_size()

    class TasksEnv(EnvBase):
        """tasks/ env behind torchrl's interface: done / terminated / truncated [N, 1], partial reset via _reset."""

        batch_locked = True

        def __init__(self):
            super().__init__(device=device, batch_size=torch.Size([n]))
            self.observation_spec = Composite(observation=Unbounded((n, env.num_obs), device=device), shape=(n,))
            self.action_spec = Bounded(-1.0, 1.0, (n, env.num_actions), device=device)
            self.reward_spec = Unbounded((n, 1), device=device)

        def _flags(self, done, terminated, truncated, **entries):
            return TensorDict(done=done[:, None], terminated=terminated[:, None], truncated=truncated[:, None],
                              batch_size=self.batch_size, device=device, **entries)

        def _reset(self, tensordict=None):
            partial = tensordict is not None and "_reset" in tensordict.keys()
            obs = env.reset_done()["obs"] if partial else env.reset()["obs"]
            false = torch.zeros(n, dtype=torch.bool, device=device)
            return self._flags(false, false, false, observation=obs)

        def _step(self, tensordict):
            obs_dict, reward, done, extras = env.step(tensordict["action"])
            return self._flags(done, extras["terminate"], extras["time_outs"], observation=obs_dict["obs"],
                               reward=reward[:, None])

        def _set_seed(self, seed):
            env.seed(seed)

    class LowLevelControl(Transform):
        """The frozen LLC between the latent (the policy's action) and the joint actions, at every inner step."""

        def __init__(self):
            super().__init__(in_keys_inv=["action"], out_keys_inv=["latent"])

        def _inv_call(self, tensordict):
            with torch.no_grad():
                action = llc.act(tensordict["observation"][:, :llc_obs_size], tensordict["latent"])
            return tensordict.set("action", action)

        def transform_input_spec(self, input_spec):
            input_spec["full_action_spec"] = Composite(latent=Unbounded((n, llc.latent_dim), device=device), shape=(n,))
            return input_spec

    return TransformedEnv(TasksEnv(), Compose(LowLevelControl(), MultiAction(action_key="latent")))


def time_torchrl(env, llc, high_level_steps):
    torchrl_env = make_torchrl_env(env, llc)
    latents = fixed_latents(env, llc)[:, None].expand(-1, LLC_STEPS, -1)  # [N, k, latent]: MultiAction's stack
    state = {"td": torchrl_env.reset()}

    def high_level_step():
        td = state["td"].set("latent", latents)
        td, state["td"] = torchrl_env.step_and_maybe_reset(td)
        td["next", "reward"].mean(1)  # the window's reward, as (b) aggregates it

    high_level_step()  # warm-up
    return high_level_steps * LLC_STEPS * env.num_envs / time_steps(high_level_step, high_level_steps, env.device)


# ---------------------------------------------------------------------------------------------
# --profile: exclusive wall time of each part of (b) and (c)
# ---------------------------------------------------------------------------------------------
class PartTimer:
    """Wraps callables so that each call's wall time, minus that of wrapped calls inside it, goes to its part."""

    def __init__(self, device):
        self.device, self.totals, self.stack = device, collections.defaultdict(float), []

    def wrap(self, part, fn, inside_of=()):
        def timed_fn(*args, **kwargs):
            if self.stack and self.stack[-1][0] in inside_of:  # e.g. the policy inside the PPO update: the update's
                return fn(*args, **kwargs)
            sync(self.device)
            self.stack.append([part, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                _, start, children = self.stack.pop()
                elapsed = time.perf_counter() - start
                self.totals[part] += elapsed - children
                if self.stack:
                    self.stack[-1][2] += elapsed
        return timed_fn


def profile_parts(env, llc, args, bench_module):
    """{'(b)': {part: seconds}, '(c)': {...}} over one timed (b) run and one (c) iteration."""
    timer = PartTimer(env.device)
    env.physics_step = timer.wrap("physics (env.physics_step)", env.physics_step)
    env.step = timer.wrap("env.step without physics: PD targets, obs, reward, flags", env.step)
    env.reset_done = timer.wrap("env.reset_done", env.reset_done)
    llc_act = llc.act
    llc.act = timer.wrap("LLC forward", llc_act)
    results = {}
    update = "PPO update (update_policy)"
    agent, iteration = make_trainer_iteration(env, llc, args)
    for name in ("get_action_and_value", "get_value"):
        setattr(agent, name, timer.wrap("policy and value forward (rollout)", getattr(agent, name), inside_of=(update,)))
    bench_module.update_policy = timer.wrap(update, update_policy)
    bench_module.compute_gae = timer.wrap("compute_gae", compute_gae)
    for key, run in (("(b)", lambda: time_hierarchical(env, llc, args.num_steps)), ("(c)", iteration)):
        run()  # warm-up: (b) itself warms up first
        timer.totals.clear()
        results[key] = (time_steps(run, 1, env.device), dict(timer.totals))
    bench_module.update_policy, bench_module.compute_gae = update_policy, compute_gae
    for name in ("physics_step", "step", "reset_done"):
        delattr(env, name)
    llc.act = llc_act
    return results


def print_profile(robot, n, results):
    for key, (total, parts) in results.items():
        print(f"profile {robot} N={n} {key}: {total:.3f} s")
        for part, seconds in sorted(parts.items(), key=lambda item: -item[1]):
            print(f"    {seconds:8.3f} s {seconds / total:6.1%}  {part}")
        other = total - sum(parts.values())
        print(f"    {other:8.3f} s {other / total:6.1%}  the trainer's own tensor ops (reward aggregation, storage, stats)")


# ---------------------------------------------------------------------------------------------
def best_of(repeat, measure, *inputs):
    return max(measure(*inputs) for _ in range(repeat))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robot", default="ant", choices=ROBOTS)
    parser.add_argument("--task", default="heading", choices=TASKS)
    parser.add_argument("--backend", default=None, choices=["mujoco", "mjwarp"],
                        help="default: mujoco on the CPU, mjwarp on CUDA")
    parser.add_argument("--llc-checkpoint", default=None,
                        help="default checkpoints/llc_{robot}.pt; `random`: an untrained LLC of llc_pretrain.py's sizes")
    parser.add_argument("--num-envs", nargs="+", type=int, default=None,
                        help="worlds (default 16 64 256 on the CPU, 1024 4096 16384 on CUDA)")
    parser.add_argument("--num-steps", type=int, default=32,
                        help=f"high-level steps per world in (b), (c) and (d) (x k = {LLC_STEPS} control steps); "
                             "the trainer's --num-steps in (c)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                        help="device of the networks and of the mjwarp backend (the mujoco backend runs on the CPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="C MuJoCo threads: the mujoco backend's sim_threads and the raw rollout reference")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads (0: torch's default); on a small CPU more threads contend with the simulator's")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each measurement this many times and keep the best (on a busy machine)")
    parser.add_argument("--compile", default="none", choices=["none", "llc", "step", "update", "all"],
                        help="the trainer's --compile: torch.compile the LLC's forward (b, c, d), the env's tensor ops "
                             "after the physics (b, c, d), the PPO minibatch loss (c)")
    parser.add_argument("--compile-llc", action="store_true", help="the same as --compile llc")
    parser.add_argument("--fused-adam", default="auto", choices=["auto", "on", "off"],
                        help="the trainer's --fused-adam in (c) (auto: on with CUDA, off on the CPU)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="the trainer's --cuda-graph in (b) and (c): one CUDA graph per high-level step (mjwarp on CUDA)")
    parser.add_argument("--no-torchrl", action="store_true", help="skip (d)")
    parser.add_argument("--profile", action="store_true", help="also print where (b) and (c) spend their time")
    args = parser.parse_args()
    backend = args.backend or ("mjwarp" if args.device.startswith("cuda") else "mujoco")
    if backend == "mujoco" and args.device != "cpu":
        raise SystemExit(f"--backend mujoco runs on the CPU; the networks must share its device, got --device {args.device}")
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    flush_denormals_on_cpu(device)  # as the trainer
    num_envs = args.num_envs or ([1024, 4096, 16384] if device.type == "cuda" else [16, 64, 256])
    torchrl_missing = "skipped (--no-torchrl)" if args.no_torchrl else torchrl_unavailable()
    if torchrl_missing is None:
        import torchrl

        torchrl_line = f"torchrl {torchrl.__version__} (MultiAction)"
    else:
        torchrl_line = f"torchrl unavailable: {torchrl_missing} (pip install torchrl==0.14.1)"

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    llc_name = args.llc_checkpoint or os.path.relpath(os.path.join(REPO_DIR, "checkpoints", f"llc_{args.robot}.pt"), REPO_DIR)
    print(f"hardware: {device} ({device_name}), CPU {cpu_model_name()} with {os.cpu_count()} cores, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, MuJoCo {mujoco.__version__}, {torchrl_line}")
    if args.compile_llc:
        args.compile = "all" if args.compile in ("update", "all") else "llc"
    speed_flags = {"compile": args.compile, "fused_adam": args.fused_adam, "cuda_graph": args.cuda_graph}
    compiled = f", --compile {args.compile} --fused-adam {args.fused_adam}{' --cuda-graph' if args.cuda_graph else ''}"
    print(f"robot {args.robot}, task {args.task}, backend {backend}, LLC {llc_name}{compiled}, k = {LLC_STEPS}, "
          f"{args.num_steps} high-level steps per world in (b), (c), (d)")
    print(f"{'N':>6} {'(a) physics':>12} {'physics_step':>12} {'(b) hier.':>10} {'(c) trainer':>11} {'(d) torchrl':>11} "
          f"{'(b)/(a)':>8} {'(c)/(a)':>8} {'(c)/(b)':>8} {'ours/torchrl':>12}  (simulator steps/s)")
    bench_module = sys.modules[__name__]
    profiles = []
    for n in num_envs:
        env = make_env(args.robot, args.task, n, device=str(device), seed=0, backend=backend, sim_threads=args.threads)
        if args.llc_checkpoint == "random":
            llc = random_llc(args.robot, env, device)
        else:
            llc = load_llc(os.path.join(REPO_DIR, llc_name), device=str(device))
            llc.check_env(env.num_obs, env.get_task_obs_size())
        if args.compile in ("llc", "all"):
            compile_llc(llc)
        if args.compile in ("step", "all"):
            env.compile_step()
        control_steps = args.num_steps * LLC_STEPS
        physics = best_of(args.repeat, time_raw_physics, env, backend, control_steps, args.threads)
        physics_step = physics if backend == "mjwarp" else best_of(args.repeat, time_physics_step, env, control_steps)
        hier = best_of(args.repeat, time_hierarchical, env, llc, args.num_steps, args.cuda_graph)
        trainer = time_trainer(env, llc, trainer_args(args.num_steps, n, speed_flags), args.repeat)
        if torchrl_missing is None:
            reference = best_of(args.repeat, time_torchrl, env, llc, args.num_steps)
            reference_cell, ratio_cell = f"{reference:>11,.0f}", f"{hier / reference:>12.2f}"
        else:
            reference_cell, ratio_cell = f"{'n/a':>11}", f"{'n/a':>12}"
        print(f"{n:>6} {physics:>12,.0f} {physics_step:>12,.0f} {hier:>10,.0f} {trainer:>11,.0f} {reference_cell} "
              f"{hier / physics:>8.2f} {trainer / physics:>8.2f} {trainer / hier:>8.2f} {ratio_cell}", flush=True)
        if args.profile:
            # eager high-level steps: the part timers synchronise, which a CUDA graph capture does not allow
            profile_flags = {**speed_flags, "cuda_graph": False}
            profiles.append((n, profile_parts(env, llc, trainer_args(args.num_steps, n, profile_flags), bench_module)))
        del env
    if torchrl_missing is not None:
        print(f"(d) torchrl: {torchrl_missing}")
    for n, results in profiles:
        print_profile(args.robot, n, results)


if __name__ == "__main__":
    main()
