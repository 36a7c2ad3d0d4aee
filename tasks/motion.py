"""ASE's motion clips (poselib `SkeletonMotion` .npy files) on the humanoid, and kinematic playback.

A clip file is `np.save` of an OrderedDict, so reading it needs pickle. `read_skeleton_motion` reads it
with a restricted unpickler that builds only dicts, OrderedDicts, lists and numpy arrays (and their
dtypes); any other global in the pickle is refused before anything is built, naming the file.

`load_motion` turns a clip into per-frame humanoid state (`MotionClip`), as ASE's motion library does:
    root pose          the root node's translation and rotation (world; quaternion w, x, y, z)
    DoF angles         from each joint's local rotation: a 3-DoF joint's hinges x, y, z hold the
                       exponential map of the rotation; a 1-DoF joint's angle is the rotation angle
                       about its hinge axis (y for elbows and knees)
    root velocities    the clip's global_velocity / global_angular_velocity of the root (or finite
                       differences of the root pose when the clip has none)
    DoF velocities     finite differences of the local rotations (last frame repeated)
    body positions     forward kinematics of the clip's own skeleton (its local_translation)
The skeleton's node names must be the humanoid's BODY_NAMES, in that order.

Playback (sets a plain mujoco model of the humanoid to each frame with mj_forward and renders it):
    MUJOCO_GL=egl python -m tasks.motion PATH --video out.mp4
    MUJOCO_GL=egl python -m tasks.motion PATH --png frame.png --frame 10
    MUJOCO_GL=egl python -m tasks.motion PATH --video out.mp4 --robot-xml amp_humanoid.xml   (a user's body file)
"""

import argparse
import collections
import importlib
import pickle
from dataclasses import dataclass

import imageio
import mujoco
import numpy as np
import torch

from tasks import humanoid  # tasks/__init__.py sets MUJOCO_GL=egl when unset, before mujoco renders
from tasks.amp import KEY_BODY_IDS, amp_frame, quat_conjugate, quat_mul, quat_to_exp_map
from tasks.humanoid import BODY_NAMES, JOINTS, _rotate
from tasks.video import mp4_writer, offscreen_renderer, tracking_camera


class MotionFileError(ValueError):
    """A motion clip that cannot be read or does not fit the humanoid; the message names the file."""


# ---------------------------------------------------------------- restricted reading
def _numpy_global(*names):
    """The first of numpy's module paths that exists (numpy 2 moved numpy.core to numpy._core)."""
    for module, attr in names:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {names} found in this numpy")


_RECONSTRUCT = _numpy_global(("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"))
_SCALAR = _numpy_global(("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"))
# (module, name) a SkeletonMotion pickle may refer to -> what it builds
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise MotionFileError(f"{self.path}: refused to unpickle global {module}.{name}: a motion clip "
                                  "holds only dicts, lists and numpy arrays")
        return ALLOWED_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise MotionFileError(f"{self.path}: refused a persistent pickle reference {pid!r}")


