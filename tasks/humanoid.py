"""Humanoid robot with the layout of ASE's amp_humanoid: 15 bodies, 28 PD-controlled hinge DoF.

Model: assets/humanoid.xml (about 53 kg, 1.65 m, standing with the pelvis at 0.89 m). Physics at
120 Hz, 4 physics steps per control step (30 Hz control, as ASE: 60 Hz sim x 2 substeps, control
every 2 sim steps), episodes of 300 control steps (10 s). The make_env override robot_xml runs it on
a user's copy of ASE's amp_humanoid.xml instead, converted by `convert_robot_xml` (tasks/ase_mjcf.py);
masses, centres of mass, joint limits, fall-test geoms and the PD map are then that file's
(`ModelConstants`, read from the model the worlds simulate, `sim.mjm`).

Observation (223 numbers, as ASE's humanoid for B = 15 bodies), every vector expressed in the
heading frame (world rotated by the inverse of the root's yaw):
    [0]         root height (m)
    [1:43]      body positions minus root position, root dropped (14 x 3)
    [43:133]    body rotations as tan-norm: the body's x and z axes (15 x 6)
    [133:178]   body linear velocities at each body's centre of mass (15 x 3)
    [178:223]   body angular velocities (15 x 3)
Bodies in BODY_NAMES order. Isaac Gym (PhysX) reports rigid-body linear velocities at the centre
of mass, so this observation does too (see `body_com_velocities`).

The observation and the fall test read body poses, velocities and contact forces from the
kinematics pass of the last physics step, i.e. of the state one physics step (1/120 s) before the
current qpos / qvel; after a reset the env recomputes them (NEEDS_FORWARD_AFTER_RESET).
"""

import functools
import os
import weakref

import mujoco
import numpy as np
import torch

from tasks.base import heading_angle, quat_rotate

NAME = "humanoid"
# llc_pretrain.py's defaults for this robot: latent size (as ASE for the humanoid) and the
# largest commanded speed in m/s (covers the heading task's target speeds U[1.5, 1.6))
LLC_LATENT_DIM = 64
LLC_MAX_SPEED = 2.0
# the skill bar of `llc_pretrain.py --evaluate`: falls under 10%, at least 2.0 m in every 45-degree
# direction bin (0.4 m/s held for 5 s: a walk, a fifth of LLC_MAX_SPEED), and the latent that
# commands zero speed and zero yaw rate keeps the humanoid standing for the whole hold
SKILL_BAR_MAX_FALL_RATE = 0.10
SKILL_BAR_MIN_REACH_M = 2.0
SKILL_BAR_ZERO_COMMAND_STANDS = True
MJCF_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "humanoid.xml")
DECIMATION = 4  # physics steps per control step: 120 Hz physics, 30 Hz control
EPISODE_LENGTH_S = 10.0  # 300 control steps

BODY_NAMES = (
    "pelvis", "torso", "head",
    "right_upper_arm", "right_lower_arm", "right_hand",
    "left_upper_arm", "left_lower_arm", "left_hand",
    "right_thigh", "right_shin", "right_foot",
    "left_thigh", "left_shin", "left_foot",
)
# (joint, number of hinge DoF); the DoF of a 3-DoF joint are hinges about x, y, z in that order
JOINTS = (
    ("abdomen", 3), ("neck", 3),
    ("right_shoulder", 3), ("right_elbow", 1), ("left_shoulder", 3), ("left_elbow", 1),
    ("right_hip", 3), ("right_knee", 1), ("right_ankle", 3),
    ("left_hip", 3), ("left_knee", 1), ("left_ankle", 3),
)
DOF_NAMES = tuple(f"{joint}_{axis}" if size == 3 else joint
                  for joint, size in JOINTS for axis in ("xyz" if size == 3 else "_"))
NUM_BODIES = len(BODY_NAMES)
NUM_QPOS = 7 + len(DOF_NAMES)  # free root joint (position, quaternion) and the hinges
NUM_ROBOT_OBS = 1 + 15 * NUM_BODIES - 3  # 223

