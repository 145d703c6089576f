"""Training and test transforms with explicit random generators.

MULT (He et al., IJCV 2024): the official code's augmentation table, docs/mult.md §1.4.
MBMIL (Wang et al., AAAI 2026): the official code's pipelines, docs/mbmil.md §A.4.

Every step is a small class called as `step(x, rng)` with an `np.random.Generator`; nothing
here touches Python's, NumPy's or torch's global RNG, so an image's augmentation is a pure
function of its generator's seed (data/loader.py seeds one generator per image). Steps before
ToTensor act on PIL images, steps after it on float tensors [3, H, W]; tensor steps may modify
their input in place (it is always a fresh tensor from ToTensor).

Paper vs official code: the official code draws from Python's global `random` (erasing,
channel steps), NumPy's global RNG (Beta in LinearTransform) and torch's (crop, flip, jitter).
The distributions here are the same; the streams are not, so single draws differ.
"""
import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ERASE_FILL = (0.4914, 0.4822, 0.4465)   # written into *normalised* space (docs/mult.md §1.4)
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                   "lanczos": InterpolationMode.LANCZOS}


# The resize of training, extraction and testing by method: bilinear as MULT's code, bicubic as MBMIL's.
RESIZE = {"mult": "bilinear", "mbmil": "bicubic"}


class Compose:
    """Apply steps in order, passing the same generator to each: `Compose(steps)(img, rng)`."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.needs_rng = any(getattr(s, "needs_rng", True) for s in self.steps)

    def __call__(self, x, rng=None):
        if not isinstance(x, Image.Image):
            raise TypeError(f"transform input must be a PIL image (from data.common.read_image), "
                            f"got {type(x).__name__}")
        if self.needs_rng and not isinstance(rng, np.random.Generator):
            raise TypeError(f"this pipeline has random steps and needs rng, a "
                            f"numpy.random.Generator; got {type(rng).__name__}")
        for step in self.steps:
            x = step(x, rng)
        return x

    def __repr__(self):
        return "Compose(" + ", ".join(map(repr, self.steps)) + ")"


class Resize:
    """PIL image -> PIL image of exactly height x width."""
    needs_rng = False

    def __init__(self, height, width, interpolation="bilinear"):
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        self.size, self.interpolation = [height, width], interpolation

    def __call__(self, img, rng=None):
        return TF.resize(img, self.size, interpolation=_INTERPOLATIONS[self.interpolation])

    def __repr__(self):
        return f"Resize({self.size[0]}x{self.size[1]}, {self.interpolation})"


class Pad:
    """Zero-pad `pad` pixels on every side (PIL)."""
    needs_rng = False

    def __init__(self, pad=10):
        self.pad = pad

    def __call__(self, img, rng=None):
        return TF.pad(img, self.pad, fill=0)

    def __repr__(self):
        return f"Pad({self.pad})"


class RandomCrop:
    """Crop height x width at a uniformly drawn integer corner, both ends inclusive (PIL)."""

    def __init__(self, height, width):
        self.height, self.width = height, width

    def __call__(self, img, rng):
        w, h = img.size
        if h < self.height or w < self.width:
            raise ValueError(f"RandomCrop: image {h}x{w} is smaller than the crop "
                             f"{self.height}x{self.width}")
        top = int(rng.integers(0, h - self.height + 1))
        left = int(rng.integers(0, w - self.width + 1))
        return TF.crop(img, top, left, self.height, self.width)

    def __repr__(self):
        return f"RandomCrop({self.height}x{self.width})"


class RandomHorizontalFlip:
    """Mirror left-right with probability p (PIL)."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, rng):
        return TF.hflip(img) if rng.random() < self.p else img

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitter:
    """torchvision's ColorJitter with factors from `rng` (PIL).

    Factors: brightness, contrast, saturation ~ U[max(0, 1 - v), 1 + v], hue ~ U[-v, v]
    (hue 0.5 is the largest shift); the four adjustments run in a random order; a value of 0
    skips its adjustment, as in torchvision.
    """

    def __init__(self, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.5):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter: hue must be in [0, 0.5], got {hue}")
        self.values = (brightness, contrast, saturation, hue)

    def __call__(self, img, rng):
        order = rng.permutation(4)
        factors = []
        for k, v in enumerate(self.values):   # a 0 value skips that adjustment (no draw)
            low, high = (-v, v) if k == 3 else (max(0.0, 1 - v), 1 + v)
            factors.append(None if v == 0 else rng.uniform(low, high))
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for k in order:
            if factors[k] is not None:
                img = adjust[k](img, float(factors[k]))
        return img

    def __repr__(self):
        return "ColorJitter(b={}, c={}, s={}, h={})".format(*self.values)