def read_skeleton_motion(path):
    """The dict stored in a SkeletonMotion .npy file, read without running pickled code."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise MotionFileError(f"{path}: .npy format version {version} is not supported (1.0 or 2.0)")
            shape, _, dtype = read_header(file)
            if dtype != np.dtype(object) or shape != ():
                raise MotionFileError(f"{path}: holds a plain array (shape {shape}, dtype {dtype}), not a "
                                      "SkeletonMotion (a pickled dict)")
            stored = _RestrictedUnpickler(file, path).load()
    except MotionFileError:
        raise
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError) as error:
        raise MotionFileError(f"{path}: not a readable SkeletonMotion .npy file: {error}") from error
    motion = stored.item() if isinstance(stored, np.ndarray) and stored.shape == () else stored
    if not isinstance(motion, dict):
        raise MotionFileError(f"{path}: expected a SkeletonMotion dict, found {type(motion).__name__}")
    return motion


# ---------------------------------------------------------------- clip -> humanoid frames
@dataclass
class MotionClip:
    """A clip as humanoid state, one row per frame (T frames), float64."""
    path: str
    fps: float
    root_pos: torch.Tensor  # [T, 3] world, m
    root_quat: torch.Tensor  # [T, 4] world, w x y z
    root_lin_vel: torch.Tensor  # [T, 3] world, m/s
    root_ang_vel: torch.Tensor  # [T, 3] world, rad/s
    dof_pos: torch.Tensor  # [T, 28] rad, DOF_NAMES order
    dof_vel: torch.Tensor  # [T, 28] rad/s
    body_pos: torch.Tensor  # [T, 15, 3] world, m: the clip skeleton's body origins, BODY_NAMES order

    @property
    def num_frames(self):
        return self.root_pos.shape[0]

    @property
    def key_body_pos(self):
        """[T, 4, 3] world, m: KEY_BODY_NAMES origins."""
        return self.body_pos[:, list(KEY_BODY_IDS)]

    def qpos(self):
        """MuJoCo qpos of the humanoid, [T, 35]: root position, root quaternion, hinge angles."""
        return torch.cat([self.root_pos, self.root_quat, self.dof_pos], dim=-1)

    def amp_observations(self, local_root_obs):
        """The AMP frame of every clip frame, [T, 125], from the same code as the env's."""
        return amp_frame(self.root_pos, self.root_quat, self.root_lin_vel, self.root_ang_vel,
                         self.dof_pos, self.dof_vel, self.key_body_pos, local_root_obs)


def _field(motion, key, path, shape=None):
    """motion[key]["arr"] (poselib stores each array as {arr, context}) as float64, shape checked."""
    entry = motion.get(key)
    if isinstance(entry, dict):
        entry = entry.get("arr")
    if not isinstance(entry, np.ndarray):
        raise MotionFileError(f"{path}: field {key!r} missing or not an array (SkeletonMotion keys: "
                              f"{sorted(motion)})")
    fits = shape is None or (entry.ndim == len(shape) and all(s in (None, e) for s, e in zip(shape, entry.shape)))
    if not fits:
        expected = "x".join("T" if s is None else str(s) for s in shape)
        raise MotionFileError(f"{path}: field {key!r} has shape {list(entry.shape)}, expected [{expected}]")
    return torch.as_tensor(entry.astype(np.float64))


def _check_skeleton(skeleton, path):
    """The clip's node names and parents must be the humanoid's bodies in BODY_NAMES order."""
    names = tuple(skeleton.get("node_names", ()))
    if names != BODY_NAMES:
        missing = [n for n in BODY_NAMES if n not in names]
        extra = [n for n in names if n not in BODY_NAMES]
        first = next((i for i, (a, b) in enumerate(zip(names, BODY_NAMES)) if a != b), min(len(names), len(BODY_NAMES)))
        found = names[first] if first < len(names) else "(none)"
        expected = BODY_NAMES[first] if first < len(BODY_NAMES) else "(none)"
        raise MotionFileError(
            f"{path}: skeleton does not match the humanoid: node {first} is {found!r}, expected {expected!r} "
            f"({len(names)} nodes, expected {len(BODY_NAMES)}; missing {missing}, unexpected {extra})")
    parents = _field(skeleton, "parent_indices", path, (len(BODY_NAMES),)).long().tolist()
    expected_parents = [int(p) - 1 for p in humanoid.default_model().body_parentid[1:]]
    if parents != expected_parents:
        raise MotionFileError(f"{path}: skeleton parents {parents} differ from the humanoid's {expected_parents}")


def _joint_bodies_and_axes():
    """Per entry of JOINTS: the index (0..14) of the body it moves and its hinge axes [size, 3]."""
    mjm, bodies, axes, dof = humanoid.default_model(), [], [], 0
    for _, size in JOINTS:
        joint_ids = range(1 + dof, 1 + dof + size)  # model joint 0 is the free joint
        bodies.append(int(mjm.jnt_bodyid[joint_ids[0]]) - 1)
        axes.append(torch.as_tensor(mjm.jnt_axis[list(joint_ids)], dtype=torch.float64))
        dof += size
    return bodies, axes


_JOINT_BODIES, _JOINT_AXES = _joint_bodies_and_axes()


