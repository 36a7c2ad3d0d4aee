"""ASE motion clips (tasks/motion.py): the restricted reader, the clip -> humanoid conversion on synthetic
clips written here in poselib's SkeletonMotion format, ASE's real clips when
../shared/reference/ase-motions/ is present, and kinematic playback."""

import collections
import os
import pathlib
import subprocess
import sys
import types

import imageio.v2 as imageio
import mujoco
import numpy as np
import pytest
import torch

import tasks.amp as amp
import tasks.humanoid as humanoid
import tasks.motion as motion
from tasks.video import renderer_available

ASE_MOTIONS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "ase-motions")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ASE_CLIPS = {"amp_humanoid_walk.npy": 40, "amp_humanoid_run.npy": 25, "amp_humanoid_jog.npy": 26}  # frames
FPS = 30.0
NUM_FRAMES = 6
MJM = mujoco.MjModel.from_xml_path(humanoid.MJCF_PATH)


# ---------------------------------------------------------------- rotations with MuJoCo's functions (w, x, y, z)
def rotvec_to_quat(rotvec):
    angle = np.linalg.norm(rotvec)
    quat = np.array([1.0, 0.0, 0.0, 0.0])
    if angle > 0:
        mujoco.mju_axisAngle2Quat(quat, rotvec / angle, angle)
    return quat


def quat_to_rotvec(quat):
    rotvec = np.zeros(3)
    mujoco.mju_quat2Vel(rotvec, quat, 1.0)
    return rotvec


def mul(a, b):
    out = np.zeros(4)
    mujoco.mju_mulQuat(out, a, b)
    return out


def rotate(quat, vec):
    out = np.zeros(3)
    mujoco.mju_rotVecQuat(out, np.asarray(vec, dtype=np.float64), quat)
    return out


def inverse(quat):
    out = np.zeros(4)
    mujoco.mju_negQuat(out, quat)
    return out


# ---------------------------------------------------------------- synthetic clips
def poselib_array(values, dtype="float64"):
    return {"arr": np.asarray(values, dtype=dtype), "context": {"dtype": dtype}}


def save_clip(path, rotation_xyzw, root_translation, node_names=humanoid.BODY_NAMES, velocities=None, fps=FPS):
    """np.save of an OrderedDict as poselib's SkeletonMotion.to_file writes it."""
    skeleton = collections.OrderedDict(
        node_names=list(node_names),
        parent_indices=poselib_array(MJM.body_parentid[1:] - 1, "int64"),
        local_translation=poselib_array(MJM.body_pos[1:], "float32"))
    clip = collections.OrderedDict(rotation=poselib_array(rotation_xyzw), root_translation=poselib_array(root_translation))
    if velocities is not None:
        clip["global_velocity"], clip["global_angular_velocity"] = (poselib_array(v) for v in velocities)
    clip.update(skeleton_tree=skeleton, is_local=True, fps=fps, __name__="SkeletonMotion")
    np.save(path, clip, allow_pickle=True)
    return path


def synthetic_motion(num_frames=NUM_FRAMES, seed=0, scale=0.6):
    """Hinge values [T, 28] that change at a constant rate (3-DoF joints: an exponential map along a
    fixed axis; 1-DoF joints: an angle), the matching local rotations [T, 15, 4] (x, y, z, w, as poselib
    stores them), root translations [T, 3] and the rates [28] (per second)."""
    rng = np.random.default_rng(seed)
    start = scale * rng.uniform(-1, 1, len(humanoid.DOF_NAMES))
    rate = rng.uniform(-1, 1, len(humanoid.DOF_NAMES))
    for joint_dofs in joint_slices(3):
        rate[joint_dofs] = start[joint_dofs] * rng.uniform(-1, 1)  # stays along the axis of `start`
    times = np.arange(num_frames) / FPS
    dof_pos = start + times[:, None] * rate
    rotvec = np.zeros((num_frames, humanoid.NUM_BODIES, 3))
    for (_, size), dofs in zip(humanoid.JOINTS, joint_slices()):
        body = MJM.jnt_bodyid[1 + dofs.start] - 1
        rotvec[:, body] = dof_pos[:, dofs] if size == 3 else dof_pos[:, dofs] * np.array([0.0, 1.0, 0.0])
    wxyz = np.array([[rotvec_to_quat(v) for v in frame] for frame in rotvec])
    tilt = rotvec_to_quat(np.array([0.05, -0.1, 2.0]))
    wxyz[:, 0] = [mul(rotvec_to_quat(np.array([0.0, 0.0, 0.5 * t])), tilt) for t in times]  # turns at 0.5 rad/s about z
    rotation = np.concatenate([wxyz[..., 1:], wxyz[..., :1]], axis=-1)
    root_translation = np.array([0.3, -1.0, 0.9]) + times[:, None] * np.array([1.2, 0.4, 0.0])
    return dof_pos, rotation, root_translation, rate


