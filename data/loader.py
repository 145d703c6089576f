"""torch Datasets of the per-image reference pipeline: feature extraction and whole training batches.

MULT (He et al., IJCV 2024), docs/mult.md §1.4-1.5: an item of TrainBatches is one batch of
(visible, infrared) pairs with two visible views (v0, v1) and one infrared tensor (r).
MBMIL (Wang et al., AAAI 2026), docs/mbmil.md §A.4, uses the same batches with unrelated visible
and infrared halves (its separate per-modality loaders).

Seeding: the augmentation of position j of batch b uses its own generator,
np.random.default_rng([seed, b, j]) for the visible image (views drawn in order v0 then v1)
and np.random.default_rng([seed, b, j, 1]) for the infrared image. A batch is therefore a pure
function of (seed, b, the index rows): it does not depend on the DataLoader's worker count or
on what ran before, and a resumed run rebuilds the same batches.
Use with DataLoader(dataset, batch_size=None, num_workers=n).

This is the reference: every image decoded and augmented by data/transforms.py, one at a time.
data/fast/loader.py gives the same batches from the decode-once cache (`--input cached`, the default).
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from .common import ImageList, read_image



def sample_generator(seed, b, position, infrared=False):
    """The generator of the pair at global `position` of batch b: both views of the visible image draw from
    [seed, b, position], its infrared partner from [seed, b, position, 1]. TrainBatches and CachedTrainBatches
    both draw from these, which is why their batches agree."""
    return np.random.default_rng([seed, b, position, 1] if infrared else [seed, b, position])


def _check_images(images, name):
    if not isinstance(images, ImageList):
        raise TypeError(f"{name} must be a data.common.ImageList, got {type(images).__name__}")


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


def _check_rows(rows, size, name):
    """Index rows must lie in [0, size)."""
    if rows.size and (rows.min() < 0 or rows.max() >= size):
        bad = rows[(rows < 0) | (rows >= size)][0]
        raise ValueError(f"{name} holds row {bad}, outside 0..{size - 1}")


def _check_batches(batches, ndim, name):
    arr = np.asarray(batches)
    wrong_shape = arr.ndim != ndim or (ndim == 3 and arr.shape[2] != 2)
    if wrong_shape or not np.issubdtype(arr.dtype, np.integer):
        want = "[num_batches, B, 2]" if ndim == 3 else "[num_batches, B]"
        raise ValueError(f"{name} must be an integer array {want} (from data.samplers), "
                         f"got dtype {arr.dtype} and shape {arr.shape}")
    return arr.astype(np.int64)


class _Cache:
    """Decode each path once per batch (with-replacement draws repeat images)."""

    def __init__(self):
        self.images = {}

    def __call__(self, path):
        if path not in self.images:
            self.images[path] = read_image(path)
        return self.images[path]


class ImageDataset(Dataset):
    """Item i -> (transform(image i), i), for feature extraction in row order.

    images:    ImageList, [N]
    transform: callable PIL image -> float tensor [3, H, W] (data.transforms.test_transform)
    """

    def __init__(self, images, transform):
        _check_images(images, "images")
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(read_image(self.images.paths[i])), i


class TrainBatches(Dataset):
    """Item b -> one whole training batch of (visible, infrared) pairs (docs/mult.md §1.5).

    vis, ir:    ImageLists of N_v visible and N_r infrared training rows
    transforms: {"v0", "v1", "r"}: callables (PIL image, rng) -> [3, H, W]
                (data.transforms.train_transforms)
    batches:    int64 [num_batches, B, 2] from data.samplers (visible row, infrared row)
    seed:       int >= 0; see the module docstring for the per-image generators
    first_position: the global position of column 0 of `batches` (a rank's share of each batch)
    Item b: dict(v0=[B, 3, H, W], v1=[B, 3, H, W], r=[B, 3, H, W], vis_index=int64 [B],
    ir_index=int64 [B]); the indices let the trainer look up pseudo-labels.
    """

    def __init__(self, vis, ir, transforms, batches, seed, first_position=0):
        _check_images(vis, "vis")
        _check_images(ir, "ir")
        keys = ("v0", "v1", "r")
        if not isinstance(transforms, dict) or not all(callable(transforms.get(k)) for k in keys):
            raise ValueError(f"transforms must be a dict with callables under 'v0', 'v1' and 'r' "
                             f"(data.transforms.train_transforms), got {transforms!r}")
        self.batches = _check_batches(batches, 3, "batches")
        _check_rows(self.batches[..., 0], len(vis), "batches[..., 0] (visible rows)")
        _check_rows(self.batches[..., 1], len(ir), "batches[..., 1] (infrared rows)")
        self.vis, self.ir, self.transforms, self.seed = vis, ir, transforms, _check_seed(seed)
        self.first = int(first_position)    # a share of the global batch: position j here is first + j there

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        if not 0 <= b < len(self.batches):
            raise IndexError(f"batch {b} out of range 0..{len(self.batches) - 1}")
        b = int(b)
        pairs = self.batches[b]                                   # [B, 2]
        load = _Cache()
        v0, v1, r = [], [], []
        for j, (row_vis, row_ir) in enumerate(pairs.tolist()):   # per image: decode + augment
            img = load(self.vis.paths[row_vis])
            rng = sample_generator(self.seed, b, self.first + j)
            v0.append(self.transforms["v0"](img, rng))
            v1.append(self.transforms["v1"](img, rng))
            r.append(self.transforms["r"](load(self.ir.paths[row_ir]),
                                          sample_generator(self.seed, b, self.first + j, infrared=True)))
        return {"v0": torch.stack(v0), "v1": torch.stack(v1), "r": torch.stack(r),
                "vis_index": torch.from_numpy(pairs[:, 0].copy()),
                "ir_index": torch.from_numpy(pairs[:, 1].copy())}
