"""MuJoCo Warp physics (backend `mjwarp`): N worlds in one batched model on one device.

State lives in Warp arrays; `views` holds torch views of them (`wp.to_torch`, shared memory, no
copies, float32). The physics of one control step (all substeps) and the forward pass are captured
once as Warp graphs (`wp.ScopedCapture`) and replayed with `wp.capture_launch`, on CPU and CUDA
alike. The derived views (xpos, xquat, cvel) after `step` come from the kinematics pass of the last
substep, i.e. of the state one physics step before qpos / qvel.
"""

import mujoco_warp as mjw
import torch
import warp as wp

OVERRIDES = ("capture", "nconmax", "njmax")
# Overflows that drop contacts or constraints. The solver's iteration limits (ITERATIONS,
# LS_ITERATIONS) are set on purpose for speed and are not reported.
BUFFER_OVERFLOWS = int(mjw.OverflowType.ALL & ~(mjw.OverflowType.ITERATIONS | mjw.OverflowType.LS_ITERATIONS))
DERIVED_VIEWS = ("xpos", "xquat", "cvel")  # what forward() recomputes that robots read


class SimViews:
    """Torch views (shared memory, no copies) of the MuJoCo Warp arrays robots and tasks read."""

    def __init__(self, d, mjm):
        self.mjm = mjm  # the MjModel the worlds simulate (robots read their constants from it)
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


class MjwarpPhysics:
    """Steps `num_envs` worlds of `mjm` with MuJoCo Warp on `device` (a torch.device)."""

    name = "mjwarp"

    def __init__(self, mjm, robot, num_envs, device, decimation, capture=True, nconmax=None, njmax=None):
        self.mjm, self.num_envs, self.device, self.decimation = mjm, num_envs, device, decimation
        self.nconmax, self.njmax, self.naconmax = contact_buffer_sizes(mjm, robot, num_envs, nconmax, njmax)
        self.wp_device = "cpu" if device.type == "cpu" else f"cuda:{device.index}"
        with wp.ScopedDevice(self.wp_device):
            self.m = mjw.put_model(mjm)
            self.m.opt.warn_overflow = BUFFER_OVERFLOWS
            self.d = mjw.make_data(mjm, nworld=num_envs, nconmax=self.nconmax, njmax=self.njmax,
                                   naconmax=self.naconmax)
        self.views = SimViews(self.d, mjm)
        self.physics_graph = self.forward_graph = None
        if capture:
            self._capture_graphs()

    def describe(self):
        where = "CPU" if self.device.type == "cpu" else str(self.device)
        return f"mjwarp (MuJoCo Warp on {where}{', captured graphs' if self.physics_graph else ''})"

    def step_eager(self):
        for _ in range(self.decimation):
            mjw.step(self.m, self.d)

    def forward_eager(self):
        mjw.forward(self.m, self.d)

    def _capture_graphs(self):
        # Kernels must be compiled and loaded before capture: run each function once eagerly (the
        # state it leaves behind is overwritten by the env's reset that follows).
        with wp.ScopedDevice(self.wp_device):
            self.step_eager()
            self.forward_eager()
            with wp.ScopedCapture() as capture:
                self.step_eager()
            self.physics_graph = capture.graph
            with wp.ScopedCapture() as capture:
                self.forward_eager()
            self.forward_graph = capture.graph
            wp.synchronize_device()  # the warm-up ran on Warp's stream; torch ops follow
        self.views.overflow.zero_()

    def _launch(self, graph, eager_fn):
        """Replay `graph` (or call `eager_fn` when not captured). On CUDA both run on torch's current
        stream, so they are ordered with the torch ops that read and write the same memory.

        While torch captures that stream into a CUDA graph of its own (the trainer's --cuda-graph), a
        Warp graph cannot be launched into it: the kernels are launched one by one instead, inside a
        Warp capture marked external, and become part of torch's graph."""
        with wp.ScopedDevice(self.wp_device):
            if self.device.type == "cuda":
                stream = wp.stream_from_torch(torch.cuda.current_stream(self.device))
                with wp.ScopedStream(stream):
                    if torch.cuda.is_current_stream_capturing():  # torch's capture mode: "global", its default
                        with wp.ScopedCapture(stream=stream, external=True, capture_mode=wp.CaptureMode.GLOBAL):
                            eager_fn()
                    else:
                        wp.capture_launch(graph, stream=stream) if graph is not None else eager_fn()
            elif graph is not None:
                wp.capture_launch(graph)
            else:
                eager_fn()

    def step(self):
        """Advance all worlds by one control step (decimation physics steps, ctrl held)."""
        self._launch(self.physics_graph, self.step_eager)

    def forward(self, mask=None):
        """Recompute derived quantities (body poses, velocities, ...) from qpos / qvel, of the worlds
        where mask [N] is True (all when None); the other worlds' derived views are kept."""
        kept = None if mask is None else {name: getattr(self.views, name).clone() for name in DERIVED_VIEWS}
        self._launch(self.forward_graph, self.forward_eager)
        for name, before in (kept or {}).items():
            view = getattr(self.views, name)
            world_mask = mask.view(-1, *([1] * (view.dim() - 1)))
            view.copy_(torch.where(world_mask, view, before))

    RESUME_VIEWS = ("qpos", "qvel", "ctrl", "qacc", "qacc_warmstart", "time", "xpos", "xquat", "cvel")

    def state_dict(self):
        """The state the next step reads (contacts and constraints are rebuilt from it every step)."""
        return {name: getattr(self.views, name).clone() for name in self.RESUME_VIEWS}

    def load_state_dict(self, state):
        for name in self.RESUME_VIEWS:
            getattr(self.views, name).copy_(state[name])

    def clear_dynamics(self, mask):
        """Zero accelerations and the solver's warm start of the masked worlds, so that a reset
        world's trajectory depends only on its qpos / qvel."""
        for buf in (self.views.qacc_warmstart, self.views.qacc):
            buf.copy_(torch.where(mask[:, None], torch.zeros_like(buf), buf))

    def overflowed(self):
        """Bool [N]: the world's contact or constraint buffers overflowed (contacts were dropped)."""
        return (self.views.overflow & BUFFER_OVERFLOWS) != 0


def make_physics(robot, spec, mjm, num_envs, device, decimation, sim_threads=None, **overrides):
    """The env's factory: the worlds simulate `mjm` (compiled from `spec`; sim_threads is for the C backend
    and unused here)."""
    return MjwarpPhysics(mjm, robot, num_envs, device, decimation, **overrides)
