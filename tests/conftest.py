"""Shared pytest fixtures for the simulator side (tasks/).

Fixtures are session-scoped so MuJoCo Warp kernels compile once per test session; every env has a
small N (NUM_TEST_ENVS = 4) on CPU. Tests that step a shared env must call env.reset() first and must
not depend on what other tests did to it.

    ant_heading_env, ant_location_env, ant_none_env   BatchedEnv for the ant with each task (backend
                                                      `mujoco`, the CPU default)
    make_test_env(robot, task, tag="", backend="mujoco", **overrides)
                                                      cached factory: one env per (robot, task, tag,
                                                      backend, overrides) for the whole session; a
                                                      different `tag` gives a second, independent env
                                                      with the same settings. Robot test files (e.g.
                                                      tests/test_humanoid.py) call
                                                      `make_test_env("humanoid", "heading")`.
    TEST_BACKENDS                                     the backends the robot-independent checks run on
    env_checks                                        the robot-independent checks below, as a namespace:
                                                      env_checks.obs_layout(env), .subset_reset(env, twin),
                                                      .capture_matches_eager(env, eager_env),
                                                      .same_seed_same_rollout(env, twin),
                                                      .random_rollout_is_finite(env, steps),
                                                      .matches_c_mujoco(env, steps, atol);
                                                      tests/test_tasks.py runs them for the ant, a robot's
                                                      own test file runs them for that robot.
"""

import os
import sys
import types

# mujoco picks its OpenGL backend when first imported: headless EGL for the video test (see tasks/video.py)
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_TEST_ENVS = 4
TEST_BACKENDS = ("mjwarp", "mujoco")
CUDA_MARKER = "cuda: needs a CUDA device (skipped without one); select with -m cuda"


def pytest_configure(config):
    """Register the `cuda` marker unless a marker of that name is registered already (an ini file, a plugin)."""
    registered = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    if "cuda" not in registered:
        config.addinivalue_line("markers", CUDA_MARKER)


def random_actions(env, generator):
    """Uniform random actions in [-1, 1], shape [num_envs, num_actions], on env.device."""
    return torch.rand(env.num_envs, env.num_actions, generator=generator, device=env.device) * 2.0 - 1.0


