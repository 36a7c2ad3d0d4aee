"""Fake `isaacgym` for tests: like Isaac Gym Preview 4, it refuses to load after torch."""
import sys

if "torch" in sys.modules:
    raise ImportError("PyTorch was imported before isaacgym modules. Please import torch after isaacgym modules.")
