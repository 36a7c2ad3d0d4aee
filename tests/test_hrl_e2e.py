"""End-to-end runs of hrl_ppo_continuous.py as a subprocess: CPU, ant on MuJoCo Warp with 2 envs and a
tiny budget, and the Isaac Gym path through the fake modules in tests/fake_isaacgym."""
import glob
import math
import os
import re
import signal
import subprocess
import sys
import time

import mujoco
import pytest
import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_DIR, "hrl_ppo_continuous.py")
FAKE_ISAACGYM = os.path.join(REPO_DIR, "tests", "fake_isaacgym")
sys.path.insert(0, REPO_DIR)

# 2 envs x 4 high-level steps x k = 5 = 40 simulator steps per iteration; tiny networks
TINY = ["--no-cuda", "--num-envs", "2", "--num-steps", "4", "--num-minibatches", "2", "--update-epochs", "2",
        "--hidden-sizes", "32", "32", "--checkpoint-interval", "1"]


def run(args, cwd, extra_env=None, check=True, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **(extra_env or {}))
    result = subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit code {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                             f"stderr:\n{result.stderr[-3000:]}")
    return result


def run_dirs(cwd):
    return sorted(glob.glob(os.path.join(str(cwd), "runs", "*")))


def saved(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


@pytest.fixture(scope="module")
def tiny_llc(tmp_path_factory):
    """A small untrained LLC for the ant in the native format (obs 29 without the task part, 8 joints)."""
    from llc import build_llc, save_llc
    from tasks import ant

    path = str(tmp_path_factory.mktemp("llc") / "llc_ant_tiny.pt")
    model = build_llc(ant.NUM_ROBOT_OBS, 8, 8, hidden=(32, 32), style_hidden=(16,), style_dim=8)
    save_llc(path, model, {"robot": "ant", "note": "untrained, for tests"})
    return path


SHIPPED_LLC = os.path.join(REPO_DIR, "checkpoints", "llc_ant.pt")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llc):
    """Two iterations of hierarchical PPO on the ant (shared by the resume and eval tests), with the
    default LLC (the shipped checkpoints/llc_ant.pt) when it exists, else the tiny one."""
    cwd = tmp_path_factory.mktemp("train")
    llc_flags = [] if os.path.isfile(SHIPPED_LLC) else ["--llc-checkpoint", tiny_llc]
    result = run([*TINY, *llc_flags, "--total-timesteps", "80"], cwd)
    return cwd, result


def test_short_run_writes_tensorboard_events_and_a_checkpoint(trained_run):
    cwd, result = trained_run
    (run_dir,) = run_dirs(cwd)
    assert os.path.basename(run_dir).startswith("ant-heading__hrl_ppo_continuous__1__")
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    checkpoint = saved(run_dir)
    assert checkpoint["global_step"] == 80 and checkpoint["iteration"] == 2
    assert checkpoint["args"]["llc_steps"] == 5 and checkpoint["args"]["num_envs"] == 2
    assert "iter 2/2 step 80" in result.stdout
    assert f"simulator mujoco (C MuJoCo {mujoco.__version__}, {os.cpu_count()} thread" in result.stdout  # the CPU default

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    for key in ("charts/SPS", "charts/high_level_SPS", "losses/value_loss", "losses/policy_loss", "losses/approx_kl"):
        assert [e.step for e in events.Scalars(key)] == [40, 80], key


def test_resume_continues_at_the_saved_global_step(trained_run, tiny_llc):
    cwd, _ = trained_run
    (run_dir,) = run_dirs(cwd)
    result = run(["--resume", os.path.join(run_dir, "checkpoint.pt"), "--total-timesteps", "120"], cwd)
    assert "at global step 80" in result.stdout and "iter 3/3 step 120" in result.stdout
    assert run_dirs(cwd) == [run_dir]  # same run directory
    checkpoint = saved(run_dir)
    assert checkpoint["global_step"] == 120 and checkpoint["iteration"] == 3
    changed = run(["--resume", os.path.join(run_dir, "checkpoint.pt"), "--llc-steps", "3"], cwd, check=False)
    assert changed.returncode != 0 and "--resume cannot change --llc-steps" in changed.stderr


def test_eval_checkpoint_prints_a_return(trained_run):
    cwd, _ = trained_run
    (run_dir,) = run_dirs(cwd)
    result = run(["--eval-checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--eval-episodes", "2"], cwd)
    assert "mean return" in result.stdout and "over 2 episodes" in result.stdout
    speed = float(re.search(r"mean root speed (\S+) m/s \(planar path / time\)", result.stdout).group(1))
    assert 0.0 <= speed < 20.0
    assert run_dirs(cwd) == [run_dir]  # evaluation writes no run


def test_flat_baseline_with_wandb_offline(tmp_path):
    result = run([*TINY, "--llc-checkpoint", "none", "--total-timesteps", "24", "--track", "--save-model"], tmp_path)
    assert "flat PPO" in result.stdout and "k = 1" in result.stdout
    (run_dir,) = run_dirs(tmp_path)
    assert os.path.isfile(os.path.join(run_dir, "hrl_ppo_continuous.cleanrl_model"))
    assert saved(run_dir)["global_step"] == 24  # 2 envs x 4 steps x k = 1, three iterations
    # W&B's files live apart from TensorBoard's: runs/ holds one events file, in the run's folder
    events = glob.glob(os.path.join(str(tmp_path), "runs", "**", "*tfevents*"), recursive=True)
    assert [os.path.dirname(path) for path in events] == [run_dir]
    (wandb_file,) = glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*", "run-*.wandb"))
    from wandb_records import final_summary

    assert final_summary(wandb_file)["global_step"] == 24  # the summary is the last logged step


