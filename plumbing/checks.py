"""Everything a run does before its first epoch: the flags resolved from the presets and checked, the run folder
held and planned, the data listed and every image decoded, the initial weights and the decode-once caches. A run
stops with one line naming the flag or file before it trains, not after.

    args = resolve_args(args, parser, preset)          # presets, then every flag in its range
    run = prepare_run(args, hold, preset_args, learning_rate, interpolation)   # rank 0, before any training
"""
import logging
import os
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.common import read_image, unusable
from data.datasets import test_sets, training_set
from data.fast.cache import training_caches
from data.regdb import REGDB_TRIALS
from plumbing import runs
from plumbing.checkpoints import initial_weights

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Flags

def resolve_args(args, parser, preset):
    """Every flag left unset from the presets, every flag checked, the run folder named (runs.default_out).
    parser: the entry point's argparse parser; preset(method, dataset) -> {flag: value}."""
    args = fill_presets(args, preset)
    check_flags(args)
    if args.out is None:
        args.out = runs.default_out(args, preset_args(args, parser, preset))
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


def check_flags(args):
    """Every flag in its range, before anything is read or written: SystemExit naming the flag."""
    def need(ok, flag, expected):
        if not ok:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            raise SystemExit(f"train.py: error: {flag} must be {expected}, got {value!r}")
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


# ---------------------------------------------------------------------------------------------------
# The run, prepared

def prepare_run(args, hold, preset, learning_rate, interpolation):
    """Rank 0, before any training: the folder held (into the ExitStack `hold`, for the whole run), every refusal,
    the data listed and decoded, the initial weights (rendering and pretraining the demo's on first use) and the
    decode-once caches. preset: the result flags of the presets; learning_rate(epoch, args) as train.py's.
    -> {"plan", "ckpt", "vis", "ir", "warnings", "weights", "caches"}."""
    hold.enter_context(runs.hold_run_folder(args.out))              # first: a second start is refused at once
    plan = runs.plan_run(args, preset, learning_rate)
    vis, ir, tests, warned = check_data(args)
    if args.check_images:         # with --input cached, building the caches decodes the training images
        check_images(([] if args.input == "cached" else [vis, ir]) + tests, args)
    weights = initial_weights(args)
    caches = None
    if args.input == "cached":
        caches = training_caches(vis, ir, args.height, args.width, interpolation,
                                 args.cache_dir or os.path.join(args.out, "cache"), args.workers)
    return {"plan": plan, "ckpt": plan.pop("ckpt", None), "vis": vis, "ir": ir, "warnings": warned,
            "weights": weights, "caches": caches}


# ---------------------------------------------------------------------------------------------------
# The data, checked before the first epoch

def check_data(args):
    """The run's data, listed before anything trains -> (vis, ir, test ImageLists, warnings): the training split,
    every image an evaluation of the run can read (`check_test_set`), and the readers' warnings (files they
    skipped), which the run's log repeats."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis, ir = training_set(args.dataset, args.data_root, args.trial, args.allow_count_mismatch)
        tests = check_test_set(args)
    return vis, ir, tests, [str(w.message) for w in caught]


def check_test_set(args):
    """The test protocol's images as ImageLists, listed now so that a missing file or split, or a query
    set without one match in its gallery, stops the run before training rather than after it."""
    settings = test_sets(args.dataset, args.data_root, args.trial, args.eval_trials)
    for name, (query, gallery) in settings.items():
        if not np.isin(query.pids, gallery.pids).any():
            raise ValueError(f"test set under {args.data_root} ({name}): no query identity appears in the "
                             f"gallery, so no query can be scored; check the test split's labels")
    lists = [images for pair in settings.values() for images in pair]
    seen, unique = set(), []
    for images in lists:               # one ImageList per distinct set of paths (SYSU repeats them per trial)
        new = [i for i, p in enumerate(images.paths) if p not in seen]
        seen.update(images.paths)
        if new:
            unique.append(images.subset(new))
    return unique


class _Decode(torch.utils.data.Dataset):
    """Decodes image i; returns "" or the error message (a worker never raises)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            read_image(self.paths[i])
            return ""
        except OSError as err:
            return str(err)


def check_images(lists, args):
    """Decode every image of `lists` once, in --workers processes; ValueError naming the bad files."""
    paths = [p for images in lists for p in images.paths]
    t = time.time()
    loader = DataLoader(_Decode(paths), batch_size=64, num_workers=args.workers, collate_fn=list)
    errors = [e for batch in tqdm(loader, desc="checking images", unit="batch", file=sys.stderr) for e in batch if e]
    if errors:
        raise unusable(errors, len(paths), "images checked")
    log.info(f"checked {len(paths)} images in {time.time() - t:.1f} s")
