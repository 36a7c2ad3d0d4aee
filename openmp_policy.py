"""How torch's CPU threads wait between parallel operations: set before torch is imported.

torch runs its CPU operations on an OpenMP thread team (libgomp on Linux). By default a thread that
has finished its share of an operation spins for about 300,000 iterations before it sleeps, so
between the many small operations of a rollout or a PPO update the second thread keeps its core
busy. On a machine whose cores are all in use (the simulator on the main thread or C MuJoCo's
threads, another job), the spinning thread takes a core the others need, and every operation waits
at its end for a thread that the scheduler has set aside. Measured on a 2-core machine shared with
other jobs (load 5.6-6.4), flat humanoid, 64 worlds x 32 steps, MuJoCo Warp on the CPU, 2 torch
threads: one PPO update 41-64 s and one rollout 21 s with the default policy, against 3.7-5.2 s and
4-5 s with OMP_WAIT_POLICY=PASSIVE (threads sleep at once); 1 torch thread: 3.1-3.8 s and 4.7 s.
Whole flat humanoid runs (same machine, load 3.9-5.0, 2 torch threads), passive against default:
277-280 against 100-103 simulator steps/s on MuJoCo Warp, 408-448 against 163-189 on C MuJoCo.
`bench/bench_update.py --neighbours 1` measures it.

libgomp reads its settings once, when torch loads it, so the scripts call `wait_passively` before
their first `import torch`; a policy set in the environment by the user is kept.
"""

import os

POLICY_VARIABLE = "OMP_WAIT_POLICY"
SCRIPTS_POLICY = "PASSIVE"


def wait_passively(environ=os.environ) -> str:
    """OMP_WAIT_POLICY=PASSIVE in `environ` unless a policy is set there already; returns the policy
    in effect. Acts on torch only when called before torch is first imported in the process."""
    return environ.setdefault(POLICY_VARIABLE, SCRIPTS_POLICY)
