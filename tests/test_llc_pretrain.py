"""Tests for llc_pretrain.py: latent resampling, the skill mapping, the reward, the evaluation's
direction bins, and the script end to end (tiny: 2 worlds, tiny networks, a few iterations)."""

import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import llc_pretrain as lp  # noqa: E402
from llc import load_llc  # noqa: E402


def test_sampled_latents_are_unit_norm():
    generator = torch.Generator().manual_seed(0)
    z = lp.sample_latents(1000, 16, generator, "cpu")
    assert z.shape == (1000, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(1000))
    # uniform on the sphere: every coordinate has mean 0 and second moment 1 / dim
    assert z.mean(0).abs().max() < 0.05
    assert (z.pow(2).mean(0) - 1 / 16).abs().max() < 0.02


def test_latents_held_for_sampled_durations():
    num_envs, latent_dim, num_steps = 6, 8, 1200
    generator = torch.Generator().manual_seed(3)
    z = lp.sample_latents(num_envs, latent_dim, generator, "cpu")
    steps_left = torch.randint(1, 150, (num_envs,), generator=generator)
    no_reset = torch.zeros(num_envs, dtype=torch.bool)
    latents, holds = [z], [steps_left]
    for _ in range(num_steps):
        z, steps_left = lp.advance_latents(z, steps_left, no_reset, generator, 1, 150)
        latents.append(z)
        holds.append(steps_left)
    latents, holds = torch.stack(latents), torch.stack(holds)  # [T + 1, N, D], [T + 1, N]

    torch.testing.assert_close(latents.norm(dim=-1), torch.ones(num_steps + 1, num_envs))
    for env in range(num_envs):
        changed = (latents[1:, env] != latents[:-1, env]).any(-1)
        change_steps = torch.nonzero(changed).squeeze(-1) + 1  # steps at which a new latent is in use
        starts = [0] + change_steps.tolist()
        # the latent in use at each start was drawn with hold time holds[start]: it stays exactly that long
        for start, next_start in zip(starts[:-1], starts[1:]):
            duration = int(holds[start, env])
            assert 1 <= duration < 150
            assert next_start - start == duration, (env, start, duration, next_start)
        assert len(starts) > 5  # many resamples over 1200 steps with holds < 150
        # in between, the countdown decreases by one per step
        for start in starts[:-1]:
            duration = int(holds[start, env])
            expected = torch.arange(duration, 0, -1)
            assert torch.equal(holds[start : start + duration, env], expected)
    all_durations = holds[latents.new_ones(num_steps + 1, num_envs, dtype=torch.bool)]
    assert int(all_durations.min()) >= 1 and int(all_durations.max()) <= 149


def test_reset_worlds_get_a_new_latent_at_once():
    generator = torch.Generator().manual_seed(1)
    z = lp.sample_latents(4, 8, generator, "cpu")
    steps_left = torch.full((4,), 100)
    reset = torch.tensor([False, True, False, True])
    new_z, new_steps_left = lp.advance_latents(z, steps_left, reset, generator, 1, 150)
    assert torch.equal(new_z[~reset], z[~reset])
    assert torch.equal(new_steps_left[~reset], torch.full((2,), 99))
    assert (new_z[reset] != z[reset]).any(-1).all()
    assert ((new_steps_left[reset] >= 1) & (new_steps_left[reset] < 150)).all()


