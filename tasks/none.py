"""No task: zero task observation, zero reward (for LLC pre-training and skill evaluation)."""

import torch

NAME = "none"
TASK_OBS_SIZE = 0
DEFAULT_PARAMS = {}


def make_state(num_envs, device, params, control_dt):
    return {}


def reset(state, root, reset_mask, generator):
    pass


def update(state, root, generator):
    pass


def observe(state, root):
    return root["pos"].new_zeros(root["pos"].shape[0], 0)


def reward(state, root):
    return root["pos"].new_zeros(root["pos"].shape[0])
