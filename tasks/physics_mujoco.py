"""C MuJoCo physics (backend `mujoco`): N worlds stepped by `mujoco.rollout` on all CPU cores.

One control step is one call of a persistent `mujoco.rollout.Rollout(nthread=...)` thread pool:
every world starts from its state (float64, MuJoCo's mjSTATE_FULLPHYSICS: time, qpos, qvel) and
solver warm start, holds its PD targets for `decimation` physics steps, and writes its states and
sensor values into preallocated arrays. No Python loop over worlds.

Why rollout and not a pool of Python threads over per-world MjData (mj_step releases the GIL, but
every call takes it back): N = 256, 2 cores, one call per control step, control steps/s. Idle
machine, humanoid from a standing start: Python threads 9.5k (1 thread) -> 10.1k (2 threads),
rollout with 2 threads 14.2k. Shared, busy machine, one run: humanoid threads 5.1k-5.4k vs
rollout 5.5k-6.1k; ant threads 12.0k-13.6k vs rollout 15.2k-23.4k. `bench/bench_sim.py` prints raw
rollout physics beside the env in every run.

State shared with torch: MuJoCo computes in float64, the robots read float32 (as on MuJoCo Warp).
`views` are torch tensors over float32 numpy arrays (torch.from_numpy, shared memory). Each step
converts once each way, vectorised over all worlds: views -> float64 state for the values the
torch side wrote since the last step (a reset, a hand-set state), then float64 -> views. Values the
torch side did not touch keep their float64 precision, so a world's trajectory is C MuJoCo's own.

Body poses and velocities come from frame sensors added to the model in memory (mujoco.MjSpec):
position and orientation of each body frame, its linear and angular velocity (world), and the
centre of mass of each kinematic tree. mj_step computes sensors in its forward pass, before it
integrates, so after a control step they describe the state one physics step before qpos / qvel,
as MuJoCo Warp's xpos / xquat / cvel do. `cvel` is rebuilt in MuJoCo's convention: (angular,
linear) velocity in world orientation, the linear part of the point at the tree's centre of mass.

The solver's warm start of the next control step is the last physics step's acceleration,
(qvel[-1] - qvel[-2]) / timestep from the recorded states: the value mj_step itself keeps for the
Euler and implicit integrators (to rounding), so stepping in chunks matches a plain mj_step loop.

MuJoCo's automatic reset of a diverging world (to qpos0) is disabled: its state turns NaN, and the
env restarts it from its initial state and counts it, as on MuJoCo Warp.

C MuJoCo has no fixed contact buffers: contacts are never dropped for lack of room. It warns when
its arena memory is full (mjWARN_CONTACTFULL / mjWARN_CNSTRFULL); those warnings are per thread,
not per world, so `overflowed()` then reports every world.
"""

import os

import mujoco
import numpy as np
import torch
from mujoco import rollout

OVERRIDES = ()  # sim_threads is a make_env parameter
ARENA_WARNINGS = (mujoco.mjtWarning.mjWARN_CONTACTFULL, mujoco.mjtWarning.mjWARN_CNSTRFULL)
FULL_STATE = mujoco.mjtState.mjSTATE_FULLPHYSICS.value
BODY_SENSORS = ("framepos", "framequat", "framelinvel", "frameangvel")  # per body frame, world


class SimViews:
    """Torch views (float32, shared memory with numpy arrays) of the state robots and tasks read;
    the same names, shapes and frames as MuJoCo Warp's."""

    def __init__(self, mjm, state, ctrl, xpos, xquat, cvel):
        nq, nv = mjm.nq, mjm.nv
        self.mjm = mjm  # the MjModel the worlds simulate (robots read their constants from it)
        self.time = state[:, 0]  # [N] s
        self.qpos = state[:, 1:1 + nq]  # [N, nq]
        self.qvel = state[:, 1 + nq:1 + nq + nv]  # [N, nv]
        self.ctrl = ctrl  # [N, nu] PD targets (rad)
        self.xpos = xpos  # [N, nbody, 3] body positions (world)
        self.xquat = xquat  # [N, nbody, 4] body orientations (world, w x y z)
        self.cvel = cvel  # [N, nbody, 6] com-based velocities (rot, lin), as MuJoCo's cvel
        self.overflow = torch.zeros(state.shape[0], dtype=torch.int32)  # [N] no fixed buffers


def add_body_sensors(spec, mjm):
    """Frame sensors of every body (1..nbody-1) and a subtree-com sensor per kinematic tree root."""
    for kind in BODY_SENSORS:
        for body in range(1, mjm.nbody):
            spec.add_sensor(name=f"_{kind}_{body}", type=getattr(mujoco.mjtSensor, f"mjSENS_{kind.upper()}"),
                            objtype=mujoco.mjtObj.mjOBJ_XBODY, objname=mjm.body(body).name)
    for root in sorted(set(mjm.body_rootid[1:])):
        spec.add_sensor(name=f"_subtreecom_{root}", type=mujoco.mjtSensor.mjSENS_SUBTREECOM,
                        objtype=mujoco.mjtObj.mjOBJ_BODY, objname=mjm.body(root).name)


