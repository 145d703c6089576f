"""Everything a run does before its first epoch: the flags resolved from the presets and checked, the run folder
held and planned, the data listed and every image decoded, the initial weights and the decode-once caches. A run
stops with one line naming the flag or file before it trains, not after.

    args = resolve_args(args, parser, preset)          # presets, then every flag in its range
    run = prepare_run(args, hold, learning_rate, interpolation)   # rank 0, before any training
"""
import logging
import os
import sys
import tempfile
import time
import warnings
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.common import file_keys, read_image, unusable
from data.datasets import synthetic_meta, test_images, test_sets, training_set
from data.fast.cache import training_caches
from data.regdb import REGDB_TRIALS
from demo.synthetic import ensure_synthetic
from plumbing import runs
from plumbing.checkpoints import initial_weights

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Flags

def resolve_args(args, parser, preset):
    """Every flag left unset from the presets, every flag checked, the run folder named (runs.default_out; left
    None for --trial all without --out, whose splits are named one by one).
    parser: the entry point's argparse parser; preset(method, dataset) -> {flag: value}."""
    args = fill_presets(args, preset)
    check_flags(args)
    check_world(args)
    if args.out is None and args.trial != "all":   # RegDB's ten splits: each split names its own folder
        args.out = runs.default_out(args, preset_args(args, parser, preset))
    if args.out is not None:
        check_writable(args.out, "--out", args.out, "train.py")
    if args.input == "cached" and args.cache_dir:
        check_writable(args.cache_dir, "--cache-dir", args.cache_dir, "train.py")
    return args


def fill_presets(args, preset):
    """Every flag left unset takes the dataset (and method) preset's value; lists and the trial parsed."""
    for key, value in preset(args.method, args.dataset).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.iters = parse_ints(args.iters, "--iters", minimum=1)
    args.iters = args.iters * 2 if len(args.iters) == 1 else args.iters
    args.lr_steps = parse_ints(args.lr_steps, "--lr-steps", minimum=0)
    args.trial = None if args.dataset != "regdb" else int(args.trial) if str(args.trial).isdigit() else args.trial
    for flag in ("eval_untrained", "diagnostics"):   # the demo's extras
        if getattr(args, flag) is None:
            setattr(args, flag, args.dataset == "synthetic")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def preset_args(args, parser, preset):
    """The result flags the presets give for this method, dataset and trial: what a run folder's name and a
    resume compare against."""
    argv = ["--method", args.method, "--dataset", args.dataset] + (["--trial", str(args.trial)] if args.trial else [])
    return runs.result_args(fill_presets(parser.parse_args(argv), preset))


def check_world(args):
    """Under torchrun, every rank takes an equal share of each batch."""
    size, batch = int(os.environ.get("WORLD_SIZE", "1")), args.clusters * args.instances
    if batch % size:
        raise SystemExit(f"train.py: error: a batch of --clusters {args.clusters} x --instances {args.instances} = "
                         f"{batch} positions cannot be shared equally by {size} processes; give a batch "
                         f"divisible by the number of processes (--clusters and --instances mean the whole batch)")


def parse_ints(text, flag, minimum):
    """'300,200' -> [300, 200]; a clear error naming the flag otherwise."""
    if isinstance(text, list):
        return text
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    if not all(x.isdigit() and int(x) >= minimum for x in parts):
        raise SystemExit(f"train.py: error: {flag} expects comma-separated integers >= {minimum}, got {text!r}")
    return [int(x) for x in parts]


MIN_HEIGHT, MIN_WIDTH = 16, 8   # the backbone downsamples 16x (last stride 1); smaller leaves no feature map


def _need(program, args, ok, flag, expected):
    """SystemExit "<program>: error: <flag> must be <expected>, got <its value>" unless `ok`."""
    if not ok:
        raise SystemExit(f"{program}: error: {flag} must be {expected}, got "
                         f"{getattr(args, flag[2:].replace('-', '_'))!r}")


