"""Fake `isaacgymenvs` for tests: `make` with IsaacGymEnvs' signature returns a small VecTask."""
import isaacgym  # noqa: F401  (as in IsaacGymEnvs: isaacgym first)
from fake_vec_task import FakeVecTask


def make(seed, task, num_envs, sim_device, rl_device, graphics_device_id=-1, headless=False, multi_gpu=False,
         virtual_screen_capture=False, force_render=True, cfg=None):
    if task != "FakePointMass":
        raise ValueError(f"fake isaacgymenvs knows only task 'FakePointMass', got {task!r}")
    return FakeVecTask(num_envs=num_envs, device=rl_device, seed=seed)