def test_console_shows_the_run_header_first_and_says_what_will_run(tmp_path):
    """No simulator banner or kernel-loading lines before the run's own header, and a budget that is
    not a whole number of iterations is reported (40 simulator steps per iteration here)."""
    result = run([*TINY, "--llc-checkpoint", "none", "--total-timesteps", "50"], tmp_path)
    lines = [line for line in result.stdout.splitlines() if not line.startswith("MuJoCo Warp: compiling")]
    assert lines[0].startswith("ant-heading__"), result.stdout[:500]
    assert "Warp" not in result.stderr and "Module" not in result.stdout, result.stderr[:500]
    assert "--total-timesteps 50 is not a whole number of iterations of 8 simulator steps" in result.stdout
    assert "running 48 simulator steps" in result.stdout


def test_help_lists_robots_tasks_and_one_default_per_flag(tmp_path):
    from tasks import ROBOTS, TASKS

    result = run(["--help"], tmp_path, extra_env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert text.index("frozen low-level controller") < text.index("--exp-name")  # a description at the top
    assert f"one of {', '.join(ROBOTS)}" in text and f"one of {', '.join(TASKS)}" in text
    for flag in ("--num-envs", "--llc-steps", "--total-timesteps", "--llc-checkpoint", "--style-reward-weight"):
        help_of_flag = text.split(flag, 1)[1].split(" --", 1)[0]
        assert help_of_flag.count("default") == 1, f"{flag}: {help_of_flag}"


def test_missing_llc_checkpoint_is_a_clear_error(tmp_path):
    result = run([*TINY, "--llc-checkpoint", str(tmp_path / "absent.pt")], tmp_path, check=False)
    assert result.returncode != 0 and "no LLC checkpoint at" in result.stderr
    assert run_dirs(tmp_path) == []


# ------------------------------------------------------------------ Isaac Gym (fake modules)
FAKE = ["--env-backend", "isaacgym", "--task", "FakePointMass", "--robot", "pointmass"]


def test_isaacgym_backend_without_isaacgym_explains_how_to_install(tmp_path):
    result = run([*TINY, *FAKE], tmp_path, check=False)
    assert result.returncode != 0
    assert "Isaac Gym Preview 4" in result.stderr and "--env-backend mjwarp" in result.stderr


def test_isaacgym_backend_with_an_llc_through_isaacgymenvs_make(tmp_path):
    from llc import build_llc, save_llc

    llc_path = str(tmp_path / "llc_pointmass.pt")  # fake task: 8 obs of which 2 task obs, 3 actions
    save_llc(llc_path, build_llc(6, 4, 3, arch="mlp", hidden=(16,)), {"robot": "pointmass"})
    result = run([*TINY, *FAKE, "--llc-checkpoint", llc_path, "--total-timesteps", "80"], tmp_path,
                 extra_env={"PYTHONPATH": FAKE_ISAACGYM})
    assert "iter 2/2 step 80" in result.stdout
    (run_dir,) = run_dirs(tmp_path)
    assert os.path.basename(run_dir).startswith("pointmass-FakePointMass__")
    result = run(["--env-backend", "isaacgym", "--eval-checkpoint", os.path.join(run_dir, "checkpoint.pt")], tmp_path,
                 extra_env={"PYTHONPATH": FAKE_ISAACGYM})
    assert "mean return" in result.stdout


def test_isaacgym_env_factory_and_sigterm_writes_a_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=FAKE_ISAACGYM)
    args = [*TINY, *FAKE, "--llc-checkpoint", "none", "--env-factory", "fake_vec_task:make_fake_vec_task",
            "--total-timesteps", "100000000", "--checkpoint-interval", "100000"]
    process = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*")) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)  # a few iterations
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # stopped, not finished
    assert "stopping after this iteration" in stdout and "resume with --resume" in stdout
    (run_dir,) = run_dirs(tmp_path)
    checkpoint = saved(run_dir)
    assert checkpoint["iteration"] >= 1 and checkpoint["global_step"] == checkpoint["iteration"] * 8


def test_humanoid_with_an_ase_llc_logs_the_style_reward(tmp_path):
    """An ASE-layout LLC with a discriminator (synthetic, small; AMP input 1250) on the MuJoCo humanoid:
    the style reward is on by default (weight 0.1) and TensorBoard gets charts/style_reward."""
    from test_llc import ase_llc_checkpoint, set_local_root_obs_stats

    llc_path = str(tmp_path / "ase_humanoid_llc.pth")
    checkpoint = ase_llc_checkpoint(obs_dim=223, latent_dim=8, action_dim=28, amp_obs_dim=1250, units=(32, 32, 16),
                                    style_units=(16, 8), style_dim=6, disc_units=(24, 12))
    torch.save(set_local_root_obs_stats(checkpoint, True), llc_path)  # as ASE's LLCs: localRootObs true
    result = run([*TINY, "--robot", "humanoid", "--task", "heading", "--env-backend", "mujoco",
                  "--llc-checkpoint", llc_path, "--local-root-obs", "--total-timesteps", "80"], tmp_path)
    assert "style weight 0.1," in result.stdout
    (run_dir,) = run_dirs(tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    style = events.Scalars("charts/style_reward")
    assert [e.step for e in style] == [40, 80]
    assert all(0.0 <= e.value <= -2.0 * math.log(1e-4) for e in style)  # -2 log(max(1 - D, 1e-4))
