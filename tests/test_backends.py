"""The two physics backends behind one env: same actions from the same state, same trajectory.

MuJoCo Warp computes in float32, C MuJoCo (backend `mujoco`) in float64, so the trajectories agree
to float32 rounding grown over the steps, not bit for bit. Driven by smooth PD targets (a slow sine
per joint; the ant walks on its feet, the humanoid sways and stumbles, with floor contacts) for 30
control steps, measured per world and step: max |qpos difference| about 1e-6 (ant) and 2e-5
(humanoid), obs 3e-5 and 5e-4 (the obs hold body velocities, which magnify position rounding by
1 / dt), reward 1e-6 and 1e-5. The exception is a contact event: when a foot touches down exactly
at a physics step boundary, rounding decides on which step the contact starts, and that world jumps
to about 1e-3 in qpos (7e-2 in the obs: joint velocities) for a few steps, then converges again
(seen in 1 of 4 ant worlds for 5 of 30 steps). So the check is two-level: at least 90% of the (world, step)
pairs within the rounding bounds below (about 10x the measured values), and every pair within the contact-event bounds
(about 4x the largest jump). A modelling difference between the backends (a missing contact
pair, a different solver setting, a stale body pose) shows up as 1e-2 and more, in every world.
Random actions are not used: they make and break contacts all the time, and the trajectories
diverge chaotically."""

import mujoco
import numpy as np
import pytest
import torch

from tasks import ROBOTS, TASKS

STEPS = 30
ROUNDING_ATOL = {"qpos": 1e-4, "obs": 5e-3, "reward": 1e-4}
CONTACT_EVENT_ATOL = {"qpos": 5e-3, "obs": 0.3, "reward": 5e-3}


def sine_actions(step, env):
    phases = torch.arange(env.num_actions) * 0.7
    return 0.3 * torch.sin(0.1 * step + phases).expand(env.num_envs, env.num_actions)


def world_errors(warp_env, c_env, warp_result, c_result):
    """Max |difference| per world [N] of qpos, obs and reward after one step of both envs."""
    (warp_obs, warp_reward, _, _), (c_obs, c_reward, _, _) = warp_result, c_result
    return {"qpos": (c_env.sim.qpos - warp_env.sim.qpos).abs().amax(-1),
            "obs": (c_obs["obs"] - warp_obs["obs"]).abs().amax(-1), "reward": (c_reward - warp_reward).abs()}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("robot", ROBOTS)
def test_same_actions_same_trajectory(make_test_env, robot, task):
    warp_env, c_env = (make_test_env(robot, task, backend=backend) for backend in ("mjwarp", "mujoco"))
    for env in (warp_env, c_env):
        env.seed(11)
    warp_obs, c_obs = warp_env.reset()["obs"], c_env.reset()["obs"]
    assert torch.equal(warp_env.sim.qpos, c_env.sim.qpos)  # the same initial state ...
    torch.testing.assert_close(c_obs, warp_obs, atol=1e-6, rtol=0)  # ... seen through each backend's kinematics
    errors = {name: [] for name in ROUNDING_ATOL}
    for step in range(STEPS):
        actions = sine_actions(step, warp_env)
        warp_result, c_result = warp_env.step(actions), c_env.step(actions)
        assert torch.equal(c_result[2], warp_result[2])  # done
        for name, error in world_errors(warp_env, c_env, warp_result, c_result).items():
            errors[name].append(error)
        if step % 5 == 4:
            warp_env.reset_done(), c_env.reset_done()
    for name, per_step in errors.items():
        error = torch.stack(per_step)  # [STEPS, N]
        within_rounding = (error <= ROUNDING_ATOL[name]).float().mean().item()
        assert within_rounding >= 0.9, f"{name}: only {within_rounding:.0%} of (world, step) within {ROUNDING_ATOL[name]}"
        assert error.max() <= CONTACT_EVENT_ATOL[name], f"{name}: max difference {error.max():.2e}"


def test_mujoco_body_views_are_mujocos_kinematics(make_test_env):
    """xpos / xquat / cvel of the C backend (rebuilt from frame sensors) equal mj_forward's, to
    float32 rounding."""
    env = make_test_env("humanoid", "none")
    env.reset()
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):
        env.step(torch.rand(env.num_envs, env.num_actions, generator=generator) * 2 - 1)
    env.forward()
    data = mujoco.MjData(env.mjm)
    for world in range(env.num_envs):
        data.qpos[:] = env.physics.state[world, 1:1 + env.mjm.nq]
        data.qvel[:] = env.physics.state[world, 1 + env.mjm.nq:1 + env.mjm.nq + env.mjm.nv]
        mujoco.mj_forward(env.mjm, data)
        np.testing.assert_allclose(env.sim.xpos[world].numpy(), data.xpos, atol=1e-6, rtol=0)
        np.testing.assert_allclose(env.sim.xquat[world].numpy(), data.xquat, atol=1e-6, rtol=0)
        np.testing.assert_allclose(env.sim.cvel[world].numpy(), data.cvel, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", ("mjwarp", "mujoco"))
def test_masked_forward_keeps_the_other_worlds(make_test_env, backend):
    """forward(mask) recomputes the body views of the masked worlds only: after reset_done, a world
    that did not finish shows the obs its last step returned."""
    env = make_test_env("humanoid", "none", backend=backend)
    env.reset()
    obs = env.step(torch.zeros(env.num_envs, env.num_actions))[0]["obs"]
    env.done_buf[1] = True
    after = env.reset_done()["obs"]
    kept = torch.tensor([True, False, True, True])
    assert torch.equal(after[kept], obs[kept]) and not torch.equal(after[1], obs[1])