@pytest.fixture(scope="session")
def make_test_env():
    from tasks import make_env

    cache = {}

    def factory(robot, task, num_envs=NUM_TEST_ENVS, seed=0, tag="", backend="mujoco", **overrides):
        key = (robot, task, num_envs, seed, tag, backend, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_env(robot, task, num_envs, device="cpu", seed=seed, backend=backend, **overrides)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def ant_heading_env(make_test_env):
    return make_test_env("ant", "heading")


@pytest.fixture(scope="session")
def ant_location_env(make_test_env):
    return make_test_env("ant", "location")


@pytest.fixture(scope="session")
def ant_none_env(make_test_env):
    return make_test_env("ant", "none")


# ---------------------------------------------------------------- robot-independent checks
def check_obs_layout(env):
    """Obs shape, and the task obs is the tail: LLC obs = robot obs, task obs = task.observe()."""
    obs = env.reset()["obs"]
    assert obs.shape == (env.num_envs, env.num_obs) and obs.dtype == torch.float32
    assert obs.device == env.device
    task_size = env.get_task_obs_size()
    assert env.num_obs == env.robot.NUM_ROBOT_OBS + task_size
    torch.testing.assert_close(obs[:, : env.num_obs - task_size], env.robot.compute_obs(env.sim), rtol=0, atol=0)
    task_obs = env.task.observe(env.task_state, env._task_root())
    torch.testing.assert_close(obs[:, env.num_obs - task_size:], task_obs, rtol=0, atol=0)


def check_subset_reset(env, twin, steps=15):
    """env and twin: same robot/task/seed. Reset worlds 0 and 2 of env midway; worlds 1 and 3 must stay
    bit-identical to the twin's (the twin is not reset)."""
    generator = torch.Generator().manual_seed(3)
    for e in (env, twin):
        e.seed(7)
        e.reset()
    for _ in range(steps):
        actions = random_actions(env, generator)
        env.step(actions), twin.step(actions)
    reset_mask = torch.tensor([True, False, True, False] + [False] * (env.num_envs - 4))
    kept = ~reset_mask
    env.reset_worlds(reset_mask)
    assert torch.equal(env.sim.qpos[kept], twin.sim.qpos[kept])
    assert not torch.equal(env.sim.qpos[reset_mask], twin.sim.qpos[reset_mask])
    assert torch.all(env.progress[reset_mask] == 0) and torch.all(env.progress[kept] == steps)
    for _ in range(steps):
        actions = random_actions(env, generator)
        env.step(actions), twin.step(actions)
    assert torch.equal(env.sim.qpos[kept], twin.sim.qpos[kept])
    assert torch.equal(env.sim.qvel[kept], twin.sim.qvel[kept])


def check_capture_matches_eager(env, eager_env, steps=20):
    """The replayed graph (env) and eager stepping (eager_env, capture=False) agree bit for bit."""
    assert env.physics.physics_graph is not None and eager_env.physics.physics_graph is None
    generator = torch.Generator().manual_seed(4)
    for e in (env, eager_env):
        e.seed(8)
        e.reset()
    assert torch.equal(env.sim.qpos, eager_env.sim.qpos)
    for _ in range(steps):
        actions = random_actions(env, generator)
        env.step(actions), eager_env.step(actions)
    assert torch.equal(env.sim.qpos, eager_env.sim.qpos)
    assert torch.equal(env.sim.qvel, eager_env.sim.qvel)


def check_same_seed_same_rollout(env, twin, steps=20):
    """Two envs built with the same seed produce identical obs, rewards and dones."""
    for e in (env, twin):
        e.seed(123)
    obs_a, obs_b = env.reset()["obs"], twin.reset()["obs"]
    assert torch.equal(obs_a, obs_b)
    generator = torch.Generator().manual_seed(5)
    for _ in range(steps):
        actions = random_actions(env, generator)
        (obs_a, rew_a, done_a, _), (obs_b, rew_b, done_b, _) = env.step(actions), twin.step(actions)
        assert torch.equal(obs_a["obs"], obs_b["obs"]) and torch.equal(rew_a, rew_b)
        assert torch.equal(done_a, done_b)


def check_random_rollout_is_finite(env, steps=1000, reset_every=5):
    """Random actions for `steps` control steps (reset_done every `reset_every`): every obs and
    reward finite, no non-finite world, no contact / constraint buffer overflow."""
    generator = torch.Generator().manual_seed(6)
    env.reset()
    resets_before = int(env.nonfinite_resets)
    all_finite = torch.ones((), dtype=torch.bool)
    for step in range(steps):
        obs_dict, reward, done, extras = env.step(random_actions(env, generator))
        all_finite &= torch.isfinite(obs_dict["obs"]).all() & torch.isfinite(reward).all()
        all_finite &= ~extras["nonfinite"].any()
        if (step + 1) % reset_every == 0:
            env.reset_done()
    assert bool(all_finite)
    assert int(env.nonfinite_resets) == resets_before
    assert not env.overflowed().any(), f"buffer overflow bits {env.sim.overflow.tolist()}"


def check_matches_c_mujoco(env, steps, atol, actions_fn):
    """World 0 of the env against plain C MuJoCo (an mj_step loop) on the same MJCF model, same
    initial state and same PD targets; max |qpos difference| over the trajectory must stay below atol."""
    import mujoco  # here, not at the top: the pure-torch tests run without the simulator installed

    env.reset()
    data = mujoco.MjData(env.mjm)
    data.qpos[:] = env.sim.qpos[0].double().numpy()
    data.qvel[:] = env.sim.qvel[0].double().numpy()
    max_error = 0.0
    for step in range(steps):
        env.step(actions_fn(step, env))
        data.ctrl[:] = env.sim.ctrl[0].double().numpy()
        for _ in range(env.decimation):
            mujoco.mj_step(env.mjm, data)
        max_error = max(max_error, float(np.abs(data.qpos - env.sim.qpos[0].double().numpy()).max()))
    assert max_error < atol, f"max |qpos_warp - qpos_c| = {max_error:.2e} >= {atol:.1e}"
    return max_error


@pytest.fixture(scope="session")
def env_checks():
    return types.SimpleNamespace(
        obs_layout=check_obs_layout, subset_reset=check_subset_reset,
        capture_matches_eager=check_capture_matches_eager,
        same_seed_same_rollout=check_same_seed_same_rollout,
        random_rollout_is_finite=check_random_rollout_is_finite, matches_c_mujoco=check_matches_c_mujoco,
        random_actions=random_actions)
