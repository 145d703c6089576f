"""The cached counterparts of data/loader.py's datasets: the same batches from the decode-once cache.

CachedTrainBatches gives TrainBatches's batches (the same keys, the same draws from the same generators) from the
decode-once caches of data/fast/cache.py, each view augmented as one batch on the training device by
data/fast/batched.py, with its parameters from data/fast/draws.py; use it with cached_loader(dataset, num_workers=n).
CachedImageDataset gives ImageDataset's extraction batches from the same cache.
"""
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..loader import TrainBatches, _check_batches, _check_images, _check_rows, _check_seed, sample_generator
from . import draws
from .batched import augment_view, crop, erase_rows, hsv_tables, jitter_sequences, normalize_
from .cache import ImageCache


class CachedImageDataset(Dataset):
    """ImageDataset in whole batches, read from a decode-once cache: item k -> (x float32 [b, 3, H, W], index
    int64 [b]), images k * batch_size onward (the last batch may be shorter), ToTensor + Normalize of their
    cached rows; use with DataLoader(dataset, batch_size=None).

    images:     ImageList, [N], every path a row of `cache`
    cache:      data.fast.cache.ImageCache holding those images resized as `transform` resizes them
    transform:  data.transforms.test_transform (Resize, ToTensor, Normalize): its Resize is the cache's, so
                image i equals ImageDataset(images, transform)[i] bit for bit (the same operations on the same
                uint8 pixels), without decoding or resizing it again
    batch_size: images per item
    as_bytes:   items hold the cached uint8 images instead, x uint8 [b, 3, H, W], a quarter of the bytes through
                the workers' shared memory, pinning and the copy to the device; normalize(x), on the device, makes
                them the float32 images above (the same operations)
    """

    def __init__(self, images, cache, transform, batch_size, as_bytes=False):
        _check_images(images, "images")
        if not isinstance(cache, ImageCache):
            raise TypeError(f"cache must be a data.fast.cache.ImageCache, got {type(cache).__name__}")
        steps = getattr(transform, "steps", [])
        if [type(t).__name__ for t in steps] != ["Resize", "ToTensor", "Normalize"]:
            raise ValueError(f"transform must be data.transforms.test_transform (Resize, ToTensor, Normalize), "
                             f"got {transform!r}")
        size = (cache.height, cache.width, cache.interpolation)
        if size != (*steps[0].size, steps[0].interpolation):
            raise ValueError(f"the cache holds {size[0]}x{size[1]} {size[2]} images, but the transform resizes to "
                             f"{steps[0].size[0]}x{steps[0].size[1]} {steps[0].interpolation}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        where = {os.path.abspath(p): i for i, p in enumerate(cache.paths)}
        missing = [p for p in images.paths if os.path.abspath(p) not in where]
        if missing:
            raise ValueError(f"{len(missing)} of the {len(images)} images are not in the cache {cache}, the first "
                             f"{missing[0]}")
        self.rows = torch.tensor([where[os.path.abspath(p)] for p in images.paths], dtype=torch.int64)
        self.cache, self.batch_size, self.as_bytes = cache, batch_size, as_bytes
        self.mean, self.std = torch.tensor(steps[2].mean), torch.tensor(steps[2].std)     # float32, as TF.normalize

    def __len__(self):
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, k):
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} out of range 0..{len(self) - 1}")
        index = torch.arange(k * self.batch_size, min((k + 1) * self.batch_size, len(self.rows)))
        x = self.cache.images.index_select(0, self.rows[index])                             # uint8 [b, 3, H, W]
        return (x if self.as_bytes else self.normalize(x)), index

    def normalize(self, x):
        """ToTensor + Normalize of cached images on their device: uint8 [b, 3, H, W] -> float32 [b, 3, H, W]."""
        dev = x.device
        x = x.to(torch.float32)
        return normalize_(x, torch.arange(3).expand(len(x), 3), self.mean.to(dev, non_blocking=True),
                          self.std.to(dev, non_blocking=True), from_bytes=True)


