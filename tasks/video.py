"""Offscreen MP4 videos of one world of a batched env, headless on CPU.

Each frame copies the world's qpos to a CPU mujoco.MjData (a host copy, for video only), runs
mj_forward and renders it with mujoco.Renderer; imageio-ffmpeg writes the MP4. The task target is
drawn as a marker (heading: green arrow = target direction, blue arrow = target facing; location:
red sphere at the target).

Rendering backend: MUJOCO_GL, read by mujoco when it is first imported. tasks/__init__.py sets it to
"egl" when unset (Debian packages libegl1, libegl-mesa0, libgl1-mesa-dri: Mesa's software EGL, no GPU
or display needed). MUJOCO_GL=osmesa (package libosmesa6) works too.

    recorder = VideoRecorder(env, "videos/ant.mp4")   # after env.reset()
    for _ in range(300):
        env.step(actions)
        recorder.capture()
    recorder.close()

Command line (random actions): python -m tasks.video --robot ant --task heading --steps 300 --out ant.mp4
An MP4 to a small animated GIF (for a README): python -m tasks.video --to-gif in.mp4 out.gif
"""

import argparse
import os

import imageio
import mujoco
import numpy as np
import torch


def renderer_available(width=64, height=64):
    """(True, "") if an offscreen GL context can be made here, else (False, reason)."""
    try:
        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
        renderer = mujoco.Renderer(model, height, width)
        renderer.close()
        return True, ""
    except Exception as error:  # any GL failure means: no video here
        return False, f"no offscreen OpenGL (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): {error}"


def offscreen_renderer(mjm, width=640, height=480):
    """mujoco.Renderer for mjm; RuntimeError saying how to get offscreen OpenGL when there is none."""
    try:
        return mujoco.Renderer(mjm, height, width)
    except Exception as error:
        raise RuntimeError(
            f"cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: {error}. Set "
            "MUJOCO_GL=egl (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri) or MUJOCO_GL=osmesa (libosmesa6) "
            "before mujoco is first imported") from error


def tracking_camera(distance=3.5):
    """A camera that follows the root body (body 1), looking down 20 degrees; works for any robot."""
    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_TRACKING
    camera.trackbodyid = 1
    camera.distance, camera.elevation, camera.azimuth = distance, -20.0, 135.0
    return camera


def mp4_writer(path, fps):
    """An imageio H.264 writer at `fps` frames per second; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=8)


class VideoRecorder:
    def __init__(self, env, path, world=0, width=640, height=480, fps=None, camera_distance=3.5):
        if not 0 <= world < env.num_envs:
            raise ValueError(f"world {world} out of range: the env has {env.num_envs} worlds")
        self.env, self.path, self.world = env, path, world
        self.data = mujoco.MjData(env.mjm)
        self.renderer = offscreen_renderer(env.mjm, width, height)
        self.camera = tracking_camera(camera_distance)
        fps = fps if fps is not None else round(1.0 / env.control_dt)
        self.writer = mp4_writer(path, fps)
        self.num_frames = 0

    def capture(self):
        """Render the world's current state and append it to the video."""
        self.data.qpos[:] = self.env.sim.qpos[self.world].detach().cpu().double().numpy()
        mujoco.mj_forward(self.env.mjm, self.data)
        self.renderer.update_scene(self.data, camera=self.camera)
        self._draw_task_marker()
        self.writer.append_data(self.renderer.render())
        self.num_frames += 1

    def _draw_task_marker(self):
        state, root_pos = self.env.task_state, self.data.qpos[0:3]
        if "target_dir" in state:
            self._add_arrow(root_pos, state["target_dir"][self.world], [0.1, 0.8, 0.1, 1])
            self._add_arrow(root_pos, state["target_facing"][self.world], [0.1, 0.3, 0.9, 1])
        if "target_pos" in state:
            x, y = state["target_pos"][self.world].tolist()
            self._add_geom(mujoco.mjtGeom.mjGEOM_SPHERE, [0.15, 0, 0], [x, y, 0.15], np.eye(3), [0.9, 0.1, 0.1, 1])

    def _add_arrow(self, root_pos, direction_xy, rgba):
        start = np.array([root_pos[0], root_pos[1], root_pos[2] + 0.5])
        end = start + np.array([*direction_xy.tolist(), 0.0])
        scene = self.renderer.scene
        if scene.ngeom < scene.maxgeom:
            geom = scene.geoms[scene.ngeom]
            mujoco.mjv_initGeom(geom, mujoco.mjtGeom.mjGEOM_ARROW, np.zeros(3), np.zeros(3), np.eye(3).ravel(),
                                np.array(rgba, dtype=np.float32))
            mujoco.mjv_connector(geom, mujoco.mjtGeom.mjGEOM_ARROW, 0.03, start, end)
            scene.ngeom += 1

    def _add_geom(self, geom_type, size, pos, mat, rgba):
        scene = self.renderer.scene
        if scene.ngeom < scene.maxgeom:
            mujoco.mjv_initGeom(scene.geoms[scene.ngeom], geom_type, np.array(size, dtype=np.float64),
                                np.array(pos, dtype=np.float64), np.asarray(mat, dtype=np.float64).ravel(),
                                np.array(rgba, dtype=np.float32))
            scene.ngeom += 1

    def close(self):
        self.writer.close()
        self.renderer.close()


