"""ASE's AMP observation of the humanoid (tasks/amp.py): the current frame against a re-computation here
from plain MuJoCo's state (numpy and MuJoCo's own functions, not the project's), for both
local_root_obs settings, after random PD targets; rotation helpers; the history's order and reset fill."""

import math
import types

import mujoco
import numpy as np
import pytest
import torch

import tasks.amp as amp
import tasks.humanoid as humanoid

MJM = mujoco.MjModel.from_xml_path(humanoid.MJCF_PATH)
KEY_BODIES = ("right_hand", "left_hand", "right_foot", "left_foot")


def random_state(seed, steps=40):
    """Plain MuJoCo humanoid after `steps` physics steps towards random PD targets from a standing pose
    with a random heading and root velocity; kinematics and velocities recomputed (mj_forward)."""
    rng = np.random.default_rng(seed)
    data = mujoco.MjData(MJM)
    yaw = rng.uniform(-math.pi, math.pi)
    data.qpos[0:7] = [rng.uniform(-2, 2), rng.uniform(-2, 2), 0.95, math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]
    data.qvel[0:6] = rng.uniform(-1, 1, 6)
    data.ctrl[:] = rng.uniform(-1.0, 1.0, MJM.nu)
    for _ in range(steps):
        mujoco.mj_step(MJM, data)
    mujoco.mj_forward(MJM, data)
    return data


def views(datas):
    """The simulator views the humanoid reads, float32 as MuJoCo Warp's, one row per MjData."""
    stack = lambda name: torch.tensor(np.stack([getattr(d, name) for d in datas]), dtype=torch.float32)  # noqa: E731
    return types.SimpleNamespace(mjm=MJM, **{name: stack(name) for name in ("qpos", "qvel", "xpos", "xquat", "cvel")})


def rotation_matrix(axis_angle):
    """3x3 rotation of an exponential map (rad), with MuJoCo's quaternion functions."""
    angle = np.linalg.norm(axis_angle)
    quat, mat = np.array([1.0, 0.0, 0.0, 0.0]), np.zeros(9)
    if angle > 0:
        mujoco.mju_axisAngle2Quat(quat, axis_angle / angle, angle)
    mujoco.mju_quat2Mat(mat, quat)
    return mat.reshape(3, 3)


def expected_amp_frame(data, local_root_obs):
    """ASE's 125 AMP numbers of one MuJoCo state, derived here from MuJoCo's own quantities."""
    root_axes = data.xmat[1].reshape(3, 3)  # columns: the root body's x, y, z axes in world
    yaw = math.atan2(root_axes[1, 0], root_axes[0, 0])
    to_heading = np.array([[math.cos(yaw), math.sin(yaw), 0.0], [-math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]])
    root_rot = to_heading @ root_axes if local_root_obs else root_axes
    velocity = np.zeros(6)  # (angular, linear) at the root body's centre of mass, world orientation
    mujoco.mj_objectVelocity(MJM, data, mujoco.mjtObj.mjOBJ_BODY, 1, velocity, 0)
    dof_obs, dof = [], 7
    for _, size in humanoid.JOINTS:
        exp_map = data.qpos[dof:dof + 3] if size == 3 else np.array([0.0, data.qpos[dof], 0.0])
        joint_rot = rotation_matrix(exp_map)
        dof_obs += [joint_rot[:, 0], joint_rot[:, 2]]
        dof += size
    key_pos = [to_heading @ (data.xpos[MJM.body(name).id] - data.xpos[1]) for name in KEY_BODIES]
    return np.concatenate([[data.xpos[1, 2]], root_rot[:, 0], root_rot[:, 2], to_heading @ velocity[3:],
                           to_heading @ velocity[:3], *dof_obs, data.qvel[6:], *key_pos])


@pytest.mark.parametrize("local_root_obs", [True, False])
def test_amp_frame_against_a_recomputation_from_mujoco(local_root_obs):
    datas = [random_state(seed) for seed in range(3)]
    assert any(np.abs(d.qpos[7:]).max() > 0.5 for d in datas)  # the joints moved well away from 0
    frame = amp.amp_observation(views(datas), local_root_obs)
    assert frame.shape == (3, amp.NUM_AMP_OBS_PER_STEP) == (3, 125) and frame.dtype == torch.float32
    expected = np.stack([expected_amp_frame(d, local_root_obs) for d in datas])
    np.testing.assert_allclose(frame.numpy(), expected, atol=2e-4, rtol=1e-5)