@pytest.mark.parametrize("latent_dim", [16, 64])
def test_command_mapping_covers_speeds_and_directions_uniformly(latent_dim):
    projection = lp.make_skill_projection(latent_dim, seed=0)
    torch.testing.assert_close(projection @ projection.T, torch.eye(3), atol=1e-5, rtol=0)
    z = lp.sample_latents(40000, latent_dim, torch.Generator().manual_seed(0), "cpu")
    vel_cmd, yaw_rate_cmd = lp.latent_to_command(z, projection, max_speed=1.0, max_yaw_rate=1.0)
    speed = vel_cmd.norm(dim=-1)
    assert float(speed.max()) <= 1.0 + 1e-6
    # speed exactly uniform on [0, max_speed]: its quantiles are the identity
    quantiles = torch.quantile(speed, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
    torch.testing.assert_close(quantiles, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]), atol=0.02, rtol=0)
    # directions uniform: each 45-degree bin holds about 1/8 of the commands
    _, counts = lp.reach_per_direction_bin(vel_cmd)
    assert (counts.float() / len(z) - 1 / 8).abs().max() < 0.01
    # yaw rates spread over [-max, max], close to uniform
    assert float(yaw_rate_cmd.abs().max()) <= 1.0
    yaw_quantiles = torch.quantile(yaw_rate_cmd, torch.tensor([0.1, 0.5, 0.9]))
    torch.testing.assert_close(yaw_quantiles, torch.tensor([-0.8, 0.0, 0.8]), atol=0.05, rtol=0)


def test_make_skill_projection_rejects_small_latent_dim():
    with pytest.raises(ValueError, match="latent_dim=2"):
        lp.make_skill_projection(2, seed=0)


