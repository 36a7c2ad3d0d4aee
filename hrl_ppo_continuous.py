# Hierarchical PPO over a frozen low-level controller (LLC), CleanRL style.
#
# A high-level policy, trained with PPO, picks a latent z every k simulator (control) steps; a
# pre-trained, frozen LLC maps (proprioceptive observation, z) to joint actions at every step.
# The semantics follow NVIDIA's ASE (ase/learning/hrl_agent.py); see README.md.
#
# Reading order: Args -> environment construction -> THE HIERARCHICAL STEP (k inner steps and
# reward aggregation) -> networks -> rollout -> PPO (GAE, loss, update) -> checkpoints ->
# evaluation/video/logging -> main.
import os
import signal
import sys

import openmp_policy


def interrupted_at_start(signum, frame):
    print("\ninterrupted during start-up: nothing was written", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # Ctrl-C while torch and the simulator load: a message, not an import traceback
    signal.signal(signal.SIGINT, interrupted_at_start)
    openmp_policy.wait_passively()  # before torch loads its OpenMP runtime (see openmp_policy.py)


def requested_backend(argv: list) -> str:
    """The --env-backend value on the command line (before tyro runs: Isaac Gym must be
    imported before torch)."""
    for i, arg in enumerate(argv):
        if arg == "--env-backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--env-backend="):
            return arg.split("=", 1)[1]
    return "auto"


ISAACGYM_MISSING = (
    "--env-backend isaacgym needs Isaac Gym Preview 4 (from NVIDIA, Python 3.8): download it from "
    "https://developer.nvidia.com/isaac-gym, then `pip install -e isaacgym/python` and "
    "`pip install -e IsaacGymEnvs` (https://github.com/isaac-sim/IsaacGymEnvs). "
    "Without Isaac Gym, use the default --env-backend auto (MuJoCo Warp on a GPU, C MuJoCo on the CPU), "
    "or --env-backend mjwarp / mujoco."
)

if __name__ == "__main__" and requested_backend(sys.argv[1:]) == "isaacgym":
    try:
        import isaacgym  # noqa: F401  (must be imported before torch)
    except ImportError as err:
        sys.exit(f"error: {ISAACGYM_MISSING} ({err})")

import functools
import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions.normal import Normal

from typing_extensions import Annotated  # typing.Annotated needs Python 3.9; Isaac Gym runs on 3.8

import distributed
from llc import (CheckpointWriteError, LLCCheckpointError, RunningMeanStd, atomic_save, infer_local_root_obs, load_llc, mlp,
                 read_ase_env_local_root_obs, read_checkpoint)
