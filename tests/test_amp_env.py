"""AMP observations through the env (tasks/env.py), on both backends: extras["amp_obs"] is ASE's flattened
history [N, 10 x 125], newest frame first; a reset fills the reset worlds' history with their current
frame and leaves the others' alone; the local_root_obs override reaches the policy and the AMP
observation; a robot without AMP observations (the ant) reports 0."""

import pytest
import torch

import tasks.amp as amp
import tasks.humanoid as humanoid
from conftest import TEST_BACKENDS, random_actions

STEPS, FRAME = amp.NUM_AMP_OBS_STEPS, amp.NUM_AMP_OBS_PER_STEP


def history(extras):
    """extras["amp_obs"] [N, 1250] as frames [N, 10, 125]."""
    return extras["amp_obs"].view(-1, STEPS, FRAME)


def stepped(env, generator, steps):
    """The AMP histories [N, 10, 125] after each of `steps` random steps from a reset."""
    env.reset()
    return [history(env.step(random_actions(env, generator))[3]) for _ in range(steps)]


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_amp_obs_shape_and_current_frame(make_test_env, backend):
    env = make_test_env("humanoid", "heading", backend=backend)
    assert env.get_num_amp_obs() == STEPS * FRAME == 1250
    env.reset()
    _, _, _, extras = env.step(random_actions(env, torch.Generator().manual_seed(0)))
    assert extras["amp_obs"].shape == (env.num_envs, 1250) and extras["amp_obs"].dtype == torch.float32
    assert torch.isfinite(extras["amp_obs"]).all()
    torch.testing.assert_close(history(extras)[:, 0], env.amp_observation(), atol=0, rtol=0)


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_history_is_newest_first_across_steps(make_test_env, backend):
    env = make_test_env("humanoid", "heading", backend=backend)
    histories = stepped(env, torch.Generator().manual_seed(1), steps=3)
    for older, newer in zip(histories, histories[1:]):
        assert torch.equal(newer[:, 1:], older[:, :-1])  # frame i of step t is frame i + 1 of step t + 1
        assert not torch.equal(newer[:, 0], older[:, 0])
    # after reset() every frame was the reset state's: frames 3.. of the third step are still that one
    assert torch.equal(histories[-1][:, 3:], histories[-1][:, 3:4].expand(-1, STEPS - 3, -1))


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_reset_fills_the_history_of_reset_worlds_only(make_test_env, backend):
    env = make_test_env("humanoid", "heading", backend=backend)
    generator = torch.Generator().manual_seed(2)
    before = stepped(env, generator, steps=3)[-1]
    reset_mask = torch.tensor([True, False, True, False])
    env.done_buf |= reset_mask  # as if worlds 0 and 2 had just finished
    env.reset_done()
    current = env.amp_observation()
    assert torch.equal(env.amp_history[reset_mask], current[reset_mask, None].expand(-1, STEPS, -1))
    assert torch.equal(env.amp_history[~reset_mask], before[~reset_mask])
    after = history(env.step(random_actions(env, generator))[3])
    assert torch.equal(after[reset_mask, 1:], current[reset_mask, None].expand(-1, STEPS - 1, -1))
    assert torch.equal(after[~reset_mask, 1:], before[~reset_mask, :-1])  # the others keep shifting


@pytest.mark.parametrize("local_root_obs", [True, False])
def test_local_root_obs_reaches_the_policy_and_amp_observations(make_test_env, local_root_obs):
    env = make_test_env("humanoid", "heading", local_root_obs=local_root_obs)
    env.reset()
    obs, _, _, extras = env.step(random_actions(env, torch.Generator().manual_seed(3)))
    robot_obs = obs["obs"][:, :humanoid.NUM_ROBOT_OBS]
    torch.testing.assert_close(robot_obs, humanoid.compute_obs(env.sim, local_root_obs=local_root_obs), atol=0, rtol=0)
    torch.testing.assert_close(history(extras)[:, 0], amp.amp_observation(env.sim, local_root_obs), atol=0, rtol=0)


def test_local_root_obs_defaults_to_false(make_test_env):
    env = make_test_env("humanoid", "heading")
    env.reset()
    assert env.local_root_obs is False
    torch.testing.assert_close(env.compute_obs()["obs"][:, :humanoid.NUM_ROBOT_OBS],
                               humanoid.compute_obs(env.sim, local_root_obs=False), atol=0, rtol=0)


def test_ant_has_no_amp_observations(ant_heading_env, make_test_env):
    env = ant_heading_env
    env.reset()
    _, _, _, extras = env.step(torch.zeros(env.num_envs, env.num_actions))
    assert env.get_num_amp_obs() == 0 and "amp_obs" not in extras
    with pytest.raises(ValueError, match="provides no AMP observations"):
        env.amp_observation()
    with pytest.raises(ValueError, match="no local_root_obs setting"):
        make_test_env("ant", "heading", local_root_obs=True)
