"""Tests of the simulator side (tasks/): the batched env on both backends, the ant, the tasks, the registry.

Fixtures and robot-independent checks live in tests/conftest.py (session-scoped, N = 4, CPU); the
robot-independent checks run on every backend in TEST_BACKENDS, the rest on the CPU default `mujoco`."""

import math
import os
import subprocess
import sys

import pytest
import numpy as np
import torch
import warp as wp
from conftest import TEST_BACKENDS

from tasks import BACKENDS, ROBOTS, TASKS, heading, location, make_env
from tasks.env import resolve_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- sizes and layout
@pytest.mark.parametrize("backend", TEST_BACKENDS)
@pytest.mark.parametrize("task, task_size", [("heading", 5), ("location", 2), ("none", 0)])
def test_ant_sizes(make_test_env, env_checks, task, task_size, backend):
    env = make_test_env("ant", task, backend=backend)
    assert (env.num_obs, env.get_task_obs_size(), env.num_actions) == (29 + task_size, task_size, 8)
    assert env.control_dt == pytest.approx(0.03) and env.max_episode_length == 500
    assert (env.robot_name, env.task_name) == ("ant", task)
    env_checks.obs_layout(env)


def test_ant_obs_of_hand_set_state(ant_heading_env):
    """Root yawed by 90 deg, moving along world +y at 0.5 m/s: heading-frame velocity is +x."""
    env = ant_heading_env
    env.reset()
    yaw = math.pi / 2
    env.sim.qpos[:, 3:7] = torch.tensor([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])
    env.sim.qpos[:, 2] = 0.5
    env.sim.qvel[:, :] = 0.0
    env.sim.qvel[:, 1] = 0.5
    env.task_state["target_dir"][:] = torch.tensor([0.0, 1.0])  # world +y = heading-frame forward
    env.task_state["target_facing"][:] = torch.tensor([-1.0, 0.0])  # world -x = heading-frame +y
    env.task_state["target_speed"][:] = 0.7
    obs = env.compute_obs()["obs"]
    expected_root = torch.tensor([0.5, 1, 0, 0, 0, 0, 1, 0.5, 0, 0, 0, 0, 0])
    torch.testing.assert_close(obs[:, :13], expected_root.expand(4, 13), atol=1e-6, rtol=0)
    torch.testing.assert_close(obs[:, -5:], torch.tensor([1.0, 0, 0.7, 0, 1]).expand(4, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(obs[:, 13:21], env.sim.qpos[:, 7:15], atol=0, rtol=0)


# ---------------------------------------------------------------- simulator state shared with torch
def simulator_arrays(env):
    """The simulator's own qpos and ctrl (numpy): MuJoCo Warp's arrays, or the float32 arrays the
    C backend's views wrap."""
    if env.backend == "mjwarp":
        return env.physics.d.qpos.numpy(), env.physics.d.ctrl.numpy()
    return env.physics.state32[:, 1:1 + env.mjm.nq], env.physics.ctrl32


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_zero_copy_views(make_test_env, backend):
    env = make_test_env("ant", "none", backend=backend)
    env.reset()
    env.sim.qpos[2, 0] = 5.0  # write through the torch view ...
    assert simulator_arrays(env)[0][2, 0] == 5.0  # ... reaches the simulator
    assert env.root_states()["pos"].data_ptr() == env.sim.qpos.data_ptr()
    if backend == "mjwarp":
        assert env.sim.qpos.data_ptr() == wp.to_torch(env.physics.d.qpos).data_ptr()
    actions = torch.linspace(-2.0, 2.0, 8).expand(4, 8)  # outside [-1, 1]: clamped
    env.step(actions)
    expected_ctrl = env.pd_offset + env.pd_scale * actions.clamp(-1, 1)
    torch.testing.assert_close(torch.from_numpy(simulator_arrays(env)[1]), expected_ctrl, atol=1e-6, rtol=0)


def test_mujoco_backend_takes_what_torch_wrote_and_keeps_float64_elsewhere(ant_none_env):
    """A value written through the float32 view replaces the float64 state; untouched values keep
    their float64 precision."""
    env = ant_none_env
    env.reset()
    env.step(torch.zeros(4, 8))
    state = env.physics.state
    assert not np.array_equal(state[:, 1:16], state[:, 1:16].astype(np.float32))  # float64 digits kept
    env.sim.qpos[1, 2] = 0.7
    kept = state[0].copy()
    env.forward()
    assert state[1, 3] == np.float32(0.7) and np.array_equal(state[0], kept)


def test_root_states_frames(ant_none_env):
    env = ant_none_env
    env.reset()
    yaw = math.pi / 2
    env.sim.qpos[:, 3:7] = torch.tensor([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])
    env.sim.qvel[:, 3:6] = torch.tensor([1.0, 0.0, 0.0])  # body-local roll rate
    root = env.root_states()
    torch.testing.assert_close(root["ang_vel"], torch.tensor([0.0, 1.0, 0.0]).expand(4, 3), atol=1e-6, rtol=0)
    assert root["quat"].shape == (4, 4) and root["lin_vel"].shape == (4, 3)


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_subset_reset_leaves_others_bit_identical(make_test_env, env_checks, backend):
    env_checks.subset_reset(make_test_env("ant", "heading", backend=backend),
                            make_test_env("ant", "heading", tag="twin", backend=backend))


def test_captured_replay_equals_eager(make_test_env, env_checks):
    env_checks.capture_matches_eager(make_test_env("ant", "none", backend="mjwarp"),
                                     make_test_env("ant", "none", backend="mjwarp", capture=False))


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_same_seed_same_rollout(make_test_env, env_checks, backend):
    env_checks.same_seed_same_rollout(make_test_env("ant", "heading", backend=backend),
                                      make_test_env("ant", "heading", tag="twin", backend=backend))


def test_different_seed_different_reset(make_test_env):
    a, b = make_test_env("ant", "none"), make_test_env("ant", "none", seed=1)
    assert not torch.equal(a.reset()["obs"], b.reset()["obs"])


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_random_rollout_finite_no_overflow(make_test_env, env_checks, backend):
    env_checks.random_rollout_is_finite(make_test_env("ant", "heading", backend=backend), steps=1000)


def test_overflow_is_detected(make_test_env):
    env = make_test_env("ant", "none", backend="mjwarp", nconmax=1)  # a standing ant has 4 floor contacts
    env.reset()
    for _ in range(20):  # the ant drops onto its feet
        env.step(torch.zeros(4, 8))
    assert env.overflowed().all()


def test_decimation_override(make_test_env):
    env = make_test_env("ant", "none", decimation=2)
    assert env.control_dt == pytest.approx(0.02) and env.max_episode_length == 750
    time_before = env.sim.time.clone()
    env.step(torch.zeros(4, 8))
    torch.testing.assert_close(env.sim.time - time_before, torch.full((4,), 0.02), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_matches_c_mujoco(make_test_env, env_checks, backend):
    # Smooth PD targets (a slow sine per joint) while the ant stands on its four feet. Measured error
    # ~1e-6 over 60 control steps: float32 (MuJoCo Warp) vs float64 (C) rounding. 1e-4 leaves
    # margin without hiding a modelling difference (those show up as errors of 1e-2 and more).
    # Random actions are not used: they make and break contacts, where a rounding-level difference
    # decides whether a contact exists in a step and the two trajectories diverge chaotically.
    phases = torch.arange(8) * 0.7

    def sine_actions(step, env):
        return 0.3 * torch.sin(0.1 * step + phases).expand(env.num_envs, 8)

    env_checks.matches_c_mujoco(make_test_env("ant", "none", backend=backend), steps=60, atol=1e-4,
                                actions_fn=sine_actions)


# ---------------------------------------------------------------- episode bookkeeping
@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_sticky_done_and_reset_done(make_test_env, backend):
    env = make_test_env("ant", "none", backend=backend, episode_length_s=0.3)  # 10 control steps
    assert env.max_episode_length == 10
    env.reset()
    zeros = torch.zeros(4, 8)
    for _ in range(4):
        env.step(zeros)
    env.reset_worlds(torch.tensor([False, False, True, True]))  # worlds 2, 3 start 4 steps later
    for _ in range(6):
        _, _, done, extras = env.step(zeros)
    assert done.tolist() == [True, True, False, False]
    assert extras["time_outs"].tolist() == [True, True, False, False]
    assert not extras["terminate"].any()
    for _ in range(2):  # finished worlds keep reporting done until reset_done
        _, _, done, extras = env.step(zeros)
        assert done.tolist() == [True, True, False, False] and extras["time_outs"][:2].all()
    qpos_running = env.sim.qpos[2:].clone()
    env.reset_done()
    assert env.progress.tolist() == [0, 0, 8, 8] and not env.done_buf.any()
    assert torch.equal(env.sim.qpos[2:], qpos_running)


def test_flipped_ant_terminates(ant_none_env):
    env = ant_none_env
    env.reset()
    env.sim.qpos[1, 3:7] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # upside down
    env.sim.qpos[1, 2] = 0.6
    _, _, done, extras = env.step(torch.zeros(4, 8))
    assert done.tolist() == [False, True, False, False]
    assert extras["terminate"].tolist() == [False, True, False, False] and not extras["time_outs"].any()
    _, _, done, extras = env.step(torch.zeros(4, 8))  # sticky, whatever the world does now
    assert done[1] and extras["terminate"][1]


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_nonfinite_world_is_reset_and_reported(make_test_env, backend):
    env = make_test_env("ant", "heading", backend=backend)
    env.reset()
    before = int(env.nonfinite_resets)
    env.sim.qvel[2, 0] = float("nan")
    qpos_others = env.sim.qpos[[0, 1, 3]].clone()
    obs_dict, reward, done, extras = env.step(torch.zeros(4, 8))
    assert extras["nonfinite"].tolist() == [False, False, True, False]
    assert done[2] and extras["terminate"][2] and not extras["time_outs"][2]
    assert torch.isfinite(obs_dict["obs"]).all() and torch.isfinite(reward).all()
    assert torch.isfinite(env.sim.qpos).all() and torch.isfinite(env.sim.qvel).all()
    assert int(env.nonfinite_resets) == before + 1
    assert torch.equal(env.sim.qpos[2], env.initial_qpos[2])  # restarted from its initial state
    assert not torch.equal(env.sim.qpos[[0, 1, 3]], qpos_others)  # the others kept simulating
    env.reset_done()
    assert not env.done_buf.any()



def test_a_non_finite_task_reward_fails_the_world_and_is_counted(make_test_env, monkeypatch):
    env = make_test_env("ant", "heading", tag="nan-reward")
    env.reset()
    before = int(env.nonfinite_resets)
    task_reward = env.task.reward

    def nan_for_world_1(state, root):
        reward = task_reward(state, root).clone()
        reward[1] = float("nan")
        return reward

    monkeypatch.setattr(env.task, "reward", nan_for_world_1)
    _, reward, done, extras = env.step(torch.zeros(4, 8))
    assert torch.isfinite(reward).all() and reward[1] == 0.0
    assert done[1] and extras["terminate"][1] and extras["nonfinite"].tolist() == [False, True, False, False]
    assert int(env.nonfinite_resets) == before + 1
    monkeypatch.undo()
    env.reset_done()
    assert not env.done_buf.any()


# ---------------------------------------------------------------- task rewards on hand-set states
def _root(pos, prev_pos, yaw, control_dt=0.1):
    yaw = torch.as_tensor(yaw, dtype=torch.float32)
    quat = torch.stack([torch.cos(yaw / 2), torch.zeros_like(yaw), torch.zeros_like(yaw), torch.sin(yaw / 2)], -1)
    return {"pos": torch.tensor(pos), "prev_pos": torch.tensor(prev_pos), "quat": quat, "control_dt": control_dt}


def test_heading_reward_hand_computed():
    state = heading.make_state(3, torch.device("cpu"), heading.DEFAULT_PARAMS, 0.1)
    state["target_dir"][:] = torch.tensor([1.0, 0.0])
    state["target_speed"][:] = 1.0
    state["target_facing"][:] = torch.tensor([0.0, 1.0])
    # world 0: v = (0.5, 0.2) m/s, facing +x; world 1: moving backwards; world 2: facing 60 deg
    root = _root(pos=[[0.05, 0.02, 0.5], [-0.05, 0.0, 0.5], [0.1, 0.0, 0.5]],
                 prev_pos=[[0.0, 0.0, 0.5]] * 3, yaw=[0.0, 0.0, math.pi / 3])
    reward = heading.reward(state, root)
    expected = torch.tensor([
        0.7 * math.exp(-0.25 * ((1.0 - 0.5) ** 2 + 0.1 * 0.2 ** 2)) + 0.3 * 0.0,
        0.7 * 0.0 + 0.3 * 0.0,
        0.7 * math.exp(-0.25 * 0.0) + 0.3 * math.sin(math.pi / 3),
    ])
    torch.testing.assert_close(reward, expected, atol=1e-6, rtol=0)


def test_location_reward_hand_computed():
    state = location.make_state(3, torch.device("cpu"), location.DEFAULT_PARAMS, 0.1)
    state["target_pos"][:] = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.3, 0.4]])
    # world 0: moving toward the target at 0.5 m/s, facing it; world 1: moving away, facing +x;
    # world 2: 0.5 m from the target (inside 0.7 m): vel = face = 1
    toward = [0.6 * 0.05, 0.8 * 0.05]
    root = _root(pos=[[toward[0], toward[1], 0.5], [-toward[0], -toward[1], 0.5], [0.0, 0.0, 0.5]],
                 prev_pos=[[0.0, 0.0, 0.5]] * 3, yaw=[math.atan2(4, 3), 0.0, 1.0])
    reward = location.reward(state, root)
    d0 = (3 - toward[0]) ** 2 + (4 - toward[1]) ** 2
    d1 = (3 + toward[0]) ** 2 + (4 + toward[1]) ** 2
    expected = torch.tensor([
        0.5 * math.exp(-0.5 * d0) + 0.4 * math.exp(-4 * (1.0 - 0.5) ** 2) + 0.1 * 1.0,
        0.5 * math.exp(-0.5 * d1) + 0.4 * 0.0 + 0.1 * 0.6,
        0.5 * math.exp(-0.5 * 0.25) + 0.4 + 0.1,
    ])
    torch.testing.assert_close(reward, expected, atol=1e-5, rtol=0)


