"""One process against torchrun: the epoch time on this machine, and what the ranks exchange per iteration.

    python bench/bench_distributed.py                     # volumes for the SYSU-MM01 and demo presets, then times
    python bench/bench_distributed.py --no-time           # only the communication volumes (no training)

Communication per training iteration and rank, counted from the model and the preset (what distributed.py and
DistributedDataParallel send; every figure is the size of the tensors a rank receives):
- memory banks: `gather_rows` of every bank update's features [B, D] float32 (MULT stage one: 3 updates; stage
  two: 13 of the 6 banks; MBMIL: 3 intra + 3 global); the labels are not sent: every rank knows the global
  batch's on the host;
- BatchNorm: the global BN gathers (1 + 2C) float32 per layer and rank in the forward and all-reduces 2C in the
  backward (~2 (W-1)/W times its size on a ring), for each of the 2 forwards (the visible and the infrared stems
  count once each);
- gradients: DDP's all-reduce of every trainable parameter (float32), ~2 (W-1)/W times its size on a ring;
- losses for the log: one float64 per loss term, all-reduced once every plumbing.logs.READ_EVERY (50) iterations.
The timing runs the demo preset's data for a short schedule (one epoch per stage at --iters) once as one process
and once under `torchrun --nproc_per_node 2`, and reads each epoch's time from metrics.jsonl.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import TwoStreamNet  # noqa: E402

PRESETS = {"SYSU-MM01 (ResNet-50, 12 x 12)": ("resnet50", 144), "demo (ResNet-18, 8 x 8)": ("resnet18", 64)}


def volumes(arch, batch, world):
    """Bytes a rank receives per iteration: {item: bytes} for MULT stage one and two."""
    model = TwoStreamNet(arch)
    d = model.feature_dim
    bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bn_floats = sum(1 + 2 * m.num_features for m in bn)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gathered = lambda updates: updates * world * (batch // world) * 4 * d                # noqa: E731
    ring = 2 * (world - 1) / world
    bn_backward = sum(2 * m.num_features for m in bn)
    common = {"BatchNorm statistics (forward + backward)": world * bn_floats * 4 + ring * bn_backward * 4,
              "gradient all-reduce (ring, about)": 2 * (world - 1) / world * params * 4}
    return {"stage one": dict(common, **{"memory updates": gathered(3), "loss for the log": world * 8 / 50}),
            "stage two": dict(common, **{"memory updates": gathered(13), "loss for the log": world * 8 * 4 / 50})}


def time_runs(args):
    """Epoch times of the demo data, one process against two (torchrun, gloo)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = [os.path.join(root, "train.py"), "--data-root", args.data_root, "--epochs", "2",
                  "--stage-one-epochs", "1", "--iters", str(args.iters), "--eval-every", "100", "--eval-trials", "1",
                  "--no-eval-untrained", "--no-diagnostics", "--workers", "0", "--device", "cpu"]
        for n in (1, 2):
            run = os.path.join(tmp, f"world{n}")
            launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={n}"]
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
            subprocess.run(launch + common + ["--out", run], check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            with open(os.path.join(run, "metrics.jsonl")) as f:
                out[n] = [json.loads(line)["time"] for line in f]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes for the volumes (2 4)")
    p.add_argument("--time", action=argparse.BooleanOptionalAction, default=True, help="also time the demo epochs")
    p.add_argument("--data-root", default="datasets/synthetic", help="the demo set (rendered by train.py)")
    p.add_argument("--iters", type=int, default=20, help="iterations per epoch of the timed runs (20)")
    args = p.parse_args(argv)
    print("| preset | world | stage | memory updates | BN statistics | gradients | total per iteration |")
    print("|---|---|---|---|---|---|---|")
    for name, (arch, batch) in PRESETS.items():
        for world in args.world:
            for stage, v in volumes(arch, batch, world).items():
                mb = lambda x: f"{x / 2**20:.2f} MiB"                                   # noqa: E731
                print(f"| {name} | {world} | {stage} | {mb(v['memory updates'])} | "
                      f"{mb(v['BatchNorm statistics (forward + backward)'])} | "
                      f"{mb(v['gradient all-reduce (ring, about)'])} | {mb(sum(v.values()))} |")
    if args.time:
        times = time_runs(args)
        print(f"\ndemo data, {args.iters} iterations per epoch, {os.cpu_count()} CPU cores "
              f"(threads split between the ranks):")
        print("| processes | stage-one epoch s | stage-two epoch s |")
        print("|---|---|---|")
        for n, (t1, t2) in times.items():
            print(f"| {n} | {t1:.1f} | {t2:.1f} |")


if __name__ == "__main__":
    main()
