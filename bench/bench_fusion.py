"""Would a compiled, fused kernel make the CPU input pipeline much faster? Two of its costliest steps, eager
against torch.compile, bit for bit on the same images.

data/fast/batched.py runs every augmentation as eager PyTorch operations: one pass over the batch per operation
(ToTensor's division and Normalize in cache-sized blocks). A compiler that fuses all of a step's operations
into one loop per element would remove those passes. This script measures what that would give, with
PyTorch's own compiler (torch.compile, inductor: it writes C++ and needs a C++ compiler at run time), on the
SYSU preset's images (288x144, from bench/bench_input.py's source JPEGs and the decode-once cache), one core:
- tail: ToTensor's / 255, Normalize and random erasing of stage two's v0 view (144 images, data.fast.batched's
  normalize_ and erase_), against one compiled expression of the same operations;
- hue: ColorJitter's hue on the colour images of stage one's v1 view (data.fast.batched._hue: PIL's 8-bit HSV
  through two 64 MB tables made by PIL), against PIL's own float arithmetic for both conversions written as
  tensor operations (`pil_hue` below) and compiled. The two agree on every pixel of the batch; --exhaustive
  also checks all 2^24 RGB triples at a few hue shifts (about a minute);
- the floor: a fresh float32 batch of the same images written once.
Compilation is dynamic in the batch size (the parts of a view differ in size from batch to batch; the tail
also with static shapes), into a fresh cache folder: no kernels come from earlier runs. Every figure
is this process's CPU time (1 thread), the best of --repeats.

    python bench/bench_fusion.py
    python bench/bench_fusion.py --exhaustive
"""
import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")     # as train.py and bench/bench_input.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_input  # noqa: E402
from data.fast import batched as B  # noqa: E402
from data.fast import loader as L  # noqa: E402
from data import transforms  # noqa: E402
from data.fast.cache import build_cache  # noqa: E402