from tasks import ROBOTS, TASKS, load_robot_spec  # names only: robot and task modules load lazily

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def default_is(text: str):
    """--help shows `(default: text)` for a flag whose None default is resolved at start-up."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")


@dataclass
class Args:
    """Hierarchical PPO: a high-level policy picks the latent of a frozen low-level controller every k simulator steps."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, CUDA is used when available (else the CPU)"""
    track: bool = False
    """if toggled, this experiment is tracked with Weights and Biases (WANDB_MODE=offline works)"""
    wandb_project_name: str = "hrl-ppo"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """record a video of one deterministic episode (end of training, or with --eval-checkpoint) to videos/{run_name}"""
    save_model: bool = False
    """also save the final policy weights as runs/{run_name}/{exp_name}.cleanrl_model (checkpoints are always written)"""

    # Environment and low-level controller
    env_backend: Annotated[Literal["auto", "mjwarp", "mujoco", "isaacgym"], tyro.conf.arg(help=(
        "simulator: `auto` (tasks/: `mjwarp` on CUDA, `mujoco` on the CPU), `mjwarp` (tasks/, MuJoCo Warp), "
        "`mujoco` (tasks/, C MuJoCo on the CPU cores) or `isaacgym` (Isaac Gym Preview 4 + IsaacGymEnvs)"))] = "auto"
    sim_threads: Optional[int] = None
    """threads of the C MuJoCo simulator (`mujoco` backend; default: all cores)"""
    torch_threads: Annotated[int, tyro.conf.arg(help=(
        "CPU threads for torch ops (0: torch's default); on a small CPU where torch's threads and the simulator "
        "contend, 1 can be much faster"))] = 0
    robot: Annotated[str, tyro.conf.arg(help=f"robot, one of {', '.join(ROBOTS)} (isaacgym: any name); names "
                                             "the default LLC checkpoint checkpoints/llc_{robot}.pt")] = "ant"
    task: Annotated[str, tyro.conf.arg(help=f"task, one of {', '.join(TASKS)} (isaacgym: the task name given "
                                            "to isaacgymenvs.make)")] = "heading"
    sim_verbose: bool = False
    """let the simulator print its own messages (MuJoCo Warp's banner and kernel loading)"""
    env_factory: Annotated[Optional[str], tyro.conf.arg(help=(
        "`module:function` building the env instead (called with task, num_envs, seed, sim_device, rl_device, "
        "graphics_device_id, headless); isaacgym backend only"))] = None
    num_envs: Annotated[Optional[int], default_is("4096 on CUDA, 64 on the CPU")] = None
    """number of parallel environments"""
    llc_checkpoint: Annotated[Optional[str], default_is("checkpoints/llc_{robot}.pt")] = None
    """frozen LLC checkpoint (native or ASE/rl_games); `none` = flat PPO on joint actions (k = 1)"""
    llc_config: Optional[str] = None
    """ASE training yaml of an rl_games LLC checkpoint, to cross-check its network sizes"""
    llc_env_config: Optional[str] = None
    """ASE env yaml the LLC was trained with (e.g. humanoid_ase_sword_shield_getup.yaml), to cross-check env.localRootObs"""
    llc_steps: Annotated[Optional[int], default_is("5 as in ASE; 1 for the flat baseline")] = None
    """k: simulator (control) steps per high-level action"""
    style_reward_weight: Annotated[Optional[float], default_is(
        "0.1 when the LLC has a discriminator and the env gives AMP observations, else 0")] = None
    """w in r = (1 - w) * task + w * style"""
    local_root_obs: bool = False
    """ASE's localRootObs for the humanoid's policy and AMP observations (ASE's LLC yamls set it true); tasks/ humanoid only"""
    robot_xml: Optional[str] = None
    """your copy of ASE's amp_humanoid.xml, simulated instead of assets/humanoid.xml (tasks/ase_mjcf.py); humanoid only"""
    heading_speed_range: Annotated[Optional[Tuple[float, float]],
                                   default_is("the robot's: ant 0.4 0.8, humanoid 1.5 1.6")] = None
    """LO HI: the heading task's target speeds, m/s, uniform in [LO, HI) (keep them inside the LLC's skill range)"""

    # PPO (ASE's high-level values where they fit; see README for the ones that differ)
    total_timesteps: Annotated[Optional[int], default_is("50M on CUDA, 300k on the CPU")] = None
    """total SIMULATOR (control) steps over all envs, i.e. high-level steps * k; rounded down to whole iterations"""
    learning_rate: float = 1e-4
    """Adam learning rate (ASE: 2e-5 on 4096 envs; larger here so small CPU runs learn within minutes)"""
    anneal_lr: bool = False
    """toggle learning rate annealing (ASE: constant)"""
    num_steps: int = 32
    """high-level steps per env per rollout (ASE horizon 32 = 160 simulator steps at k = 5)"""
    gamma: float = 0.99
    """discount factor per high-level step"""
    gae_lambda: float = 0.95
    """lambda for the general advantage estimation"""
    num_minibatches: int = 8
    """number of mini-batches per epoch (ASE: 131072 / 16384 = 8)"""
    update_epochs: int = 6
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = False
    """toggles clipped value loss (ASE: off)"""
    ent_coef: float = 0.0
    """coefficient of the entropy (ASE: 0; constant with a fixed log-std)"""
    vf_coef: float = 5.0
    """coefficient of the value function loss (ASE critic_coef 5; the loss is 0.5 * MSE in normalised value units)"""
    bounds_loss_coef: float = 10.0
    """coefficient of the penalty relu(|mu| - 1)^2 on the action mean (ASE: 10; zero while the mean is tanh-squashed)"""
    max_grad_norm: Annotated[Optional[float], default_is("off, as ASE")] = None
    """maximum norm for gradient clipping"""
    target_kl: Annotated[Optional[float], default_is("off")] = None
    """stop the update epochs early when the approximate KL exceeds this"""
    learned_log_std: bool = False
    """learn the policy log-std (ASE: fixed)"""
    init_log_std: float = -2.3
    """initial (or fixed) log-std of the Gaussian policy (ASE: -2.3, std ~0.1)"""
    hidden_sizes: Tuple[int, ...] = (1024, 512)
    """hidden layers of the actor and of the critic MLPs (ReLU)"""
    normalize_obs: bool = True
    """running mean/std normalisation of the high-level observation"""
    normalize_value: bool = True
    """running mean/std normalisation of the value targets"""

    max_nonfinite_updates: int = 10
    """stop after this many optimiser steps in a row with a non-finite loss or gradient (each one is skipped)"""

    # Speed (README "Trainer speed": figures behind each default)
    compile: Annotated[Literal["none", "llc", "step", "update", "all"], tyro.conf.arg(help=(
        "torch.compile: `llc` the frozen LLC's forward (every inner step), `step` the env's tensor ops after the "
        "physics (tasks/ backends), `update` the PPO minibatch loss (forward + loss; backward through the compiled "
        "graph), `all` the three, `none` eager; compiling costs 10-60 s at start-up on a small CPU"))] = "none"
    fused_adam: Literal["auto", "on", "off"] = "auto"
    """Adam's fused kernel (one kernel for all parameters; `auto`: on with CUDA, off on the CPU, where it measured
    slower); the same update as torch's default kernel up to float rounding"""
    cuda_graph: bool = False
    """capture one high-level step (k x (LLC + env.step) + the reward aggregation) as one CUDA graph and replay it;
    mjwarp backend on CUDA only"""

    # Checkpoints and evaluation
    checkpoint_interval: int = 50
    """write runs/{run_name}/checkpoint.pt every this many iterations (and at the end)"""
    resume: Optional[str] = None
    """checkpoint to continue: same run directory, global step and schedule"""
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint with the deterministic policy instead of training"""
    eval_episodes: int = 10
    """number of episodes for --eval-checkpoint"""
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S
    """under torchrun: seconds a rank waits in a collective for the others before it exits with an error"""


class Derived(NamedTuple):
    """Values computed once from the flags (see `derive`); `args` itself stays as given."""

    device: torch.device
    flat: bool  # --llc-checkpoint none: PPO acts on joint actions directly
    llc_path: Optional[str]
    llc_steps: int  # k
    num_envs: int
    total_timesteps: int  # simulator steps
    batch_size: int  # high-level transitions per iteration
    minibatch_size: int
    sim_steps_per_iteration: int
    num_iterations: int
    cuda_graph: bool = False  # --cuda-graph: each high-level step replays one captured CUDA graph


def flush_denormals_on_cpu(device: torch.device) -> bool:
    """On the CPU, treat subnormal floats (|x| < 1.2e-38) as zero; returns whether it is set.

    CPU arithmetic on subnormals is 10-100x slower. Adam's first moment of a weight whose gradient is
    exactly zero (the outgoing weights of a dead ReLU unit) decays by beta1 = 0.9 per step through
    that range: a flat humanoid run on MuJoCo Warp held 456 of them at iteration 40 unflushed (flushed,
    they become zeros). They cost the update only 2-7% (bench/bench_update.py); the 20x slower updates of
    that run came from torch's OpenMP threads spinning on a shared CPU (openmp_policy.py). Flushing
    is kept because it is free and no learning signal lives below 1e-38.
    It sets the calling thread's control register (MXCSR), and torch's OpenMP threads copy it when
    they are created, at torch's first parallel operation: call it before that, or those threads keep
    computing subnormals (measured: one half of a 2-thread product stayed subnormal)."""
    return device.type == "cpu" and torch.set_flush_denormal(True)


def fail(message: str):
    raise SystemExit(f"error: {message}")


def check_robot_xml(robot: str, robot_xml: Optional[str]):
    """--robot-xml read and checked (robot, layout) before anything is built or written."""
    if robot_xml is not None:
        try:
            load_robot_spec(robot, robot_xml)
        except ValueError as error:
            fail(f"--robot-xml: {error}")


def check_flags(args: Args):
    """Reject conflicting flags before anything is built."""
    flat = (args.llc_checkpoint or "").lower() == "none"
    tasks_backend = args.env_backend != "isaacgym"
    if args.resume and args.eval_checkpoint:
        fail("--resume and --eval-checkpoint exclude each other (train on, or evaluate)")
    if flat and args.llc_steps not in (None, 1):
        fail(f"--llc-checkpoint none (flat PPO) acts every simulator step: --llc-steps must be 1, got {args.llc_steps}")
    if flat and args.style_reward_weight:
        fail(f"--style-reward-weight {args.style_reward_weight} needs an LLC with a discriminator, "
             "but --llc-checkpoint is none")
    if args.capture_video and not tasks_backend:
        fail("--capture-video is supported with the tasks/ backends (auto, mjwarp, mujoco) only "
             "(render Isaac Gym runs with its viewer)")
    if args.capture_video:
        from tasks.video import renderer_available

        available, reason = renderer_available()
        if not available:
            fail(f"--capture-video: {reason}")
    if tasks_backend and (args.robot not in ROBOTS or args.task not in TASKS):
        fail(f"--robot {args.robot} --task {args.task}: expected a robot in {ROBOTS} and a task in {TASKS}")
    if args.local_root_obs and (not tasks_backend or args.robot != "humanoid"):
        fail(f"--local-root-obs is for --robot humanoid on the tasks/ backends (got --robot {args.robot}, "
             f"--env-backend {args.env_backend}; Isaac Gym tasks take it from their yaml)")
    if args.heading_speed_range is not None:
        low, high = args.heading_speed_range
        if args.task != "heading" or not tasks_backend:
            fail(f"--heading-speed-range is for --task heading on the tasks/ backends (got --task {args.task}, "
                 f"--env-backend {args.env_backend})")
        if not (0.0 <= low <= high and math.isfinite(high)):
            fail(f"--heading-speed-range {low} {high}: expected 0 <= LO <= HI (m/s)")
    if args.robot_xml is not None and not tasks_backend:
        fail(f"--robot-xml {args.robot_xml} is for the tasks/ backends; Isaac Gym tasks load their own")
    check_robot_xml(args.robot, args.robot_xml)
    if args.env_factory and tasks_backend:
        fail(f"--env-factory {args.env_factory} is for --env-backend isaacgym; with the tasks/ backends use --robot/--task")
    if not tasks_backend and "isaacgym" not in sys.modules:
        fail("--env-backend isaacgym must be given on the command line (Isaac Gym is imported before torch)")
    check_ranges(args, FLAG_RANGES)


def positive(value):
    return math.isfinite(value) and value > 0


def non_negative(value):
    return math.isfinite(value) and value >= 0


def unit_interval(value):
    return 0.0 <= value <= 1.0  # False for NaN


# flag: (test a value must pass, what is allowed); None passes where the flag has a None default
FLAG_RANGES = {
    **{name: (lambda v: v >= 1, "an integer >= 1") for name in (
        "num_envs", "sim_threads", "total_timesteps", "num_steps", "num_minibatches", "update_epochs",
        "checkpoint_interval", "eval_episodes", "llc_steps", "max_nonfinite_updates")},
    "torch_threads": (lambda v: v >= 0, "an integer >= 0 (0: torch's default)"),
    "gamma": (unit_interval, "a number in [0, 1]"), "gae_lambda": (unit_interval, "a number in [0, 1]"),
    "style_reward_weight": (unit_interval, "a number in [0, 1]"),
    "learning_rate": (positive, "a finite number > 0"), "clip_coef": (positive, "a finite number > 0"),
    "max_grad_norm": (positive, "a finite number > 0 (leave it out for no clipping)"),
    "target_kl": (positive, "a finite number > 0 (leave it out for no early stop)"),
    "vf_coef": (non_negative, "a finite number >= 0"), "ent_coef": (non_negative, "a finite number >= 0"),
    "bounds_loss_coef": (non_negative, "a finite number >= 0"),
    "init_log_std": (math.isfinite, "a finite number"),
    "hidden_sizes": (lambda sizes: len(sizes) > 0 and all(size >= 1 for size in sizes), "one or more integers >= 1"),
}


def check_ranges(args, ranges: dict):
    """Every flag in `ranges` that args has passes its test, else an error naming the value and what is allowed."""
    for name, (test, allowed) in ranges.items():
        value = getattr(args, name, None)
        if value is not None and not test(value):
            shown = " ".join(str(v) for v in value) if isinstance(value, (tuple, list)) else value
            fail(f"--{name.replace('_', '-')} {shown}: expected {allowed}")


def derive(args: Args) -> Derived:
    """Every value derived from the flags, computed in one place."""
    use_cuda = args.cuda and torch.cuda.is_available()
    device = torch.device("cuda", distributed.local_rank()) if use_cuda else torch.device("cpu")
    flat = (args.llc_checkpoint or "").lower() == "none"
    llc_path = None if flat else (args.llc_checkpoint or os.path.join(REPO_DIR, "checkpoints", f"llc_{args.robot}.pt"))
    llc_steps = 1 if flat else (args.llc_steps or 5)
    num_envs = args.num_envs or (4096 if use_cuda else 64)
    total_timesteps = args.total_timesteps or (50_000_000 if use_cuda else 300_000)
    batch_size = num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        fail(f"num_envs * num_steps = {batch_size} is not divisible by --num-minibatches {args.num_minibatches}")
    if args.norm_adv and batch_size // args.num_minibatches < 2:
        fail(f"a minibatch of {batch_size // args.num_minibatches} transition (num_envs x num_steps / num_minibatches = "
             f"{num_envs} x {args.num_steps} / {args.num_minibatches}) has no advantage spread to normalise: "
             "use fewer minibatches or more envs or steps")
    sim_steps_per_iteration = batch_size * llc_steps * distributed.world_size()  # all ranks: num_envs is per rank
    num_iterations = max(1, total_timesteps // sim_steps_per_iteration)
    if args.cuda_graph and (not use_cuda or args.env_backend not in ("auto", "mjwarp")):
        fail(f"--cuda-graph needs CUDA and the mjwarp backend (got device {device}, --env-backend {args.env_backend})")
    return Derived(device, flat, llc_path, llc_steps, num_envs, total_timesteps, batch_size,
                   batch_size // args.num_minibatches, sim_steps_per_iteration, num_iterations, args.cuda_graph)


def resolved_flags(args: Args, derived: Derived, style_weight: float) -> Args:
    """The flags with their start-up defaults filled in: what is logged and checkpointed, so that a
    resumed run keeps its schedule on any device."""
    return replace(args, num_envs=derived.num_envs, llc_steps=derived.llc_steps,
                   total_timesteps=derived.total_timesteps, style_reward_weight=style_weight)


# ---------------------------------------------------------------------------------------------
# Environment construction (the trainer does not know which simulator it drives)
# ---------------------------------------------------------------------------------------------
def make_env(args: Args, derived: Derived, num_envs: int, seed: int):
    if args.env_backend == "isaacgym":
        from tasks.isaacgym_env import make_isaacgym_env

        return make_isaacgym_env(args.task, num_envs, seed, str(derived.device), args.env_factory)
    from tasks import make_env as make_tasks_env

    overrides = {"local_root_obs": True} if args.local_root_obs else {}
    if args.robot_xml is not None:
        overrides["robot_xml"] = args.robot_xml
    if args.heading_speed_range is not None:
        overrides["speed_range"] = tuple(args.heading_speed_range)
    return make_tasks_env(robot=args.robot, task=args.task, num_envs=num_envs, device=str(derived.device), seed=seed,
                          backend=args.env_backend, sim_threads=args.sim_threads, verbose=args.sim_verbose, **overrides)


def require_llc_file(derived: Derived):
    if not derived.flat and not os.path.isfile(derived.llc_path):
        fail(f"no LLC checkpoint at {derived.llc_path}: train one with llc_pretrain.py, pass "
             f"--llc-checkpoint PATH, or --llc-checkpoint none for flat PPO")


def load_frozen_llc(args: Args, derived: Derived, env):
    """The frozen LLC, checked against the env; None for the flat baseline."""
    if derived.flat:
        return None
    require_llc_file(derived)
    path = derived.llc_path
    try:
        llc = load_llc(path, device=str(derived.device), ase_config=args.llc_config)
        llc.check_env(env.num_obs, env.get_task_obs_size(), path=path)
    except LLCCheckpointError as err:
        fail(str(err))
    if llc.action_dim != env.num_actions:
        fail(f"LLC {path} outputs {llc.action_dim} actions, env {args.robot}/{args.task} expects {env.num_actions}")
    trained_robot, trained_dt = llc.metadata.get("robot"), llc.metadata.get("control_dt")
    if args.env_backend != "isaacgym" and trained_robot not in (None, args.robot):
        fail(f"LLC {path} was trained for robot {trained_robot!r}, but --robot is {args.robot!r}")
    if trained_dt is not None and abs(trained_dt - env.control_dt) > 1e-6:
        print(f"warning: LLC {path} was trained at control_dt {trained_dt} s, the env steps {env.control_dt} s")
    check_local_root_obs(args, llc, env, path)
    return llc


def check_local_root_obs(args: Args, llc, env, path: str):
    """The LLC must see its root rotation as it was trained: ASE's localRootObs from the native checkpoint's
    metadata, ASE's env yaml (--llc-env-config) or, for rl_games checkpoints, the normalisers' statistics."""
    env_setting = getattr(env, "local_root_obs", None)
    if env_setting is None:  # the robot has no such setting (the ant, Isaac Gym tasks)
        return
    try:
        sources = []
        if "local_root_obs" in llc.metadata:
            sources.append((llc.metadata["local_root_obs"], f"{path} (its metadata)"))
        if args.llc_env_config is not None:
            sources.append((read_ase_env_local_root_obs(args.llc_env_config), f"{args.llc_env_config} (env.localRootObs)"))
        if llc.source_format == "rl_games":
            inferred, why = infer_local_root_obs(llc)
            if inferred is not None:
                sources.append((inferred, f"{path} ({why})"))
    except LLCCheckpointError as err:
        fail(str(err))
    for value, source in sources:
        if value != env_setting:
            fail(f"the LLC was trained with localRootObs {value}, from {source}; the env uses {env_setting}: "
                 f"run {'with' if value else 'without'} --local-root-obs")


def resolve_style_reward_weight(args: Args, llc, env) -> float:
    """ASE mixes 0.9 task + 0.1 style; that needs a discriminator and AMP observations."""
    has_disc = llc is not None and llc.has_discriminator
    has_amp_obs = hasattr(env, "get_num_amp_obs") and env.get_num_amp_obs() > 0
    weight = args.style_reward_weight
    if weight is None:
        return 0.1 if (has_disc and has_amp_obs) else 0.0
    if weight > 0 and not has_disc:
        fail(f"--style-reward-weight {weight} needs an LLC with a discriminator; "
             f"{args.llc_checkpoint or 'the default LLC'} has none")
    if weight > 0 and not has_amp_obs:
        fail(f"--style-reward-weight {weight} needs AMP observations (extras['amp_obs']); this env provides none")
    return weight


# ---------------------------------------------------------------------------------------------
# THE HIERARCHICAL STEP: one high-level action = k simulator steps of the frozen LLC
# ---------------------------------------------------------------------------------------------
class HighLevelStep(NamedTuple):
    obs: torch.Tensor  # [N, num_obs] after the k-th inner step (finished envs: not reset yet)
    bootstrap_obs: torch.Tensor  # [N, num_obs] obs at the step an env finished (else == obs)
    reward: torch.Tensor  # [N] high-level reward: (1 - w) * mean task + w * mean style
    task_reward_sum: torch.Tensor  # [N] task reward summed over the counted inner steps
    control_steps: torch.Tensor  # [N] inner steps counted (up to and including the finish)
    done: torch.Tensor  # [N] bool: the episode ended in this window (any inner step)
    terminate: torch.Tensor  # [N] bool: it ended by failure (any inner step); timeouts are not failures
    style_reward: Optional[torch.Tensor] = None  # [N] mean style reward over the counted inner steps (None: w = 0)


def hierarchical_step(env, llc, high_action, obs, llc_steps: int, task_obs_size: int,
                      style_weight: float = 0.0) -> HighLevelStep:
    """Apply one high-level action for k = llc_steps simulator steps (ASE hrl_agent semantics).

    z = normalise(clamp(a, -1, 1)) stays fixed over the window; the LLC sees a fresh observation
    without its task tail at each inner step. Reward aggregation uses MASKING: an env that
    finishes at inner step j averages its reward over steps 1..j only, because the steps after
    it (the env keeps simulating until reset_done()) belong to no episode. ASE averages over all
    k steps instead. All tensors stay on the device; no host synchronisation.
    With llc=None (flat baseline, k = 1) the action is the joint action itself.
    """
    if llc is not None:
        z = F.normalize(high_action.clamp(-1.0, 1.0), dim=-1)  # unit sphere, as the LLC was trained
    num_envs = obs.shape[0]
    zeros = torch.zeros(num_envs, device=obs.device)
    task_reward_sum, style_reward_sum, control_steps = zeros.clone(), zeros.clone(), zeros.clone()
    done = torch.zeros(num_envs, dtype=torch.bool, device=obs.device)
    terminate = torch.zeros_like(done)
    finish_obs = torch.zeros_like(obs)  # observation at the step each env finished
    llc_obs_size = obs.shape[1] - task_obs_size
    for _ in range(llc_steps):
        if llc is None:
            joint_actions = high_action.clamp(-1.0, 1.0)
        else:
            with torch.no_grad():
                joint_actions = llc.act(obs[:, :llc_obs_size], z)
        obs_dict, task_reward, step_done, extras = env.step(joint_actions)
        obs = obs_dict["obs"]
        counted = ~done  # this inner step still belongs to the episode (where, not *: 0 * NaN = NaN)
        task_reward_sum += torch.where(counted, task_reward, 0.0)
        control_steps += counted
        if style_weight > 0.0:
            with torch.no_grad():
                style_reward_sum += torch.where(counted, llc.style_reward(extras["amp_obs"]), 0.0)
        finish_obs = torch.where((step_done & counted).unsqueeze(-1), obs, finish_obs)
        terminate |= extras["terminate"] & counted
        done |= step_done
    bootstrap_obs = torch.where(done.unsqueeze(-1), finish_obs, obs)
    # control_steps >= 1: every env starts the window unfinished (reset_done() before it).
    reward = (1.0 - style_weight) * task_reward_sum / control_steps
    style_reward = style_reward_sum / control_steps if style_weight > 0.0 else None
    if style_reward is not None:
        reward += style_weight * style_reward
    return HighLevelStep(obs, bootstrap_obs, reward, task_reward_sum, control_steps, done, terminate, style_reward)


def cuda_graph_unsupported(env, device: torch.device) -> Optional[str]:
    """None when one high-level step can be captured as a CUDA graph here, else why not."""
    if device.type != "cuda":
        return f"the trainer runs on {device}, not CUDA"
    backend = getattr(env, "backend", type(env).__name__)
    if backend != "mjwarp":
        return f"the simulator is {backend!r}; only MuJoCo Warp (mjwarp) runs inside a CUDA graph"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot replay the env's own random generator in a CUDA graph (needs torch >= 2.5)"
    return None


class CapturedHierarchicalStep:
    """hierarchical_step captured once as one torch.cuda.CUDAGraph and replayed: k x (LLC forward + env.step,
    MuJoCo Warp's kernels included) + the masked reward aggregation, one launch per high-level step.

    The graph reads the high-level action and observation from static buffers (copied in on each call) and
    writes a HighLevelStep of static tensors: they are overwritten by the next call, so read or copy them
    before it (rollout() does). reset_done() stays outside the graph, between calls, as in the eager loop.
    The env's random generator (task targets resampled inside env.step) is registered with the graph, so
    each replay draws fresh numbers, the same ones the eager step would draw."""

    WARMUP_CALLS = 2  # eager calls on a side stream before capture (lazy caches, cuBLAS workspaces)

    def __init__(self, env, llc, llc_steps: int, task_obs_size: int, style_weight: float, action_size: int):
        reason = cuda_graph_unsupported(env, env.device)
        if reason is not None:
            raise ValueError(f"--cuda-graph: {reason}")
        self.env = env
        self.step_args = (llc_steps, task_obs_size, style_weight)
        self.llc = llc
        self.action = torch.zeros(env.num_envs, action_size, device=env.device)
        self.obs = torch.zeros(env.num_envs, env.num_obs, device=env.device)
        self.graph = torch.cuda.CUDAGraph()
        self.result = self._capture()

    def _eager(self) -> HighLevelStep:
        return hierarchical_step(self.env, self.llc, self.action, self.obs, *self.step_args)

    def _capture(self) -> HighLevelStep:
        """Warm up, put the env back where it was (warm-up steps are not part of any episode), capture."""
        saved_state = self.env.state_dict()
        side_stream = torch.cuda.Stream(self.env.device)
        side_stream.wait_stream(torch.cuda.current_stream(self.env.device))
        with torch.cuda.stream(side_stream):
            for _ in range(self.WARMUP_CALLS):
                self._eager()
        torch.cuda.current_stream(self.env.device).wait_stream(side_stream)
        self.env.load_state_dict(saved_state)
        self.graph.register_generator_state(self.env.generator)
        with torch.cuda.graph(self.graph, capture_error_mode="global"):  # the mode physics_mjwarp tells Warp
            result = self._eager()
        return result

    def __call__(self, high_action, obs) -> HighLevelStep:
        self.action.copy_(high_action)
        self.obs.copy_(obs)
        self.graph.replay()
        return self.result


def make_high_level_step(env, llc, llc_steps: int, task_obs_size: int, style_weight: float, action_size: int,
                         cuda_graph: bool):
    """The trainer's high-level step, (high_action, obs) -> HighLevelStep: a captured CUDA graph or eager."""
    if cuda_graph:
        return CapturedHierarchicalStep(env, llc, llc_steps, task_obs_size, style_weight, action_size)
    return lambda high_action, obs: hierarchical_step(env, llc, high_action, obs, llc_steps, task_obs_size, style_weight)


def compile_llc(llc):
    """torch.compile the frozen LLC's action (its forward pass at every inner step); static shapes: one
    compilation for the run's number of envs."""
    llc.act = torch.compile(llc.act, dynamic=False)
    return llc


# ---------------------------------------------------------------------------------------------
# Networks: ASE's high-level actor-critic
# ---------------------------------------------------------------------------------------------
class Agent(nn.Module):
    """Separate actor and critic MLPs (ReLU); actor mean through tanh; Gaussian (not squashed)
    with a fixed (or learned) log-std; observation and value normalisers (rl_games') as buffers."""

    def __init__(self, obs_size: int, action_size: int, hidden_sizes=(1024, 512), init_log_std=-2.3,
                 learned_log_std=False, normalize_obs=True, normalize_value=True):
        super().__init__()
        self.actor_mean = mlp(obs_size, hidden_sizes, action_size, out_std=0.01)
        self.critic = mlp(obs_size, hidden_sizes, 1, out_std=1.0)
        self.actor_logstd = nn.Parameter(torch.full((1, action_size), float(init_log_std)),
                                         requires_grad=learned_log_std)
        self.obs_normalizer = RunningMeanStd((obs_size,))
        self.value_normalizer = RunningMeanStd(())
        self.normalize_obs, self.normalize_value = normalize_obs, normalize_value

    def norm_obs(self, obs):
        return self.obs_normalizer.normalize(obs) if self.normalize_obs else obs

    def get_normalized_value(self, obs):
        return self.critic(self.norm_obs(obs)).squeeze(-1)

    def denormalize_value(self, normalized_value):
        """Critic output -> value in reward units."""
        return self.value_normalizer.denormalize(normalized_value) if self.normalize_value else normalized_value

    def get_value(self, obs):
        return self.denormalize_value(self.get_normalized_value(obs))

    def action_mean(self, obs):
        return torch.tanh(self.actor_mean(self.norm_obs(obs)))

    def get_action_and_value(self, obs, action=None):
        mean = self.action_mean(obs)
        probs = Normal(mean, self.actor_logstd.expand_as(mean).exp())
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.get_normalized_value(obs), mean


def use_fused_adam(args: Args, device: torch.device) -> bool:
    """--fused-adam: `auto` is on with CUDA and off on the CPU (README "Trainer speed")."""
    return device.type == "cuda" if args.fused_adam == "auto" else args.fused_adam == "on"


def set_adam_kernel(optimizer: torch.optim.Optimizer, fused: bool):
    """Fused or torch's default (foreach) Adam; also after optimizer.load_state_dict, which restores the
    kernel a checkpoint was written with."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, False) if fused else (None, None)


def make_optimizer(agent: Agent, args: Args) -> torch.optim.Optimizer:
    """Adam over the policy's trainable parameters only: the LLC is not part of `agent`."""
    params = [p for p in agent.parameters() if p.requires_grad]
    fused = use_fused_adam(args, params[0].device)
    return torch.optim.Adam(params, lr=args.learning_rate, eps=1e-8, fused=True if fused else None)


# ---------------------------------------------------------------------------------------------
# Rollout: num_steps high-level steps of every env into storage allocated once
# ---------------------------------------------------------------------------------------------
class RolloutStorage(NamedTuple):
    """One iteration's transitions, [num_steps, num_envs, ...] on the device, written in place."""

    obs: torch.Tensor  # [T, N, num_obs] high-level observation before the action
    actions: torch.Tensor  # [T, N, action_size] sampled (unclamped) high-level action
    logprobs: torch.Tensor  # [T, N]
    rewards: torch.Tensor  # [T, N] high-level reward (HighLevelStep.reward)
    dones: torch.Tensor  # [T, N] 1.0 where the episode ended in the window
    values: torch.Tensor  # [T, N] V(obs) in reward units
    next_values: torch.Tensor  # [T, N] V(s') * (1 - terminate), see bootstrap_value
    style_rewards: torch.Tensor  # [T, N] mean style reward per window (0 when w = 0)

    @staticmethod
    def allocate(num_steps: int, num_envs: int, obs_size: int, action_size: int, device) -> "RolloutStorage":
        def zeros(*shape):
            return torch.zeros((num_steps, num_envs, *shape), device=device)

        return RolloutStorage(zeros(obs_size), zeros(action_size), *(zeros() for _ in range(6)))


class EpisodeStats:
    """Per-env running task return (summed over control steps) and length, plus on-device sums
    over the episodes finished since the last read: fixed size, read once per iteration."""

    def __init__(self, num_envs: int, device):
        self.running_return = torch.zeros(num_envs, device=device)
        self.running_length = torch.zeros(num_envs, device=device)
        self.finished = torch.zeros(3, device=device)  # sum of returns, sum of lengths, count

    def update(self, step: HighLevelStep):
        self.running_return += step.task_reward_sum
        self.running_length += step.control_steps
        done = step.done.float()
        self.finished += torch.stack([(self.running_return * done).sum(), (self.running_length * done).sum(), done.sum()])
        self.running_return *= 1.0 - done
        self.running_length *= 1.0 - done

    def take(self) -> torch.Tensor:
        """[sum of returns, sum of lengths, count] of the episodes finished since the last call (on device)."""
        finished = self.finished.clone()
        self.finished.zero_()
        return finished

    def state_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in ("running_return", "running_length", "finished")}

    def load_state_dict(self, state: dict):
        for name, value in state.items():
            getattr(self, name).copy_(value)


