"""Isaac Gym tasks (IsaacGymEnvs, or ASE's through a factory) behind this project's env contract.

The trainer drives every simulator through the same five members: num_envs, num_obs, num_actions,
reset(), step(actions) -> (obs_dict, reward, done, extras with "terminate" and "time_outs"), and
reset_done(). tasks/env.py gives them for MuJoCo; `IsaacGymEnv` below adapts an Isaac Gym VecTask.
Isaac Gym itself must be imported before torch (hrl_ppo_continuous.py does it for --env-backend
isaacgym); this module only needs torch.
"""

import importlib
import inspect

import torch


class IsaacGymEnv:
    """Adapts an Isaac Gym VecTask (IsaacGymEnvs, or ASE through --env-factory) to the env contract.

    step() returns (obs, reward, reset_buf, extras); obs is a dict {"obs": ...} (IsaacGymEnvs) or a
    tensor (ASE). Here: done = reset_buf; terminate = extras["terminate"] where the task reports it
    (ASE), else done and not extras["time_outs"] (IsaacGymEnvs); flags sticky until reset_done(),
    like the tasks/ envs.
    reset_done(): a task whose reset() takes env_ids (ASE) is asked to reset the finished envs (one
    host sync per high-level step, as in ASE). IsaacGymEnvs tasks reset finished envs themselves
    inside their next step(); there reset_done() only clears the flags, and the first high-level
    decision after an episode may see the terminal observation (as in rl_games and CleanRL)."""

    def __init__(self, vec_task):
        self.vec_task = vec_task
        self.num_envs = vec_task.num_envs
        self.num_obs = getattr(vec_task, "num_obs", None) or vec_task.observation_space.shape[0]
        self.num_actions = getattr(vec_task, "num_actions", None) or vec_task.action_space.shape[0]
        self.device = torch.device(getattr(vec_task, "rl_device", getattr(vec_task, "device", "cpu")))
        self.control_dt = float(getattr(vec_task, "dt", 0.0))
        self.max_episode_length = int(getattr(vec_task, "max_episode_length", 0))
        self.robot_name, self.task_name = "isaacgym", type(vec_task).__name__
        self.resets_by_env_ids = "env_ids" in inspect.signature(vec_task.reset).parameters
        self._done = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self._terminate = torch.zeros_like(self._done)
        self._time_outs = torch.zeros_like(self._done)
        self._obs_dict = None
        self.nonfinite_resets = torch.zeros((), dtype=torch.int64, device=self.device)

    def get_task_obs_size(self) -> int:
        get_size = getattr(self.vec_task, "get_task_obs_size", None)  # ASE tasks have it
        return int(get_size()) if get_size else 0

    def describe_backend(self) -> str:
        return f"isaacgym ({type(self.vec_task).__name__} on {self.device})"

    def reset(self):
        self._obs_dict = as_obs_dict(self.vec_task.reset())
        self._clear_flags()
        return self._obs_dict

    def _clear_flags(self):
        self._done.zero_()
        self._terminate.zero_()
        self._time_outs.zero_()

    def step(self, actions):
        obs, reward, reset_buf, extras = self.vec_task.step(actions)
        obs_dict = as_obs_dict(obs)
        nonfinite = ~(torch.isfinite(reward) & torch.isfinite(obs_dict["obs"]).all(-1))
        finished = reset_buf.to(torch.bool) | nonfinite
        if "terminate" in extras:  # ASE reports failures itself
            failed = extras["terminate"].to(torch.bool) | nonfinite
        else:
            failed = finished & ~(extras.get("time_outs", torch.zeros_like(finished)).to(torch.bool) & ~nonfinite)
        reward, obs_dict = self._drop_nonfinite(nonfinite, reward, obs_dict)
        newly_finished = finished & ~self._done
        self._terminate |= newly_finished & failed
        self._time_outs |= newly_finished & ~failed
        self._done |= finished
        self._obs_dict = obs_dict
        extras = dict(extras, terminate=self._terminate.clone(), time_outs=self._time_outs.clone(), nonfinite=nonfinite)
        return self._obs_dict, reward, self._done.clone(), extras

    def _drop_nonfinite(self, nonfinite, reward, obs_dict):
        """Envs with a non-finite reward or observation: counted, reward and observation zeroed, reported
        as failed, and reset (IsaacGymEnvs tasks through their reset_buf at their next step, ASE tasks by
        reset_done)."""
        self.nonfinite_resets += nonfinite.sum()
        if hasattr(self.vec_task, "reset_buf"):
            self.vec_task.reset_buf |= nonfinite.to(self.vec_task.reset_buf.dtype)
        reward = torch.where(nonfinite, torch.zeros_like(reward), reward)
        obs = torch.where(nonfinite[:, None], torch.nan_to_num(obs_dict["obs"], 0.0, 0.0, 0.0), obs_dict["obs"])
        return reward, dict(obs_dict, obs=obs)

    def reset_done(self):
        if self.resets_by_env_ids:
            done_env_ids = self._done.nonzero(as_tuple=False).squeeze(-1)
            if len(done_env_ids) > 0:
                self._obs_dict = as_obs_dict(self.vec_task.reset(done_env_ids))
        self._clear_flags()
        return self._obs_dict


def as_obs_dict(obs):
    return obs if isinstance(obs, dict) else {"obs": obs}


def make_isaacgym_env(task: str, num_envs: int, seed: int, device: str, env_factory=None) -> IsaacGymEnv:
    """`env_factory` ("module:function") or isaacgymenvs.make builds the VecTask, headless on `device`."""
    if env_factory:
        module_name, _, function_name = env_factory.partition(":")
        factory = getattr(importlib.import_module(module_name), function_name or "make")
    else:
        import isaacgymenvs

        factory = isaacgymenvs.make
    vec_task = factory(seed=seed, task=task, num_envs=num_envs, sim_device=device, rl_device=device,
                       graphics_device_id=-1, headless=True)
    return IsaacGymEnv(vec_task)
