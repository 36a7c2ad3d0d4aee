"""Location: reach a target point on the ground.

Task obs (2): target minus root position in the root's heading frame (xy, m).
Target = root position (xy) + U[-target_range, target_range)^2, resampled every
U[resample_interval_s) seconds and at reset (tensor ops only). Defaults are ASE's humanoid values
(range 10 m, approach speed 1 m/s); robots scale them in TASK_PARAMS (the ant: 5 m, 0.6 m/s).

Reward per control step (ASE compute_location_reward), v = mean horizontal root velocity over the
control step (displacement / control_dt), d = target - root (xy), u = d / |d|:
    pos  = exp(-0.5 * |d|^2)
    vel  = exp(-4 * max(target_speed - v . u, 0)^2), 0 if v . u <= 0
    face = max(0, heading direction . u)
    inside 0.7 m (|d|^2 < 0.5): vel = face = 1
    r = 0.5 * pos + 0.4 * vel + 0.1 * face
"""

import torch

from tasks.base import expired_timers, heading_angle, heading_rotate_inverse, sample_timers

NAME = "location"
TASK_OBS_SIZE = 2
DEFAULT_PARAMS = {"target_range": 10.0, "target_speed": 1.0, "resample_interval_s": (100 / 30, 200 / 30)}


def make_state(num_envs, device, params, control_dt):
    return {
        "target_pos": torch.zeros(num_envs, 2, device=device),  # world xy, m
        "timer": torch.zeros(num_envs, dtype=torch.int64, device=device),  # control steps to resample
        "target_range": float(params["target_range"]),
        "target_speed": float(params["target_speed"]),
        "interval_steps": tuple(max(1, round(s / control_dt)) for s in params["resample_interval_s"]),
    }


def reset(state, root, reset_mask, generator):
    n, dev = reset_mask.shape[0], reset_mask.device
    offset = (torch.rand(n, 2, device=dev, generator=generator) * 2.0 - 1.0) * state["target_range"]
    new_target = root["pos"][:, :2] + offset
    new_timer = sample_timers(n, state["interval_steps"], dev, generator)
    state["target_pos"].copy_(torch.where(reset_mask[:, None], new_target, state["target_pos"]))
    state["timer"].copy_(torch.where(reset_mask, new_timer, state["timer"]))


def update(state, root, generator):
    reset(state, root, expired_timers(state["timer"]), generator)


def observe(state, root):
    delta = torch.nn.functional.pad(state["target_pos"] - root["pos"][:, :2], (0, 1))
    return heading_rotate_inverse(root["quat"], delta)[:, :2]


def reward(state, root):
    delta_xy = state["target_pos"] - root["pos"][:, :2]
    dist_sq = (delta_xy ** 2).sum(-1)
    pos_reward = torch.exp(-0.5 * dist_sq)
    target_dir = delta_xy / torch.clamp_min(dist_sq.sqrt(), 1e-6)[:, None]
    vel_xy = (root["pos"][:, :2] - root["prev_pos"][:, :2]) / root["control_dt"]
    v_toward = (vel_xy * target_dir).sum(-1)
    vel_err = torch.clamp_min(state["target_speed"] - v_toward, 0.0)
    vel_reward = torch.where(v_toward > 0, torch.exp(-4.0 * vel_err ** 2), torch.zeros_like(v_toward))
    yaw = heading_angle(root["quat"])
    face_reward = torch.clamp_min(torch.cos(yaw) * target_dir[:, 0] + torch.sin(yaw) * target_dir[:, 1], 0.0)
    inside = dist_sq < 0.5
    vel_reward = torch.where(inside, torch.ones_like(vel_reward), vel_reward)
    face_reward = torch.where(inside, torch.ones_like(face_reward), face_reward)
    return 0.5 * pos_reward + 0.4 * vel_reward + 0.1 * face_reward
