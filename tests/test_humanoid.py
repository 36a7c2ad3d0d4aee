"""The humanoid robot (tasks/humanoid.py, assets/humanoid.xml): model layout, PD map, observation,
fall test, standing, and the robot-independent env checks from conftest.py.

One humanoid env (4 worlds, heading task, the CPU default backend `mujoco`) is shared by the whole
session; the robot-independent checks run on every backend in TEST_BACKENDS, with a twin of the
same settings for the subset-reset and determinism checks."""

import math

import mujoco
import numpy as np
import pytest
import torch
from conftest import TEST_BACKENDS

import tasks.humanoid as humanoid

HOLD_SECONDS = 2.0


@pytest.fixture(scope="module")
def env(make_test_env):
    return make_test_env("humanoid", "heading")


@pytest.fixture(scope="module")
def mjm():
    return mujoco.MjModel.from_xml_path(humanoid.MJCF_PATH)


def standing_actions(env):
    """Actions whose PD targets are the standing pose (every joint at 0 rad)."""
    return ((0.0 - env.pd_offset) / env.pd_scale).expand(env.num_envs, -1).contiguous()


def set_standing(env):
    """Every world in the exact standing pose facing +x, at rest; derived quantities recomputed."""
    env.reset()
    env.sim.qpos.copy_(humanoid.standing_qpos(torch.zeros(env.num_envs)))
    env.sim.qvel.zero_()
    env.forward()


# ---------------------------------------------------------------- model
def test_bodies_and_dofs_in_ase_order(mjm):
    assert tuple(mjm.body(i).name for i in range(1, mjm.nbody)) == humanoid.BODY_NAMES
    assert len(humanoid.BODY_NAMES) == 15 and len(humanoid.DOF_NAMES) == 28
    assert mjm.jnt_type[0] == mujoco.mjtJoint.mjJNT_FREE and mjm.body(mjm.jnt_bodyid[0]).name == "pelvis"
    hinge_names = tuple(mjm.joint(j).name for j in range(1, mjm.njnt))
    assert hinge_names == humanoid.DOF_NAMES
    assert all(mjm.jnt_type[j] == mujoco.mjtJoint.mjJNT_HINGE for j in range(1, mjm.njnt))
    assert (mjm.nq, mjm.nv, mjm.nu) == (35, 34, 28)
    # one actuator per hinge, in DoF order; 3-DoF joints are hinges about x, y, z
    assert [mjm.joint(j).name for j in mjm.actuator_trnid[:, 0]] == list(humanoid.DOF_NAMES)
    for j, name in enumerate(humanoid.DOF_NAMES, start=1):
        if name[-2:] in ("_x", "_y", "_z"):
            np.testing.assert_array_equal(mjm.jnt_axis[j], np.eye(3)["xyz".index(name[-1])])
    assert mjm.body(mjm.jnt_bodyid[mjm.joint("right_knee").id]).name == "right_shin"
    assert mjm.body(mjm.jnt_bodyid[mjm.joint("left_ankle_z").id]).name == "left_foot"


def test_mass_size_and_standing_height(mjm):
    total_mass = mjm.body_subtreemass[1]
    assert 45.0 <= total_mass <= 60.0, total_mass
    data = mujoco.MjData(mjm)
    data.qpos[:] = humanoid.standing_qpos(torch.zeros(1))[0].numpy()
    mujoco.mj_forward(mjm, data)
    foot_bottoms = [data.geom_xpos[mjm.geom(f).id][2] - mjm.geom_size[mjm.geom(f).id][2]
                    for f in ("right_foot", "left_foot")]
    np.testing.assert_allclose(foot_bottoms, 0.0, atol=1e-6)  # soles on the floor at 0.89 m
    head = mjm.geom("head").id
    assert 1.6 <= data.geom_xpos[head][2] + mjm.geom_size[head][0] <= 1.8
    contacts = {(mjm.geom(c.geom1).name, mjm.geom(c.geom2).name) for c in data.contact[:data.ncon]}
    assert contacts <= {("floor", "right_foot"), ("floor", "left_foot")}  # no self-contact


