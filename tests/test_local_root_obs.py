"""ASE's localRootObs, checked against an rl_games checkpoint: what its normalisers saw tells the setting apart
(the heading frame is the root's yaw, so a heading-local root x axis has a y component of exactly 0), ASE's env
yaml gives it directly, and the trainer refuses an env that differs from the LLC's training."""

import pathlib

import pytest
import torch

from conftest import random_actions
from llc import (LLCCheckpointError, infer_local_root_obs, load_llc, read_ase_env_local_root_obs,
                 root_x_axis_y_index)
from test_hrl_e2e import TINY, run
from test_llc import ase_llc_checkpoint, obs_stats, set_local_root_obs_stats

HUMANOID_LLC = dict(obs_dim=223, latent_dim=8, action_dim=28, amp_obs_dim=1250, units=(32, 32, 16),
                    style_units=(16, 8), style_dim=6, disc_units=(24, 12))
STEPS = 70  # random-action control steps of statistics, as a (very short) training run would gather


def test_root_x_axis_y_index_follows_ase_layout():
    # ASE's policy obs: root height (1), then the B - 1 non-root body positions (3 each), then the B
    # tan-norms (6 each, the root's first): the root x axis is right after the positions, y its 2nd entry.
    assert root_x_axis_y_index(223) == 1 + 14 * 3 + 1  # amp_humanoid: 15 bodies
    assert root_x_axis_y_index(253) == 1 + 16 * 3 + 1  # sword and shield: 17 bodies
    assert root_x_axis_y_index(60) is None  # the ant's 60 is no 15 B - 2


def real_statistics(env, steps=STEPS):
    """Mean and variance (float64) of the policy obs and of the AMP history over random-action steps."""
    generator = torch.Generator().manual_seed(0)
    env.reset()
    policy, amp = [], []
    for _ in range(steps):
        obs, _, _, extras = env.step(random_actions(env, generator))
        policy.append(obs["obs"][:, :223])
        amp.append(extras["amp_obs"])
        env.reset_done()
    return [(x.double().mean(0), x.double().var(0)) for x in (torch.cat(policy), torch.cat(amp))]


def checkpoint_with(policy_stats, amp_stats, count):
    checkpoint = ase_llc_checkpoint(**HUMANOID_LLC)
    for stats, (mean, var) in ((obs_stats(checkpoint), policy_stats), (checkpoint["amp_input_mean_std"], amp_stats)):
        stats["running_mean"].copy_(mean)
        stats["running_var"].copy_(var)
        stats["count"].fill_(count)
    return checkpoint


@pytest.mark.parametrize("local_root_obs", [True, False])
def test_normalisers_of_a_real_run_tell_the_setting(make_test_env, tmp_path, local_root_obs):
    env = make_test_env("humanoid", "none", num_envs=16, local_root_obs=local_root_obs)
    policy_stats, amp_stats = real_statistics(env)
    samples = env.num_envs * STEPS
    path = tmp_path / "llc.pth"
    torch.save(checkpoint_with(policy_stats, amp_stats, samples), path)
    inferred, why = infer_local_root_obs(load_llc(path))
    assert inferred is local_root_obs
    assert "observation normaliser" in why and "AMP normaliser" in why

    # one normaliser alone decides too (an LLC trained without normalize_amp_input, or with a flat AMP entry)
    policy_only = checkpoint_with(policy_stats, amp_stats, samples)
    policy_only["amp_input_mean_std"]["running_var"][2::125] = 1e-4  # between the two margins: no verdict
    torch.save(policy_only, path)
    inferred, why = infer_local_root_obs(load_llc(path))
    assert inferred is local_root_obs and "AMP" not in why


def test_untrained_normalisers_do_not_tell(tmp_path):
    # rl_games starts each normaliser from a prior of one sample (mean 0, var 1): nothing to read
    mean, var = torch.zeros(223, dtype=torch.float64), torch.ones(223, dtype=torch.float64)
    amp = (torch.zeros(1250, dtype=torch.float64), torch.ones(1250, dtype=torch.float64))
    torch.save(checkpoint_with((mean, var), amp, 1.0), tmp_path / "llc.pth")
    assert infer_local_root_obs(load_llc(tmp_path / "llc.pth"))[0] is None


def test_normalisers_that_disagree_are_an_error(tmp_path):
    checkpoint = set_local_root_obs_stats(ase_llc_checkpoint(**HUMANOID_LLC), True)
    checkpoint["amp_input_mean_std"]["running_var"][2::125] = 0.38  # AMP frames say world frame
    torch.save(checkpoint, tmp_path / "llc.pth")
    with pytest.raises(LLCCheckpointError, match=r"llc\.pth.*disagree on localRootObs"):
        infer_local_root_obs(load_llc(tmp_path / "llc.pth"))


@pytest.mark.parametrize("value", [True, False])
def test_ase_env_yaml_gives_local_root_obs(tmp_path, value):
    config = tmp_path / "humanoid_ase.yaml"
    config.write_text(f"env:\n  numEnvs: 4096\n  localRootObs: {str(value)}\n  keyBodies: [a, b]\n")
    assert read_ase_env_local_root_obs(config) is value


@pytest.mark.parametrize("text, expected", [
    ("env:\n  numEnvs: 4096\n", r"no boolean env\.localRootObs; found env keys \['numEnvs'\]"),
    ("env:\n  localRootObs: yes please\n", r"no boolean env\.localRootObs; .*localRootObs 'yes please'"),
    ("params:\n  seed: 1\n", r"no env section; found top-level keys \['params'\]"),
    ("env: [unclosed\n", r"not valid YAML"),
])
def test_bad_ase_env_yaml_is_a_clear_error(tmp_path, text, expected):
    config = tmp_path / "env.yaml"
    config.write_text(text)
    with pytest.raises(LLCCheckpointError, match=rf"env\.yaml \(ASE env config\): {expected}"):
        read_ase_env_local_root_obs(config)
    with pytest.raises(LLCCheckpointError, match=r"missing\.yaml \(ASE env config\): cannot read it"):
        read_ase_env_local_root_obs(tmp_path / "missing.yaml")


def test_trainer_refuses_an_env_that_differs_from_the_llc(tmp_path):
    llc_path = tmp_path / "ase_humanoid_llc.pth"
    torch.save(set_local_root_obs_stats(ase_llc_checkpoint(**HUMANOID_LLC), True), llc_path)
    base = [*TINY, "--robot", "humanoid", "--env-backend", "mujoco", "--llc-checkpoint", str(llc_path),
            "--total-timesteps", "40"]
    result = run(base, tmp_path, check=False)  # the env's default is localRootObs false
    assert result.returncode != 0
    assert "the LLC was trained with localRootObs True" in result.stderr
    assert "run with --local-root-obs" in result.stderr
    assert not pathlib.Path(tmp_path, "runs").exists() or not any(pathlib.Path(tmp_path, "runs").rglob("*.pt"))

    # ASE's env yaml, when given, is a source too: here it contradicts the environment the user asked for
    config = tmp_path / "humanoid_ase.yaml"
    config.write_text("env:\n  localRootObs: False\n")
    result = run([*base, "--local-root-obs", "--llc-env-config", str(config)], tmp_path, check=False)
    assert result.returncode != 0
    assert "localRootObs False, from " + str(config) in result.stderr and "run without --local-root-obs" in result.stderr
