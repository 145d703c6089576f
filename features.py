"""Feature extraction of a list of images, shared by training (the clustering input) and evaluation.

MULT (He et al., IJCV 2024), docs/mult.md (9.1), which MBMIL (Wang et al., AAAI 2026) shares: the test feature
of an image is the eval-mode feature of the image and of its horizontal flip, averaged and L2-normalised again.
Training clusters the features of the images alone (no flip).

    feats = extract_features(model.modality_fn(), images, 288, 144, device="cuda")   # [N, D], rows in list order
"""
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.fast.loader import CachedImageDataset
from data.loader import ImageDataset
from data.transforms import test_transform


def extract_features(model_fn, images, height, width, batch_size=64, device="cpu", flip=True,
                     num_workers=0, desc=None, interpolation="bilinear", progress=True, cache=None):
    """Test features of an ImageList (docs/mult.md (9.1)) -> float32 [N, D] on the CPU, rows in list order.
    interpolation: of the resize to height x width ("bilinear" as MULT's code; MBMIL's resizes bicubic).
    cache: None, or a data.fast.cache.ImageCache holding every image of `images` at that size and interpolation
    (train.py's decode-once training cache): the images are read from it, not decoded again; the same pixels.

    model_fn(x [B, 3, H, W] on `device`, modality) -> [B, D] eval features; with `flip` the
    feature of the image and of its horizontal flip are averaged, then L2-normalised again.
    The caller puts its model in eval mode; this runs under torch.no_grad().
    """
    if len(images) == 0:
        raise ValueError("extract_features: `images` is empty; expected at least one image")
    if batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    pin = torch.device(device).type == "cuda"
    transform = test_transform(height, width, interpolation)
    if cache is None:
        loader = torch.utils.data.DataLoader(ImageDataset(images, transform), batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, pin_memory=pin)
    else:                  # whole batches from the cache, the same batches as above
        loader = torch.utils.data.DataLoader(CachedImageDataset(images, cache, transform, batch_size),
                                             batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin)
    out = None
    with torch.no_grad():
        for x, index in tqdm(loader, desc=desc or "features", unit="batch", file=sys.stderr, disable=not progress):
            x = x.to(device, non_blocking=True)                     # [B, 3, H, W]
            f = _model_output(model_fn, x, images.modality)         # [B, D]
            if flip:
                f = (f + _model_output(model_fn, torch.flip(x, dims=[3]), images.modality)) / 2
            f = F.normalize(f, dim=1).cpu()
            if out is None:
                out = torch.empty(len(images), f.shape[1])
            out[index] = f
    return out


def pixel_model(x, modality):
    """The trivial baseline: the normalised image average-pooled to 16 x 8, flattened,
    L2-normalised. x [B, 3, H, W] -> [B, 384]; `modality` is unused."""
    return F.normalize(F.adaptive_avg_pool2d(x, (16, 8)).flatten(1), dim=1)


def _model_output(model_fn, x, modality):
    """model_fn(x, modality), checked: a finite [B, D] tensor, as float32."""
    f = model_fn(x, modality)
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"model_fn: expected a [B, D] tensor for B = {x.shape[0]} images, got {shape}")
    if not torch.isfinite(f).all():
        raise ValueError(f"model_fn returned NaN/inf features (modality {modality}); check the "
                         "checkpoint and the input normalisation")
    return f.float()
