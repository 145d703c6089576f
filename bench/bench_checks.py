"""Benchmark of the checks a run makes before its first epoch that issue 26 added, at SYSU-MM01's size.

SYSU-MM01 trains on 34,167 images (22,258 visible, 11,909 infrared); its decode-once cache at 288x144 is
34,167 x 3 x 288 x 144 uint8 = 4.25 GB; its test protocol reads 3,803 queries and 6,775 gallery candidates.
This script writes that many source JPEGs (--source-size, 128x256 by default; SYSU-MM01's crops vary, so the
bytes hashed are printed and the rate per GB with them) and a cache file of that size into --folder, then times:
- the training set's fingerprint (data.common.file_keys; checks.training_fingerprint): a fresh run reads and
  hashes (SHA-1) every training file; a resume, whose checkpoint holds the fingerprint, stats them only;
- the cache's verification when a run reuses it (data.fast.cache: the CRC-32 of every row, in threads), with the
  file in the page cache (warm) and evicted from it first (cold, posix_fadvise DONTNEED: read from the disk);
- the check's decoding of every gallery candidate, not only the drawn ones: the extra images, counted by
  drawing SYSU-MM01's 301 all-search (identity, camera) groups with data.sysu.sysu_gallery_draw for trials
  0..9 of both modes, times the decode rate measured here on the source JPEGs;
- the model checks: a checkpoint's tensors against a meta-device model, a --pretrained file against the arch;
- the note on tiny and odd-shaped images, over the sizes of 44,745 images.

    python bench/bench_checks.py                          # SYSU-MM01 size: about 6 GB written to --folder
    python bench/bench_checks.py --images 3000            # smaller; the figures scale with the count

Cold figures depend on the disk under --folder; warm ones on the CPU (hashing and CRC in threads: cores used
are printed). The load average is printed with the results.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import VIS, ImageList, file_keys, read_image  # noqa: E402
from data.fast import cache as C  # noqa: E402
from data.sysu import sysu_gallery_draw  # noqa: E402
from model import TwoStreamNet  # noqa: E402
from plumbing.checkpoints import check_backbone_file, check_model_fits  # noqa: E402
from plumbing.checks import odd_images  # noqa: E402

SYSU = {"train": 34167, "queries": 3803, "candidates": 6775, "groups": 301, "height": 288, "width": 144}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=SYSU["train"], help="training images (34167, SYSU-MM01's)")
    p.add_argument("--source-size", type=str, default="128x256", help="WxH of the source JPEGs (128x256)")
    p.add_argument("--folder", type=str, default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    w, h = map(int, args.source_size.split("x"))
    root = tempfile.mkdtemp(prefix="bench_checks_", dir=args.folder)
    try:
        run(args.images, (w, h), root)
    finally:
        shutil.rmtree(root)


def run(n, size, root):
    print(f"{n} training images of {size[0]}x{size[1]} JPEG in {root}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    paths = write_jpegs(n, size, os.path.join(root, "images"))
    total = sum(os.path.getsize(p) for p in paths)
    rows = {}

    # the fingerprint: a fresh run hashes every file, a resume stats them
    evict(paths)
    t = time.perf_counter()
    keys = file_keys(paths)
    rows["fingerprint, fresh run, cold"] = time.perf_counter() - t
    t = time.perf_counter()
    keys = file_keys(paths)
    rows["fingerprint, fresh run, warm"] = time.perf_counter() - t
    known = dict(zip(paths, keys))
    t = time.perf_counter()
    file_keys(paths, known)
    rows["fingerprint, resume (stat only)"] = time.perf_counter() - t

    # the cache's verification at the training size
    shape = (n, 3, SYSU["height"], SYSU["width"])
    cache = os.path.join(root, "vis.u8")
    pixels = np.memmap(cache, dtype=np.uint8, mode="w+", shape=shape)
    block = np.random.default_rng(0).integers(0, 256, (256,) + shape[1:], dtype=np.uint8)
    for i in range(0, n, len(block)):
        pixels[i:i + len(block)] = block[:n - i]
    pixels.flush()
    del pixels
    evict([cache])
    rows["cache verification, cold"] = verify(cache, shape)
    rows["cache verification, warm"] = verify(cache, shape)

    # the extra gallery candidates the check decodes now, and the rate they decode at
    extra = extra_candidates()
    sample = paths[:500]
    t = time.perf_counter()
    for path in sample:
        read_image(path)
    rate = len(sample) / (time.perf_counter() - t)
    rows[f"decoding {extra} more gallery candidates, one core"] = extra / rate

    # the model checks and the note on odd images
    weights = os.path.join(root, "r50.pth")
    torch.save(__import__("torchvision").models.resnet50(weights=None).state_dict(), weights)
    state = TwoStreamNet("resnet50").state_dict()
    t = time.perf_counter()
    check_model_fits(state, "resnet50", "bench")
    rows["checkpoint tensors against a meta-device resnet50"] = time.perf_counter() - t
    t = time.perf_counter()
    check_backbone_file(weights, "resnet50")
    rows["--pretrained file against the arch (torch.load + meta)"] = time.perf_counter() - t
    sizes = {f"/x/{i}.jpg": (64 + i % 80, 128 + i % 200) for i in range(SYSU["train"] + SYSU["queries"]
                                                                         + SYSU["candidates"])}
    t = time.perf_counter()
    odd_images(sizes, SYSU["height"], SYSU["width"])
    rows["note on tiny and odd-shaped images, 44,745 sizes"] = time.perf_counter() - t

    scale = SYSU["train"] / n
    print(f"source files: {total / 1e9:.3f} GB ({total / n / 1e3:.1f} KB a file); cache file: "
          f"{np.prod(shape) / 1e9:.2f} GB; decode rate {rate:.0f} images/s on one core")
    print(f"{'check':<58}{'seconds':>9}{'at 34,167 images':>18}")
    for name, seconds in rows.items():
        scaled = seconds * scale if ("fingerprint" in name or "cache" in name) else seconds
        print(f"{name:<58}{seconds:9.2f}{scaled:18.2f}")
    common = rows[f"decoding {extra} more gallery candidates, one core"] + rows[
        "checkpoint tensors against a meta-device resnet50"] + rows["note on tiny and odd-shaped images, 44,745 sizes"]
    fresh = rows["fingerprint, fresh run, warm"] * scale + common
    resume = (rows["fingerprint, resume (stat only)"] + rows["cache verification, warm"]) * scale + common
    resume_cold = (rows["fingerprint, resume (stat only)"] + rows["cache verification, cold"]) * scale + common
    print(f"added before the first epoch at 34,167 images: fresh run {fresh:.1f} s (its dataset in the page cache, "
          f"as the cache build then reads it); resume {resume:.1f} s (cache file in the page cache), "
          f"{resume_cold:.1f} s (cache file read from this disk: {np.prod(shape) * scale / 1e9:.2f} GB at "
          f"{np.prod(shape) / 1e9 / rows['cache verification, cold']:.1f} GB/s)")


def write_jpegs(n, size, folder):
    """n JPEGs of `size` (w, h): smooth colour fields with noise, 100 to a folder, as a dataset's files."""
    rng = np.random.default_rng(1)
    base = [Image.fromarray(rng.integers(0, 255, (8, 4, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
            for _ in range(16)]
    noise = rng.normal(0, 6, (size[1], size[0], 3))
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i // 100:04d}", f"{i:06d}.jpg")
        if i % 100 == 0:
            os.makedirs(os.path.dirname(path))
        arr = np.asarray(base[i % 16], dtype=np.float32) + np.roll(noise, i, axis=1)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def evict(paths):
    """Drop the files' pages from the page cache (written out first), so that the next read comes from the disk."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def verify(path, shape):
    pixels = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
    t = time.perf_counter()
    C._checksums(pixels, list(range(shape[0])), progress=False)
    return time.perf_counter() - t


def extra_candidates():
    """Gallery candidates of SYSU-MM01's all-search that no single-shot draw of trials 0..9 (all and indoor) picks:
    the images the check decodes now and did not before. 6,775 candidates in 301 (identity, camera) groups of
    near-equal size; indoor's groups are among them (taken as the first 112)."""
    sizes = [SYSU["candidates"] // SYSU["groups"] + (g < SYSU["candidates"] % SYSU["groups"])
             for g in range(SYSU["groups"])]
    pids = np.repeat(np.arange(len(sizes)), sizes)
    every = ImageList([f"{i}" for i in range(len(pids))], pids, np.ones(len(pids)), VIS)
    indoor = every.subset(np.flatnonzero(pids < 112))
    drawn = set()
    for trial in range(10):
        drawn.update(sysu_gallery_draw(every, trial).tolist())
        drawn.update(np.flatnonzero(pids < 112)[sysu_gallery_draw(indoor, trial)].tolist())
    return len(pids) - len(drawn)


if __name__ == "__main__":
    main()
