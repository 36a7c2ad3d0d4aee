"""Pre-train a latent-conditioned low-level controller (LLC) with PPO, and evaluate its skills.

The LLC maps (proprioceptive observation, latent z) to joint actions. Latents are drawn uniformly
on the unit sphere and held for a random 1..149 control steps per world, as in ASE. Without
reference motions there is no motion prior to imitate, so the skill objective is explicit: a
fixed, seeded projection turns z into a planar velocity command (heading frame) and a yaw-rate
command, and the LLC is rewarded for tracking it (see `latent_to_command` and `skill_reward`).
Random latents therefore cover every walking direction, a uniform range of speeds and turning
rates, and a high-level policy can steer the frozen LLC by choosing z.

Train (control steps counted over all worlds):
    python llc_pretrain.py --robot ant --num-envs 128 --total-timesteps 8331264 --checkpoint-path checkpoints/llc_ant.pt
Evaluate the skills of a checkpoint against its robot's bar (64 latents held 5 s each; falls, reach and top
speed per direction; the zero-command latent standing):
    python llc_pretrain.py --evaluate checkpoints/llc_ant.pt
"""

import math
import os
import platform
import random
import signal
import sys
import time



def interrupted_at_start(signum, frame):
    print("\ninterrupted during start-up: nothing was written", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # Ctrl-C while torch and the simulator load: a message, not an import traceback
    signal.signal(signal.SIGINT, interrupted_at_start)
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Literal, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import tyro

import distributed
from hrl_ppo_continuous import (FLAG_RANGES, NonfiniteGuard, NonfiniteUpdatesError, StopRequest, check_ranges,
                                check_robot_xml, compute_gae, explained_variance, flush_denormals_on_cpu,
                                hyperparameter_table, non_negative, positive, ppo_update, remove_stale_temp_file,
                                rng_states, set_rng_states)
from llc import (CheckpointWriteError, LLCCheckpointError, atomic_save, build_llc, load_llc, mlp, portable_command,
                 read_checkpoint, save_llc)
from tasks import ROBOTS, load_robot, make_env
from tasks.base import heading_angle, planar_into_heading, up_axis_z


def default_is(text: str):
    """--help shows `(default: text)` for a flag whose None default is resolved at start-up."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")


@dataclass
class Args:
    """Pre-train a latent-conditioned low-level controller with PPO (or --evaluate one's skills)."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (environment resets, latents, network initialisation)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, run on the GPU when one is available (simulator and networks)"""
    torch_threads: int = 1
    """CPU threads for torch ops (0: torch's default); on a small CPU, more threads contend with the simulator"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "hrl-llc-pretrain"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""

    # Environment
    sim_verbose: bool = False
    """let the simulator print its own messages (MuJoCo Warp's banner and kernel loading)"""
    robot: Annotated[str, tyro.conf.arg(help=f"robot to train, one of {', '.join(ROBOTS)}")] = "ant"
    env_backend: Annotated[Literal["auto", "mjwarp", "mujoco"], tyro.conf.arg(help=(
        "simulator (tasks/): `auto` (`mjwarp` on CUDA, `mujoco` on the CPU), `mjwarp` (MuJoCo Warp) or `mujoco` "
        "(C MuJoCo on the CPU cores)"))] = "auto"
    sim_threads: Optional[int] = None
    """threads of the C MuJoCo simulator (`mujoco` backend; default: all cores)"""
    robot_xml: Optional[str] = None
    """your copy of ASE's amp_humanoid.xml, simulated instead of assets/humanoid.xml (tasks/ase_mjcf.py); humanoid only"""
    total_timesteps: int = 2_000_000
    """total simulator control steps (env.step calls times worlds); rounded down to whole iterations"""
    num_envs: int = 128
    """number of parallel simulated worlds"""
    num_steps: int = 32
    """control steps per world per rollout"""

    # Skill objective: latent -> planar command
    latent_dim: Annotated[Optional[int], default_is("16 for the ant, 64 (as ASE) for the humanoid")] = None
    """latent (z) dimension"""
    latent_hold_min: int = 1
    """shortest time a latent is held, in control steps (inclusive)"""
    latent_hold_max: int = 150
    """longest time a latent is held, in control steps (exclusive), as ASE's U[1, 150)"""
    skill_seed: int = 0
    """seed of the fixed projection from z to the command (stored in the checkpoint)"""
    max_speed: Annotated[Optional[float], default_is("1.0 for the ant, 2.0 for the humanoid")] = None
    """largest commanded planar speed in m/s"""
    max_yaw_rate: float = 1.0
    """largest commanded yaw rate in rad/s (0 disables turning commands)"""
    vel_reward_sigma: float = 0.25
    """tracking reward exp(-|v - v_cmd|^2 / sigma), sigma in (m/s)^2"""
    yaw_reward_sigma: float = 0.25
    """yaw-rate tracking reward exp(-(w - w_cmd)^2 / sigma), sigma in (rad/s)^2"""
    vel_reward_weight: float = 1.0
    """weight of the planar velocity tracking reward"""
    yaw_reward_weight: float = 0.5
    """weight of the yaw-rate tracking reward"""
    upright_reward_weight: float = 0.2
    """weight of the upright reward (z component of the root's up axis, in [-1, 1])"""
    action_rate_penalty: float = 0.05
    """penalty on the mean squared change of the action between control steps"""
    action_penalty: float = 0.01
    """penalty on the mean squared action (energy regulariser)"""

    # Networks
    llc_arch: str = "style_cat"
    """LLC actor architecture for llc.build_llc: style_cat (as ASE) or mlp"""
    llc_hidden: Tuple[int, ...] = (256, 256)
    """LLC actor hidden sizes (ASE humanoid: 1024 1024 512)"""
    llc_style_hidden: Tuple[int, ...] = (256, 128)
    """style_cat only: hidden sizes of the style MLP on z (ASE: 512 256)"""
    llc_style_dim: int = 64
    """style_cat only: size of the tanh style embedding of z (ASE: 64)"""
    llc_activation: str = "relu"
    """LLC actor activation (ASE: relu)"""
    critic_hidden: Tuple[int, ...] = (256, 256)
    """critic hidden sizes; the critic sees the normalised obs, z and the command"""
    init_log_std: float = -1.0
    """initial log standard deviation of the exploration noise"""
    learn_log_std: bool = True
    """if toggled, the log-std is learned (ASE keeps it fixed at -2.9 with a motion prior)"""

    # PPO
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    anneal_lr: bool = False
    """toggle learning rate annealing"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 5
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = False
    """toggles whether or not to use a clipped loss for the value function"""
    ent_coef: float = 0.0
    """coefficient of the entropy"""
    vf_coef: float = 1.0
    """coefficient of the value function"""
    max_grad_norm: float = 1.0
    """the maximum norm for the gradient clipping (actor and critic clipped separately)"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    reward_scale: float = 1.0
    """rewards are multiplied by this before the advantage computation"""
    max_nonfinite_updates: int = 10
    """stop after this many optimiser steps in a row with a non-finite loss or gradient (each one is skipped)"""

    # Checkpoints
    checkpoint_path: Annotated[Optional[str], default_is("runs/{run_name}/llc.pt")] = None
    """where to write the LLC (native format)"""
    save_interval: int = 20
    """write the checkpoint every this many iterations (and at the end)"""
    init_from: Optional[str] = None
    """start a new run from this training state (the `.train.pt` file written next to a checkpoint)"""
    resume: Optional[str] = None
    """continue this run from its training state (`.train.pt`): same flags, run folder, checkpoint and schedule"""
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S
    """under torchrun: seconds a rank waits in a collective for the others before it exits with an error"""

    # Skill evaluation
    evaluate: Optional[str] = None
    """if set, do not train: evaluate the skills of this LLC checkpoint and exit"""
    eval_num_latents: int = 64
    """number of random latents (one world each) in the skill evaluation"""
    eval_seconds: float = 5.0
    """how long each latent is held in the skill evaluation"""
    eval_seed: int = 0
    """seed of the evaluation latents and resets"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


EVAL_DIRECTION_BINS = 8
EVAL_SPEED_WINDOW_S = 1.0  # top speed: root planar speed averaged over this window (s)


def sizes_at_least_one(sizes):
    return all(size >= 1 for size in sizes)


# the trainer's flag ranges where the names agree, plus this script's own
PRETRAIN_FLAG_RANGES = {
    **{name: FLAG_RANGES[name] for name in (
        "num_envs", "sim_threads", "total_timesteps", "num_steps", "num_minibatches", "update_epochs", "torch_threads",
        "gamma", "gae_lambda", "learning_rate", "clip_coef", "max_grad_norm", "target_kl", "vf_coef", "ent_coef",
        "init_log_std", "max_nonfinite_updates")},
    **{name: (lambda v: v >= 1, "an integer >= 1") for name in ("save_interval", "eval_num_latents")},
    "max_grad_norm": (positive, "a finite number > 0"),
    "latent_dim": (lambda v: v >= 3, "an integer >= 3 (the skill mapping uses three coordinates of z)"),
    "llc_hidden": (lambda sizes: len(sizes) > 0 and sizes_at_least_one(sizes), "one or more integers >= 1"),
    "critic_hidden": (lambda sizes: len(sizes) > 0 and sizes_at_least_one(sizes), "one or more integers >= 1"),
    "llc_style_hidden": (sizes_at_least_one, "integers >= 1"), "llc_style_dim": (lambda v: v >= 1, "an integer >= 1"),
    **{name: (positive, "a finite number > 0") for name in (
        "max_speed", "vel_reward_sigma", "yaw_reward_sigma", "eval_seconds", "reward_scale")},
    **{name: (non_negative, "a finite number >= 0") for name in (
        "max_yaw_rate", "vel_reward_weight", "yaw_reward_weight", "upright_reward_weight", "action_rate_penalty",
        "action_penalty")},
}


# ---------------------------------------------------------------------------------------------
# Latents: uniform on the unit sphere, each held for a random number of control steps
# ---------------------------------------------------------------------------------------------
def sample_latents(num: int, latent_dim: int, generator: torch.Generator, device) -> torch.Tensor:
    """Latents uniform on the unit sphere S^(latent_dim - 1): normalised standard normals."""
    z = torch.randn(num, latent_dim, generator=generator, device=device)
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def advance_latents(z, steps_left, force_new, generator, hold_min=1, hold_max=150):
    """One control step has passed: count down, and give a new latent and hold time to the worlds
    whose hold time ran out or that were reset (`force_new`). A latent drawn with hold time D is
    used for exactly D control steps. Tensor ops only: no per-world Python loop, no host sync."""
    steps_left = steps_left - 1
    expired = (steps_left <= 0) | force_new
    new_z = sample_latents(z.shape[0], z.shape[1], generator, z.device)
    new_hold = torch.randint(hold_min, hold_max, steps_left.shape, generator=generator, device=z.device)
    return torch.where(expired[:, None], new_z, z), torch.where(expired, new_hold, steps_left)


# ---------------------------------------------------------------------------------------------
# Skill mapping: z -> (planar velocity in the heading frame, yaw rate)
# ---------------------------------------------------------------------------------------------
def make_skill_projection(latent_dim: int, seed: int) -> torch.Tensor:
    """A fixed random [3, latent_dim] matrix with orthonormal rows (seeded, stored in the checkpoint)."""
    if latent_dim < 3:
        raise ValueError(f"latent_dim={latent_dim}: the skill mapping needs latent_dim >= 3")
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(latent_dim, 3, generator=generator, dtype=torch.float64))
    return q.T.contiguous().float()


def latent_to_command(z, projection, max_speed, max_yaw_rate):
    """Command for unit latents z [N, D]: planar velocity in the heading frame [N, 2] (m/s) and
    yaw rate [N] (rad/s).

    c = projection @ z are three coordinates of z in a fixed random orthonormal 3-frame. For z
    uniform on the sphere, |c_xy|^2 ~ Beta(1, (D-2)/2), whose CDF is 1 - (1 - x)^((D-2)/2), so
    speed = max_speed * CDF(|c_xy|^2) is exactly uniform on [0, max_speed] and the direction of
    c_xy is uniform on the circle. sqrt(D) * c_z is close to a standard normal, so
    erf(c_z * sqrt(D / 2)) is close to uniform on [-1, 1]. Without this rescaling a 64-dim z would
    project to commands near zero (|c|^2 ~ 3/64)."""
    latent_dim = z.shape[-1]
    c = z @ projection.T
    planar_sq = (c[:, :2] ** 2).sum(-1).clamp(max=1.0)
    speed = max_speed * (1.0 - (1.0 - planar_sq) ** ((latent_dim - 2) / 2))
    direction = c[:, :2] / planar_sq.sqrt().clamp_min(1e-8)[:, None]
    vel_cmd_heading = speed[:, None] * direction
    yaw_rate_cmd = max_yaw_rate * torch.erf(c[:, 2] * math.sqrt(latent_dim / 2))
    return vel_cmd_heading, yaw_rate_cmd


def commanded_displacement(vel_cmd_heading, yaw_rate_cmd, seconds):
    """Where a constant command leads in `seconds`, in the initial heading frame [N, 2] (m): the
    heading-frame velocity integrated while the heading turns at the commanded yaw rate,
    integral_0^T R(w t) v dt = [[sin(wT), cos(wT) - 1], [1 - cos(wT), sin(wT)]] v / w."""
    small = yaw_rate_cmd.abs() < 1e-6
    w = torch.where(small, torch.ones_like(yaw_rate_cmd), yaw_rate_cmd)
    along = torch.where(small, torch.full_like(w, seconds), torch.sin(w * seconds) / w)
    across = torch.where(small, torch.zeros_like(w), (1 - torch.cos(w * seconds)) / w)
    vx, vy = vel_cmd_heading[:, 0], vel_cmd_heading[:, 1]
    return torch.stack([along * vx - across * vy, across * vx + along * vy], -1)


def skill_reward(root, prev_root, control_dt, vel_cmd_heading, yaw_rate_cmd, action, prev_action, args):
    """Per-world reward [N] for tracking the latent's command, plus regularisers, and the terms
    for logging. `root` is env.root_states() after the step, `prev_root` the root "pos" and "yaw"
    before it: velocity and yaw rate are means over the control step (displacement / control_dt,
    as the heading task measures velocity), which the PD oscillation within a step does not blur.
    Actions are the clamped ones.

    A motion prior plugs in here: with reference motions, add an AMP discriminator reward
    (ASE: -log(max(1 - sigmoid(D(norm(amp_obs))), 1e-4))) and an encoder reward for recovering z
    from the AMP observations; the tracking terms below would then become optional."""
    yaw = heading_angle(root["quat"])
    vel_heading = planar_into_heading((root["pos"][:, :2] - prev_root["pos"][:, :2]) / control_dt, yaw)
    yaw_change = torch.remainder(yaw - prev_root["yaw"] + math.pi, 2 * math.pi) - math.pi
    vel_error_sq = ((vel_heading - vel_cmd_heading) ** 2).sum(-1)
    yaw_rate_error_sq = (yaw_change / control_dt - yaw_rate_cmd) ** 2
    vel_tracking = torch.exp(-vel_error_sq / args.vel_reward_sigma)
    yaw_tracking = torch.exp(-yaw_rate_error_sq / args.yaw_reward_sigma)
    upright = up_axis_z(root["quat"])
    reward = (
        args.vel_reward_weight * vel_tracking
        + args.yaw_reward_weight * yaw_tracking
        + args.upright_reward_weight * upright
        - args.action_rate_penalty * ((action - prev_action) ** 2).mean(-1)
        - args.action_penalty * (action**2).mean(-1)
    )
    terms = {"vel_tracking": vel_tracking, "yaw_tracking": yaw_tracking,
             "speed_error": vel_error_sq.sqrt(), "yaw_rate_error": yaw_rate_error_sq.sqrt()}
    return reward, terms


# ---------------------------------------------------------------------------------------------
# Metadata written into the checkpoint
# ---------------------------------------------------------------------------------------------
def hardware_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"CPU {cpu} ({os.cpu_count()} cores)"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def env_control_settings(env) -> dict:
    """Control settings of the env, as far as it exposes them: timing, PD target = offset + scale * action
    (rad), and the PD gains of MuJoCo <position> actuators (kp in N m/rad, kv in N m s/rad)."""
    settings = {"control_dt": float(env.control_dt), "max_episode_length": int(env.max_episode_length)}
    if isinstance(getattr(env, "local_root_obs", None), bool):  # ASE's localRootObs (humanoid), checked by the trainer
        settings["local_root_obs"] = env.local_root_obs
    for name in ("physics_dt", "decimation", "pd_offset", "pd_scale"):
        value = getattr(env, name, None)
        if torch.is_tensor(value):
            value = value.detach().cpu().tolist()
        if isinstance(value, (int, float, str, list)):
            settings[name] = value
    mjm = getattr(env, "mjm", None)
    if mjm is not None:
        settings["pd_kp"] = [float(v) for v in mjm.actuator_gainprm[:, 0]]
        settings["pd_kv"] = [float(-v) for v in mjm.actuator_biasprm[:, 2]]
        settings["actuator_force_range"] = [[float(lo), float(hi)] for lo, hi in mjm.actuator_forcerange]
    return settings


# ---------------------------------------------------------------------------------------------
# Skill evaluation
# ---------------------------------------------------------------------------------------------
def direction_bin(vectors, num_bins=EVAL_DIRECTION_BINS):
    """Planar vectors [M, 2] -> direction bin index [M]: bin i is centred on i * 360 / num_bins degrees
    (bin 0 = [-22.5, 22.5) for 8 bins)."""
    bin_width = 360.0 / num_bins
    angle_deg = torch.rad2deg(torch.atan2(vectors[:, 1], vectors[:, 0]))
    return torch.floor((angle_deg + bin_width / 2) / bin_width).long() % num_bins


def max_per_bin(values, bins, num_bins=EVAL_DIRECTION_BINS):
    """Largest value [num_bins] of `values` [M] per bin index `bins` [M]; an empty bin has 0."""
    out = torch.zeros(num_bins, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, bins, values, reduce="amax")


def count_per_bin(mask, bins, num_bins=EVAL_DIRECTION_BINS):
    """How many of `mask` [M] (bool) are true per bin index `bins` [M] -> [num_bins] (long)."""
    counts = torch.zeros(num_bins, dtype=torch.long, device=bins.device)
    return counts.scatter_add_(0, bins, mask.long())


def reach_per_direction_bin(displacement, num_bins=EVAL_DIRECTION_BINS):
    """displacement [M, 2] -> (largest distance [num_bins], count [num_bins]) per direction bin
    (see direction_bin); an empty bin has distance 0."""
    bins = direction_bin(displacement, num_bins)
    everyone = torch.ones_like(bins, dtype=torch.bool)
    return max_per_bin(displacement.norm(dim=-1), bins, num_bins), count_per_bin(everyone, bins, num_bins)


def top_speed(trajectory, control_dt, window_s=EVAL_SPEED_WINDOW_S):
    """trajectory [T + 1, N, 2] (root planar position, m, every control step) -> [N]: the largest planar
    speed averaged over a window of `window_s` (m/s), |p(t) - p(t - window)| / window; with fewer steps
    than a window, over the whole trajectory. The average over a second ignores the sway of a gait."""
    window = max(1, min(int(round(window_s / control_dt)), trajectory.shape[0] - 1))
    speed = (trajectory[window:] - trajectory[:-window]).norm(dim=-1) / (window * control_dt)
    return speed.amax(0)


def skill_bin_statistics(final_displacement, fell, speed, going, num_bins=EVAL_DIRECTION_BINS) -> dict:
    """Per-direction-bin figures of one evaluation, for N latents:
    final_displacement [N, 2]: displacement from the start in the initial heading frame (m), where the
      latent was when it fell, else at the end;
    fell [N] (bool); speed [N]: top speed of each latent (m/s, see top_speed);
    going [N, 2]: the direction each latent was going, which decides the bin its latent and fall count in
      (the commanded displacement where a skill mapping exists, else final_displacement).
    Latent and fall counts are binned by `going`; the reach and top speed of the latents that did not fall
    by where they actually went (final_displacement), which is what the bar asks of each direction."""
    stood = ~fell
    going_bin = direction_bin(going, num_bins)
    latents = count_per_bin(torch.ones_like(fell), going_bin, num_bins)
    falls = count_per_bin(fell, going_bin, num_bins)
    went_bin = direction_bin(final_displacement[stood], num_bins)
    return {"bin_latents": latents.tolist(), "bin_falls": falls.tolist(),
            "bin_fall_rate": (falls.float() / latents.clamp_min(1).float()).tolist(),
            "bin_standing_latents": count_per_bin(stood[stood], went_bin, num_bins).tolist(),
            "bin_reach_m": max_per_bin(final_displacement[stood].norm(dim=-1), went_bin, num_bins).tolist(),
            "bin_top_speed_mps": max_per_bin(speed[stood], went_bin, num_bins).tolist(),
            "top_speed_mps": float(speed[stood].max()) if stood.any() else 0.0}


def zero_command_latent(projection) -> torch.Tensor:
    """A unit latent [latent_dim] in the null space of the skill projection [3, latent_dim]: its three
    coordinates are 0, so latent_to_command gives it zero planar speed and zero yaw rate. The first column
    past the projection's rows of a complete QR of projection^T (deterministic for a given mapping)."""
    if projection.shape[1] <= projection.shape[0]:
        raise ValueError(f"latent_dim={projection.shape[1]}: a zero-command latent needs latent_dim > {projection.shape[0]} "
                         f"(the projection's null space is empty)")
    q, _ = torch.linalg.qr(projection.T.double(), mode="complete")
    return q[:, projection.shape[0]].to(projection.dtype)


def skill_bar(result: dict, robot_module) -> dict:
    """The robot's bar (constants SKILL_BAR_* of its module) and whether `result` passes it."""
    bar = {"max_fall_rate": robot_module.SKILL_BAR_MAX_FALL_RATE, "min_reach_m": robot_module.SKILL_BAR_MIN_REACH_M,
           "zero_command_stands": robot_module.SKILL_BAR_ZERO_COMMAND_STANDS}
    passes = result["fall_rate"] < bar["max_fall_rate"] and min(result["bin_reach_m"]) >= bar["min_reach_m"]
    if bar["zero_command_stands"]:  # no skill mapping, no zero-command latent: the bar cannot be shown met
        passes = passes and result.get("zero_command_fell") is False
    return {"bar": bar, "passes_bar": bool(passes)}


def bar_description(bar: dict) -> str:
    text = f"falls < {100 * bar['max_fall_rate']:.0f}%, >= {bar['min_reach_m']:.1f} m in every bin"
    return text + (", zero command stands" if bar["zero_command_stands"] else "")


def hold_latents(env, llc, z, num_control_steps):
    """Hold latents z [N, D] from reset with the deterministic LLC action. Returns the root planar
    trajectory [T + 1, N, 2] in each world's initial heading frame (m, relative to the start), whether
    each world fell [N], and the control step it first fell at [N] (num_control_steps if it did not).
    A fallen world is not reset (no reset_done), its flags stay set."""
    obs = env.reset()["obs"]
    root = env.root_states()
    start_pos_xy = root["pos"][:, :2].clone()
    start_yaw = heading_angle(root["quat"])
    positions = [root["pos"][:, :2].clone()]
    fell = torch.zeros(env.num_envs, dtype=torch.bool, device=z.device)
    fall_step = torch.full((env.num_envs,), num_control_steps, dtype=torch.long, device=z.device)
    with torch.no_grad():
        for step in range(num_control_steps):
            obs_dict, _, _, extras = env.step(llc.act(obs[:, : llc.obs_dim], z))
            obs = obs_dict["obs"]
            fall_step = torch.where(extras["terminate"] & ~fell, torch.full_like(fall_step, step + 1), fall_step)
            fell |= extras["terminate"]
            positions.append(env.root_states()["pos"][:, :2].clone())
    relative = torch.stack(positions) - start_pos_xy  # [T + 1, N, 2], world frame
    trajectory = planar_into_heading(relative.reshape(-1, 2), start_yaw.repeat(len(positions))).view_as(relative)
    return trajectory, fell, fall_step


def evaluate_skills(checkpoint_path: str, args: Args, device: torch.device) -> dict:
    """Hold each of `eval_num_latents` random latents for `eval_seconds` from reset, one world per
    latent, with the deterministic LLC action, plus one world holding the zero-command latent (when the
    checkpoint has a skill mapping); report the fall rate, per 45-degree direction bin the latents,
    falls, reach and top speed (see skill_bin_statistics), whether the zero command kept the robot
    standing, and the robot's bar (SKILL_BAR_* in its module)."""
    llc = load_llc(checkpoint_path, device=str(device))
    robot = llc.metadata.get("robot", args.robot)
    check_robot_xml(robot, args.robot_xml)
    mapping = llc.metadata.get("skill_mapping")
    # one more world holds the latent that commands standing still (none exists for latent_dim 3)
    zero_world = mapping is not None and llc.latent_dim > len(mapping["projection"])
    num_latents = args.eval_num_latents
    env = make_env(robot=robot, task="none", num_envs=num_latents + zero_world, device=str(device),
                   seed=args.eval_seed, backend=args.env_backend, sim_threads=args.sim_threads,
                   verbose=args.sim_verbose, robot_xml=args.robot_xml)
    print(f"simulator {env.describe_backend()}")
    llc.check_env(env.num_obs, env.get_task_obs_size(), path=checkpoint_path)
    num_control_steps = int(round(args.eval_seconds / env.control_dt))
    if num_control_steps > env.max_episode_length:
        raise ValueError(f"--eval-seconds {args.eval_seconds} is {num_control_steps} control steps, longer than "
                         f"the episode ({env.max_episode_length} steps of {env.control_dt} s)")
    generator = torch.Generator(device=device).manual_seed(args.eval_seed)
    z = sample_latents(num_latents, llc.latent_dim, generator, device)
    if mapping is not None:
        projection = torch.tensor(mapping["projection"], device=device)
    if zero_world:
        z = torch.cat([z, zero_command_latent(projection)[None]])

    trajectory, fell, fall_step = hold_latents(env, llc, z, num_control_steps)
    world = torch.arange(env.num_envs, device=device)
    final_displacement = trajectory[fall_step, world]  # where it fell, else at the end
    speed = top_speed(trajectory, env.control_dt)
    seconds = num_control_steps * env.control_dt
    result = {"checkpoint": checkpoint_path, "robot": robot, "num_latents": num_latents,
              "seconds": seconds, "control_steps": num_control_steps, "speed_window_s": EVAL_SPEED_WINDOW_S,
              "bin_centers_deg": [i * 360.0 / EVAL_DIRECTION_BINS for i in range(EVAL_DIRECTION_BINS)]}
    going = final_displacement[:num_latents]
    if mapping is not None:
        vel_cmd, yaw_rate_cmd = latent_to_command(z, projection, mapping["max_speed"], mapping["max_yaw_rate"])
        target = commanded_displacement(vel_cmd, yaw_rate_cmd, seconds)[:num_latents]
        going = target
        result.update(command_following(final_displacement[:num_latents], target, fell[:num_latents]))
    if zero_world:
        result.update(zero_command_report(trajectory[:, -1], fell[-1], vel_cmd[-1], yaw_rate_cmd[-1]))
    fell, final_displacement = fell[:num_latents], final_displacement[:num_latents]
    stood = ~fell
    result.update(falls=int(fell.sum()), fall_rate=float(fell.float().mean()),
                  median_distance_m=float(final_displacement[stood].norm(dim=-1).median()) if stood.any() else 0.0)
    result.update(skill_bin_statistics(final_displacement, fell, speed[:num_latents], going))
    result.update(skill_bar(result, load_robot(robot)))
    print_skill_table(result)
    return result


def zero_command_report(trajectory, fell, vel_cmd, yaw_rate_cmd) -> dict:
    """The world that held the zero-command latent: its root trajectory [T + 1, 2] (m, from the start),
    whether it fell, and its command (checked to be zero: planar velocity [2], m/s, and yaw rate, rad/s)."""
    return {"zero_command_fell": bool(fell), "zero_command_max_drift_m": float(trajectory.norm(dim=-1).max()),
            "zero_command_speed_mps": float(vel_cmd.norm()), "zero_command_yaw_rate": float(yaw_rate_cmd)}


def command_following(displacement, target, fell) -> dict:
    """How closely the latents that did not fall followed their commands, and what a perfect command
    follower would reach per bin with these latents (the sample's own limit)."""
    out = {"bin_commanded_reach_m": reach_per_direction_bin(target)[0].tolist()}
    if (~fell).any():
        out["mean_commanded_distance_m"] = float(target[~fell].norm(dim=-1).mean())
        out["mean_displacement_error_m"] = float((displacement[~fell] - target[~fell]).norm(dim=-1).mean())
    return out


def print_skill_table(result: dict):
    print(f"skill evaluation of {result['checkpoint']} (robot {result['robot']}): {result['num_latents']} random "
          f"latents, each held {result['seconds']:.2f} s ({result['control_steps']} control steps) from reset")
    print(f"falls: {result['falls']}/{result['num_latents']} ({100 * result['fall_rate']:.1f}%)")
    commanded = result.get("bin_commanded_reach_m")
    print("direction relative to the initial heading (0 deg = forward, 90 deg = left); latents and falls by the "
          + ("commanded direction" if commanded else "displacement when it fell or at the end")
          + ", the other columns by the displacement of the latents that did not fall")
    print(f"{'bin (deg)':>16} | {'latents':>7} | {'falls':>5} | {'fall rate':>9} | {'standing':>8} | "
          f"{'max displacement (m)':>20} | {'top speed (m/s)':>15}" + (f" | {'commanded max (m)':>17}" if commanded else ""))
    half = 180.0 / EVAL_DIRECTION_BINS
    for i, center in enumerate(result["bin_centers_deg"]):
        print(f"{f'[{center - half:6.1f}, {center + half:6.1f})':>16} | {result['bin_latents'][i]:>7d} | "
              f"{result['bin_falls'][i]:>5d} | {100 * result['bin_fall_rate'][i]:>8.1f}% | "
              f"{result['bin_standing_latents'][i]:>8d} | {result['bin_reach_m'][i]:>20.2f} | "
              f"{result['bin_top_speed_mps'][i]:>15.2f}" + (f" | {commanded[i]:>17.2f}" if commanded else ""))
    print(f"top speed: {result['top_speed_mps']:.2f} m/s, the largest root planar speed averaged over "
          f"{result['speed_window_s']:.1f} s among the latents that did not fall")
    print(f"median distance of the latents that did not fall: {result['median_distance_m']:.2f} m")
    if commanded:
        print("commanded max: the largest commanded displacement (constant command integrated over the time) "
              "per bin, what a perfect command follower would reach")
    if "mean_commanded_distance_m" in result:
        print(f"command following (those latents): mean |displacement - commanded displacement| "
              f"{result['mean_displacement_error_m']:.2f} m, "
              f"mean commanded distance {result['mean_commanded_distance_m']:.2f} m")
    if "zero_command_fell" in result:
        print(f"zero command (|v| {result['zero_command_speed_mps']:.1e} m/s, yaw rate "
              f"{result['zero_command_yaw_rate']:.1e} rad/s) held {result['seconds']:.2f} s: "
              f"{'FELL' if result['zero_command_fell'] else 'stood'}, "
              f"max root drift {result['zero_command_max_drift_m']:.2f} m")
    else:
        print("zero command: not checked (no skill mapping, or latent_dim 3 whose projection has no null space)")
    print(f"bar ({bar_description(result['bar'])}): {'PASS' if result['passes_bar'] else 'FAIL'}")


# ---------------------------------------------------------------------------------------------
# Training: skill command, rollout, advantages, PPO update (the trainer's), logging
# ---------------------------------------------------------------------------------------------
class Skill(NamedTuple):
    """The fixed mapping from latents to commands (see latent_to_command)."""

    projection: torch.Tensor  # [3, latent_dim]
    max_speed: float  # m/s
    max_yaw_rate: float  # rad/s

    def command(self, z):
        """[N, 3]: planar velocity command in the heading frame (m/s) and yaw-rate command (rad/s)."""
        vel_cmd, yaw_rate_cmd = latent_to_command(z, self.projection, self.max_speed, self.max_yaw_rate)
        return torch.cat([vel_cmd, yaw_rate_cmd[:, None]], -1)


class SkillRolloutStorage(NamedTuple):
    """One iteration's transitions, [num_steps, num_envs, ...] on the device, written in place."""

    norm_obs: torch.Tensor  # [T, N, llc_obs_dim] the LLC's normalised observation
    z: torch.Tensor  # [T, N, latent_dim] unit latent
    command: torch.Tensor  # [T, N, 3] the latent's command (critic input)
    actions: torch.Tensor  # [T, N, action_dim] sampled (unclamped) joint action
    logprobs: torch.Tensor  # [T, N]
    rewards: torch.Tensor  # [T, N] skill reward x reward_scale
    dones: torch.Tensor  # [T, N] 1.0 where the episode ended after the step
    values: torch.Tensor  # [T, N] V(obs, z, command)
    timeout_values: torch.Tensor  # [T, N] V(s') at a timeout (bootstraps), 0 at a fall or mid-episode

    @staticmethod
    def allocate(num_steps, num_envs, obs_dim, latent_dim, action_dim, device) -> "SkillRolloutStorage":
        def zeros(*shape):
            return torch.zeros((num_steps, num_envs, *shape), device=device)

        return SkillRolloutStorage(zeros(obs_dim), zeros(latent_dim), zeros(3), zeros(action_dim),
                                   *(zeros() for _ in range(5)))


@dataclass
class WorldState:
    """What carries over between control steps and iterations, per world."""

    obs: torch.Tensor  # [N, num_obs]
    z: torch.Tensor  # [N, latent_dim]
    latent_steps_left: torch.Tensor  # [N] control steps the latent is still held
    prev_action: torch.Tensor  # [N, action_dim] clamped action of the previous step (0 after a reset)
    episode_return: torch.Tensor  # [N]
    episode_length: torch.Tensor  # [N]


def critic_value(critic, norm_obs, z, command):
    return critic(torch.cat([norm_obs, z, command], -1)).squeeze(-1)


def rollout(env, model, critic, log_std, world: WorldState, storage: SkillRolloutStorage, skill: Skill,
            latent_generator, stats, args: Args):
    """Fill `storage` with num_steps control steps of every world, updating `world` and the on-device
    `stats` [8]: return sum, length sum, episodes, falls, vel/yaw tracking, speed/yaw errors."""
    llc_obs_dim = storage.norm_obs.shape[-1]
    for step in range(storage.norm_obs.shape[0]):
        llc_obs = world.obs[:, :llc_obs_dim]
        distributed.update_normalizer(model.obs_normalizer, llc_obs)  # all ranks' worlds under torchrun
        with torch.no_grad():
            norm_obs = model.normalize_obs(llc_obs)
            command = skill.command(world.z)
            storage.values[step] = critic_value(critic, norm_obs, world.z, command)
            mean = model.mean_action(norm_obs, world.z)
            action = mean + log_std.exp() * torch.randn_like(mean)
            storage.logprobs[step] = torch.distributions.Normal(mean, log_std.exp()).log_prob(action).sum(-1)
        storage.norm_obs[step], storage.z[step], storage.command[step] = norm_obs, world.z, command
        storage.actions[step] = action

        root = env.root_states()
        prev_root = {"pos": root["pos"].clone(), "yaw": heading_angle(root["quat"])}
        obs_dict, _, done, extras = env.step(action)
        applied_action = action.clamp(-1.0, 1.0)
        reward, terms = skill_reward(env.root_states(), prev_root, env.control_dt, command[:, :2], command[:, 2],
                                     applied_action, world.prev_action, args)
        reward = torch.where(extras["nonfinite"], torch.zeros_like(reward), reward)
        # timeouts bootstrap from the true last state (still in obs_dict before reset_done); falls do not
        time_out = extras["time_outs"] & ~extras["terminate"]
        with torch.no_grad():
            terminal_norm_obs = model.normalize_obs(obs_dict["obs"][:, :llc_obs_dim])
            storage.timeout_values[step] = critic_value(critic, terminal_norm_obs, world.z, command) * time_out
        storage.rewards[step] = args.reward_scale * reward
        storage.dones[step] = done.float()

        world.episode_return += reward
        world.episode_length += 1
        stats += torch.stack([
            (world.episode_return * done).sum(), (world.episode_length * done).sum(), done.sum(),
            extras["terminate"].sum(), terms["vel_tracking"].mean(), terms["yaw_tracking"].mean(),
            terms["speed_error"].mean(), terms["yaw_rate_error"].mean()])
        world.episode_return *= ~done
        world.episode_length *= ~done
        world.prev_action = torch.where(done[:, None], torch.zeros_like(applied_action), applied_action)

        world.obs = env.reset_done()["obs"]
        world.z, world.latent_steps_left = advance_latents(world.z, world.latent_steps_left, done, latent_generator,
                                                           args.latent_hold_min, args.latent_hold_max)


def next_state_values(storage: SkillRolloutStorage, last_value):
    """V(s_{t+1}) for GAE: the next stored value mid-episode (last_value after the last step), the
    timeout value where an episode ended (0 after a fall)."""
    following = torch.cat([storage.values[1:], last_value[None]])
    return torch.where(storage.dones.bool(), storage.timeout_values, following)


def update_skills(model, critic, log_std, optimizer, actor_params, storage: SkillRolloutStorage, advantages, returns,
                  args: Args, guard=None) -> dict:
    """The trainer's PPO update on the LLC (actor) and the critic; actor and critic gradients are
    clipped separately, so that the value loss (unnormalised returns) cannot shrink the policy step."""
    def flat(x):
        return x.reshape(-1, *x.shape[2:])

    batch = {"norm_obs": flat(storage.norm_obs), "z": flat(storage.z), "command": flat(storage.command),
             "actions": flat(storage.actions), "logprobs": flat(storage.logprobs), "advantages": flat(advantages),
             "returns": flat(returns), "values": flat(storage.values)}

    def evaluate(mb):
        mean = model.mean_action(mb["norm_obs"], mb["z"])
        dist = torch.distributions.Normal(mean, log_std.exp().expand_as(mean))
        newlogprob, entropy = dist.log_prob(mb["actions"]).sum(-1), dist.entropy().sum(-1)
        return newlogprob, entropy, critic_value(critic, mb["norm_obs"], mb["z"], mb["command"]), {}

    metrics = ppo_update(evaluate, batch, optimizer, [actor_params, list(critic.parameters())], args,
                         args.minibatch_size, guard)
    metrics["losses/explained_variance"] = explained_variance(batch["values"], batch["returns"])
    return metrics


def log_iteration(writer, metrics: dict, stats, log_std, optimizer, global_step: int, sps: int, args: Args) -> dict:
    """Write the iteration's scalars (one host transfer); returns the episode and skill figures."""
    host = torch.cat([stats, torch.stack(list(metrics.values())), log_std.detach().exp().mean()[None]]).tolist()
    ret_sum, len_sum, episodes, falls = host[:4]
    vel_tracking, yaw_tracking, speed_error, yaw_rate_error = [s / args.num_steps for s in host[4:8]]
    logged = dict(zip(metrics, host[8:-1]))
    action_std = host[-1]
    if episodes > 0:
        writer.add_scalar("charts/episodic_return", ret_sum / episodes, global_step)
        writer.add_scalar("charts/episodic_length", len_sum / episodes, global_step)
    scalars = {"charts/fall_rate": falls / max(episodes, 1), "charts/learning_rate": optimizer.param_groups[0]["lr"],
               "charts/SPS": sps, "charts/action_std": action_std, "skill/vel_tracking": vel_tracking,
               "skill/yaw_tracking": yaw_tracking, "skill/speed_error": speed_error,
               "skill/yaw_rate_error": yaw_rate_error, **logged}
    for key, value in scalars.items():
        writer.add_scalar(key, value, global_step)
    episode_text = f"ep_return {ret_sum / episodes:7.2f} ep_len {len_sum / episodes:6.1f}" if episodes > 0 \
        else "no episode ended"
    return {"episodes": episode_text, "falls": int(falls), "vel_tracking": vel_tracking, "speed_error": speed_error,
            "yaw_rate_error": yaw_rate_error, "action_std": action_std}


TRAIN_STATE_KEYS = ("model", "critic", "log_std", "optimizer", "global_step", "wall_time_s")
RESUME_KEYS = ("args", "run_name", "iteration", "checkpoint_path", "rng", "latent_rng")


def read_train_state(path: str, flag: str, skill_settings: Optional[dict] = None) -> dict:
    """The training state to continue from (--init-from or --resume), checked before anything is
    built: a readable torch file with the training entries, trained with the same skill settings
    (the latents must mean the same)."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a directory; expected the .train.pt file written next to a checkpoint")
    try:
        state = read_checkpoint(path)
    except LLCCheckpointError as err:
        raise SystemExit(f"error: {flag} {err}")
    if not isinstance(state, dict):
        raise SystemExit(f"error: {flag} {path} is not a training state of llc_pretrain.py (not a dict)")
    if skill_settings is not None and state.get("skill_settings", skill_settings) != skill_settings:
        raise SystemExit(f"error: {flag} {path} was trained with skill settings {state['skill_settings']}, this run "
                         f"has {skill_settings}: pass the same --latent-dim/--skill-seed/--max-speed/--max-yaw-rate")
    missing = [key for key in TRAIN_STATE_KEYS + (RESUME_KEYS if flag == "--resume" else ()) if key not in state]
    if missing:
        raise SystemExit(f"error: {flag} {path} is not a training state of llc_pretrain.py (missing {missing})"
                         + ("; a state from an older version continues with --init-from" if flag == "--resume" else ""))
    return state


def parse_args() -> Args:
    """tyro flags; with --resume the saved flags become the defaults, so only flags given now override them."""
    args = tyro.cli(Args)
    if args.resume is not None:
        if args.init_from is not None:
            raise SystemExit("error: --resume and --init-from exclude each other (continue this run, or start a new one)")
        saved = read_train_state(args.resume, "--resume")["args"]
        known = {f.name for f in fields(Args)}
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
        args = tyro.cli(Args, default=Args(**{**saved, "resume": args.resume}))
    check_ranges(args, PRETRAIN_FLAG_RANGES)
    return args


if __name__ == "__main__":
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if distributed.launched_by_torchrun() and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    flush_denormals_on_cpu(device)
    if args.evaluate is not None:
        try:
            evaluate_skills(args.evaluate, args, device)
        except LLCCheckpointError as err:
            raise SystemExit(f"error: --evaluate {err}")
        sys.exit(0)

    # every check before anything is built or written
    if args.robot not in ROBOTS:
        raise SystemExit(f"error: --robot {args.robot!r} is not one of {ROBOTS}")
    check_robot_xml(args.robot, args.robot_xml)
    robot_module = load_robot(args.robot)  # per-robot defaults: LLC_LATENT_DIM, LLC_MAX_SPEED
    latent_dim = args.latent_dim if args.latent_dim is not None else robot_module.LLC_LATENT_DIM
    max_speed = args.max_speed if args.max_speed is not None else robot_module.LLC_MAX_SPEED
    if not 1 <= args.latent_hold_min < args.latent_hold_max:
        raise SystemExit(f"error: latent hold range [{args.latent_hold_min}, {args.latent_hold_max}) must satisfy "
                         "1 <= min < max")
    skill_settings = {"latent_dim": latent_dim, "skill_seed": args.skill_seed, "max_speed": max_speed,
                      "max_yaw_rate": args.max_yaw_rate}
    continue_from, flag = (args.resume, "--resume") if args.resume is not None else (args.init_from, "--init-from")
    init_state = read_train_state(continue_from, flag, skill_settings) if continue_from is not None else None
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    if args.batch_size % args.num_minibatches or args.minibatch_size < 2:
        raise SystemExit(f"error: --num-envs x --num-steps = {args.batch_size} must split into --num-minibatches "
                         f"{args.num_minibatches} equal minibatches of at least 2 transitions")
    distributed.setup(device, args.dist_timeout)  # only under torchrun: one process group, this rank's device
    steps_per_iteration = args.num_envs * args.num_steps * distributed.world_size()  # num_envs is per rank
    args.num_iterations = max(1, args.total_timesteps // steps_per_iteration)
    resuming = args.resume is not None
    run_name = init_state["run_name"] if resuming else distributed.broadcast_object(
        f"{args.robot}__{args.exp_name}__{args.seed}__{int(time.time())}")
    checkpoint_path = init_state["checkpoint_path"] if resuming else args.checkpoint_path or f"runs/{run_name}/llc.pt"
    train_state_path = os.path.splitext(checkpoint_path)[0] + ".train.pt"
    for path in (checkpoint_path, train_state_path):
        remove_stale_temp_file(path)
    if args.track and distributed.is_main():
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True, id=init_state.get("wandb_run_id") if resuming else None,
                   resume="allow" if resuming else None)
    # on resume, TensorBoard drops what a stopped run logged after its last checkpoint (no duplicate steps)
    writer = distributed.summary_writer(f"runs/{run_name}",  # rank 0 only
                                        purge_step=int(init_state["global_step"]) + 1 if resuming else None)
    if not resuming:
        writer.add_text("hyperparameters", hyperparameter_table(args))

    # seeding
    seed = distributed.seed(args.seed)  # args.seed + rank under torchrun
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    latent_generator = torch.Generator(device=device).manual_seed(seed)

    # env setup: task "none", the LLC sees the observation without a task part
    env = make_env(robot=args.robot, task="none", num_envs=args.num_envs, device=str(device), seed=seed,
                   backend=args.env_backend, sim_threads=args.sim_threads, verbose=args.sim_verbose, robot_xml=args.robot_xml)
    print(f"{run_name}: {args.num_envs} envs on {device}, simulator {env.describe_backend()}")
    llc_obs_dim = env.num_obs - env.get_task_obs_size()
    action_dim = env.num_actions
    skill = Skill(make_skill_projection(latent_dim, args.skill_seed).to(device), max_speed, args.max_yaw_rate)
    print(f"{run_name}: {args.robot}, {args.num_envs} envs on {device}, latent {latent_dim}, "
          f"{args.num_iterations} iterations x {steps_per_iteration} control steps -> {checkpoint_path}")
    if args.num_iterations * steps_per_iteration != args.total_timesteps:
        print(f"note: --total-timesteps {args.total_timesteps} is not a whole number of iterations of {steps_per_iteration} "
              f"control steps (--num-envs x --num-steps x processes): running {args.num_iterations * steps_per_iteration}")

    # actor (the LLC), critic, exploration noise
    model = build_llc(llc_obs_dim, latent_dim, action_dim, arch=args.llc_arch, hidden=tuple(args.llc_hidden),
                      activation=args.llc_activation, style_hidden=tuple(args.llc_style_hidden),
                      style_dim=args.llc_style_dim).to(device)
    critic = mlp(llc_obs_dim + latent_dim + 3, tuple(args.critic_hidden), 1, activation="elu", out_std=1.0).to(device)
    log_std = nn.Parameter(torch.full((action_dim,), args.init_log_std, device=device), requires_grad=args.learn_log_std)
    actor_params = [p for p in model.parameters() if p.requires_grad] + ([log_std] if args.learn_log_std else [])
    optimizer = torch.optim.Adam(actor_params + list(critic.parameters()), lr=args.learning_rate, eps=1e-5)
    steps_done_before, wall_time_before = 0, 0.0
    if init_state is not None:
        model.load_state_dict(init_state["model"])
        critic.load_state_dict(init_state["critic"])
        log_std.data.copy_(init_state["log_std"])
        optimizer.load_state_dict(init_state["optimizer"])
        steps_done_before, wall_time_before = int(init_state["global_step"]), float(init_state["wall_time_s"])
    distributed.broadcast_from_main(model, critic, log_std)  # identical initial weights on every rank

    metadata = {
        "robot": args.robot, "robot_xml": args.robot_xml, **env_control_settings(env),
        "command": portable_command(sys.argv), "seed": args.seed,
        "latent_dim": latent_dim, "llc_arch": args.llc_arch, "llc_hidden": list(args.llc_hidden),
        "skill_mapping": {
            "type": "planar_velocity_heading_frame+yaw_rate", "projection": skill.projection.cpu().tolist(),
            "skill_seed": args.skill_seed, "max_speed": max_speed, "max_yaw_rate": args.max_yaw_rate,
            "formula": "c = projection @ z; speed = max_speed * (1 - (1 - |c[:2]|^2)^((D-2)/2)); "
                       "vel_cmd_heading = speed * c[:2] / |c[:2]|; yaw_rate_cmd = max_yaw_rate * erf(c[2] * sqrt(D/2))",
        },
        "latent_hold_steps": [args.latent_hold_min, args.latent_hold_max],
        "continued_from": continue_from, "hardware": hardware_description(device),
    }

    def save_checkpoint(global_step: int, iteration: int, wall_time_s: float):
        wall_time_s = wall_time_before + wall_time_s  # includes the runs this one continues
        try:  # a full disk, an unwritable folder or NaN in the networks stop the run; the previous files are kept
            save_llc(checkpoint_path, model, {**metadata, "total_timesteps": global_step,
                                              "wall_time_s": round(wall_time_s, 1)})
            # the PPO state (critic, noise, optimiser) to continue training with --resume / --init-from
            atomic_save({"model": model.state_dict(), "critic": critic.state_dict(), "log_std": log_std.detach(),
                        "optimizer": optimizer.state_dict(), "global_step": global_step, "wall_time_s": wall_time_s,
                        "skill_settings": skill_settings, "args": asdict(args), "run_name": run_name, "iteration": iteration,
                        "checkpoint_path": checkpoint_path, "rng": rng_states(), "latent_rng": latent_generator.get_state(),
                        "wandb_run_id": wandb.run.id if args.track else None}, train_state_path)
        except CheckpointWriteError as err:
            raise SystemExit(f"error: stopping: {err}")

    storage = SkillRolloutStorage.allocate(args.num_steps, args.num_envs, llc_obs_dim, latent_dim, action_dim, device)
    stats = torch.zeros(8, device=device)  # return sum, length sum, episodes, falls, vel/yaw tracking, speed/yaw errors
    guard = NonfiniteGuard(args.max_nonfinite_updates)
    global_step = steps_done_before
    start_time = time.time()
    obs = env.reset()["obs"]
    z = sample_latents(args.num_envs, latent_dim, latent_generator, device)
    world = WorldState(obs, z, torch.randint(args.latent_hold_min, args.latent_hold_max, (args.num_envs,),
                                             generator=latent_generator, device=device),
                       torch.zeros(args.num_envs, action_dim, device=device),
                       torch.zeros(args.num_envs, device=device), torch.zeros(args.num_envs, device=device))

    start_iteration = init_state["iteration"] + 1 if resuming else 1
    if resuming:  # the random streams continue; the worlds restart from a reset (their state is not saved)
        set_rng_states(init_state["rng"])
        latent_generator.set_state(init_state["latent_rng"])
        distributed.reseed_other_ranks(args.seed, start_iteration)  # the saved streams are rank 0's
        print(f"resumed {run_name} at control step {global_step} (iteration {start_iteration - 1})")
    stop = StopRequest(train_state_path)
    iteration = start_iteration - 1
    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate
        stats.zero_()
        rollout(env, model, critic, log_std, world, storage, skill, latent_generator, stats, args)
        global_step += steps_per_iteration

        with torch.no_grad():  # GAE; the last step bootstraps from the value of the state it left
            last_value = critic_value(critic, model.normalize_obs(world.obs[:, :llc_obs_dim]), world.z,
                                      skill.command(world.z))
            advantages, returns = compute_gae(storage.rewards, storage.values, next_state_values(storage, last_value),
                                              storage.dones, args.gamma, args.gae_lambda)
        try:
            metrics = update_skills(model, critic, log_std, optimizer, actor_params, storage, advantages, returns, args,
                                    guard)
        except NonfiniteUpdatesError as err:
            raise SystemExit(f"error: {err}: training diverged (a smaller --learning-rate may help); stopping without "
                             f"writing, the last checkpoint {checkpoint_path} is kept")
        totals, means, any_rank_stops = distributed.reduce_iteration(  # sums and means over ranks
            stats[:4], torch.cat([stats[4:], torch.stack(list(metrics.values()))]), stop.requested)
        stats, metrics = torch.cat([totals, means[:4]]), dict(zip(metrics, means[4:]))
        stop.follow(any_rank_stops)

        elapsed = time.time() - start_time
        sps = int((global_step - steps_done_before) / elapsed)
        shown = log_iteration(writer, metrics, stats, log_std, optimizer, global_step, sps, args)
        eta_s = elapsed / (iteration - start_iteration + 1) * (args.num_iterations - iteration)
        print(f"iter {iteration}/{args.num_iterations} step {global_step} SPS {sps} | {shown['episodes']} "
              f"falls {shown['falls']} | vel_track {shown['vel_tracking']:.3f} speed_err {shown['speed_error']:.3f} m/s "
              f"yaw_err {shown['yaw_rate_error']:.3f} rad/s | std {shown['action_std']:.3f} | "
              f"ETA {int(eta_s // 60)}m{int(eta_s % 60):02d}s", flush=True)

        if (iteration % args.save_interval == 0 or iteration == args.num_iterations or stop.requested) \
                and distributed.is_main():
            save_checkpoint(global_step, iteration, time.time() - start_time)
        if stop.requested:
            print(f"stopped: {checkpoint_path} (resume with --resume {train_state_path})")
            break

    print(f"wrote {checkpoint_path} ({global_step} control steps, {time.time() - start_time:.0f} s)")
    writer.close()
    distributed.finish()
    sys.exit(stop.exit_code)