def joint_slices(only_size=None):
    slices, start = [], 0
    for _, size in humanoid.JOINTS:
        if only_size in (None, size):
            slices.append(slice(start, start + size))
        start += size
    return slices


@pytest.fixture
def synthetic_clip(tmp_path):
    dof_pos, rotation, root_translation, rate = synthetic_motion()
    path = save_clip(tmp_path / "synthetic.npy", rotation, root_translation)
    return motion.load_motion(path), dof_pos, rotation, root_translation, rate


# ---------------------------------------------------------------- conversion
def test_synthetic_clip_gives_its_joint_angles_and_root_pose(synthetic_clip):
    clip, dof_pos, rotation, root_translation, _ = synthetic_clip
    assert clip.num_frames == NUM_FRAMES and clip.fps == FPS
    np.testing.assert_allclose(clip.dof_pos.numpy(), dof_pos, atol=1e-9)
    np.testing.assert_allclose(clip.root_pos.numpy(), root_translation, atol=1e-12)
    root_wxyz = np.concatenate([rotation[:, 0, 3:], rotation[:, 0, :3]], axis=-1)
    np.testing.assert_allclose(clip.root_quat.numpy(), root_wxyz, atol=1e-12)
    assert clip.qpos().shape == (NUM_FRAMES, MJM.nq)


def test_velocities_by_finite_differences(synthetic_clip):
    """Joint rates are constant in the synthetic clip: every frame's DoF velocity is the rate; the clip
    has no stored velocities, so the root's come from finite differences of its pose."""
    clip, _, _, _, rate = synthetic_clip
    np.testing.assert_allclose(clip.dof_vel.numpy(), np.broadcast_to(rate, clip.dof_vel.shape), atol=1e-7)
    np.testing.assert_allclose(clip.root_lin_vel.numpy(), np.broadcast_to([1.2, 0.4, 0.0], (NUM_FRAMES, 3)), atol=1e-9)
    # the root turns about the world z axis at 0.5 rad/s after a fixed tilt: world-frame rate (0, 0, 0.5)
    np.testing.assert_allclose(clip.root_ang_vel.numpy(), np.broadcast_to([0.0, 0.0, 0.5], (NUM_FRAMES, 3)), atol=1e-7)


def test_stored_root_velocities_are_used(tmp_path):
    _, rotation, root_translation, _ = synthetic_motion()
    lin_vel = np.random.default_rng(1).normal(size=(NUM_FRAMES, humanoid.NUM_BODIES, 3))
    ang_vel = np.random.default_rng(2).normal(size=(NUM_FRAMES, humanoid.NUM_BODIES, 3))
    clip = motion.load_motion(save_clip(tmp_path / "v.npy", rotation, root_translation, velocities=(lin_vel, ang_vel)))
    np.testing.assert_allclose(clip.root_lin_vel.numpy(), lin_vel[:, 0])
    np.testing.assert_allclose(clip.root_ang_vel.numpy(), ang_vel[:, 0])


def test_body_positions_are_the_skeletons_forward_kinematics(synthetic_clip):
    """World body origins recomputed here: parent origin + parent rotation * offset."""
    clip, _, rotation, root_translation, _ = synthetic_clip
    frame = 3
    parents = MJM.body_parentid[1:] - 1
    local_wxyz = np.concatenate([rotation[frame, :, 3:], rotation[frame, :, :3]], axis=-1)
    world_rot, world_pos = [local_wxyz[0]], [root_translation[frame]]
    for body in range(1, humanoid.NUM_BODIES):
        world_pos.append(world_pos[parents[body]] + rotate(world_rot[parents[body]], MJM.body_pos[body + 1]))
        world_rot.append(mul(world_rot[parents[body]], local_wxyz[body]))
    np.testing.assert_allclose(clip.body_pos[frame].numpy(), np.array(world_pos), atol=1e-6)
    key = [humanoid.BODY_NAMES.index(n) for n in ("right_hand", "left_hand", "right_foot", "left_foot")]
    np.testing.assert_allclose(clip.key_body_pos[frame].numpy(), np.array(world_pos)[key], atol=1e-6)


def test_clip_amp_observations_have_the_ase_layout(synthetic_clip):
    clip = synthetic_clip[0]
    for local_root_obs in (True, False):
        amp = clip.amp_observations(local_root_obs)
        assert amp.shape == (NUM_FRAMES, 125) and amp.dtype == torch.float32 and torch.isfinite(amp).all()
        torch.testing.assert_close(amp[:, 0], clip.root_pos[:, 2].float())


