"""Load, save and build a frozen low-level controller (LLC).

An LLC maps (proprioceptive observation, latent z) to joint actions. The high-level policy of
`hrl_ppo_continuous.py` picks z; the LLC is frozen and only evaluated.

Two checkpoint formats load with `load_llc(path)`:
- native ("hrl-llc"): one file written by `save_llc`, e.g. by `llc_pretrain.py`;
- ASE / rl_games: the `.pth` file an ASE LLC training run writes (rl_games 1.1 layout, where the
  observation normaliser is the top-level `running_mean_std`, and the rl_games >= 1.3 layout,
  where it lives inside `model` as `running_mean_std.*`). Sizes are read from tensor shapes.

Both are read with `torch.load(..., weights_only=True)`: tensors and plain Python values only,
never arbitrary pickled objects. Every failure to load is an `LLCCheckpointError` whose message
names the file: a missing path, a directory, truncated or corrupt bytes (including a zip member
that fails its CRC-32), pickled Python objects (refused, nothing in them runs), a native file whose
contents do not match its stored digest, missing or renamed entries, wrong shapes, dtypes or types,
and non-finite weights or normaliser statistics.

`atomic_save(obj, path)` writes any checkpoint (temporary file, fsync, rename, fsync of the
directory) and refuses one with non-finite tensors (`first_nonfinite`); a failed write raises
`CheckpointWriteError` and leaves the previous file at `path` as it was.

    python llc.py path/to/llc.pth [more.pth ...] [--ase-config ase_humanoid_hrl.yaml]   # what is inside
"""

import argparse
import contextlib
import datetime
import errno
import hashlib
import io
import math
import os
import pickle
import pickletools
import re
import shlex
import stat
import sys
import warnings
import zipfile
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_NAME = "hrl-llc"
FORMAT_VERSION = 2  # 2: a digest of the contents, verified at load; 1 (no digest) still loads
ARCHS = ("style_cat", "mlp")
NORM_EPSILON = 1e-5  # rl_games RunningMeanStd: (x - mean) / sqrt(var + 1e-5)
NORM_CLIP = 5.0  # ... then clamped to [-5, 5]
STYLE_REWARD_MIN_PROB = 1e-4  # ASE: -log(max(1 - D, 1e-4))

LATENT_INPUT = {  # how z enters each architecture, written into native files for people reading them
    "style_cat": "z / |z| -> style MLP -> Linear -> tanh = style; concat(normalised obs, style) -> MLP -> mu",
    "mlp": "z / |z|; concat(normalised obs, unit z) -> MLP -> mu",
}
ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "selu": nn.SELU, "tanh": nn.Tanh, "silu": nn.SiLU, "gelu": nn.GELU}


class LLCCheckpointError(ValueError):
    """A checkpoint that cannot be used as an LLC; the message names the file and what was wrong."""


class CheckpointWriteError(OSError):
    """A checkpoint that was not written (full disk, read-only or missing directory, permissions, non-finite
    tensors); the message names the path and the cause. Whatever was at the path before is unchanged."""