def test_local_root_obs_changes_only_the_root_rotation():
    sim = views([random_state(seed) for seed in range(2)])
    local, world = amp.amp_observation(sim, True), amp.amp_observation(sim, False)
    assert not torch.allclose(local[:, 1:7], world[:, 1:7])
    keep = torch.ones(125, dtype=torch.bool)
    keep[1:7] = False
    assert torch.equal(local[:, keep], world[:, keep])


def test_dof_observation_of_single_joints():
    """A knee at angle a is a rotation about y: x axis (cos a, 0, -sin a), z axis (sin a, 0, cos a); a
    3-DoF joint's hinges are an exponential map (here 90 deg about x: x stays, z turns to -y)."""
    dof_pos = torch.zeros(1, 28, dtype=torch.float64)
    knee, a = humanoid.DOF_NAMES.index("right_knee"), 0.8
    dof_pos[0, knee] = a
    dof_pos[0, humanoid.DOF_NAMES.index("neck_x")] = math.pi / 2
    obs = amp.dof_to_obs(dof_pos).reshape(12, 6)
    joint_names = [name for name, _ in humanoid.JOINTS]
    torch.testing.assert_close(obs[joint_names.index("right_knee")],
                               torch.tensor([math.cos(a), 0, -math.sin(a), math.sin(a), 0, math.cos(a)], dtype=torch.float64))
    torch.testing.assert_close(obs[joint_names.index("neck")], torch.tensor([1.0, 0, 0, 0, -1, 0], dtype=torch.float64))
    torch.testing.assert_close(obs[joint_names.index("abdomen")], torch.tensor([1.0, 0, 0, 0, 0, 1], dtype=torch.float64))


def test_exp_map_round_trip_takes_the_shortest_rotation():
    generator = torch.Generator().manual_seed(0)
    exp_map = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    exp_map = exp_map / exp_map.norm(dim=-1, keepdim=True) * torch.rand(64, 1, generator=generator) * 3.1
    quat = amp.exp_map_to_quat(exp_map)
    torch.testing.assert_close(quat.norm(dim=-1), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(amp.quat_to_exp_map(quat), exp_map)
    torch.testing.assert_close(amp.quat_to_exp_map(-quat), exp_map)  # q and -q: the same rotation
    long_way = torch.tensor([[0.0, 0.0, 1.5 * math.pi]], dtype=torch.float64)  # 270 deg = -90 deg about z
    torch.testing.assert_close(amp.quat_to_exp_map(amp.exp_map_to_quat(long_way)),
                               torch.tensor([[0.0, 0.0, -0.5 * math.pi]], dtype=torch.float64))
    torch.testing.assert_close(amp.exp_map_to_quat(torch.zeros(1, 3)), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- history
def test_history_is_newest_first():
    history = amp.make_amp_history(2, "cpu")
    assert history.shape == (2, amp.NUM_AMP_OBS_STEPS, 125) == (2, 10, 125)
    for step in range(12):
        amp.push_amp_frame(history, torch.full((2, 125), float(step)))
    # frame i = i control steps ago: 11, 10, ..., 2 (the two oldest dropped)
    torch.testing.assert_close(history[:, :, 0], torch.arange(11.0, 1.0, -1.0).expand(2, 10))
    flat = history.reshape(2, -1)  # ASE's discriminator input: frame 0's 125 numbers first
    assert flat.shape == (2, 1250) and torch.all(flat[:, :125] == 11.0) and torch.all(flat[:, 125:250] == 10.0)


def test_reset_fills_the_history_of_reset_worlds_only():
    history = torch.arange(3 * 10 * 125, dtype=torch.float32).reshape(3, 10, 125)
    before = history.clone()
    current = torch.randn(3, 125)
    amp.fill_amp_history(history, current, torch.tensor([True, False, True]))
    for world in (0, 2):
        assert torch.equal(history[world], current[world].expand(10, 125))
    assert torch.equal(history[1], before[1])
