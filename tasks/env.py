"""The batched env: N worlds of one robot doing one task, episode logic over a physics backend.

An env is data plus a few functions over it. The data: a physics object (one per backend, see
below) with torch views of the simulator state (`env.sim`: qpos, qvel, ctrl, ..., shared memory,
no copies), per-world episode buffers, and the task's target tensors. The functions: `reset`,
`reset_done`, `step`, `root_states`. The episode logic lives here once, for every backend.

AMP observations (robots with `amp_observation`, the humanoid): the env keeps ASE's history of AMP
frames, [N, NUM_AMP_OBS_STEPS, frame size], newest first. Each step shifts it by one and puts the
frame of the new state in front; `extras["amp_obs"]` is the flattened history [N, get_num_amp_obs()]
a discriminator reads. A reset fills the reset worlds' history with copies of their current frame.

One control step (`step`): clamp actions to [-1, 1] -> PD targets into ctrl -> task.update (resample
expired targets) -> physics (DECIMATION physics steps) -> reward -> worlds with NaN / inf state go back
to their initial state -> fall test, timeouts, sticky done flags -> obs -> AMP history. No host syncs. Finished worlds
keep simulating until `reset_done()`.

A physics backend is one module tasks/physics_<name>.py with
    OVERRIDES: tuple               make_env overrides it takes (passed to make_physics)
    make_physics(robot, spec, mjm, num_envs, device, decimation, sim_threads, **overrides) -> physics
                                   of the model `spec` (an MjSpec) compiles to, `mjm`, with
        views                      the torch views robots and tasks read (tasks/base.py lists them),
                                   views.mjm being `mjm`
        step()                     one control step: decimation physics steps with ctrl held
        forward(mask=None)         recompute xpos / xquat / cvel of the masked worlds (all if None)
        clear_dynamics(mask)       forget accelerations / solver warm start of the masked worlds
        overflowed() -> bool [N]   contacts or constraints were dropped for lack of buffer space
        describe() -> str          backend, device and threads, for a run's banner
"""

import importlib

import numpy as np
import torch

from tasks import BACKENDS, load_robot_spec
from tasks.amp import fill_amp_history, make_amp_history, push_amp_frame
from tasks.base import check_device, quat_rotate

ENV_OVERRIDES = ("decimation", "episode_length_s", "local_root_obs", "robot_xml")


def resolve_backend(backend, device):
    """The backend module name for `backend` on `device` (a torch.device); ValueError naming the
    valid ones for anything else."""
    if backend == "auto":
        return "mjwarp" if device.type == "cuda" else "mujoco"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {list(BACKENDS)}")
    return backend