def test_location_obs_is_target_in_heading_frame(ant_location_env):
    env = ant_location_env
    env.reset()
    env.sim.qpos[:, 0:2] = torch.tensor([1.0, 1.0])
    env.sim.qpos[:, 3:7] = torch.tensor([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])  # yaw 90 deg
    env.task_state["target_pos"][:] = torch.tensor([1.0, 3.0])  # 2 m along world +y = heading forward
    obs = env.compute_obs()["obs"]
    torch.testing.assert_close(obs[:, -2:], torch.tensor([2.0, 0.0]).expand(4, 2), atol=1e-6, rtol=0)


def test_targets_resample_on_timer(ant_heading_env):
    env = ant_heading_env
    env.reset()
    env.task_state["timer"][:] = torch.tensor([1, 50, 1, 50])
    target_before = env.task_state["target_dir"].clone()
    env.step(torch.zeros(4, 8))
    changed = (env.task_state["target_dir"] != target_before).any(-1)
    assert changed.tolist() == [True, False, True, False]
    lo, hi = env.task_state["interval_steps"]
    assert (lo, hi) == (round(100 / 30 / 0.03), round(200 / 30 / 0.03))
    assert ((env.task_state["timer"][[0, 2]] >= lo) & (env.task_state["timer"][[0, 2]] < hi)).all()
    speed = env.task_state["target_speed"]
    assert ((speed >= 0.4) & (speed < 0.8)).all()  # the ant's scaled speed range


