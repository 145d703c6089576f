"""Saved activations per image of the global-batch BatchNorm: the three-pass version (before) against the fused one.

Under torchrun with --sync-bn every BatchNorm of the network normalises with the whole global batch's statistics
(plumbing/distributed.py). What autograd keeps for the backward of a training forward decides how large a batch
fits on a GPU. This script measures it on the CPU, where it is the same: two gloo ranks each run the SYSU preset's
network (TwoStreamNet, ResNet-50, 288x144, last stride 1) forward in train mode on one visible and one infrared
image, inside torch.autograd.graph.saved_tensors_hooks, and add up the distinct storages saved for backward
(parameters and their casts excluded: only activations), per image, for
- nn.BatchNorm2d, one process's BN (the reference: what cuDNN's BN saves too: its input and two [C] vectors);
- the three-pass GlobalBatchNorm of the previous release (re-implemented below, ThreePassBatchNorm): statistics in
  about ten separate float32 kernels, an autograd-aware all_gather, and three float32 copies of each activation
  kept for backward;
- the fused GlobalBatchNorm of plumbing/distributed.py: one var_mean, the statistics all-gathered, one
  batch_norm, and an explicit backward (on CUDA global_batch_norm uses nn.SyncBatchNorm, which saves the same);
in float32 and under bf16 autocast.

    python bench/bench_bn_memory.py                     # the table (about a minute on 2 cores; bf16 is slow on CPUs)
    python bench/bench_bn_memory.py --precisions fp32   # float32 only
"""
import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import TwoStreamNet  # noqa: E402
from plumbing import distributed  # noqa: E402


class ThreePassBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The previous release's GlobalBatchNorm forward, for the 'before' figure: (count, mean, squared deviations)
    of each rank all-gathered through autograd and combined in float32, then (x - mean) * rsqrt(var + eps) * w + b
    as separate operations, each keeping its float32 operands for backward."""

    def forward(self, x):
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        mean_local = xf.mean(dims)
        m2_local = ((xf - mean_local.view([1, -1] + [1] * (x.dim() - 2))) ** 2).sum(dims)
        parts = torch.distributed.nn.functional.all_gather(torch.cat([n_local, mean_local, m2_local]))
        stats = torch.stack(parts)
        c = x.shape[1]
        counts, means, m2s = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert(module, kind):
    """Every BatchNorm1d/2d of `module` replaced by `kind` with its parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn = kind(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            convert(child, kind)
    return module


def saved_activation_bytes(model, x_vis, x_ir, amp):
    """Bytes of the distinct storages autograd saves in one training forward, parameters (and their casts, found
    by shape) excluded."""
    shapes = {tuple(p.shape) for p in model.parameters()}
    storages = {}

    def pack(t):
        if tuple(t.shape) not in shapes:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        model(x_vis, x_ir)
    return sum(storages.values())


def rank_main(rank, port, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = TwoStreamNet(args.arch)
    g = torch.Generator().manual_seed(rank)
    x_vis, x_ir = (torch.randn(1, 3, args.height, args.width, generator=g) for _ in range(2))
    rows = []
    for name, kind in (("nn.BatchNorm2d (one process's BN)", None), ("three-pass GlobalBatchNorm (before)",
                                                                     ThreePassBatchNorm),
                       ("fused GlobalBatchNorm (now)", distributed.GlobalBatchNorm)):
        model = TwoStreamNet(args.arch)
        model.load_state_dict(base.state_dict())
        if kind is not None:
            convert(model, kind)
        model.train()
        for precision in args.precisions:
            rows.append((name, precision, saved_activation_bytes(model, x_vis, x_ir, precision == "bf16") / 2))
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=("resnet50", "resnet18"), help="backbone (resnet50)")
    p.add_argument("--height", type=int, default=288, help="input height (288)")
    p.add_argument("--width", type=int, default=144, help="input width (144)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(rank_main, args=(port, out, args), nprocs=2, join=True, start_method="spawn")
        rows = torch.load(out)
    print(f"# saved activations per image, training forward of TwoStreamNet({args.arch}) at {args.height}x"
          f"{args.width}, 2 gloo ranks, one visible + one infrared image each")
    print("| BatchNorm | precision | MiB per image | vs one process's BN |")
    print("|---|---|---|---|")
    ref = {prec: b for name, prec, b in rows if name.startswith("nn.")}
    for name, prec, b in rows:
        print(f"| {name} | {prec} | {b / 2**20:.1f} | {b / ref[prec]:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
