"""Benchmark of the training input pipeline: images/s per core against the backbone's forward + backward.

MULT (He et al., IJCV 2024) §1.4 augmentations per stage, MBMIL (Wang et al., AAAI 2026) its own; the
pipelines of data/transforms.py. A batch is `clusters x instances` (visible, infrared) pairs: two visible
views (v0, v1) and one infrared image (r) per pair, 3 B images in all (432 for the SYSU preset).

It writes its own source JPEGs into a temporary folder (64x128 by default, like SYSU-MM01's smallest
crops; `--source-size 128x256` for larger ones; infrared as three equal channels, as SYSU-MM01 stores
them), draws index batches like the samplers (distinct rows per batch), and reports for each preset and
stage, in the same run:
- pil: data.loader.TrainBatches, the per-image PIL pipeline (decode, resize, augment each image), the
  total of one whole batch item and, separately, the decode and each view's pipeline;
- cached (after the decode-once cache is built): data.fast.loader.CachedTrainBatches, every view a batched
  tensor operation, the total of one batch on --device and each view's part;
- the backbone (model.TwoStreamNet, pretrained='none', train mode): forward of cat(v0, v1) and r, the
  contrastive-free loss sum(f^2), backward; images/s at the preset's batch (on the CPU at most
  8 pairs for SYSU, since 432 images of ResNet-50 at 288x144 need about 40 GB of activations);
- extract (`--stages extract`): the input of the clustering's feature extraction, every visible image in batches
  of 128 through the test transform: decoded (pil: data.loader.ImageDataset) or read from the cache (cached:
  data.fast.loader.CachedImageDataset); images/s, without the model;
- the floor: a fresh float32 batch written once from uint8 images of the training size (torch.empty + copy_,
  one conversion pass), the least any pipeline that hands the model a new float32 batch must do.
All CPU figures are per core: images per second of this process's CPU time (--threads torch threads, 1 by
default), so that other jobs on a shared machine, which stretch the wall time, change them less; GPU figures
are images per second of wall time, synchronised. A fresh batch of 432 float images at 288x144 is 216 MB, and
glibc maps every allocation above 32 MB anew, so each batch is page-faulted in again (kernel time, counted).
Like train.py, this script has PyTorch back CPU tensors of 2 MB and more with transparent huge pages
(THP_MEM_ALLOC_ENABLE=1, where the kernel allows them: the table says), so those faults come 2 MB at a time
(THP_MEM_ALLOC_ENABLE=0 python bench/bench_input.py measures 4 kB pages);
--malloc-reuse keeps freed memory in the process instead (glibc's mallopt; for train.py the same is
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment), for both pipelines.
Without it, what a setting costs depends on what the process did before: glibc raises its threshold for
mapping an allocation anew each time it frees a mapped one of up to 32 MB, so a setting that ran after the
per-image pipeline found many of its buffers on the heap, and ran up to 3x faster than in a fresh process.
Each setting therefore runs in a fresh process of this script (--in-one-process: all in one, in order).

    python bench/bench_input.py                          # SYSU and demo presets, both stages, pil and cached
    python bench/bench_input.py --input pil              # today's per-image pipeline only
    python bench/bench_input.py --presets sysu --stages 1 --device cuda
    python bench/bench_input.py --malloc-reuse                 # without the page faults of fresh batches
    python bench/bench_input.py --stages extract --no-backbone  # the feature extraction's input only

Timings on a shared machine are noisy: the load average is printed with the results.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

# Transparent huge pages for CPU tensors of 2 MB and more, as train.py sets them; THP_MEM_ALLOC_ENABLE=0 in the
# environment measures without (every setting's process inherits it).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import transforms  # noqa: E402
from data.common import IR, VIS, ImageList, read_image  # noqa: E402
from data.loader import TrainBatches  # noqa: E402
from model import TwoStreamNet  # noqa: E402

# name -> (height, width, pad, clusters, instances, arch, augment, CPU backbone pairs); pad as train.py
# scales it. On the CPU the SYSU backbone runs 8 pairs (24 images): ResNet-50's 432-image batch at
# 288x144 needs about 40 GB of activations, and images/s hardly depends on the batch there.
PRESETS = {"sysu": (288, 144, 10, 12, 12, "resnet50", "paper", 8),
           "demo": (64, 32, 2, 8, 8, "resnet18", "light", 64)}


def get_args_parser():
    p = argparse.ArgumentParser("bench_input", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", choices=tuple(PRESETS), default=list(PRESETS),
                   help="sysu: 288x144, 12 x 12 pairs; demo: the synthetic preset, 64x32, 8 x 8 pairs")
    p.add_argument("--stages", nargs="+", choices=("1", "2", "extract"), default=["1", "2", "extract"],
                   help="augmentation stages (the demo preset's 'light' augmentation is stage two's); extract: "
                        "the feature extraction's input (every training image, each epoch)")
    p.add_argument("--input", nargs="+", choices=("pil", "cached"), default=["pil", "cached"],
                   help="pil: data.loader.TrainBatches; cached: data.fast.loader.CachedTrainBatches")
    p.add_argument("--method", choices=("mult", "mbmil"), default="mult", help="whose pipelines (mult)")
    p.add_argument("--device", type=str, default="cpu", help="device of the cached pipeline and the backbone")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1); the figures count CPU time, so they stay per core")
    p.add_argument("--batches", type=int, default=3, help="timed batches per setting (after one warm-up)")
    p.add_argument("--images", type=int, default=600, help="generated source images per modality")
    p.add_argument("--source-size", type=str, default="64x128", help="WIDTHxHEIGHT of the source JPEGs")
    p.add_argument("--arch", choices=("resnet50", "resnet18"), default=None,
                   help="backbone (default: resnet50 for sysu, resnet18 for demo)")
    p.add_argument("--backbone-iters", type=int, default=2,
                   help="forward+backward iterations; the first is a warm-up when there are two or more")
    p.add_argument("--cpu-backbone-pairs", type=int, default=None,
                   help="on the CPU, the backbone runs this many pairs, 3x as many images (sysu 8, demo 64)")
    p.add_argument("--no-backbone", action="store_true", help="skip the backbone measurement")
    p.add_argument("--malloc-reuse", action="store_true",
                   help="glibc: serve allocations up to 1 GB from the heap and keep freed memory (no page faults "
                        "on every fresh batch; both pipelines)")
    p.add_argument("--seed", type=int, default=0, help="sources, index batches and augmentation draws")
    p.add_argument("--in-one-process", action="store_true",
                   help="measure every setting in this process (default: each in a fresh one, see above)")
    p.add_argument("--json", type=str, default=None, help=argparse.SUPPRESS)   # a fresh process's rows
    return p


def isolated(args):
    """Every (preset, stage, input) measured by a fresh process of this script, its rows collected; the
    backbone is measured by the first process of each preset only."""
    import json
    import subprocess
    rows = []
    flags = ["--method", args.method, "--device", args.device, "--threads", str(args.threads), "--batches",
             str(args.batches), "--images", str(args.images), "--source-size", args.source_size, "--seed",
             str(args.seed), "--backbone-iters", str(args.backbone_iters), "--in-one-process"]
    flags += ["--arch", args.arch] if args.arch else []
    flags += ["--cpu-backbone-pairs", str(args.cpu_backbone_pairs)] if args.cpu_backbone_pairs else []
    flags += ["--malloc-reuse"] if args.malloc_reuse else []
    with tempfile.TemporaryDirectory(prefix="bench_input_rows_") as folder:
        for preset in args.presets:
            backbone = None
            for stage in stages_of(preset, args.stages):
                for mode in args.input:
                    out = os.path.join(folder, f"{preset}_{stage}_{mode}.json")
                    cmd = [sys.executable, os.path.abspath(__file__), *flags, "--presets", preset, "--stages",
                           str(stage), "--input", mode, "--json", out]
                    if backbone is not None or args.no_backbone:
                        cmd.append("--no-backbone")
                    subprocess.run(cmd, check=True)
                    with open(out) as f:
                        new = json.load(f)
                    if backbone is None and not args.no_backbone:
                        backbone = new[0]["backbone"]
                    for row in new:
                        row["backbone"] = backbone if backbone is not None else float("nan")
                    rows += new
    print_table(rows, args)
    return rows


def make_sources(folder, n, size, seed):
    """n visible and n infrared JPEGs of size (w, h): smooth colour fields, noise, a dark patch in some."""
    w, h = size
    rng = np.random.default_rng(seed)
    lists = {}
    for modality, name in ((VIS, "vis"), (IR, "ir")):
        paths = []
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(n):
            base = Image.fromarray((rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8))
            arr = np.asarray(base.resize((w, h), Image.BILINEAR), dtype=np.float32)
            arr = arr + rng.normal(0, 12, arr.shape)
            if rng.random() < 0.25:                       # a black patch (exact zeros after decoding)
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                arr[y:y + h // 3, x:x + w // 3] = -50
            arr = np.clip(arr, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if modality == IR:
                img = img.convert("L").convert("RGB")      # three equal channels, as SYSU-MM01 stores them
            path = os.path.join(folder, name, f"{i:05d}.jpg")
            img.save(path, quality=90)
            paths.append(path)
        lists[modality] = ImageList(paths, np.zeros(n), np.full(n, 1 if modality == VIS else 3), modality)
    return lists[VIS], lists[IR]


def index_batches(n_vis, n_ir, pairs, count, rng):
    """[count, pairs, 2]: distinct visible and distinct infrared rows per batch, as the samplers draw them."""
    return np.stack([np.stack([rng.permutation(n_vis)[:pairs], rng.permutation(n_ir)[:pairs]], axis=1)
                     for _ in range(count)]).astype(np.int64)


def clock(device):
    """Seconds for a per-core figure: this process's CPU time on the CPU (other jobs on a shared machine
    stretch the wall time, not the CPU time a batch needs), the wall time on a GPU (synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def time_pil(vis, ir, tfm, batches, seed):
    """CPU seconds per batch: the whole TrainBatches item, and its parts (decode, v0, v1, r)."""
    cpu = torch.device("cpu")
    data = TrainBatches(vis, ir, tfm, batches, seed)
    data[0]                                                        # warm-up
    t = clock(cpu)
    for b in range(1, len(batches)):
        data[b]
    total = (clock(cpu) - t) / (len(batches) - 1)
    parts = dict.fromkeys(("decode", "v0", "v1", "r"), 0.0)
    for b in range(1, len(batches)):                             # the same work, timed step by step
        for j, (row_v, row_r) in enumerate(batches[b].tolist()):
            t0 = clock(cpu)
            img_v, img_r = read_image(vis.paths[row_v]), read_image(ir.paths[row_r])
            t1 = clock(cpu)
            rng = np.random.default_rng([seed, b, j])
            tfm["v0"](img_v, rng)
            t2 = clock(cpu)
            tfm["v1"](img_v, rng)
            t3 = clock(cpu)
            tfm["r"](img_r, np.random.default_rng([seed, b, j, 1]))
            t4 = clock(cpu)
            for key, dt in (("decode", t1 - t0), ("v0", t2 - t1), ("v1", t3 - t2), ("r", t4 - t3)):
                parts[key] += dt
    return total, {k: v / (len(batches) - 1) for k, v in parts.items()}


def time_cached(caches, tfm, batches, seed, device):
    """Seconds per batch on `device`: the whole CachedTrainBatches item, and its parts (plan, v0, v1, r)."""
    from data.fast.loader import CachedTrainBatches
    data = CachedTrainBatches(caches[VIS], caches[IR], tfm, batches, seed, device=device)
    data[0]
    t = clock(device)
    for b in range(1, len(batches)):
        data[b]
    total = (clock(device) - t) / (len(batches) - 1)
    parts = dict.fromkeys(("plan", "v0", "v1", "r"), 0.0)
    for b in range(1, len(batches)):
        for key, dt in data.timed(b, clock=lambda: clock(device)).items():
            parts[key] += dt
    return total, {k: v / (len(batches) - 1) for k, v in parts.items()}


def time_extract(vis, cache, height, width, interpolation, batch=128):
    """Images per second per core of the feature extraction's input, in batches of `batch`: decoding each
    visible image (data.loader.ImageDataset, cache None) or reading it from the decode-once cache
    (data.fast.loader.CachedImageDataset); the test transform's ToTensor and Normalize either way."""
    from torch.utils.data import DataLoader
    from data.fast.loader import CachedImageDataset
    from data.loader import ImageDataset
    tfm = transforms.test_transform(height, width, interpolation)
    if cache is None:
        loader = DataLoader(ImageDataset(vis, tfm), batch_size=batch, shuffle=False, num_workers=0)
    else:
        loader = DataLoader(CachedImageDataset(vis, cache, tfm, batch), batch_size=None, shuffle=False, num_workers=0)
    next(iter(loader))                                                     # warm-up
    t = clock(torch.device("cpu"))
    for _ in loader:
        pass
    return len(vis) / (clock(torch.device("cpu")) - t)


def stages_of(preset, stages):
    """The stages measured for a preset: the demo's light augmentation is stage two's."""
    if PRESETS[preset][6] != "light":
        return stages
    return (["2"] if {"1", "2"} & set(stages) else []) + (["extract"] if "extract" in stages else [])


def time_floor(height, width, images, device, repeats=4):
    """Seconds per batch of the memory floor: a fresh float32 [images, 3, H, W] written from uint8 in one pass."""
    src = torch.randint(0, 256, (images, 3, height, width), dtype=torch.uint8, device=device)
    torch.empty(src.shape, device=device).copy_(src)                      # warm-up
    t = clock(device)
    for _ in range(repeats):
        out = torch.empty(src.shape, device=device)
        out.copy_(src)
        del out
    return (clock(device) - t) / repeats


def time_backbone(arch, height, width, pairs, iters, device):
    """Images per second of forward + backward of TwoStreamNet at `pairs` (v0, v1, r) triples."""
    model = TwoStreamNet(arch).to(device).train()
    gen = torch.Generator().manual_seed(0)
    x_vis = torch.randn(2 * pairs, 3, height, width, generator=gen).to(device)
    x_ir = torch.randn(pairs, 3, height, width, generator=gen).to(device)
    times = []
    for _ in range(iters):
        t = clock(device)
        model(x_vis, x_ir).pow(2).sum().backward()
        times.append(clock(device) - t)
        model.zero_grad(set_to_none=True)
    timed = times[1:] if len(times) > 1 else times
    return 3 * pairs / (sum(timed) / len(timed))


def malloc_reuse():
    """glibc mallopt: M_MMAP_THRESHOLD (-3) 1 GB, M_TRIM_THRESHOLD (-1) 2 GB: big blocks come from the heap and
    stay in the process when freed, so the next batch reuses pages already mapped."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, (1 << 31) - 1)):
        raise OSError("mallopt failed (not glibc?); run without --malloc-reuse")


def huge_pages():
    """What this process does about transparent huge pages: torch's switch and the kernel's mode."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    return f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')}, kernel THP {mode}"


def main(args):
    if not args.in_one_process:
        return isolated(args)
    if args.malloc_reuse:
        malloc_reuse()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = tuple(int(v) for v in args.source_size.lower().split("x"))
    folder = tempfile.mkdtemp(prefix="bench_input_")
    rng = np.random.default_rng(args.seed)
    rows = []
    try:
        t = time.perf_counter()
        vis, ir = make_sources(folder, args.images, size, args.seed)
        print(f"sources: {args.images} visible + {args.images} infrared JPEGs {size[0]}x{size[1]} in {folder} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
        for preset in args.presets:
            height, width, pad, clusters, instances, arch, augment, cpu_pairs = PRESETS[preset]
            arch = args.arch or arch
            pairs = clusters * instances
            interpolation = transforms.RESIZE[args.method]
            caches = None
            if "cached" in args.input:
                from data.fast.cache import build_cache
                caches, build = {}, 0.0
                for images in (vis, ir):
                    t = clock(torch.device("cpu"))
                    caches[images.modality] = build_cache(images, height, width, interpolation, progress=False)
                    build += clock(torch.device("cpu")) - t
                print(f"{preset}: decode-once cache {height}x{width} {interpolation}: "
                      f"{2 * args.images / build:.0f} images/s per core", flush=True)
            backbone = float("nan")
            if not args.no_backbone:
                bb_pairs = pairs if device.type == "cuda" else min(pairs, args.cpu_backbone_pairs or cpu_pairs)
                backbone = time_backbone(arch, height, width, bb_pairs, args.backbone_iters, device)
                print(f"{preset}: backbone {arch} forward+backward at {3 * bb_pairs} images: "
                      f"{backbone:.1f} images/s{' per core' if device.type == 'cpu' else ''}", flush=True)
            floor = 3 * pairs / time_floor(height, width, 3 * pairs, device)
            print(f"{preset}: floor, a fresh float32 batch of {3 * pairs} images written once: {floor:.0f} images/s"
                  f"{' per core' if device.type == 'cpu' else ''}", flush=True)
            for stage in stages_of(preset, args.stages):
                if stage == "extract":
                    for mode in args.input:
                        row = {"preset": preset, "stage": stage, "input": mode, "device": "cpu", "backbone": backbone,
                               "total": time_extract(vis, caches[VIS] if mode == "cached" else None, height, width,
                                                       interpolation),
                               "floor": floor}
                        rows.append(row)
                        print(format_row(row), flush=True)
                    continue
                stage = int(stage)
                tfm = transforms.train_transforms(height, width, stage, args.method, pad=pad)
                batches = index_batches(len(vis), len(ir), pairs, args.batches + 1, rng)
                for mode in args.input:
                    if mode == "pil":
                        total, parts = time_pil(vis, ir, tfm, batches, args.seed)
                        where = "cpu"
                    else:
                        total, parts = time_cached(caches, tfm, batches, args.seed, device)
                        where = device.type
                    row = {"preset": preset, "stage": "light" if augment == "light" else stage, "input": mode,
                           "device": where, "total": 3 * pairs / total,
                           **{k: (2 if k == "decode" else 1) * pairs / v for k, v in parts.items() if v > 0},
                           "backbone": backbone, "floor": floor}
                    rows.append(row)
                    print(format_row(row), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(rows, f)
        return rows
    print_table(rows, args)
    return rows


def format_row(r):
    parts = ", ".join(f"{k} {r[k]:.0f}" for k in ("decode", "plan", "v0", "v1", "r") if k in r)
    return (f"{r['preset']} stage {r['stage']} {r['input']} ({r['device']}): {r['total']:.0f} images/s per batch "
            f"[{parts}]")


def print_table(rows, args):
    load = os.getloadavg()
    reuse = ", --malloc-reuse" if args.malloc_reuse else ""
    print(f"\nimages/s per core, CPU time ({args.threads} thread(s){reuse}; {huge_pages()}; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}); a part's figure counts the images of that part alone "
          "(decode: both modalities; plan: pairs)")
    print("| preset | stage | input | device | whole batch | decode or plan | v0 | v1 | r | floor | backbone fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = r.get("decode", r.get("plan", float("nan")))
        print(f"| {r['preset']} | {r['stage']} | {r['input']} | {r['device']} | **{r['total']:.0f}** | {first:.0f} | "
              f"{r.get('v0', float('nan')):.0f} | {r.get('v1', float('nan')):.0f} | {r.get('r', float('nan')):.0f} | "
              f"{r['floor']:.0f} | {'' if r['stage'] == 'extract' else format(r['backbone'], '.1f')} |")
    by_key = {(r["preset"], r["stage"], r["input"]): r["total"] for r in rows}
    for (preset, stage, mode), total in by_key.items():
        if mode == "cached" and (preset, stage, "pil") in by_key:
            pil = by_key[preset, stage, "pil"]
            floor = next(r["floor"] for r in rows if (r["preset"], r["stage"]) == (preset, stage))
            print(f"{preset} stage {stage}: cached / pil = {total / pil:.1f}x; the floor / pil = {floor / pil:.1f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
