"""The benchmarks run and print their tables (tiny sizes; no timing is asserted, only that every
measured rate is a positive number beside its reference)."""
import os
import re
import subprocess
import sys

import pytest
import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(REPO_DIR, "bench", script), *args], cwd=REPO_DIR, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_row(stdout, first_columns):
    """The numbers of the table row that starts with `first_columns` (thousands separators removed)."""
    for line in stdout.splitlines():
        if line.split()[: len(first_columns)] == first_columns:
            return [float(value.replace(",", "")) for value in line.split()[len(first_columns):]]
    raise AssertionError(f"no row {first_columns} in:\n{stdout}")


def test_bench_sim_prints_each_backend_beside_raw_c_mujoco():
    stdout = run_bench("bench_sim.py", "--robots", "ant", "--num-envs", "2", "--steps", "3", "--warmup", "1", "--threads", "1")
    for backend in ("mjwarp", "mujoco"):
        physics, env_step, c_mujoco, ratio, env_ratio = table_row(stdout, ["ant", backend, "2"])
        assert min(physics, env_step, c_mujoco) > 0
        assert abs(ratio - physics / c_mujoco) < 0.01 + 0.01 * ratio
        assert abs(env_ratio - env_step * 3 / c_mujoco) < 0.01 + 0.01 * env_ratio  # the ant: 3 physics steps per control step


def test_bench_rollout_prints_the_trainer_loop_beside_the_physics():
    stdout = run_bench("bench_rollout.py", "--num-envs", "2", "--high-level-steps", "1", "--threads", "1")
    assert re.search(r"LLC checkpoints/llc_ant\.pt, k = 5", stdout)
    for backend in ("mjwarp", "mujoco"):
        physics, env_step, rollout, flat, c_mujoco, ratio, env_ratio = table_row(stdout, ["2", backend])
        assert min(physics, env_step, rollout, flat, c_mujoco) > 0
        assert abs(ratio - rollout / physics) < 0.01 + 0.01 * ratio
        assert abs(env_ratio - env_step / c_mujoco) < 0.01 + 0.01 * env_ratio


def test_bench_hrl_prints_the_loop_beside_its_physics_and_torchrl():
    stdout = run_bench("bench_hrl.py", "--num-envs", "8", "--num-steps", "2", "--threads", "1", "--profile")
    assert re.search(r"hardware: cpu .* cores, torch .* threads, MuJoCo \d", stdout)
    row = stdout.split("\n     8 ")[1].split()
    physics, physics_step, hier, trainer = (float(value.replace(",", "")) for value in row[:4])
    assert min(physics, physics_step, hier, trainer) > 0
    assert abs(float(row[5]) - hier / physics) < 0.01 + 0.01 * hier / physics
    assert abs(float(row[7]) - trainer / hier) < 0.01 + 0.01 * trainer / hier
    if "torchrl unavailable" in stdout:
        assert row[4] == row[8] == "n/a"
    else:
        torchrl = float(row[4].replace(",", ""))
        assert torchrl > 0 and abs(float(row[8]) - hier / torchrl) < 0.01 + 0.01 * hier / torchrl
    assert "profile ant N=8 (c)" in stdout and "PPO update (update_policy)" in stdout


def test_bench_hrl_random_humanoid_llc_without_torchrl():
    stdout = run_bench("bench_hrl.py", "--robot", "humanoid", "--llc-checkpoint", "random", "--num-envs", "8",
                       "--num-steps", "2", "--threads", "1", "--no-torchrl")
    assert "LLC random" in stdout and "(d) torchrl: skipped (--no-torchrl)" in stdout
    assert stdout.split("\n     8 ")[1].split()[4] == "n/a"


def test_torchrl_loop_is_the_trainers_hierarchical_step():
    """(d) runs the same closed loop as (b): same states and window rewards from the same start."""
    pytest.importorskip("torchrl")
    sys.path.insert(0, REPO_DIR)
    from bench.bench_hrl import LLC_STEPS, fixed_latents, make_torchrl_env
    from hrl_ppo_continuous import hierarchical_step
    from llc import load_llc
    from tasks import make_env

    llc = load_llc(os.path.join(REPO_DIR, "checkpoints", "llc_ant.pt"))
    ours, theirs = (make_env("ant", "heading", 4, seed=0, backend="mujoco", sim_threads=1) for _ in range(2))
    z = fixed_latents(ours, llc)
    obs = ours.reset()["obs"]
    torchrl_env = make_torchrl_env(theirs, llc)
    td = torchrl_env.reset()
    for _ in range(3):
        step = hierarchical_step(ours, llc, z, obs, LLC_STEPS, ours.get_task_obs_size())
        obs = ours.reset_done()["obs"]
        out, td = torchrl_env.step_and_maybe_reset(td.set("latent", z[:, None].expand(-1, LLC_STEPS, -1)))
        assert torch.allclose(out["next", "reward"].mean(1).squeeze(-1), step.reward, atol=1e-6)
    assert torch.equal(ours.sim.qpos, theirs.sim.qpos)


