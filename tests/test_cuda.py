"""Checks that need a CUDA device; skipped without one. `python -m pytest tests -m cuda -q -ra` runs
them (and every other CUDA-marked test); `bench/gpu_check.sh` runs that command with the benchmarks.

- The env's torch tensors on CUDA are views of MuJoCo Warp's arrays: the same device memory, so a
  write through either side is seen by the other, and a physics step updates them in place.
- The env on CUDA (MuJoCo Warp) follows the CPU env (C MuJoCo, float64) from the same state under
  the same actions for 15 control steps, within tests/test_backends.py's bounds for MuJoCo Warp
  against C MuJoCo.
- The default trainer job (4096 envs, MuJoCo Warp, the shipped ant LLC) runs two iterations and
  writes a checkpoint holding them.
"""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_backends import CONTACT_EVENT_ATOL, ROUNDING_ATOL, STEPS, sine_actions

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda:0"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# the torch views of tasks/physics_mjwarp.py's SimViews, each over the MuJoCo Warp array of the same name
VIEW_NAMES = ("qpos", "qvel", "ctrl", "qacc", "qacc_warmstart", "time", "xpos", "xquat", "cvel", "overflow")


def test_env_tensors_share_memory_with_the_warp_arrays():
    import warp as wp

    from tasks import make_env

    env = make_env("ant", "none", 8, device=DEVICE, seed=0, backend="mjwarp")
    data = env.physics.d
    for name in VIEW_NAMES:
        view, array = getattr(env.sim, name), getattr(data, name)
        assert view.device == torch.device(DEVICE) and str(array.device) == DEVICE, name
        assert view.data_ptr() == array.ptr, f"{name}: torch view at {view.data_ptr():#x}, Warp array at {array.ptr:#x}"

    env.sim.qpos[3, 0] = 1.25  # a torch write (torch's stream) ...
    torch.cuda.synchronize()
    assert data.qpos.numpy()[3, 0] == 1.25  # ... read back through Warp
    with wp.ScopedDevice(DEVICE):
        data.qvel.fill_(0.5)  # a Warp write (Warp's stream) ...
        wp.synchronize_device()
    assert torch.equal(env.sim.qvel, torch.full_like(env.sim.qvel, 0.5))  # ... seen by torch

    env.reset()
    pointers = {name: getattr(env.sim, name).data_ptr() for name in VIEW_NAMES}
    env.step(torch.zeros(env.num_envs, env.num_actions, device=DEVICE))  # the captured graph writes the arrays
    torch.cuda.synchronize()
    assert pointers == {name: getattr(env.sim, name).data_ptr() for name in VIEW_NAMES}
    np.testing.assert_array_equal(env.sim.qpos.cpu().numpy(), data.qpos.numpy())
    np.testing.assert_allclose(env.sim.time.cpu().numpy(), np.full(env.num_envs, env.control_dt), rtol=1e-5)


@pytest.mark.parametrize("robot", ("ant", "humanoid"))
def test_cuda_env_follows_the_cpu_env_from_the_same_state(robot):
    """As tests/test_backends.py (its docstring explains the bounds), with MuJoCo Warp on CUDA against C MuJoCo on the
    CPU, over its first STEPS // 2 control steps. The envs' random generators live on different devices and draw
    different initial states, so the CPU worlds start from the CUDA worlds' state; nothing is reset during the
    comparison, and a world is compared only until either env reports it done."""
    from tasks import make_env

    num_envs, steps = 16, STEPS // 2
    cuda_env = make_env(robot, "none", num_envs, device=DEVICE, seed=0, backend="mjwarp")
    cpu_env = make_env(robot, "none", num_envs, device="cpu", seed=0, backend="mujoco")
    cuda_env.reset(), cpu_env.reset()
    cpu_env.sim.qpos.copy_(cuda_env.sim.qpos.cpu())
    cpu_env.sim.qvel.copy_(cuda_env.sim.qvel.cpu())
    cpu_env.forward()
    torch.testing.assert_close(cpu_env.compute_obs()["obs"], cuda_env.compute_obs()["obs"].cpu(), atol=1e-4, rtol=0)
    errors, compared, done_agrees = {"qpos": [], "obs": []}, [], []
    for step in range(steps):
        actions = sine_actions(step, cpu_env)
        (cuda_obs, _, cuda_done, _), (cpu_obs, _, cpu_done, _) = cuda_env.step(actions), cpu_env.step(actions)
        cuda_done = cuda_done.cpu()
        done_agrees.append(cuda_done == cpu_done)
        compared.append(~(cuda_done | cpu_done))  # done is sticky: once either env ends a world, it is left out
        errors["qpos"].append((cpu_env.sim.qpos - cuda_env.sim.qpos.cpu()).abs().amax(-1))
        errors["obs"].append((cpu_obs["obs"] - cuda_obs["obs"].cpu()).abs().amax(-1))
    compared = torch.stack(compared)  # [steps, N]: the world is not done in either env
    assert compared.float().mean() >= 0.5, f"only {compared.float().mean():.0%} of (world, step) before a world ended"
    assert torch.stack(done_agrees).float().mean() >= 0.9, "done differs in more than 10% of (world, step)"
    for name, per_step in errors.items():
        error = torch.stack(per_step)[compared]
        within_rounding = float((error <= ROUNDING_ATOL[name]).float().mean())
        assert within_rounding >= 0.9, f"{name}: only {within_rounding:.0%} of (world, step) within {ROUNDING_ATOL[name]}"
        assert float(error.max()) <= CONTACT_EVENT_ATOL[name], f"{name}: max difference {float(error.max()):.2e}"


def test_default_trainer_job_runs_on_cuda_and_writes_its_checkpoint(tmp_path):
    """hrl_ppo_continuous.py with its defaults but a budget of two iterations: 4096 envs x 32 high-level steps x
    k = 5 simulator steps each, MuJoCo Warp on cuda:0, the shipped ant LLC."""
    steps_per_iteration = 4096 * 32 * 5
    command = [sys.executable, os.path.join(REPO_DIR, "hrl_ppo_continuous.py"), "--total-timesteps",
               str(2 * steps_per_iteration)]
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, WANDB_MODE="offline"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "4096 envs on cuda:0" in result.stdout and "mjwarp" in result.stdout, result.stdout[-3000:]
    [run_dir] = glob.glob(str(tmp_path / "runs" / "*"))
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True, map_location="cpu")
    assert checkpoint["iteration"] == 2 and checkpoint["global_step"] == 2 * steps_per_iteration
    assert checkpoint["args"]["num_envs"] == 4096
    assert checkpoint["rollout"]["env"]["physics"]["qpos"].shape == (4096, 7 + 8)  # the ant: free joint + 8 hinges
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["agent"].values())
