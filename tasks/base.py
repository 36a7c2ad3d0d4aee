"""What every robot and task module provides, and the helpers they share.

The env (tasks/env.py) holds the episode logic once; the physics under it is one small object per
backend (tasks/physics_mjwarp.py: MuJoCo Warp, CPU or CUDA; tasks/physics_mujoco.py: C MuJoCo on
the CPU cores). Robots and tasks read the same torch views on every backend, `sim` below:
    sim.qpos [N, nq], sim.qvel [N, nv], sim.ctrl [N, nu] (PD targets, rad), sim.time [N] (s),
    sim.xpos [N, nbody, 3] (world), sim.xquat [N, nbody, 4] (world, w x y z), sim.cvel [N, nbody, 6]
    (MuJoCo's com-based velocities: angular, then linear at the tree's centre of mass, world
    orientation), all float32. xpos / xquat / cvel after a step come from the kinematics pass of the
    last physics step (the state one physics step before qpos / qvel). sim.mjm is the MjModel the
    worlds simulate: the robot's MJCF_PATH, or a user's file (robot_xml), so robots read their
    model constants (masses, joint limits, ...) from it.

Robot module interface (one file per robot, e.g. tasks/ant.py). A robot module provides:
    MJCF_PATH: str                 MJCF file. The first joint must be a free joint (the root): qpos[:, 0:7]
                                   = root position (world) and quaternion (w, x, y, z), qvel[:, 0:6] =
                                   root linear velocity (world) and angular velocity (root body frame).
                                   PD control lives in the MJCF: one <position kp=.. kv=..> actuator per
                                   actuated DoF, so the physics applies the PD torque every substep and
                                   the env only writes joint targets into ctrl.
    DECIMATION: int                physics steps per control step (control_dt = DECIMATION * timestep;
                                   the timestep comes from the MJCF <option timestep>).
    EPISODE_LENGTH_S: float        episode length in seconds (max_episode_length = round(s / control_dt)).
    NUM_ROBOT_OBS: int             size of the proprioceptive observation.
    pd_action_map(mjm) -> (offset, scale)   numpy [nu] each: ctrl target = offset + scale * action,
                                   action in [-1, 1]. `ase_pd_action_map` below is the ASE rule.
    compute_obs(sim) -> [N, NUM_ROBOT_OBS]  from the torch views in `sim`.
    fallen(sim) -> bool [N]        fall / flip test (terminates the episode).
    reset_state(sim, reset_mask, generator)  writes the initial qpos / qvel of the worlds where
                                   reset_mask is True (tensor ops only, no host sync); the others must be
                                   left untouched.
    NEEDS_FORWARD_AFTER_RESET: bool  True if compute_obs / fallen read derived quantities (xpos, xquat,
                                   cvel) that must be recomputed (env.forward) after a reset. The
                                   `mujoco` backend computes them only for such robots (it adds
                                   body sensors to the model); for the others they stay zero.
    TASK_PARAMS: dict              optional, per task name: robot-scaled task settings, e.g.
                                   {"heading": {"speed_range": (0.4, 0.8)}}.
    convert_robot_xml(path) -> MjSpec   optional: the robot also runs on a user's MJCF file (the make_env
                                   override robot_xml), which this converts and checks (ValueError naming
                                   the file and what differs from the robot's layout).
    MAX_CONTACTS_PER_WORLD: int    optional, MuJoCo Warp's contact buffer per world (default 8 per geom).
    LOCAL_ROOT_OBS: bool           optional, ASE's localRootObs default; a robot with it takes
                                   compute_obs(sim, local_root_obs=...) (the make_env override local_root_obs).
    amp_observation(sim, local_root_obs) -> [N, F]   optional, the current AMP frame (tasks/amp.py); the env
                                   then keeps ASE's history of frames (extras["amp_obs"]). Needs
                                   NEEDS_FORWARD_AFTER_RESET (the frame reads body poses).

Task module interface (one file per task, e.g. tasks/heading.py). A task module provides:
    TASK_OBS_SIZE: int             appended at the END of the observation.
    DEFAULT_PARAMS: dict           task settings (robot TASK_PARAMS and make_env overrides replace them).
    make_state(num_envs, device, params, control_dt) -> dict of tensors (targets, timers).
    reset(state, root, reset_mask, generator)   new targets for the worlds in reset_mask.
    update(state, root, generator)              called once per control step before the physics:
                                   counts timers down and resamples expired targets (tensor ops only).
    observe(state, root) -> [N, TASK_OBS_SIZE]
    reward(state, root) -> [N]     reward of the control step just simulated.
`root` is the dict from `env.root_states()` plus "prev_pos": the root position (world) at the start
of the control step, and "control_dt".
"""