def test_bench_scaling_prints_one_and_two_processes_with_their_ratio():
    stdout = run_bench("bench_scaling.py", "--script", "llc_pretrain", "--num-envs", "2", "--iterations", "2", "--no-cuda")
    one_process, two_processes = table_row(stdout, ["llc_pretrain", "1"]), table_row(stdout, ["llc_pretrain", "2"])
    assert one_process[0] == 2 and two_processes[0] == 4  # envs over all processes
    assert one_process[1] > 0 and one_process[2] == 1.0
    assert two_processes[1] > 0 and abs(two_processes[2] - two_processes[1] / one_process[1]) < 0.01 + 0.01 * two_processes[2]


def test_bench_memory_prints_one_peak_per_n_and_the_fit():
    stdout = run_bench("bench_memory.py", "--robots", "ant", "--num-envs", "4", "8", "--num-steps", "4",
                       "--sim-threads", "1")
    assert "peak = peak resident set of the process (host memory)" in stdout
    peaks = [table_row(stdout, [str(n)]) for n in (4, 8)]
    assert all(peak_mib > 0 and seconds > 0 for peak_mib, seconds in peaks)
    assert re.search(r"^fit: -?[\d,.]+ MiB per 1,000 worlds \+ -?[\d,.]+ MiB \(N = 4\.\.8", stdout, re.MULTILINE)
    assert "largest N within 40 GiB:" in stdout


def test_bench_memory_fit_arithmetic():
    sys.path.insert(0, REPO_DIR)
    from bench.bench_memory import fit_line, largest_fitting

    slope, intercept = fit_line([100, 200, 400], [150 + 0.5 * 100, 150 + 0.5 * 200, 150 + 0.5 * 400])
    assert slope == pytest.approx(0.5) and intercept == pytest.approx(150)
    assert largest_fitting(slope, intercept, 40 * 1024) == 81620  # (40960 - 150) / 0.5
    # least squares through (0, 0), (1, 1), (2, 3): slope sum((x - 1)(y - 4/3)) / sum((x - 1)^2) = 3 / 2, intercept 4/3 - 3/2
    slope, intercept = fit_line([0, 1, 2], [0, 1, 3])
    assert slope == pytest.approx(1.5) and intercept == pytest.approx(-1 / 6)
    assert largest_fitting(2.0, 100.0, 105.0) == 2 and largest_fitting(2.0, 200.0, 100.0) == 0
    assert largest_fitting(0.0, 100.0, 1000.0) is None
    with pytest.raises(ValueError, match="two or more different N"):
        fit_line([64, 64], [1.0, 2.0])


def test_gpu_check_dry_run_lists_its_steps_without_running_them(tmp_path):
    out_dir = tmp_path / "gpu_check_out"
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "bench", "gpu_check.sh"), "--dry-run", str(out_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    steps = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert list(steps) == ["hardware", "warmup", "tests", "bench_hrl_humanoid", "bench_memory", "bench_hrl_ant", "bench_sim",
                           "bench_hrl_graph"]
    assert "-m pytest tests -m cuda -q -ra" in steps["tests"]
    for name in ("bench_hrl_humanoid", "bench_hrl_ant", "bench_memory", "bench_sim"):
        assert "--num-envs 1024 4096 16384" in steps[name] and re.search(r"timeout +\d+ s", steps[name])
    assert "--cuda-graph" in steps["bench_hrl_graph"]
    assert not out_dir.exists()  # nothing ran


def test_gpu_wheels_refuses_a_package_requirements_txt_does_not_name(tmp_path):
    result = subprocess.run(["bash", os.path.join(REPO_DIR, "bench", "gpu_wheels.sh"), str(tmp_path), "3.11", "nosuch"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "nosuch is not a package of" in result.stderr and "mujoco-warp" in result.stderr
    assert not list(tmp_path.glob("*.whl"))


def markdown_row(stdout, name):
    """The numbers after the first cell of the markdown table row whose first cell is `name`."""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == name:
            return [float(cell) for cell in cells[1:]]
    raise AssertionError(f"no row {name!r} in:\n{stdout}")


def test_bench_update_prints_each_setting_beside_its_reference():
    stdout = run_bench("bench_update.py", "--num-envs", "4", "--num-steps", "4", "--neighbours", "0")
    assert "trainer flushes subnormals: True" in stdout
    reference, one = markdown_row(stdout, "reference (no dead units)")
    assert reference > 0 and one == 1.0
    for state in ("dead units, trainer's setting", "dead units, subnormals not flushed"):
        update, ratio = markdown_row(stdout, state)
        assert update > 0 and abs(ratio - update / reference) < 0.01 + 0.01 * ratio
    assert "flat humanoid on MuJoCo Warp (CPU), 4 envs x 4 steps" in stdout
    scripts_threads, _, scripts_update, one = markdown_row(stdout, "scripts' setting")
    assert scripts_update > 0 and one == 1.0
    for setting, threads in (("libgomp's default (spins)", scripts_threads), ("scripts' setting, 1 torch thread", 1)):
        row_threads, rollout, update, ratio = markdown_row(stdout, setting)
        assert row_threads == threads and min(rollout, update) > 0
        assert abs(ratio - update / scripts_update) < 0.01 + 0.01 * ratio