def test_timing_matches_ase(env):
    assert env.physics_dt == pytest.approx(1.0 / 120.0)
    assert env.control_dt == pytest.approx(1.0 / 30.0)
    assert env.max_episode_length == 300


# ---------------------------------------------------------------- PD control
def test_pd_map_against_hand_computation(env, mjm):
    offset, scale = humanoid.pd_action_map(mjm)
    deg = math.pi / 180.0
    # abdomen (3-DoF): limits x -60..60, y -60..90, z -50..50 -> scale 1.2 * 90 deg, offset 0
    for name in ("abdomen_x", "abdomen_y", "abdomen_z"):
        i = humanoid.DOF_NAMES.index(name)
        assert offset[i] == 0.0 and scale[i] == pytest.approx(1.2 * 90 * deg)
    # right shoulder (3-DoF): largest limit 180 deg -> 1.2 * pi capped at pi
    assert scale[humanoid.DOF_NAMES.index("right_shoulder_y")] == pytest.approx(math.pi)
    # knee (1-DoF): limits 0..160 -> offset 80 deg, scale 0.7 * 160 deg
    knee = humanoid.DOF_NAMES.index("left_knee")
    assert offset[knee] == pytest.approx(80 * deg) and scale[knee] == pytest.approx(0.7 * 160 * deg)
    # elbow (1-DoF): limits -160..0
    elbow = humanoid.DOF_NAMES.index("right_elbow")
    assert offset[elbow] == pytest.approx(-80 * deg) and scale[elbow] == pytest.approx(0.7 * 160 * deg)
    # the env applies the same map: ctrl = offset + scale * clamp(action)
    torch.testing.assert_close(env.pd_offset, torch.as_tensor(offset, dtype=torch.float32))
    torch.testing.assert_close(env.pd_scale, torch.as_tensor(scale, dtype=torch.float32))
    env.reset()
    actions = torch.zeros(env.num_envs, env.num_actions)
    actions[:, knee] = 2.0  # clamped to 1
    env.step(actions)
    assert env.sim.ctrl[0, knee].item() == pytest.approx((80 + 0.7 * 160) * deg, rel=1e-6)


def test_holding_the_standing_pose_stays_upright(env):
    set_standing(env)
    actions = standing_actions(env)
    for _ in range(round(HOLD_SECONDS / env.control_dt)):
        _, _, done, _ = env.step(actions)
    assert not done.any()
    root_height = env.sim.qpos[:, 2]
    assert torch.all(root_height > 0.85), root_height
    root_up_z = humanoid._axes(env.sim.xquat[:, 1:2], 2)[:, 0, 2]
    assert torch.all(root_up_z > 0.95), root_up_z  # pelvis tilted less than ~18 deg
    head_height = env.sim.xpos[:, 1 + humanoid.BODY_NAMES.index("head"), 2]
    assert torch.all(head_height > 1.35), head_height


# ---------------------------------------------------------------- observation
@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_observation_size_and_task_tail(make_test_env, env_checks, backend):
    env = make_test_env("humanoid", "heading", backend=backend)
    assert humanoid.NUM_ROBOT_OBS == 223
    assert env.num_obs == 223 + env.get_task_obs_size() and env.num_actions == 28
    env_checks.obs_layout(env)