def sensor_block(model, first_name, width, count):
    """Slice of sensordata holding `count` consecutive sensors of `width` numbers from `first_name`."""
    start = int(model.sensor(first_name).adr[0])
    return slice(start, start + width * count)


class MujocoPhysics:
    """Steps `num_envs` worlds of the model `spec` (an MjSpec) compiles to, `mjm`, with C MuJoCo on
    `sim_threads` threads.

    body_views: add the body sensors (to a copy of `spec`) and fill xpos / xquat / cvel (robots that read them); without,
    those views stay zero and the step costs only the physics."""

    name = "mujoco"

    def __init__(self, spec, mjm, num_envs, decimation, sim_threads=None, body_views=True):
        self.threads = check_threads(sim_threads)
        self.mjm = mjm
        self.body_views = bool(body_views)
        if self.body_views:
            spec = spec.copy()
            add_body_sensors(spec, mjm)
        self.model = spec.compile()  # the physics of mjm, plus the body sensors
        # as on MuJoCo Warp, a diverging world turns NaN (the env restarts and counts it) instead of
        # being silently reset to the model's qpos0 by mj_step
        self.model.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_AUTORESET
        self.num_envs, self.decimation = num_envs, decimation
        self._allocate()
        self.pool = rollout.Rollout(nthread=self.threads if self.threads > 1 else 0)
        self.datas = [mujoco.MjData(self.model) for _ in range(self.threads)]
        self.models = [self.model] * num_envs

    def describe(self):
        return f"mujoco (C MuJoCo {mujoco.__version__}, {self.threads} thread{'s' if self.threads > 1 else ''})"

    def _allocate(self):
        m, n = self.model, self.num_envs
        nstate, nbody = mujoco.mj_stateSize(m, FULL_STATE), m.nbody
        self.state = np.zeros((n, nstate))  # float64, the physics state
        self.warmstart = np.zeros((n, m.nv))
        self.control = np.zeros((n, self.decimation, m.nu))
        self.trajectory = np.zeros((n, self.decimation, nstate))  # rollout outputs
        self.sensordata = np.zeros((n, self.decimation, m.nsensordata))
        self.state32 = np.zeros((n, nstate), dtype=np.float32)  # what the torch views show
        self.state32_published = self.state32.copy()  # ... as last written by the physics
        self.ctrl32 = np.zeros((n, m.nu), dtype=np.float32)
        self.xpos32 = np.zeros((n, nbody, 3), dtype=np.float32)
        self.xquat32 = np.zeros((n, nbody, 4), dtype=np.float32)
        self.xquat32[:, :, 0] = 1.0
        self.cvel32 = np.zeros((n, nbody, 6), dtype=np.float32)
        self.views = SimViews(self.mjm, *(torch.from_numpy(a) for a in (
            self.state32, self.ctrl32, self.xpos32, self.xquat32, self.cvel32)))
        self.qvel_cols = slice(1 + m.nq, 1 + m.nq + m.nv)
        if self.body_views:
            self._locate_body_sensors()

    def _locate_body_sensors(self):
        m, nb = self.model, self.model.nbody - 1
        self.pos_cols = sensor_block(m, "_framepos_1", 3, nb)
        self.quat_cols = sensor_block(m, "_framequat_1", 4, nb)
        self.linvel_cols = sensor_block(m, "_framelinvel_1", 3, nb)
        self.angvel_cols = sensor_block(m, "_frameangvel_1", 3, nb)
        roots = sorted(set(m.body_rootid[1:]))
        self.com_cols = sensor_block(m, f"_subtreecom_{roots[0]}", 3, len(roots))
        self.tree_of_body = np.searchsorted(roots, m.body_rootid[1:])  # [nbody - 1] index into roots

    # ------------------------------------------------------------ float32 views <-> float64 state
    def _take_view_writes(self):
        """Values the torch side wrote into the views since the last publish replace the float64 state."""
        np.copyto(self.state, self.state32, where=self.state32 != self.state32_published)
        np.copyto(self.state32_published, self.state32)

    def _publish_state(self):
        np.copyto(self.state32, self.state, casting="same_kind")
        np.copyto(self.state32_published, self.state32)

    def _publish_bodies(self, sensordata, worlds):
        """Body views of `worlds` (index array or slice) from their sensordata [len(worlds), nsensordata]."""
        count, nb = sensordata.shape[0], self.model.nbody - 1
        body_pos = sensordata[:, self.pos_cols].reshape(count, nb, 3)
        ang_vel = sensordata[:, self.angvel_cols].reshape(count, nb, 3)
        lin_vel_at_body = sensordata[:, self.linvel_cols].reshape(count, nb, 3)
        tree_com = sensordata[:, self.com_cols].reshape(count, -1, 3)[:, self.tree_of_body]
        lin_vel_at_com = lin_vel_at_body + np.cross(ang_vel, tree_com - body_pos)  # v(c) = v(p) + w x (c - p)
        self.xpos32[worlds, 1:] = body_pos
        self.xquat32[worlds, 1:] = sensordata[:, self.quat_cols].reshape(count, nb, 4)
        self.cvel32[worlds, 1:, 0:3] = ang_vel
        self.cvel32[worlds, 1:, 3:6] = lin_vel_at_com

    # ------------------------------------------------------------ physics
    def step(self):
        """Advance all worlds by one control step (decimation physics steps, ctrl held)."""
        self._take_view_writes()
        self.control[:] = self.ctrl32[:, None, :]
        self.pool.rollout(self.models, self.datas, self.state, self.control, skip_checks=True,
                          nstep=self.decimation, initial_warmstart=self.warmstart, state=self.trajectory,
                          sensordata=self.sensordata)
        last_qvel = self.trajectory[:, -1, self.qvel_cols]
        prev_qvel = self.trajectory[:, -2, self.qvel_cols] if self.decimation > 1 else self.state[:, self.qvel_cols]
        np.divide(last_qvel - prev_qvel, self.model.opt.timestep, out=self.warmstart)
        self.state[:] = self.trajectory[:, -1]
        self._publish_state()
        if self.body_views:
            self._publish_bodies(self.sensordata[:, -1], slice(None))

    def forward(self, mask=None):
        """Recompute the body views of the worlds where mask [N] is True (all when None) from their
        qpos / qvel; the other worlds' views are kept. One rollout physics step per world, whose
        sensors (computed before it integrates) are kept and whose new state is dropped."""
        self._take_view_writes()
        if not self.body_views:
            return
        worlds = np.arange(self.num_envs) if mask is None else np.flatnonzero(mask.numpy())
        if worlds.size == 0:
            return
        count = worlds.size
        sensordata = np.empty((count, 1, self.model.nsensordata))
        control = self.ctrl32[worlds, None, :].astype(np.float64)
        self.pool.rollout(self.models[:count], self.datas, self.state[worlds], control, skip_checks=True,
                          nstep=1, state=np.empty((count, 1, self.state.shape[1])), sensordata=sensordata)
        self._publish_bodies(sensordata[:, 0], worlds)

    RESUME_ARRAYS = ("state", "warmstart", "state32", "state32_published", "ctrl32", "xpos32", "xquat32", "cvel32")

    def state_dict(self):
        """Every array the next step reads (float64 state and warm start, the float32 views), as tensors:
        restored with load_state_dict, the worlds continue exactly as they would have."""
        return {name: torch.from_numpy(getattr(self, name).copy()) for name in self.RESUME_ARRAYS}

    def load_state_dict(self, state):
        for name in self.RESUME_ARRAYS:
            np.copyto(getattr(self, name), state[name].numpy())

    def clear_dynamics(self, mask):
        """Zero the solver's warm start of the masked worlds, so that a reset world's trajectory
        depends only on its qpos / qvel."""
        self.warmstart[mask.numpy()] = 0.0

    def overflowed(self):
        """Bool [N]: True for every world once C MuJoCo warned that its arena was full."""
        full = any(data.warning[w].number > 0 for data in self.datas for w in ARENA_WARNINGS)
        return torch.full((self.num_envs,), full, dtype=torch.bool)


def check_threads(sim_threads):
    """Threads for the rollout pool: all cores when None; ValueError naming a bad value."""
    if sim_threads is None:
        return os.cpu_count() or 1
    if not isinstance(sim_threads, (int, np.integer)) or isinstance(sim_threads, bool) or sim_threads < 1:
        raise ValueError(f"sim_threads must be an integer >= 1 (or None: all {os.cpu_count()} cores), got {sim_threads!r}")
    return int(sim_threads)


def make_physics(robot, spec, mjm, num_envs, device, decimation, sim_threads=None, **overrides):
    """The env's factory: C MuJoCo on the CPU simulating `mjm` (compiled from `spec`), body views for the
    robots that read them."""
    if device.type != "cpu":
        raise ValueError(f"backend 'mujoco' runs on the CPU, device {str(device)!r} given: "
                         f"use device 'cpu' or backend 'mjwarp'")
    return MujocoPhysics(spec, mjm, num_envs, decimation, sim_threads,
                         body_views=robot.NEEDS_FORWARD_AFTER_RESET)
