"""Heading (ASE "steering"): move in a target direction at a target speed while facing a target direction.

Task obs (5), heading frame of the root: target direction (2), target speed (1, m/s),
target facing direction (2). Directions are uniform angles; speed ~ U[speed_range); both are
resampled every U[resample_interval_s) seconds (ASE: 100-200 steps at 30 Hz), per world, with
tensor ops only. Defaults are ASE's humanoid values; robots scale them in TASK_PARAMS
(the ant uses speed U[0.4, 0.8) m/s).

Reward per control step (ASE compute_heading_reward), with v the root's mean horizontal velocity
over the control step (displacement / control_dt):
    v_par = v . target_dir, v_perp = |v - v_par * target_dir|
    dir  = exp(-0.25 * ((speed - v_par)^2 + 0.1 * v_perp^2)), 0 if v_par <= 0
    face = max(0, root x axis (horizontal part) . target_facing)
    r = 0.7 * dir + 0.3 * face
"""

import math

import torch

from tasks.base import expired_timers, heading_rotate_inverse, quat_rotate, sample_timers

NAME = "heading"
TASK_OBS_SIZE = 5
DEFAULT_PARAMS = {"speed_range": (1.5, 1.6), "resample_interval_s": (100 / 30, 200 / 30)}


def make_state(num_envs, device, params, control_dt):
    return {
        "target_dir": torch.zeros(num_envs, 2, device=device),  # world xy, unit
        "target_speed": torch.zeros(num_envs, device=device),  # m/s
        "target_facing": torch.zeros(num_envs, 2, device=device),  # world xy, unit
        "timer": torch.zeros(num_envs, dtype=torch.int64, device=device),  # control steps to resample
        "speed_range": params["speed_range"],
        "interval_steps": tuple(max(1, round(s / control_dt)) for s in params["resample_interval_s"]),
    }


def _random_unit_xy(n, device, generator):
    angle = torch.rand(n, device=device, generator=generator) * 2.0 * math.pi
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def reset(state, root, reset_mask, generator):
    n, dev = reset_mask.shape[0], reset_mask.device
    lo, hi = state["speed_range"]
    new_dir = _random_unit_xy(n, dev, generator)
    new_speed = lo + (hi - lo) * torch.rand(n, device=dev, generator=generator)
    new_facing = _random_unit_xy(n, dev, generator)
    new_timer = sample_timers(n, state["interval_steps"], dev, generator)
    mask = reset_mask[:, None]
    state["target_dir"].copy_(torch.where(mask, new_dir, state["target_dir"]))
    state["target_speed"].copy_(torch.where(reset_mask, new_speed, state["target_speed"]))
    state["target_facing"].copy_(torch.where(mask, new_facing, state["target_facing"]))
    state["timer"].copy_(torch.where(reset_mask, new_timer, state["timer"]))


def update(state, root, generator):
    reset(state, root, expired_timers(state["timer"]), generator)


def observe(state, root):
    def to_heading(xy):
        return heading_rotate_inverse(root["quat"], torch.nn.functional.pad(xy, (0, 1)))[:, :2]

    return torch.cat([to_heading(state["target_dir"]), state["target_speed"][:, None],
                      to_heading(state["target_facing"])], dim=-1)


def reward(state, root):
    vel_xy = (root["pos"][:, :2] - root["prev_pos"][:, :2]) / root["control_dt"]
    target_dir = state["target_dir"]
    v_par = (vel_xy * target_dir).sum(-1)
    v_perp_sq = ((vel_xy - v_par[:, None] * target_dir) ** 2).sum(-1)
    dir_reward = torch.exp(-0.25 * ((state["target_speed"] - v_par) ** 2 + 0.1 * v_perp_sq))
    dir_reward = torch.where(v_par > 0, dir_reward, torch.zeros_like(dir_reward))
    x_axis = torch.zeros_like(root["pos"])
    x_axis[:, 0] = 1.0
    facing_xy = quat_rotate(root["quat"], x_axis)[:, :2]
    face_reward = torch.clamp_min((facing_xy * state["target_facing"]).sum(-1), 0.0)
    return 0.7 * dir_reward + 0.3 * face_reward
