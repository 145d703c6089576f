"""One code path from 1 to N processes: the same seed gives the same training on 1, 2 or 4 devices.

    python train.py ...                                          # one process, no process group
    torchrun --standalone --nproc_per_node=4 train.py ...        # four, NCCL on CUDA, gloo on the CPU

What train.py keeps global, and how (so that every rank holds what one process would hold):
- features of the training set: each rank extracts a contiguous share of the rows, `gather_rows` puts
  them back in row order, so every rank holds the same [N_v, D] and [N_r, D] tensors; the BatchNorm
  statistics they are extracted with are rank 0's on every rank (`same_buffers`);
- pseudo-labels: clustering and label transfer are exact but not cheap (dense products, Sinkhorn), and
  need the whole feature matrix; they run once, on rank 0, and `on_rank_zero` sends the labels and soft
  labels to every rank (an error there stops every rank with its message);
- batches: the samplers are pure functions of (seed, epoch, labels), so every rank draws the same global
  batch and keeps its contiguous share of the positions; augmentations are seeded per global position;
- memory banks: updated on every rank from the all-gathered batch features, in global position order
  (`gather_rows`), and the global batch's labels, which every rank knows on the host: they stay equal to
  the one-process banks;
- BatchNorm: normalised with the statistics of the whole global batch, the modality stems' BN included:
  `global_batch_norm` makes every BN layer an nn.SyncBatchNorm on CUDA (PyTorch's fused kernels) and a
  `GlobalBatchNorm` elsewhere (gloo on the CPU); both save for backward what a one-process BN saves;
- losses: per-sample means over equal shares, so DDP's average of the gradients is the one-process
  gradient; a loss that is not a per-sample mean (MBMIL's clamped centroid term) takes `global_mean`.
Differences left: floating-point reduction order (sums over other partitions of the batch, convolution
algorithms picked per batch size), far below the tolerances tests/test_distributed.py checks.
No collective here sends a size: every rank knows every rank's share, so nothing waits on a value read back.
Imports torch and the standard library only.
"""
import datetime
import inspect
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

    @classmethod
    def of(cls, args):
        """This process's place among the --world-size ones that train.py stores in its args (one without
        torchrun)."""
        return cls(args.rank, args.world_size, args.device)