def bootstrap_value(agent, step: HighLevelStep) -> torch.Tensor:
    """V(s') * (1 - terminate): timeouts bootstrap from the true last state, failures do not."""
    with torch.no_grad():
        return agent.get_value(step.bootstrap_obs) * (~step.terminate)


def rollout(env, llc, agent: Agent, next_obs, storage: RolloutStorage, llc_steps: int, task_obs_size: int,
            style_weight: float, episode_stats: EpisodeStats, high_level_step=None):
    """Fill `storage` with one high-level step per row, starting from next_obs; returns the
    observation to continue from. Everything stays on the device. high_level_step: (action, obs) ->
    HighLevelStep (make_high_level_step: e.g. a captured CUDA graph); None: hierarchical_step, eager."""
    if high_level_step is None:
        high_level_step = make_high_level_step(env, llc, llc_steps, task_obs_size, style_weight, 0, cuda_graph=False)
    for step in range(storage.obs.shape[0]):
        storage.obs[step] = next_obs
        with torch.no_grad():
            action, logprob, _, normalized_value, _ = agent.get_action_and_value(next_obs)
            storage.values[step] = agent.denormalize_value(normalized_value)
        storage.actions[step], storage.logprobs[step] = action, logprob

        result = high_level_step(action, next_obs)
        storage.rewards[step] = result.reward
        if result.style_reward is not None:
            storage.style_rewards[step] = result.style_reward
        storage.dones[step] = result.done.float()
        storage.next_values[step] = bootstrap_value(agent, result)
        episode_stats.update(result)
        next_obs = env.reset_done()["obs"]  # finished envs start a new episode
    return next_obs


