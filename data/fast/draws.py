"""Per-sample augmentation parameters for the batched pipeline, drawn with the very calls of data/transforms.py.

MULT (He et al., IJCV 2024) and MBMIL (Wang et al., AAAI 2026): the training pipelines of
`data.transforms.train_transforms`. data/fast/batched.py applies each step to a whole batch at once; its parameters
are drawn here sample by sample, from the generator the per-image pipeline uses (data/loader.py:
np.random.default_rng([seed, b, j]) for visible image j of batch b, v0's steps then v1's; [seed, b, j, 1] for
the infrared one), with the same calls in the same order. Every sample therefore gets the crop, flip, jitter
factors, rectangles and channel choices that TrainBatches gives it, and a batch stays a pure function of
(seed, b, the index rows), whatever the worker count or device.

Only LinearTransform (MULT stage one, v0) draws depending on the image: one Beta draw per channel whose maximum
inside a rectangle is > 0, and the loop ends when min(M) <= tmin, M the product of the factors b / m. Its
`resolve_linear` reproduces that loop for a batch without running it on the pixels:
1. rectangles and Beta draws are drawn ahead, 16 per image first, with the generator state saved after each;
   "max inside > 0" is a property of the uint8 image (a positive value stays positive: the factors are > 0);
2. the edges of the drawn rectangles cut the image into a grid of cells; every factor is constant on a cell, so
   M lives on that grid (at most (2K+1)^2 cells), and each cell's maximum of x is the cell's maximum of the
   uint8 image, through the same float divisions and multiplications: both are monotone, so the maximum of
   x over a rectangle (the m of the next step) is exact;
3. the loop runs on the grid, all images in step, finds each image's stopping rectangle, and rewinds its
   generator to the state saved there; images still running draw 8 more rectangles and repeat; one still
   running after 64 (an all-black crop never stops) runs the per-image loop itself.
The resulting M (with its grid) is the per-image loop's mask bit for bit; data/fast/batched.py multiplies.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import transforms as T


@dataclass
class Recipe:
    """One view's pipeline as the batched steps read it (parsed from a data.transforms.Compose).

    Steps: Resize (done by the cache), Pad(pad), RandomCrop(H x W), RandomHorizontalFlip(flip),
    [jitter: ColorJitter], ToTensor, [linear: LinearTransform], Normalize(mean, std), [erase: RandomErasing],
    [mix: ChannelExchange or ChannelAdapGray].
    """
    height: int
    width: int
    interpolation: str
    pad: int
    flip: float
    jitter: object
    linear: object
    mean: tuple
    std: tuple
    erase: object
    mix: object


def parse_recipe(pipeline):
    """data.transforms.Compose of train_transforms -> Recipe; ValueError for any other sequence of steps."""
    steps = list(getattr(pipeline, "steps", []))
    names = [type(s).__name__ for s in steps]
    want = "Resize, Pad, RandomCrop, RandomHorizontalFlip, [ColorJitter], ToTensor, [LinearTransform], " \
           "Normalize, [RandomErasing], [ChannelExchange | ChannelAdapGray]"
    fail = ValueError(f"the batched pipeline runs the step sequences of data.transforms.train_transforms "
                      f"({want}); got {names}")
    types = [T.Resize, T.Pad, T.RandomCrop, T.RandomHorizontalFlip]
    if len(steps) < 6 or any(not isinstance(s, t) for s, t in zip(steps, types)):
        raise fail
    resize, pad, crop, flip = steps[:4]
    rest = steps[4:]
    optional = lambda cls: rest.pop(0) if rest and isinstance(rest[0], cls) else None
    jitter = optional(T.ColorJitter)
    if not optional(T.ToTensor):
        raise fail
    linear = optional(T.LinearTransform)
    normalize = optional(T.Normalize)
    erase = optional(T.RandomErasing)
    mix = optional((T.ChannelExchange, T.ChannelAdapGray))
    if normalize is None or rest or [crop.height, crop.width] != resize.size:
        raise fail
    if jitter is not None and linear is not None:   # LinearTransform's draws are resolved on the uint8 crop
        raise ValueError("the batched pipeline runs LinearTransform only on the crop itself, not after "
                         f"ColorJitter; got {names}")
    return Recipe(crop.height, crop.width, resize.interpolation, pad.pad, flip.p, jitter, linear,
                  tuple(normalize.mean), tuple(normalize.std), erase, mix)


# ---------------------------------------------------------------------------------------------------
# Draws of one sample: the calls of each step's __call__ in data/transforms.py, in order

def draw_head(recipe, rng):
    """Pad + RandomCrop, flip, ColorJitter: (top, left, flip, jitter order or None, jitter factors)."""
    side_h, side_w = recipe.height + 2 * recipe.pad, recipe.width + 2 * recipe.pad
    top = int(rng.integers(0, side_h - recipe.height + 1))
    left = int(rng.integers(0, side_w - recipe.width + 1))
    flip = bool(rng.random() < recipe.flip)
    order, factors = None, (np.nan,) * 4
    if recipe.jitter is not None:
        order = tuple(int(k) for k in rng.permutation(4))
        factors = []
        for k, v in enumerate(recipe.jitter.values):   # a 0 value is skipped without a draw
            low, high = (-v, v) if k == 3 else (max(0.0, 1 - v), 1 + v)
            factors.append(np.nan if v == 0 else float(rng.uniform(low, high)))
    return top, left, flip, order, tuple(factors)


def draw_linear_gate(recipe, rng):
    """LinearTransform's first draw: True when it runs on this image."""
    return not rng.random() > recipe.linear.p