# ASE's reset pose and fall test
STANDING_ROOT_HEIGHT = 0.89  # m, pelvis height with straight legs and the soles on the floor
RESET_DOF_POS_NOISE = 0.05  # rad, uniform half-width added to the standing joint angles
RESET_DOF_VEL_NOISE = 0.1  # rad/s, uniform half-width of the initial joint velocities
FOOT_BODIES = ("right_foot", "left_foot")  # contacts of these bodies never end an episode
TERMINATION_HEIGHT = 0.15  # m, a non-foot body origin below this ...
HEAD_TERMINATION_HEIGHT = 0.3  # m (head)
# ... while some non-foot body touches the floor: fallen
LOCAL_ROOT_OBS = False  # True: the root's rotation slot holds the world (not heading-local) root
                        # tan-norm, as ASE's humanoid_ase.yaml (localRootObs: True) does; the default
                        # of compute_obs(sim, local_root_obs=None)

NEEDS_FORWARD_AFTER_RESET = True
MAX_CONTACTS_PER_WORLD = 64  # a humanoid lying on the floor makes about 40

# fall test per body, in BODY_NAMES order
_TERMINATION_HEIGHTS = np.full(NUM_BODIES, TERMINATION_HEIGHT, dtype=np.float32)
_TERMINATION_HEIGHTS[BODY_NAMES.index("head")] = max(HEAD_TERMINATION_HEIGHT, TERMINATION_HEIGHT)
_CAN_FALL = np.array([name not in FOOT_BODIES for name in BODY_NAMES])


# ---------------------------------------------------------------- the model
@functools.cache
def default_model():
    """The default body, assets/humanoid.xml, as an MjModel (loaded once)."""
    return mujoco.MjModel.from_xml_path(MJCF_PATH)


def convert_robot_xml(path):
    """A user's body file for the humanoid (make_env override robot_xml): ASE's amp_humanoid.xml at `path`
    as an MjSpec that simulates it as Isaac Gym did, its layout checked (tasks/ase_mjcf.py, which imports
    this module: hence the import here)."""
    from tasks.ase_mjcf import convert_ase_mjcf

    return convert_ase_mjcf(path)


class ModelConstants:
    """What the humanoid's functions read from the MjModel its worlds simulate (`sim.mjm`): the default
    body or a user's converted file. Numpy arrays, and torch copies of them per device (`on`).

    Model bodies 1..15 are the robot (0 is the world) in BODY_NAMES order and joints 1..28 its hinges in
    DOF_NAMES order (checked for a user's file by tasks/ase_mjcf.py, for the default one in the tests)."""

    def __init__(self, mjm):
        self.body_mass = mjm.body_mass[1:].astype(np.float32)  # kg
        self.body_com_local = mjm.body_ipos[1:].astype(np.float32)  # body frame, m
        self.joint_range = mjm.jnt_range[1:].astype(np.float32)  # hinge limits (rad), in DoF order
        (self.floor_geom_body, self.floor_geom_centre, self.floor_geom_axis, self.floor_geom_half_length,
         self.floor_geom_radius) = _floor_contact_geoms(mjm)
        self.floor_geom_to_body = np.eye(NUM_BODIES, dtype=np.float32)[self.floor_geom_body]  # [num_geoms, 15]
        self.termination_heights, self.can_fall = _TERMINATION_HEIGHTS, _CAN_FALL  # per body, from the names
        # ASE skips the fall test on the first control step after a reset; sim.time is 0 right after a
        # reset and one control step later DECIMATION physics steps have passed
        self.fall_test_start_time = 1.5 * DECIMATION * float(mjm.opt.timestep)  # s
        self._tensors = {}

    def on(self, device, name):
        """Constant `name` as a torch tensor on `device`, cached."""
        key = (name, str(device))
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(getattr(self, name), device=device)
        return self._tensors[key]


_MODEL_CONSTANTS = weakref.WeakKeyDictionary()  # MjModel -> ModelConstants, dropped with the model