class ToTensor:
    """PIL RGB uint8 -> float32 tensor [3, H, W] in [0, 1]."""
    needs_rng = False

    def __call__(self, img, rng=None):
        return TF.to_tensor(img)

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    """(x - mean) / std per channel, ImageNet statistics by default."""
    needs_rng = False

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = mean, std

    def __call__(self, x, rng=None):
        return TF.normalize(x, self.mean, self.std, inplace=True)

    def __repr__(self):
        return "Normalize()"


def _draw_rectangle(height, width, rng, area=(0.02, 0.4), ratio=0.3):
    """One random-erasing rectangle draw (docs/mult.md §1.4): (top, left, h, w) or None if rejected.

    target area a ~ U(area) * H * W, aspect r ~ U(ratio, 1 / ratio), h = round(sqrt(a * r)),
    w = round(sqrt(a / r)); accepted only if h < H and w < W, then the corner is uniform over
    the integer positions, both ends inclusive.
    """
    target = rng.uniform(area[0], area[1]) * height * width
    aspect = rng.uniform(ratio, 1 / ratio)
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if h >= height or w >= width:
        return None
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


class RandomErasing:
    """Channel random erasing (Zhong et al., AAAI 2020; docs/mult.md §1.4), on a normalised tensor.

    With probability p, try up to `max_tries` rectangle draws; fill the first accepted one with
    `fill`, one constant per channel. The constants are written into normalised space.
    """

    def __init__(self, p=0.5, area=(0.02, 0.4), ratio=0.3, fill=ERASE_FILL, max_tries=100):
        self.p, self.area, self.ratio, self.max_tries = p, area, ratio, max_tries
        self.fill = torch.tensor(fill, dtype=torch.float32)

    def __call__(self, x, rng):
        if rng.random() > self.p:
            return x
        for _ in range(self.max_tries):
            rect = _draw_rectangle(x.shape[1], x.shape[2], rng, self.area, self.ratio)
            if rect is not None:
                top, left, h, w = rect
                x[:, top:top + h, left:left + w] = self.fill.to(x)[:, None, None]
                return x
        return x

    def __repr__(self):
        return f"RandomErasing(p={self.p})"


def _grey(x):
    """0.2989 c0 + 0.5870 c1 + 0.1140 c2, [H, W]."""
    return GREY_WEIGHTS[0] * x[0] + GREY_WEIGHTS[1] * x[1] + GREY_WEIGHTS[2] * x[2]


class ChannelExchange:
    """Draw k uniform in {0..gray}; k <= 2 copies channel k, k >= 3 writes grey (docs/mult.md §1.4).

    With the official gray=2 the grey branch is unreachable, so the output is always one channel
    replicated three times.
    """

    def __init__(self, gray=2):
        if gray < 2:
            raise ValueError(f"ChannelExchange: gray must be >= 2, got {gray}")
        self.gray = gray

    def __call__(self, x, rng):
        k = int(rng.integers(0, self.gray + 1))
        single = x[k] if k <= 2 else _grey(x)
        return single.unsqueeze(0).repeat(3, 1, 1)

    def __repr__(self):
        return f"ChannelExchange(gray={self.gray})"


class ChannelAdapGray:
    """Draw k uniform in {0, 1, 2, 3}; k <= 2 replicates channel k; k = 3 writes grey with
    probability p, else leaves x unchanged (docs/mult.md §1.4). With p = 0.5: each channel 1/4,
    grey 1/8, unchanged 1/8.
    """

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, x, rng):
        k = int(rng.integers(0, 4))
        if k <= 2:
            return x[k].unsqueeze(0).repeat(3, 1, 1)
        if rng.random() <= self.p:   # official: unchanged iff u > p
            return _grey(x).unsqueeze(0).repeat(3, 1, 1)
        return x

    def __repr__(self):
        return f"ChannelAdapGray(p={self.p})"


class LinearTransform:
    """Random multiplicative region darkening of MULT, on a [0, 1] tensor before Normalize
    (docs/mult.md §1.4, stage one, v0 only).

    With probability p: M = 1 (per channel and pixel); repeat: draw a rectangle as in random
    erasing (rejected draws are simply redrawn); for each channel c whose maximum m_c inside it
    is > 0, draw b ~ Beta(0.5, 0.5) and multiply the region of channel c, and of M, by b / m_c
    (so the region's channel maximum becomes b); stop as soon as min(M) <= tmin.
    Values stay in [0, 1] (the region is divided by m_c, then multiplied by b <= 1).
    Paper vs official code: the official loop has no bound and never ends on an image with no
    positive pixel; here it stops after `max_iter` rectangle draws (a normal 288 x 144 image
    needs about 6-28 accepted rectangles).
    """

    def __init__(self, p=0.9, area=(0.02, 0.4), ratio=0.3, tmin=1e-6, max_iter=1000):
        self.p, self.area, self.ratio, self.tmin, self.max_iter = p, area, ratio, tmin, max_iter

    def __call__(self, x, rng):
        if rng.random() > self.p:
            return x
        mask = torch.ones_like(x)   # M, [3, H, W]
        for _ in range(self.max_iter):
            rect = _draw_rectangle(x.shape[1], x.shape[2], rng, self.area, self.ratio)
            if rect is None:
                continue
            top, left, h, w = rect
            region = x[:, top:top + h, left:left + w]            # view, [3, h, w]
            peak = region.amax(dim=(1, 2))                        # m_c, [3]
            positive = peak > 0
            n = int(positive.sum())
            if n:
                b = torch.ones_like(peak)                         # 1 = channel left alone
                b[positive] = torch.from_numpy(rng.beta(0.5, 0.5, size=n)).to(x.dtype)
                peak = torch.where(positive, peak, torch.ones_like(peak))
                region.div_(peak[:, None, None]).mul_(b[:, None, None])   # <= b <= 1, exactly
                mask[:, top:top + h, left:left + w].mul_((b / peak)[:, None, None])
            if mask.min() <= self.tmin:
                return x
        return x

    def __repr__(self):
        return f"LinearTransform(p={self.p})"