def test_observation_of_a_hand_set_state(env, mjm):
    """Root height, one body's heading-local position, rotation and velocities, computed by hand
    from plain MuJoCo's kinematics of the same state."""
    generator = torch.Generator().manual_seed(0)
    yaw = 2.5  # rad
    qpos = humanoid.standing_qpos(torch.full((env.num_envs,), yaw))
    qpos[:, 0:3] = torch.tensor([1.0, -2.0, 0.95])
    qpos[:, 7:] = 0.3 * (torch.rand(env.num_envs, 28, generator=generator) * 2.0 - 1.0)
    qvel = torch.rand(env.num_envs, 34, generator=generator) * 2.0 - 1.0
    env.reset()
    env.sim.qpos.copy_(qpos)
    env.sim.qvel.copy_(qvel)
    env.forward()
    obs = humanoid.compute_obs(env.sim)[0].double().numpy()

    data = mujoco.MjData(mjm)
    data.qpos[:], data.qvel[:] = qpos[0].double().numpy(), qvel[0].double().numpy()
    mujoco.mj_forward(mjm, data)
    cos, sin = math.cos(yaw), math.sin(yaw)
    world_to_heading = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    hand = mjm.body("left_hand").id  # body index 8 of 15
    b = hand - 1

    assert obs[0] == pytest.approx(0.95, abs=1e-6)
    hand_pos = world_to_heading @ (data.xpos[hand] - data.xpos[1])
    np.testing.assert_allclose(obs[1 + 3 * (b - 1): 1 + 3 * b], hand_pos, atol=1e-5)
    hand_axes = data.xmat[hand].reshape(3, 3)  # columns: body axes in world
    rot = np.concatenate([world_to_heading @ hand_axes[:, 0], world_to_heading @ hand_axes[:, 2]])
    np.testing.assert_allclose(obs[43 + 6 * b: 43 + 6 * (b + 1)], rot, atol=1e-5)
    velocity = np.zeros(6)  # (angular, linear) at the body's centre of mass, world orientation
    mujoco.mj_objectVelocity(mjm, data, mujoco.mjtObj.mjOBJ_BODY, hand, velocity, 0)
    np.testing.assert_allclose(obs[133 + 3 * b: 133 + 3 * (b + 1)], world_to_heading @ velocity[3:], atol=1e-4)
    np.testing.assert_allclose(obs[178 + 3 * b: 178 + 3 * (b + 1)], world_to_heading @ velocity[:3], atol=1e-4)


def test_observation_is_heading_invariant(env):
    """Turning the whole state about the vertical axis changes no observation entry."""
    set_standing(env)
    env.sim.qvel[:, 0:3] = torch.tensor([0.5, -0.2, 0.1])
    env.forward()
    obs_facing_x = humanoid.compute_obs(env.sim).clone()
    yaw = torch.tensor([0.7, -1.9, 3.0, -3.0])[: env.num_envs]
    env.sim.qpos[:, 3:7] = humanoid.standing_qpos(yaw)[:, 3:7]
    env.sim.qvel[:, 0:3] = torch.stack([0.5 * torch.cos(yaw) + 0.2 * torch.sin(yaw),
                                        0.5 * torch.sin(yaw) - 0.2 * torch.cos(yaw),
                                        torch.full_like(yaw, 0.1)], dim=-1)
    env.forward()
    torch.testing.assert_close(humanoid.compute_obs(env.sim), obs_facing_x, atol=1e-5, rtol=0)