def draw_tail(recipe, rng):
    """RandomErasing, then the channel step: (rectangle (top, left, h, w) or None, mix code).

    mix code: -1 channels unchanged, 0/1/2 that channel in all three, 3 grey in all three.
    """
    rect = None
    if recipe.erase is not None and not rng.random() > recipe.erase.p:
        e = recipe.erase
        for _ in range(e.max_tries):
            rect = T._draw_rectangle(recipe.height, recipe.width, rng, e.area, e.ratio)
            if rect is not None:
                break
    mix = -1
    if isinstance(recipe.mix, T.ChannelExchange):
        k = int(rng.integers(0, recipe.mix.gray + 1))
        mix = k if k <= 2 else 3
    elif isinstance(recipe.mix, T.ChannelAdapGray):
        k = int(rng.integers(0, 4))
        mix = k if k <= 2 else (3 if rng.random() <= recipe.mix.p else -1)
    return rect, mix


# ---------------------------------------------------------------------------------------------------
# LinearTransform, all images of a batch at once

@dataclass
class LinearMasks:
    """The final mask M of LinearTransform per image, on the grid of its rectangles' edges.

    mask:    float32 [B, 3, G_y, G_x], M of each cell (1 outside every rectangle and in padding cells)
    rows:    int64 [B, H] grid row of every image row
    columns: int64 [B, W] grid column of every image column
    steps:   int64 [B] rectangles applied (0 where the transform did not run)
    """
    mask: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    steps: torch.Tensor