# ---------------------------------------------------------------------------------------------
# PPO: GAE with timeout bootstrapping, clipped surrogate, value and bounds losses
# (llc_pretrain.py imports these: one copy of the algorithm)
# ---------------------------------------------------------------------------------------------
def compute_gae(rewards, values, next_values, dones, gamma: float, gae_lambda: float):
    """Advantages and returns, all [T, N].

    next_values[t] = V(s_{t+1}) * (1 - terminate_t), with s_{t+1} the observation at the step the
    episode ended (timeouts bootstrap from the true last state, failures do not); dones[t] cuts
    the advantage recursion at episode boundaries (the next stored step belongs to a new episode).
    """
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        lastgaelam = delta + gamma * gae_lambda * (1.0 - dones[t]) * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


def bounds_loss(mean):
    """ASE/rl_games penalty on action means outside [-1, 1] (zero while the mean is tanh'd)."""
    return (F.relu(mean - 1.0) ** 2 + F.relu(-1.0 - mean) ** 2).sum(-1).mean()


def ppo_loss(newlogprob, entropy, newvalue, mb: dict, args):
    """CleanRL's clipped-surrogate loss on one minibatch; mb holds the rollout's logprobs,
    advantages, returns and values (in the critic's units). Returns (loss, logged terms)."""
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()

    mb_advantages = mb["advantages"]
    if args.norm_adv:
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb["returns"]) ** 2
        v_clipped = mb["values"] + torch.clamp(newvalue - mb["values"], -args.clip_coef, args.clip_coef)
        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - mb["returns"]) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb["returns"]) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    return loss, {"losses/value_loss": v_loss, "losses/policy_loss": pg_loss, "losses/entropy": entropy_loss,
                  "losses/old_approx_kl": old_approx_kl, "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac}


class NonfiniteUpdatesError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


class NonfiniteGuard:
    """Skips an optimiser step whose loss or gradients are not finite, leaving the parameters and the
    optimiser state as they were; counts the skips, and raises NonfiniteUpdatesError after
    `max_in_a_row` skips in a row (training has diverged: the last good checkpoint is kept)."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.in_a_row, self.skipped = max_in_a_row, 0, 0

    def finite(self, loss, params) -> bool:
        norms = [p.grad.norm() for p in params if p.grad is not None]
        finite = bool(torch.isfinite(loss + torch.stack(norms).sum()))  # one host sync per minibatch
        self.in_a_row = 0 if finite else self.in_a_row + 1
        self.skipped += not finite
        if self.in_a_row >= self.max_in_a_row:
            raise NonfiniteUpdatesError(f"{self.in_a_row} optimiser steps in a row had a non-finite loss or gradient")
        return finite


def minibatch_loss(evaluate, mb: dict, args):
    """The policy on one minibatch, the PPO loss and the extra losses: (loss, logged terms)."""
    newlogprob, entropy, newvalue, extra_losses = evaluate(mb)
    loss, terms = ppo_loss(newlogprob, entropy, newvalue, mb, args)
    for name, (coef, extra_loss) in extra_losses.items():
        loss = loss + coef * extra_loss
        terms[f"losses/{name}"] = extra_loss
    return loss, terms


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile(fn) with static shapes, made once per function (compiles at its first call)."""
    return torch.compile(fn, dynamic=False)


def ppo_update(evaluate, batch: dict, optimizer, grad_groups, args, minibatch_size: int, guard=None,
               compile_loss: bool = False) -> dict:
    """PPO epochs over one rollout batch (dict of flattened [B, ...] tensors: the inputs `evaluate`
    needs plus logprobs, advantages, returns, values).

    evaluate(mb) -> (newlogprob, entropy, newvalue, extra_losses): the policy on a minibatch, with
    extra_losses {name: (coefficient, loss)} added to the PPO loss. Gradients are clipped to
    args.max_grad_norm per parameter group of grad_groups (None: no clipping); a NonfiniteGuard skips
    non-finite steps. compile_loss: minibatch_loss through torch.compile (the backward pass then runs
    the compiled graph's backward too); every minibatch has the same size, so it compiles once.
    Returns on-device scalars for logging: the last minibatch's terms, the clip fraction over all
    minibatches and the number of skipped steps."""
    loss_fn = compiled(minibatch_loss) if compile_loss else minibatch_loss
    batch_size = batch["logprobs"].shape[0]
    clipfracs, skipped_before = [], guard.skipped if guard else 0
    for epoch in range(args.update_epochs):
        b_inds = torch.randperm(batch_size, device=batch["logprobs"].device)
        for start in range(0, batch_size, minibatch_size):
            mb_inds = b_inds[start : start + minibatch_size]
            mb = {key: value[mb_inds] for key, value in batch.items()}
            loss, terms = loss_fn(evaluate, mb, args)
            clipfracs.append(terms["losses/clipfrac"])

            optimizer.zero_grad()
            loss.backward()
            distributed.all_reduce_gradients(optimizer)
            if guard is not None and not guard.finite(loss, [p for params in grad_groups for p in params]):
                continue
            if args.max_grad_norm is not None:
                for params in grad_groups:
                    nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()

        if args.target_kl is not None and distributed.mean_over_ranks(terms["losses/approx_kl"]) > args.target_kl:
            break
    terms = {key: value.detach() for key, value in terms.items()}
    terms["losses/clipfrac"] = torch.stack(clipfracs).mean()
    skipped = (guard.skipped if guard else 0) - skipped_before
    terms["losses/nonfinite_updates"] = torch.tensor(float(skipped), device=terms["losses/clipfrac"].device)
    return terms


def explained_variance(values, returns):
    """1 - Var(returns - values) / Var(returns), NaN where the returns do not vary (no host sync)."""
    var_y = returns.var()
    return torch.where(var_y > 0, 1 - (returns - values).var() / var_y, torch.nan)


def update_policy(agent: Agent, optimizer, storage: RolloutStorage, advantages, returns, args: Args,
                  minibatch_size: int, guard: Optional[NonfiniteGuard] = None) -> dict:
    """The trainer's PPO update on one rollout, then the observation normaliser update."""
    b_obs = storage.obs.reshape(-1, storage.obs.shape[-1])
    b_values, b_returns = storage.values.reshape(-1), returns.reshape(-1)
    if agent.normalize_value:  # value targets in normalised units (rl_games' value_mean_std)
        distributed.update_normalizer(agent.value_normalizer, b_returns)
        b_returns_n, b_values_n = agent.value_normalizer.normalize(b_returns), agent.value_normalizer.normalize(b_values)
    else:
        b_returns_n, b_values_n = b_returns, b_values
    batch = {"obs": b_obs, "actions": storage.actions.reshape(-1, storage.actions.shape[-1]),
             "logprobs": storage.logprobs.reshape(-1), "advantages": advantages.reshape(-1),
             "returns": b_returns_n, "values": b_values_n}

    def evaluate(mb):
        _, newlogprob, entropy, newvalue, mean = agent.get_action_and_value(mb["obs"], mb["actions"])
        return newlogprob, entropy, newvalue, {"bounds_loss": (args.bounds_loss_coef, bounds_loss(mean))}

    metrics = ppo_update(evaluate, batch, optimizer, [list(agent.parameters())], args, minibatch_size, guard,
                         compile_loss=args.compile in ("update", "all"))
    metrics["losses/explained_variance"] = explained_variance(b_values, b_returns)
    if agent.normalize_obs:  # after the update, so the stored log-probs matched the normalisation in use
        distributed.update_normalizer(agent.obs_normalizer, b_obs)
    return metrics


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "hrl_ppo_checkpoint", 2


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    py_state = states["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def rollout_state(env, next_obs, episode_stats: EpisodeStats) -> dict:
    """Where the rollout stands: the env's own state (tasks/ envs; Isaac Gym tasks have none to give),
    the observation the next rollout starts from, and the episodes in progress."""
    return {"env": env.state_dict() if hasattr(env, "state_dict") else None, "next_obs": next_obs.clone(),
            "episode_stats": episode_stats.state_dict()}


def save_checkpoint(path: str, agent, optimizer, args: Args, run_name: str, global_step: int, iteration: int,
                    wandb_run_id=None, rollout=None):
    """Atomic, durable write (llc.atomic_save: temp file, fsync, rename) of everything needed to resume;
    plain tensors and plain Python values only, so torch.load(path, weights_only=True) reads it. A
    checkpoint holding NaN or inf, a full disk or an unwritable folder stop the run with the previous
    checkpoint kept (training on without checkpoints would lose what it learns)."""
    checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "agent": agent.state_dict(),
                  "optimizer": optimizer.state_dict(), "args": asdict(args), "run_name": run_name,
                  "global_step": global_step, "iteration": iteration, "rng": rng_states(), "wandb_run_id": wandb_run_id,
                  "rollout": rollout}
    try:
        atomic_save(checkpoint, path)
    except CheckpointWriteError as err:
        fail(f"stopping: {err}")


def upgrade_checkpoint(checkpoint: dict) -> dict:
    """Version 1 named the normaliser buffers mean / var; version 2 uses rl_games' running_mean /
    running_var (the statistics themselves carry over)."""
    if checkpoint.get("version", 1) < 2:
        renames = {".mean": ".running_mean", ".var": ".running_var"}
        checkpoint["agent"] = {next((key[: -len(old)] + new for old, new in renames.items()
                                     if key.endswith(old) and "normalizer" in key), key): value
                               for key, value in checkpoint["agent"].items()}
        checkpoint["version"] = 2
    return checkpoint


CHECKPOINT_ENTRIES = {"agent": dict, "optimizer": dict, "args": dict, "run_name": str, "global_step": int,
                      "iteration": int, "rng": dict}


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this script, read without running pickled code and checked entry by entry."""
    if os.path.isdir(path):
        fail(f"checkpoint {path} is a directory; expected the checkpoint.pt file inside a run folder")
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        checkpoint = read_checkpoint(path)  # torch.load(weights_only=True) with clear errors
    except LLCCheckpointError as err:  # truncated, random bytes, pickled objects
        fail(f"checkpoint {err}")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint written by hrl_ppo_continuous.py (format {CHECKPOINT_FORMAT!r})")
    for key, kind in CHECKPOINT_ENTRIES.items():
        if not isinstance(checkpoint.get(key), kind):
            fail(f"checkpoint {path}: entry {key!r} is {type(checkpoint.get(key)).__name__}, expected {kind.__name__} "
                 "(the file is damaged or was edited)")
    return upgrade_checkpoint(checkpoint)


def args_from_checkpoint(checkpoint: dict, path: str = "", **overrides) -> Args:
    known = {f.name for f in fields(Args)}
    saved = {k: v for k, v in checkpoint["args"].items() if k in known}
    try:
        saved["hidden_sizes"] = tuple(int(size) for size in saved.get("hidden_sizes", (1024, 512)))
        return Args(**{**saved, **overrides})
    except (TypeError, ValueError) as err:
        fail(f"checkpoint {path or checkpoint.get('run_name')}: its saved flags cannot be read ({err})")


def restore_training_state(checkpoint: dict, path: str, agent: Agent, optimizer=None):
    """Policy (and with an optimizer: optimiser and random streams, to train on) from a checkpoint;
    anything that does not fit this run is an error naming the file and the part."""
    parts = [("policy", lambda: agent.load_state_dict(checkpoint["agent"]))]
    if optimizer is not None:
        parts += [("optimiser", lambda: optimizer.load_state_dict(checkpoint["optimizer"])),
                  ("random streams", lambda: set_rng_states(checkpoint["rng"]))]
    for part, restore in parts:
        try:
            restore()
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            fail(f"checkpoint {path}: its {part} does not fit this run: {first_line}")


FIXED_ON_RESUME = ("env_backend", "robot", "robot_xml", "task", "llc_checkpoint", "llc_steps", "num_envs", "num_steps",
                   "hidden_sizes", "learned_log_std")


def parse_args(argv=None) -> Args:
    """tyro flags; with --resume or --eval-checkpoint the saved flags become the defaults, so only
    the flags given now override them."""
    args = tyro.cli(Args, args=argv)
    saved_path = args.resume or args.eval_checkpoint
    if saved_path and not (args.resume and args.eval_checkpoint):
        checkpoint = load_checkpoint(saved_path)
        default = args_from_checkpoint(checkpoint, saved_path, resume=args.resume, eval_checkpoint=args.eval_checkpoint)
        args = tyro.cli(Args, args=argv, default=default)
        for name in FIXED_ON_RESUME if args.resume else ():
            if getattr(args, name) != getattr(default, name):
                fail(f"--resume cannot change --{name.replace('_', '-')} "
                     f"(saved {getattr(default, name)!r}, given {getattr(args, name)!r})")
    check_flags(args)
    return args


# ---------------------------------------------------------------------------------------------
# Evaluation, video, logging
# ---------------------------------------------------------------------------------------------
def record_video(env, llc, agent, derived: Derived, task_obs_size: int, style_weight: float, path: str):
    """One deterministic episode of world 0 as an MP4 (tasks.video, tasks/ backends)."""
    from tasks.video import record_episode

    def decide(recording_env, obs):
        with torch.no_grad():
            action = agent.action_mean(obs)
        return hierarchical_step(recording_env, llc, action, obs, derived.llc_steps, task_obs_size, style_weight).done

    frames = record_episode(env, decide, path, max_decisions=env.max_episode_length // derived.llc_steps + 1)
    print(f"video: {path} ({frames} frames)")


def root_planar_position(env) -> Optional[torch.Tensor]:
    """The root's world-frame x, y [N, 2] (m) of a tasks/ env; None for Isaac Gym tasks."""
    return env.root_states()["pos"][:, :2].clone() if hasattr(env, "root_states") else None


def evaluate(args: Args, derived: Derived, checkpoint: dict):
    """Deterministic policy (action = mean) for --eval-episodes episodes: one episode per env."""
    num_envs = args.eval_episodes
    env = make_env(args, derived, num_envs, seed=args.seed)
    llc = load_frozen_llc(args, derived, env)
    task_obs_size = env.get_task_obs_size()
    style_weight = resolve_style_reward_weight(args, llc, env)
    agent = Agent(env.num_obs, env.num_actions if derived.flat else llc.latent_dim, args.hidden_sizes, args.init_log_std,
                  args.learned_log_std, args.normalize_obs, args.normalize_value).to(derived.device)
    restore_training_state(checkpoint, args.eval_checkpoint, agent)
    episode_return = torch.zeros(num_envs, device=derived.device)
    episode_length = torch.zeros(num_envs, device=derived.device)
    finished = torch.zeros(num_envs, dtype=torch.bool, device=derived.device)
    path_length_m = torch.zeros(num_envs, device=derived.device)  # planar root path of the tasks/ envs
    path_steps = torch.zeros(num_envs, device=derived.device)  # control steps that path took
    root_xy = root_planar_position(env)
    obs = env.reset()["obs"]
    max_high_level_steps = max(1, env.max_episode_length) // derived.llc_steps + 2
    for _ in range(max_high_level_steps):
        with torch.no_grad():
            action = agent.action_mean(obs)
        step = hierarchical_step(env, llc, action, obs, derived.llc_steps, task_obs_size, style_weight)
        episode_return += step.task_reward_sum * ~finished
        episode_length += step.control_steps * ~finished
        if root_xy is not None:  # a world that ended in this step was reset: its last piece of path is left out
            new_xy = root_planar_position(env)
            on_path = ~(finished | step.done)
            path_length_m += (new_xy - root_xy).norm(dim=-1) * on_path
            path_steps += step.control_steps * on_path
        finished |= step.done
        if bool(finished.all()):
            break
        obs = env.reset_done()["obs"]
        root_xy = root_planar_position(env)
    speed = ""
    if root_xy is not None:
        seconds = path_steps.clamp(min=1) * env.control_dt
        speed = f", mean root speed {(path_length_m / seconds).mean().item():.2f} m/s (planar path / time)"
    print(f"eval: {args.eval_checkpoint}: mean return {episode_return.mean().item():.3f} "
          f"(std {episode_return.std(unbiased=False).item():.3f}), mean episode length "
          f"{episode_length.mean().item():.1f} control steps over {num_envs} episodes{speed}")
    if args.capture_video:
        run_name = checkpoint["run_name"]
        record_video(env, llc, agent, derived, task_obs_size, style_weight, os.path.join("videos", run_name, "eval.mp4"))


def progress_line(iteration: int, num_iterations: int, iterations_this_session: int, global_step: int, sps: float,
                  elapsed: float, mean_reward: float, mean_return) -> str:
    width = 20
    filled = int(width * iteration / num_iterations)
    eta = elapsed / iterations_this_session * (num_iterations - iteration)
    ret = "n/a" if mean_return is None else f"{mean_return:.2f}"
    return (f"[{'#' * filled}{'.' * (width - filled)}] iter {iteration}/{num_iterations} step {global_step} "
            f"SPS {sps:.0f} reward {mean_reward:.3f} return {ret} ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def log_iteration(writer, metrics: dict, episode_totals: torch.Tensor, global_step: int):
    """Write the iteration's scalars; everything comes to the host in one transfer. episode_totals:
    EpisodeStats.take() (summed over the ranks). Returns (scalars by name, mean episode return or None)."""
    host_values = torch.cat([torch.stack(list(metrics.values())), episode_totals]).tolist()
    logged, (return_sum, length_sum, episodes) = dict(zip(metrics, host_values)), host_values[-3:]
    for key, value in logged.items():
        writer.add_scalar(key, value, global_step)
    if not episodes:
        return logged, None
    writer.add_scalar("charts/episodic_return", return_sum / episodes, global_step)
    writer.add_scalar("charts/episodic_length", length_sum / episodes, global_step)
    writer.add_scalar("charts/episodes", episodes, global_step)
    return logged, return_sum / episodes


def hyperparameter_table(args: Args) -> str:
    return "|param|value|\n|-|-|\n%s" % "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())


# ---------------------------------------------------------------------------------------------
# Main: set-up, then per iteration: rollout, advantages, update, logging, checkpoint
# ---------------------------------------------------------------------------------------------
class StopRequest:
    """Ctrl-C / SIGTERM: finish the current iteration, write a checkpoint, and exit with 128 + the
    signal's number (130, 143), so that a scheduler tells a stopped run from a finished one (0).
    A second Ctrl-C stops at once, without a new checkpoint: the last one stays intact (writes are
    atomic)."""

    def __init__(self, checkpoint_path: str):
        self.checkpoint_path, self.signum = checkpoint_path, None
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            print(f"\nsecond interrupt: stopping now without a new checkpoint; {self.checkpoint_path} is intact",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\nsignal {signum}: stopping after this iteration and writing a checkpoint", flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def follow(self, any_rank_stops: bool):
        """Under torchrun, a rank not signalled itself stops with the others (as after SIGTERM)."""
        if any_rank_stops and self.signum is None:
            self.signum = signal.SIGTERM

    @property
    def exit_code(self) -> int:
        return 0 if self.signum is None else 128 + self.signum


def remove_stale_temp_file(path: str):
    """A run killed while writing leaves `path`.tmp behind: the checkpoint itself is the previous one."""
    if os.path.exists(f"{path}.tmp"):
        os.remove(f"{path}.tmp")
        print(f"note: removed {path}.tmp, left by a run stopped while writing ({path} is the last complete one)")


if __name__ == "__main__":
    args = parse_args()
    derived = derive(args)
    require_llc_file(derived)  # fail before the simulator is built

    seed = distributed.seed(args.seed)  # args.seed + rank under torchrun
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = derived.device
    flush_denormals_on_cpu(device)
    if device.type == "cpu" and args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    if args.eval_checkpoint:
        if distributed.is_main():  # under torchrun, rank 0 evaluates and the others exit
            evaluate(args, derived, load_checkpoint(args.eval_checkpoint))
        sys.exit(0)
    distributed.setup(device, args.dist_timeout)  # only under torchrun: one process group, this rank's device

    resume_checkpoint = load_checkpoint(args.resume) if args.resume else None
    if resume_checkpoint is not None:
        run_name = resume_checkpoint["run_name"]
    else:
        run_name = f"{args.robot}-{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = distributed.broadcast_object(run_name)  # rank 0's clock
    # env, frozen LLC, policy
    env = make_env(args, derived, derived.num_envs, seed=seed)
    llc = load_frozen_llc(args, derived, env)
    task_obs_size = env.get_task_obs_size()
    style_weight = resolve_style_reward_weight(args, llc, env)
    action_size = env.num_actions if derived.flat else llc.latent_dim  # high-level action = latent z
    agent = Agent(env.num_obs, action_size, args.hidden_sizes, args.init_log_std, args.learned_log_std,
                  args.normalize_obs, args.normalize_value).to(device)
    optimizer = make_optimizer(agent, args)
    global_step, start_iteration, wandb_run_id = 0, 1, None
    if resume_checkpoint is not None:
        restore_training_state(resume_checkpoint, args.resume, agent, optimizer)
        set_adam_kernel(optimizer, use_fused_adam(args, device))  # this run's --fused-adam, not the checkpoint's
        global_step, start_iteration = resume_checkpoint["global_step"], resume_checkpoint["iteration"] + 1
        wandb_run_id = resume_checkpoint.get("wandb_run_id")
        distributed.reseed_other_ranks(args.seed, start_iteration)  # the saved streams are rank 0's
        if global_step != (start_iteration - 1) * derived.sim_steps_per_iteration:
            fail(f"--resume {args.resume}: {global_step} simulator steps in {start_iteration - 1} iterations does not "
                 f"match {derived.sim_steps_per_iteration} per iteration: resume with as many processes as wrote it")
        print(f"resumed {run_name} at global step {global_step} (iteration {start_iteration - 1})")
    distributed.broadcast_from_main(agent)  # identical initial weights on every rank

    run_dir = os.path.join("runs", run_name)
    if distributed.is_main():
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as err:  # runs/ is a file, a read-only file system, no permission
            fail(f"cannot create the run folder {run_dir}: {err.strerror or err}")
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    remove_stale_temp_file(checkpoint_path)

    # logging: the flags with their defaults resolved, so a resumed run has the same schedule
    run_flags = resolved_flags(args, derived, style_weight)
    if args.track and distributed.is_main():
        import wandb

        # W&B keeps its files in ./wandb (its default, as CleanRL): inside runs/ TensorBoard would read them, and
        # sync_tensorboard would copy its own copies of the event files back into itself
        run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                         config=vars(run_flags), name=run_name, save_code=True, id=wandb_run_id,
                         resume="allow" if wandb_run_id else None)
        wandb_run_id = run.id
    # on resume, TensorBoard drops what a killed run logged after its last checkpoint (no duplicate steps)
    writer = distributed.summary_writer(run_dir, purge_step=global_step + 1 if resume_checkpoint is not None else None)
    if resume_checkpoint is None:
        writer.add_text("hyperparameters", hyperparameter_table(run_flags))
    print(f"{run_name}: {env.num_envs} envs on {device}, simulator {env.describe_backend()}, k = {derived.llc_steps}, "
          f"{'flat PPO' if derived.flat else f'LLC {derived.llc_path}'}, style weight {style_weight}, "
          f"{derived.num_iterations} iterations x {derived.sim_steps_per_iteration} simulator steps"
          + (f", task {args.task} {env.task_params}" if getattr(env, "task_params", None) else "")
          + f"; compile {args.compile}, {'fused' if use_fused_adam(args, device) else 'default'} Adam"
          + (", CUDA graph per high-level step" if derived.cuda_graph else ""))
    planned_steps = derived.num_iterations * derived.sim_steps_per_iteration
    if args.total_timesteps is not None and planned_steps != derived.total_timesteps:  # the default budget needs no note
        print(f"note: --total-timesteps {derived.total_timesteps} is not a whole number of iterations of "
              f"{derived.sim_steps_per_iteration} simulator steps (envs x --num-steps x k): "
              f"running {planned_steps} simulator steps")

    storage = RolloutStorage.allocate(args.num_steps, env.num_envs, env.num_obs, action_size, device)
    if llc is not None and args.compile in ("llc", "all"):
        compile_llc(llc)
    if hasattr(env, "compile_step") and args.compile in ("step", "all"):
        env.compile_step()
    high_level_step = make_high_level_step(env, llc, derived.llc_steps, task_obs_size, style_weight, action_size,
                                           derived.cuda_graph)
    episode_stats = EpisodeStats(env.num_envs, device)
    guard = NonfiniteGuard(args.max_nonfinite_updates)
    stop = StopRequest(checkpoint_path)
    start_time = time.time()
    start_global_step = global_step
    saved_rollout = resume_checkpoint.get("rollout") if resume_checkpoint is not None else None
    if saved_rollout is not None and saved_rollout["env"] is not None:  # continue the same episodes
        env.load_state_dict(saved_rollout["env"])
        episode_stats.load_state_dict(saved_rollout["episode_stats"])
        next_obs = saved_rollout["next_obs"].to(device)
    else:
        next_obs = env.reset()["obs"]
    iteration = start_iteration - 1
    for iteration in range(start_iteration, derived.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / derived.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate
        iteration_start = time.time()
        next_obs = rollout(env, llc, agent, next_obs, storage, derived.llc_steps, task_obs_size, style_weight,
                           episode_stats, high_level_step)
        global_step += derived.sim_steps_per_iteration
        rollout_time = time.time() - iteration_start

        advantages, returns = compute_gae(storage.rewards, storage.values, storage.next_values, storage.dones,
                                          args.gamma, args.gae_lambda)
        try:
            metrics = update_policy(agent, optimizer, storage, advantages, returns, args, derived.minibatch_size, guard)
        except NonfiniteUpdatesError as err:
            fail(f"{err}: training diverged (a smaller --learning-rate may help); stopping without writing, "
                 f"the last checkpoint {checkpoint_path} is kept")

        metrics["charts/mean_reward"] = storage.rewards.mean()
        if style_weight > 0.0:
            metrics["charts/style_reward"] = storage.style_rewards.mean()
        if hasattr(env, "nonfinite_resets"):
            metrics["charts/nonfinite_resets"] = env.nonfinite_resets.to(device=device, dtype=torch.float32)
        episode_totals, means, any_rank_stops = distributed.reduce_iteration(  # sums and means over ranks
            episode_stats.take(), torch.stack(list(metrics.values())), stop.requested)
        stop.follow(any_rank_stops)
        logged, mean_return = log_iteration(writer, dict(zip(metrics, means)), episode_totals, global_step)
        elapsed = time.time() - start_time
        sps = (global_step - start_global_step) / elapsed
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/high_level_SPS", sps / derived.llc_steps, global_step)
        writer.add_scalar("charts/rollout_SPS", derived.sim_steps_per_iteration / rollout_time, global_step)
        print(progress_line(iteration, derived.num_iterations, iteration - start_iteration + 1, global_step, sps, elapsed,
                            logged["charts/mean_reward"], mean_return), flush=True)

        save_now = iteration % args.checkpoint_interval == 0 or iteration == derived.num_iterations or stop.requested
        if save_now and distributed.is_main():
            save_checkpoint(checkpoint_path, agent, optimizer, run_flags, run_name, global_step, iteration, wandb_run_id,
                            rollout_state(env, next_obs, episode_stats) if distributed.world_size() == 1 else None)
        if stop.requested:
            print(f"stopped: checkpoint {checkpoint_path} (resume with --resume {checkpoint_path})")
            break

    if iteration < start_iteration:  # nothing left to do (resumed a finished run)
        print(f"{run_name} already reached iteration {derived.num_iterations}; raise --total-timesteps to train on")
    print(f"checkpoint: {checkpoint_path}")
    if args.save_model and distributed.is_main():
        model_path = os.path.join(run_dir, f"{args.exp_name}.cleanrl_model")
        torch.save(agent.state_dict(), model_path)
        print(f"model saved to {model_path}")
    if args.capture_video and not stop.requested and distributed.is_main():
        record_video(env, llc, agent, derived, task_obs_size, style_weight, os.path.join("videos", run_name, "final.mp4"))
    writer.close()
    if args.track and distributed.is_main():
        wandb.finish()
    distributed.finish()
    sys.exit(stop.exit_code)