def make_activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------
def orthogonal_init(layer, std=math.sqrt(2), bias_const=0.0):
    """CleanRL's layer_init: orthogonal weights with gain `std`, constant biases."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_size, hidden_sizes, out_size=None, activation="relu", out_std=None):
    """nn.Sequential of Linear + activation per hidden size, then a Linear to out_size (none if None).
    With out_std: CleanRL's orthogonal initialisation (hidden gain sqrt(2), output gain out_std, zero
    biases), as the trainer's policy and the pre-training critic use; without: torch's default
    initialisation, as ASE's networks (the LLC's style MLP and discriminator)."""
    layers, size = [], in_size
    for hidden in hidden_sizes:
        linear = nn.Linear(size, hidden)
        layers += [linear if out_std is None else orthogonal_init(linear), make_activation(activation)]
        size = hidden
    if out_size is not None:
        linear = nn.Linear(size, out_size)
        layers.append(linear if out_std is None else orthogonal_init(linear, std=out_std))
    return nn.Sequential(*layers)


class RunningMeanStd(nn.Module):
    """rl_games' running normaliser (ASE's `running_mean_std`, `value_mean_std`, `amp_input_mean_std`),
    the one normaliser of this project: float64 running mean / var / count, applied in float32.

    Its semantics are rl_games' own because ASE's checkpoints carry these statistics and an LLC loaded
    from one must normalise exactly as it was trained: the count starts at 1 (a prior of one sample at
    mean 0, var 1), batches are merged with their unbiased variance, normalise = clamp((x - mean) /
    sqrt(var + 1e-5), -5, 5), denormalise = clamp(x, -5, 5) * sqrt(var + 1e-5) + mean.
    `shape` is the shape of one sample: (D,) for observations, () for values."""

    def __init__(self, shape):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.register_buffer("running_mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("running_var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.ones((), dtype=torch.float64))
        # float32 mean and std, cached by freeze(): a frozen LLC does not recompute them every step
        self.register_buffer("frozen_mean", None, persistent=False)
        self.register_buffer("frozen_std", None, persistent=False)

    @property
    def size(self):
        return self.running_mean.shape[0]

    def float32_stats(self):
        """(mean, std) in float32: the cached ones of a frozen normaliser, else from the running statistics."""
        if self.frozen_mean is not None:
            return self.frozen_mean, self.frozen_std
        return self.running_mean.float(), torch.sqrt(self.running_var.float() + NORM_EPSILON)

    def freeze(self):
        self.frozen_mean = self.running_mean.float()
        self.frozen_std = torch.sqrt(self.running_var.float() + NORM_EPSILON)

    def forward(self, x):
        mean, std = self.float32_stats()
        return torch.clamp((x - mean) / std, -NORM_CLIP, NORM_CLIP)

    normalize = forward

    def denormalize(self, x):
        mean, std = self.float32_stats()
        return torch.clamp(x, -NORM_CLIP, NORM_CLIP) * std + mean

    @torch.no_grad()
    def update(self, x):
        """Merge a batch [..., *shape] into the running statistics (parallel mean/variance update)."""
        batch_count, batch_mean, batch_var = self.batch_moments(x)
        self.merge(batch_mean, batch_var, batch_count)

    @torch.no_grad()
    def batch_moments(self, x):
        """(count, mean, unbiased variance) in float64 of the finite samples of a batch [..., *shape]."""
        x = x.reshape(-1, *self.running_mean.shape).double()
        # samples with a non-finite entry are left out (no host sync: weights, not indexing)
        finite = torch.isfinite(x).reshape(x.shape[0], -1).all(-1)
        weight = finite.double().reshape(-1, *([1] * self.running_mean.dim()))
        x = torch.where(weight > 0, x, 0.0)
        batch_count = weight.sum()
        batch_mean = (x * weight).sum(0) / batch_count.clamp_min(1)
        # unbiased batch variance as rl_games computes it; a batch of one has no spread to add
        batch_var = ((x - batch_mean) ** 2 * weight).sum(0) / (batch_count - 1).clamp_min(1)
        return batch_count, batch_mean, batch_var

    @torch.no_grad()
    def merge(self, batch_mean, batch_var, batch_count):
        """Merge a batch given by its float64 mean, unbiased variance and count (distributed.py merges
        the batches of all ranks this way)."""
        if self.frozen_mean is not None:
            raise RuntimeError("this normaliser belongs to a frozen LLC; its statistics cannot change")
        total_count = self.count + batch_count
        delta = batch_mean - self.running_mean
        m2 = self.running_var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total_count
        self.running_mean.add_(delta * batch_count / total_count)
        self.running_var.copy_(m2 / total_count)
        self.count.copy_(total_count)


class StyleCatActor(nn.Module):
    """ASE's AMPStyleCatNet1 actor: z -> style MLP -> tanh style; concat(obs, style) -> MLP -> mu.

    Attribute names and layer indices follow ASE's state dict (`_style_mlp.{0,2}`, `_style_dense`,
    `_dense_layers.{i}`), so loading an ASE checkpoint is a renaming of keys.
    """

    def __init__(self, obs_dim, latent_dim, action_dim, hidden, activation, style_hidden, style_dim):
        super().__init__()
        self.activation = make_activation(activation)
        self.style_mlp = mlp(latent_dim, style_hidden, activation=activation)
        self.style_dense = nn.Linear(style_hidden[-1] if style_hidden else latent_dim, style_dim)
        sizes = [obs_dim + style_dim, *hidden]
        self.dense_layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.mu = nn.Linear(sizes[-1], action_dim)

    def forward(self, norm_obs, z_unit):
        style = torch.tanh(self.style_dense(self.style_mlp(z_unit)))
        h = torch.cat([norm_obs, style], dim=-1)
        for layer in self.dense_layers:
            h = self.activation(layer(h))  # ASE applies it after every dense layer, the last too
        return self.mu(h)  # no squashing: actions are clamped afterwards


class MLPActor(nn.Module):
    """Plain MLP on concat(normalised obs, unit z) -> mu."""

    def __init__(self, obs_dim, latent_dim, action_dim, hidden, activation):
        super().__init__()
        self.activation = make_activation(activation)
        sizes = [obs_dim + latent_dim, *hidden]
        self.dense_layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.mu = nn.Linear(sizes[-1], action_dim)

    def forward(self, norm_obs, z_unit):
        h = torch.cat([norm_obs, z_unit], dim=-1)
        for layer in self.dense_layers:
            h = self.activation(layer(h))
        return self.mu(h)


class Discriminator(nn.Module):
    """AMP discriminator: normalised AMP obs -> MLP -> one logit (ASE `_disc_mlp`, `_disc_logits`)."""

    def __init__(self, amp_obs_dim, hidden, activation):
        super().__init__()
        self.trunk = mlp(amp_obs_dim, hidden, activation=activation)
        self.logits = nn.Linear(hidden[-1] if hidden else amp_obs_dim, 1)

    def forward(self, norm_amp_obs):
        return self.logits(self.trunk(norm_amp_obs))


class LowLevelController(nn.Module):
    """Observation normaliser + latent-conditioned actor (+ optional AMP discriminator)."""

    def __init__(self, arch, discriminator_config=None):
        super().__init__()
        self.arch = dict(arch)
        self.discriminator_config = dict(discriminator_config) if discriminator_config else None
        self.obs_dim = arch["obs_dim"]
        self.latent_dim = arch["latent_dim"]
        self.action_dim = arch["action_dim"]
        self.obs_normalizer = RunningMeanStd(self.obs_dim)
        shared = dict(obs_dim=self.obs_dim, latent_dim=self.latent_dim, action_dim=self.action_dim,
                      hidden=arch["hidden"], activation=arch["activation"])
        if arch["name"] == "style_cat":
            self.actor = StyleCatActor(**shared, style_hidden=arch["style_hidden"], style_dim=arch["style_dim"])
        elif arch["name"] == "mlp":
            self.actor = MLPActor(**shared)
        else:
            raise ValueError(f"arch {arch['name']!r} is not supported; expected one of {ARCHS}")
        self.discriminator = None
        self.amp_normalizer = None
        if self.discriminator_config is not None:
            cfg = self.discriminator_config
            self.discriminator = Discriminator(cfg["amp_obs_dim"], cfg["hidden"], cfg["activation"])
            if cfg["normalize_amp_obs"]:
                self.amp_normalizer = RunningMeanStd(cfg["amp_obs_dim"])
        self.metadata = {}
        self.source_format = "native"
        self.source_path = None

    @property
    def has_discriminator(self):
        return self.discriminator is not None

    def normalize_obs(self, llc_obs):
        return self.obs_normalizer(llc_obs)

    def mean_action(self, norm_obs, z_unit):
        """Deterministic action before clamping; differentiable (used by pre-training)."""
        return self.actor(norm_obs, z_unit)

    def act(self, llc_obs, z):
        """llc_obs [N, obs_dim], z [N, latent_dim] (any norm) -> actions [N, action_dim] in [-1, 1]."""
        z_unit = F.normalize(z, dim=-1)  # z / max(||z||, 1e-12): a zero z stays zero instead of NaN
        return torch.clamp(self.actor(self.normalize_obs(llc_obs), z_unit), -1.0, 1.0)

    def style_reward(self, amp_obs, scale=2.0):
        """ASE's discriminator reward -log(max(1 - sigmoid(D(amp_obs)), 1e-4)) * scale, shape [N]."""
        if self.discriminator is None:
            raise LLCCheckpointError(f"{self.source_path or 'this LLC'}: has no discriminator, so no style reward")
        if self.amp_normalizer is not None:
            amp_obs = self.amp_normalizer(amp_obs)
        prob = torch.sigmoid(self.discriminator(amp_obs).squeeze(-1))
        return -torch.log(torch.clamp(1.0 - prob, min=STYLE_REWARD_MIN_PROB)) * scale

    def check_env(self, obs_dim, task_obs_size, path=None):
        """Raise LLCCheckpointError unless the env's observation without its task part fits this LLC.

        obs_dim is the env's full observation size (env.num_obs); the task observation is its last
        task_obs_size entries, and the LLC sees the rest.
        """
        llc_obs_dim = obs_dim - task_obs_size
        if llc_obs_dim == self.obs_dim:
            return
        name = path or self.source_path or "the LLC"
        message = (f"{name}: the LLC expects observations of size {self.obs_dim}, but the env gives "
                   f"{obs_dim} entries of which the last {task_obs_size} are the task observation, "
                   f"leaving {llc_obs_dim} for the LLC.")
        if obs_dim == self.obs_dim and task_obs_size > 0:
            message += (f" The LLC size equals obs_dim {obs_dim} itself: pass the env's FULL observation size "
                        f"(env.num_obs, task part included), or the LLC was trained on observations that "
                        f"included a task observation of size {task_obs_size}.")
        else:
            message += " Check that the LLC was trained for this robot (ASE humanoids: 223, sword and shield: 253)."
        raise LLCCheckpointError(message)

    def freeze(self):
        """Evaluation only: eval mode, no gradients, cached float32 normaliser statistics."""
        self.eval()
        self.requires_grad_(False)
        self.obs_normalizer.freeze()
        if self.amp_normalizer is not None:
            self.amp_normalizer.freeze()
        return self

    def describe(self):
        """A few lines for people: what this LLC is, its sizes and where it came from."""
        arch = self.arch
        act = arch["activation"]
        if arch["name"] == "style_cat":
            style = " -> ".join(str(u) for u in [self.latent_dim, *arch["style_hidden"]])
            net = (f"style_cat (ASE AMPStyleCatNet1): unit z {style} -> {arch['style_dim']} tanh; "
                   f"concat(obs {self.obs_dim}, style {arch['style_dim']}) -> "
                   + " -> ".join(str(u) for u in arch["hidden"]) + f" -> mu {self.action_dim} ({act})")
        else:
            net = (f"mlp: concat(obs {self.obs_dim}, unit z {self.latent_dim}) -> "
                   + " -> ".join(str(u) for u in arch["hidden"]) + f" -> mu {self.action_dim} ({act})")
        lines = [
            f"file:          {self.source_path}",
            f"format:        {self.source_format}",
            f"obs_dim:       {self.obs_dim}",
            f"latent_dim:    {self.latent_dim}",
            f"action_dim:    {self.action_dim}",
            f"architecture:  {net}",
            f"parameters:    {sum(p.numel() for p in self.actor.parameters())} (actor)",
            f"obs samples:   {float(self.obs_normalizer.count):.6g} (normaliser count)",
        ]
        if self.has_discriminator:
            cfg = self.discriminator_config
            trunk = " -> ".join(str(u) for u in [cfg["amp_obs_dim"], *cfg["hidden"]])
            norm = "normalised" if cfg["normalize_amp_obs"] else "not normalised"
            lines.append(f"discriminator: yes: amp obs {trunk} -> 1 logit ({cfg['activation']}), amp obs {norm}")
        else:
            lines.append("discriminator: no (no style reward)")
        lines.append("metadata:" + ("" if self.metadata else "      (none)"))
        lines += [f"  {key}: {value}" for key, value in self.metadata.items()]
        return "\n".join(lines)


