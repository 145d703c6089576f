"""One code path from 1 to N processes: the same seed gives the same training on 1, 2 or 4 devices.

    python train.py ...                                          # one process, no process group
    torchrun --standalone --nproc_per_node=4 train.py ...        # four, NCCL on CUDA, gloo on the CPU

What train.py keeps global, and how (so that every rank holds what one process would hold):
- features of the training set: each rank extracts a contiguous share of the rows, `gather_rows` puts
  them back in row order, so every rank holds the same [N_v, D] and [N_r, D] tensors;
- pseudo-labels: clustering and label transfer are exact but not cheap (dense products, Sinkhorn), and
  need the whole feature matrix; they run once, on rank 0, and `on_rank_zero` sends the labels and soft
  labels to every rank (an error there stops every rank with its message);
- batches: the samplers are pure functions of (seed, epoch, labels), so every rank draws the same global
  batch and keeps its contiguous share of the positions; augmentations are seeded per global position;
- memory banks: updated on every rank from the all-gathered batch features and labels, in global position
  order (`gather_rows`), so they stay equal to the one-process banks;
- BatchNorm: `GlobalBatchNorm` normalises with the statistics of the whole global batch (an autograd-aware
  all-gather of every rank's per-channel statistics), the modality stems' BN included; gloo and NCCL alike;
- losses: per-sample means over equal shares, so DDP's average of the gradients is the one-process
  gradient; a loss that is not a per-sample mean (MBMIL's clamped centroid term) takes `global_mean`.
Differences left: floating-point reduction order (sums over other partitions of the batch, convolution
algorithms picked per batch size), far below the tolerances tests/test_distributed.py checks.
Imports torch and the standard library only.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self):
        return self.rank == 0


def setup(device, timeout_s=1800):
    """The process group when launched by torchrun (WORLD_SIZE > 1), else a world of one; once per process
    (a second call returns the same world). device: the --device asked for; under torchrun a CUDA device
    becomes cuda:LOCAL_RANK."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, size, device)


def share(n, world):
    """Rows [lo, hi) of n that rank `world.rank` takes: contiguous, in rank order."""
    lo = n * world.rank // world.size
    return lo, n * (world.rank + 1) // world.size


def gather_rows(x, world):
    """The rows every rank holds, concatenated in rank order: [sum of n_r, ...] on every rank."""
    if world.size == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world.size)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def on_rank_zero(world, fn, *args, **kwargs):
    """fn(*args, **kwargs) computed on rank 0 only, its result sent to every rank (tensors travel on the CPU and
    come back on this rank's device). If fn raises on rank 0, every rank stops: rank 0 with its own error, the
    others with a RuntimeError naming it."""
    if world.size == 1:
        return fn(*args, **kwargs)
    payload = [None]
    if world.main:
        try:
            payload = [("ok", _to(fn(*args, **kwargs), "cpu"))]
        except BaseException as err:       # tell the others before stopping
            dist.broadcast_object_list([("error", f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise RuntimeError(f"rank 0 stopped, so rank {world.rank} stops too: {value}")
    return _to(value, world.device)


def mean_over_ranks(value, world):
    """The mean of a float over the ranks (for logging the global batch's loss)."""
    if world.size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return float(t) / world.size


def global_mean(x, world):
    """The mean over ranks of a per-rank batch mean, differentiable: the global batch mean on every rank.
    DDP divides the gradient by the world size and this all-reduce's backward multiplies it back."""
    if world.size == 1:
        return x
    return torch.distributed.nn.functional.all_reduce(x) / world.size


class Gather:
    """gather_rows as a step: Gather(world)(x) -> the rows of every rank's x, in rank order."""

    def __init__(self, world):
        self.world = world

    def __call__(self, x):
        return gather_rows(x, self.world)


class GlobalMean:
    """global_mean as a step: GlobalMean(world)(x) -> the mean of a per-rank batch mean over the ranks."""

    def __init__(self, world):
        self.world = world

    def __call__(self, x):
        return global_mean(x, self.world)


def parallel(model, world):
    """The network to train: `model` itself in a world of one, else wrapped in DistributedDataParallel (gradients
    averaged over the ranks; BN buffers agree by construction with GlobalBatchNorm, so none are broadcast)."""
    if world.size == 1:
        return model
    device = torch.device(world.device)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def barrier(world):
    if world.size > 1:
        dist.barrier()


def close():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------------
# BatchNorm over the global batch

class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole global batch (all ranks): the
    per-channel count, mean and sum of squared deviations of every rank are all-gathered (autograd-aware,
    so the backward is the global batch's too) and combined; statistics in float32. Same parameters, buffers and state-dict keys as nn.BatchNorm1d/2d, so
    checkpoints do not depend on the number of devices; in eval mode it is plain BatchNorm."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, self.momentum, self.eps)
        dims = [0] + list(range(2, x.dim()))                             # all but the channel axis
        xf = x.float()
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        mean_local = xf.mean(dims)                                       # [C]
        m2_local = ((xf - mean_local.view([1, -1] + [1] * (x.dim() - 2))) ** 2).sum(dims)
        # Every rank's (count, mean, sum of squared deviations), combined as in Chan et al.'s parallel
        # variance: no E[x^2] - E[x]^2 cancellation, which loses digits on channels of small variance.
        parts = torch.distributed.nn.functional.all_gather(torch.cat([n_local, mean_local, m2_local]))
        stats = torch.stack(parts)                                       # [world, 1 + 2C]
        c = x.shape[1]
        counts, means, m2s = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n   # biased, as BN normalises
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        y = y.to(x.dtype)
        with torch.no_grad():                                            # running stats, unbiased variance
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)).detach(), alpha=m)
        return y


def global_batch_norm(module):
    """A copy-free conversion: every BatchNorm1d/2d of `module` becomes a GlobalBatchNorm with the same
    parameters and buffers (and requires_grad flags)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, device=child.weight.device)
            bn.load_state_dict(child.state_dict())
            for p_new, p_old in zip(bn.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            global_batch_norm(child)
    return module