def model_constants(mjm):
    """The ModelConstants of `mjm`, built once per model."""
    if mjm not in _MODEL_CONSTANTS:
        _MODEL_CONSTANTS[mjm] = ModelConstants(mjm)
    return _MODEL_CONSTANTS[mjm]


def _constants(sim):
    """The ModelConstants of the model the worlds in `sim` simulate, kept on `sim` after the first call: a plain
    attribute read that torch.compile (the env's compile_step) traces and guards without the weak dictionary,
    whose entries come and go with the models."""
    constants = getattr(sim, "humanoid_constants", None)
    if constants is None:
        constants = sim.humanoid_constants = model_constants(sim.mjm)
    return constants


# ---------------------------------------------------------------- PD control
def pd_action_map(mjm):
    """ASE's action -> PD target map, target = offset + scale * action (rad), per DoF.

    3-DoF joints: offset 0, scale = min(1.2 * max |limit| over the joint's three hinges, pi).
    1-DoF joints: offset = middle of the limits, scale = 0.7 * (hi - lo).
    The target range goes past the joint limits so the PD keeps pushing near a limit.
    """
    joint_ids = mjm.actuator_trnid[:, 0]
    lo, hi = mjm.jnt_range[joint_ids, 0], mjm.jnt_range[joint_ids, 1]
    if len(lo) != sum(size for _, size in JOINTS):
        raise ValueError(f"humanoid PD map expects {sum(s for _, s in JOINTS)} actuators, model has {len(lo)}")
    offset, scale = np.zeros_like(lo), np.zeros_like(lo)
    start = 0
    for _, size in JOINTS:
        dofs = slice(start, start + size)
        if size == 3:
            largest_limit = max(np.abs(lo[dofs]).max(), np.abs(hi[dofs]).max())
            scale[dofs] = min(1.2 * largest_limit, np.pi)
        else:
            offset[dofs] = 0.5 * (lo[dofs] + hi[dofs])
            scale[dofs] = 0.7 * (hi[dofs] - lo[dofs])
        start += size
    return offset, scale


# ---------------------------------------------------------------- observation
def _rotate(quat, vec):
    """quat_rotate over any leading shape: quat [..., 4], vec [..., 3]."""
    shape = vec.shape
    return quat_rotate(quat.reshape(-1, 4), vec.reshape(-1, 3)).reshape(shape)


def _to_heading_frame(yaw, vec):
    """World vectors vec [N, ..., 3] -> heading frame of roots with yaw [N] (rad)."""
    cos = torch.cos(yaw).view(-1, *([1] * (vec.dim() - 2)))
    sin = torch.sin(yaw).view(-1, *([1] * (vec.dim() - 2)))
    x = cos * vec[..., 0] + sin * vec[..., 1]
    y = -sin * vec[..., 0] + cos * vec[..., 1]
    return torch.stack([x, y, vec[..., 2]], dim=-1)


def _axes(quat, axis):
    """The body's `axis` (0: x, 2: z) in world coordinates, quat [N, B, 4]."""
    unit = torch.zeros(quat.shape[:-1] + (3,), dtype=quat.dtype, device=quat.device)
    unit[..., axis] = 1.0
    return _rotate(quat, unit)


def body_com_velocities(sim):
    """World linear velocity of each body's centre of mass and its angular velocity, [N, 15, 3] each.

    MuJoCo's cvel[b] = (angular, linear) velocity of body b in world orientation, the linear part
    taken at the centre of mass c of the robot (subtree_com of the root body), not at the body:
    v(p) = v(c) + w x (p - c). c and the body centres of mass are rebuilt from xpos / xquat and the
    model's masses, exactly as MuJoCo computes xipos and subtree_com.
    """
    dev, constants = sim.xpos.device, _constants(sim)
    body_pos, body_quat = sim.xpos[:, 1:], sim.xquat[:, 1:]
    com_local = constants.on(dev, "body_com_local").expand_as(body_pos)
    body_com = body_pos + _rotate(body_quat, com_local)  # MuJoCo's xipos
    mass = constants.on(dev, "body_mass")
    robot_com = (mass[:, None] * body_com).sum(1) / mass.sum()  # [N, 3], MuJoCo's subtree_com[1]
    ang_vel, lin_vel_at_robot_com = sim.cvel[:, 1:, 0:3], sim.cvel[:, 1:, 3:6]
    lin_vel = lin_vel_at_robot_com + torch.cross(ang_vel, body_com - robot_com[:, None], dim=-1)
    return lin_vel, ang_vel


