"""Batched MuJoCo Warp environment: N worlds in one model, state shared with torch.

An env is data plus a few functions over it. The data: one MuJoCo Warp model and data holding
`num_envs` worlds on one device, torch views of the simulator arrays (`qpos`, `qvel`, `ctrl`, ...,
shared memory, no copies), per-world episode buffers, and the task's target tensors. The
functions: `reset`, `reset_done`, `step`, `root_states`. The physics of one control step (all
substeps) is captured once as a Warp graph (`wp.ScopedCapture`) and replayed with
`wp.capture_launch`, on CPU and on CUDA alike.

One control step (`step`): clamp actions to [-1, 1] -> PD targets into ctrl -> task.update (resample
expired targets) -> physics (DECIMATION physics steps) -> reward -> worlds with NaN / inf state go back
to their initial state -> fall test, timeouts, sticky done flags -> obs. No host syncs. Finished worlds
keep simulating until `reset_done()`.

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
    compute_obs(sim) -> [N, NUM_ROBOT_OBS]  from the torch views in `sim` (a SimViews).
    fallen(sim) -> bool [N]        fall / flip test (terminates the episode).
    reset_state(sim, reset_mask, generator)  writes the initial qpos / qvel of the worlds where
                                   reset_mask is True (tensor ops only, no host sync); the others must be
                                   left untouched.
    NEEDS_FORWARD_AFTER_RESET: bool  True if compute_obs / fallen read derived quantities (xpos, xquat,
                                   cvel, contacts) that must be recomputed (mjw.forward) after a reset.
    TASK_PARAMS: dict              optional, per task name: robot-scaled task settings, e.g.
                                   {"heading": {"speed_range": (0.4, 0.8)}}.
    MAX_CONTACTS_PER_WORLD: int    optional, size of the contact buffer per world (default 8 per geom).

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

import mujoco
import mujoco_warp as mjw
import numpy as np
import torch
import warp as wp

ENV_OVERRIDES = ("decimation", "episode_length_s", "capture", "nconmax", "njmax")
# Overflows that drop contacts or constraints. The solver's iteration limits (ITERATIONS,
# LS_ITERATIONS) are set on purpose for speed and are not reported.
BUFFER_OVERFLOWS = int(mjw.OverflowType.ALL & ~(mjw.OverflowType.ITERATIONS | mjw.OverflowType.LS_ITERATIONS))


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


def heading_rotate_inverse(q, v):
    """Express world vectors v [N, 3] in the heading frame (world rotated by the root's yaw)."""
    yaw = heading_angle(q)
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    x = cos * v[:, 0] + sin * v[:, 1]
    y = -sin * v[:, 0] + cos * v[:, 1]
    return torch.stack([x, y, v[:, 2]], dim=-1)


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


# ---------------------------------------------------------------- simulator views
class SimViews:
    """Torch views (shared memory, no copies) of the MuJoCo Warp arrays robots and tasks read."""

    def __init__(self, d):
        self.qpos = wp.to_torch(d.qpos)  # [N, nq]
        self.qvel = wp.to_torch(d.qvel)  # [N, nv]
        self.ctrl = wp.to_torch(d.ctrl)  # [N, nu] PD targets (rad)
        self.qacc = wp.to_torch(d.qacc)
        self.qacc_warmstart = wp.to_torch(d.qacc_warmstart)
        self.time = wp.to_torch(d.time)  # [N] s
        self.xpos = wp.to_torch(d.xpos)  # [N, nbody, 3] body positions (world)
        self.xquat = wp.to_torch(d.xquat)  # [N, nbody, 4] body orientations (world, w x y z)
        self.cvel = wp.to_torch(d.cvel)  # [N, nbody, 6] com-based velocities (rot, lin)
        self.overflow = wp.to_torch(d.overflow)  # [N] bitmask of buffer overflows (mjw.OverflowType)


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


def contact_buffer_sizes(mjm, robot, num_envs, nconmax=None, njmax=None):
    """Contacts per world from the robot (or 8 per geom); constraint rows per world: the worst case
    of every contact at the model's largest condim (pyramidal cone: 2 * (condim - 1) rows) plus joint
    limits and equalities."""
    if nconmax is None:
        nconmax = getattr(robot, "MAX_CONTACTS_PER_WORLD", 8 * mjm.ngeom)
    if njmax is None:
        rows_per_contact = 2 * (int(mjm.geom_condim.max()) - 1)
        njmax = nconmax * rows_per_contact + mjm.njnt + 6 * mjm.neq
    return int(nconmax), int(njmax), int(nconmax) * num_envs


# ---------------------------------------------------------------- the batched env
class BatchedEnv:
    def __init__(self, robot, task, num_envs, device="cpu", seed=0, **overrides):
        if not isinstance(num_envs, (int, np.integer)) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        self.device = check_device(device)
        self.robot, self.task = robot, task
        self.robot_name, self.task_name = robot.NAME, task.NAME
        self.num_envs = int(num_envs)
        task_params = dict(task.DEFAULT_PARAMS)
        task_params.update(getattr(robot, "TASK_PARAMS", {}).get(task.NAME, {}))
        allowed = ENV_OVERRIDES + tuple(task_params)
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"unknown override(s) {unknown} for robot {robot.NAME!r} and task "
                             f"{task.NAME!r}; allowed: {list(allowed)}")
        task_params.update({k: v for k, v in overrides.items() if k in task_params})

        # model and data
        self.mjm = mujoco.MjModel.from_xml_path(robot.MJCF_PATH)
        self.decimation = int(overrides.get("decimation", robot.DECIMATION))
        if self.decimation < 1:
            raise ValueError(f"decimation must be >= 1, got {self.decimation}")
        self.physics_dt = float(self.mjm.opt.timestep)
        self.control_dt = self.decimation * self.physics_dt
        episode_length_s = float(overrides.get("episode_length_s", robot.EPISODE_LENGTH_S))
        self.max_episode_length = max(1, round(episode_length_s / self.control_dt))
        self.nconmax, self.njmax, self.naconmax = contact_buffer_sizes(
            self.mjm, robot, self.num_envs, overrides.get("nconmax"), overrides.get("njmax"))
        self.wp_device = "cpu" if self.device.type == "cpu" else f"cuda:{self.device.index}"
        with wp.ScopedDevice(self.wp_device):
            self.m = mjw.put_model(self.mjm)
            self.m.opt.warn_overflow = BUFFER_OVERFLOWS
            self.d = mjw.make_data(self.mjm, nworld=self.num_envs, nconmax=self.nconmax,
                                   njmax=self.njmax, naconmax=self.naconmax)
        self.sim = SimViews(self.d)

        self.num_actions = self.mjm.nu
        self.num_task_obs = task.TASK_OBS_SIZE
        self.num_obs = robot.NUM_ROBOT_OBS + self.num_task_obs
        offset, scale = robot.pd_action_map(self.mjm)
        self.pd_offset = torch.as_tensor(offset, dtype=torch.float32, device=self.device)
        self.pd_scale = torch.as_tensor(scale, dtype=torch.float32, device=self.device)

        # per-world episode buffers (sticky until reset_done)
        n, dev = self.num_envs, self.device
        self.generator = torch.Generator(device=dev)  # every random draw of the env and task
        self.seed(seed)
        self.progress = torch.zeros(n, dtype=torch.int64, device=dev)  # control steps since reset
        self.done_buf = torch.zeros(n, dtype=torch.bool, device=dev)
        self.terminate_buf = torch.zeros(n, dtype=torch.bool, device=dev)
        self.timeout_buf = torch.zeros(n, dtype=torch.bool, device=dev)
        self.prev_root_pos = torch.zeros(n, 3, dtype=torch.float32, device=dev)  # root at step start
        self.initial_qpos = torch.zeros_like(self.sim.qpos)  # state of each world's last reset
        self.initial_qvel = torch.zeros_like(self.sim.qvel)
        self.nonfinite_resets = torch.zeros((), dtype=torch.int64, device=dev)
        self.task_state = task.make_state(n, dev, task_params, self.control_dt)
        self.task_params = task_params

        self.use_capture = bool(overrides.get("capture", True))
        self.physics_graph = self.forward_graph = None
        if self.use_capture:
            self._capture_graphs()
        self.reset()

    # ------------------------------------------------------------ physics
    def _physics_eager(self):
        for _ in range(self.decimation):
            mjw.step(self.m, self.d)

    def _forward_eager(self):
        mjw.forward(self.m, self.d)

    def _capture_graphs(self):
        # Kernels must be compiled and loaded before capture: run each function once eagerly (the
        # state it leaves behind is overwritten by the reset that follows).
        with wp.ScopedDevice(self.wp_device):
            self._physics_eager()
            self._forward_eager()
            with wp.ScopedCapture() as capture:
                self._physics_eager()
            self.physics_graph = capture.graph
            with wp.ScopedCapture() as capture:
                self._forward_eager()
            self.forward_graph = capture.graph
            wp.synchronize_device()  # the warm-up ran on Warp's stream; torch ops follow
        self.sim.overflow.zero_()

    def _launch(self, graph, eager_fn):
        """Replay `graph` (or call `eager_fn` when not captured). On CUDA both run on torch's current
        stream, so they are ordered with the torch ops that read and write the same memory."""
        with wp.ScopedDevice(self.wp_device):
            if self.device.type == "cuda":
                stream = wp.stream_from_torch(torch.cuda.current_stream(self.device))
                with wp.ScopedStream(stream):
                    wp.capture_launch(graph, stream=stream) if graph is not None else eager_fn()
            elif graph is not None:
                wp.capture_launch(graph)
            else:
                eager_fn()

    def physics_step(self):
        """Advance all worlds by one control step (decimation physics steps)."""
        self._launch(self.physics_graph, self._physics_eager)

    def forward(self):
        """Recompute derived quantities (body poses, contacts, ...) from qpos / qvel."""
        self._launch(self.forward_graph, self._forward_eager)

    # ------------------------------------------------------------ state
    def root_states(self):
        qpos, qvel = self.sim.qpos, self.sim.qvel
        quat = qpos[:, 3:7]
        return {"pos": qpos[:, 0:3], "quat": quat, "lin_vel": qvel[:, 0:3],
                "ang_vel": quat_rotate(quat, qvel[:, 3:6])}

    def _task_root(self):
        root = self.root_states()
        root["prev_pos"] = self.prev_root_pos
        root["control_dt"] = self.control_dt
        return root

    def compute_obs(self):
        robot_obs = self.robot.compute_obs(self.sim)
        task_obs = self.task.observe(self.task_state, self._task_root())
        return {"obs": torch.cat([robot_obs, task_obs], dim=-1)}

    def reset_worlds(self, reset_mask):
        """Reset the worlds where reset_mask [N] is True; the others stay bit-identical."""
        mask = reset_mask[:, None]
        self.robot.reset_state(self.sim, reset_mask, self.generator)
        self.initial_qpos.copy_(torch.where(mask, self.sim.qpos, self.initial_qpos))
        self.initial_qvel.copy_(torch.where(mask, self.sim.qvel, self.initial_qvel))
        self._clear_dynamics(reset_mask)
        self.sim.time.copy_(torch.where(reset_mask, torch.zeros_like(self.sim.time), self.sim.time))
        self.sim.ctrl.copy_(torch.where(mask, self.pd_offset.expand_as(self.sim.ctrl), self.sim.ctrl))
        self.progress.masked_fill_(reset_mask, 0)
        for buf in (self.done_buf, self.terminate_buf, self.timeout_buf):
            buf.masked_fill_(reset_mask, False)
        self.task.reset(self.task_state, self._task_root(), reset_mask, self.generator)

    def _clear_dynamics(self, mask):
        """Zero accelerations and the solver's warm start of the masked worlds, so that a reset
        world's trajectory depends only on its qpos / qvel."""
        for buf in (self.sim.qacc_warmstart, self.sim.qacc):
            buf.copy_(torch.where(mask[:, None], torch.zeros_like(buf), buf))
        self.prev_root_pos.copy_(torch.where(mask[:, None], self.sim.qpos[:, 0:3], self.prev_root_pos))

    def seed(self, seed):
        """Reseed the env's random generator (initial states, task targets)."""
        self.generator.manual_seed(seed)

    def reset(self):
        """Reset every world; returns {"obs": [N, num_obs]}."""
        self.reset_worlds(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        self.forward()
        return self.compute_obs()

    def reset_done(self):
        """Reset only the worlds that finished since their last reset; returns the obs of all worlds."""
        self.reset_worlds(self.done_buf.clone())
        if self.robot.NEEDS_FORWARD_AFTER_RESET:
            self.forward()
        return self.compute_obs()

    def step(self, actions):
        """One control step of every world: (obs_dict, reward [N], done [N], extras)."""
        actions = torch.clamp(actions.to(self.device, torch.float32), -1.0, 1.0)
        self.sim.ctrl.copy_(self.pd_offset + self.pd_scale * actions)
        self.task.update(self.task_state, self._task_root(), self.generator)
        self.prev_root_pos.copy_(self.sim.qpos[:, 0:3])
        self.physics_step()
        self.progress += 1

        reward = self.task.reward(self.task_state, self._task_root())
        nonfinite = self._restart_nonfinite_worlds()
        reward = torch.where(nonfinite, torch.zeros_like(reward), reward)
        self._update_done_flags(fell=self.robot.fallen(self.sim), nonfinite=nonfinite)

        obs = self.compute_obs()["obs"]
        obs = torch.where(nonfinite[:, None], torch.nan_to_num(obs, 0.0, 0.0, 0.0), obs)
        extras = {"terminate": self.terminate_buf.clone(), "time_outs": self.timeout_buf.clone(),
                  "nonfinite": nonfinite}
        return {"obs": obs}, reward, self.done_buf.clone(), extras

    def _restart_nonfinite_worlds(self):
        """A world whose state became NaN / inf goes back to its initial state at once, so NaN never
        reaches the obs, the solver's warm start or the other worlds. Returns the mask [N]."""
        nonfinite = ~(torch.isfinite(self.sim.qpos).all(-1) & torch.isfinite(self.sim.qvel).all(-1))
        mask = nonfinite[:, None]
        self.sim.qpos.copy_(torch.where(mask, self.initial_qpos, self.sim.qpos))
        self.sim.qvel.copy_(torch.where(mask, self.initial_qvel, self.sim.qvel))
        self._clear_dynamics(nonfinite)
        self.nonfinite_resets += nonfinite.sum()
        return nonfinite

    def _update_done_flags(self, fell, nonfinite):
        """Sticky flags: a world that finishes keeps done and its terminate / time_outs of that step
        until reset_done(). A non-finite world is reported done and terminate even if it had already
        finished by timeout."""
        fell = fell | nonfinite
        timed_out = (self.progress >= self.max_episode_length) & ~fell
        newly_done = ~self.done_buf & (fell | timed_out)
        self.terminate_buf |= (newly_done & fell) | nonfinite
        self.timeout_buf |= newly_done & timed_out
        self.timeout_buf &= ~nonfinite
        self.done_buf |= newly_done | nonfinite

    def overflowed(self):
        """Bool [N]: the world's contact or constraint buffers overflowed (contacts were dropped)."""
        return (self.sim.overflow & BUFFER_OVERFLOWS) != 0

    def get_task_obs_size(self):
        return self.num_task_obs



# ---------------------------------------------------------------- task helpers
def sample_timers(n, interval_steps, device, generator):
    """Control steps until a task's next target resample, uniform in [lo, hi)."""
    lo, hi = interval_steps
    return torch.randint(lo, max(hi, lo + 1), (n,), device=device, generator=generator)


def expired_timers(timer):
    """Count every world's timer down by one control step (in place); True where it ran out."""
    timer -= 1
    return timer <= 0
