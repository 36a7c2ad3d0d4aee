"""The humanoid on a user's body file (make_env override robot_xml, --robot-xml): a copy of
assets/humanoid.xml written here in the style of ASE's amp_humanoid.xml (PD gains as joint stiffness /
damping, <motor> actuators, condim 1, ASE's timestep), with a heavier pelvis, other knee limits and a
larger head, so that every per-model constant the humanoid reads can be told from the default's."""

import os
import subprocess
import sys
import types

import mujoco
import numpy as np
import pytest
import torch

import hrl_ppo_continuous as hrl
import tasks.humanoid as humanoid
from llc import repo_relative
from tasks import make_env
from tasks.ase_mjcf import ASEModelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = humanoid.default_model()
PELVIS, HEAD = humanoid.BODY_NAMES.index("pelvis"), humanoid.BODY_NAMES.index("head")
RIGHT_KNEE = humanoid.DOF_NAMES.index("right_knee")
KNEE_RANGE_DEG = (20.0, 120.0)  # ours: 0 .. 160
PELVIS_DENSITY_FACTOR = 2.0
HEAD_RADIUS = 0.12  # m, ours 0.095


def ase_style_copy(path, rename_joint=None):
    """assets/humanoid.xml rewritten as ASE writes its body file, with the changes above; rename_joint
    (old, new) renames one joint (a layout the humanoid does not accept)."""
    spec = mujoco.MjSpec.from_file(humanoid.MJCF_PATH)
    for i, actuator in enumerate(list(spec.actuators)):
        joint = spec.joint(actuator.target)
        joint.stiffness[0], joint.damping[0] = OURS.actuator_gainprm[i, 0], -OURS.actuator_biasprm[i, 2]
        spec.delete(actuator)
    if rename_joint is not None:
        spec.joint(rename_joint[0]).name = rename_joint[1]
    for joint in list(spec.joints)[1:]:  # the hinges, after the root's free joint
        motor = spec.add_actuator(name=joint.name, target=joint.name, trntype=mujoco.mjtTrn.mjTRN_JOINT)
        motor.gear[0], motor.ctrlrange = 100.0, [-1.0, 1.0]
    for geom in spec.geoms:
        geom.condim = 1
    for geom in spec.body("pelvis").geoms:
        geom.density *= PELVIS_DENSITY_FACTOR
    next(g for g in spec.body("head").geoms if g.type == mujoco.mjtGeom.mjGEOM_SPHERE).size[0] = HEAD_RADIUS
    spec.joint("right_knee").range = KNEE_RANGE_DEG
    spec.option.timestep = 0.00555  # ASE's file; Isaac Gym ignores it
    path.write_text(spec.to_xml())
    return path


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    return ase_style_copy(tmp_path_factory.mktemp("ase") / "amp_humanoid.xml")


def default_mass_of(body):
    return float(OURS.body_mass[1 + body])