def local_rotations_to_dof(exp_maps):
    """Per-body exponential maps [T, 15, 3] (rad) -> hinge values [T, 28]: a 3-DoF joint's hinges take
    the exponential map of its body's rotation, a 1-DoF joint's hinge its component along the hinge
    axis. Used for angles (local rotations) and velocities (rotation per second) alike."""
    values = []
    for body, axes in zip(_JOINT_BODIES, _JOINT_AXES):
        exp_map = exp_maps[:, body]
        values.append(exp_map if axes.shape[0] == 3 else exp_map @ axes.T)
    return torch.cat(values, dim=-1)


def _rotation_rate(quat, dt, world):
    """Finite-difference rotation rate (rad/s) between consecutive frames of quat [T, ..., 4]; the
    last frame repeats the one before. world: in the fixed frame (q1 q0^-1), else in the moving
    frame (q0^-1 q1, ASE's DoF velocities)."""
    q0, q1 = quat[:-1], quat[1:]
    delta = quat_mul(q1, quat_conjugate(q0)) if world else quat_mul(quat_conjugate(q0), q1)
    rate = quat_to_exp_map(delta) / dt
    return torch.cat([rate, rate[-1:]], dim=0)


def _forward_kinematics(root_pos, local_rot, local_translation):
    """World origins [T, 15, 3] of the clip skeleton's bodies (parents come before children)."""
    parents = [int(p) - 1 for p in humanoid.default_model().body_parentid[1:]]
    world_rot, world_pos = [local_rot[:, 0]], [root_pos]
    for body in range(1, len(BODY_NAMES)):
        parent_rot, parent_pos = world_rot[parents[body]], world_pos[parents[body]]
        offset = local_translation[body].expand_as(parent_pos)
        world_pos.append(parent_pos + _rotate(parent_rot, offset))
        world_rot.append(quat_mul(parent_rot, local_rot[:, body]))
    return torch.stack(world_pos, dim=1)


def load_motion(path):
    """Read an ASE SkeletonMotion clip and convert it to humanoid frames (see the module docstring)."""
    motion = read_skeleton_motion(path)
    skeleton = motion.get("skeleton_tree")
    if not isinstance(skeleton, dict):
        raise MotionFileError(f"{path}: no skeleton_tree dict (keys: {sorted(motion)})")
    _check_skeleton(skeleton, path)
    if not bool(motion.get("is_local", True)):
        raise MotionFileError(f"{path}: is_local is {motion.get('is_local')!r}; only local rotations are supported")
    fps = float(motion.get("fps", 0.0))
    if not fps > 0.0:
        raise MotionFileError(f"{path}: fps is {motion.get('fps')!r}, expected a positive number")
    num_bodies = len(BODY_NAMES)
    rotation_xyzw = _field(motion, "rotation", path, (None, num_bodies, 4))
    if rotation_xyzw.shape[0] < 2:
        raise MotionFileError(f"{path}: {rotation_xyzw.shape[0]} frame(s); a clip needs at least 2")
    local_rot = torch.cat([rotation_xyzw[..., 3:], rotation_xyzw[..., :3]], dim=-1)
    local_rot = local_rot / local_rot.norm(dim=-1, keepdim=True)
    root_pos = _field(motion, "root_translation", path, (rotation_xyzw.shape[0], 3))
    dt = 1.0 / fps
    root_lin_vel, root_ang_vel = _root_velocities(motion, path, root_pos, local_rot[:, 0], dt)
    local_translation = _field(skeleton, "local_translation", path, (num_bodies, 3))
    return MotionClip(
        path=str(path), fps=fps, root_pos=root_pos, root_quat=local_rot[:, 0],
        root_lin_vel=root_lin_vel, root_ang_vel=root_ang_vel,
        dof_pos=local_rotations_to_dof(quat_to_exp_map(local_rot)),
        dof_vel=local_rotations_to_dof(_rotation_rate(local_rot, dt, world=False)),
        body_pos=_forward_kinematics(root_pos, local_rot, local_translation))


def _root_velocities(motion, path, root_pos, root_quat, dt):
    """The clip's root linear and angular velocity (world, m/s and rad/s), or finite differences."""
    if "global_velocity" in motion and "global_angular_velocity" in motion:
        shape = (root_pos.shape[0], len(BODY_NAMES), 3)
        return (_field(motion, "global_velocity", path, shape)[:, 0],
                _field(motion, "global_angular_velocity", path, shape)[:, 0])
    lin_vel = (root_pos[1:] - root_pos[:-1]) / dt
    return torch.cat([lin_vel, lin_vel[-1:]], dim=0), _rotation_rate(root_quat, dt, world=True)