def test_heading_frame_helpers_against_hand_computed_rotations():
    from tasks.base import heading_angle, planar_into_heading, up_axis_z

    yaw = torch.tensor([0.0, math.pi / 2, -2.0])
    about_z = torch.stack([torch.cos(yaw / 2), torch.zeros(3), torch.zeros(3), torch.sin(yaw / 2)], -1)
    torch.testing.assert_close(heading_angle(about_z), yaw)
    # a world vector along the body's own x axis is (1, 0) in its heading frame
    along_x = torch.stack([torch.cos(yaw), torch.sin(yaw)], -1)
    torch.testing.assert_close(planar_into_heading(along_x, yaw), torch.tensor([[1.0, 0.0]] * 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(planar_into_heading(torch.tensor([[0.0, 1.0]]), torch.tensor([math.pi / 2])),
                               torch.tensor([[1.0, 0.0]]), atol=1e-6, rtol=0)
    upside_down = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # 180 degrees about x
    tilted = torch.tensor([[math.cos(math.pi / 8), math.sin(math.pi / 8), 0.0, 0.0]])  # 45 degrees about x
    assert up_axis_z(about_z).tolist() == [1.0, 1.0, 1.0] and up_axis_z(upside_down).item() == -1.0
    assert up_axis_z(tilted).item() == pytest.approx(math.cos(math.pi / 4))


def test_skill_reward_is_highest_when_tracking_the_command():
    args = lp.Args()
    yaw = torch.tensor([0.3, 0.3])
    quat = torch.stack([torch.cos(yaw / 2), torch.zeros(2), torch.zeros(2), torch.sin(yaw / 2)], -1)
    dt = 0.03
    vel_cmd_heading = torch.tensor([[0.5, 0.2], [0.5, 0.2]])
    yaw_rate_cmd = torch.tensor([0.0, 0.0])
    vel_world = torch.stack([torch.cos(yaw) * 0.5 - torch.sin(yaw) * 0.2, torch.sin(yaw) * 0.5 + torch.cos(yaw) * 0.2], -1)
    vel_world[1] = -vel_world[1]  # the second world moves opposite to its command
    prev_root = {"pos": torch.zeros(2, 3), "yaw": yaw}
    root = {"pos": torch.cat([vel_world * dt, torch.zeros(2, 1)], -1), "quat": quat}
    action = torch.zeros(2, 8)
    reward, terms = lp.skill_reward(root, prev_root, dt, vel_cmd_heading, yaw_rate_cmd, action, action, args)
    torch.testing.assert_close(terms["vel_tracking"][0], torch.tensor(1.0))
    torch.testing.assert_close(terms["yaw_tracking"], torch.ones(2))
    expected_best = args.vel_reward_weight + args.yaw_reward_weight + args.upright_reward_weight
    torch.testing.assert_close(reward[0], torch.tensor(expected_best))
    assert reward[1] < reward[0] - 0.5


def test_reach_per_direction_bin():
    angles = torch.deg2rad(torch.tensor([0.0, 44.0, 46.0, 90.0, 180.0, -90.0, -30.0, 10.0]))
    distance = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    displacement = torch.stack([torch.cos(angles), torch.sin(angles)], -1) * distance[:, None]
    reach, counts = lp.reach_per_direction_bin(displacement)
    # bins centred on 0, 45, ..., 315 degrees
    torch.testing.assert_close(reach, torch.tensor([8.0, 3.0, 4.0, 0.0, 5.0, 0.0, 6.0, 7.0]))
    assert counts.tolist() == [2, 2, 1, 0, 1, 0, 1, 1]


def run_script(*flags, cwd):
    command = [sys.executable, os.path.join(ROOT, "llc_pretrain.py"), *flags]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_train_then_evaluate_end_to_end(tmp_path):
    checkpoint = tmp_path / "llc_tiny.pt"
    out = run_script("--robot", "ant", "--seed", "7", "--num-envs", "2", "--num-steps", "8",
                     "--total-timesteps", "48", "--num-minibatches", "2", "--update-epochs", "2",
                     "--llc-hidden", "16", "16", "--llc-style-hidden", "8", "--llc-style-dim", "4",
                     "--critic-hidden", "16", "--save-interval", "2",
                     "--checkpoint-path", str(checkpoint), cwd=tmp_path)
    assert "iter 3/3" in out and "ETA" in out
    assert list((tmp_path / "runs").iterdir()), "no TensorBoard run folder"

    llc = load_llc(str(checkpoint))
    assert (llc.obs_dim, llc.latent_dim, llc.action_dim) == (29, 16, 8)
    meta = llc.metadata
    assert "llc_pretrain.py" in meta["command"] and "--seed 7" in meta["command"]
    assert meta["seed"] == 7 and meta["robot"] == "ant" and meta["total_timesteps"] == 48
    assert meta["control_dt"] == pytest.approx(0.03)
    assert len(meta["skill_mapping"]["projection"]) == 3 and len(meta["skill_mapping"]["projection"][0]) == 16
    assert len(meta["pd_kp"]) == 8
    z = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    actions = llc.act(torch.zeros(3, 29), z)
    assert actions.shape == (3, 8) and actions.abs().max() <= 1.0

    # continue from the training state written next to the checkpoint
    continued = tmp_path / "llc_continued.pt"
    run_script("--num-envs", "2", "--num-steps", "8", "--total-timesteps", "16", "--num-minibatches", "2",
               "--update-epochs", "1", "--llc-hidden", "16", "16", "--llc-style-hidden", "8", "--llc-style-dim", "4",
               "--critic-hidden", "16", "--init-from", str(tmp_path / "llc_tiny.train.pt"),
               "--checkpoint-path", str(continued), cwd=tmp_path)
    assert load_llc(str(continued)).metadata["total_timesteps"] == 64

    out = run_script("--evaluate", str(checkpoint), "--eval-num-latents", "4", "--eval-seconds", "0.3", cwd=tmp_path)
    assert "falls:" in out and "bar (falls < 10%, >= 1.5 m in every bin): " in out
    table_rows = [line for line in out.splitlines() if line.strip().startswith("[") and "|" in line]
    assert len(table_rows) == 8
    assert "10 control steps" in out


def test_commanded_displacement_integrates_the_turning_command():
    vel = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 0.4]])
    yaw_rate = torch.tensor([0.0, 2 * math.pi / 4.0, 0.0])
    displacement = lp.commanded_displacement(vel, yaw_rate, seconds=4.0)
    # straight: v * T; one full turn: back to the start; sideways: along +y
    torch.testing.assert_close(displacement, torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.6]]), atol=1e-5, rtol=0)
    half_turn = lp.commanded_displacement(torch.tensor([[1.0, 0.0]]), torch.tensor([math.pi / 2]), seconds=1.0)
    torch.testing.assert_close(half_turn, torch.tensor([[2 / math.pi, 2 / math.pi]]), atol=1e-5, rtol=0)