def check_flags(args):
    """Every flag in its range, before anything is read or written: SystemExit naming the flag."""
    need = partial(_need, "train.py", args)
    if args.dataset == "regdb":
        need(args.trial in REGDB_TRIALS or args.trial == "all", "--trial",
             "in 1..10 or all for RegDB (one model per split)")
    need(args.epochs >= 1, "--epochs", ">= 1")
    need(0 <= args.stage_one_epochs <= args.epochs, "--stage-one-epochs", f"in 0..--epochs ({args.epochs})")
    need(len(args.iters) == 2, "--iters", "'N' or 'stage1,stage2'")
    need(args.height >= MIN_HEIGHT, "--height", f">= {MIN_HEIGHT} (the backbone downsamples 16x)")
    need(args.width >= MIN_WIDTH, "--width", f">= {MIN_WIDTH} (the backbone downsamples 16x)")
    for flag in ("--clusters", "--instances", "--k2", "--min-samples", "--hard-neg-k", "--eval-every",
                 "--eval-trials", "--extract-batch"):
        need(getattr(args, flag[2:].replace("-", "_")) >= 1, flag, "an integer >= 1")
    need(args.k1 >= 2 and args.k1 >= args.k2, "--k1", f">= 2 and >= --k2 ({args.k2})")
    need(args.global_k1 >= 2 and args.global_k1 % 2 == 0 and args.global_k1 >= args.global_k2, "--global-k1",
         f"even (k1/2 neighbours per modality), >= 2 and >= --global-k2 ({args.global_k2})")
    need(args.global_k2 >= 1, "--global-k2", "an integer >= 1")
    need(0 < args.global_eps <= 1, "--global-eps", "in (0, 1] (a Jaccard distance)")
    need(args.lr > 0, "--lr", "> 0")
    need(args.weight_decay >= 0, "--weight-decay", ">= 0")
    need(0 < args.eps <= 1, "--eps", "in (0, 1] (a Jaccard distance)")
    for flag in ("--alpha", "--beta", "--momentum"):
        need(0 <= getattr(args, flag[2:]) <= 1, flag, "in [0, 1]")
    need(args.temp > 0, "--temp", "> 0")
    need(args.sinkhorn_lambda > 0, "--sinkhorn-lambda", "> 0")
    need(0 < args.subset_ratio <= 1, "--subset-ratio", "in (0, 1]")
    need(args.intra_margin >= 0, "--intra-margin", ">= 0")
    need(args.seed >= 0, "--seed", ">= 0")
    need(args.workers >= 0, "--workers", ">= 0")
    need(args.threads is None or args.threads >= 1, "--threads", ">= 1")
    need(args.resume in ("auto", "none") or os.path.isfile(args.resume), "--resume",
         "auto, none or an existing checkpoint file")
    need(args.init_from is None or os.path.isfile(args.init_from), "--init-from", "an existing stage1.pth")
    need(not args.overwrite or args.resume == "none", "--overwrite", "used with --resume none")
    need(args.dist_timeout >= 1, "--dist-timeout", ">= 1 second")
    need(args.cache_dir is None or not os.path.exists(args.cache_dir) or os.path.isdir(args.cache_dir),
         "--cache-dir", "a folder (it is created if missing)")
    check_device(args.device, "train.py")
    check_shared_memory(args)