def resolve_linear(lt, crops, gate, rngs, zeros, pad, first=16, more=8, limit=64):
    """LinearTransform's loop for every image with gate[j], consuming rngs[j] exactly as the per-image loop.

    lt:    the data.transforms.LinearTransform step
    crops: uint8 CPU tensor [B, 3, H, W], the padded, cropped, flipped images (x = crops / 255 is its input)
    gate:  bool [B], the transform's own first draw (draw_linear_gate) said it runs
    rngs:  B np.random.Generators, each right after that draw; left right after the loop's last draw
    zeros: int [B, 3], 0 values of each channel of the source image (data.fast.cache.ImageCache.zeros); pad: the
           crop's pad
    first, more: rectangles drawn ahead per image in the first round, and added per further round
    limit: an image still running after this many rectangles (rare: a 288 x 144 image needs 6 to 28; an
           all-zero one never stops) runs the per-image loop instead, from its first draw
    Returns LinearMasks.
    """
    b_count, _, height, width = crops.shape
    pixels = crops.numpy()
    zeros = zeros.tolist()
    draws = [_Draws() for _ in range(b_count)]
    final = [None] * b_count                 # per image: (row edges, column edges, M per cell [3, G_y, G_x])
    running, quota = [j for j in range(b_count) if gate[j]], first
    begin = {j: rngs[j].bit_generator.state for j in running}
    while running:
        for j in running:                    # draw ahead: `quota` more rectangles per running image
            draws[j].ahead(lt, pixels[j], zeros[j], pad, rngs[j], quota)
        stops, grids = _run_on_grid(lt, pixels[running], [draws[j] for j in running], height, width)
        still = []
        for j, k, grid in zip(running, stops, grids):
            if k >= 0:                       # stopped at rectangle k: rewind to the state saved after it
                rngs[j].bit_generator.state = draws[j].states[k]
                draws[j].keep(k + 1)
                final[j] = grid
            elif draws[j].attempts >= lt.max_iter:   # max_iter draws without stopping: all rectangles apply
                final[j] = grid
            elif len(draws[j].rects) >= limit:
                rngs[j].bit_generator.state = begin[j]
                final[j], draws[j].rects = _loop(lt, crops[j], rngs[j])
            else:
                still.append(j)
        running, quota = still, more
    steps = torch.tensor([len(d.rects) for d in draws], dtype=torch.int64)
    return _pack(final, height, width, steps)


class _Draws:
    """One image's rectangles drawn so far, with their positive channels, Beta draws and generator states."""

    def __init__(self):
        self.rects, self.positive, self.beta, self.states = [], [], [], []
        self.attempts, self.bound = 0, 1.0

    def ahead(self, lt, image, zeros, pad, rng, quota):
        """Up to `quota` more accepted rectangles (attempts capped at lt.max_iter), as the loop draws them.

        image: uint8 [3, H, W]; zeros: the number of 0 values of each channel in the source image (a crop
        adds only padding). A channel is > 0 in the rectangle (m_c > 0) for sure when the rectangle has more
        pixels than there can be zeros in it: the source's zeros plus the padding rows and columns it crosses;
        otherwise the pixels decide. The state is saved only where the loop could stop: M >= the product of
        each rectangle's smallest b (every factor b / m >= b, as m <= 1), so while that is > tmin it cannot.
        """
        height, width = image.shape[1:]
        (a0, a1), ratio = lt.area, lt.ratio
        for _ in range(quota):
            rect = None
            while rect is None and self.attempts < lt.max_iter:
                self.attempts += 1                           # T._draw_rectangle, inlined: the same draws
                u = rng.random(2)                            # rng.uniform(lo, hi) is lo + (hi - lo) * random()
                target = (a0 + (a1 - a0) * u[0]) * height * width
                aspect = ratio + (1 / ratio - ratio) * u[1]
                h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if h < height and w < width:
                    rect = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
            if rect is None:
                return
            top, left, h, w = rect
            room = h * w - pad * (h + w)
            positive = [z < room or bool(image[c, top:top + h, left:left + w].any()) for c, z in enumerate(zeros)]
            if all(positive):
                b = rng.beta(0.5, 0.5, size=3).astype(np.float32)
            else:
                b = np.ones(3, dtype=np.float32)
                if any(positive):
                    b[positive] = rng.beta(0.5, 0.5, size=sum(positive)).astype(np.float32)
            self.bound *= float(b.min())
            self.rects.append(rect)
            self.positive.append(positive)
            self.beta.append(b)
            self.states.append(rng.bit_generator.state if self.bound <= lt.tmin else None)

    def keep(self, k):
        del self.rects[k:], self.positive[k:], self.beta[k:], self.states[k:]


