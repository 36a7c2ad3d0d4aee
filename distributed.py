"""Several processes (GPUs, machines) with torchrun: the few collective steps both training scripts share.

Launched by `torchrun` (which sets RANK, WORLD_SIZE and LOCAL_RANK), every process is one rank: it
simulates its own --num-envs worlds on its own device (cuda:{LOCAL_RANK} with NCCL, or the CPU with
gloo) and keeps a full copy of the networks. The ranks stay identical by construction: rank 0's initial
weights are broadcast, each minibatch's gradients are averaged over the ranks (one flat all-reduce),
and the running normalisers merge every rank's batch, so every rank takes the same optimiser step and
normalises the same way. Once per iteration one all-reduce gathers the logged figures and the stop
flag (SIGTERM or Ctrl-C on any rank). Rank 0 alone writes files and prints; the other ranks' stdout
goes to /dev/null (their errors still reach stderr).

Without torchrun none of this does anything: no process group is created, every function below
returns at once or calls the one-process code, and the scripts compute exactly what they computed
before (bit for bit).
"""

import datetime
import os
import random
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 300.0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank() -> int:
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def world_size() -> int:
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def local_rank() -> int:
    """This process's GPU index on its machine (0 without torchrun)."""
    return int(os.environ["LOCAL_RANK"]) if launched_by_torchrun() else 0


def is_main() -> bool:
    """Rank 0: the process that writes TensorBoard, W&B, checkpoints and videos (the only one without torchrun)."""
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join torchrun's process group (NCCL for a CUDA device, gloo for the CPU); nothing without torchrun.

    A collective that waits more than timeout_s seconds for another rank (dead, or stalled) raises,
    and the process exits with a message that says so instead of hanging. Returns whether a process
    group was created."""
    if not launched_by_torchrun() or active():
        return active()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    previous_hook = sys.excepthook

    def exit_on_collective_failure(exc_type, exc, tb):
        """A collective that failed or timed out: a clear message, then exit at once (a clean shutdown
        of the process group could wait on the lost rank)."""
        in_collective = any("distributed_c10d" in frame.filename for frame in traceback.extract_tb(tb)[-3:])
        if not (issubclass(exc_type, dist.DistError) or (issubclass(exc_type, RuntimeError) and in_collective)):
            return previous_hook(exc_type, exc, tb)
        traceback.print_exception(exc_type, exc, tb)
        print(f"error: rank {rank()} of {world_size()}: a collective operation failed ({exc_type.__name__}): another "
              f"rank has died, or has not reached it within the timeout ({timeout_s:.0f} s, --dist-timeout). Every rank "
              "stops; the last checkpoint written by rank 0 is intact (written atomically).", file=sys.stderr, flush=True)
        os._exit(1)

    sys.excepthook = exit_on_collective_failure
    return True


def seed(base_seed: int) -> int:
    """The seed of this rank: base_seed + rank (base_seed without torchrun)."""
    return base_seed + rank()


def reseed_other_ranks(base_seed: int, iteration: int):
    """On resume: every rank restored rank 0's saved random streams; ranks > 0 start fresh ones of their own."""
    if rank() > 0:
        rank_seed = base_seed + rank() + 1_000_003 * iteration
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        torch.manual_seed(rank_seed)


def broadcast_from_main(*items):
    """Overwrite, on every rank, the parameters and buffers of modules (or plain tensors) with rank 0's."""
    if not active():
        return
    for item in items:
        for tensor in item.state_dict().values() if isinstance(item, nn.Module) else [item.data]:
            dist.broadcast(tensor, src=0)


def broadcast_object(obj):
    """Rank 0's value of a picklable object (a run name, ...), on every rank."""
    if not active():
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def all_reduce_gradients(optimizer: torch.optim.Optimizer):
    """Average the gradients of the optimiser's parameters over the ranks: one flat all-reduce.

    Called between loss.backward() and gradient clipping / optimizer.step(), so every rank clips and
    steps with the gradient of the loss over all ranks' minibatches (for equal minibatch sizes, the
    mean-reduced loss's gradient over their union)."""
    if not active():
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A scalar averaged over the ranks (e.g. the approximate KL that stops the epochs early on every rank at once)."""
    if not active():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def update_normalizer(normalizer, x: torch.Tensor):
    """normalizer.update(x) with the batches of all ranks merged: every rank's RunningMeanStd ends identical,
    equal (up to float64 rounding) to one process's update with all ranks' samples.

    Each rank's (count, mean, sum of squared deviations) of its finite samples (RunningMeanStd.batch_moments)
    is all-gathered and combined in rank order (Chan et al.'s parallel formula), then merged as one batch
    with its unbiased variance."""
    if not active():
        normalizer.update(x)
        return
    shape = normalizer.running_mean.shape
    count, mean, var = normalizer.batch_moments(x)
    local = torch.cat([count.reshape(1), mean.reshape(-1), (var * (count - 1).clamp_min(1)).reshape(-1)])
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    stats = torch.stack(gathered)
    size = mean.numel()
    counts, means, squares = stats[:, :1], stats[:, 1 : 1 + size], stats[:, 1 + size :]
    total = counts.sum()
    batch_mean = (counts * means).sum(0) / total.clamp_min(1.0)  # no finite sample on any rank: nothing to add
    m2 = squares.sum(0) + (counts * (means - batch_mean) ** 2).sum(0)
    batch_var = m2 / (total - 1).clamp_min(1.0)  # unbiased, as RunningMeanStd.update (one sample: no spread)
    normalizer.merge(batch_mean.reshape(shape), batch_var.reshape(shape), total)


def reduce_iteration(totals: torch.Tensor, means: torch.Tensor, stop: bool):
    """The one logging sync of an iteration: `totals` summed over the ranks (episode counts and return
    sums), `means` averaged over them (losses, mean rewards), and whether any rank was asked to stop.
    Returns (totals, means, stop); without torchrun, the arguments unchanged."""
    if not active():
        return totals, means, stop
    packed = torch.cat([totals.float(), means.float(), torch.tensor([float(stop)], device=totals.device)])
    dist.all_reduce(packed)
    num_totals = totals.numel()
    return packed[:num_totals], packed[num_totals:-1] / world_size(), bool(packed[-1] > 0)


class NoWriter:
    """What ranks other than 0 get instead of a SummaryWriter: writes nothing."""

    def add_scalar(self, *args, **kwargs):
        pass

    def add_text(self, *args, **kwargs):
        pass

    def close(self):
        pass


def summary_writer(log_dir: str, **kwargs):
    """A TensorBoard SummaryWriter(log_dir, **kwargs) on rank 0, a NoWriter on the other ranks."""
    if not is_main():
        return NoWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir, **kwargs)


def finish():
    """Leave the process group at the end of a run (nothing without torchrun)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
