"""Load, save and build a frozen low-level controller (LLC).

An LLC maps (proprioceptive observation, latent z) to joint actions. The high-level policy of
`hrl_ppo_continuous.py` picks z; the LLC is frozen and only evaluated.

Two checkpoint formats load with `load_llc(path)`:
- native ("hrl-llc"): one file written by `save_llc`, e.g. by `llc_pretrain.py`;
- ASE / rl_games: the `.pth` file an ASE LLC training run writes (rl_games 1.1 layout, where the
  observation normaliser is the top-level `running_mean_std`, and the rl_games >= 1.3 layout,
  where it lives inside `model` as `running_mean_std.*`). Sizes are read from tensor shapes.

Both are read with `torch.load(..., weights_only=True)`: tensors and plain Python values only,
never arbitrary pickled objects.

    python llc.py path/to/llc.pth [more.pth ...] [--ase-config ase_humanoid_hrl.yaml]   # what is inside
"""

import argparse
import datetime
import math
import os
import pickle
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_NAME = "hrl-llc"
FORMAT_VERSION = 1
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
        x = x.reshape(-1, *self.running_mean.shape).double()
        batch_count = x.shape[0]
        # unbiased batch variance as rl_games computes it; a batch of one has no spread to add
        batch_var, batch_mean = torch.var_mean(x, dim=0, correction=1 if batch_count > 1 else 0)
        self.merge(batch_mean, batch_var, batch_count)

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
    """Write `model` (a LowLevelController) in the native format, atomically.

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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # write next to the target, then rename: a crash never leaves a half-written checkpoint at `path`
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_native(path, checkpoint):
    version = checkpoint.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise LLCCheckpointError(f"{path}: native LLC format version {version!r}; this llc.py reads versions "
                                 f"1..{FORMAT_VERSION} (a newer file needs a newer llc.py)")
    arch = checkpoint.get("arch")
    if not isinstance(arch, Mapping) or arch.get("name") not in ARCHS:
        found = arch.get("name") if isinstance(arch, Mapping) else arch
        raise LLCCheckpointError(f"{path}: architecture {found!r} is not one of {ARCHS}")
    disc = checkpoint.get("discriminator")
    try:
        disc_config = None
        if disc is not None:
            disc_config = {key: disc[key] for key in ("amp_obs_dim", "hidden", "activation")}
            disc_config["normalize_amp_obs"] = disc.get("amp_normalizer") is not None
        model = LowLevelController(arch, disc_config)
        model.actor.load_state_dict(checkpoint["actor"])
        model.obs_normalizer.load_state_dict(checkpoint["obs_normalizer"])
        if disc is not None:
            model.discriminator.load_state_dict(disc["weights"])
            if model.amp_normalizer is not None:
                model.amp_normalizer.load_state_dict(disc["amp_normalizer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise LLCCheckpointError(f"{path}: native LLC checkpoint is inconsistent with its architecture "
                                 f"{dict(arch)}: {error}") from error
    model.metadata = dict(checkpoint.get("metadata") or {})
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


def linear_chain(path, model_state, prefix):
    """Weights of the Linear layers '{prefix}{i}.weight' in index order, checked to chain."""
    indices = sorted(int(key[len(prefix):].split(".")[0]) for key in model_state
                     if key.startswith(prefix) and key.endswith(".weight"))
    weights = [model_state[f"{prefix}{i}.weight"] for i in indices]
    for i, (prev, curr) in enumerate(zip(weights[:-1], weights[1:])):
        if curr.shape[1] != prev.shape[0]:
            raise LLCCheckpointError(f"{path}: layer {prefix}{indices[i + 1]}.weight has {curr.shape[1]} inputs but "
                                     f"the previous layer has {prev.shape[0]} outputs")
    return weights


def read_normalizer(path, state, prefix, what):
    """{running_mean, running_var, count} from keys '{prefix}running_mean', ... or None if absent."""
    if f"{prefix}running_mean" not in state:
        return None
    missing = [k for k in NORMALIZER_KEYS if f"{prefix}{k}" not in state]
    if missing:
        raise LLCCheckpointError(f"{path}: {what} normaliser '{prefix}' lacks {missing}")
    return {k: state[f"{prefix}{k}"] for k in NORMALIZER_KEYS}


def read_ase_config(path, config_path):
    """ASE's LLC yaml (e.g. ase_humanoid_hrl.yaml): latent size and network settings, for cross-checks."""
    import yaml

    try:
        with open(config_path) as f:
            config = yaml.safe_load(f)
    except OSError as error:
        raise LLCCheckpointError(f"{config_path} (ASE config for {path}): cannot read it: {error}") from error
    except yaml.YAMLError as error:
        raise LLCCheckpointError(f"{config_path} (ASE config for {path}): not valid YAML: {error}") from error
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