def build_llc(obs_dim, latent_dim, action_dim, arch="style_cat", hidden=(1024, 1024, 512), activation="relu",
              style_hidden=(512, 256), style_dim=64, amp_obs_dim=None, disc_hidden=(1024, 1024, 512),
              normalize_amp_obs=True):
    """A trainable LLC (train mode, gradients on) for pre-training; amp_obs_dim adds a discriminator."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not supported; expected one of {ARCHS}")
    for name, value in (("obs_dim", obs_dim), ("latent_dim", latent_dim), ("action_dim", action_dim)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    make_activation(activation)  # fail early on an unknown name
    arch_config = {"name": arch, "obs_dim": int(obs_dim), "latent_dim": int(latent_dim),
                   "action_dim": int(action_dim), "hidden": [int(u) for u in hidden], "activation": activation}
    if arch == "style_cat":
        arch_config["style_hidden"] = [int(u) for u in style_hidden]
        arch_config["style_dim"] = int(style_dim)
    disc_config = None
    if amp_obs_dim is not None:
        disc_config = {"amp_obs_dim": int(amp_obs_dim), "hidden": [int(u) for u in disc_hidden],
                       "activation": activation, "normalize_amp_obs": bool(normalize_amp_obs)}
    return LowLevelController(arch_config, disc_config)


# ---------------------------------------------------------------------------------------------
# Checkpoint files: atomic writes, finiteness, digests
# ---------------------------------------------------------------------------------------------
def first_nonfinite(obj, where="") -> Optional[str]:
    """The key path (e.g. 'actor.mu.bias', 'optimizer.state.3.exp_avg', 'losses[2]') of the first
    floating-point tensor in `obj` (nested dicts, lists and tuples) that holds NaN or inf; None if every
    tensor is finite. Other values (ints, strings, integer tensors) are never non-finite here."""
    if torch.is_tensor(obj):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return where or "(the tensor itself)"
        return None
    if isinstance(obj, Mapping):
        items = ((f"{where}.{key}" if where else str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", value) for i, value in enumerate(obj))
    else:
        return None
    for item_where, value in items:
        found = first_nonfinite(value, item_where)
        if found is not None:
            return found
    return None


def first_non_directory(folder):
    """The first existing component of `folder` (from the root down) that is not a directory, or None."""
    parts = os.path.abspath(folder).split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if os.path.lexists(prefix) and not os.path.isdir(prefix):
            return prefix
    return None


def os_reason(error):
    """'no space left on device', 'read-only file system', 'permission denied' ... for an OSError."""
    if error.errno is None:
        return str(error)
    text = os.strerror(error.errno)
    return text[:1].lower() + text[1:]


def write_failure(error, folder):
    """Why a write into `folder` failed, in words that name the cause."""
    if not isinstance(error, OSError):
        return f"{type(error).__name__}: {error}"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocking = first_non_directory(folder)
        if blocking:
            return f"{blocking} is a file, not a directory"
    names = [name for name in (error.filename, error.filename2) if name]
    return os_reason(error) + (f" ({' -> '.join(map(str, names))})" if names else "")


def atomic_save(obj, path):
    """torch.save(obj) to `path` such that `path` always holds a complete file: the previous one or this one.

    The bytes go to `path + ".tmp"` in the same directory (created if needed), which is flushed and
    fsynced, renamed onto `path` with os.replace (atomic on POSIX), and the directory is fsynced so that
    the rename survives a power loss. On any failure (full disk, read-only file system, a path under a
    regular file, permissions) the partial temporary file is removed and CheckpointWriteError names the
    path and the cause; the previous file at `path` is untouched. An object with a non-finite
    floating-point tensor is refused before anything is written (see first_nonfinite), so a run that
    blew up never replaces its last good checkpoint."""
    path = os.fspath(path)
    bad = first_nonfinite(obj)
    if bad is not None:
        raise CheckpointWriteError(f"{path}: not written: tensor {bad!r} holds NaN or inf; "
                                   f"whatever was at the path before is kept")
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
    except Exception as error:
        raise CheckpointWriteError(f"{path}: not written: the object cannot be serialised: "
                                   f"{type(error).__name__}: {error}") from error
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = path + ".tmp"
    opened = False
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp_path, "wb") as f:
            opened = True
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:  # KeyboardInterrupt too: no partial file is left behind
        if opened:
            with contextlib.suppress(OSError):
                os.remove(tmp_path)
        if not isinstance(error, Exception):
            raise
        raise CheckpointWriteError(f"{path}: not written: {write_failure(error, folder)}; "
                                   f"whatever was at the path before is kept") from error
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that cannot sync a directory
            raise CheckpointWriteError(f"{path}: written, but its directory could not be synced to disk: "
                                       f"{write_failure(error, folder)}") from error


DIGEST_ALGORITHM = "sha256"
DIGEST_SCALARS = (str, int, float, bool, type(None))


def native_digest(checkpoint):
    """{'algorithm': 'sha256', 'tensors': hex, 'values': hex} over everything in a native checkpoint but
    its 'digest' entry, dict keys in sorted order: 'tensors' hashes each tensor's key path, dtype, shape
    and bytes; 'values' the structure and every plain value (format, architecture, metadata, ...).
    Raises TypeError naming the key of a value that is neither a tensor nor a plain value."""
    tensors, values = hashlib.sha256(), hashlib.sha256()

    def put(tag, payload):
        values.update(tag + len(payload).to_bytes(8, "little") + payload)

    def feed(value, where):
        if torch.is_tensor(value):
            tensor = value.detach().cpu().resolve_conj().contiguous()
            header = f"{where}\0{tensor.dtype}\0{tuple(tensor.shape)}".encode()
            tensors.update(len(header).to_bytes(8, "little") + header)
            tensors.update(tensor.reshape(-1).view(torch.uint8).numpy())
            put(b"T", where.encode("utf-8", "surrogatepass"))
        elif value is None:
            put(b"N", b"")
        elif isinstance(value, bool):
            put(b"B", b"1" if value else b"0")
        elif isinstance(value, int):
            put(b"I", str(value).encode())
        elif isinstance(value, float):
            put(b"F", value.hex().encode())
        elif isinstance(value, str):
            put(b"S", value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, Mapping):
            put(b"D", str(len(value)).encode())
            for key in sorted(value, key=repr):
                if not isinstance(key, DIGEST_SCALARS):
                    raise TypeError(f"{where or 'the checkpoint'} has a key of type {type(key).__name__}")
                feed(key, f"{where} key")
                feed(value[key], f"{where}.{key}" if where else str(key))
        elif isinstance(value, (list, tuple)):
            put(b"L" if isinstance(value, list) else b"U", str(len(value)).encode())
            for i, item in enumerate(value):
                feed(item, f"{where}[{i}]")
        else:
            raise TypeError(f"{where} holds a {type(value).__module__}.{type(value).__name__}, "
                            f"neither a tensor nor a plain value")

    feed({key: value for key, value in checkpoint.items() if key != "digest"}, "")
    return {"algorithm": DIGEST_ALGORITHM, "tensors": tensors.hexdigest(), "values": values.hexdigest()}


def verify_digest(path, checkpoint):
    """Raise LLCCheckpointError unless the native checkpoint's contents match its stored 'digest'."""
    stored = checkpoint.get("digest")
    if not (isinstance(stored, Mapping) and stored.get("algorithm") == DIGEST_ALGORITHM
            and isinstance(stored.get("tensors"), str) and isinstance(stored.get("values"), str)):
        raise LLCCheckpointError(f"{path}: native LLC version {checkpoint.get('version')!r} without a valid "
                                 f"'digest' entry (found {stored!r:.120}): the file was modified or corrupted")
    try:
        actual = native_digest(checkpoint)
    except TypeError as error:
        raise LLCCheckpointError(f"{path}: {error}; the native format stores tensors and plain values only") from error
    if actual["tensors"] != stored["tensors"]:
        raise LLCCheckpointError(f"{path}: tensors do not match the stored digest: the file was modified or corrupted")
    if actual["values"] != stored["values"]:
        raise LLCCheckpointError(f"{path}: the architecture, metadata or other values do not match the stored "
                                 f"digest: the file was modified or corrupted")