class CachedTrainBatches(Dataset):
    """Item b -> the batch TrainBatches gives, from the decode-once caches, augmented as a batch on `device`.

    vis, ir:    data.fast.cache.ImageCache of the N_v visible and N_r infrared training rows (rows in the order of the
                ImageLists), built at the pipelines' size and Resize interpolation
    transforms: {"v0", "v1", "r"} from data.transforms.train_transforms, the dict TrainBatches takes
    batches:    int64 [num_batches, B, 2] from data.samplers (visible row, infrared row)
    seed:       int >= 0: the generators of TrainBatches (module docstring), drawn by data/fast/draws.py with the
                same calls in the same order, so each sample's crop, flip, jitter, rectangles and channels
                are TrainBatches's
    device:     where the augmentation runs and the batch is returned
    first_position: the global position of column 0 of `batches` (a rank's share of each batch)
    Item b: dict(v0=[B, 3, H, W], v1=[B, 3, H, W], r=[B, 3, H, W] float32, vis_index=int64 [B],
    ir_index=int64 [B]), all on `device`. An item is plan(b) (CPU: draws, uint8 crops, LinearTransform's masks;
    safe in DataLoader workers) then augment(plan) (device: data/fast/batched.py); cached_loader splits the two.
    """

    def __init__(self, vis, ir, transforms, batches, seed, device="cpu", first_position=0):
        for name, cache in (("vis", vis), ("ir", ir)):
            if not isinstance(cache, ImageCache):
                raise TypeError(f"{name} must be a data.fast.cache.ImageCache (data.fast.cache.build_cache), "
                                f"got {type(cache).__name__}")
        keys = ("v0", "v1", "r")
        if not isinstance(transforms, dict) or not all(k in transforms for k in keys):
            raise ValueError(f"transforms must be a dict with pipelines under 'v0', 'v1' and 'r' "
                             f"(data.transforms.train_transforms), got {transforms!r}")
        self.recipes = {k: draws.parse_recipe(transforms[k]) for k in keys}
        for key, rec in self.recipes.items():
            cache = ir if key == "r" else vis
            size = (cache.height, cache.width, cache.interpolation)
            if size != (rec.height, rec.width, rec.interpolation):
                raise ValueError(f"the {'infrared' if key == 'r' else 'visible'} cache holds {size[0]}x{size[1]} "
                                 f"{size[2]} images, but pipeline {key!r} resizes to {rec.height}x{rec.width} "
                                 f"{rec.interpolation}; build the cache at the pipeline's size")
        self.batches = _check_batches(batches, 3, "batches")
        _check_rows(self.batches[..., 0], len(vis), "batches[..., 0] (visible rows)")
        _check_rows(self.batches[..., 1], len(ir), "batches[..., 1] (infrared rows)")
        self.vis, self.ir, self.seed = vis, ir, _check_seed(seed)
        self.device = torch.device(device)
        if any(rec.jitter is not None and rec.jitter.values[3] for rec in self.recipes.values()):
            hsv_tables(self.device)        # made here once, so that DataLoader workers forked later share them
        self.first = int(first_position)    # a share of the global batch: position j here is first + j there
        # Each view's Normalize and erasing values on the device once, not copied there again every batch.
        self.constants = {key: (torch.tensor(rec.mean, device=self.device), torch.tensor(rec.std, device=self.device),
                                rec.erase.fill.to(self.device) if rec.erase is not None
                                else torch.zeros(3, device=self.device)) for key, rec in self.recipes.items()}

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        return self.augment(self.plan(b))

    def plan(self, b):
        """The CPU half of item b: {"v0", "v1", "r": view plans, "vis_index", "ir_index"}."""
        if not 0 <= b < len(self.batches):
            raise IndexError(f"batch {b} out of range 0..{len(self.batches) - 1}")
        b = int(b)
        pairs = self.batches[b]                                   # [B, 2]
        rng_vis = [sample_generator(self.seed, b, self.first + j) for j in range(len(pairs))]
        rng_ir = [sample_generator(self.seed, b, self.first + j, infrared=True) for j in range(len(pairs))]
        plan = {"vis_index": torch.from_numpy(pairs[:, 0].copy()), "ir_index": torch.from_numpy(pairs[:, 1].copy())}
        for key, cache, rows, rngs in (("v0", self.vis, pairs[:, 0], rng_vis), ("v1", self.vis, pairs[:, 0], rng_vis),
                                       ("r", self.ir, pairs[:, 1], rng_ir)):
            plan[key] = _plan_view(self.recipes[key], cache, rows, rngs)
        return plan

    def augment(self, plan):
        """The device half: the batch dict of plan(b) on self.device. Nothing in it reads the device back, and
        every copy from the host is queued without a wait (tests/test_fake_device.py)."""
        batch = {k: plan[k].to(self.device, non_blocking=True) for k in ("vis_index", "ir_index")}
        for key in ("v0", "v1", "r"):
            batch[key] = self._augment_view(key, plan[key], len(plan["vis_index"]))
        return batch

    def timed(self, b, clock=time.perf_counter):
        """Seconds of plan(b) and of each view's augmentation by `clock` (bench/bench_input.py; a clock for
        a GPU must synchronise)."""
        t = clock()
        plan = self.plan(b)
        times = {"plan": clock() - t}
        for key in ("v0", "v1", "r"):
            t = clock()
            self._augment_view(key, plan[key], len(plan["vis_index"]))
            times[key] = clock() - t
        return times

    def _augment_view(self, key, view, n):
        rec = self.recipes[key]
        return augment_view(view, *self.constants[key], (n, 3, rec.height, rec.width))


