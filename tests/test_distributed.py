"""torchrun with 2 processes on the CPU (gloo): the distributed update equals one process's update of the same
total batch, the normalisers agree on every rank, only rank 0 writes, resume, SIGTERM on one rank, a dead rank.

Tiny sizes: every launch is 2 processes on CI's 2 cores. Without torchrun nothing is distributed; the other
test files cover that path."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
sys.path.insert(0, TESTS_DIR)
import distributed_worker as worker  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# per rank: 2 envs x 4 high-level steps x k = 5 = 40 simulator steps per iteration, 80 over both ranks
TINY = ["--no-cuda", "--env-backend", "mujoco", "--sim-threads", "1", "--num-envs", "2", "--num-steps", "4",
        "--num-minibatches", "2", "--update-epochs", "2", "--hidden-sizes", "32", "32", "--checkpoint-interval", "1"]
TINY_LLC = ["--robot", "ant", "--env-backend", "mujoco", "--sim-threads", "1", "--num-envs", "2", "--num-steps", "8",
            "--num-minibatches", "2", "--update-epochs", "2", "--llc-hidden", "16", "16", "--llc-style-hidden", "8",
            "--llc-style-dim", "4", "--critic-hidden", "16"]


def environment():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_DIR)


def torchrun(script, *args, cwd, timeout=300):
    result = subprocess.run([*TORCHRUN, os.path.join(REPO_DIR, script), *args], cwd=cwd, env=environment(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def files_under(folder):
    return sorted(os.path.relpath(path, folder) for path in glob.glob(os.path.join(str(folder), "**"), recursive=True)
                  if os.path.isfile(path))


# ---------------------------------------------------------------- one update: 2 ranks of N/2 envs == 1 process of N
def test_two_ranks_update_like_one_process_with_the_whole_batch(tmp_path, monkeypatch):
    """Both ranks run update_policy on their half of a fixed float64 rollout; one process runs it on the whole.

    The minibatches are made equal by construction: both ranks draw the same permutation p of their local
    indices (same seed), so global minibatch j is the union of the ranks' minibatches j; the one-process
    reference draws p the same way and maps it to those global indices (randperm patched below). A global
    minibatch of 2m samples then has the mean loss (L0 + L1) / 2 of the two ranks' m-sample losses, whose
    gradient is the average the ranks all-reduce. Advantage normalisation is off because it uses each
    minibatch's own mean and std: per rank (as CleanRL's and rl_games' multi-GPU PPO) it differs from the
    whole minibatch's.

    Tolerance: in float64 the two computations differ only in the order of the sums (about 1e-16 relative
    each); over 6 Adam steps that stays below 1e-12, while one optimiser step moves weights by about 1e-3 (the
    learning rate), and updating on one rank's half alone already moves them by more than 1e-5 (checked)."""
    torchrun("tests/distributed_worker.py", str(tmp_path), cwd=REPO_DIR)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    agent, storage, samples = worker.make_problem()
    initial = {key: value.clone() for key, value in agent.state_dict().items()}
    local_batch, local_envs = worker.NUM_STEPS * worker.NUM_ENVS // 2, worker.NUM_ENVS // 2
    local_minibatch = local_batch // worker.ARGS.num_minibatches
    randperm = torch.randperm

    def union_of_rank_minibatches(n, **kwargs):
        local = randperm(n // 2, **kwargs)  # what each rank drew over its own flattened [T, N/2] batch
        step, env = local // local_envs, local % local_envs
        on_rank0, on_rank1 = step * worker.NUM_ENVS + env, step * worker.NUM_ENVS + local_envs + env
        return torch.cat([torch.cat([on_rank0[j : j + local_minibatch], on_rank1[j : j + local_minibatch]])
                          for j in range(0, n // 2, local_minibatch)])

    monkeypatch.setattr(torch, "randperm", union_of_rank_minibatches)
    worker.update(agent, storage)
    monkeypatch.undo()
    reference = agent.state_dict()

    for key, value in reference.items():
        assert torch.equal(ranks[0]["agent"][key], ranks[1]["agent"][key]), f"{key} differs between the ranks"
        torch.testing.assert_close(ranks[0]["agent"][key], value, rtol=0, atol=1e-12, msg=key)
    assert (reference["actor_mean.0.weight"] - initial["actor_mean.0.weight"]).abs().max() > 1e-4  # it trained

    half_only, _, _ = worker.make_problem()
    worker.update(half_only, worker.split(storage, 0, 2))
    assert (half_only.state_dict()["actor_mean.0.weight"] - reference["actor_mean.0.weight"]).abs().max() > 1e-5

    # the normaliser merge alone (llc_pretrain.py's rollout): identical on both ranks, equal to all samples at once
    from llc import RunningMeanStd

    whole = RunningMeanStd((worker.OBS,))
    whole.update(samples)
    for key, value in whole.state_dict().items():
        assert torch.equal(ranks[0]["normalizer"][key], ranks[1]["normalizer"][key])
        torch.testing.assert_close(ranks[0]["normalizer"][key], value, rtol=1e-12, atol=1e-12)


def test_without_torchrun_no_process_group_is_created(monkeypatch):
    import distributed

    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.setup(torch.device("cpu")) and not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank(), distributed.seed(5)) == (0, 1, 0, 5)
    totals, means = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    assert distributed.reduce_iteration(totals, means, True) == (totals, means, True)  # the very tensors, unchanged


# ---------------------------------------------------------------- the trainer and llc_pretrain.py under torchrun
@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Two iterations of the trainer with 2 ranks (2 envs each)."""
    cwd = tmp_path_factory.mktemp("dist_run")
    result = torchrun("hrl_ppo_continuous.py", *TINY, "--total-timesteps", "160", cwd=cwd)
    return cwd, result


def test_two_ranks_train_and_only_rank_0_writes(two_rank_run):
    cwd, result = two_rank_run
    files = files_under(cwd)
    assert len(files) == 2, files  # one checkpoint, one TensorBoard file: rank 0's
    (run_name,) = {os.path.dirname(path) for path in files}
    assert any(name.startswith("events.out.tfevents") for name in map(os.path.basename, files))
    checkpoint = torch.load(cwd / run_name / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 2 and checkpoint["global_step"] == 160  # steps counted over both ranks
    assert result.stdout.count("iter 2/2") == 1  # rank 0 prints, the other rank is quiet
    assert checkpoint["agent"]["obs_normalizer.count"] == 1 + 2 * 2 * 4 * 2  # both ranks' samples, twice


def test_resume_two_ranks(two_rank_run, tmp_path):
    cwd, _ = two_rank_run
    (checkpoint_path,) = glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))
    resumed_dir = tmp_path / "runs" / os.path.basename(os.path.dirname(checkpoint_path))
    resumed_dir.mkdir(parents=True)
    (resumed_dir / "checkpoint.pt").write_bytes(open(checkpoint_path, "rb").read())
    result = torchrun("hrl_ppo_continuous.py", "--resume", str(resumed_dir / "checkpoint.pt"), "--total-timesteps", "240",
                      cwd=tmp_path)
    assert "resumed" in result.stdout and "iter 3/3 step 240" in result.stdout
    checkpoint = torch.load(resumed_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 3 and checkpoint["global_step"] == 240
    assert checkpoint["agent"]["obs_normalizer.count"] == 1 + 3 * 2 * 2 * 4  # every rank restored the statistics

    one_process = subprocess.run([sys.executable, os.path.join(REPO_DIR, "hrl_ppo_continuous.py"), "--resume",
                                  str(resumed_dir / "checkpoint.pt"), "--total-timesteps", "400"], cwd=tmp_path,
                                 env=environment(), capture_output=True, text=True, timeout=300)
    assert one_process.returncode != 0 and "resume with as many processes as wrote it" in one_process.stderr


def test_llc_pretrain_two_ranks(tmp_path):
    result = torchrun("llc_pretrain.py", *TINY_LLC, "--total-timesteps", "64", "--checkpoint-path", "llc.pt", cwd=tmp_path)
    assert "iter 2/2 step 64" in result.stdout  # 2 ranks x 2 envs x 8 steps = 32 control steps per iteration
    files = files_under(tmp_path)
    assert sorted(path for path in files if not path.startswith("runs/")) == ["llc.pt", "llc.train.pt"], files
    assert len([path for path in files if path.startswith("runs/")]) == 1, files  # rank 0's TensorBoard file
    state = torch.load(tmp_path / "llc.train.pt", weights_only=True)
    assert state["global_step"] == 64 and state["model"]["obs_normalizer.count"] == 1 + 64


# ---------------------------------------------------------------- stopping: SIGTERM on one rank, a rank that dies
TRAINER_FIRST_CHECKPOINT = ("runs", "*", "checkpoint.pt")


def start_long_run(cwd, *extra, script="hrl_ppo_continuous.py", flags=TINY):
    args = [*TORCHRUN, os.path.join(REPO_DIR, script), *flags, "--total-timesteps", "100000000", *extra]
    return subprocess.Popen(args, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pid(launcher_pid, rank, timeout=120):
    """The pid of the worker with RANK=rank among the launcher's children."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for status in glob.glob("/proc/[0-9]*/status"):
            try:
                ppid = int(next(line.split()[1] for line in open(status) if line.startswith("PPid:")))
                if ppid == launcher_pid:
                    environ = open(os.path.join(os.path.dirname(status), "environ"), "rb").read().split(b"\0")
                    if f"RANK={rank}".encode() in environ:
                        return int(os.path.basename(os.path.dirname(status)))
            except (OSError, StopIteration):
                continue
        time.sleep(0.5)
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


def wait_for_first_checkpoint(process, cwd, path=TRAINER_FIRST_CHECKPOINT, timeout=180):
    """Wait until rank 0 has written its first checkpoint (a checkpoint every iteration: iteration 1 is done)."""
    deadline = time.time() + timeout
    while not glob.glob(os.path.join(str(cwd), *path)):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)


def signal_rank_1(cwd, signum, path=TRAINER_FIRST_CHECKPOINT, **run):
    """A long 2-rank run (of the trainer, or start_long_run's **run); after its first checkpoint (path), signum
    to rank 1. Returns (exit code, stdout, stderr, seconds from the signal to the end of the run, the checkpoint)."""
    process = start_long_run(cwd, **run)
    try:
        worker_pid = rank_pid(process.pid, 1)
        wait_for_first_checkpoint(process, cwd, path)
        os.kill(worker_pid, signum)
        start = time.time()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    (checkpoint_path,) = glob.glob(os.path.join(str(cwd), *path))
    return process.returncode, stdout, stderr, time.time() - start, torch.load(checkpoint_path, weights_only=True)


def test_sigterm_on_one_rank_stops_every_rank_after_a_checkpoint(tmp_path):
    returncode, stdout, stderr, _, checkpoint = signal_rank_1(tmp_path, signal.SIGTERM)
    # the ranks exit 128 + SIGTERM (stopped, not finished) after the checkpoint; torchrun reports a failed run
    assert returncode != 0 and f"exitcode  : {128 + signal.SIGTERM}" in stderr, stderr[-3000:]
    assert "stopped: checkpoint" in stdout
    assert checkpoint["iteration"] >= 1 and checkpoint["global_step"] == 80 * checkpoint["iteration"]


def test_sigterm_on_one_rank_stops_llc_pretrain_after_a_checkpoint(tmp_path):
    returncode, stdout, stderr, _, state = signal_rank_1(
        tmp_path, signal.SIGTERM, ("llc.train.pt",), script="llc_pretrain.py",
        flags=[*TINY_LLC, "--save-interval", "1", "--checkpoint-path", "llc.pt"])
    assert returncode != 0 and f"exitcode  : {128 + signal.SIGTERM}" in stderr, stderr[-3000:]
    assert "stopped: llc.pt (resume with --resume llc.train.pt)" in stdout
    assert state["global_step"] >= 32 and state["global_step"] % 32 == 0  # whole iterations of both ranks


def test_a_dead_rank_makes_the_other_exit_with_a_message(tmp_path):
    returncode, _, stderr, waited, checkpoint = signal_rank_1(tmp_path, signal.SIGKILL)
    assert returncode != 0 and waited < 60, waited
    assert "rank 0 of 2: a collective operation failed" in stderr, stderr[-3000:]
    assert checkpoint["iteration"] >= 1  # the last checkpoint is intact


def test_a_stalled_rank_makes_the_other_exit_after_the_timeout(tmp_path):
    """A rank that stops answering (SIGSTOP: what a hung machine looks like to the others) makes rank 0 exit
    once its collective has waited --dist-timeout seconds."""
    process = start_long_run(tmp_path, "--dist-timeout", "5")
    try:
        main_pid, worker_pid = rank_pid(process.pid, 0), rank_pid(process.pid, 1)
        wait_for_first_checkpoint(process, tmp_path)
        os.kill(worker_pid, signal.SIGSTOP)
        start = time.time()
        while os.path.exists(f"/proc/{main_pid}") and open(f"/proc/{main_pid}/stat").read().split()[2] != "Z":
            assert time.time() - start < 60, "rank 0 still waits"
            time.sleep(0.2)
        waited = time.time() - start
        os.kill(worker_pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert 4 < waited < 30, waited
    assert "rank 0 of 2: a collective operation failed" in stderr and "(5 s, --dist-timeout)" in stderr, stderr[-3000:]