# ---------------------------------------------------------------------------------------------
# Native format
# ---------------------------------------------------------------------------------------------
PLAIN_TYPES = (str, int, float, bool, type(None))


def check_plain(value, where):
    """Raise unless value is made of dicts (str keys), lists, tuples and plain scalars."""
    if isinstance(value, PLAIN_TYPES):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has key {key!r} of type {type(key).__name__}; keys must be str")
            check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__name__}; the native LLC format "
                     f"stores plain Python values only (str, int, float, bool, None, lists, dicts)")


def cpu_state(module):
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def repo_relative(path_text: str) -> str:
    """An absolute path -> the same path relative to the repository root (`../` where it lies outside);
    anything else unchanged. Checkpoints travel between machines: they must not carry this one's paths."""
    if not os.path.isabs(path_text):
        return path_text
    return os.path.relpath(path_text, REPO_DIR)


def portable_command(argv) -> str:
    """The command line `argv` (sys.argv: script, then its arguments) as a user reruns it from the
    repository root: `python`, not this machine's interpreter path, and repository-relative paths
    (also inside `--flag=/abs/path`)."""
    def portable(arg):
        flag, eq, value = arg.partition("=")
        return f"{flag}={repo_relative(value)}" if eq and flag.startswith("-") else repo_relative(arg)

    return shlex.join(["python"] + [portable(arg) for arg in argv])


def portable_metadata(value, key=None):
    """`value` with every absolute path made repository-relative: strings that are a path, and the
    arguments of a command line stored under the key "command" (its interpreter becomes `python`)."""
    if isinstance(value, Mapping):
        return {k: portable_metadata(item, k) for k, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable_metadata(item) for item in value)
    if isinstance(value, str) and key == "command":
        tokens = shlex.split(value)
        is_interpreter = tokens and os.path.basename(tokens[0]).startswith("python")
        return portable_command(tokens[1:] if is_interpreter else tokens)
    if isinstance(value, str) and os.path.isabs(value) and not any(c.isspace() for c in value):
        return repo_relative(value)
    return value


def save_llc(path, model, metadata):
    """Write `model` (a LowLevelController) in the native format with a digest of its contents, via
    atomic_save (so a failed write raises CheckpointWriteError and keeps the previous file).

    metadata: plain values describing how the LLC was made, e.g. robot, control_dt, pd (gains,
    action scale), command, seed, steps, wall_time_s, hardware.
    """
    check_plain(metadata, "metadata")
    metadata = portable_metadata(metadata)  # no paths of this machine in a file that is shared
    checkpoint = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "arch": {**model.arch, "latent_input": LATENT_INPUT[model.arch["name"]]},
        "actor": cpu_state(model.actor),
        "obs_normalizer": cpu_state(model.obs_normalizer),
        "discriminator": None,
        "metadata": metadata,
        "saved": {"torch": str(torch.__version__),
                  "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
    }
    if model.has_discriminator:
        checkpoint["discriminator"] = {
            **model.discriminator_config,
            "weights": cpu_state(model.discriminator),
            "amp_normalizer": cpu_state(model.amp_normalizer) if model.amp_normalizer is not None else None,
        }
    checkpoint["digest"] = native_digest(checkpoint)
    atomic_save(checkpoint, path)


def entry_name(keys):
    """('discriminator', 'weights', 'trunk.0.weight') -> "discriminator['weights']['trunk.0.weight']"."""
    return str(keys[0]) + "".join(f"[{key!r}]" for key in keys[1:])


def describe_value(value):
    """A short description of a value found in a checkpoint, for messages: the value itself when it is a
    plain scalar or a short list of them, else its type."""
    short_list = isinstance(value, (list, tuple)) and len(value) <= 8 and all(isinstance(v, PLAIN_TYPES) for v in value)
    if isinstance(value, PLAIN_TYPES) or short_list:
        return f"{value!r:.60}"
    return f"a {type(value).__name__}"


def check_config(path, config, where, int_keys, int_list_keys):
    """Raise LLCCheckpointError naming the entry unless config[int_keys] are positive integers,
    config[int_list_keys] lists of positive integers and config['activation'] a supported name."""
    for key in int_keys:
        value = config.get(key)
        if type(value) is not int or value < 1:
            raise LLCCheckpointError(f"{path}: {where}[{key!r}] is {describe_value(value)}, expected a positive integer")
    for key in int_list_keys:
        value = config.get(key)
        if not isinstance(value, (list, tuple)) or any(type(unit) is not int or unit < 1 for unit in value):
            raise LLCCheckpointError(f"{path}: {where}[{key!r}] is {describe_value(value)}, expected a list of "
                                     f"positive integers (layer sizes)")
    if config.get("activation") not in ACTIVATIONS:
        raise LLCCheckpointError(f"{path}: {where}['activation'] is {describe_value(config.get('activation'))}, "
                                 f"expected one of {sorted(ACTIVATIONS)}")