# ---------------------------------------------------------------- kinematic playback
def set_frame(mjm, data, clip, frame):
    """Set a plain mujoco humanoid to clip frame `frame` (qpos only) and run mj_forward."""
    if not 0 <= frame < clip.num_frames:
        raise ValueError(f"frame {frame} out of range: {clip.path} has {clip.num_frames} frames")
    data.qpos[:] = clip.qpos()[frame].numpy()
    data.qvel[:] = 0.0
    mujoco.mj_forward(mjm, data)


def playback_model(robot_xml=None):
    """The MjModel a clip is played on: assets/humanoid.xml, or a user's copy of ASE's amp_humanoid.xml
    converted and its layout checked as the env does (tasks/ase_mjcf.py raises ASEModelError naming what
    differs), so the clip is seen on the body the LLC was trained on."""
    if robot_xml is None:
        return humanoid.default_model()
    return humanoid.convert_robot_xml(robot_xml).compile()


def render_frames(clip, frames, width=640, height=480, robot_xml=None):
    """Yield an RGB image [height, width, 3] of the humanoid (robot_xml: a user's body file) in each clip
    frame of `frames`."""
    mjm = playback_model(robot_xml)
    data, renderer, camera = mujoco.MjData(mjm), offscreen_renderer(mjm, width, height), tracking_camera()
    try:
        for frame in frames:
            set_frame(mjm, data, clip, frame)
            renderer.update_scene(data, camera=camera)
            yield renderer.render()
    finally:
        renderer.close()


def write_video(clip, path, loops=1, **render_kwargs):
    """The clip played `loops` times at its own fps as an MP4; returns the number of frames written."""
    writer = mp4_writer(path, clip.fps)
    count = 0
    for image in render_frames(clip, list(range(clip.num_frames)) * loops, **render_kwargs):
        writer.append_data(image)
        count += 1
    writer.close()
    return count


def write_png(clip, path, frame=0, **render_kwargs):
    """One clip frame as a PNG image."""
    image = next(render_frames(clip, [frame], **render_kwargs))
    imageio.imwrite(path, image)


def describe(clip):
    root_height = clip.root_pos[:, 2]
    return (f"{clip.path}: {clip.num_frames} frames at {clip.fps:g} fps ({clip.num_frames / clip.fps:.2f} s), "
            f"root height {root_height.min():.3f}..{root_height.max():.3f} m, "
            f"root speed {clip.root_lin_vel[:, :2].norm(dim=-1).mean():.2f} m/s (mean, horizontal)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Play an ASE motion clip (.npy) on the humanoid, kinematically.")
    parser.add_argument("path", help="ASE SkeletonMotion .npy file, e.g. ase/data/motions/amp_humanoid_walk.npy")
    parser.add_argument("--video", help="write the clip as an MP4 here")
    parser.add_argument("--loops", type=int, default=1, help="with --video: play the clip this many times")
    parser.add_argument("--png", help="write one frame as a PNG here")
    parser.add_argument("--frame", type=int, default=0, help="with --png: the frame to write")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--robot-xml", help="play on this copy of ASE's amp_humanoid.xml instead of assets/humanoid.xml")
    args = parser.parse_args()
    try:
        motion_clip = load_motion(args.path)
        playback_model(args.robot_xml)  # a body file that is not the humanoid's layout fails before any output
    except (MotionFileError, OSError, ValueError) as error:  # ASEModelError is a ValueError
        raise SystemExit(f"error: {error}")
    print(describe(motion_clip) + (f"; body {args.robot_xml}" if args.robot_xml else ""))
    size = {"width": args.width, "height": args.height, "robot_xml": args.robot_xml}
    if args.video:
        print(f"wrote {write_video(motion_clip, args.video, loops=args.loops, **size)} frames to {args.video}")
    if args.png:
        write_png(motion_clip, args.png, frame=args.frame, **size)
        print(f"wrote frame {args.frame} to {args.png}")
