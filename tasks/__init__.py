"""Simulator side: batched MuJoCo Warp robots and tasks.

    from tasks import make_env, ROBOTS, TASKS
    env = make_env("ant", "heading", num_envs=64, device="cpu", seed=0)

A robot is one module (tasks/ant.py, tasks/humanoid.py), a task is one module (tasks/heading.py,
tasks/location.py, tasks/none.py); tasks/base.py documents what each must provide. Robot modules
are imported lazily, so an unavailable robot does not break the others.
"""

import importlib
import os

# Offscreen rendering (tasks/video.py) without a display: mujoco reads MUJOCO_GL when it is first
# imported, so it is set here, before any robot module imports mujoco. Set it yourself to override.
os.environ.setdefault("MUJOCO_GL", "egl")

ROBOTS = ("ant", "humanoid")
TASKS = ("heading", "location", "none")


def load_robot(robot):
    if robot not in ROBOTS:
        raise ValueError(f"unknown robot {robot!r}; valid robots: {list(ROBOTS)}")
    return importlib.import_module(f"tasks.{robot}")


def load_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")
    return importlib.import_module(f"tasks.{task}")


def make_env(robot, task, num_envs, device="cpu", seed=0, **overrides):
    """Batched env of `num_envs` worlds of `robot` doing `task` on `device` ("cpu" or "cuda:i").

    overrides: decimation (physics steps per control step), episode_length_s, capture (False: step
    eagerly instead of replaying the captured graph), nconmax / njmax (contact / constraint buffer
    sizes per world), and the task's parameters (e.g. speed_range, target_range,
    resample_interval_s)."""
    robot_module, task_module = load_robot(robot), load_task(task)
    from tasks.base import BatchedEnv

    return BatchedEnv(robot_module, task_module, num_envs, device=device, seed=seed, **overrides)