import torch


# ---------------------------------------------------------------- quaternion helpers (w, x, y, z)
def quat_rotate(q, v):
    """Rotate vectors v [N, 3] by unit quaternions q [N, 4] (w, x, y, z)."""
    w, xyz = q[:, :1], q[:, 1:]
    t = 2.0 * torch.cross(xyz, v, dim=-1)
    return v + w * t + torch.cross(xyz, t, dim=-1)


def quat_rotate_inverse(q, v):
    """Rotate vectors v [N, 3] by the inverse of unit quaternions q [N, 4]."""
    return quat_rotate(torch.cat([q[:, :1], -q[:, 1:]], dim=-1), v)


def heading_angle(q):
    """Yaw (rad) of the body's x axis projected on the ground plane."""
    x_axis_world = quat_rotate(q, _unit(q, 0))
    return torch.atan2(x_axis_world[:, 1], x_axis_world[:, 0])


def planar_into_heading(vec_xy_world, yaw):
    """Planar world vectors [N, 2] in the heading frame of yaw [N] (rad): rotated by -yaw."""
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    x, y = vec_xy_world[:, 0], vec_xy_world[:, 1]
    return torch.stack([cos * x + sin * y, -sin * x + cos * y], dim=-1)


def heading_rotate_inverse(q, v):
    """Express world vectors v [N, 3] in the heading frame (world rotated by the root's yaw)."""
    return torch.cat([planar_into_heading(v[:, :2], heading_angle(q)), v[:, 2:3]], dim=-1)


def up_axis_z(q):
    """World z component of the body's local z axis: 1 upright, -1 upside down."""
    w, x, y, z = q.unbind(-1)
    return 1 - 2 * (x * x + y * y)


def tan_norm_heading(q):
    """Root rotation in the heading frame as tan-norm: the rotated x and z axes (6 numbers)."""
    x_axis = heading_rotate_inverse(q, quat_rotate(q, _unit(q, 0)))
    z_axis = heading_rotate_inverse(q, quat_rotate(q, _unit(q, 2)))
    return torch.cat([x_axis, z_axis], dim=-1)


def _unit(q, axis):
    v = torch.zeros(q.shape[0], 3, dtype=q.dtype, device=q.device)
    v[:, axis] = 1.0
    return v


def ase_pd_action_map(mjm):
    """ASE's rule for hinge joints: target = midpoint of the limits + 0.7 * (hi - lo) * action."""
    joint_ids = mjm.actuator_trnid[:, 0]
    lo, hi = mjm.jnt_range[joint_ids, 0], mjm.jnt_range[joint_ids, 1]
    return (lo + hi) / 2.0, 0.7 * (hi - lo)


# ---------------------------------------------------------------- devices
def check_device(device):
    """torch.device for "cpu" or "cuda[:i]"; ValueError naming the bad value otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not valid; expected 'cpu' or 'cuda:<index>'") from error
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device {str(device)!r} is not supported; expected 'cpu' or 'cuda:<index>'")
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu'")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device("cuda", index)


# ---------------------------------------------------------------- task helpers
def sample_timers(n, interval_steps, device, generator):
    """Control steps until a task's next target resample, uniform in [lo, hi)."""
    lo, hi = interval_steps
    return torch.randint(lo, max(hi, lo + 1), (n,), device=device, generator=generator)


def expired_timers(timer):
    """Count every world's timer down by one control step (in place); True where it ran out."""
    timer -= 1
    return timer <= 0