def compute_obs(sim, local_root_obs=None):
    """ASE's humanoid observation, [N, 223] float32 (layout in the module docstring).

    local_root_obs: ASE's localRootObs, True puts the root's world tan-norm in its rotation slot;
    None takes the module's LOCAL_ROOT_OBS. (In the AMP observation, tasks/amp.py, the same key means
    the opposite: True makes the root rotation heading-local.)"""
    body_pos, body_quat = sim.xpos[:, 1:], sim.xquat[:, 1:]  # world
    root_pos, root_quat = body_pos[:, 0], body_quat[:, 0]
    yaw = heading_angle(root_quat)
    n = body_pos.shape[0]

    root_height = root_pos[:, 2:3]
    body_pos_heading = _to_heading_frame(yaw, body_pos[:, 1:] - root_pos[:, None])
    x_axis_heading = _to_heading_frame(yaw, _axes(body_quat, 0))
    z_axis_heading = _to_heading_frame(yaw, _axes(body_quat, 2))
    body_rot_heading = torch.cat([x_axis_heading, z_axis_heading], dim=-1)  # [N, 15, 6]
    if LOCAL_ROOT_OBS if local_root_obs is None else local_root_obs:
        root_rot_world = torch.cat([_axes(body_quat[:, :1], 0), _axes(body_quat[:, :1], 2)], dim=-1)
        body_rot_heading = torch.cat([root_rot_world, body_rot_heading[:, 1:]], dim=1)
    lin_vel, ang_vel = body_com_velocities(sim)
    return torch.cat([
        root_height,
        body_pos_heading.reshape(n, -1),
        body_rot_heading.reshape(n, -1),
        _to_heading_frame(yaw, lin_vel).reshape(n, -1),
        _to_heading_frame(yaw, ang_vel).reshape(n, -1),
    ], dim=-1).to(torch.float32)


# ---------------------------------------------------------------- termination
def _floor_contact_geoms(mjm):
    """Capsule and sphere geoms of the non-foot bodies: body index (0..14), centre and axis in the
    body frame, half-length of the axis segment (0 for a sphere) and radius."""
    body_idx, centre, axis, half_length, radius = [], [], [], [], []
    for g in range(mjm.ngeom):
        body = int(mjm.geom_bodyid[g])
        if body == 0 or mjm.body(body).name in FOOT_BODIES:
            continue
        kind = int(mjm.geom_type[g])
        if kind not in (mujoco.mjtGeom.mjGEOM_CAPSULE, mujoco.mjtGeom.mjGEOM_SPHERE):
            raise ValueError(f"fall test supports capsule and sphere geoms on non-foot bodies; geom "
                             f"{mjm.geom(g).name!r} has type {mujoco.mjtGeom(kind).name}")
        geom_axis = np.zeros(3)
        mujoco.mju_rotVecQuat(geom_axis, np.array([0.0, 0.0, 1.0]), mjm.geom_quat[g])
        body_idx.append(body - 1)
        centre.append(mjm.geom_pos[g])
        axis.append(geom_axis)
        is_capsule = kind == mujoco.mjtGeom.mjGEOM_CAPSULE
        half_length.append(mjm.geom_size[g, 1] if is_capsule else 0.0)
        radius.append(mjm.geom_size[g, 0])
    as32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    return (np.asarray(body_idx), as32(centre), as32(axis), as32(half_length), as32(radius))


