"""Kills at random moments, during checkpoint writes, and resumes: what a pre-empted run must survive.

KILL_TEST_KILLS (default 4) sets how many SIGKILLs the kill test tries; the run's own flags keep each
piece short (tiny networks on the ant, a checkpoint every iteration)."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
import hrl_ppo_continuous as hrl  # noqa: E402

SCRIPT = os.path.join(REPO_DIR, "hrl_ppo_continuous.py")
# 2 envs x 4 high-level steps x k = 1 = 8 simulator steps per iteration; a checkpoint every iteration
RUN = ["--no-cuda", "--llc-checkpoint", "none", "--num-envs", "2", "--num-steps", "4", "--num-minibatches", "2",
       "--update-epochs", "1", "--hidden-sizes", "256", "256", "--checkpoint-interval", "1", "--sim-threads", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def start(args, cwd):
    return subprocess.Popen([sys.executable, SCRIPT, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def checkpoint_path(cwd):
    runs = os.path.join(str(cwd), "runs")
    names = os.listdir(runs) if os.path.isdir(runs) else []
    return os.path.join(runs, names[0], "checkpoint.pt") if names else None


def kill_at_a_random_moment_or_during_a_write(process, cwd, generator, during_write):
    """SIGKILL the run: right after a checkpoint's temp file appears (during_write), or after a random
    0.5-4 s. Returns whether the temp file existed at the kill."""
    deadline = time.time() + (60.0 if during_write else generator.uniform(0.5, 4.0))
    while time.time() < deadline and process.poll() is None:
        path = checkpoint_path(cwd)
        if during_write and path and os.path.exists(path + ".tmp"):
            break
        time.sleep(0.0005 if during_write else 0.05)
    path = checkpoint_path(cwd)
    mid_write = bool(path) and os.path.exists(path + ".tmp")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    return mid_write


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path):
    kills = int(os.environ.get("KILL_TEST_KILLS", "4"))
    generator = random.Random(0)
    total = ["--total-timesteps", str(8 * 400)]
    corrupt, mid_writes, steps_seen = 0, 0, []
    process = start([*RUN, *total], tmp_path)
    for kill in range(kills):
        mid_writes += kill_at_a_random_moment_or_during_a_write(process, tmp_path, generator, during_write=kill % 2 == 1)
        path = checkpoint_path(tmp_path)
        if path is None or not os.path.exists(path):  # killed before the first checkpoint: start again
            shutil.rmtree(tmp_path / "runs", ignore_errors=True)
            process = start([*RUN, *total], tmp_path)
            continue
        try:
            checkpoint = hrl.load_checkpoint(path)
            steps_seen.append(checkpoint["global_step"])
        except SystemExit:
            corrupt += 1
        process = start(["--resume", path], tmp_path)
    stdout, stderr = process.communicate(timeout=600)
    print(f"kills tried {kills}, during a write {mid_writes}, corrupt checkpoints {corrupt}")
    assert corrupt == 0
    assert process.returncode == 0, stderr[-3000:]
    final = hrl.load_checkpoint(checkpoint_path(tmp_path))
    assert final["global_step"] == 8 * 400 and final["iteration"] == 400
    assert not os.path.exists(checkpoint_path(tmp_path) + ".tmp")
    assert steps_seen == sorted(steps_seen)  # every resume continued, none went back


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    process = start([*RUN, "--total-timesteps", str(8 * 100000)], tmp_path)
    deadline = time.time() + 120
    while (checkpoint_path(tmp_path) is None or not os.path.exists(checkpoint_path(tmp_path))) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert "Traceback" not in stderr and ("second interrupt" in stderr or "stopping after this iteration" in stdout)
    hrl.load_checkpoint(checkpoint_path(tmp_path))  # intact


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    process = start([*RUN, "--total-timesteps", "80"], tmp_path)
    time.sleep(0.3)  # importing torch and the simulator
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-2000:]


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    timing = ("charts/SPS", "charts/high_level_SPS", "charts/rollout_SPS")
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag not in timing}


@pytest.mark.parametrize("llc", ["none", "default"])
def test_half_the_iterations_then_resume_equals_all_at_once(tmp_path, llc):
    """On the CPU with the C MuJoCo backend: 6 iterations straight and 3 + --resume + 3 give the same
    parameters, optimiser state, global step and logged scalars (the env's state is in the checkpoint)."""
    flags = ["--no-cuda", "--env-backend", "mujoco", "--sim-threads", "1", "--seed", "3", "--num-envs", "8",
             "--num-steps", "16", "--num-minibatches", "4", "--update-epochs", "2", "--hidden-sizes", "64", "64",
             "--checkpoint-interval", "3", "--torch-threads", "1"]
    flags += ["--llc-checkpoint", "none"] if llc == "none" else ["--llc-steps", "2"]
    steps_per_iteration = 8 * 16 * (1 if llc == "none" else 2)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    for folder in (straight, halves):
        folder.mkdir()
    subprocess.run([sys.executable, SCRIPT, *flags, "--total-timesteps", str(6 * steps_per_iteration)], cwd=straight,
                   env=ENV, check=True, capture_output=True)
    subprocess.run([sys.executable, SCRIPT, *flags, "--total-timesteps", str(3 * steps_per_iteration)], cwd=halves,
                   env=ENV, check=True, capture_output=True)
    half_checkpoint = checkpoint_path(halves)
    subprocess.run([sys.executable, SCRIPT, "--resume", half_checkpoint, "--total-timesteps",
                    str(6 * steps_per_iteration)], cwd=halves, env=ENV, check=True, capture_output=True)
    a, b = hrl.load_checkpoint(checkpoint_path(straight)), hrl.load_checkpoint(half_checkpoint)
    assert a["global_step"] == b["global_step"] == 6 * steps_per_iteration
    for key, value in a["agent"].items():
        torch.testing.assert_close(b["agent"][key], value, atol=1e-6, rtol=0, msg=key)
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][index][name], value, atol=1e-6, rtol=0)
    logged_a, logged_b = scalars(os.path.dirname(checkpoint_path(straight))), scalars(os.path.dirname(half_checkpoint))
    assert logged_a.keys() == logged_b.keys() and "charts/mean_reward" in logged_a
    for tag in logged_a:
        assert [step for step, _ in logged_b[tag]] == [step for step, _ in logged_a[tag]], tag
        assert [value for _, value in logged_b[tag]] == pytest.approx([value for _, value in logged_a[tag]], abs=1e-6), tag


def test_an_unwritable_run_folder_is_a_clear_error(tmp_path):
    (tmp_path / "runs").write_text("a file where the run folders should go")
    result = subprocess.run([sys.executable, SCRIPT, *RUN, "--total-timesteps", "16"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "cannot create the run folder runs/" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_previous_one(tmp_path, monkeypatch):
    agent = hrl.Agent(5, 3, hidden_sizes=(8,))
    optimizer = hrl.make_optimizer(agent, hrl.Args())
    path = str(tmp_path / "checkpoint.pt")
    hrl.save_checkpoint(path, agent, optimizer, hrl.Args(), "run", 8, 1)
    with torch.no_grad():
        agent.critic[0].weight[0, 0] = float("nan")  # a blown-up policy never replaces a good checkpoint
    with pytest.raises(SystemExit, match="stopping: .*critic.0.weight"):
        hrl.save_checkpoint(path, agent, optimizer, hrl.Args(), "run", 16, 2)
    assert hrl.load_checkpoint(path)["global_step"] == 8 and not os.path.exists(path + ".tmp")