@pytest.mark.parametrize("backend", ["mujoco", "mjwarp"])
def test_env_simulates_the_users_file_with_its_constants(users_file, backend):
    env = make_env("humanoid", "heading", num_envs=2, device="cpu", seed=0, backend=backend, robot_xml=str(users_file))
    assert env.sim.mjm is env.mjm and f"robot_xml {users_file}" in env.describe_backend()
    constants = humanoid.model_constants(env.mjm)
    # the file's masses, joint limits, fall-test geoms and timestep, not the default body's
    assert constants.body_mass[PELVIS] == pytest.approx(PELVIS_DENSITY_FACTOR * default_mass_of(PELVIS), rel=1e-5)
    np.testing.assert_array_equal(constants.body_mass, env.mjm.body_mass[1:].astype(np.float32))
    np.testing.assert_array_equal(constants.body_com_local, env.mjm.body_ipos[1:].astype(np.float32))
    lo, hi = np.radians(KNEE_RANGE_DEG)
    np.testing.assert_allclose(constants.joint_range[RIGHT_KNEE], [lo, hi], atol=1e-5)  # to_xml writes 6 digits
    assert np.isclose(constants.floor_geom_radius[constants.floor_geom_body == HEAD], HEAD_RADIUS).any()
    assert env.physics_dt == pytest.approx(1.0 / 120.0)
    assert constants.fall_test_start_time == pytest.approx(1.5 * humanoid.DECIMATION / 120.0)
    # ASE's PD rule on the file's limits, and PD gains from its joint stiffness / damping
    assert env.pd_offset[RIGHT_KNEE].item() == pytest.approx(0.5 * (lo + hi), abs=1e-5)
    assert env.pd_scale[RIGHT_KNEE].item() == pytest.approx(0.7 * (hi - lo), abs=1e-5)
    np.testing.assert_array_equal(env.mjm.actuator_gainprm[:, 0], OURS.actuator_gainprm[:, 0])

    # a reset clamps the standing pose (knee at 0) into the file's knee limits
    env.reset()
    assert torch.all(env.sim.qpos[:, 7 + RIGHT_KNEE] == torch.tensor(constants.joint_range[RIGHT_KNEE, 0]))

    # body velocities at the centres of mass from the file's masses, as MuJoCo computes them
    env.sim.qvel.copy_(torch.linspace(-1.0, 1.0, env.mjm.nv).expand_as(env.sim.qvel))
    env.forward()
    lin_vel, ang_vel = humanoid.body_com_velocities(env.sim)
    data = mujoco.MjData(env.mjm)
    data.qpos[:], data.qvel[:] = env.sim.qpos[0].double().numpy(), env.sim.qvel[0].double().numpy()
    mujoco.mj_forward(env.mjm, data)
    expected = np.zeros((humanoid.NUM_BODIES, 6))
    for body in range(humanoid.NUM_BODIES):
        mujoco.mj_objectVelocity(env.mjm, data, mujoco.mjtObj.mjOBJ_BODY, 1 + body, expected[body], 0)
    np.testing.assert_allclose(lin_vel[0].numpy(), expected[:, 3:], atol=1e-4)
    np.testing.assert_allclose(ang_vel[0].numpy(), expected[:, :3], atol=1e-4)
    # ... which the default body's masses would get wrong
    sim_views = {key: value for key, value in vars(env.sim).items() if key != "humanoid_constants"}  # not the cached ones
    default_masses = types.SimpleNamespace(**{**sim_views, "mjm": OURS})
    assert np.abs(humanoid.body_com_velocities(default_masses)[0][0].numpy() - expected[:, 3:]).max() > 1e-3

    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        obs, reward, done, extras = env.step(torch.rand(2, env.num_actions, generator=generator) * 2 - 1)
    assert obs["obs"].shape == (2, env.num_obs) and torch.isfinite(obs["obs"]).all() and torch.isfinite(reward).all()
    assert extras["amp_obs"].shape == (2, env.get_num_amp_obs()) and not env.overflowed().any()


def test_default_model_constants_are_those_of_assets_humanoid_xml(make_test_env):
    env = make_test_env("humanoid", "heading")
    mjm = mujoco.MjModel.from_xml_path(humanoid.MJCF_PATH)
    constants = humanoid.model_constants(env.sim.mjm)
    assert env.robot_xml is None and "robot_xml" not in env.describe_backend()
    np.testing.assert_array_equal(constants.body_mass, mjm.body_mass[1:].astype(np.float32))
    np.testing.assert_array_equal(constants.body_com_local, mjm.body_ipos[1:].astype(np.float32))
    np.testing.assert_array_equal(constants.joint_range, mjm.jnt_range[1:].astype(np.float32))
    assert constants.body_mass.sum() == pytest.approx(53.01, abs=0.01)  # kg, assets/humanoid.xml
    assert constants.fall_test_start_time == pytest.approx(0.05)  # s: 1.5 control steps of 4 x 1/120 s
    assert len(constants.floor_geom_body) == 16 and HEAD in constants.floor_geom_body
    offset, scale = humanoid.pd_action_map(mjm)
    np.testing.assert_array_equal(env.pd_offset.numpy(), offset.astype(np.float32))
    np.testing.assert_array_equal(env.pd_scale.numpy(), scale.astype(np.float32))
    assert humanoid.model_constants(env.sim.mjm) is constants  # built once per model


