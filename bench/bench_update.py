"""The PPO update on the CPU with and without subnormal floats in the optimiser state.

A ReLU unit that stops firing (a dead unit) gives its outgoing weights exactly zero gradients; Adam's
first moment of those weights then decays by beta1 = 0.9 per step and spends about 150 steps in the
subnormal range (|x| < 1.2e-38) on its way to zero, where every CPU operation on it is 10-100 times
slower. A flat humanoid run accumulates hundreds of such weights. The trainer flushes subnormals
to zero on the CPU (`hrl_ppo_continuous.flush_denormals_on_cpu`). This benchmark times one `ppo_update` of the
trainer (humanoid sizes: 228 observations, 28 actions, [1024, 512] networks, 64 envs x 32 steps,
6 epochs x 8 minibatches) in three states, in the same run:
    reference     no dead units: nothing subnormal
    dead units    a fraction of the critic's first-layer units dead, their outgoing weights' Adam
                  first moments subnormal, with the trainer's CPU setting (as the trainer runs)
    unflushed     the same state without flushing subnormals: the cost the setting removes
`dead / reference` near 1 is the expected result; a value well above 1 is a regression.

    python bench/bench_update.py --dead-fraction 0.25
"""

import argparse
import os
import sys
import time

import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from bench.bench_sim import cpu_model_name  # noqa: E402
from hrl_ppo_continuous import Agent, Args, RolloutStorage, flush_denormals_on_cpu, update_policy  # noqa: E402

OBS, ACTIONS, NUM_ENVS, NUM_STEPS = 228, 28, 64, 32  # the flat humanoid on the heading task
SUBNORMAL = 1e-40  # float32 subnormal


def make_update(dead_fraction: float, seed: int = 0):
    """Agent, optimiser and one rollout batch; the chosen critic units dead with subnormal Adam state."""
    torch.manual_seed(seed)
    args = Args()
    agent = Agent(OBS, ACTIONS, args.hidden_sizes, args.init_log_std)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate, eps=1e-8)
    batch = NUM_ENVS * NUM_STEPS
    b_obs = torch.randn(batch, OBS)
    with torch.no_grad():
        b_actions, b_logprobs, _, _, _ = agent.get_action_and_value(b_obs)
    b_returns = torch.randn(batch)
    storage = RolloutStorage(b_obs[None], b_actions[None], b_logprobs[None], torch.zeros(1, batch), torch.zeros(1, batch),
                             (b_returns + 0.1 * torch.randn(batch))[None], torch.zeros(1, batch), torch.zeros(1, batch))
    data = (storage, torch.randn(1, batch), b_returns[None])
    update_policy(agent, optimizer, *data, args, batch // args.num_minibatches)  # creates Adam's state
    first_layer, second_layer = agent.critic[0], agent.critic[2]
    dead = torch.rand(first_layer.out_features) < dead_fraction
    with torch.no_grad():
        first_layer.bias[dead] = -1e4  # never fires: zero gradient to the weights it feeds
        optimizer.state[second_layer.weight]["exp_avg"][:, dead] = SUBNORMAL
    return lambda: update_policy(agent, optimizer, *data, args, batch // args.num_minibatches)


def time_update(update, flush: bool) -> float:
    torch.set_flush_denormal(flush)
    start = time.perf_counter()
    update()
    elapsed = time.perf_counter() - start
    torch.set_flush_denormal(False)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dead-fraction", type=float, default=0.25, help="fraction of dead critic units")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer_flushes = flush_denormals_on_cpu(torch.device("cpu"))
    torch.set_flush_denormal(False)
    reference = time_update(make_update(0.0), flush=trainer_flushes)
    dead = time_update(make_update(args.dead_fraction), flush=trainer_flushes)
    unflushed = time_update(make_update(args.dead_fraction), flush=False)
    print(f"CPU {cpu_model_name()}, torch {torch.__version__} with {torch.get_num_threads()} threads; one PPO update "
          f"of {NUM_ENVS * NUM_STEPS} transitions, humanoid sizes, {args.dead_fraction:.0%} of the critic's first-layer "
          f"units dead; trainer flushes subnormals: {trainer_flushes}")
    print("| state | update (s) | / reference |")
    print("|-|-|-|")
    for name, seconds in (("reference (no dead units)", reference), ("dead units, trainer's setting", dead),
                          ("dead units, subnormals not flushed", unflushed)):
        print(f"| {name} | {seconds:.2f} | {seconds / reference:.2f} |")


if __name__ == "__main__":
    main()
