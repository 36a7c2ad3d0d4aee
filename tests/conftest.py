"""Shared pytest fixtures for the simulator side (tasks/).

Fixtures are session-scoped so MuJoCo Warp kernels compile once per test session; every env has a
small N (NUM_TEST_ENVS = 4) on CPU. Tests that step a shared env must call env.reset() first and must
not depend on what other tests did to it.

    ant_heading_env, ant_location_env, ant_none_env   BatchedEnv for the ant with each task
    make_test_env(robot, task, **kw)                  cached factory: one env per (robot, task, kwargs)
                                                      for the whole session; robot test files (e.g.
                                                      tests/test_humanoid.py) use it as
                                                      `make_test_env("humanoid", "heading")`
    random_actions(env, generator)                    helper (plain function, import from conftest):
                                                      uniform actions in [-1, 1]
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_TEST_ENVS = 4


def random_actions(env, generator):
    """Uniform random actions in [-1, 1], shape [num_envs, num_actions], on env.device."""
    return torch.rand(env.num_envs, env.num_actions, generator=generator, device=env.device) * 2.0 - 1.0


@pytest.fixture(scope="session")
def make_test_env():
    from tasks import make_env

    cache = {}

    def factory(robot, task, num_envs=NUM_TEST_ENVS, seed=0, **overrides):
        key = (robot, task, num_envs, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_env(robot, task, num_envs, device="cpu", seed=seed, **overrides)
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