def check_device(device, program):
    """--device: cpu, cuda, cuda:N of a GPU this process sees, or mps where PyTorch has it; SystemExit naming the
    flag otherwise, before anything is read (a mistyped device would otherwise fail after the cache build)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"{program}: error: --device must be cpu, cuda or cuda:N (N a GPU index), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{program}: error: --device {device}: PyTorch sees no CUDA GPU on this machine "
                         f"(torch.cuda.is_available() is False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"{program}: error: --device {device}: this machine has {torch.cuda.device_count()} "
                         f"CUDA GPUs visible, cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"{program}: error: --device {device}: PyTorch has no MPS device on this machine; use "
                         f"--device cpu")


def check_shared_memory(args):
    """DataLoader workers hand their batches to the training process through /dev/shm; where it cannot hold what
    they have in flight (Docker's default is 64 MB), the run would die mid-epoch with "bus error". SystemExit
    naming the fix, before anything is read or written."""
    free = shm_free_bytes()
    need = shared_memory_need(args)
    if free is not None and need > free:
        raise SystemExit(f"train.py: error: --workers {args.workers} pass up to {need / 2**20:,.0f} MiB of batches "
                         f"through /dev/shm at a time, which has {free / 2**20:,.0f} MiB free: give it more (docker "
                         f"run --shm-size 8g, or a larger tmpfs) or use --workers 0")


def shared_memory_need(args):
    """Bytes of batches in /dev/shm at a time on this machine: every local process's loaders, each with two
    batches in flight per worker (DataLoader's prefetch) and one being used. Training (two loaders at once in
    MBMIL's stage two) hands over float32 views, or, cached on a GPU, uint8 crops; extraction and evaluation
    float32 images, or uint8 from the training cache (the test sets are decoded)."""
    if args.workers == 0:
        return 0
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    image = 3 * args.height * args.width                                        # bytes of one uint8 image
    on_gpu = torch.device(args.device).type == "cuda"
    views = 3 * (args.clusters * args.instances // ranks) * image                # v0, v1, r of a rank's share
    train = views * (1 if args.input == "cached" and on_gpu else 4) * (2 if args.method == "mbmil" else 1)
    extract = args.extract_batch * image * 4
    return ranks * (2 * args.workers + 1) * max(train, extract)


def shm_free_bytes():
    """Free bytes of /dev/shm, or None where there is none to check (not Linux)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def check_evaluate_flags(args):
    """evaluate.py's flags, every one before a feature is extracted (a mistake must not cost the extraction):
    SystemExit naming the flag, or a warning for a flag that has no effect. --summarize and --plot are checked by
    the functions that read their runs (reports.summarize_runs, curves.plot_runs)."""
    def stop(message):
        raise SystemExit(f"evaluate.py: error: {message}")
    if args.save_ranklist < 0 or args.ranklist_images < 0:
        stop("--save-ranklist and --ranklist-images take a count >= 0")
    if args.save_ranklist and not args.out:
        stop("--save-ranklist needs --out DIR (where the rank lists go)")
    if args.ranklist_images and not args.save_ranklist:
        stop("--ranklist-images M needs --save-ranklist K (the gallery images shown per query)")
    if args.direction and args.dataset != "llcm" and not args.from_features:
        stop(f"--direction applies to --dataset llcm only (got --dataset {args.dataset})")
    if not (args.model or args.checkpoint or args.from_features):
        stop("give --model pixels, --checkpoint PATH, --from-features PATH, --summarize RUN... or --plot RUN...")
    need = partial(_need, "evaluate.py", args)
    for flag, value in (("--rerank-k1", args.rerank_k1), ("--rerank-k2", args.rerank_k2)):
        need(value is None or value >= 1, flag, "an integer >= 1 (the re-ranking neighbours)")
    need(args.rerank_lambda is None or 0 <= args.rerank_lambda <= 1, "--rerank-lambda", "in [0, 1]")
    given = [f for f in ("rerank_k1", "rerank_k2", "rerank_lambda") if getattr(args, f) is not None]
    if given and not args.rerank:
        log.warning("note: %s apply with --rerank only; this evaluation does not re-rank (add --rerank)",
                    ", ".join(f"--{f.replace('_', '-')} {getattr(args, f)}" for f in given))
    need(args.batch_size >= 1, "--batch-size", "an integer >= 1")
    need(args.workers >= 0, "--workers", "an integer >= 0")
    for flag, value, least in (("--height", args.height, MIN_HEIGHT), ("--width", args.width, MIN_WIDTH)):
        need(value is None or value >= least, flag, f">= {least} (the backbone downsamples 16x)")
    need(args.dataset != "regdb" or args.trial in REGDB_TRIALS, "--trial", "in 1..10 (the RegDB split)")
    need(not args.checkpoint or not os.path.isdir(args.checkpoint), "--checkpoint",
         "a checkpoint file written by train.py, not a folder (e.g. RUN/last.pth)")
    need(not args.from_features or os.path.isfile(args.from_features), "--from-features",
         "an .npz file written by --save-features")
    need(not args.save_features or not os.path.isdir(args.save_features), "--save-features",
         "a file name (.npz), not a folder")
    if args.save_features:
        check_writable(os.path.dirname(os.path.abspath(args.save_features)), "--save-features", args.save_features,
                       "evaluate.py")
    if args.out:
        check_writable(args.out, "--out", args.out, "evaluate.py")
        held = [f for f in ("last.pth", "args.json") if os.path.isfile(os.path.join(args.out, f))]
        need(not held, "--out", f"a folder other than a training run's (it holds {', '.join(held)}: its "
                                f"results.json would be replaced), e.g. {os.path.join(args.out, 'eval')}")
    if args.device is not None:
        check_device(args.device, "evaluate.py")


def check_writable(folder, flag, value, program):
    """SystemExit naming `flag` unless `folder` is a folder this process can write into, or can be made one (its
    nearest existing parent is such a folder). It is found out by creating an unnamed temporary file there, which
    the file system removes at once: os.access answers yes to root even where writing fails (under /proc, or on some
    network and FUSE mounts)."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise SystemExit(f"{program}: error: {flag} {value}: {path} is a file; expected a folder there")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise SystemExit(f"{program}: error: {flag} {value}: cannot write into {path} ({err.strerror}); "
                         f"expected a folder this user can write") from None


# ---------------------------------------------------------------------------------------------------
# The run, prepared

def prepare_run(args, hold, learning_rate, interpolation):
    """Rank 0, before any training: the folder held (into the ExitStack `hold`, for the whole run), every refusal,
    the data listed and decoded, the initial weights (rendering and pretraining the demo's on first use) and the
    decode-once caches. learning_rate(epoch, args): train.py's.
    The result is sent to every rank, so it holds no checkpoint (each rank reads that itself, checkpoints.restore).
    -> {"plan", "vis", "ir", "warnings", "weights", "caches", "training_set"}."""
    hold.enter_context(runs.hold_run_folder(args.out))              # first: a second start is refused at once
    plan = runs.plan_run(args, learning_rate)
    vis, ir, tests, warned = check_data(args)
    saved = (plan.get("ckpt") or {}).get("training_set")
    fingerprint = training_fingerprint(vis, ir, args.data_root, saved)
    runs.check_same_data(plan, fingerprint, saved)                  # a resume trains on the images it began with
    sizes = {}
    if args.check_images:         # with --input cached, building the caches decodes the training images
        sizes = check_images(([] if args.input == "cached" else [vis, ir]) + tests, args)
    weights = initial_weights(args)
    caches = None
    if args.input == "cached":
        keys = {m: [row[1:] for row in fingerprint[m]] for m in ("vis", "ir")}
        caches = training_caches(vis, ir, args.height, args.width, interpolation,
                                 args.cache_dir or os.path.join(args.out, "cache"), args.workers, keys)
        for m, images in (("vis", vis), ("ir", ir)):
            sizes.update(zip(images.paths, caches[m].sizes.tolist()))
            images.cache = caches[m]      # training's loaders read it there; other ranks get it by file path
    odd = odd_images(sizes, args.height, args.width)
    plan.pop("ckpt", None)
    return {"plan": plan, "vis": vis, "ir": ir, "warnings": warned + odd,
            "weights": weights, "caches": caches, "training_set": fingerprint}


# ---------------------------------------------------------------------------------------------------
# The data, checked before the first epoch

def check_data(args):
    """The run's data, listed before anything trains -> (vis, ir, test ImageLists, warnings): the training split,
    every image an evaluation of the run can read (`check_test_set`), and the readers' warnings (files they
    skipped), which the run's log repeats."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.dataset == "synthetic":     # the demo's set: rendered on first use, again if of an older format
            meta = synthetic_meta(args.data_root, args.dataset)
            ensure_synthetic(args.data_root, progress=True, **(meta["args"] if meta else {}))
        vis, ir = training_set(args.dataset, args.data_root, args.trial, args.allow_count_mismatch)
        tests = check_test_set(args)
    return vis, ir, tests, list(dict.fromkeys(str(w.message) for w in caught))   # once each, though read per trial


def check_test_set(args):
    """Every test image an evaluation of the run can read, as ImageLists, listed now so that a missing file or
    split, or a query set without one match in its gallery, stops the run before training rather than after it:
    the images the protocol extracts (data.datasets.test_images: every gallery candidate of every trial, not only
    those the --eval-trials draws pick), which `check_images` then decodes, each once though listed twice."""
    settings = test_sets(args.dataset, args.data_root, args.trial, args.eval_trials)
    for name, (query, gallery) in settings.items():
        if not np.isin(query.pids, gallery.pids).any():
            raise ValueError(f"test set under {args.data_root} ({name}): no query identity appears in the "
                             f"gallery, so no query can be scored; check the test split's labels")
    drawn = [images for pair in settings.values() for images in pair]        # among the above; listed for safety
    return test_images(args.dataset, args.data_root, args.trial) + drawn


class _Decode(torch.utils.data.Dataset):
    """Decodes image i -> ("", (width, height)) or (the error message, None): a worker never raises."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return "", read_image(self.paths[i]).size
        except OSError as err:
            return str(err), None


def check_images(lists, args):
    """Decode every image of `lists` once (an image in several lists too: RegDB's ten splits share their images),
    in --workers processes -> {path: (width, height)}; ValueError naming the bad files."""
    paths = list(dict.fromkeys(p for images in lists for p in images.paths))
    t = time.time()
    loader = DataLoader(_Decode(paths), batch_size=64, num_workers=args.workers, collate_fn=list)
    results = [r for batch in tqdm(loader, desc="checking images", unit="batch", file=sys.stderr) for r in batch]
    errors = [e for e, _ in results if e]
    if errors:
        raise unusable(errors, len(paths), "images checked")
    log.info(f"checked {len(paths)} images in {time.time() - t:.1f} s")
    return {p: size for p, (_, size) in zip(paths, results)}


# An image this far from the training shape is stretched into something else than a person: named, not refused.
TINY_FACTOR = 8       # tiny: a side under 1/8 of the input's (upscaled more than 8x), or under 16 x 8 px
ASPECT_FACTOR = 4     # far: a height:width beyond 4x, or under 1/4, that of --height x --width


def odd_images(sizes, height, width):
    """[one warning line] naming the images of `sizes` ({path: (width, height)}) that are tiny or far from the
    training aspect ratio, a few files and the count, or [] when there are none."""
    ratio, min_h, min_w = height / width, max(MIN_HEIGHT, height // TINY_FACTOR), max(MIN_WIDTH, width // TINY_FACTOR)
    odd = [(p, w, h) for p, (w, h) in sizes.items()
           if h < min_h or w < min_w or not 1 / ASPECT_FACTOR <= (h / w) / ratio <= ASPECT_FACTOR]
    if not odd:
        return []
    names = ", ".join(f"{p} ({w}x{h})" for p, w, h in odd[:3]) + (", ..." if len(odd) > 3 else "")
    return [f"{len(odd)} of {len(sizes)} images are tiny (under {min_w}x{min_h} px, width x height) or far from "
            f"the shape of the {width}x{height} input (height:width beyond {ASPECT_FACTOR}x or under 1/{ASPECT_FACTOR} "
            f"of its {ratio:.2f}); each is stretched to {width}x{height} all the same: {names}"]


def training_fingerprint(vis, ir, root, saved=None):
    """What the training images are, for a resume to compare (runs.check_same_data): {"root", "vis", "ir"}, each a
    row per image [path relative to root, size, mtime_ns, ctime_ns, inode, content digest] (data.common.file_keys).
    saved: the checkpoint's fingerprint, whose digests are reused for files unchanged on disk (a resume reads no
    image); without it every training file is read and hashed once."""
    root = os.path.abspath(root)
    out = {"root": root}
    for name, images in (("vis", vis), ("ir", ir)):
        known = None
        if saved and saved.get("root") == root:
            known = {os.path.join(root, row[0]): row[1:] for row in saved[name]}
        keys = file_keys(images.paths, known)
        out[name] = [[os.path.relpath(p, root)] + k for p, k in zip(images.paths, keys)]
    return out