def cached_loader(data, num_workers=0):
    """Iterable over the batches of a CachedTrainBatches, the counterpart of DataLoader(TrainBatches(...),
    batch_size=None, num_workers=n): on the CPU, workers build whole batches; on a GPU, workers draw and crop
    (plan) into pinned memory and this process augments on the device. len() is the number of batches."""
    if not isinstance(data, CachedTrainBatches):
        raise TypeError(f"data must be a CachedTrainBatches, got {type(data).__name__}")
    if data.device.type == "cpu":
        return DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers)
    return _Augmented(data, DataLoader(_Plans(data), batch_size=None, shuffle=False, num_workers=num_workers,
                                       pin_memory=True))


def training_loader(vis, ir, transforms, batches, seed, first_position=0, input="cached", device="cpu",
                    num_workers=0):
    """The batches of train.py's --input: "cached", CachedTrainBatches from the images' caches (vis.cache,
    ir.cache) augmented on `device`, or "pil", the per-image reference TrainBatches; the same batches. For a GPU
    the batches (pil) or plans (cached) come in pinned memory, so that their copies to the device need no wait."""
    if input == "cached":
        data = CachedTrainBatches(vis.cache, ir.cache, transforms, batches, seed=seed, device=device,
                                  first_position=first_position)
        return cached_loader(data, num_workers=num_workers)
    data = TrainBatches(vis, ir, transforms, batches, seed=seed, first_position=first_position)
    return DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda")


class _Plans(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, b):
        return self.data.plan(b)


class _Augmented:
    def __init__(self, data, plans):
        self.data, self.plans = data, plans

    def __len__(self):
        return len(self.plans)

    def __iter__(self):
        for plan in self.plans:
            yield self.data.augment(plan)