def setup(device, timeout_s=1800):
    """The process group when launched by torchrun (WORLD_SIZE > 1), else a world of one; once per process
    (a second call returns the same world). device: the --device asked for; under torchrun a CUDA device
    becomes cuda:LOCAL_RANK. A CUDA device with an index becomes the process's current device either way, so
    that what allocates on "the" GPU (the caching allocator's statistics, NCCL, cuBLAS handles) uses it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        _use_device(device)
        return World(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
    _use_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, size, device)


def _use_device(device):
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)


def share(n, world):
    """Rows [lo, hi) of n that rank `world.rank` takes: contiguous, in rank order."""
    lo = n * world.rank // world.size
    return lo, n * (world.rank + 1) // world.size


def gather_rows(x, world, total=None):
    """The rows every rank holds, concatenated in rank order: [sum of n_r, ...] on every rank.

    total: None when every rank holds as many rows as this one (the equal shares of a batch), else the rows of
    all ranks together, each rank holding its `share(total, world)` (the extraction). Either way every rank
    knows every rank's size, so none is sent: one all_gather, which queues on the device without a wait."""
    if world.size == 1:
        return x
    sizes = [x.shape[0]] * world.size if total is None else \
        [hi - lo for lo, hi in (share(total, World(r, world.size)) for r in range(world.size))]
    if x.shape[0] != sizes[world.rank]:
        raise ValueError(f"gather_rows: rank {world.rank} holds {x.shape[0]} rows, its share is {sizes[world.rank]}")
    width = max(sizes)
    padded = x.contiguous() if x.shape[0] == width else torch.cat([x, x.new_zeros((width - x.shape[0],) + x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts if total is None else [p[:s] for p, s in zip(parts, sizes)])


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


def mean_over_ranks(values, world):
    """The mean over the ranks of a float, or of a tensor of them (the logged losses of the global batch):
    the same shape, as Python floats (a float, or a list from .tolist()). A tensor is read back once here."""
    if not isinstance(values, torch.Tensor):
        return values if world.size == 1 else mean_over_ranks(torch.tensor(float(values), dtype=torch.float64), world)
    if world.size == 1:
        return values.tolist()
    t = values.detach().to(device=world.device, dtype=torch.float64)
    dist.all_reduce(t)
    out = t.tolist()
    return out / world.size if isinstance(out, float) else _divide(out, world.size)


def _divide(values, n):
    return [_divide(v, n) if isinstance(v, list) else v / n for v in values]


def global_mean(x, world):
    """The mean over ranks of a per-rank batch mean, differentiable: the global batch mean on every rank.
    DDP divides the gradient by the world size and this all-reduce's backward multiplies it back."""
    if world.size == 1:
        return x
    return torch.distributed.nn.functional.all_reduce(x) / world.size


def global_updates(updates, mine, every, world):
    """A loss's bank updates (memory.py's [(bank, feats, labels)], registered for this rank's share of the batch)
    as the whole global batch makes them: every rank's features, gathered in position order, with the global
    batch's labels. mine, every: {label key: this rank's labels, the global batch's}, host arrays; an update's
    labels are one of `mine`'s arrays itself (memory.py keeps an int64 array as given), which names its key.
    Several updates may carry the same features (one batch read by two banks): each is gathered once."""
    if world.size == 1:
        return updates
    key = {id(y): k for k, y in mine.items()}
    gathered = {}                                     # (storage address, shape) -> every rank's rows
    for _, f, _ in updates:
        if (f.data_ptr(), *f.shape) not in gathered:
            gathered[(f.data_ptr(), *f.shape)] = gather_rows(f, world)
    return [(name, gathered[(f.data_ptr(), *f.shape)], every[key[id(y)]]) for name, f, y in updates]


def parallel(model, world):
    """The network to train: `model` itself in a world of one, else wrapped in DistributedDataParallel (gradients
    averaged over the ranks). No buffers are broadcast at each forward: with global BatchNorm they agree by
    construction, and without it (--no-sync-bn) `same_buffers` gives every rank rank 0's before they are used."""
    if world.size == 1:
        return model
    device = torch.device(world.device)
    ddp = torch.nn.parallel.DistributedDataParallel
    # Newer PyTorch renamed the switch (the old name warns); buffers are still sent once at the start, all equal.
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else "broadcast_buffers": False}
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def same_buffers(model, world):
    """Rank 0's buffers (BatchNorm running statistics) copied to every rank, in place: called before the
    features are extracted, so that all ranks' shares come from one model. Without global BatchNorm each
    rank's running statistics follow its own shares of the batches and drift apart."""
    if world.size == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


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

def global_batch_norm(module):
    """A copy-free conversion: every BatchNorm1d/2d of `module` normalises with the whole global batch's
    statistics, keeping its parameters and buffers (and requires_grad flags), so checkpoints do not depend on
    the number of devices. On CUDA it becomes an nn.SyncBatchNorm, whose fused kernels (batch_norm_stats,
    batch_norm_elemt and their backward) exist on CUDA only; elsewhere a GlobalBatchNorm. Both compute the
    same function: the statistics of every rank's share combined, the backward that of the global batch."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            kind = nn.SyncBatchNorm if child.running_mean.is_cuda else GlobalBatchNorm
            bn = kind(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                      device=child.running_mean.device, dtype=child.running_mean.dtype)
            bn.load_state_dict(child.state_dict())
            for p_new, p_old in zip(bn.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            global_batch_norm(child)
    return module


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole global batch (all ranks), for any backend
    (gloo on the CPU; on CUDA global_batch_norm picks nn.SyncBatchNorm). Forward: this rank's per-channel mean
    and variance in one pass (summed in float64 on the CPU, as nn.BatchNorm2d's CPU kernels sum; float32 at least
    elsewhere), every rank's (count, mean, sum of squared deviations) all-gathered and combined, then one
    batch_norm with those statistics. Backward: the global batch's, from two per-channel sums all-reduced. Saved
    for backward: the input and two [C] vectors, what nn.BatchNorm2d saves (the previous version kept three
    float32 copies of the activation: bench/bench_bn_memory.py). Same parameters, buffers and state-dict keys as
    nn.BatchNorm1d/2d; in eval mode, or in a world of one, it is plain BatchNorm."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, self.momentum, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                      self.momentum, self.eps)


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - μ) / sqrt(σ² + eps) · w + b with μ, σ² over every rank's rows; x [B, C] or [B, C, H, W]."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        c, dims = x.shape[1], [0] + list(range(2, x.dim()))
        # The sums in float64 on the CPU, as nn.BatchNorm2d's CPU kernels accumulate (in float32 they round 1.7x
        # more, tests/test_distributed.py); float32 at least elsewhere.
        acc = torch.float64 if x.device.type == "cpu" else torch.promote_types(x.dtype, torch.float32)
        var, mean = torch.var_mean(x.to(acc), dims, correction=0)                 # this rank's [C] each
        count = x.numel() // c
        local = torch.cat([mean.new_full((1,), count), mean, var * count])      # count, mean, squared deviations
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        stats = torch.stack(parts)                                               # [world, 1 + 2C]
        counts, means, m2s = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
        n = counts.sum()
        # Chan et al.'s parallel variance: no E[x^2] - E[x]^2 cancellation, which loses digits on channels of
        # small variance.
        mean = (counts * means).sum(0) / n
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n             # biased, as BN normalises
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)  # unbiased, as BN keeps it
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n = n
        like = running_mean.dtype                                  # the statistics' type batch_norm takes with x
        return F.batch_norm(x, mean.to(like), var.to(like), weight, bias, False, 0.0, eps)   # one fused pass

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        c, dims = x.shape[1], [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        g = dy.to(mean.dtype)
        xhat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        sum_g, sum_gx = g.sum(dims), (g * xhat).sum(dims)                         # this rank's [C] each
        total = torch.cat([sum_g, sum_gx])
        dist.all_reduce(total)                                                   # every rank's
        mean_g, mean_gx = (total / ctx.n).split(c)
        scale = invstd if weight is None else invstd * weight.to(mean.dtype)
        dx = (g - mean_g.view(shape) - xhat * mean_gx.view(shape)) * scale.view(shape)
        need = ctx.needs_input_grad
        return (dx.to(x.dtype), sum_gx.to(weight.dtype) if need[1] else None,
                sum_g.to(weight.dtype) if need[2] else None, None, None, None, None)
