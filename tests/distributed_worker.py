"""One rank of tests/test_distributed.py's equality test, run under torchrun (2 processes, gloo, CPU).

Every rank builds the same fixed PPO problem (make_problem), keeps its own half of the envs, and runs the
trainer's update_policy on it: rank 0's weights are broadcast, gradients averaged over the ranks, the
value and observation normalisers merged. Each rank also merges its own block of samples into a fresh
normaliser (as llc_pretrain.py's rollout does every control step). It writes its state to OUT/rank{r}.pt
(this is a test: every rank writes, so that the test can compare them).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT
"""

import os
import sys

import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
import distributed  # noqa: E402
import hrl_ppo_continuous as hrl  # noqa: E402
from llc import RunningMeanStd  # noqa: E402

OBS, ACTIONS, NUM_STEPS, NUM_ENVS = 6, 3, 4, 8  # NUM_ENVS over all ranks
ARGS = hrl.Args(num_minibatches=2, update_epochs=3, learning_rate=1e-3, hidden_sizes=(16, 16), max_grad_norm=0.5,
                norm_adv=False)  # see test_distributed.py for why advantages are not normalised here
INIT_SEED, PERMUTATION_SEED = 100, 7


def make_agent(seed: int):
    torch.manual_seed(seed)
    return hrl.Agent(OBS, ACTIONS, ARGS.hidden_sizes, ARGS.init_log_std).double()


def make_problem():
    """The agent (initialised with INIT_SEED) and one fixed rollout of NUM_ENVS envs, in float64."""
    agent = make_agent(INIT_SEED)
    generator = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn((NUM_STEPS, NUM_ENVS, *shape), generator=generator, dtype=torch.float64)

    obs, actions = 3.0 * randn(OBS) + 1.0, 0.3 * randn(ACTIONS)
    with torch.no_grad():
        _, logprobs, _, _, _ = agent.get_action_and_value(obs.reshape(-1, OBS), actions.reshape(-1, ACTIONS))
    dones = (torch.rand((NUM_STEPS, NUM_ENVS), generator=generator) < 0.2).double()
    storage = hrl.RolloutStorage(obs, actions, logprobs.reshape(NUM_STEPS, NUM_ENVS), randn(), dones, 2.0 * randn(),
                                 2.0 * randn(), torch.zeros(NUM_STEPS, NUM_ENVS, dtype=torch.float64))
    samples = 5.0 * torch.randn(40, OBS, generator=generator, dtype=torch.float64) - 2.0
    return agent, storage, samples


def split(storage: hrl.RolloutStorage, rank: int, world_size: int) -> hrl.RolloutStorage:
    """This rank's envs (a contiguous block of the env dimension)."""
    per_rank = NUM_ENVS // world_size
    return hrl.RolloutStorage(*(field[:, rank * per_rank : (rank + 1) * per_rank] for field in storage))


def update(agent, storage: hrl.RolloutStorage) -> dict:
    """GAE, then the trainer's update_policy, with the minibatch permutations drawn from PERMUTATION_SEED."""
    advantages, returns = hrl.compute_gae(storage.rewards, storage.values, storage.next_values, storage.dones,
                                          ARGS.gamma, ARGS.gae_lambda)
    optimizer = hrl.make_optimizer(agent, ARGS)
    torch.manual_seed(PERMUTATION_SEED)
    batch_size = storage.rewards.numel()
    return hrl.update_policy(agent, optimizer, storage, advantages, returns, ARGS, batch_size // ARGS.num_minibatches)


if __name__ == "__main__":
    assert distributed.setup(torch.device("cpu"))
    rank, world_size = distributed.rank(), distributed.world_size()
    agent, storage, samples = make_problem()
    agent = make_agent(INIT_SEED + rank)  # different weights on every rank until the broadcast
    distributed.broadcast_from_main(agent)
    update(agent, split(storage, rank, world_size))
    normalizer = RunningMeanStd((OBS,))
    per_rank = samples.shape[0] // world_size
    distributed.update_normalizer(normalizer, samples[rank * per_rank : (rank + 1) * per_rank])
    torch.save({"agent": agent.state_dict(), "normalizer": normalizer.state_dict()},
               os.path.join(sys.argv[1], f"rank{rank}.pt"))
    distributed.finish()