def build_checked(path, arch, disc_config, state, name_of, exact_dtype):
    """LowLevelController(arch, disc_config) loaded with `state` (its state-dict keys -> values read from the
    file). First, on a meta-device model that allocates nothing, every entry is checked to be there, expected,
    a tensor of the right shape and dtype (floating point at least), finite, and normaliser variances >= 0;
    name_of(key) names an entry as it is in the file, for the message."""
    try:
        with torch.device("meta"):
            expected = LowLevelController(arch, disc_config).state_dict()
    except (RuntimeError, ValueError, TypeError, OverflowError) as error:
        raise LLCCheckpointError(f"{path}: the architecture {dict(arch)} cannot be built: {error}") from error

    def names(keys):
        return ", ".join(map(name_of, keys[:5])) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    unexpected = [key for key in state if key not in expected]
    if unexpected:
        verb = "is not a tensor" if len(unexpected) == 1 else "are not tensors"
        raise LLCCheckpointError(f"{path}: {names(unexpected)} {verb} of the architecture {dict(arch)} "
                                 f"(renamed, or from another network?)")
    missing = [key for key in expected if key not in state]
    if missing:
        raise LLCCheckpointError(f"{path}: {names(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    for key, want in expected.items():
        value = state[key]
        if not torch.is_tensor(value):
            raise LLCCheckpointError(f"{path}: {name_of(key)} is {describe_value(value)}, expected a tensor of "
                                     f"shape {tuple(want.shape)}")
        if value.shape != want.shape:
            raise LLCCheckpointError(f"{path}: {name_of(key)} has shape {tuple(value.shape)}, the architecture "
                                     f"needs {tuple(want.shape)}")
        if not value.is_floating_point() or (exact_dtype and value.dtype != want.dtype):
            raise LLCCheckpointError(f"{path}: {name_of(key)} has dtype {value.dtype}, expected {want.dtype}")
        if not value.is_contiguous():  # torch.save keeps strides: a parameter's are a contiguous tensor's
            raise LLCCheckpointError(f"{path}: {name_of(key)} has strides {value.stride()}, not those of a contiguous "
                                     f"tensor: the file is damaged")
    bad = first_nonfinite(state)
    if bad is not None:
        raise LLCCheckpointError(f"{path}: {name_of(bad)} holds non-finite values (NaN or inf)")
    negative = [key for key in state if key.endswith("running_var") and bool((state[key] < 0).any())]
    if negative:
        raise LLCCheckpointError(f"{path}: {name_of(negative[0])} has negative variances")
    model = LowLevelController(arch, disc_config)
    model.load_state_dict(state)
    return model


def load_native(path, checkpoint):
    """A native checkpoint -> LowLevelController. Version 2 files store a digest of their contents
    (native_digest), verified here before anything else; version 1 files, written before the digest
    existed (such as older copies of the shipped LLCs), have none and still load, with every other check
    (structure, shapes, dtypes, finiteness) applied."""
    version = checkpoint.get("version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise LLCCheckpointError(f"{path}: native LLC format version {version!r}; this llc.py reads versions "
                                 f"1..{FORMAT_VERSION} (a newer file needs a newer llc.py)")
    if version >= 2 or "digest" in checkpoint:
        verify_digest(path, checkpoint)
    arch = checkpoint.get("arch")
    if not isinstance(arch, Mapping) or arch.get("name") not in ARCHS:
        found = arch.get("name") if isinstance(arch, Mapping) else arch
        raise LLCCheckpointError(f"{path}: architecture {describe_value(found)} is not one of {ARCHS}")
    style = ("style_dim",) if arch["name"] == "style_cat" else ()
    check_config(path, arch, "arch", ("obs_dim", "latent_dim", "action_dim", *style),
                 ("hidden", "style_hidden") if style else ("hidden",))
    parts = {"actor": ("actor",), "obs_normalizer": ("obs_normalizer",)}
    disc = checkpoint.get("discriminator")
    disc_config = None
    if disc is not None:
        if not isinstance(disc, Mapping):
            raise LLCCheckpointError(f"{path}: 'discriminator' is {describe_value(disc)}, expected a dict or None")
        disc_config = {key: disc.get(key) for key in ("amp_obs_dim", "hidden", "activation")}
        check_config(path, disc_config, "discriminator", ("amp_obs_dim",), ("hidden",))
        disc_config["normalize_amp_obs"] = disc.get("amp_normalizer") is not None
        parts["discriminator"] = ("discriminator", "weights")
        if disc_config["normalize_amp_obs"]:
            parts["amp_normalizer"] = ("discriminator", "amp_normalizer")
    state = {}
    for prefix, keys in parts.items():
        part = checkpoint
        for key in keys:
            part = part.get(key)
        if not isinstance(part, Mapping):
            raise LLCCheckpointError(f"{path}: {entry_name(keys)} is {describe_value(part)}, expected a dict of tensors")
        for key, value in part.items():
            if not isinstance(key, str):
                raise LLCCheckpointError(f"{path}: {entry_name(keys)} has a key {key!r} of type {type(key).__name__}, "
                                         f"expected str")
            state[f"{prefix}.{key}"] = value

    def name_of(key):
        prefix, _, rest = key.partition(".")
        return entry_name((*parts[prefix], rest))

    model = build_checked(path, arch, disc_config, state, name_of, exact_dtype=True)
    metadata = checkpoint.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise LLCCheckpointError(f"{path}: 'metadata' is {describe_value(metadata)}, expected a dict")
    model.metadata = dict(metadata or {})
    return model


# ---------------------------------------------------------------------------------------------
# ASE / rl_games format
# ---------------------------------------------------------------------------------------------
ASE_ACTOR = "a2c_network.actor_mlp."
ASE_RENAMES = {  # ASE state-dict prefix -> LowLevelController prefix
    "a2c_network.actor_mlp._style_mlp.": "actor.style_mlp.",
    "a2c_network.actor_mlp._style_dense.": "actor.style_dense.",
    "a2c_network.actor_mlp._dense_layers.": "actor.dense_layers.",
    "a2c_network.mu.": "actor.mu.",
    "a2c_network._disc_mlp.": "discriminator.trunk.",
    "a2c_network._disc_logits.": "discriminator.logits.",
}
NORMALIZER_KEYS = ("running_mean", "running_var", "count")
LAYOUTS_TRIED = ("native 'hrl-llc' (top-level 'format'), "
                 "rl_games 1.1 ASE LLC ('model' with a2c_network.actor_mlp._style_mlp/_dense_layers + top-level "
                 "'running_mean_std'), rl_games >= 1.3 ASE LLC (the same with 'running_mean_std.*' inside 'model')")


def tensor_at(path, state, key, where, ndim):
    """state[key], checked to be a tensor with `ndim` dimensions; `where` names `state` in the message."""
    value = state[key]
    if not torch.is_tensor(value):
        raise LLCCheckpointError(f"{path}: {entry_name((where, key))} is {describe_value(value)}, expected a tensor")
    if value.dim() != ndim:
        raise LLCCheckpointError(f"{path}: {entry_name((where, key))} has shape {tuple(value.shape)}, expected a "
                                 f"{ndim}-D tensor")
    return value


def linear_chain(path, model_state, prefix):
    """Weights of the Linear layers '{prefix}{i}.weight' in index order, checked to chain."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.weight")
    indices = sorted(int(match[1]) for match in map(pattern.fullmatch, model_state) if match)
    weights = [tensor_at(path, model_state, f"{prefix}{i}.weight", "model", ndim=2) for i in indices]
    for i, (prev, curr) in enumerate(zip(weights[:-1], weights[1:])):
        if curr.shape[1] != prev.shape[0]:
            raise LLCCheckpointError(f"{path}: layer {prefix}{indices[i + 1]}.weight has {curr.shape[1]} inputs but "
                                     f"the previous layer has {prev.shape[0]} outputs")
    return weights


def read_normalizer(path, state, prefix, what, where):
    """{running_mean, running_var, count} from keys '{prefix}running_mean', ... or None if absent;
    `where` names `state` in messages ('model', 'running_mean_std', ...)."""
    if f"{prefix}running_mean" not in state:
        return None
    missing = [k for k in NORMALIZER_KEYS if f"{prefix}{k}" not in state]
    if missing:
        raise LLCCheckpointError(f"{path}: {what} normaliser '{where}' lacks {[prefix + k for k in missing]}")
    tensor_at(path, state, f"{prefix}running_mean", where, ndim=1)
    return {k: state[f"{prefix}{k}"] for k in NORMALIZER_KEYS}


def read_yaml(config_path, what):
    """An ASE yaml file as Python objects; an unreadable or invalid file raises LLCCheckpointError naming
    it as `config_path (what)`."""
    import yaml

    try:
        with open(config_path) as f:
            return yaml.safe_load(f)
    except OSError as error:
        raise LLCCheckpointError(f"{config_path} ({what}): cannot read it: {error}") from error
    except yaml.YAMLError as error:
        raise LLCCheckpointError(f"{config_path} ({what}): not valid YAML: {error}") from error


def read_ase_config(path, config_path):
    """ASE's LLC yaml (e.g. ase_humanoid_hrl.yaml): latent size and network settings, for cross-checks."""
    config = read_yaml(config_path, f"ASE config for {path}")
    params = config.get("params", {}) if isinstance(config, Mapping) else {}
    train = params.get("config") or {}
    network = params.get("network") or {}
    # ASE reads params.config.latent_dim; its agent passes it to the network as ase_latent_shape
    if "latent_dim" in train:
        latent_dim = train["latent_dim"]
    elif "ase_latent_shape" in train:
        shape = train["ase_latent_shape"]
        latent_dim = shape[-1] if isinstance(shape, (list, tuple)) else shape
    else:
        raise LLCCheckpointError(f"{config_path} (ASE config for {path}): no params.config.latent_dim "
                                 f"(or ase_latent_shape); found params.config keys {sorted(train)}")
    return {
        "latent_dim": int(latent_dim),
        "activation": (network.get("mlp") or {}).get("activation", "relu"),
        "hidden": (network.get("mlp") or {}).get("units"),
        "disc_activation": (network.get("disc") or {}).get("activation", "relu"),
        "disc_hidden": (network.get("disc") or {}).get("units"),
    }


# ---------------------------------------------------------------------------------------------
# ASE's localRootObs, read back from what a checkpoint's normalisers saw
# ---------------------------------------------------------------------------------------------
# The heading frame is the root's yaw, read from its x axis, so a heading-local root rotation has a
# tan-norm x axis with a y component of exactly 0; a world-frame one swings with the body's yaw.
# The running variance of that one entry therefore tells the two apart in a trained normaliser.
CONSTANT_BELOW_VAR = 1e-6  # heading-local: float rounding only
VARIES_ABOVE_VAR = 1e-3  # world frame: any turning at all during training
MIN_SAMPLES_TO_INFER = 1000  # rl_games' normaliser starts from one prior sample (mean 0, var 1)
AMP_FRAME_SIZES = (125, 140)  # amp_humanoid, sword-and-shield model (ASE, one frame)


def root_x_axis_y_index(policy_obs_dim) -> Optional[int]:
    """Entry of the root's tan-norm x axis, y component, in ASE's humanoid policy obs (1 + 15 B - 3 for B
    bodies: root height, B - 1 body positions, B tan-norms with the root's first); None for other sizes."""
    if (policy_obs_dim + 2) % 15:
        return None
    num_bodies = (policy_obs_dim + 2) // 15
    return 1 + 3 * (num_bodies - 1) + 1


def root_x_axis_y_variance(normalizer, index, frame_size=None) -> Optional[float]:
    """Largest running variance of entry `index` (of every `frame_size`-long frame when given), or None when
    the normaliser has seen too few samples to say."""
    if float(normalizer.count) < MIN_SAMPLES_TO_INFER:
        return None
    var = normalizer.running_var.double()
    if frame_size is not None:
        var = var.reshape(-1, frame_size)[:, index]
    else:
        var = var[index:index + 1]
    return float(var.max())


def infer_local_root_obs(llc) -> tuple:
    """(localRootObs as the LLC's normalisers saw it: True, False or None when they cannot tell, why).

    Policy obs: localRootObs true puts the WORLD root tan-norm in the root's slot (so the entry varies).
    AMP obs: localRootObs true makes the root rotation HEADING-LOCAL (so the entry is constant).
    Both are ASE's conventions (ase/env/tasks/humanoid.py, humanoid_amp.py); when both normalisers can
    tell and disagree, the checkpoint is not what it claims to be."""
    verdicts = []
    index = root_x_axis_y_index(llc.obs_dim)
    var = root_x_axis_y_variance(llc.obs_normalizer, index) if index is not None else None
    if var is not None and (var < CONSTANT_BELOW_VAR or var > VARIES_ABOVE_VAR):
        verdicts.append((var > VARIES_ABOVE_VAR, f"observation normaliser: variance {var:.3g} of obs[{index}], "
                                                  f"the root x axis' y component"))
    amp_norm = getattr(llc, "amp_normalizer", None)
    frame_size = next((f for f in AMP_FRAME_SIZES if amp_norm is not None and amp_norm.size % f == 0), None)
    var = root_x_axis_y_variance(amp_norm, 2, frame_size) if frame_size is not None else None
    if var is not None and (var < CONSTANT_BELOW_VAR or var > VARIES_ABOVE_VAR):
        verdicts.append((var < CONSTANT_BELOW_VAR, f"AMP normaliser: variance {var:.3g} of each frame's entry 2, "
                                                    f"the root x axis' y component"))
    if not verdicts:
        return None, "the normalisers' statistics do not tell (too few samples or no clear margin)"
    if len({value for value, _ in verdicts}) > 1:
        raise LLCCheckpointError(f"{llc_name(llc)}: its normalisers disagree on localRootObs: "
                                 + "; ".join(f"{why} -> {value}" for value, why in verdicts))
    return verdicts[0][0], "; ".join(why for _, why in verdicts)


def llc_name(llc) -> str:
    return getattr(llc, "source_path", None) or "the LLC"


def read_ase_env_local_root_obs(config_path) -> bool:
    """`env.localRootObs` of ASE's env yaml (e.g. ase/data/cfg/humanoid_ase_sword_shield_getup.yaml)."""
    config = read_yaml(config_path, "ASE env config")
    env = config.get("env") if isinstance(config, Mapping) else None
    if not isinstance(env, Mapping):
        found = sorted(config) if isinstance(config, Mapping) else type(config).__name__
        raise LLCCheckpointError(f"{config_path} (ASE env config): no env section; found top-level keys {found}")
    if not isinstance(env.get("localRootObs"), bool):
        found = f"{sorted(env)}" + (f", localRootObs {env['localRootObs']!r}" if "localRootObs" in env else "")
        raise LLCCheckpointError(f"{config_path} (ASE env config): no boolean env.localRootObs; found env keys {found}")
    return env["localRootObs"]


ASE_REQUIRED = (f"{ASE_ACTOR}_style_mlp.0.weight", f"{ASE_ACTOR}_style_dense.weight",
                f"{ASE_ACTOR}_dense_layers.0.weight", "a2c_network.mu.weight")


def load_rl_games(path, checkpoint, ase_config=None):
    model_state = checkpoint["model"]
    odd_key = next((key for key in model_state if not isinstance(key, str)), None)
    if odd_key is not None:
        raise LLCCheckpointError(f"{path}: 'model' has a key {odd_key!r} of type {type(odd_key).__name__}, expected str")
    missing = [key for key in ASE_REQUIRED if key not in model_state]
    if len(missing) == len(ASE_REQUIRED) or f"{ASE_ACTOR}_style_mlp.0.weight" in missing:
        hint = ""
        if f"{ASE_ACTOR}0.weight" in model_state:
            hint = (" The actor is a plain rl_games MLP ('a2c_network.actor_mlp.0.weight') with no latent input: "
                    "this looks like a high-level policy or an AMP policy, not an ASE LLC.")
        raise LLCCheckpointError(
            f"{path}: unknown checkpoint layout. Top-level keys: {sorted(map(str, checkpoint))}; 'model' keys: "
            f"{sorted(model_state)[:24]}{' ...' if len(model_state) > 24 else ''}. Layouts tried: {LAYOUTS_TRIED}."
            + hint)
    if missing:
        raise LLCCheckpointError(f"{path}: looks like an ASE LLC (has {ASE_REQUIRED[0]}) but 'model' lacks {missing}")

    style_layers = linear_chain(path, model_state, f"{ASE_ACTOR}_style_mlp.")
    dense_layers = linear_chain(path, model_state, f"{ASE_ACTOR}_dense_layers.")
    style_dense = tensor_at(path, model_state, f"{ASE_ACTOR}_style_dense.weight", "model", ndim=2)
    mu = tensor_at(path, model_state, "a2c_network.mu.weight", "model", ndim=2)
    style_dim = style_dense.shape[0]
    latent_dim = style_layers[0].shape[1]
    obs_dim = dense_layers[0].shape[1] - style_dim
    if obs_dim < 1:
        raise LLCCheckpointError(f"{path}: {ASE_ACTOR}_dense_layers.0.weight has {dense_layers[0].shape[1]} inputs, "
                                 f"no more than the style size {style_dim}: no room for an observation")
    layout = "rl_games >= 1.3" if "running_mean_std.running_mean" in model_state else "rl_games 1.1"
    obs_norm = read_normalizer(path, model_state, "running_mean_std.", "observation", "model")
    obs_norm_where = "model['running_mean_std.{}']"
    if obs_norm is None and isinstance(checkpoint.get("running_mean_std"), Mapping):
        obs_norm = read_normalizer(path, checkpoint["running_mean_std"], "", "observation", "running_mean_std")
        obs_norm_where = "running_mean_std['{}']"
    if obs_norm is None:
        raise LLCCheckpointError(f"{path}: no observation normaliser: neither top-level 'running_mean_std' "
                                 f"(rl_games 1.1) nor 'model' keys 'running_mean_std.*' (rl_games >= 1.3); "
                                 f"top-level keys: {sorted(map(str, checkpoint))}")
    if obs_norm["running_mean"].shape[0] != obs_dim:
        raise LLCCheckpointError(f"{path}: the observation normaliser has size {obs_norm['running_mean'].shape[0]} "
                                 f"but the actor takes {obs_dim} observation entries ({dense_layers[0].shape[1]} "
                                 f"inputs of _dense_layers.0 minus style size {style_dim})")
    if mu.shape[1] != dense_layers[-1].shape[0]:
        raise LLCCheckpointError(f"{path}: a2c_network.mu.weight has {mu.shape[1]} inputs but the last dense layer "
                                 f"has {dense_layers[-1].shape[0]} outputs")

    config = read_ase_config(path, ase_config) if ase_config is not None else None
    if config is not None and config["latent_dim"] != latent_dim:
        raise LLCCheckpointError(f"{path}: latent size {latent_dim} (from _style_mlp.0.weight) does not match "
                                 f"latent_dim {config['latent_dim']} in {ase_config}")
    hidden = [w.shape[0] for w in dense_layers]
    if config is not None and config["hidden"] is not None and list(config["hidden"]) != hidden:
        raise LLCCheckpointError(f"{path}: dense layer sizes {hidden} do not match params.network.mlp.units "
                                 f"{list(config['hidden'])} in {ase_config}")
    arch = {"name": "style_cat", "obs_dim": obs_dim, "latent_dim": latent_dim, "action_dim": mu.shape[0],
            "hidden": hidden, "activation": config["activation"] if config else "relu",
            "style_hidden": [w.shape[0] for w in style_layers], "style_dim": style_dim}

    disc_config = None
    amp_norm = None
    disc_halves = ["a2c_network._disc_mlp.0.weight", "a2c_network._disc_logits.weight"]
    present = [key for key in disc_halves if key in model_state]
    if len(present) == 1:
        raise LLCCheckpointError(f"{path}: 'model' has {present[0]} but not {(set(disc_halves) - set(present)).pop()}: "
                                 f"half a discriminator (a damaged or renamed entry)")
    if present:
        disc_layers = linear_chain(path, model_state, "a2c_network._disc_mlp.")
        amp_obs_dim = disc_layers[0].shape[1]
        # ASE and IsaacGymEnvs keep the AMP normaliser at the top level in both rl_games layouts
        if isinstance(checkpoint.get("amp_input_mean_std"), Mapping):
            amp_norm = read_normalizer(path, checkpoint["amp_input_mean_std"], "", "AMP observation",
                                       "amp_input_mean_std")
        if amp_norm is not None and amp_norm["running_mean"].shape[0] != amp_obs_dim:
            raise LLCCheckpointError(f"{path}: amp_input_mean_std has size {amp_norm['running_mean'].shape[0]} but "
                                     f"the discriminator takes {amp_obs_dim} AMP observation entries")
        disc_config = {"amp_obs_dim": amp_obs_dim, "hidden": [w.shape[0] for w in disc_layers],
                       "activation": config["disc_activation"] if config else "relu",
                       "normalize_amp_obs": amp_norm is not None}

    state = {}
    for key, value in model_state.items():
        for ase_prefix, our_prefix in ASE_RENAMES.items():
            if key.startswith(ase_prefix) and (disc_config is not None or not our_prefix.startswith("discriminator")):
                state[our_prefix + key[len(ase_prefix):]] = value
    state.update({f"obs_normalizer.{k}": v for k, v in obs_norm.items()})
    if amp_norm is not None:
        state.update({f"amp_normalizer.{k}": v for k, v in amp_norm.items()})

    def name_of(key):  # our state-dict key -> the entry in the ASE file
        prefix, _, rest = key.partition(".")
        if prefix == "obs_normalizer":
            return obs_norm_where.format(rest)
        if prefix == "amp_normalizer":
            return f"amp_input_mean_std[{rest!r}]"
        ase_prefix = next(ase for ase, ours in ASE_RENAMES.items() if key.startswith(ours))
        return f"model[{ase_prefix + key[len(ASE_RENAMES[ase_prefix]):]!r}]"

    model = build_checked(path, arch, disc_config, state, name_of, exact_dtype=False)
    model.metadata = {"rl_games_layout": layout}
    for key in ("epoch", "frame"):
        if isinstance(checkpoint.get(key), (int, float)):
            model.metadata[key] = checkpoint[key]
    if ase_config is not None:
        model.metadata["ase_config"] = str(ase_config)
    return model


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def numpy_scalar_globals():
    """numpy scalars and dtypes for weights_only loading: rl_games >= 1.3 saves last_mean_rewards as a numpy
    float. Allowing these rebuilds plain numbers and runs no code; every other global stays refused."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtype_classes = {type(np.dtype(code)) for code in ("b1", "i1", "i2", "i4", "i8", "u1", "f2", "f4", "f8")}
    # files written under numpy 1.x name the scalar rebuilder numpy.core.multiarray.scalar
    return [core.multiarray.scalar, (core.multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *dtype_classes]


STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
GLOBAL_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# what torch.save itself and rl_games' numpy scalars refer to: not "pickled Python objects" in a message
CHECKPOINT_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "numpy.core.multiarray.scalar",
                      "numpy._core.multiarray.scalar", "numpy.dtype")


def pickle_globals(stream):
    """('module.name' of every global one pickle refers to, whether it ended cleanly), read from `stream`
    with pickletools: nothing is imported or run. Stops at the pickle's end or its first damaged byte."""
    names, recent, memo = [], [None, None], {}  # recent: the last two values pushed, when they are strings
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(str(part) for part in recent))
                recent = [None, None]
            if op.name in STRING_OPS:
                recent = [recent[1], arg]
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                recent = [recent[1], memo.get(arg)]
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = recent[1]
            elif op.name == "MEMOIZE":
                memo[len(memo)] = recent[1]
            elif op.stack_after and op.name not in ("GLOBAL", "STACK_GLOBAL"):
                recent = [recent[1], None]
    except Exception:  # not (or no more) pickle data
        return names, False
    return names, True


