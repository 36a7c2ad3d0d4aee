"""Simulator side: batched robots and tasks over MuJoCo Warp or C MuJoCo.

    from tasks import make_env, ROBOTS, TASKS
    env = make_env("ant", "heading", num_envs=64, device="cpu", seed=0)

A robot is one module (tasks/ant.py, tasks/humanoid.py), a task is one module (tasks/heading.py,
tasks/location.py, tasks/none.py); tasks/base.py documents what each must provide. The env
(tasks/env.py) holds the episode logic once, over one physics backend: tasks/physics_mjwarp.py
(MuJoCo Warp, the default on a CUDA device) or tasks/physics_mujoco.py (C MuJoCo on all CPU cores,
the default on the CPU). Robot and backend modules are imported lazily, so an unavailable one does
not break the others.
"""

import importlib
import os

# Offscreen rendering (tasks/video.py) without a display: mujoco reads MUJOCO_GL when it is first
# imported, so it is set here, before any robot module imports mujoco. Set it yourself to override.
os.environ.setdefault("MUJOCO_GL", "egl")

ROBOTS = ("ant", "humanoid")
TASKS = ("heading", "location", "none")
BACKENDS = ("auto", "mjwarp", "mujoco")  # auto: mjwarp on a CUDA device, mujoco on the CPU


def load_robot(robot):
    if robot not in ROBOTS:
        raise ValueError(f"unknown robot {robot!r}; valid robots: {list(ROBOTS)}")
    return importlib.import_module(f"tasks.{robot}")


def load_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")
    return importlib.import_module(f"tasks.{task}")


def load_robot_spec(robot, robot_xml=None):
    """The MjSpec the env simulates for `robot` (a name in ROBOTS or a robot module): its own MJCF_PATH, or
    with robot_xml the user's file at that path converted by the robot's `convert_robot_xml` (the humanoid:
    ASE's amp_humanoid.xml, tasks/ase_mjcf.py). ValueError naming a robot that takes no robot_xml, a path
    that is not a file, or a file whose layout is not the robot's."""
    import mujoco

    module = load_robot(robot) if isinstance(robot, str) else robot
    if robot_xml is None:
        return mujoco.MjSpec.from_file(module.MJCF_PATH)
    if not hasattr(module, "convert_robot_xml"):
        takers = [name for name in ROBOTS if hasattr(load_robot(name), "convert_robot_xml")]
        raise ValueError(f"robot {module.NAME!r} takes no robot_xml (it simulates {module.MJCF_PATH}), got "
                         f"{str(robot_xml)!r}; robots that take one: {takers}")
    if not os.path.isfile(robot_xml):
        raise ValueError(f"robot_xml {str(robot_xml)!r} is not a file; expected the path of an MJCF file "
                         f"for robot {module.NAME!r}")
    return module.convert_robot_xml(robot_xml)


def quiet_warp(device):
    """Keep MuJoCo Warp's console output to what a user needs: no init banner, no per-module load
    lines, and, on a machine without a CUDA device, no CUDA-driver warning (Warp's C library prints it
    to stderr while initialising). On a cold kernel cache, one line says that compilation is coming."""
    import warp as wp

    wp.config.log_level = wp.LOG_WARNING
    if str(device).startswith("cpu"):
        with _stderr_to_devnull():
            wp.init()  # initialises once; later calls return at once
    cache = wp.config.kernel_cache_dir
    if not cache or not any(name.startswith("wp_mujoco_warp") for name in _listdir(cache)):
        print(f"MuJoCo Warp: compiling its kernels for {device} on first use (about a minute on a CPU, "
              f"less on a GPU; cached in {cache})", flush=True)


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


class _stderr_to_devnull:
    """Redirect file descriptor 2 (C-level stderr too) to /dev/null inside the block."""

    def __enter__(self):
        import sys

        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def make_env(robot, task, num_envs, device="cpu", seed=0, backend="auto", sim_threads=None, verbose=False,
             **overrides):
    """Batched env of `num_envs` worlds of `robot` doing `task` on `device` ("cpu" or "cuda:i").

    backend: one of BACKENDS. sim_threads: threads of the `mujoco` backend (default: all cores;
    MuJoCo Warp does not use it). verbose: let MuJoCo Warp print its banner and kernel loading
    (quiet by default). overrides: decimation (physics steps per control step), episode_length_s,
    robot_xml (the humanoid: the path of a user's copy of ASE's amp_humanoid.xml to simulate instead of
    assets/humanoid.xml, converted in memory, see load_robot_spec), local_root_obs (the humanoid: ASE's
    localRootObs), the task's parameters (e.g. speed_range, target_range, resample_interval_s), and for `mjwarp`
    capture (False: step eagerly instead of replaying the captured graph) and nconmax / njmax
    (contact / constraint buffer sizes per world)."""
    robot_module, task_module = load_robot(robot), load_task(task)
    from tasks.base import check_device
    from tasks.env import BatchedEnv, resolve_backend

    if resolve_backend(backend, check_device(device)) == "mjwarp" and not verbose:
        quiet_warp(device)

    return BatchedEnv(robot_module, task_module, num_envs, device=device, seed=seed, backend=backend,
                      sim_threads=sim_threads, **overrides)
