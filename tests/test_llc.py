"""Tests for llc.py: ASE / rl_games checkpoints, the native format, freezing, errors, the CLI.

The ASE checkpoints are synthetic: random tensors under the exact rl_games key layout, and every
action is compared against a re-computation from the raw tensors written here, not through llc.py.
"""

import contextlib
import errno
import math
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import llc as llc_module  # noqa: E402
from llc import (CheckpointWriteError, LLCCheckpointError, LowLevelController, RunningMeanStd, atomic_save,  # noqa: E402
                 build_llc, first_nonfinite, load_llc, native_digest, save_llc)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(obs_dim=12, latent_dim=8, action_dim=5, amp_obs_dim=10, units=(32, 32, 16), style_units=(16, 8),
             style_dim=6, disc_units=(24, 12))
FULL_SWORD = dict(obs_dim=253, latent_dim=64, action_dim=31, amp_obs_dim=1400, units=(1024, 1024, 512),
                  style_units=(512, 256), style_dim=64, disc_units=(1024, 1024, 512))
FULL_AMP_HUMANOID = dict(FULL_SWORD, obs_dim=223, action_dim=28, amp_obs_dim=1250)


# ---------------------------------------------------------------------------------------------
# Synthetic ASE checkpoints in the rl_games key layout (ase-facts section 4)
# ---------------------------------------------------------------------------------------------
def linear(gen, prefix, in_size, out_size, scale=1.0):
    weight = torch.randn(out_size, in_size, generator=gen) * (scale / math.sqrt(in_size))
    bias = torch.randn(out_size, generator=gen) * 0.1
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}


def mlp(gen, prefix, in_size, units):
    """rl_games/ASE Sequential(Linear, ReLU, Linear, ReLU, ...): Linear layers at indices 0, 2, 4."""
    params = {}
    for i, units_i in enumerate(units):
        params.update(linear(gen, f"{prefix}.{2 * i}", in_size, units_i))
        in_size = units_i
    return params


def normalizer(gen, size, count=123456.0):
    return OrderedDict(running_mean=torch.randn(size, generator=gen, dtype=torch.float64),
                       running_var=torch.rand(size, generator=gen, dtype=torch.float64) + 0.05,
                       count=torch.tensor(count, dtype=torch.float64))


def ase_llc_checkpoint(obs_dim, latent_dim, action_dim, amp_obs_dim, units, style_units, style_dim, disc_units,
                       layout="1.1", seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = OrderedDict()
    model["a2c_network.sigma"] = torch.full((action_dim,), -2.9)
    model.update(mlp(gen, "a2c_network.actor_mlp._style_mlp", latent_dim, style_units))
    model.update(linear(gen, "a2c_network.actor_mlp._style_dense", style_units[-1], style_dim))
    in_size = obs_dim + style_dim
    for i, units_i in enumerate(units):
        model.update(linear(gen, f"a2c_network.actor_mlp._dense_layers.{i}", in_size, units_i, scale=2.0))
        in_size = units_i
    model.update(mlp(gen, "a2c_network.critic_mlp._mlp", obs_dim + latent_dim, units))
    model.update(linear(gen, "a2c_network.value", units[-1], 1))
    model.update(linear(gen, "a2c_network.mu", units[-1], action_dim, scale=2.0))
    disc = mlp(gen, "a2c_network._disc_mlp", amp_obs_dim, disc_units)
    model.update(disc)
    model.update(linear(gen, "a2c_network._disc_logits", disc_units[-1], 1))
    model.update(linear(gen, "a2c_network._enc", disc_units[-1], latent_dim))
    # the encoder trunk is the discriminator trunk: state_dict lists the same tensors twice
    model.update({key.replace("_disc_mlp", "_enc_mlp"): value for key, value in disc.items()})
    checkpoint = {"epoch": 25000, "frame": 1638400000, "last_mean_rewards": -100500,
                  "optimizer": {"state": {}, "param_groups": [{"lr": 2e-5, "params": [0, 1]}]},
                  "env_state": None, "amp_input_mean_std": normalizer(gen, amp_obs_dim)}
    obs_norm, value_norm = normalizer(gen, obs_dim), normalizer(gen, 1)
    if layout == "1.1":
        checkpoint["running_mean_std"] = obs_norm
        checkpoint["reward_mean_std"] = value_norm
    else:  # rl_games >= 1.3: the normalisers are sub-modules of the model; the best reward is a numpy float
        checkpoint["last_mean_rewards"] = np.float32(251.3)
        model.update({f"running_mean_std.{k}": v for k, v in obs_norm.items()})
        model.update({f"value_mean_std.{k}": v for k, v in value_norm.items()})
    checkpoint["model"] = model
    return checkpoint


def obs_stats(checkpoint):
    if "running_mean_std" in checkpoint:
        return checkpoint["running_mean_std"]
    return {k: checkpoint["model"][f"running_mean_std.{k}"] for k in ("running_mean", "running_var", "count")}


# Independent re-computations from the raw tensors
def normalise(x, stats):
    mean, var = stats["running_mean"].float(), stats["running_var"].float()
    return torch.clamp((x - mean) / torch.sqrt(var + 1e-5), -5.0, 5.0)


def dense(x, model, prefix):
    return x @ model[f"{prefix}.weight"].T + model[f"{prefix}.bias"]


def reference_act(checkpoint, obs, z, n_style=2, n_dense=3):
    model = checkpoint["model"]
    x = normalise(obs, obs_stats(checkpoint))
    s = z / torch.sqrt((z * z).sum(dim=-1, keepdim=True))
    for i in range(n_style):
        s = torch.relu(dense(s, model, f"a2c_network.actor_mlp._style_mlp.{2 * i}"))
    style = torch.tanh(dense(s, model, "a2c_network.actor_mlp._style_dense"))
    h = torch.cat([x, style], dim=1)
    for i in range(n_dense):
        h = torch.relu(dense(h, model, f"a2c_network.actor_mlp._dense_layers.{i}"))
    return torch.clamp(dense(h, model, "a2c_network.mu"), -1.0, 1.0)


def reference_style_reward(checkpoint, amp_obs, n_layers=2):
    model = checkpoint["model"]
    h = normalise(amp_obs, checkpoint["amp_input_mean_std"])
    for i in range(n_layers):
        h = torch.relu(dense(h, model, f"a2c_network._disc_mlp.{2 * i}"))
    logit = dense(h, model, "a2c_network._disc_logits")[:, 0]
    prob = 1.0 / (1.0 + torch.exp(-logit))
    return -torch.log(torch.maximum(1.0 - prob, torch.tensor(1e-4))) * 2.0


def inputs(gen, n, obs_dim, latent_dim, scale=3.0):
    return torch.randn(n, obs_dim, generator=gen) * scale, torch.randn(n, latent_dim, generator=gen)


def save_ase(tmp_path, name, **kwargs):
    checkpoint = ase_llc_checkpoint(**{**SMALL, **kwargs})
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path, checkpoint


# ---------------------------------------------------------------------------------------------
# ASE / rl_games format
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["1.1", "1.3"])
def test_ase_llc_matches_reference(tmp_path, layout):
    path, checkpoint = save_ase(tmp_path, f"ase_llc_{layout}.pth", layout=layout)
    llc = load_llc(path)
    assert (llc.obs_dim, llc.latent_dim, llc.action_dim) == (12, 8, 5)
    assert llc.source_format == "rl_games" and llc.has_discriminator
    assert llc.arch["style_dim"] == 6 and llc.arch["style_hidden"] == [16, 8] and llc.arch["hidden"] == [32, 32, 16]
    assert llc.metadata["rl_games_layout"] == ("rl_games 1.1" if layout == "1.1" else "rl_games >= 1.3")
    obs, z = inputs(torch.Generator().manual_seed(1), 64, 12, 8)
    actions = llc.act(obs, z)
    expected = reference_act(checkpoint, obs, z)
    assert actions.shape == (64, 5) and actions.dtype == torch.float32
    torch.testing.assert_close(actions, expected, atol=1e-6, rtol=0)
    # the inputs reach both the clamps and the interior, so all branches are compared
    assert (actions.abs() == 1.0).any() and (actions.abs() < 0.9).any()
    assert (normalise(obs, obs_stats(checkpoint)).abs() == 5.0).any()