def pickled_globals(path):
    """'module.name' of every global the pickles in `path` refer to: those in a torch.save zip, or the
    pickles at the start of a legacy file (several in a row, then raw storages)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
        else:
            with open(path, "rb") as f:
                streams = [f.read()]
    except Exception:  # unreadable: nothing to report
        return []
    names = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pickletools on damaged string escapes
        for data in streams:
            stream = io.BytesIO(data)
            for _ in range(8):
                found, complete = pickle_globals(stream)
                names += found
                if not complete or stream.tell() >= len(data):
                    break
    return [name for name in names if GLOBAL_NAME.fullmatch(name)]


def refused_objects(path, error):
    """The Python objects (module.name) that made weights_only loading refuse `path`, or [] when the
    refusal was about corrupt bytes rather than pickled objects."""
    named = re.findall(r"GLOBAL ([\w.]+)", str(error))
    if named:
        return named[:1]
    return [name for name in pickled_globals(path) if not name.startswith(CHECKPOINT_GLOBALS)][:3]


def corrupt(path, detail):
    return LLCCheckpointError(f"{path}: not a readable torch checkpoint: the file is corrupt (truncated, damaged, "
                              f"random bytes, or not written by torch.save): {detail}")


def check_zip_members(path):
    """A torch.save zip whose members fail their CRC-32 was damaged after it was written: refuse it."""
    try:
        if not zipfile.is_zipfile(path):
            return  # a legacy (pre-zip) torch file, or not a torch file at all: torch.load decides
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as error:  # BadZipFile, zlib.error, EOFError, NotImplementedError, ...
        raise corrupt(path, f"a damaged zip archive ({type(error).__name__}: {error})") from error
    if bad is not None:
        raise corrupt(path, f"the zip member {bad!r} fails its CRC-32 check")


def read_checkpoint(path):
    """torch.load(path, weights_only=True) on the CPU, every failure turned into an LLCCheckpointError that
    names the file: it does not exist, is a directory or not a regular file, cannot be read, is corrupt
    (truncated, random bytes, a zip member failing its CRC-32), or holds pickled Python objects, which are
    refused without running anything in them."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as error:
        raise LLCCheckpointError(f"{path}: does not exist (no such file or directory)") from error
    except OSError as error:
        raise LLCCheckpointError(f"{path}: cannot be read: {os_reason(error)}") from error
    if stat.S_ISDIR(mode):
        raise LLCCheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if not stat.S_ISREG(mode):
        raise LLCCheckpointError(f"{path}: is not a regular file (a pipe, socket or device), expected a checkpoint file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise LLCCheckpointError(f"{path}: cannot be read: {os_reason(error)}") from error
    check_zip_members(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(numpy_scalar_globals()):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = refused_objects(path, error)
        if refused:
            module, _, name = refused[0].rpartition(".")
            # looked up without importing or calling anything: only modules this process already has
            exists = module in sys.modules and name in vars(sys.modules[module])
            damaged = "" if exists else (f" (or is corrupt: {refused[0]} does not exist here, so the name itself may be "
                                         f"damaged)")
            raise LLCCheckpointError(
                f"{path}: holds pickled Python objects ({', '.join(refused)}), not only tensors and plain values"
                f"{damaged}; checkpoints are read with torch.load(weights_only=True), so it is refused and nothing in "
                f"it was run. Re-save the state dicts as plain dicts of tensors.") from error
        raise corrupt(path, "neither a torch.save zip nor a readable pickle") from error
    except Exception as error:  # zip errors, truncated files, random bytes: torch raises many kinds
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise corrupt(path, f"{type(error).__name__}: {first_line}") from error


def check_storages_used(path, checkpoint):
    """torch.save writes the data of each storage its tensors use, and no other: a data record that no
    tensor uses means a tensor was pointed at another one's data (a damaged storage reference)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = sum(1 for name in archive.namelist() if re.search(r"/data/\d+$", name))
    except (zipfile.BadZipFile, OSError):
        return  # a legacy file: its storages are inline, there is nothing to count
    storages = set()

    def collect(value):
        if torch.is_tensor(value):
            storages.add(value.untyped_storage()._cdata)
        elif isinstance(value, (torch.UntypedStorage, torch.TypedStorage)):
            storages.add(value._cdata)
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                collect(item)

    collect(checkpoint)
    if len(storages) < records:
        raise corrupt(path, f"{records - len(storages)} of its {records} tensor data records are used by no tensor "
                            f"(a damaged storage reference)")


def llc_from_checkpoint(path, checkpoint, ase_config):
    if not isinstance(checkpoint, Mapping):
        raise LLCCheckpointError(f"{path}: holds a {type(checkpoint).__name__}, expected a dict checkpoint. "
                                 f"Layouts tried: {LAYOUTS_TRIED}")
    if "format" in checkpoint:
        if checkpoint["format"] != FORMAT_NAME:
            raise LLCCheckpointError(f"{path}: format {describe_value(checkpoint['format'])}, expected {FORMAT_NAME!r}")
        model = load_native(path, checkpoint)
        model.source_format = "native"
        if ase_config is not None:
            config = read_ase_config(path, ase_config)
            if config["latent_dim"] != model.latent_dim:
                raise LLCCheckpointError(f"{path}: latent size {model.latent_dim} does not match latent_dim "
                                         f"{config['latent_dim']} in {ase_config}")
    elif isinstance(checkpoint.get("model"), Mapping):
        model = load_rl_games(path, checkpoint, ase_config)
        model.source_format = "rl_games"
    else:
        raise LLCCheckpointError(f"{path}: unknown checkpoint layout. Top-level keys: "
                                 f"{sorted(map(str, checkpoint))}. Layouts tried: {LAYOUTS_TRIED}")
    return model


def load_llc(path, device="cpu", ase_config=None):
    """Load a frozen LLC from a native or an ASE/rl_games checkpoint; ase_config: optional ASE LLC yaml.
    Any checkpoint that cannot be used raises LLCCheckpointError naming the file (see read_checkpoint,
    load_native, build_checked); its weights and normaliser statistics are checked to be finite."""
    path = os.fspath(path)
    checkpoint = read_checkpoint(path)
    try:
        check_storages_used(path, checkpoint)
        model = llc_from_checkpoint(path, checkpoint, ase_config)
    except LLCCheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, RuntimeError, OverflowError) as error:
        # a structure no check above foresaw: still the file's fault, said as such
        raise LLCCheckpointError(f"{path}: malformed LLC checkpoint: {type(error).__name__}: {error}") from error
    model.source_path = path
    return model.to(device).freeze()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print what LLC checkpoints hold (no simulator needed).")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="native or ASE / rl_games LLC checkpoint")
    parser.add_argument("--ase-config", default=None, help="ASE LLC yaml to cross-check the latent size against")
    args = parser.parse_args()
    failed = False
    for i, path in enumerate(args.paths):
        try:
            print(("\n" if i else "") + load_llc(path, ase_config=args.ase_config).describe())
        except LLCCheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)
