"""The scripts start torch's OpenMP threads waiting passively (no spinning between operations), unless
the user chose a policy: libgomp itself reports the spin count it runs with (OMP_DISPLAY_ENV)."""
import os
import re
import subprocess
import sys

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
import openmp_policy  # noqa: E402


def libgomp_spin_count(script, **env_overrides):
    """GOMP_SPINCOUNT as libgomp read it when `script --help` loaded torch."""
    env = {name: value for name, value in os.environ.items() if name not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **env_overrides)
    result = subprocess.run([sys.executable, os.path.join(REPO_DIR, script), "--help"], cwd=REPO_DIR, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", result.stderr)
    assert found, f"libgomp printed no settings:\n{result.stderr[-2000:]}"
    return int(found.group(1))


@pytest.mark.parametrize("script", ["hrl_ppo_continuous.py", "llc_pretrain.py"])
def test_scripts_start_torch_threads_passive_and_keep_the_users_policy(script):
    assert libgomp_spin_count(script) == 0  # passive: a thread sleeps as soon as its share is done
    assert libgomp_spin_count(script, OMP_WAIT_POLICY="ACTIVE") > 300_000  # the user's choice: spin


def test_wait_passively_sets_only_an_unset_policy():
    environ = {}
    assert openmp_policy.wait_passively(environ) == "PASSIVE" and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert openmp_policy.wait_passively(environ) == "ACTIVE" and environ == {"OMP_WAIT_POLICY": "ACTIVE"}
