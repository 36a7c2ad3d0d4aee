"""Ant: torso sphere on four two-link legs, 8 PD-controlled hinge joints (assets/ant.xml).

Control: physics step 0.01 s (MJCF), DECIMATION = 3 physics steps per control step, so
control_dt = 0.03 s (33.3 Hz, close to ASE's 30 Hz). Why 0.01 s: under random full-range PD targets
(30 s, C MuJoCo) the worst foot penetration is 4 cm at 0.01 s, 11 cm at 0.02 s and 19 cm at 0.03 s.
Action a in [-1, 1] per joint -> PD target = midpoint of the joint limits + 0.7 * (hi - lo) * a (ASE's hinge rule); the MJCF
<position> actuators (kp 100 N m/rad, kv 2 N m s/rad, torque limit 50 N m) apply the PD torque.

Observation (NUM_ROBOT_OBS = 29), all heading-local (world rotated by minus the root's yaw):
    [0]      root height (m)
    [1:7]    root rotation as tan-norm: root x axis (3) and z axis (3) in the heading frame
    [7:10]   root linear velocity in the heading frame (m/s)
    [10:13]  root angular velocity in the heading frame (rad/s)
    [13:21]  joint positions (rad), actuator order hip_1, ankle_1, ..., hip_4, ankle_4
    [21:29]  joint velocities (rad/s), same order
Episode: 15 s = 500 control steps. Falls: torso up axis z < 0.2 (tilted past ~78 deg) or root
height < 0.28 m (torso radius 0.25 m: lying on the floor).
Reset: standing pose (joints at the limits' midpoints, root 0.55 m high, dropped onto the legs),
uniform random heading, joint angles + U[-0.1, 0.1) rad, all velocities U[-0.1, 0.1).
"""

import math
import os

import torch

from tasks.base import ase_pd_action_map, heading_rotate_inverse, quat_rotate, tan_norm_heading

NAME = "ant"
# llc_pretrain.py's defaults for this robot: latent size (as ASE for the humanoid) and the
# largest commanded speed in m/s (covers the heading task's target speeds U[0.4, 0.8))
LLC_LATENT_DIM = 16
LLC_MAX_SPEED = 1.0
# the skill bar of `llc_pretrain.py --evaluate`: 64 random latents held 5 s from reset fall less often
# than this, and the farthest standing latent in every 45-degree direction bin gets at least this far
# (1.5 m is 0.3 m/s held for 5 s, well inside LLC_MAX_SPEED); the zero-command latent is reported
# but standing still is not part of the ant's bar (four legs do not fall while idle)
SKILL_BAR_MAX_FALL_RATE = 0.10
SKILL_BAR_MIN_REACH_M = 1.5
SKILL_BAR_ZERO_COMMAND_STANDS = False
MJCF_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "ant.xml")
DECIMATION = 3
EPISODE_LENGTH_S = 15.0
NUM_ROBOT_OBS = 29
NEEDS_FORWARD_AFTER_RESET = False  # obs and fall test read qpos / qvel only
# 9 geoms, floor contacts only: a capsule-plane pair makes at most 2 contacts, the sphere 1 -> 17.
MAX_CONTACTS_PER_WORLD = 24
TASK_PARAMS = {
    "heading": {"speed_range": (0.4, 0.8)},
    "location": {"target_range": 5.0, "target_speed": 0.6},
}

ROOT_RESET_HEIGHT = 0.55  # m
JOINT_NOISE = 0.1  # rad
VEL_NOISE = 0.1  # m/s and rad/s
FALL_UP_Z = 0.2
FALL_HEIGHT = 0.28  # m

pd_action_map = ase_pd_action_map


def compute_obs(sim):
    qpos, qvel = sim.qpos, sim.qvel
    root_quat = qpos[:, 3:7]
    root_ang_vel_world = quat_rotate(root_quat, qvel[:, 3:6])  # free joint: angular velocity is body-local
    return torch.cat([
        qpos[:, 2:3],
        tan_norm_heading(root_quat),
        heading_rotate_inverse(root_quat, qvel[:, 0:3]),
        heading_rotate_inverse(root_quat, root_ang_vel_world),
        qpos[:, 7:15],
        qvel[:, 6:14],
    ], dim=-1)


def fallen(sim):
    root_quat = sim.qpos[:, 3:7]
    w, x, y = root_quat[:, 0], root_quat[:, 1], root_quat[:, 2]
    up_z = 1.0 - 2.0 * (x * x + y * y)  # z component of the torso's z axis
    return (up_z < FALL_UP_Z) | (sim.qpos[:, 2] < FALL_HEIGHT)


ANKLE_STANDING = math.radians(50.0)
# midpoints of the joint limits: hips 0, ankles +-50 deg (order hip_1, ankle_1, ..., hip_4, ankle_4)
STANDING_JOINT_POS = torch.tensor([0.0, ANKLE_STANDING, 0.0, -ANKLE_STANDING,
                                   0.0, -ANKLE_STANDING, 0.0, ANKLE_STANDING])


def reset_state(sim, reset_mask, generator):
    n, dev = sim.qpos.shape[0], sim.qpos.device
    yaw = (torch.rand(n, device=dev, generator=generator) * 2.0 - 1.0) * math.pi
    joint_noise = (torch.rand(n, 8, device=dev, generator=generator) * 2.0 - 1.0) * JOINT_NOISE
    vel_noise = (torch.rand(n, 14, device=dev, generator=generator) * 2.0 - 1.0) * VEL_NOISE
    qpos = torch.zeros_like(sim.qpos)
    qpos[:, 2] = ROOT_RESET_HEIGHT
    qpos[:, 3] = torch.cos(yaw / 2)
    qpos[:, 6] = torch.sin(yaw / 2)
    qpos[:, 7:15] = STANDING_JOINT_POS.to(dev, non_blocking=True) + joint_noise
    mask = reset_mask[:, None]
    sim.qpos.copy_(torch.where(mask, qpos, sim.qpos))
    sim.qvel.copy_(torch.where(mask, vel_noise, sim.qvel))