def record_rollout(env, path, steps, policy=None, world=0, **recorder_kwargs):
    """Reset env, run `steps` control steps with actions = policy(obs) (default: uniform random in
    [-1, 1]), calling reset_done() after each step, and write world `world` to `path`."""
    generator = torch.Generator(device=env.device).manual_seed(0)
    obs = env.reset()["obs"]
    recorder = VideoRecorder(env, path, world=world, **recorder_kwargs)
    recorder.capture()
    for _ in range(steps):
        if policy is None:
            actions = torch.rand(env.num_envs, env.num_actions, device=env.device, generator=generator) * 2 - 1
        else:
            actions = policy(obs)
        env.step(actions)
        recorder.capture()
        obs = env.reset_done()["obs"]
    recorder.close()
    return recorder.num_frames


class RecordingEnv:
    """Env proxy that renders one world after every control step (a controller's inner steps included)."""

    def __init__(self, env, recorder):
        self.env, self.recorder = env, recorder

    def step(self, actions):
        result = self.env.step(actions)
        self.recorder.capture()
        return result

    def __getattr__(self, name):
        return getattr(self.env, name)


def record_episode(env, decide, path, max_decisions, world=0, **recorder_kwargs):
    """One episode of world `world` as an MP4. `decide(recording_env, obs)` takes one decision: it steps
    the env it is given (one or more control steps, each one rendered) and returns the done flags [N].
    Stops when world `world` finishes or after max_decisions; returns the frame count."""
    obs = env.reset()["obs"]
    recorder = VideoRecorder(env, path, world=world, **recorder_kwargs)
    recorder.capture()
    recording_env = RecordingEnv(env, recorder)
    for _ in range(max_decisions):
        if bool(decide(recording_env, obs)[world]):
            break
        obs = env.reset_done()["obs"]
    recorder.close()
    return recorder.num_frames


def mp4_to_gif(mp4_path, gif_path, frame_stride=2, downscale=2, max_seconds=None):
    """Write every `frame_stride`-th frame of an MP4, each side divided by `downscale`, as a looping
    GIF that plays at the MP4's speed; `max_seconds` keeps only the start. Returns the frame count."""
    reader = imageio.get_reader(mp4_path)
    fps = reader.get_meta_data()["fps"]
    last = None if max_seconds is None else int(max_seconds * fps)
    frames = [frame[::downscale, ::downscale] for i, frame in enumerate(reader)
              if i % frame_stride == 0 and (last is None or i < last)]
    reader.close()
    imageio.mimsave(gif_path, frames, duration=1000.0 * frame_stride / fps, loop=0)  # duration: ms per frame
    return len(frames)


if __name__ == "__main__":
    from tasks import ROBOTS, TASKS, make_env

    parser = argparse.ArgumentParser(description="Record world 0 of a robot under random actions to MP4.")
    parser.add_argument("--robot", default="ant", choices=ROBOTS)
    parser.add_argument("--task", default="heading", choices=TASKS)
    parser.add_argument("--steps", type=int, default=300, help="control steps")
    parser.add_argument("--num-envs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="videos/rollout.mp4")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--to-gif", nargs=2, metavar=("MP4", "GIF"), help="convert a recorded MP4 to a GIF instead")
    parser.add_argument("--gif-seconds", type=float, default=None, help="with --to-gif: keep only the first seconds")
    parser.add_argument("--gif-stride", type=int, default=2, help="with --to-gif: keep every this many frames")
    args = parser.parse_args()
    if args.to_gif:
        frames = mp4_to_gif(*args.to_gif, frame_stride=args.gif_stride, max_seconds=args.gif_seconds)
        print(f"wrote {frames} frames to {args.to_gif[1]}")
        raise SystemExit(0)
    env = make_env(args.robot, args.task, args.num_envs, device="cpu", seed=args.seed)
    frames = record_rollout(env, args.out, args.steps, width=args.width, height=args.height)
    print(f"wrote {frames} frames to {args.out}")
