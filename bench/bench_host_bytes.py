"""Bytes that cross from the host to the device per SYSU-MM01 epoch: before and now, measured on real plans.

A GPU run moves every training batch and every extraction batch from DataLoader workers (through /dev/shm, then
pinned memory) to the device. This counts those bytes for the SYSU preset (288x144, 12 clusters x 12 instances =
144 pairs, MULT: 300 stage-one or 200 stage-two iterations, 34,167 training images extracted every epoch):
- training, --input cached on a GPU: the plan of each batch (uint8 crops, LinearTransform's masks, the index
  tensors), measured by building real plans from generated JPEGs (bench/bench_input.py's sources), as before
  (the plans travelled as uint8 already);
- training, --input pil: TrainBatches's float32 views, before and now (the reference path is unchanged; now in
  pinned memory);
- extraction of the training set, --input cached: float32 batches before, the cache's uint8 now.

    python bench/bench_host_bytes.py                   # about half a minute on one core
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_input import index_batches, make_sources  # noqa: E402
from data import transforms as T  # noqa: E402
from data.fast.cache import build_cache  # noqa: E402
from data.fast.loader import CachedTrainBatches  # noqa: E402

SYSU = dict(height=288, width=144, pairs=144, iters={1: 300, 2: 200}, train_images=22258 + 11909)


def nbytes(obj):
    """Bytes of every tensor in a nested plan (dicts, lists, tuples, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(nbytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=2, help="plans measured per stage (2)")
    args = p.parse_args(argv)
    h, w, pairs = SYSU["height"], SYSU["width"], SYSU["pairs"]
    image = 3 * h * w
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vis, ir = make_sources(tmp, pairs, (w, h), 0)
        caches = [build_cache(images, h, w, "bilinear", progress=False) for images in (vis, ir)]
        for stage in (1, 2):
            tfm = T.train_transforms(h, w, stage, pad=T.crop_pad(h))
            batches = index_batches(len(vis), len(ir), pairs, args.batches, np.random.default_rng(stage))
            data = CachedTrainBatches(*caches, tfm, batches, seed=1)
            plan = np.mean([nbytes(data.plan(b)) for b in range(args.batches)])
            floats = 3 * pairs * image * 4
            iters = SYSU["iters"][stage]
            rows.append((f"training, MULT stage {stage}, --input cached (plans)", plan, plan, iters))
            rows.append((f"training, MULT stage {stage}, --input pil (float32 views)", floats, floats, iters))
    n = SYSU["train_images"]
    rows.append(("extraction of the training set, --input cached", n * image * 4, n * image, 1))
    print("# bytes from the host to the device per SYSU-MM01 epoch (288x144, 144 pairs a batch, 34,167 training "
          "images)")
    print("| what | per batch before | per batch now | batches per epoch | GB per epoch before | GB per epoch now |")
    print("|---|---|---|---|---|---|")
    for name, before, now, count in rows:
        if count == 1:
            print(f"| {name} | - | - | 1 pass | {before / 1e9:.1f} | {now / 1e9:.1f} |")
        else:
            print(f"| {name} | {before / 1e6:.1f} MB | {now / 1e6:.1f} MB | {count} | {before * count / 1e9:.1f} | "
                  f"{now * count / 1e9:.1f} |")
    return rows


if __name__ == "__main__":
    main()