def test_clip_frame_and_simulator_frame_come_from_the_same_code(tmp_path):
    """The humanoid set to a clip frame gives the clip's AMP frame (velocities aside: playback sets
    qvel to 0). The clip's skeleton here has the humanoid's offsets and each 3-DoF joint turns about
    one of its hinge axes only, so the hinges reproduce the clip's rotations exactly."""
    dof_pos, _, _, _ = synthetic_motion(num_frames=2, seed=3)
    rng = np.random.default_rng(4)
    for joint_dofs in joint_slices(3):
        dof_pos[:, joint_dofs] *= np.eye(3)[rng.integers(3)]
    rotvec = np.zeros((2, humanoid.NUM_BODIES, 3))
    for (_, size), dofs in zip(humanoid.JOINTS, joint_slices()):
        rotvec[:, MJM.jnt_bodyid[1 + dofs.start] - 1] = dof_pos[:, dofs] if size == 3 else dof_pos[:, dofs] * [0, 1, 0]
    wxyz = np.array([[rotvec_to_quat(v) for v in frame] for frame in rotvec])
    wxyz[:, 0] = rotvec_to_quat(np.array([0.1, 0.2, -2.5]))
    rotation = np.concatenate([wxyz[..., 1:], wxyz[..., :1]], axis=-1)
    clip = motion.load_motion(save_clip(tmp_path / "c.npy", rotation, np.array([[0.5, 1.0, 0.9]] * 2)))
    data = mujoco.MjData(MJM)
    motion.set_frame(MJM, data, clip, 1)
    sim = types.SimpleNamespace(mjm=MJM, **{name: torch.tensor(getattr(data, name)[None], dtype=torch.float32)
                                            for name in ("qpos", "qvel", "xpos", "xquat", "cvel")})
    pose = torch.ones(125, dtype=torch.bool)
    pose[7:13] = pose[85:113] = False  # root and DoF velocities
    for local_root_obs in (True, False):
        from_sim = amp.amp_observation(sim, local_root_obs)[0]
        from_clip = clip.amp_observations(local_root_obs)[1]
        torch.testing.assert_close(from_sim[pose], from_clip[pose], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- errors
def test_skeleton_with_other_body_order_is_refused(tmp_path):
    _, rotation, root_translation, _ = synthetic_motion()
    names = list(humanoid.BODY_NAMES)
    names[3], names[6] = names[6], names[3]  # left and right upper arm swapped
    path = save_clip(tmp_path / "swapped.npy", rotation, root_translation, node_names=names)
    with pytest.raises(motion.MotionFileError, match=r"node 3 is 'left_upper_arm', expected 'right_upper_arm'"):
        motion.load_motion(path)
    path = save_clip(tmp_path / "sword.npy", rotation, root_translation, node_names=names[:14] + ["sword"])
    with pytest.raises(motion.MotionFileError, match=r"missing \[.*'left_foot'\], unexpected \['sword'\]"):
        motion.load_motion(path)


class RunsCode:
    """Unpickling this object runs a shell command (what a malicious clip would do)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "the_pickle_ran"
    payload = np.empty((), dtype=object)
    payload[()] = collections.OrderedDict(rotation=RunsCode(f"touch {marker}"))
    path = tmp_path / "malicious.npy"
    np.save(path, payload, allow_pickle=True)
    with pytest.raises(motion.MotionFileError, match=r"malicious\.npy: refused to unpickle global (posix|os)\.system"):
        motion.load_motion(path)
    assert not marker.exists()


def test_files_that_are_not_clips_are_clear_errors(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((3, 4)))
    with pytest.raises(motion.MotionFileError, match=r"plain\.npy: holds a plain array \(shape \(3, 4\)"):
        motion.load_motion(tmp_path / "plain.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(motion.MotionFileError, match=r"text\.npy: not a readable SkeletonMotion"):
        motion.load_motion(tmp_path / "text.npy")
    _, rotation, root_translation, _ = synthetic_motion()
    path = save_clip(tmp_path / "short.npy", rotation[:, :14], root_translation)
    expected = r"short\.npy: field 'rotation' has shape \[6, 14, 4\], expected \[Tx15x4\]"
    with pytest.raises(motion.MotionFileError, match=expected):
        motion.load_motion(path)
    np.save(tmp_path / "no_rotation.npy", collections.OrderedDict(skeleton_tree={}), allow_pickle=True)
    with pytest.raises(motion.MotionFileError, match=r"no_rotation\.npy: skeleton does not match"):
        motion.load_motion(tmp_path / "no_rotation.npy")


# ---------------------------------------------------------------- ASE's clips
@pytest.mark.skipif(not os.path.isdir(ASE_MOTIONS), reason="ASE's clips (../shared/reference/ase-motions/) absent")
@pytest.mark.parametrize("name", sorted(ASE_CLIPS))
def test_ase_clips_load(name):
    clip = motion.load_motion(os.path.join(ASE_MOTIONS, name))
    assert clip.num_frames == ASE_CLIPS[name] and clip.fps == 30.0
    assert torch.isfinite(clip.qpos()).all() and torch.isfinite(clip.dof_vel).all()
    torch.testing.assert_close(clip.root_quat.norm(dim=-1), torch.ones(clip.num_frames, dtype=torch.float64))
    assert 0.7 < float(clip.root_pos[:, 2].mean()) < 1.0  # pelvis height (m) of a person on their feet
    speed = float(clip.root_lin_vel[:, :2].norm(dim=-1).mean())
    assert 0.5 < speed < 5.0  # walk, jog or run (m/s)
    # the stored root velocity agrees with the motion of the root translation
    travelled = clip.root_pos[-1, :2] - clip.root_pos[0, :2]
    mean_velocity = clip.root_lin_vel[:-1, :2].mean(0)
    torch.testing.assert_close(travelled / ((clip.num_frames - 1) / clip.fps), mean_velocity, atol=0.15, rtol=0.1)
    amp = clip.amp_observations(local_root_obs=True)
    assert amp.shape == (clip.num_frames, 125) and torch.isfinite(amp).all()


# ---------------------------------------------------------------- playback
def test_playback_sets_the_clips_joint_angles(synthetic_clip):
    clip, dof_pos, _, root_translation, _ = synthetic_clip
    data = mujoco.MjData(MJM)
    for frame in (0, NUM_FRAMES - 1):
        motion.set_frame(MJM, data, clip, frame)
        np.testing.assert_allclose(data.qpos[7:], dof_pos[frame], atol=1e-9)
        np.testing.assert_allclose(data.xpos[1], root_translation[frame], atol=1e-9)
    # a 1-DoF joint: the shin's rotation relative to the thigh is the knee angle about y
    knee = humanoid.DOF_NAMES.index("right_knee")
    shin, thigh = MJM.body("right_shin").id, MJM.body("right_thigh").id
    relative = mul(inverse(data.xquat[thigh]), data.xquat[shin])
    np.testing.assert_allclose(quat_to_rotvec(relative), [0.0, dof_pos[-1, knee], 0.0], atol=1e-9)
    with pytest.raises(ValueError, match=f"frame {NUM_FRAMES} out of range"):
        motion.set_frame(MJM, data, clip, NUM_FRAMES)


def test_playback_renders_a_png(synthetic_clip, tmp_path):
    available, reason = renderer_available()
    if not available:
        pytest.skip(reason)
    path = tmp_path / "frame.png"
    motion.write_png(synthetic_clip[0], path, frame=2, width=64, height=48)
    image = imageio.imread(path)
    assert image.shape == (48, 64, 3) and image.std() > 0


def test_playback_on_a_users_body_file(synthetic_clip, tmp_path):
    """With --robot-xml the clip plays on the user's copy of ASE's body file (converted as the env does):
    the joint angles are the clip's on that model; a file of another layout is refused naming the joint."""
    from test_robot_xml import KNEE_RANGE_DEG, RIGHT_KNEE, ase_style_copy

    clip, dof_pos, _, root_translation, _ = synthetic_clip
    users_mjm = motion.playback_model(ase_style_copy(tmp_path / "amp_humanoid.xml"))
    np.testing.assert_allclose(np.degrees(users_mjm.jnt_range[1 + RIGHT_KNEE]), KNEE_RANGE_DEG, atol=1e-3)  # the user's body
    data = mujoco.MjData(users_mjm)
    motion.set_frame(users_mjm, data, clip, NUM_FRAMES - 1)
    np.testing.assert_allclose(data.qpos[7:], dof_pos[-1], atol=1e-9)
    np.testing.assert_allclose(data.xpos[1], root_translation[-1], atol=1e-9)

    renamed = ase_style_copy(tmp_path / "renamed.xml", rename_joint=("left_knee", "knee_l"))
    command = [sys.executable, "-m", "tasks.motion", str(clip.path), "--png", str(tmp_path / "f.png"), "--robot-xml",
               str(renamed)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "renamed.xml" in result.stderr and "knee_l" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "f.png").exists()

    available, reason = renderer_available()
    if not available:
        pytest.skip(reason)
    command[-1] = str(tmp_path / "amp_humanoid.xml")
    result = subprocess.run([*command, "--width", "64", "--height", "48"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "body " + str(tmp_path / "amp_humanoid.xml") in result.stdout
    assert imageio.imread(tmp_path / "f.png").shape == (48, 64, 3)