def test_robot_xml_for_the_ant_is_a_clear_error(users_file):
    with pytest.raises(ValueError, match=r"robot 'ant' takes no robot_xml \(it simulates .*ant\.xml\), got "
                                         r"'.*amp_humanoid\.xml'; robots that take one: \['humanoid'\]"):
        make_env("ant", "heading", num_envs=1, backend="mujoco", robot_xml=str(users_file))


def test_a_missing_robot_xml_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such.xml"
    with pytest.raises(ValueError, match=rf"robot_xml '{missing}' is not a file; expected the path of an MJCF file"):
        make_env("humanoid", "heading", num_envs=1, backend="mujoco", robot_xml=str(missing))


def test_a_robot_xml_with_another_layout_is_a_clear_error(tmp_path):
    path = ase_style_copy(tmp_path / "renamed.xml", rename_joint=("left_elbow", "left_elbow_joint"))
    with pytest.raises(ASEModelError, match=r"renamed\.xml: DoF 13 is 'left_elbow_joint', expected 'left_elbow'"):
        make_env("humanoid", "heading", num_envs=1, backend="mujoco", robot_xml=str(path))


@pytest.mark.parametrize("argv, message", [
    (["--robot-xml", "{users_file}"], r"error: --robot-xml: robot 'ant' takes no robot_xml"),
    (["--robot", "humanoid", "--robot-xml", "/nonexistent/amp_humanoid.xml"],
     r"error: --robot-xml: robot_xml '/nonexistent/amp_humanoid\.xml' is not a file"),
    (["--env-backend", "isaacgym", "--robot-xml", "{users_file}"], r"error: --robot-xml .* is for the tasks/ backends"),
])
def test_trainer_flag_errors(users_file, argv, message):
    with pytest.raises(SystemExit, match=message):
        hrl.parse_args([arg.format(users_file=users_file) for arg in argv])


def test_trainer_passes_robot_xml_to_the_env(users_file):
    args = hrl.parse_args(["--no-cuda", "--robot", "humanoid", "--env-backend", "mujoco", "--llc-checkpoint", "none",
                           "--robot-xml", str(users_file)])
    env = hrl.make_env(args, hrl.derive(args), num_envs=1, seed=0)
    assert env.robot_xml == str(users_file)
    assert env.mjm.body_mass[1 + PELVIS] == pytest.approx(PELVIS_DENSITY_FACTOR * default_mass_of(PELVIS), rel=1e-5)


def test_llc_pretrain_trains_on_the_users_file(users_file, tmp_path):
    checkpoint = tmp_path / "llc.pt"
    command = [sys.executable, os.path.join(ROOT, "llc_pretrain.py"), "--robot", "humanoid", "--robot-xml", str(users_file),
               "--env-backend", "mujoco", "--num-envs", "2", "--num-steps", "4", "--total-timesteps", "8",
               "--num-minibatches", "1", "--update-epochs", "1", "--llc-hidden", "8", "--llc-style-hidden", "8",
               "--llc-style-dim", "4", "--critic-hidden", "8", "--checkpoint-path", str(checkpoint)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"robot_xml {users_file}" in result.stdout  # the banner names the body file
    metadata = torch.load(checkpoint, weights_only=True)["metadata"]
    assert metadata["robot_xml"] == repo_relative(str(users_file))
    assert metadata["pd_kp"] == OURS.actuator_gainprm[:, 0].tolist()  # from the file's joint stiffness
    assert metadata["local_root_obs"] is False  # the humanoid's default, checked by the trainer:
    trainer = [sys.executable, os.path.join(ROOT, "hrl_ppo_continuous.py"), "--no-cuda", "--robot", "humanoid",
               "--robot-xml", str(users_file), "--env-backend", "mujoco", "--llc-checkpoint", str(checkpoint),
               "--local-root-obs", "--num-envs", "2", "--num-steps", "4", "--num-minibatches", "2", "--total-timesteps", "8"]
    result = subprocess.run(trainer, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    assert f"localRootObs False, from {checkpoint} (its metadata); the env uses True" in result.stderr

    command[command.index("humanoid")] = "ant"
    (tmp_path / "ant").mkdir()
    result = subprocess.run(command, cwd=tmp_path / "ant", capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "error: --robot-xml: robot 'ant' takes no robot_xml" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "ant" / "runs").exists()