def _plan_view(rec, cache, rows, rngs):
    """Draws of one view for every sample (each from its own generator, in the per-image order) and its
    uint8 crops, as parts for data.fast.batched.augment_view. A view with LinearTransform crops all three channels
    in order; one with ColorJitter crops colour images whole and grey images (three equal channels, where
    PIL's saturation and hue change nothing) as one channel, each sorted by jitter order; one with neither
    crops each image's kept channels only (one for ChannelExchange and ChannelAdapGray's channel draw)."""
    n = len(rows)
    heads = [draws.draw_head(rec, rng) for rng in rngs]
    top = torch.tensor([h[0] for h in heads], dtype=torch.int64)
    left = torch.tensor([h[1] for h in heads], dtype=torch.int64)
    flip = torch.tensor([h[2] for h in heads], dtype=torch.bool)
    rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    masks = x = None
    if rec.linear is not None:
        x = crop(cache.images, rows, top, left, flip, rec.pad)                 # [n, 3, H, W]
        gate = [draws.draw_linear_gate(rec, rng) for rng in rngs]
        masks = draws.resolve_linear(rec.linear, x, gate, rngs, cache.zeros[rows], rec.pad)
    tails = [draws.draw_tail(rec, rng) for rng in rngs]
    rect = torch.tensor([t[0] if t[0] is not None else (0, 0, 0, 0) for t in tails], dtype=torch.int64)
    mix = torch.tensor([t[1] for t in tails], dtype=torch.int64)
    single = (mix >= 0) & (mix <= 2)
    everyone = torch.arange(n)

    def part(idx, channels=None, cropped=None, seqs=None):
        """The images idx (batch positions), sorted by jitter sequence when there is one."""
        if seqs is not None:
            idx = idx[torch.tensor(sorted(range(len(idx)), key=lambda i: seqs[idx[i]]), dtype=torch.int64)]
        if cropped is None:
            cropped = crop(cache.images, rows[idx], top[idx], left[idx], flip[idx], rec.pad,
                           None if channels is None else channels[idx])
        jitter = None
        if seqs is not None:
            jitter = ([seqs[j] for j in idx.tolist()],
                      torch.tensor([heads[j][4] for j in idx.tolist()], dtype=torch.float64))   # as drawn
        return {"crop": cropped, "pos": idx, "in_order": len(idx) == n and bool((idx == everyone).all()),
                "jitter": jitter, "linear": masks if cropped is x else None,
                "tail": _tail_groups(mix[idx], rect[idx], rec.height, rec.width)}

    if rec.linear is not None:
        return [part(everyone, cropped=x)]
    if rec.jitter is not None:
        grey = cache.grey[rows]
        seqs = jitter_sequences(torch.tensor([h[3] for h in heads]), torch.tensor([h[4] for h in heads]), grey)
        zeros = torch.zeros(n, dtype=torch.int64)
        return [part(idx, channels, seqs=seqs) for idx, channels in
                ((torch.nonzero(~grey).squeeze(1), None), (torch.nonzero(grey).squeeze(1), zeros)) if idx.numel()]
    return [part(idx, channels) for idx, channels in
            ((torch.nonzero(single).squeeze(1), mix), (torch.nonzero(~single).squeeze(1), None)) if idx.numel()]


def _tail_groups(mix, rect, height, width):
    """A part's images by the planes their tail writes: one kept channel (mix 0..2), or three; with what the
    device's half needs worked out here on the host (the erased rows, the images to grey), so that it reads
    nothing back."""
    groups = []
    single = (mix >= 0) & (mix <= 2)
    for keep in (single, ~single):
        idx = torch.nonzero(keep).squeeze(1)
        if idx.numel():
            chan = mix[idx][:, None] if keep is single else torch.arange(3).expand(len(idx), 3)
            chan = chan.contiguous()
            groups.append({"idx": idx, "all": len(idx) == len(mix), "chan": chan, "rect": rect[idx],
                           "grey_rows": torch.nonzero(mix[idx] == 3).squeeze(1),
                           "erase": erase_rows(chan, rect[idx], chan.shape[1], height, width)})
    return groups
