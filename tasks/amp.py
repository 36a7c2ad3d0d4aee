"""ASE's AMP observation of the humanoid, the history of frames a discriminator reads, and the rotation
conventions both use.

One AMP frame (125 numbers, ASE's `build_amp_observations` for amp_humanoid), in this order:
    [0]         root height (m)
    [1:7]       root rotation as tan-norm (its x and z axes): heading-local when local_root_obs is
                True (ASE's humanoid_ase*.yaml), world otherwise
    [7:10]      root linear velocity at the root body's centre of mass, heading frame (m/s)
    [10:13]     root angular velocity, heading frame (rad/s)
    [13:85]     DoF observation, 6 per joint (12 joints): a 3-DoF joint's three hinge angles read as an
                exponential map -> quaternion -> tan-norm; a 1-DoF joint's angle -> quaternion about
                y -> tan-norm
    [85:113]    DoF velocities (rad/s), DOF_NAMES order
    [113:125]   key-body positions minus the root position, heading frame (m): right_hand,
                left_hand, right_foot, left_foot
The heading frame is the world rotated by the inverse of the root's yaw. `amp_frame` computes a frame
from plain tensors; `amp_observation` feeds it the simulator state and tasks/motion.py feeds it a
motion clip's frames, so the env and a clip's discriminator data come from the same code.

History: [N, NUM_AMP_OBS_STEPS, NUM_AMP_OBS_PER_STEP], newest frame first (frame i = i control steps
ago); ASE's discriminator reads it flattened, [N, 1250]. After a reset every frame is the current one.

Quaternions are (w, x, y, z), MuJoCo's order (ASE and Isaac Gym use x, y, z, w).
"""

import torch

from tasks.base import heading_angle
from tasks.humanoid import BODY_NAMES, DOF_NAMES, JOINTS, _axes, _to_heading_frame, body_com_velocities

KEY_BODY_NAMES = ("right_hand", "left_hand", "right_foot", "left_foot")
KEY_BODY_IDS = tuple(BODY_NAMES.index(name) for name in KEY_BODY_NAMES)  # 0..14, robot body order
NUM_AMP_OBS_STEPS = 10  # ASE's numAMPObsSteps
NUM_AMP_OBS_PER_STEP = 1 + 6 + 3 + 3 + 6 * len(JOINTS) + len(DOF_NAMES) + 3 * len(KEY_BODY_NAMES)  # 125
SMALL_ANGLE = 1e-5  # rad, below this an exponential map is the identity rotation


# ---------------------------------------------------------------- rotations over [..., 4] (w, x, y, z)
def quat_mul(a, b):
    """Hamilton product a * b (rotate by b, then by a), [..., 4]."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def quat_conjugate(q):
    """Inverse of unit quaternions q [..., 4]."""
    return torch.cat([q[..., :1], -q[..., 1:]], dim=-1)


def exp_map_to_quat(exp_map):
    """Exponential map (rotation axis * angle, rad) [..., 3] -> unit quaternion [..., 4]."""
    angle = exp_map.norm(dim=-1, keepdim=True)
    safe_angle = torch.where(angle > SMALL_ANGLE, angle, torch.ones_like(angle))
    sin_half_over_angle = torch.where(angle > SMALL_ANGLE, torch.sin(0.5 * angle) / safe_angle, 0.5)
    return torch.cat([torch.cos(0.5 * angle), exp_map * sin_half_over_angle], dim=-1)


def quat_to_exp_map(q):
    """Unit quaternion [..., 4] -> exponential map [..., 3] of the shortest rotation (angle <= pi rad),
    as ASE's quat_to_exp_map (angle normalised to [-pi, pi])."""
    q = torch.where(q[..., :1] < 0, -q, q)
    sin_half = q[..., 1:].norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(sin_half, q[..., :1])
    safe_sin_half = torch.where(sin_half > 1e-12, sin_half, torch.ones_like(sin_half))
    return q[..., 1:] * torch.where(sin_half > 1e-12, angle / safe_sin_half, 2.0)


def quat_to_tan_norm(q):
    """Rotation [..., 4] as tan-norm [..., 6]: the rotated x axis, then the rotated z axis."""
    return torch.cat([_axes(q, 0), _axes(q, 2)], dim=-1)


# ---------------------------------------------------------------- one AMP frame
def _joint_exp_map_columns():
    """[12, 3] column indices into the DoF angles padded with one zero column (index 28): a 3-DoF
    joint's hinges x, y, z; a 1-DoF joint's angle in the y slot (a rotation about y)."""
    zero, columns, start = len(DOF_NAMES), [], 0
    for _, size in JOINTS:
        columns.append([start, start + 1, start + 2] if size == 3 else [zero, start, zero])
        start += size
    return torch.tensor(columns)