class BatchedEnv:
    def __init__(self, robot, task, num_envs, device="cpu", seed=0, backend="auto", sim_threads=None, **overrides):
        if not isinstance(num_envs, (int, np.integer)) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        self.device = check_device(device)
        self.backend = resolve_backend(backend, self.device)
        physics_module = importlib.import_module(f"tasks.physics_{self.backend}")
        self.robot, self.task = robot, task
        self.robot_name, self.task_name = robot.NAME, task.NAME
        self.num_envs = int(num_envs)
        self.task_params = self._task_params(overrides, physics_module.OVERRIDES)
        self.has_amp_obs = hasattr(robot, "amp_observation")
        self.local_root_obs = self._local_root_obs(overrides)

        self.robot_xml = overrides.get("robot_xml")  # None: the robot's own MJCF_PATH
        self.spec = load_robot_spec(robot, self.robot_xml)
        self.mjm = self.spec.compile()
        self.decimation = int(overrides.get("decimation", robot.DECIMATION))
        if self.decimation < 1:
            raise ValueError(f"decimation must be >= 1, got {self.decimation}")
        self.physics_dt = float(self.mjm.opt.timestep)
        self.control_dt = self.decimation * self.physics_dt
        episode_length_s = float(overrides.get("episode_length_s", robot.EPISODE_LENGTH_S))
        self.max_episode_length = max(1, round(episode_length_s / self.control_dt))
        physics_overrides = {k: v for k, v in overrides.items() if k in physics_module.OVERRIDES}
        self.physics = physics_module.make_physics(robot, self.spec, self.mjm, self.num_envs, self.device,
                                                   self.decimation, sim_threads, **physics_overrides)
        self.sim = self.physics.views

        self.num_actions = self.mjm.nu
        self.num_task_obs = task.TASK_OBS_SIZE
        self.num_obs = robot.NUM_ROBOT_OBS + self.num_task_obs
        offset, scale = robot.pd_action_map(self.mjm)
        self.pd_offset = torch.as_tensor(offset, dtype=torch.float32, device=self.device)
        self.pd_scale = torch.as_tensor(scale, dtype=torch.float32, device=self.device)
        self._allocate_buffers(seed)
        self.reset()

    def _task_params(self, overrides, physics_overrides):
        """The task's settings: its defaults, the robot's TASK_PARAMS, then the overrides; a
        ValueError names unknown overrides and the allowed ones."""
        task_params = dict(self.task.DEFAULT_PARAMS)
        task_params.update(getattr(self.robot, "TASK_PARAMS", {}).get(self.task.NAME, {}))
        allowed = ENV_OVERRIDES + tuple(physics_overrides) + tuple(task_params)
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"unknown override(s) {unknown} for robot {self.robot.NAME!r}, task "
                             f"{self.task.NAME!r} and backend {self.backend!r}; allowed: {list(allowed)}")
        task_params.update({k: v for k, v in overrides.items() if k in task_params})
        return task_params

    def _local_root_obs(self, overrides):
        """ASE's localRootObs for the robot's policy and AMP observations: the override, else the robot's
        LOCAL_ROOT_OBS; a ValueError for a robot whose observations have no such setting."""
        if not hasattr(self.robot, "LOCAL_ROOT_OBS"):
            if overrides.get("local_root_obs"):
                raise ValueError(f"robot {self.robot.NAME!r} has no local_root_obs setting (only robots with "
                                 f"LOCAL_ROOT_OBS, e.g. the humanoid)")
            return None
        return bool(overrides.get("local_root_obs", self.robot.LOCAL_ROOT_OBS))

    def _allocate_buffers(self, seed):
        """Per-world episode buffers (sticky until reset_done), the generator, the task state."""
        n, dev = self.num_envs, self.device
        self.generator = torch.Generator(device=dev)  # every random draw of the env and task
        self.seed(seed)
        self.progress = torch.zeros(n, dtype=torch.int64, device=dev)  # control steps since reset
        self.done_buf = torch.zeros(n, dtype=torch.bool, device=dev)
        self.terminate_buf = torch.zeros(n, dtype=torch.bool, device=dev)
        self.time_outs_buf = torch.zeros(n, dtype=torch.bool, device=dev)
        self.prev_root_pos = torch.zeros(n, 3, dtype=torch.float32, device=dev)  # root at step start
        self.initial_qpos = torch.zeros_like(self.sim.qpos)  # state of each world's last reset
        self.initial_qvel = torch.zeros_like(self.sim.qvel)
        self.nonfinite_resets = torch.zeros((), dtype=torch.int64, device=dev)
        self.task_state = self.task.make_state(n, dev, self.task_params, self.control_dt)
        self.amp_history = make_amp_history(n, dev) if self.has_amp_obs else None

    RESUME_BUFFERS = ("progress", "done_buf", "terminate_buf", "time_outs_buf", "prev_root_pos", "initial_qpos",
                      "initial_qvel", "nonfinite_resets")

    def state_dict(self):
        """Everything that decides how the worlds go on: physics, episode buffers, the task's targets
        and timers, the AMP history and the generator. A checkpoint of it lets a resumed run continue
        the same episodes (exactly on the `mujoco` backend)."""
        return {"physics": self.physics.state_dict(), "generator": self.generator.get_state(),
                "buffers": {name: getattr(self, name).clone() for name in self.RESUME_BUFFERS},
                "task_state": {k: v.clone() for k, v in self.task_state.items() if torch.is_tensor(v)},
                "amp_history": None if self.amp_history is None else self.amp_history.clone()}

    def load_state_dict(self, state):
        """Restore state_dict() of an env built with the same robot, task, worlds and backend."""
        self.physics.load_state_dict(state["physics"])
        self.generator.set_state(state["generator"])
        for name in self.RESUME_BUFFERS:
            getattr(self, name).copy_(state["buffers"][name])
        for key, value in state["task_state"].items():
            self.task_state[key].copy_(value)
        if self.amp_history is not None:
            self.amp_history.copy_(state["amp_history"])

    # ------------------------------------------------------------ physics
    def physics_step(self):
        """Advance all worlds by one control step (decimation physics steps)."""
        self.physics.step()

    def forward(self, mask=None):
        """Recompute derived quantities (body poses, velocities) from qpos / qvel, of the worlds
        where mask [N] is True (all when None)."""
        self.physics.forward(mask)

    def describe_backend(self):
        """The backend, its device and threads, e.g. "mujoco (C MuJoCo 4.0.0, 2 threads)", and the user's
        body file when robot_xml was given."""
        body = f", robot_xml {self.robot_xml}" if self.robot_xml is not None else ""
        return self.physics.describe() + body

    # ------------------------------------------------------------ state
    def root_states(self):
        """The root body's state: "pos" [N, 3] (world frame, m), "quat" [N, 4] (w, x, y, z, body to
        world), "lin_vel" [N, 3] (world frame, m/s), "ang_vel" [N, 3] (world frame, rad/s; MuJoCo's
        free joint stores it in the body frame, rotated here)."""
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
        if self.local_root_obs is None:
            robot_obs = self.robot.compute_obs(self.sim)
        else:
            robot_obs = self.robot.compute_obs(self.sim, local_root_obs=self.local_root_obs)
        task_obs = self.task.observe(self.task_state, self._task_root())
        return {"obs": torch.cat([robot_obs, task_obs], dim=-1)}

    def reset_worlds(self, reset_mask):
        """Reset the worlds where reset_mask [N] is True; the others stay bit-identical."""
        mask = reset_mask[:, None]
        self.robot.reset_state(self.sim, reset_mask, self.generator)
        self.initial_qpos.copy_(torch.where(mask, self.sim.qpos, self.initial_qpos))
        self.initial_qvel.copy_(torch.where(mask, self.sim.qvel, self.initial_qvel))
        self._clear_dynamics(reset_mask)
        self.sim.time.masked_fill_(reset_mask, 0.0)
        self.sim.ctrl.copy_(torch.where(mask, self.pd_offset.expand_as(self.sim.ctrl), self.sim.ctrl))
        self.progress.masked_fill_(reset_mask, 0)
        for buf in (self.done_buf, self.terminate_buf, self.time_outs_buf):
            buf.masked_fill_(reset_mask, False)
        self.task.reset(self.task_state, self._task_root(), reset_mask, self.generator)

    def _clear_dynamics(self, mask):
        """A restarted world's trajectory depends only on its qpos / qvel: no accelerations or solver
        warm start carried over, and its control step starts where it stands."""
        self.physics.clear_dynamics(mask)
        self.prev_root_pos.copy_(torch.where(mask[:, None], self.sim.qpos[:, 0:3], self.prev_root_pos))

    def seed(self, seed):
        """Reseed the env's random generator (initial states, task targets)."""
        self.generator.manual_seed(seed)

    def reset(self):
        """Reset every world; returns {"obs": [N, num_obs]}."""
        reset_mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        self.reset_worlds(reset_mask)
        self.forward()
        self._fill_amp_history(reset_mask)
        return self.compute_obs()

    def reset_done(self):
        """Reset only the worlds that finished since their last reset; returns the obs of all worlds
        (the others' obs are the ones their last step returned)."""
        reset_mask = self.done_buf.clone()
        self.reset_worlds(reset_mask)
        if self.robot.NEEDS_FORWARD_AFTER_RESET:
            self.forward(reset_mask)
        self._fill_amp_history(reset_mask)
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
        return self._finish_step(reward, nonfinite)

    def compile_step(self):
        """torch.compile the tensor ops that follow the physics in step() (observations, checks, done flags, AMP
        history), with static shapes: one compilation. The physics, the restarts and the task's random draws
        stay eager. Same results as eager up to float rounding."""
        self._finish_step = torch.compile(self._finish_step, dynamic=False)

    def _finish_step(self, reward, nonfinite):
        """step() after the physics and the restarts of non-finite worlds; tensor ops only."""
        obs = self.compute_obs()["obs"]
        # a finite state with a non-finite reward or observation (the task's or the robot's maths): the
        # world ends as a failure and is reset by reset_done(); counted with the restarts
        bad_output = ~(torch.isfinite(reward) & torch.isfinite(obs).all(-1)) & ~nonfinite
        self.nonfinite_resets += bad_output.sum()
        nonfinite = nonfinite | bad_output
        reward = torch.where(nonfinite, 0.0, reward)
        self._update_done_flags(fell=self.robot.fallen(self.sim), nonfinite=nonfinite)
        obs = torch.where(nonfinite[:, None], torch.nan_to_num(obs, 0.0, 0.0, 0.0), obs)
        extras = {"terminate": self.terminate_buf.clone(), "time_outs": self.time_outs_buf.clone(),
                  "nonfinite": nonfinite}
        if self.has_amp_obs:
            extras["amp_obs"] = self._push_amp_frame(nonfinite)
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
        self.time_outs_buf |= newly_done & timed_out
        self.time_outs_buf &= ~nonfinite
        self.done_buf |= newly_done | nonfinite

    def overflowed(self):
        """Bool [N]: the world's contact or constraint buffers overflowed (contacts were dropped)."""
        return self.physics.overflowed()

    def get_task_obs_size(self):
        return self.num_task_obs

    # ------------------------------------------------------------ AMP observations
    def get_num_amp_obs(self):
        """Size of extras["amp_obs"]: NUM_AMP_OBS_STEPS frames (1250 for the humanoid); 0 for a robot
        without AMP observations."""
        return 0 if self.amp_history is None else self.amp_history[0].numel()

    def amp_observation(self):
        """The AMP frame of the current state of every world, [N, frame size] (125 for the humanoid);
        after a step it equals frame 0 of extras["amp_obs"] (except in worlds restarted as non-finite)."""
        if not self.has_amp_obs:
            raise ValueError(f"robot {self.robot.NAME!r} provides no AMP observations")
        return self.robot.amp_observation(self.sim, self.local_root_obs)

    def _fill_amp_history(self, reset_mask):
        """After a reset: every frame of the reset worlds' history becomes their current frame."""
        if self.has_amp_obs:
            fill_amp_history(self.amp_history, self.amp_observation(), reset_mask)

    def _push_amp_frame(self, nonfinite):
        """After a step: shift the history, the current frame in front (zeros in place of NaN / inf in
        the worlds that were just restarted); returns the flattened history [N, get_num_amp_obs()]."""
        frame = self.amp_observation()
        frame = torch.where(nonfinite[:, None], torch.nan_to_num(frame, 0.0, 0.0, 0.0), frame)
        push_amp_frame(self.amp_history, frame)
        return self.amp_history.reshape(self.num_envs, -1).clone()