def fused_tail(crop, mean, std, fill, rect):
    """ToTensor, Normalize and random erasing of uint8 crops [m, 3, H, W] as one expression per element."""
    x = (crop.to(torch.float32) / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    rows = torch.arange(crop.shape[2], device=crop.device)[None, :, None]
    cols = torch.arange(crop.shape[3], device=crop.device)[None, None, :]
    top, left, h, w = (rect[:, k].view(-1, 1, 1) for k in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return torch.where(inside[:, None], fill[None, :, None, None], x)


def pil_hue(x, shift):
    """PIL's RGB -> HSV, the hue byte + shift (wrapping), HSV -> RGB, in PIL's own float32 / double steps.

    x: float32 [m, 3, H, W] holding 8-bit values; shift: int32 [m, 1, 1], data.fast.batched.hue_shift of the factor.
    To HSV: V = max; S = int(255 (max - min) / max); H = int(255 fmod(h / 6 + 1, 1)), h from the channels'
    distances to the maximum divided by max - min (float32), plus 2 or 4 (double) when green or blue is the
    maximum; a grey has H = S = 0. Back: sector i = floor(6 H / 255), f = 6 H / 255 - i (float32), and p, q, t =
    round(V w) with w = 1 - S / 255, 1 - f S / 255, 1 - (S - f S) / 255; the sector places V, p, q, t in the
    channels.
    """
    r, g, b = x.unbind(1)
    top = torch.maximum(torch.maximum(r, g), b)
    span = top - torch.minimum(torch.minimum(r, g), b)
    rc, gc, bc = (top - r) / span, (top - g) / span, (top - b) / span
    h = torch.where(r == top, bc - gc, torch.where(g == top, (2.0 + rc.double() - bc.double()).float(),
                                                     (4.0 + gc.double() - rc.double()).float()))
    h = torch.fmod(h.double() / 6.0 + 1.0, 1.0).float()
    grey = span == 0
    hue = torch.where(grey, 0, (h.double() * 255.0).trunc().clamp(0, 255).int())
    sat = torch.where(grey, 0.0, ((span / top).double() * 255.0).trunc().clamp(0, 255))
    sixth = ((hue + shift) & 255).double() * 6.0 / 255.0
    sector = sixth.floor()
    fs = (sixth - sector).float() * sat.float()
    v = top.double()
    p = (v * (1.0 - sat / 255.0) + 0.5).floor()
    q = (v * (1.0 - fs.double() / 255.0) + 0.5).floor()
    t = (v * (1.0 - (sat.float() - fs).double() / 255.0) + 0.5).floor()
    sector = sector.long() % 6

    def place(*by_sector):
        out = by_sector[5]
        for k in range(4, -1, -1):
            out = torch.where(sector == k, by_sector[k], out)
        return torch.where(sat == 0, v, out)

    return torch.stack([place(v, q, p, p, t, v), place(t, v, v, q, p, p), place(p, p, t, v, v, q)], 1).float()


def best_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times) * 1e3


def views(images, seed):
    """Stage two's v0 part and stage one's v1 colour part of one SYSU-preset batch (their plans)."""
    folder = tempfile.mkdtemp(prefix="bench_fusion_")
    vis, ir = bench_input.make_sources(folder, images, (64, 128), seed)
    caches = [build_cache(paths, 288, 144, "bilinear", progress=False) for paths in (vis, ir)]
    batches = bench_input.index_batches(images, images, 144, 2, np.random.default_rng(seed))
    parts = []
    for stage, key in ((2, "v0"), (1, "v1")):
        pipelines = transforms.train_transforms(288, 144, stage, "mult", pad=10)
        data = L.CachedTrainBatches(*caches, pipelines, batches, seed)
        parts.append((data, data.plan(1)[key]))
    return parts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600, help="generated source images per modality")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each (the best is printed)")
    ap.add_argument("--exhaustive", action="store_true", help="also check pil_hue on all 2^24 RGB triples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # inductor caches what it compiled across processes; a fresh folder makes the compile seconds a first compile's
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_fusion_inductor_"))
    (two, tail_part), (one, hue_parts) = views(args.images, args.seed)

    rec = two.recipes["v0"]
    crop, group = tail_part[0]["crop"], tail_part[0]["tail"][0]
    mean, std, fill = torch.tensor(rec.mean), torch.tensor(rec.std), rec.erase.fill

    def eager_tail():
        x = crop.to(torch.float32)
        B.normalize_(x, group["chan"], mean, std, from_bytes=True)
        return B.erase_(x, group["chan"], group["rect"], fill)

    colour = hue_parts[0]                                   # the colour images (grey ones have no hue)
    rgb = colour["crop"].to(torch.float32)
    f = colour["jitter"][1][:, 3]
    shift = B.hue_shift(f).view(-1, 1, 1)

    def eager_hue():
        x = rgb.clone()
        B._hue(x, f)                                        # in place
        return x

    rows = [("floor (one write)", len(crop), best_ms(lambda: torch.empty(crop.shape).copy_(crop), args.repeats),
             "")]
    rows.append(("tail, eager (data.fast.batched)", len(crop), best_ms(eager_tail, args.repeats), ""))
    rows.append(("hue, eager tables (data.fast.batched)", len(rgb), best_ms(eager_hue, args.repeats), ""))
    rows.append(("hue, eager PIL arithmetic", len(rgb), best_ms(lambda: pil_hue(rgb, shift), args.repeats), ""))
    try:
        for dynamic in (True, False):
            t = time.perf_counter()
            tail_c = torch.compile(fused_tail, dynamic=dynamic)
            same = torch.equal(tail_c(crop, mean, std, fill, group["rect"]), eager_tail())
            rows.append((f"tail, compiled ({'dynamic' if dynamic else 'static'} shapes)", len(crop),
                         best_ms(lambda: tail_c(crop, mean, std, fill, group["rect"]), args.repeats),
                         f"compile {time.perf_counter() - t:.0f} s; equal: {same}"))
        t = time.perf_counter()
        hue_c = torch.compile(pil_hue, dynamic=True)
        same = torch.equal(hue_c(rgb, shift), eager_hue())
        rows.append(("hue, compiled PIL arithmetic", len(rgb), best_ms(lambda: hue_c(rgb, shift), args.repeats),
                     f"compile {time.perf_counter() - t:.0f} s; equal: {same}"))
    except Exception as err:                               # no C++ compiler, or inductor cannot build here
        rows.append(("torch.compile", 0, float("nan"), f"unavailable: {type(err).__name__}: {err}"[:200]))

    print(f"\nSYSU preset 288x144, one core (CPU time, best of {args.repeats}; {bench_input.huge_pages()}); "
          "equal: bit for bit against data.fast.batched on these images")
    print("| step | images | ms | images/s per core | note |\n|---|---|---|---|---|")
    for name, n, ms, note in rows:
        print(f"| {name} | {n} | {ms:.1f} | {n / ms * 1e3 if n else float('nan'):.0f} | {note} |")

    if args.exhaustive:
        every = torch.arange(2 ** 24)
        triples = torch.stack([every >> 16, (every >> 8) & 255, every & 255]).float().view(1, 3, 4096, 4096)
        for f in (0.0, 0.1, -0.25, 0.5, -0.5):
            f = torch.tensor([f], dtype=torch.float64)
            shift = B.hue_shift(f).view(1, 1, 1)
            want = triples.clone()
            B._hue(want, f)
            wrong = int((pil_hue(triples, shift) != want).sum())
            print(f"all 2^24 triples, hue factor {float(f):+.2f}: {wrong} values differ from PIL's tables")


if __name__ == "__main__":
    main()