# ---------------------------------------------------------------- video
def test_video_records_mp4(ant_location_env, tmp_path):
    import imageio

    from tasks import video

    available, reason = video.renderer_available()
    if not available:
        pytest.skip(reason)
    path = tmp_path / "ant.mp4"
    frames = video.record_rollout(ant_location_env, str(path), steps=8, world=1, width=160, height=120)
    assert frames == 9
    images = [frame for frame in imageio.get_reader(str(path))]
    assert len(images) == 9 and images[0].shape == (120, 160, 3)
    assert images[0].std() > 0  # not a blank image
    assert not (images[0] == images[-1]).all()  # the robot moved
    gif_path = tmp_path / "ant.gif"
    assert video.mp4_to_gif(str(path), str(gif_path), frame_stride=2, downscale=2) == 5  # frames 0, 2, 4, 6, 8
    gif_frames = list(imageio.get_reader(str(gif_path)))
    assert len(gif_frames) == 5 and gif_frames[0].shape[:2] == (60, 80)
    with pytest.raises(ValueError, match="world 7 out of range"):
        video.VideoRecorder(ant_location_env, str(tmp_path / "x.mp4"), world=7)


# ---------------------------------------------------------------- registry
def test_every_registered_name_loads_and_unknown_names_are_refused():
    from tasks import load_robot, load_task

    for robot in ROBOTS:  # a registered robot is a module with the robot interface
        module = load_robot(robot)
        assert module.NAME == robot and callable(module.compute_obs) and module.LLC_LATENT_DIM >= 3
    for task in TASKS:
        assert load_task(task).NAME == task
    for backend in BACKENDS:
        assert resolve_backend(backend, torch.device("cpu")) in ("mjwarp", "mujoco")
    with pytest.raises(ValueError, match="unknown robot 'spider'"):
        load_robot("spider")
    with pytest.raises(ValueError, match="unknown task 'dance'"):
        load_task("dance")
    with pytest.raises(ValueError, match="unknown backend 'physx'"):
        resolve_backend("physx", torch.device("cpu"))