def test_act_scales_z_onto_unit_sphere_and_survives_zero_z(tmp_path):
    path, _ = save_ase(tmp_path, "ase_llc.pth")
    llc = load_llc(path)
    obs, z = inputs(torch.Generator().manual_seed(2), 8, 12, 8)
    torch.testing.assert_close(llc.act(obs, z), llc.act(obs, 7.5 * z), atol=1e-5, rtol=0)  # float rounding only
    zero_z_actions = llc.act(obs, torch.zeros(8, 8))
    assert torch.isfinite(zero_z_actions).all()


def test_act_under_inference_mode(tmp_path):
    path, checkpoint = save_ase(tmp_path, "ase_llc.pth")
    obs, z = inputs(torch.Generator().manual_seed(3), 16, 12, 8)
    with torch.inference_mode():
        llc = load_llc(path)
        actions = llc.act(obs, z)
        reward = llc.style_reward(torch.randn(16, 10))
    torch.testing.assert_close(actions, reference_act(checkpoint, obs, z), atol=1e-6, rtol=0)
    assert reward.shape == (16,)


def test_style_reward_matches_hand_computation(tmp_path):
    path, checkpoint = save_ase(tmp_path, "ase_llc.pth")
    llc = load_llc(path)
    amp_obs = torch.randn(32, 10, generator=torch.Generator().manual_seed(4)) * 2
    torch.testing.assert_close(llc.style_reward(amp_obs), reference_style_reward(checkpoint, amp_obs),
                               atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(llc.style_reward(amp_obs, scale=1.0), reference_style_reward(checkpoint, amp_obs) / 2,
                               atol=1e-5, rtol=1e-6)

    # a discriminator certain the motion is real: 1 - D is floored at 1e-4
    checkpoint["model"]["a2c_network._disc_logits.bias"] = torch.tensor([40.0])
    torch.save(checkpoint, tmp_path / "confident.pth")
    confident = load_llc(tmp_path / "confident.pth").style_reward(amp_obs)
    torch.testing.assert_close(confident, torch.full((32,), -math.log(1e-4) * 2.0))


def test_checkpoint_without_discriminator(tmp_path):
    checkpoint = ase_llc_checkpoint(**SMALL)
    for key in [k for k in checkpoint["model"] if "_disc" in k or "_enc" in k]:
        del checkpoint["model"][key]
    del checkpoint["amp_input_mean_std"]
    torch.save(checkpoint, tmp_path / "no_disc.pth")
    llc = load_llc(tmp_path / "no_disc.pth")
    assert not llc.has_discriminator
    with pytest.raises(LLCCheckpointError, match="no discriminator"):
        llc.style_reward(torch.zeros(2, 10))


@pytest.mark.parametrize("sizes,layout", [(FULL_SWORD, "1.1"), (FULL_AMP_HUMANOID, "1.3")])
def test_ase_full_size_llc(tmp_path, sizes, layout):
    checkpoint = ase_llc_checkpoint(**sizes, layout=layout)
    path = tmp_path / "ase_full.pth"
    torch.save(checkpoint, path)
    llc = load_llc(path)
    assert (llc.obs_dim, llc.latent_dim, llc.action_dim) == (sizes["obs_dim"], 64, sizes["action_dim"])
    assert llc.discriminator_config["amp_obs_dim"] == sizes["amp_obs_dim"]
    obs, z = inputs(torch.Generator().manual_seed(5), 4, sizes["obs_dim"], 64)
    # 1024-wide float32 layers: the two summation orders differ by ~1e-5
    torch.testing.assert_close(llc.act(obs, z), reference_act(checkpoint, obs, z), atol=1e-4, rtol=0)
    assert llc.style_reward(torch.randn(4, sizes["amp_obs_dim"])).shape == (4,)
    llc.check_env(sizes["obs_dim"] + 5, 5)  # e.g. the heading task's 5 entries appended


def test_ase_config_latent_cross_check(tmp_path):
    path, _ = save_ase(tmp_path, "ase_llc.pth")
    good = tmp_path / "ase_humanoid_hrl.yaml"
    good.write_text("params:\n  network:\n    mlp:\n      units: [32, 32, 16]\n      activation: relu\n"
                    "  config:\n    name: Humanoid\n    latent_dim: 8\n")
    assert load_llc(path, ase_config=good).latent_dim == 8

    bad = tmp_path / "wrong_latent.yaml"
    bad.write_text("params:\n  config:\n    latent_dim: 16\n")
    with pytest.raises(LLCCheckpointError) as error:
        load_llc(path, ase_config=bad)
    for fact in ("ase_llc.pth", "wrong_latent.yaml", "16", "8"):
        assert fact in str(error.value)

    no_latent = tmp_path / "no_latent.yaml"
    no_latent.write_text("params:\n  config:\n    gamma: 0.99\n")
    with pytest.raises(LLCCheckpointError, match=r"no_latent\.yaml.*latent_dim.*gamma"):
        load_llc(path, ase_config=no_latent)


# ---------------------------------------------------------------------------------------------
# Frozen: the high-level optimiser never touches the LLC
# ---------------------------------------------------------------------------------------------
def test_llc_stays_frozen_through_high_level_update(tmp_path):
    path, _ = save_ase(tmp_path, "ase_llc.pth")
    llc = load_llc(path)
    assert not llc.training
    assert all(not p.requires_grad for p in llc.parameters())
    before = {k: v.clone() for k, v in llc.state_dict().items()}

    gen = torch.Generator().manual_seed(6)
    high_level = torch.nn.Linear(12, 8)
    hl_before = high_level.weight.detach().clone()
    optimizer = torch.optim.Adam(high_level.parameters(), lr=1e-2)
    obs = torch.randn(32, 12, generator=gen)
    target = torch.rand(32, 5, generator=gen) * 2 - 1
    for _ in range(3):
        actions = llc.act(obs, high_level(obs))
        loss = F.mse_loss(actions, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert not torch.equal(high_level.weight, hl_before), "the gradient must reach the high-level policy"
    for key, value in llc.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in llc.parameters())


# ---------------------------------------------------------------------------------------------
# Native format
# ---------------------------------------------------------------------------------------------
METADATA = {"robot": "ant", "control_dt": 0.05, "pd": {"kp": [40.0] * 8, "kd": [4.0] * 8, "action_scale": 0.5},
            "command": "python llc_pretrain.py --robot ant --seed 3", "seed": 3, "steps": 1000, "wall_time_s": 12.5,
            "hardware": "2-core CPU", "tags": ("a", "b"), "note": None}


def trained_llc(arch, **kwargs):
    torch.manual_seed(7)
    model = build_llc(12, 8, 5, arch=arch, hidden=(32, 16), style_hidden=(16, 8), style_dim=6, **kwargs)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        model.obs_normalizer.update(torch.randn(50, 12, generator=gen) * 2 + 1)
    if model.amp_normalizer is not None:
        model.amp_normalizer.update(torch.randn(50, 10, generator=gen))
    return model


@pytest.mark.parametrize("arch,disc", [("style_cat", True), ("mlp", False), ("mlp", True)])
def test_native_round_trip_is_bit_exact(tmp_path, arch, disc):
    model = trained_llc(arch, amp_obs_dim=10 if disc else None, disc_hidden=(16, 8))
    path = tmp_path / "llc.pt"
    save_llc(path, model, METADATA)
    assert os.listdir(tmp_path) == ["llc.pt"], "the temporary file must be renamed, not left behind"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "hrl-llc" and raw["version"] == 2 and raw["arch"]["name"] == arch
    assert raw["arch"]["hidden"] == [32, 16] and raw["arch"]["obs_dim"] == 12
    assert "z / |z|" in raw["arch"]["latent_input"]

    loaded = load_llc(path)
    assert loaded.source_format == "native" and loaded.has_discriminator == disc
    assert loaded.metadata == METADATA
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key, value in original_state.items():
        assert loaded_state[key].dtype == value.dtype and torch.equal(loaded_state[key], value), key
    assert loaded.obs_normalizer.running_mean.dtype == torch.float64

    obs, z = inputs(torch.Generator().manual_seed(9), 16, 12, 8)
    with torch.no_grad():
        assert torch.equal(loaded.act(obs, z), model.act(obs, z))
        if disc:
            amp_obs = torch.randn(16, 10)
            assert torch.equal(loaded.style_reward(amp_obs), model.style_reward(amp_obs))


def test_ase_checkpoint_converts_to_native(tmp_path):
    path, checkpoint = save_ase(tmp_path, "ase_llc.pth", layout="1.3")
    llc = load_llc(path)
    save_llc(tmp_path / "converted.pt", llc, {"source": str(path), **llc.metadata})
    converted = load_llc(tmp_path / "converted.pt")
    obs, z = inputs(torch.Generator().manual_seed(10), 16, 12, 8)
    assert torch.equal(converted.act(obs, z), llc.act(obs, z))
    amp_obs = torch.randn(16, 10)
    assert torch.equal(converted.style_reward(amp_obs), llc.style_reward(amp_obs))


def test_build_llc_is_trainable():
    model = build_llc(12, 8, 5, arch="style_cat", hidden=(32, 16), style_hidden=(16, 8), style_dim=6)
    assert isinstance(model, LowLevelController) and model.training
    norm_obs = model.normalize_obs(torch.randn(4, 12))
    z_unit = F.normalize(torch.randn(4, 8), dim=-1)
    model.mean_action(norm_obs, z_unit).pow(2).sum().backward()
    assert all(p.grad is not None for p in model.actor.parameters())
    with pytest.raises(ValueError, match="arch 'transformer'.*style_cat"):
        build_llc(12, 8, 5, arch="transformer")


def test_scalar_normalizer_normalizes_denormalizes_and_clamps_as_rl_games():
    values = RunningMeanStd(())  # the value normaliser: one scalar per sample
    values.update(torch.tensor([1.0, 3.0, 5.0]))
    # prior (mean 0, var 1, count 1) merged with batch mean 3, unbiased var 4, count 3
    assert float(values.count) == 4.0
    assert float(values.running_mean) == pytest.approx(9.0 / 4.0)
    expected_var = (1.0 + 4.0 * 3 + 9.0 * 1 * 3 / 4) / 4
    assert float(values.running_var) == pytest.approx(expected_var)
    std = (expected_var + 1e-5) ** 0.5
    x = torch.tensor([2.0, 100.0, -100.0])
    expected = torch.tensor([(2.0 - 2.25) / std, 5.0, -5.0])  # clamped to [-5, 5]
    torch.testing.assert_close(values.normalize(x), expected)
    # rl_games clamps before denormalising too
    torch.testing.assert_close(values.denormalize(torch.tensor([1.0, 9.0])),
                               torch.tensor([1.0 * std + 2.25, 5.0 * std + 2.25]))


def test_normalizer_update_merges_batches_like_one_batch():
    gen = torch.Generator().manual_seed(11)
    data = torch.randn(300, 12, generator=gen, dtype=torch.float64) * 3 + 2
    in_parts = build_llc(12, 8, 5, arch="mlp", hidden=(8,)).obs_normalizer
    for part in data.split([100, 150, 50]):
        in_parts.update(part.float())
    at_once = build_llc(12, 8, 5, arch="mlp", hidden=(8,)).obs_normalizer
    at_once.update(data.float())
    # rl_games starts from mean 0, var 1, count 1
    assert float(in_parts.count) == float(at_once.count) == 301.0
    torch.testing.assert_close(in_parts.running_mean, at_once.running_mean, atol=1e-12, rtol=0)
    # one batch merged into the prior (mean 0, var 1, count 1), with the unbiased batch variance rl_games uses
    floats, n = data.float().double(), 300
    batch_mean, batch_var = floats.mean(0), floats.var(0, unbiased=True)
    expected_mean = batch_mean * n / (n + 1)
    expected_var = (1.0 + batch_var * n + batch_mean**2 * n / (n + 1)) / (n + 1)
    torch.testing.assert_close(at_once.running_mean, expected_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(at_once.running_var, expected_var, atol=1e-12, rtol=0)
    # merging in parts differs only by the per-batch variance correction
    torch.testing.assert_close(in_parts.running_var, at_once.running_var, atol=0.05, rtol=0.02)


def test_save_rejects_non_plain_metadata(tmp_path):
    model = trained_llc("mlp")
    with pytest.raises(ValueError, match=r"metadata\['pd'\]\['kp'\].*Tensor"):
        save_llc(tmp_path / "llc.pt", model, {"pd": {"kp": torch.ones(3)}})
    assert not (tmp_path / "llc.pt").exists()


def test_saved_metadata_holds_no_absolute_path_of_this_machine(tmp_path):
    """A shipped checkpoint must not carry this machine's interpreter, repository or run paths: the
    training command is stored as a user reruns it from the repository root."""
    from llc import REPO_DIR, portable_command

    script = os.path.join(REPO_DIR, "llc_pretrain.py")
    run_file = str(tmp_path / "runs" / "llc.pt")
    command = portable_command([script, "--robot", "ant", "--checkpoint-path", run_file,
                                f"--init-from={REPO_DIR}/checkpoints/llc_ant.train.pt"])
    metadata = {"command": f"{sys.executable} {script} --checkpoint-path {run_file}", "continued_from": run_file,
                "nested": {"paths": [os.path.join(REPO_DIR, "checkpoints", "x.pt")]}, "formula": "v / |v|"}
    path = tmp_path / "llc.pt"
    save_llc(str(path), build_llc(5, 4, 3, hidden=(8,), style_hidden=(8,), style_dim=4), metadata)
    saved = load_llc(str(path)).metadata
    for text in (command, saved["command"]):
        assert text.startswith("python llc_pretrain.py ") and sys.executable not in text
    assert "--init-from=checkpoints/llc_ant.train.pt" in command
    stored = repr(saved)
    assert sys.executable not in stored and REPO_DIR not in stored
    tokens = [token.strip("'\"[],:") for token in stored.replace("=", " ").split()]
    assert not [token for token in tokens if token.startswith("/") and len(token) > 1]
    assert saved["continued_from"] == os.path.relpath(run_file, REPO_DIR)
    assert saved["nested"]["paths"] == [os.path.join("checkpoints", "x.pt")] and saved["formula"] == "v / |v|"


def test_shipped_checkpoints_hold_no_absolute_paths():
    """Every string in the shipped checkpoints' metadata is free of absolute paths."""
    shipped = sorted((REPO_ROOT / "checkpoints").glob("*.pt"))
    assert shipped
    for path in shipped:
        metadata = torch.load(path, weights_only=True).get("metadata", {})
        strings = [v for v in metadata.values() if isinstance(v, str)]
        assert not any(token.startswith("/") for text in strings for token in text.split()), (path, strings)


def test_native_newer_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    save_llc(path, trained_llc("mlp"), {})
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["version"] = 99
    torch.save(checkpoint, path)
    with pytest.raises(LLCCheckpointError, match=r"future\.pt.*version 99"):
        load_llc(path)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(LLCCheckpointError, match=r"nope\.pth: does not exist"):
        load_llc(tmp_path / "nope.pth")


def test_truncated_and_random_files(tmp_path):
    path, _ = save_ase(tmp_path, "ase_llc.pth")
    data = path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(LLCCheckpointError, match=r"truncated\.pth: not a readable torch checkpoint"):
        load_llc(tmp_path / "truncated.pth")
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    with pytest.raises(LLCCheckpointError, match=r"random\.pth: not a .*torch checkpoint"):
        load_llc(tmp_path / "random.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(LLCCheckpointError, match=r"empty\.pth"):
        load_llc(tmp_path / "empty.pth")


class Trap:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_arbitrary_pickled_objects_are_never_unpickled(tmp_path):
    checkpoint = ase_llc_checkpoint(**SMALL)
    marker = tmp_path / "unpickled"
    checkpoint["extra"] = Trap(str(marker))
    torch.save(checkpoint, tmp_path / "trap.pth")
    with pytest.raises(LLCCheckpointError, match=r"trap\.pth: holds pickled Python objects"):
        load_llc(tmp_path / "trap.pth")
    assert not marker.exists()


class RunsShell:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 0", "pickle protocol 2", "pickle protocol 4"])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, how):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    payload = {"format": "hrl-llc", "version": 2, "actor": RunsShell(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(how[-1])))
    with pytest.raises(LLCCheckpointError) as error:
        load_llc(path)
    message = str(error.value)
    assert message.startswith(f"{path}: holds pickled Python objects (") and "system" in message, message
    assert "corrupt" not in message and "nothing in it was run" in message
    assert not marker.exists()


def test_directory_fifo_and_unreadable_paths_say_what_they_are(tmp_path):
    (tmp_path / "llc_dir").mkdir()
    with pytest.raises(LLCCheckpointError, match=r"llc_dir: is a directory"):
        load_llc(tmp_path / "llc_dir")
    os.mkfifo(tmp_path / "pipe.pt")  # torch.load would wait on it forever
    with pytest.raises(LLCCheckpointError, match=r"pipe\.pt: is not a regular file"):
        load_llc(tmp_path / "pipe.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "gone.pt")
    with pytest.raises(LLCCheckpointError, match=r"link\.pt: does not exist"):
        load_llc(tmp_path / "link.pt")


def test_unknown_layouts_name_the_keys(tmp_path):
    high_level = {"model": {"a2c_network.sigma": torch.zeros(8), "a2c_network.actor_mlp.0.weight": torch.zeros(4, 3),
                            "a2c_network.mu.weight": torch.zeros(8, 4)}, "epoch": 3}
    torch.save(high_level, tmp_path / "hlc.pth")
    with pytest.raises(LLCCheckpointError) as error:
        load_llc(tmp_path / "hlc.pth")
    message = str(error.value)
    for fact in ("hlc.pth", "unknown checkpoint layout", "'epoch'", "a2c_network.actor_mlp.0.weight",
                 "rl_games 1.1", "rl_games >= 1.3", "native", "high-level policy"):
        assert fact in message, fact

    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(LLCCheckpointError, match=r"other\.pth: unknown checkpoint layout.*'weights'.*Layouts tried"):
        load_llc(tmp_path / "other.pth")

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(LLCCheckpointError, match=r"tensor\.pth: holds a Tensor"):
        load_llc(tmp_path / "tensor.pth")


def test_inconsistent_ase_checkpoints(tmp_path):
    checkpoint = ase_llc_checkpoint(**SMALL)
    checkpoint["running_mean_std"] = normalizer(torch.Generator().manual_seed(0), 15)
    torch.save(checkpoint, tmp_path / "bad_norm.pth")
    with pytest.raises(LLCCheckpointError, match=r"bad_norm\.pth: the observation normaliser has size 15 .* 12"):
        load_llc(tmp_path / "bad_norm.pth")

    checkpoint["running_mean_std"] = normalizer(torch.Generator().manual_seed(0), 12)
    mu = checkpoint["model"].pop("a2c_network.mu.weight")
    torch.save(checkpoint, tmp_path / "no_mu.pth")
    with pytest.raises(LLCCheckpointError, match=r"no_mu\.pth: looks like an ASE LLC .* lacks .*mu\.weight"):
        load_llc(tmp_path / "no_mu.pth")

    checkpoint["model"]["a2c_network.mu.weight"] = mu
    del checkpoint["running_mean_std"]
    torch.save(checkpoint, tmp_path / "no_norm.pth")
    with pytest.raises(LLCCheckpointError, match=r"no_norm\.pth: no observation normaliser"):
        load_llc(tmp_path / "no_norm.pth")


def resave(tmp_path, name, checkpoint, digest=True):
    """torch.save a (possibly edited) checkpoint; native ones get a fresh digest when `digest`."""
    if digest and "digest" in checkpoint:
        checkpoint["digest"] = native_digest(checkpoint)
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def native_checkpoint(tmp_path, arch="style_cat", **kwargs):
    path = tmp_path / "native.pt"
    save_llc(path, trained_llc(arch, **kwargs), METADATA)
    return torch.load(path, weights_only=True)


def test_native_digest_detects_changed_tensors_and_values(tmp_path):
    checkpoint = native_checkpoint(tmp_path)
    assert checkpoint["digest"] == native_digest(checkpoint) and checkpoint["digest"]["algorithm"] == "sha256"
    weight = checkpoint["actor"]["mu.weight"]
    weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))  # one bit of one weight
    with pytest.raises(LLCCheckpointError, match=r"one_bit\.pt: tensors do not match the stored digest: the file was "
                                                 r"modified or corrupted"):
        load_llc(resave(tmp_path, "one_bit.pt", checkpoint, digest=False))

    checkpoint = native_checkpoint(tmp_path)
    checkpoint["metadata"]["control_dt"] = 0.03
    with pytest.raises(LLCCheckpointError, match=r"meta\.pt: the architecture, metadata .* do not match the stored digest"):
        load_llc(resave(tmp_path, "meta.pt", checkpoint, digest=False))

    checkpoint = native_checkpoint(tmp_path)
    del checkpoint["digest"]
    with pytest.raises(LLCCheckpointError, match=r"no_digest\.pt: native LLC version 2 without a valid 'digest'"):
        load_llc(resave(tmp_path, "no_digest.pt", checkpoint))


def test_native_version_1_without_digest_still_loads(tmp_path):
    """Files written before the digest existed (version 1) load, with every other check."""
    model = trained_llc("style_cat")
    checkpoint = native_checkpoint(tmp_path)
    del checkpoint["digest"]
    checkpoint["version"] = 1
    loaded = load_llc(resave(tmp_path, "v1.pt", checkpoint))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    checkpoint["actor"]["mu.bias"][1] = float("nan")
    with pytest.raises(LLCCheckpointError, match=r"v1_nan\.pt: actor\['mu\.bias'\] holds non-finite values"):
        load_llc(resave(tmp_path, "v1_nan.pt", checkpoint))


def test_shipped_native_checkpoints_carry_a_valid_digest():
    for path in [REPO_ROOT / "checkpoints" / "llc_ant.pt", REPO_ROOT / "checkpoints" / "wip" / "llc_humanoid_part2.pt"]:
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["version"] == 2 and checkpoint["digest"] == native_digest(checkpoint), path
        load_llc(path)


@pytest.mark.parametrize("where,value,message", [
    ("actor/mu.bias", float("nan"), r"actor\['mu\.bias'\] holds non-finite values"),
    ("actor/style_mlp.0.weight", float("inf"), r"actor\['style_mlp\.0\.weight'\] holds non-finite values"),
    ("obs_normalizer/running_var", float("-inf"), r"obs_normalizer\['running_var'\] holds non-finite values"),
    ("obs_normalizer/running_mean", float("nan"), r"obs_normalizer\['running_mean'\] holds non-finite values"),
    ("obs_normalizer/running_var", -1.0, r"obs_normalizer\['running_var'\] has negative variances"),
    ("discriminator/weights/logits.bias", float("nan"), r"discriminator\['weights'\]\['logits\.bias'\] holds non-finite"),
    ("discriminator/amp_normalizer/running_mean", float("inf"),
     r"discriminator\['amp_normalizer'\]\['running_mean'\] holds non-finite"),
])
def test_native_nonfinite_weights_and_statistics_are_refused(tmp_path, where, value, message):
    """Even with a digest that matches (a blown-up model saved as it was), a non-finite LLC never loads."""
    checkpoint = native_checkpoint(tmp_path, amp_obs_dim=10, disc_hidden=(16, 8))
    *keys, leaf = where.split("/")
    part = checkpoint
    for key in keys:
        part = part[key]
    part[leaf].view(-1)[0] = value
    with pytest.raises(LLCCheckpointError, match=r"bad\.pt: " + message):
        load_llc(resave(tmp_path, "bad.pt", checkpoint))


@pytest.mark.parametrize("layout,key,message", [
    ("1.1", "model/a2c_network.mu.bias", r"model\['a2c_network\.mu\.bias'\] holds non-finite values"),
    ("1.1", "model/a2c_network.actor_mlp._style_dense.weight",
     r"model\['a2c_network\.actor_mlp\._style_dense\.weight'\] holds non-finite"),
    ("1.1", "running_mean_std/running_var", r"running_mean_std\['running_var'\] holds non-finite values"),
    ("1.3", "model/running_mean_std.running_mean", r"model\['running_mean_std\.running_mean'\] holds non-finite"),
    ("1.1", "amp_input_mean_std/running_var", r"amp_input_mean_std\['running_var'\] holds non-finite values"),
])
def test_ase_nonfinite_weights_and_statistics_are_refused(tmp_path, layout, key, message):
    checkpoint = ase_llc_checkpoint(**SMALL, layout=layout)
    part, leaf = key.split("/")
    checkpoint[part][leaf].view(-1)[-1] = float("nan")
    with pytest.raises(LLCCheckpointError, match=r"ase_nan\.pth: " + message):
        load_llc(resave(tmp_path, "ase_nan.pth", checkpoint))


def test_ase_nonfinite_entries_the_llc_does_not_use_are_ignored(tmp_path):
    checkpoint = ase_llc_checkpoint(**SMALL)
    checkpoint["model"]["a2c_network.value.bias"][0] = float("nan")  # the critic: not part of the LLC
    load_llc(resave(tmp_path, "critic_nan.pth", checkpoint))


def edit(checkpoint, where, action):
    """Apply one edit to the entry at `where` ('actor/mu.weight'): del, rename, or a new value."""
    *keys, leaf = where.split("/")
    part = checkpoint
    for key in keys:
        part = part[key]
    if action == "del":
        del part[leaf]
    elif action == "rename":
        part[leaf + "_renamed"] = part.pop(leaf)
    else:
        part[leaf] = action(part[leaf])


NATIVE_MALFORMED = [  # every edit keeps a valid digest: what is checked is the structure
    ("actor/mu.weight", lambda w: w[:, :-1], r"actor\['mu\.weight'\] has shape \(5, 15\), the architecture needs \(5, 16\)"),
    ("actor/mu.weight", lambda w: w.double(), r"actor\['mu\.weight'\] has dtype torch\.float64, expected torch\.float32"),
    ("actor/mu.weight", lambda w: w.long(), r"actor\['mu\.weight'\] has dtype torch\.int64"),
    ("actor/mu.weight", "rename", r"actor\['mu\.weight_renamed'\] is not a tensor of the architecture"),
    ("actor/mu.bias", "del", r"actor\['mu\.bias'\] is missing"),
    ("actor/mu.bias", lambda b: b.tolist(), r"actor\['mu\.bias'\] is \[-?0\.\d+, .*, expected a tensor of shape \(5,\)"),
    ("actor", lambda a: list(a.values()), r"actor is a list, expected a dict of tensors"),
    ("obs_normalizer", "del", r"obs_normalizer is None, expected a dict of tensors"),
    ("obs_normalizer/count", "del", r"obs_normalizer\['count'\] is missing"),
    ("arch/hidden", lambda h: "32,16", r"arch\['hidden'\] is '32,16', expected a list of positive integers"),
    ("arch/hidden", lambda h: [32, 0], r"arch\['hidden'\] is \[32, 0\], expected a list of positive integers"),
    ("arch/obs_dim", lambda d: 12.0, r"arch\['obs_dim'\] is 12\.0, expected a positive integer"),
    ("arch/obs_dim", "del", r"arch\['obs_dim'\] is None, expected a positive integer"),
    ("arch/obs_dim", lambda d: 2**40,  # checked on the meta device: nothing of that size is allocated
     r"obs_normalizer\['running_mean'\] has shape \(12,\), the architecture needs \(1099511627776,\)"),
    ("arch/activation", lambda a: "swish", r"arch\['activation'\] is 'swish', expected one of"),
    ("arch/name", lambda a: "transformer", r"architecture 'transformer' is not one of"),
    ("arch", lambda a: None, r"architecture None is not one of"),
    ("discriminator", lambda d: "yes", r"'discriminator' is 'yes', expected a dict or None"),
    ("discriminator/hidden", lambda h: None, r"discriminator\['hidden'\] is None, expected a list of positive integers"),
    ("discriminator/weights/trunk.0.weight", "del", r"discriminator\['weights'\]\['trunk\.0\.weight'\] is missing"),
    ("metadata", lambda m: [1, 2], r"'metadata' is \[1, 2\], expected a dict"),
    ("version", lambda v: "2", r"native LLC format version '2'"),
]


@pytest.mark.parametrize("where,action,message", NATIVE_MALFORMED)
def test_malformed_native_checkpoints_name_the_file_and_the_entry(tmp_path, where, action, message):
    checkpoint = native_checkpoint(tmp_path, amp_obs_dim=10, disc_hidden=(16, 8))
    edit(checkpoint, where, action)
    with pytest.raises(LLCCheckpointError, match=r"^\S*malformed\.pt: " + message):
        load_llc(resave(tmp_path, "malformed.pt", checkpoint))


ASE_MALFORMED = [
    ("model/a2c_network.mu.bias", lambda b: b[:-1], r"model\['a2c_network\.mu\.bias'\] has shape \(4,\), the architecture "
                                                    r"needs \(5,\)"),
    ("model/a2c_network.mu.bias", "rename", r"model\['a2c_network\.mu\.bias_renamed'\] is not a tensor of the architecture"),
    ("model/a2c_network.mu.bias", "del", r"model\['a2c_network\.mu\.bias'\] is missing"),
    ("model/a2c_network.mu.weight", lambda w: w[0], r"model\['a2c_network\.mu\.weight'\] has shape \(16,\), expected a "
                                                    r"2-D tensor"),
    ("model/a2c_network.mu.weight", lambda w: "weights", r"model\['a2c_network\.mu\.weight'\] is 'weights', expected a "
                                                         r"tensor"),
    ("model/a2c_network.actor_mlp._style_mlp.2.bias", lambda b: b.int(),
     r"model\['a2c_network\.actor_mlp\._style_mlp\.2\.bias'\] has dtype torch\.int32"),
    ("model/a2c_network.actor_mlp._dense_layers.1.weight", "rename",
     r"model\['a2c_network\.actor_mlp\._dense_layers\.2\.weight'\], .*"
     r"model\['a2c_network\.actor_mlp\._dense_layers\.1\.weight_renamed'\] are not tensors of the architecture"),
    ("model/a2c_network._disc_logits.bias", "del", r"model\['a2c_network\._disc_logits\.bias'\] is missing"),
    ("model/a2c_network._disc_logits.weight", "rename", r"'model' has a2c_network\._disc_mlp\.0\.weight but not "
                                                        r"a2c_network\._disc_logits\.weight: half a discriminator"),
    ("running_mean_std/count", "del", r"observation normaliser 'running_mean_std' lacks \['count'\]"),
    ("running_mean_std/running_mean", lambda m: m[0], r"running_mean_std\['running_mean'\] has shape \(\), expected a 1-D"),
    ("running_mean_std/count", lambda c: c.reshape(1, 1), r"running_mean_std\['count'\] has shape \(1, 1\), the "
                                                          r"architecture needs \(\)"),
    ("amp_input_mean_std/running_var", lambda v: None, r"amp_input_mean_std\['running_var'\] is None, expected a tensor"),
]


@pytest.mark.parametrize("where,action,message", ASE_MALFORMED)
def test_malformed_ase_checkpoints_name_the_file_and_the_entry(tmp_path, where, action, message):
    checkpoint = ase_llc_checkpoint(**SMALL)
    edit(checkpoint, where, action)
    with pytest.raises(LLCCheckpointError, match=r"^\S*malformed\.pth: (" + message + ")"):
        load_llc(resave(tmp_path, "malformed.pth", checkpoint))


def test_damaged_strides_and_storage_references_are_refused(tmp_path):
    """What a damaged pickle can do to an ASE file (which has no digest) without breaking its CRCs: a tensor
    with other strides over the same data, or a tensor pointed at another one's data record."""
    checkpoint = ase_llc_checkpoint(**SMALL)
    mu = checkpoint["model"]["a2c_network.mu.weight"]
    checkpoint["model"]["a2c_network.mu.weight"] = mu.t().contiguous().t()  # same shape and values, other strides
    with pytest.raises(LLCCheckpointError, match=r"strided\.pth: model\['a2c_network\.mu\.weight'\] has strides "
                                                 r"\(1, 5\), not those of a contiguous tensor"):
        load_llc(resave(tmp_path, "strided.pth", checkpoint))
    path, _ = save_ase(tmp_path, "ase_llc.pth")
    with zipfile.ZipFile(path, "a") as archive:  # a data record that no tensor uses any more
        archive.writestr(f"{archive.namelist()[0].split('/')[0]}/data/999", b"\0" * 64)
    with pytest.raises(LLCCheckpointError, match=r"ase_llc\.pth: not a readable torch checkpoint: the file is corrupt .*"
                                                 r"1 of its \d+ tensor data records are used by no tensor"):
        load_llc(path)

def test_ase_model_with_a_non_string_key_is_refused(tmp_path):
    checkpoint = ase_llc_checkpoint(**SMALL)
    checkpoint["model"][3] = torch.zeros(2)
    with pytest.raises(LLCCheckpointError, match=r"odd_key\.pth: 'model' has a key 3 of type int, expected str"):
        load_llc(resave(tmp_path, "odd_key.pth", checkpoint))


def test_zip_member_failing_its_crc_is_refused(tmp_path):
    """One flipped bit in a weight of an ASE file (no digest of its own) is caught by the zip's CRC-32."""
    path, _ = save_ase(tmp_path, "ase_llc.pth")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)  # the largest weight matrix
    name_size, extra_size = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    data[member.header_offset + 30 + name_size + extra_size + member.file_size // 2] ^= 0x10
    (tmp_path / "flipped.pth").write_bytes(bytes(data))
    with pytest.raises(LLCCheckpointError, match=r"flipped\.pth: not a readable torch checkpoint: the file is corrupt "
                                                 r".*fails its CRC-32 check"):
        load_llc(tmp_path / "flipped.pth")


def test_check_env_names_both_sizes(tmp_path):
    path, _ = save_ase(tmp_path, "ase_llc.pth")
    llc = load_llc(path)
    llc.check_env(17, 5)  # 12 proprioceptive + 5 task entries
    llc.check_env(12, 0)
    with pytest.raises(LLCCheckpointError) as error:
        llc.check_env(20, 5)
    for fact in ("ase_llc.pth", "12", "20", "5", "15"):
        assert fact in str(error.value)
    with pytest.raises(LLCCheckpointError, match=r"size 12.*gives 12.*last 3.*FULL.*task observation"):
        llc.check_env(12, 3)
    with pytest.raises(LLCCheckpointError, match=r"^my_llc\.pth"):
        llc.check_env(30, 2, path="my_llc.pth")


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
GOOD = {"step": 1, "weights": torch.arange(6.0).reshape(2, 3)}
NEW = {"step": 2, "weights": torch.ones(1000, 100)}


def previous_checkpoint(folder):
    """A good checkpoint at folder/checkpoint.pt and its bytes, to check that failed writes keep it."""
    path = folder / "checkpoint.pt"
    atomic_save(GOOD, path)
    return path, path.read_bytes()


def assert_kept(path, data):
    assert path.read_bytes() == data, "the previous checkpoint must be left as it was"
    assert torch.equal(torch.load(path, weights_only=True)["weights"], GOOD["weights"])
    assert not os.path.exists(f"{path}.tmp"), "no partial temporary file may be left behind"


def test_atomic_save_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path, _ = previous_checkpoint(tmp_path / "runs" / "a")  # creates missing directories
    (tmp_path / "runs" / "a" / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint from a killed run")
    atomic_save(NEW, str(path))
    assert torch.load(path, weights_only=True)["step"] == 2
    assert sorted(os.listdir(path.parent)) == ["checkpoint.pt"]


def test_first_nonfinite_names_the_first_bad_tensor():
    assert first_nonfinite({"a": torch.ones(3), "n": 3, "s": "x", "i": torch.arange(3), "none": None}) is None
    assert first_nonfinite(torch.tensor([1.0, float("nan")])) == "(the tensor itself)"
    nested = {"agent": {"actor.0.weight": torch.ones(2), "actor.0.bias": torch.tensor([0.0, float("inf")])},
              "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}}
    assert first_nonfinite(nested) == "agent.actor.0.bias"
    assert first_nonfinite({"losses": [torch.ones(1), torch.tensor(-float("inf"))]}) == "losses[1]"
    assert first_nonfinite({"optimizer": nested["optimizer"]}) == "optimizer.state.0.exp_avg"
    assert first_nonfinite(torch.tensor([1 + 1j, complex("nan")])) == "(the tensor itself)"


def test_atomic_save_refuses_nonfinite_tensors_and_keeps_the_previous_file(tmp_path):
    path, data = previous_checkpoint(tmp_path)
    blown_up = {"step": 3, "agent": {"mu.bias": torch.tensor([0.0, float("nan")])}}
    with pytest.raises(CheckpointWriteError, match=r"checkpoint\.pt: not written: tensor 'agent\.mu\.bias' holds NaN or inf"):
        atomic_save(blown_up, path)
    assert_kept(path, data)
    model = trained_llc("mlp")
    model.actor.mu.bias.data[0] = float("inf")
    with pytest.raises(CheckpointWriteError, match=r"llc\.pt: not written: tensor 'actor\.mu\.bias' holds NaN or inf"):
        save_llc(tmp_path / "llc.pt", model, {})
    assert not (tmp_path / "llc.pt").exists()


@contextlib.contextmanager
def unprivileged():
    """Run the block without root's right to write anywhere (as user nobody), when the tests run as root."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_atomic_save_into_a_read_only_directory_fails_cleanly():
    folder = pathlib.Path(tempfile.mkdtemp())  # not under tmp_path: user nobody must be able to reach it
    try:
        folder.chmod(0o755)
        path, data = previous_checkpoint(folder / "ro")
        path.parent.chmod(0o555)
        with unprivileged(), pytest.raises(CheckpointWriteError) as error:
            atomic_save(NEW, path)
        assert str(error.value).startswith(f"{path}: not written: permission denied")
        assert "whatever was at the path before is kept" in str(error.value)
        assert_kept(path, data)
    finally:
        (folder / "ro").chmod(0o755)
        shutil.rmtree(folder)


def test_atomic_save_under_a_regular_file_or_onto_a_directory_fails_cleanly(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    for path in (tmp_path / "runs" / "checkpoint.pt", tmp_path / "runs" / "run_1" / "checkpoint.pt"):
        blocked = rf"{path}: not written: {tmp_path / 'runs'} is a file, not a directory"
        with pytest.raises(CheckpointWriteError, match=blocked):
            atomic_save(NEW, path)
    assert sorted(os.listdir(tmp_path)) == ["runs"] and (tmp_path / "runs").read_text() == "not a directory"
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(CheckpointWriteError, match=r"a_dir: not written: is a directory"):
        atomic_save(NEW, tmp_path / "a_dir")
    assert sorted(os.listdir(tmp_path)) == ["a_dir", "runs"]


class FullDisk:
    """A file whose writes stop with ENOSPC after `room` bytes, as on a full disk."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        data = memoryview(data).cast("B")
        self.file.write(data[: self.room])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_atomic_save_on_a_full_disk_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path, data = previous_checkpoint(tmp_path)
    monkeypatch.setattr(llc_module, "open", lambda *args, **kwargs: FullDisk(open(*args, **kwargs), 4096), raising=False)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint\.pt: not written: no space left on device"):
        atomic_save(NEW, path)
    assert_kept(path, data)
    monkeypatch.undo()

    def fsync_full(fd):  # file systems that allocate late report the full disk at fsync
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(llc_module.os, "fsync", fsync_full)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint\.pt: not written: no space left on device"):
        atomic_save(NEW, path)
    monkeypatch.undo()
    assert_kept(path, data)


def test_atomic_save_interrupted_mid_write_leaves_no_temporary(tmp_path, monkeypatch):
    path, data = previous_checkpoint(tmp_path)

    class Interrupted(FullDisk):
        def write(self, data):
            raise KeyboardInterrupt

    monkeypatch.setattr(llc_module, "open", lambda *args, **kwargs: Interrupted(open(*args, **kwargs), 0), raising=False)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(NEW, path)
    monkeypatch.undo()
    assert_kept(path, data)


def test_atomic_save_past_a_real_file_size_limit_keeps_the_previous_file(tmp_path):
    """A real failing write, no mock: the kernel stops the write at RLIMIT_FSIZE (EFBIG), in a child process."""
    path, data = previous_checkpoint(tmp_path)
    script = ("import resource, signal, sys, torch; sys.path.insert(0, sys.argv[2]); from llc import atomic_save\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
              "atomic_save({'weights': torch.ones(1000, 100)}, sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", script, str(path), str(REPO_ROOT)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and f"CheckpointWriteError: {path}: not written: file too large" in result.stderr, \
        result.stderr[-2000:]
    assert_kept(path, data)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs mounted at tmp_path/disk (needs root and mount rights; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_atomic_save_on_a_really_full_and_read_only_file_system(small_tmpfs):
    path, data = previous_checkpoint(small_tmpfs)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint\.pt: not written: no space left on device"):
        atomic_save(NEW, path)  # 400 kB into 256 KiB
    assert_kept(path, data)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint\.pt: not written: read-only file system"):
        atomic_save(GOOD, path)
    assert_kept(path, data)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def test_cli_prints_dims(tmp_path):
    ase_path, _ = save_ase(tmp_path, "ase_llc.pth")
    native_path = tmp_path / "native.pt"
    save_llc(native_path, trained_llc("mlp"), METADATA)
    # one process for all three files: importing torch dominates the run time
    paths = [str(ase_path), str(native_path), str(tmp_path / "missing.pth")]
    result = subprocess.run([sys.executable, "llc.py", *paths], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, "a file that cannot be read must fail the command"
    assert "missing.pth: does not exist" in result.stderr
    ase_part, native_part = result.stdout.split("\n\n")
    for line in ("format:        rl_games", "obs_dim:       12", "latent_dim:    8", "action_dim:    5",
                 "architecture:  style_cat", "discriminator: yes", "rl_games_layout: rl_games 1.1", "epoch: 25000"):
        assert line in ase_part, line
    for line in ("format:        native", "obs_dim:       12", "architecture:  mlp", "robot: ant", "seed: 3",
                 "discriminator: no"):
        assert line in native_part, line


def test_normalizer_leaves_out_non_finite_samples():
    data = torch.randn(20, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    clean, dirty = RunningMeanStd(3), RunningMeanStd(3)
    clean.update(data[4:])
    data[0, 1], data[1, 0], data[2, 2], data[3, 0] = float("nan"), float("inf"), -float("inf"), float("nan")
    dirty.update(data)
    for name in ("running_mean", "running_var", "count"):
        torch.testing.assert_close(getattr(dirty, name), getattr(clean, name), atol=1e-12, rtol=0)
    nothing = RunningMeanStd(())
    nothing.update(torch.tensor([float("nan")]))  # an all-bad batch changes nothing
    assert float(nothing.count) == 1.0 and float(nothing.running_mean) == 0.0 and float(nothing.running_var) == 1.0


def set_local_root_obs_stats(checkpoint, local_root_obs, policy_index=44, amp_frame_size=125):
    """Make a synthetic ASE humanoid checkpoint's normaliser statistics say localRootObs as ASE's would: the
    root x axis' y component varies in the policy obs and is constant in the AMP frames (True), or the other way
    round (False). The variances are those a real humanoid run gives (tests/test_local_root_obs.py measures them)."""
    varies, constant = 0.36, 1e-14
    obs_stats(checkpoint)["running_var"][policy_index] = varies if local_root_obs else constant
    checkpoint["amp_input_mean_std"]["running_var"][2::amp_frame_size] = constant if local_root_obs else varies
    return checkpoint