def _loop(lt, crop, rng):
    """The per-image loop itself on one image (data.transforms.LinearTransform, after its first draw), keeping
    its mask: ((row edges, column edges, M per pixel [3, H, W]), rectangles)."""
    x = crop.float().div_(255)
    mask, rects = torch.ones_like(x), []
    height, width = x.shape[1:]
    for _ in range(lt.max_iter):
        rect = T._draw_rectangle(height, width, rng, lt.area, lt.ratio)
        if rect is None:
            continue
        top, left, h, w = rect
        rects.append(rect)
        region = x[:, top:top + h, left:left + w]
        peak = region.amax(dim=(1, 2))
        positive = peak > 0
        b = torch.ones_like(peak)
        if int(positive.sum()):
            b[positive] = torch.from_numpy(rng.beta(0.5, 0.5, size=int(positive.sum()))).to(x.dtype)
        peak = torch.where(positive, peak, torch.ones_like(peak))
        region.div_(peak[:, None, None]).mul_(b[:, None, None])
        mask[:, top:top + h, left:left + w].mul_((b / peak)[:, None, None])
        if mask.min() <= lt.tmin:
            break
    return (np.arange(height + 1), np.arange(width + 1), mask), rects


def _run_on_grid(lt, pixels, draws, height, width):
    """The per-image loop on each image's grid of rectangle edges, all images in step.

    pixels: uint8 [n, 3, H, W]; draws: n _Draws. Returns (index of the stopping rectangle or -1, per image),
    and per image (row edges, column edges, M per cell float32 [3, G_y, G_x]) after the loop.
    """
    n = len(draws)
    ys, xs = [], []                                              # sorted edges, 0 ... H and 0 ... W
    for d in draws:
        r = np.asarray(d.rects, dtype=np.int64).reshape(-1, 4)
        ys.append(np.unique(np.concatenate([[0, height], r[:, 0], r[:, 0] + r[:, 2]])))
        xs.append(np.unique(np.concatenate([[0, width], r[:, 1], r[:, 1] + r[:, 3]])))
    kmax = max(len(d.rects) for d in draws)
    gy, gx = max(len(y) for y in ys) - 1, max(len(x) for x in xs) - 1
    y_end = np.full((n, gy), height - 1, dtype=np.int64)        # last row / column of each cell (padded)
    x_end = np.full((n, gx), width - 1, dtype=np.int64)
    bounds = np.zeros((n, kmax, 4), dtype=np.int64)              # rectangle k: grid rows [y0, y1), cols [x0, x1)
    beta = np.ones((n, kmax, 3), dtype=np.float32)
    drawn = np.zeros((n, kmax, 3), dtype=bool)
    for i, d in enumerate(draws):
        y_end[i, :len(ys[i]) - 1] = ys[i][1:] - 1
        x_end[i, :len(xs[i]) - 1] = xs[i][1:] - 1
        if d.rects:
            r = np.asarray(d.rects, dtype=np.int64)
            bounds[i, :len(r)] = np.stack([np.searchsorted(ys[i], r[:, 0]),
                                           np.searchsorted(ys[i], r[:, 0] + r[:, 2]),
                                           np.searchsorted(xs[i], r[:, 1]),
                                           np.searchsorted(xs[i], r[:, 1] + r[:, 3])], axis=1)
            beta[i, :len(r)], drawn[i, :len(r)] = d.beta, d.positive
    x = cell_maxima(torch.from_numpy(pixels), torch.from_numpy(y_end), torch.from_numpy(x_end))
    x = x.float().div_(255)                                      # max of x per cell, as ToTensor makes it
    bounds, beta, drawn = torch.from_numpy(bounds), torch.from_numpy(beta), torch.from_numpy(drawn)
    count = torch.tensor([len(d.rects) for d in draws])
    mask = torch.ones(n, 3, gy, gx)                              # M per cell, of every image at its end
    stop = torch.full((n,), -1, dtype=torch.int64)
    ar_y, ar_x = torch.arange(gy, dtype=torch.float32), torch.arange(gx, dtype=torch.float32)
    ids, m = torch.arange(n), mask.clone()                       # the images still in the loop, their M
    for k in range(kmax):
        active = (k < count[ids]) & (stop[ids] < 0)
        if not bool(active.any()):
            break
        if 2 * int(active.sum()) <= len(ids):                    # drop the images that left the loop
            mask[ids[~active]] = m[~active]
            ids, x, m, active = ids[active], x[active], m[active], active[active]
        y0, y1, x0, x1 = bounds[ids, k].float().unbind(1)
        in_rows = ((ar_y >= y0[:, None]) & (ar_y < y1[:, None]) & active[:, None]).float()    # [m, G_y]
        in_cols = ((ar_x >= x0[:, None]) & (ar_x < x1[:, None])).float()                      # [m, G_x]
        inside = in_rows[:, None, :, None] * in_cols[:, None, None, :]   # [m, 1, G_y, G_x], 0 or 1
        peak = (x * inside).amax(dim=(2, 3))                     # m_c = max of x inside, [m, 3]; x >= 0
        positive = peak > 0
        if not torch.equal(positive[active], drawn[ids[active], k]):
            raise RuntimeError("LinearTransform: a rectangle's maximum underflowed to 0 after scaling; the "
                               "batched draws cannot follow the per-image loop on this image")
        peak += (~positive).float()                              # where(positive, m, 1): m = 0 there
        b = beta[ids, k]
        x.lerp_(x.div(peak[:, :, None, None]).mul_(b[:, :, None, None]), inside)   # region.div_(m).mul_(b)
        m.lerp_(m * (b / peak)[:, :, None, None], inside)        # lerp is exact at weights 0 and 1
        done = active & (m.amin(dim=(1, 2, 3)) <= lt.tmin)
        stop[ids[done]] = k
    mask[ids] = m
    grids = [(ys[i], xs[i], mask[i, :, :len(ys[i]) - 1, :len(xs[i]) - 1]) for i in range(n)]
    return stop.tolist(), grids


