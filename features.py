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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def extract_features(model_fn, images, height, width, batch_size=64, device="cpu", flip=True,
                     num_workers=0, desc=None, interpolation="bilinear", progress=True, cache=None, out_device="cpu",
                     amp="off"):
    """Test features of an ImageList (docs/mult.md (9.1)) -> float32 [N, D] on `out_device` (the CPU), rows in
    list order. out_device = device keeps them there, and the extraction waits for the device once, at the end,
    where it checks every feature finite (train.py's clustering input), not for each batch.
    interpolation: of the resize to height x width ("bilinear" as MULT's code; MBMIL's resizes bicubic).
    cache: None, or a data.fast.cache.ImageCache holding every image of `images` at that size and interpolation
    (train.py's decode-once training cache): the images are read from it, not decoded again, and travel to the
    device as uint8 (a quarter of float32's bytes), where ToTensor and Normalize run; the same pixels and values.

    amp: "bf16" or "fp16" runs model_fn under that autocast (train.py's --amp); the features leave it as float32.

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
    prepare = None
    if cache is None:
        loader = torch.utils.data.DataLoader(ImageDataset(images, transform), batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, pin_memory=pin)
    else:                  # whole batches of uint8 from the cache, the same batches as above once normalised
        data = CachedImageDataset(images, cache, transform, batch_size, as_bytes=True)
        loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=num_workers,
                                             pin_memory=pin)
        prepare = data.normalize
    out = None
    with torch.no_grad():
        for x, index in tqdm(loader, desc=desc or "features", unit="batch", file=sys.stderr, disable=not progress):
            f = batch_features(model_fn, x, images.modality, device, flip, prepare, amp)   # [B, D], on the device
            if out is None:
                out = torch.empty(len(images), f.shape[1], device=out_device)
            out[index.to(out.device, non_blocking=True)] = f.to(out.device)
        if not torch.isfinite(out).all():
            raise ValueError(f"model_fn returned NaN/inf features (modality {images.modality}); check the "
                             "checkpoint and the input normalisation")
    return out


def batch_features(model_fn, x, modality, device, flip=True, prepare=None, amp="off"):
    """One batch's test features on `device`: x [B, 3, H, W] as the loader gives it (uint8 with `prepare`, which
    makes it the float images there) -> [B, D] float32, L2-normalised, flip-averaged with `flip`. Nothing in it
    reads the device back (tests/test_fake_device.py runs it on a "cuda" FakeTensor)."""
    x = x.to(device, non_blocking=True)                             # [B, 3, H, W]
    if prepare is not None:
        x = prepare(x)                                              # uint8 -> float32, on the device
    with torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES.get(amp), enabled=amp != "off"):
        f = _model_output(model_fn, x, modality)                    # [B, D] float32
        if flip:
            f = (f + _model_output(model_fn, torch.flip(x, dims=[3]), modality)) / 2
    return F.normalize(f, dim=1)


def pixel_model(x, modality):
    """The trivial baseline: the normalised image average-pooled to 16 x 8, flattened,
    L2-normalised. x [B, 3, H, W] -> [B, 384]; `modality` is unused."""
    return F.normalize(F.adaptive_avg_pool2d(x, (16, 8)).flatten(1), dim=1)


def _model_output(model_fn, x, modality):
    """model_fn(x, modality), checked: a [B, D] tensor, as float32 (whether finite: once, at the end)."""
    f = model_fn(x, modality)
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"model_fn: expected a [B, D] tensor for B = {x.shape[0]} images, got {shape}")
    return f.float()