def touching_floor(sim):
    """Bool [N, 15]: some capsule or sphere of the (non-foot) body reaches below the floor, z = 0.

    MuJoCo generates a contact (margin 0) exactly when a geom penetrates the floor, so this is the
    floor part of ASE's "net contact force above 0.1 N" test, read from the body poses."""
    dev, constants = sim.xpos.device, _constants(sim)
    body_idx, centre, axis, half_length, radius = (constants.on(dev, f"floor_geom_{name}") for name in (
        "body", "centre", "axis", "half_length", "radius"))
    geom_body_pos, geom_body_quat = sim.xpos[:, 1:][:, body_idx], sim.xquat[:, 1:][:, body_idx]
    centre_z = (geom_body_pos + _rotate(geom_body_quat, centre.expand_as(geom_body_pos)))[..., 2]
    axis_z = _rotate(geom_body_quat, axis.expand_as(geom_body_pos))[..., 2]
    lowest_z = centre_z - half_length * axis_z.abs() - radius  # [N, num_geoms]
    return ((lowest_z < 0.0).to(torch.float32) @ constants.on(dev, "floor_geom_to_body")) > 0  # [N, 15]


def fallen(sim):
    """ASE's fall test, bool [N]: some non-foot body touches the floor and some non-foot body origin
    is below its termination height (0.15 m, head 0.3 m); not checked on the first control step
    after a reset.

    ASE reads contact forces (any contact, self-contacts included); here contact means touching
    the floor (see `touching_floor`), so a low body touching only another body does not count."""
    dev, constants = sim.xpos.device, _constants(sim)
    too_low = (sim.xpos[:, 1:, 2] < constants.on(dev, "termination_heights")) & constants.on(dev, "can_fall")
    return touching_floor(sim).any(-1) & too_low.any(-1) & (sim.time > constants.fall_test_start_time)


# ---------------------------------------------------------------- reset
def standing_qpos(yaw):
    """The standing pose facing `yaw` [N] (rad): pelvis at 0.89 m, upright, every joint at 0. [N, 35]."""
    qpos = torch.zeros(yaw.shape[0], NUM_QPOS, dtype=torch.float32, device=yaw.device)
    qpos[:, 2] = STANDING_ROOT_HEIGHT
    qpos[:, 3] = torch.cos(0.5 * yaw)
    qpos[:, 6] = torch.sin(0.5 * yaw)
    return qpos


def reset_state(sim, reset_mask, generator):
    """Standing pose with a uniform random heading, small uniform joint-angle and joint-velocity
    noise and the root at rest, in the worlds where reset_mask [N] is True; the other worlds are
    left untouched (tensor ops only)."""
    n, dev = sim.qpos.shape[0], sim.qpos.device
    yaw = (torch.rand(n, device=dev, generator=generator) * 2.0 - 1.0) * torch.pi
    qpos = standing_qpos(yaw)
    limits = _constants(sim).on(dev, "joint_range")
    noise = torch.rand(n, len(DOF_NAMES), device=dev, generator=generator) * 2.0 - 1.0
    qpos[:, 7:] = torch.clamp(qpos[:, 7:] + RESET_DOF_POS_NOISE * noise, limits[:, 0], limits[:, 1])
    qvel = torch.zeros_like(sim.qvel)
    noise = torch.rand(n, len(DOF_NAMES), device=dev, generator=generator) * 2.0 - 1.0
    qvel[:, 6:] = RESET_DOF_VEL_NOISE * noise
    mask = reset_mask[:, None]
    sim.qpos.copy_(torch.where(mask, qpos.to(sim.qpos.dtype), sim.qpos))
    sim.qvel.copy_(torch.where(mask, qvel.to(sim.qvel.dtype), sim.qvel))


# ---------------------------------------------------------------- AMP observation
def amp_observation(sim, local_root_obs):
    """ASE's AMP frame of the current state, [N, 125] float32 (layout and conventions in tasks/amp.py,
    which imports this module: hence the import here)."""
    from tasks import amp

    return amp.amp_observation(sim, local_root_obs)