def test_continuing_with_other_skill_settings_is_refused(tmp_path):
    state = tmp_path / "state.train.pt"
    torch.save({"skill_settings": {"latent_dim": 16, "skill_seed": 0, "max_speed": 1.0, "max_yaw_rate": 1.0}}, state)
    command = [sys.executable, os.path.join(ROOT, "llc_pretrain.py"), "--num-envs", "2", "--num-steps", "4",
               "--total-timesteps", "8", "--max-speed", "2.0", "--init-from", str(state),
               "--checkpoint-path", str(tmp_path / "llc.pt")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "'max_speed': 2.0" in result.stderr and "--max-speed" in result.stderr
    assert not (tmp_path / "llc.pt").exists()


def test_unreadable_init_from_fails_before_anything_is_written(tmp_path):
    state = tmp_path / "state.train.pt"
    state.write_bytes(b"not a torch file")
    command = [sys.executable, os.path.join(ROOT, "llc_pretrain.py"), "--num-envs", "2", "--total-timesteps", "8",
               "--init-from", str(state), "--checkpoint-path", str(tmp_path / "llc.pt")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"error: --init-from {state}: not a" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "llc.pt").exists()


def test_next_state_values_bootstrap_timeouts_and_cut_falls():
    # 3 steps, 2 worlds: world 1 times out after step 0 (V(s') = 9), world 0 falls after step 2
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    dones = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    timeout_values = torch.tensor([[0.0, 9.0], [0.0, 0.0], [0.0, 0.0]])
    storage = lp.SkillRolloutStorage(*(None,) * 5, rewards=torch.zeros(3, 2), dones=dones, values=values,
                                     timeout_values=timeout_values)
    next_values = lp.next_state_values(storage, last_value=torch.tensor([7.0, 8.0]))
    assert next_values.tolist() == [[3.0, 9.0], [5.0, 6.0], [0.0, 8.0]]


@pytest.mark.parametrize("flags, message", [
    ({"gamma": 2.0}, "--gamma 2.0: expected a number in \\[0, 1\\]"),
    ({"max_grad_norm": -1.0}, "--max-grad-norm -1.0: expected a finite number > 0"),
    ({"learning_rate": float("nan")}, "--learning-rate nan: expected a finite number > 0"),
    ({"latent_dim": 2}, "--latent-dim 2: expected an integer >= 3"),
    ({"llc_hidden": (256, 0)}, "--llc-hidden 256 0: expected one or more integers >= 1"),
    ({"max_speed": 0.0}, "--max-speed 0.0: expected a finite number > 0"),
    ({"action_penalty": -0.1}, "--action-penalty -0.1: expected a finite number >= 0"),
])
def test_out_of_range_flags_are_refused_with_the_value_and_what_is_allowed(flags, message):
    with pytest.raises(SystemExit, match=message):
        lp.check_ranges(lp.Args(**flags), lp.PRETRAIN_FLAG_RANGES)
    lp.check_ranges(lp.Args(), lp.PRETRAIN_FLAG_RANGES)  # the defaults pass


TINY_PRETRAIN = ["--robot", "ant", "--seed", "5", "--num-envs", "2", "--num-steps", "8", "--num-minibatches", "2",
                 "--update-epochs", "1", "--llc-hidden", "16", "--llc-style-hidden", "8", "--llc-style-dim", "4",
                 "--critic-hidden", "16", "--save-interval", "1"]


def logged_steps(run_dir, tag="charts/SPS"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_resume_continues_the_same_run_and_its_schedule(tmp_path):
    checkpoint = tmp_path / "llc.pt"
    run_script(*TINY_PRETRAIN, "--total-timesteps", "32", "--checkpoint-path", str(checkpoint), cwd=tmp_path)
    state_path = tmp_path / "llc.train.pt"
    state = torch.load(str(state_path), weights_only=True)
    assert state["iteration"] == 2 and state["global_step"] == 32
    (tmp_path / "llc.train.pt.tmp").write_bytes(b"partial")  # as a run killed while writing leaves it
    out = run_script("--resume", str(state_path), "--total-timesteps", "64", cwd=tmp_path)
    assert "resumed" in out and "iter 4/4" in out and "iter 1/" not in out and "removed" in out
    assert not (tmp_path / "llc.train.pt.tmp").exists()
    assert load_llc(str(checkpoint)).metadata["total_timesteps"] == 64
    (run_dir,) = (tmp_path / "runs").iterdir()  # the same run folder
    assert logged_steps(run_dir) == [16, 32, 48, 64]


def test_resume_refuses_what_is_not_a_training_state(tmp_path):
    torch.save({"model": {}}, str(tmp_path / "other.pt"))
    for path, message in ((tmp_path, "is a directory"), (tmp_path / "other.pt", "is not a training state")):
        command = [sys.executable, os.path.join(ROOT, "llc_pretrain.py"), "--resume", str(path)]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("latent_dim, seed", [(4, 0), (16, 1), (16, 2), (64, 0), (64, 3)])
def test_zero_command_latent_commands_no_motion(latent_dim, seed):
    projection = lp.make_skill_projection(latent_dim, seed=seed)
    z = lp.zero_command_latent(projection)
    assert z.shape == (latent_dim,)
    assert float(z.norm()) == pytest.approx(1.0, abs=1e-6)
    vel_cmd, yaw_rate_cmd = lp.latent_to_command(z[None], projection, max_speed=2.0, max_yaw_rate=1.0)
    assert float(vel_cmd.norm()) < 1e-5 and abs(float(yaw_rate_cmd)) < 1e-5
    # a random latent does command motion: the zero is the null space, not the mapping
    other = lp.sample_latents(1, latent_dim, torch.Generator().manual_seed(seed), "cpu")
    assert float(lp.latent_to_command(other, projection, 2.0, 1.0)[0].norm()) > 1e-3


def test_zero_command_latent_needs_a_null_space():
    with pytest.raises(ValueError, match="latent_dim=3"):
        lp.zero_command_latent(lp.make_skill_projection(3, seed=0))


def test_top_speed_is_the_fastest_one_second_average():
    dt = 0.25  # a 1 s window is 4 control steps
    t = torch.arange(13, dtype=torch.float32) * dt  # 3 s
    # world 0: 1 m/s along x for 1 s, then 3 m/s along y; world 1: oscillates +-0.5 m along x every step
    world0 = torch.stack([t.clamp(max=1.0), 3.0 * (t - 1.0).clamp(min=0.0)], -1)
    world1 = torch.stack([0.5 * (-1.0) ** torch.arange(13), torch.zeros(13)], -1)
    speed = lp.top_speed(torch.stack([world0, world1], 1), dt, window_s=1.0)
    # world 0: the last 1 s window moves 3 m; world 1: p(t) - p(t - 1 s) = 0 for an even number of steps
    torch.testing.assert_close(speed, torch.tensor([3.0, 0.0]))


def test_skill_bin_statistics_against_hand_counts():
    def at(deg, dist):
        rad = math.radians(deg)
        return [dist * math.cos(rad), dist * math.sin(rad)]

    # five latents: commanded toward 0, 0, 90, 180, 180 degrees; latent 1 and 4 fell
    going = torch.tensor([at(0, 1.0), at(10, 2.0), at(90, 1.0), at(180, 3.0), at(175, 1.0)])
    final = torch.tensor([at(5, 2.5), at(0, 0.4), at(135, 1.2), at(180, 2.0), at(180, 9.0)])
    fell = torch.tensor([False, True, False, False, True])
    speed = torch.tensor([0.6, 5.0, 0.3, 0.5, 7.0])
    stats = lp.skill_bin_statistics(final, fell, speed, going)
    assert stats["bin_latents"] == [2, 0, 1, 0, 2, 0, 0, 0]
    assert stats["bin_falls"] == [1, 0, 0, 0, 1, 0, 0, 0]
    assert stats["bin_fall_rate"] == [0.5, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
    # reach and top speed: the standing latents 0, 2, 3 where they went (bins 0, 3, 4); the fallen ones' 9 m
    # and 7 m/s count nowhere
    assert stats["bin_standing_latents"] == [1, 0, 0, 1, 1, 0, 0, 0]
    torch.testing.assert_close(torch.tensor(stats["bin_reach_m"]), torch.tensor([2.5, 0, 0, 1.2, 2.0, 0, 0, 0]))
    torch.testing.assert_close(torch.tensor(stats["bin_top_speed_mps"]), torch.tensor([0.6, 0, 0, 0.3, 0.5, 0, 0, 0]))
    assert stats["top_speed_mps"] == pytest.approx(0.6)


def test_skill_bar_per_robot():
    from tasks import ant, humanoid

    good = {"fall_rate": 0.05, "bin_reach_m": [2.1] * 8, "zero_command_fell": False}
    assert lp.skill_bar(good, humanoid)["passes_bar"] and lp.skill_bar(good, ant)["passes_bar"]
    # 1.8 m is enough for the ant's 1.5 m, not for the humanoid's 2.0 m
    short = dict(good, bin_reach_m=[2.1] * 7 + [1.8])
    assert not lp.skill_bar(short, humanoid)["passes_bar"] and lp.skill_bar(short, ant)["passes_bar"]
    assert not lp.skill_bar(dict(good, fall_rate=0.10), ant)["passes_bar"]  # under 10%, strictly
    # the zero command falling fails the humanoid's bar only; not checked counts as not met
    fell_still = dict(good, zero_command_fell=True)
    assert not lp.skill_bar(fell_still, humanoid)["passes_bar"] and lp.skill_bar(fell_still, ant)["passes_bar"]
    unchecked = {k: v for k, v in good.items() if k != "zero_command_fell"}
    assert not lp.skill_bar(unchecked, humanoid)["passes_bar"]
    bar = lp.skill_bar(good, humanoid)["bar"]
    assert lp.bar_description(bar) == "falls < 10%, >= 2.0 m in every bin, zero command stands"


def test_evaluate_tiny_humanoid_prints_its_bar(tmp_path):
    checkpoint = tmp_path / "llc_humanoid.pt"
    run_script("--robot", "humanoid", "--seed", "3", "--num-envs", "2", "--num-steps", "4", "--total-timesteps", "8",
               "--num-minibatches", "1", "--update-epochs", "1", "--llc-hidden", "16", "--llc-style-hidden", "8",
               "--llc-style-dim", "4", "--critic-hidden", "16", "--checkpoint-path", str(checkpoint), cwd=tmp_path)
    out = run_script("--evaluate", str(checkpoint), "--eval-num-latents", "4", "--eval-seconds", "0.5", cwd=tmp_path)
    assert "robot humanoid" in out and "15 control steps" in out
    assert "| falls | fall rate |" in out and "top speed (m/s)" in out and "top speed:" in out
    table_rows = [line for line in out.splitlines() if line.strip().startswith("[") and "|" in line]
    assert len(table_rows) == 8
    assert sum(int(row.split("|")[1]) for row in table_rows) == 4  # every latent in one bin
    assert "zero command (|v| " in out and "rad/s) held 0.50 s: " in out and "max root drift" in out
    assert "bar (falls < 10%, >= 2.0 m in every bin, zero command stands): FAIL" in out  # nobody walks 2 m in 0.5 s