ASE_REQUIRED = (f"{ASE_ACTOR}_style_mlp.0.weight", f"{ASE_ACTOR}_style_dense.weight",
                f"{ASE_ACTOR}_dense_layers.0.weight", "a2c_network.mu.weight")


def load_rl_games(path, checkpoint, ase_config=None):
    model_state = checkpoint["model"]
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
    style_dense = model_state[f"{ASE_ACTOR}_style_dense.weight"]
    mu = model_state["a2c_network.mu.weight"]
    style_dim = style_dense.shape[0]
    latent_dim = style_layers[0].shape[1]
    obs_dim = dense_layers[0].shape[1] - style_dim
    layout = "rl_games >= 1.3" if "running_mean_std.running_mean" in model_state else "rl_games 1.1"
    obs_norm = read_normalizer(path, model_state, "running_mean_std.", "observation")
    if obs_norm is None and isinstance(checkpoint.get("running_mean_std"), Mapping):
        obs_norm = read_normalizer(path, checkpoint["running_mean_std"], "", "observation")
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
    if "a2c_network._disc_mlp.0.weight" in model_state and "a2c_network._disc_logits.weight" in model_state:
        disc_layers = linear_chain(path, model_state, "a2c_network._disc_mlp.")
        amp_obs_dim = disc_layers[0].shape[1]
        # ASE and IsaacGymEnvs keep the AMP normaliser at the top level in both rl_games layouts
        if isinstance(checkpoint.get("amp_input_mean_std"), Mapping):
            amp_norm = read_normalizer(path, checkpoint["amp_input_mean_std"], "", "AMP observation")
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
    try:
        model = LowLevelController(arch, disc_config)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as error:
        raise LLCCheckpointError(f"{path}: ASE LLC weights do not fit the architecture inferred from them "
                                 f"({arch}): {error}") from error
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


def read_checkpoint(path):
    """torch.load with weights_only=True, turning every failure into an LLCCheckpointError."""
    if not os.path.exists(path):
        raise LLCCheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LLCCheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        with torch.serialization.safe_globals(numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if refused:
            raise LLCCheckpointError(
                f"{path}: holds pickled Python objects ({refused.group(1)}), not only tensors and plain values; "
                f"LLC checkpoints are read with torch.load(weights_only=True) and arbitrary objects are never "
                f"unpickled. Re-save the state dicts as plain dicts of tensors.") from error
        raise LLCCheckpointError(f"{path}: not a torch checkpoint (random or corrupt bytes: it is neither a "
                                 f"torch.save zip nor a readable pickle)") from error
    except Exception as error:  # zip errors, truncated files, random bytes: torch raises many kinds
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise LLCCheckpointError(f"{path}: not a readable torch checkpoint (file truncated or not written by "
                                 f"torch.save): {type(error).__name__}: {first_line}") from error


def load_llc(path, device="cpu", ase_config=None):
    """Load a frozen LLC from a native or an ASE/rl_games checkpoint; ase_config: optional ASE LLC yaml."""
    path = os.fspath(path)
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, Mapping):
        raise LLCCheckpointError(f"{path}: holds a {type(checkpoint).__name__}, expected a dict checkpoint. "
                                 f"Layouts tried: {LAYOUTS_TRIED}")
    if "format" in checkpoint:
        if checkpoint["format"] != FORMAT_NAME:
            raise LLCCheckpointError(f"{path}: format {checkpoint['format']!r}, expected {FORMAT_NAME!r}")
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