def cell_maxima(images, y_end, x_end):
    """Maximum of every grid cell: uint8 [n, 3, G_y, G_x].

    images: uint8 [n, 3, H, W]; y_end: int64 [n, G_y], last row of each cell row (increasing, the last H - 1);
    x_end: int64 [n, G_x], last column of each cell column. A running maximum down the rows restarts at each
    cell row (values are >= 0, so a restart is max(0 * previous, row)); the rows at y_end hold the cell rows'
    maxima; then the same across the columns.
    """
    return _segment_max(_segment_max(images, y_end, 2), x_end, 3)


def _segment_max(x, ends, dim):
    """Segmented maximum of x along dim, the segments of image i ending at ends[i] (inclusive)."""
    n, length = x.shape[0], x.shape[dim]
    start = torch.zeros(n, length + 1, dtype=torch.bool).scatter_(1, ends + 1, True)[:, :length]
    start[:, 0] = True
    keep = (~start).to(x.dtype).t().contiguous()                 # [L, n]: 0 where a segment starts
    order = [dim] + [d for d in range(x.dim()) if d != dim]
    run = x.permute(order).contiguous()                          # [L, n, ...]: each step one contiguous block
    shape = [n] + [1] * (x.dim() - 2)
    for i in range(1, length):
        torch.maximum(run[i - 1] * keep[i].view(shape), run[i], out=run[i])
    index = ends.t().reshape(ends.shape[1], n, *([1] * (x.dim() - 2))).expand(ends.shape[1], *run.shape[1:])
    out = torch.gather(run, 0, index)                            # [G, n, ...]
    return out.permute([order.index(d) for d in range(x.dim())])


def _pack(final, height, width, steps):
    """LinearMasks of all images; an image without the transform gets one cell with M = 1."""
    grids = [g if g is not None else (np.array([0, height]), np.array([0, width]), torch.ones(3, 1, 1))
             for g in final]
    n = len(grids)
    gy, gx = max(len(g[0]) for g in grids) - 1, max(len(g[1]) for g in grids) - 1
    mask = torch.ones(n, 3, gy, gx)
    rows = torch.zeros(n, height, dtype=torch.int64)
    columns = torch.zeros(n, width, dtype=torch.int64)
    for i, (ys, xs, m) in enumerate(grids):
        mask[i, :, :m.shape[1], :m.shape[2]] = m
        rows[i] = torch.from_numpy(np.repeat(np.arange(len(ys) - 1), np.diff(ys)))
        columns[i] = torch.from_numpy(np.repeat(np.arange(len(xs) - 1), np.diff(xs)))
    return LinearMasks(mask, rows, columns, steps)