def _check_size(height, width):
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def crop_pad(height):
    """The random crop's zero padding: 10 px at the papers' 288-pixel height, scaled with the input, >= 1."""
    return max(1, round(10 * height / 288))


def train_transforms(height, width, stage, method="mult", pad=10):
    """The three training pipelines, each a callable (PIL image, rng) -> float tensor [3, H, W].

    stage:  1 or 2 (MULT: epochs < 40 / >= 40; MBMIL: its two training stages)
    method: "mult" (docs/mult.md §1.4 table) or "mbmil" (docs/mbmil.md §A.4)
    Returns {"v0": ..., "v1": ..., "r": ...}: two views of a visible image and one infrared image.
    MULT:  stage 1  v0 = geo, ToTensor, LinearTransform(0.9), Normalize, RE(0.9)
                    v1 = geo, ColorJitter, ToTensor, Normalize, RE(0.9), ChannelExchange
                    r  = geo, ColorJitter, ToTensor, Normalize, RE(0.9), ChannelAdapGray(0.5)
           stage 2  v0 = geo, ToTensor, Normalize, RE(0.5)
                    v1 = geo, ToTensor, Normalize, RE(0.5), ChannelExchange
                    r  = geo, ToTensor, Normalize, RE(0.5), ChannelAdapGray(0.5)
    MBMIL: v0 = geo, ToTensor, Normalize, RE(0.5)
           v1 = geo, ColorJitter, ToTensor, Normalize, RE(0.5), ChannelExchange
           r  = geo, [ColorJitter, stage 1 only], ToTensor, Normalize, RE(0.5), ChannelAdapGray(0.5)
    geo = Resize(H x W), Pad(pad), RandomCrop(H x W), RandomHorizontalFlip(0.5); pad = 10 px at the
    papers' 288 x 144 (a smaller input should scale it, as train.py does).
    Paper vs official code: MBMIL's code resizes bicubic (MULT's bilinear); we follow each code.
    """
    _check_size(height, width)
    if stage not in (1, 2) or isinstance(stage, bool):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if method not in ("mult", "mbmil"):
        raise ValueError(f"method must be 'mult' or 'mbmil', got {method!r}")

    interpolation = RESIZE[method]

    def geo():
        return [Resize(height, width, interpolation), Pad(pad), RandomCrop(height, width),
                RandomHorizontalFlip(0.5)]

    def tail():
        return [ToTensor(), Normalize()]

    if method == "mult" and stage == 1:
        v0 = geo() + [ToTensor(), LinearTransform(0.9), Normalize(), RandomErasing(0.9)]
        v1 = geo() + [ColorJitter()] + tail() + [RandomErasing(0.9), ChannelExchange(2)]
        r = geo() + [ColorJitter()] + tail() + [RandomErasing(0.9), ChannelAdapGray(0.5)]
    elif method == "mult":
        v0 = geo() + tail() + [RandomErasing(0.5)]
        v1 = geo() + tail() + [RandomErasing(0.5), ChannelExchange(2)]
        r = geo() + tail() + [RandomErasing(0.5), ChannelAdapGray(0.5)]
    else:
        jitter_ir = [ColorJitter()] if stage == 1 else []
        v0 = geo() + tail() + [RandomErasing(0.5)]
        v1 = geo() + [ColorJitter()] + tail() + [RandomErasing(0.5), ChannelExchange(2)]
        r = geo() + jitter_ir + tail() + [RandomErasing(0.5), ChannelAdapGray(0.5)]
    return {"v0": Compose(v0), "v1": Compose(v1), "r": Compose(r)}


def test_transform(height, width, interpolation="bilinear"):
    """Feature-extraction / test pipeline (docs/mult.md §1.4): Resize, ToTensor, Normalize.

    Returns a callable PIL image -> float tensor [3, H, W] (no randomness; rng not needed).
    """
    _check_size(height, width)
    return Compose([Resize(height, width, interpolation), ToTensor(), Normalize()])


test_transform.__test__ = False   # the name starts with "test_": keep pytest from collecting it