def test_auto_backend_on_the_cpu_is_c_mujoco():
    env = make_env("ant", "none", 2, device="cpu")
    assert env.backend == "mujoco" and env.describe_backend().startswith("mujoco (C MuJoCo")
    assert make_env("ant", "none", 2, sim_threads=1).physics.threads == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"robot": "spider", "task": "heading", "num_envs": 2}, "unknown robot 'spider'.*'ant'"),
    ({"robot": "ant", "task": "dance", "num_envs": 2}, "unknown task 'dance'.*'heading'"),
    ({"robot": "ant", "task": "heading", "num_envs": 0}, "num_envs must be an integer >= 1, got 0"),
    ({"robot": "ant", "task": "heading", "num_envs": 2, "device": "tpu"}, "device 'tpu'"),
    ({"robot": "ant", "task": "heading", "num_envs": 2, "decimaton": 2}, "unknown override.*decimaton.*decimation"),
    ({"robot": "ant", "task": "heading", "num_envs": 2, "backend": "physx"},
     r"unknown backend 'physx'; valid backends: \['auto', 'mjwarp', 'mujoco'\]"),
    ({"robot": "ant", "task": "heading", "num_envs": 2, "backend": "mujoco", "nconmax": 4},
     "unknown override.*nconmax.*backend 'mujoco'"),
    ({"robot": "ant", "task": "heading", "num_envs": 2, "backend": "mujoco", "sim_threads": 0},
     "sim_threads must be an integer >= 1.*got 0"),
])
def test_registry_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_env(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="'cuda:0' requested but CUDA is not available"):
        make_env("ant", "none", 2, device="cuda:0")


def test_print_sizes():
    out = subprocess.run([sys.executable, "-m", "tasks"], cwd=REPO, capture_output=True, text=True, check=True)
    ant_heading = next(line.split() for line in out.stdout.splitlines() if line.split()[:2] == ["ant", "heading"])
    assert ant_heading[2:] == ["34", "5", "8", "0.03", "500"]