def test_local_root_obs_puts_the_world_root_rotation_in_the_root_slot(env, monkeypatch):
    """ASE's localRootObs: the root's 6 rotation numbers are its world tan-norm; the rest unchanged."""
    set_standing(env)
    yaw = 1.2
    env.sim.qpos[:, 3:7] = humanoid.standing_qpos(torch.full((env.num_envs,), yaw))[:, 3:7]
    env.forward()
    heading_obs = humanoid.compute_obs(env.sim)
    world_root_obs = humanoid.compute_obs(env.sim, local_root_obs=True)
    assert torch.equal(humanoid.compute_obs(env.sim, local_root_obs=False), heading_obs)
    monkeypatch.setattr(humanoid, "LOCAL_ROOT_OBS", True)  # the module setting is the default
    assert torch.equal(humanoid.compute_obs(env.sim), world_root_obs)
    root_world_x_axis = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
    torch.testing.assert_close(world_root_obs[:, 43:46], root_world_x_axis.expand(env.num_envs, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(world_root_obs[:, 46:49], torch.tensor([0.0, 0.0, 1.0]).expand(env.num_envs, 3),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(heading_obs[:, 43:46], torch.tensor([1.0, 0.0, 0.0]).expand(env.num_envs, 3),
                               atol=1e-5, rtol=0)
    keep = torch.ones(223, dtype=torch.bool)
    keep[43:49] = False
    assert torch.equal(world_root_obs[:, keep], heading_obs[:, keep])


# ---------------------------------------------------------------- reset and fall test
def test_reset_is_a_perturbed_standing_pose(env):
    env.reset()
    qpos, qvel = env.sim.qpos, env.sim.qvel
    torch.testing.assert_close(qpos[:, 2], torch.full((env.num_envs,), 0.89))
    assert torch.all(qpos[:, 7:].abs() <= humanoid.RESET_DOF_POS_NOISE + 1e-6)
    assert torch.all(qvel[:, :6] == 0) and torch.all(qvel[:, 6:].abs() <= humanoid.RESET_DOF_VEL_NOISE)
    assert torch.all(qpos[:, 4:6] == 0)  # upright: rotation about z only
    assert not torch.equal(qpos[0, 7:], qpos[1, 7:])


def test_fall_test(env):
    """Lying on the back: fallen from the second control step on (ASE skips the first); standing:
    not fallen. Feet on the floor alone never count."""
    env.reset()
    lying = humanoid.standing_qpos(torch.zeros(env.num_envs))
    lying[:, 2] = 0.08  # pelvis and chest capsules sink 1-3 cm into the floor
    lying[:, 3:7] = torch.tensor([math.cos(math.pi / 4), 0.0, -math.sin(math.pi / 4), 0.0])  # face up
    env.sim.qpos.copy_(lying)
    env.sim.qvel.zero_()
    env.forward()
    assert humanoid.touching_floor(env.sim)[:, humanoid.BODY_NAMES.index("pelvis")].all()
    env.sim.time.fill_(1.0)
    assert humanoid.fallen(env.sim).all()
    # pelvis origin still below 0.15 m, but lifted until no geom reaches the floor: not fallen
    env.sim.qpos[:, 2] = 0.14
    env.forward()
    assert not humanoid.touching_floor(env.sim).any() and not humanoid.fallen(env.sim).any()

    env.reset()
    env.sim.qpos.copy_(lying)
    env.sim.qvel.zero_()
    env.forward()
    actions = standing_actions(env)
    _, _, done, extras = env.step(actions)
    assert not done.any()  # first control step after a reset: not checked
    _, _, done, extras = env.step(actions)
    assert extras["terminate"].all() and done.all()

    set_standing(env)
    assert not humanoid.touching_floor(env.sim).any()
    for _ in range(3):
        _, _, done, _ = env.step(actions)
    assert not humanoid.fallen(env.sim).any() and not done.any()


# ---------------------------------------------------------------- robot-independent env checks
@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_random_actions_stay_finite_without_overflow(make_test_env, env_checks, backend):
    env_checks.random_rollout_is_finite(make_test_env("humanoid", "heading", backend=backend), steps=150, reset_every=5)


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_subset_reset_and_same_seed(make_test_env, env_checks, backend):
    env = make_test_env("humanoid", "heading", backend=backend)
    twin = make_test_env("humanoid", "heading", tag="twin", backend=backend)
    env_checks.subset_reset(env, twin, steps=10)
    env_checks.same_seed_same_rollout(env, twin, steps=10)


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_matches_c_mujoco(make_test_env, env_checks, backend):
    """Random actions from the perturbed reset for 1 s (30 control steps, 120 physics steps, the
    humanoid flails and often falls, with floor and self contacts): MuJoCo Warp (float32) and C
    MuJoCo (float64) agree in qpos within 1e-3 (m or rad). Over 8 such trajectories the largest
    difference seen was 1.6e-4: rounding differences grow at contact events, so the bound keeps a
    6x margin; an engine or model mismatch (e.g. the foot-foot box-box pair) gives 1e-2 to 1. The
    `mujoco` backend is C MuJoCo itself: it agrees to rounding (about 1e-14)."""
    generator = torch.Generator().manual_seed(7)
    max_error = env_checks.matches_c_mujoco(make_test_env("humanoid", "heading", backend=backend), steps=30, atol=1e-3,
                                            actions_fn=lambda step, e: env_checks.random_actions(e, generator))
    print(f"{backend}: max |qpos - qpos_c| over 1 s of random actions: {max_error:.2e}")