_JOINT_EXP_MAP_COLUMNS = _joint_exp_map_columns()
_KEY_BODY_COLUMNS = torch.tensor(KEY_BODY_IDS)
_INDEX_ON_DEVICE = {}  # (name, device) -> index tensor: no host-to-device copy per step (and none in a CUDA graph)


def _index_on(device, name):
    key = (name, str(device))
    if key not in _INDEX_ON_DEVICE:
        _INDEX_ON_DEVICE[key] = globals()[name].to(device)
    return _INDEX_ON_DEVICE[key]


def dof_to_obs(dof_pos):
    """ASE's DoF observation: hinge angles [N, 28] (rad) -> per joint tan-norm [N, 72]."""
    padded = torch.cat([dof_pos, torch.zeros_like(dof_pos[:, :1])], dim=-1)
    exp_maps = padded[:, _index_on(dof_pos.device, "_JOINT_EXP_MAP_COLUMNS")]  # [N, 12, 3]
    return quat_to_tan_norm(exp_map_to_quat(exp_maps)).reshape(dof_pos.shape[0], -1)


def amp_frame(root_pos, root_quat, root_lin_vel, root_ang_vel, dof_pos, dof_vel, key_body_pos, local_root_obs):
    """One AMP frame per row, [N, 125] float32 (layout in the module docstring).

    root_pos [N, 3] (m) and root_quat [N, 4] (w, x, y, z): the root body's pose, world frame.
    root_lin_vel [N, 3] (m/s, at the root body's centre of mass), root_ang_vel [N, 3] (rad/s): world frame.
    dof_pos [N, 28] (rad), dof_vel [N, 28] (rad/s): DOF_NAMES order.
    key_body_pos [N, 4, 3] (m): KEY_BODY_NAMES origins, world frame.
    local_root_obs: root rotation heading-local (True) or world (False).
    """
    yaw = heading_angle(root_quat)
    root_axes = torch.stack([_axes(root_quat, 0), _axes(root_quat, 2)], dim=1)  # [N, 2, 3] world
    if local_root_obs:
        root_axes = _to_heading_frame(yaw, root_axes)
    key_body_heading = _to_heading_frame(yaw, key_body_pos - root_pos[:, None])
    n = root_pos.shape[0]
    return torch.cat([
        root_pos[:, 2:3],
        root_axes.reshape(n, 6),
        _to_heading_frame(yaw, root_lin_vel),
        _to_heading_frame(yaw, root_ang_vel),
        dof_to_obs(dof_pos),
        dof_vel,
        key_body_heading.reshape(n, -1),
    ], dim=-1).to(torch.float32)


def amp_observation(sim, local_root_obs):
    """The current AMP frame of every world, [N, 125], from the simulator views the humanoid reads:
    root and key-body poses from xpos / xquat, root velocities from `body_com_velocities`, DoF angles
    and velocities from qpos / qvel."""
    lin_vel, ang_vel = body_com_velocities(sim)
    key_body_pos = sim.xpos[:, 1:][:, _index_on(sim.xpos.device, "_KEY_BODY_COLUMNS")]
    return amp_frame(sim.xpos[:, 1], sim.xquat[:, 1], lin_vel[:, 0], ang_vel[:, 0],
                     sim.qpos[:, 7:], sim.qvel[:, 6:], key_body_pos, local_root_obs)


# ---------------------------------------------------------------- history of frames
def make_amp_history(num_envs, device):
    """Zeroed AMP history [N, NUM_AMP_OBS_STEPS, NUM_AMP_OBS_PER_STEP] float32."""
    return torch.zeros(num_envs, NUM_AMP_OBS_STEPS, NUM_AMP_OBS_PER_STEP, dtype=torch.float32, device=device)


def push_amp_frame(history, frame):
    """In place: every frame one step older (the oldest dropped), `frame` [N, 125] becomes frame 0."""
    history[:, 1:] = history[:, :-1].clone()
    history[:, 0] = frame


def fill_amp_history(history, frame, reset_mask):
    """In place: in the worlds where reset_mask [N] is True every frame becomes `frame` [N, 125], as ASE
    fills the history after a reset; the other worlds are left untouched (no host sync)."""
    history.copy_(torch.where(reset_mask[:, None, None], frame[:, None].to(history.dtype), history))
