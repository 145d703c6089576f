"""Train MULT (He et al., IJCV 2024) or MBMIL (Wang et al., AAAI 2026) end to end, both stages, one command.

    python train.py                                   # MULT on the synthetic demo set (rendered if missing)
    python train.py --dataset regdb --trial 1         # MULT on RegDB split 1 (one model per trial)
    python train.py --dataset sysu --method mbmil     # MBMIL on SYSU-MM01

Every epoch (docs/mult.md §3): extract features of all training images -> per-modality Jaccard + DBSCAN ->
stage one: intra-modality memories (§7.2); stage two: label transfer (§5) + AMIRL/OCLR (§7.3-7.5), or for
MBMIL the modality-aware global clustering + split-and-contrast prototypes (docs/mbmil.md §A.2-A.3) -> train ->
evaluate. A checkpoint `last.pth` is written atomically after every epoch; `--resume auto` (the default)
continues a run folder at its next epoch and reproduces the uninterrupted run: every random draw of an epoch
(sampler, augmentation) is seeded by (--seed, epoch), so nothing but model, optimizer and epoch needs restoring.
"""
import argparse
import hashlib
import json
import os
import sys
import time
import warnings

# Idle OpenMP threads that spin steal the CPU from the data loader and from each other: on a 2-core
# machine the sparse clustering steps ran 5-10x slower without this (bench/bench_clustering.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import clustering
import evaluate
import memory
import mult
from data import samplers, transforms
from data.common import VIS, IR, read_image
from data.loader import TrainBatches
from model import TwoStreamNet, load_checkpoint, save_checkpoint

# Dataset presets (docs/mult.md §8, §13; docs/mbmil.md §A.4). Applied first; anything given on the command line wins.
# The synthetic preset is sized for the 2-core CPU demo (about 15 minutes): a small backbone from scratch,
# small images, few clusters per batch. The SYSU and RegDB presets are the papers'.
PRESETS = {
    "sysu": dict(data_root="datasets/SYSU-MM01", arch="resnet50", pretrained="imagenet", height=288,
                 width=144, epochs=90, stage_one_epochs=40, iters="300,200", eps=0.6, clusters=12,
                 instances=12, lr_steps="20,60,80", eval_trials=10, workers=4),
    "regdb": dict(data_root="datasets/RegDB", arch="resnet50", pretrained="imagenet", height=288,
                  width=144, epochs=90, stage_one_epochs=40, iters="100,100", eps=0.3, clusters=12,
                  instances=12, lr_steps="20,60,80", eval_trials=1, workers=4),
    "synthetic": dict(data_root="datasets/synthetic", arch="resnet18", pretrained="synthetic", height=64,
                      width=32, epochs=12, stage_one_epochs=6, iters="60,60", eps=0.5, clusters=8,
                      instances=8, augment="light", lr_steps="6,9,11", eval_trials=10, workers=1),
}
# MBMIL (docs/mbmil.md §A.4-A.5): two stages of 50 epochs, stage two with a fresh Adam and StepLR(20, 0.1) per
# stage, 8 pseudo-ids x 16 instances, SYSU visible subset ratio 0.5.
MBMIL_PRESETS = {
    "sysu": dict(epochs=100, stage_one_epochs=50, iters="200,200", clusters=8, instances=16,
                 subset_ratio=0.5, lr_steps="20,40"),
    "regdb": dict(epochs=100, stage_one_epochs=50, iters="100,100", clusters=8, instances=16,
                  subset_ratio=1.0, lr_steps="20,40"),
    "synthetic": dict(subset_ratio=0.5, clusters=8, instances=8, iters="60,30", lr_steps="8,11"),
}
DEFAULTS = dict(k1=30, k2=6, min_samples=4, lr=3.5e-4, weight_decay=5e-4, alpha=0.2, beta=0.7, temp=0.05,
                sinkhorn_lambda=25.0, momentum=0.1, subset_ratio=1.0, hard_neg_k=50, intra_margin=0.2,
                eval_every=1, extract_batch=128, augment="paper")


def get_args_parser():
    p = argparse.ArgumentParser("vireid training (MULT / MBMIL)", add_help=True)
    a = p.add_argument
    a("--method", choices=("mult", "mbmil"), default="mult", help="mult (IJCV'24, default) or mbmil (AAAI'26)")
    a("--dataset", choices=tuple(PRESETS), default="synthetic", help="synthetic (default demo), sysu, regdb")
    a("--data-root", type=str, default=None, help="dataset folder (see README for the layouts)")
    a("--trial", type=int, default=1, help="RegDB split 1..10; the protocol trains one model per split")
    a("--allow-count-mismatch", action="store_true", help="accept a SYSU-MM01 with non-official counts")
    a("--arch", choices=("resnet50", "resnet18"), default=None, help="backbone (paper: resnet50)")
    a("--pretrained", type=str, default=None,
      help="imagenet (torchvision V1 from the torch cache), a .pth path, none, or synthetic (pretrain.py; demo)")
    a("--height", type=int, default=None, help="input height (paper: 288)")
    a("--width", type=int, default=None, help="input width (paper: 144)")
    a("--epochs", type=int, default=None, help="total epochs, both stages (MULT: 90)")
    a("--stage-one-epochs", type=int, default=None, help="epochs of stage one (MULT: 40)")
    a("--iters", type=str, default=None, help="iterations per epoch, 'N' or 'stage1,stage2' (SYSU: 300,200)")
    a("--augment", choices=("paper", "light"), default=None,
      help="paper: the augmentations of each stage (docs/mult.md §1.4); light: the stage-two ones throughout (synthetic preset)")
    a("--clusters", type=int, default=None, help="clusters per batch (MULT: 12)")
    a("--instances", type=int, default=None, help="images per cluster and modality (MULT: 12)")
    a("--lr", type=float, default=None, help="Adam learning rate (3.5e-4)")
    a("--weight-decay", type=float, default=None, help="Adam weight decay (5e-4)")
    a("--lr-steps", type=str, default=None, help="epochs where the lr drops x0.1 (MULT: 20,60,80 absolute; MBMIL: per stage)")
    a("--eps", type=float, default=None, help="DBSCAN eps (SYSU 0.6, RegDB 0.3)")
    a("--k1", type=int, default=None, help="Jaccard k1 (30)")
    a("--k2", type=int, default=None, help="Jaccard k2 (6)")
    a("--min-samples", type=int, default=None, help="DBSCAN min_samples (4)")
    a("--association", choices=("mult", "ot", "pgm"), default="mult", help="MULT stage-two label association")
    a("--oclr", action=argparse.BooleanOptionalAction, default=True, help="OCLR loss (ablation: --no-oclr)")
    a("--alpha", type=float, default=None, help="label-transfer anchor weight α (0.2)")
    a("--beta", type=float, default=None, help="hard/soft label mix β (0.7)")
    a("--temp", type=float, default=None, help="memory temperature τ (0.05)")
    a("--sinkhorn-lambda", type=float, default=None, help="Sinkhorn λ (25)")
    a("--momentum", type=float, default=None, help="memory momentum, the weight of the old entry (0.1)")
    a("--subset-ratio", type=float, default=None, help="MBMIL: visible share used by the intra step (SYSU 0.5, RegDB 1.0)")
    a("--hard-neg-k", type=int, default=None, help="MBMIL: candidates of the multi-positive loss (50)")
    a("--intra-margin", type=float, default=None, help="MBMIL: margin of the centroid term (0.2)")
    a("--intra-loss", choices=("hybrid", "infonce"), default="hybrid", help="MBMIL intra-modality loss")
    a("--eval-every", type=int, default=None, help="evaluate every N epochs (the last epoch always)")
    a("--eval-trials", type=int, default=None, help="SYSU gallery draws in the final evaluation (10)")
    a("--eval-untrained", action=argparse.BooleanOptionalAction, default=None,
      help="evaluate the untrained model first, as the reference for the learning curve (default: synthetic only)")
    a("--select-on-test", action="store_true", help="ALSO report the best epoch by test mAP (model selection on the test set; labelled as such)")
    a("--seed", type=int, default=1, help="seeds everything")
    a("--out", type=str, default=None, help="run folder (default runs/<method>_<dataset>[_trial<t>])")
    a("--resume", type=str, default="auto", help="auto (continue --out if it has last.pth), a checkpoint path, or none")
    a("--overwrite", action="store_true", help="with --resume none: replace the run already in --out")
    a("--init-from", type=str, default=None,
      help="a stage1.pth: start this run's stage two from that shared stage one (its stage-one flags must agree)")
    a("--check-images", action=argparse.BooleanOptionalAction, default=True,
      help="decode every training and test image once before training (default on)")
    a("--device", type=str, default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    a("--amp", action=argparse.BooleanOptionalAction, default=False, help="mixed precision on CUDA (off)")
    a("--workers", type=int, default=None, help="data-loading processes")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--extract-batch", type=int, default=None, help="batch size of feature extraction")
    return p


def resolve_args(args):
    """Fill every flag left unset from the presets, check every flag, name the run folder."""
    args = fill_presets(args)
    check_flags(args)
    if args.out is None:
        args.out = default_out(args)
    return args


def fill_presets(args):
    """Every flag left unset takes the dataset (and method) preset's value, then the default."""
    preset = dict(DEFAULTS, **PRESETS[args.dataset])
    if args.method == "mbmil":
        preset.update(MBMIL_PRESETS[args.dataset])
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.iters = parse_ints(args.iters, "--iters", minimum=1)
    args.iters = args.iters * 2 if len(args.iters) == 1 else args.iters
    args.lr_steps = parse_ints(args.lr_steps, "--lr-steps", minimum=0)
    if args.dataset != "regdb":
        args.trial = None
    if args.eval_untrained is None:
        args.eval_untrained = args.dataset == "synthetic"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


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
        need(args.trial in range(1, 11), "--trial", "in 1..10 for RegDB (one model per split)")
    need(args.epochs >= 1, "--epochs", ">= 1")
    need(0 <= args.stage_one_epochs <= args.epochs, "--stage-one-epochs", f"in 0..--epochs ({args.epochs})")
    need(len(args.iters) == 2, "--iters", "'N' or 'stage1,stage2'")
    need(args.height >= MIN_HEIGHT, "--height", f">= {MIN_HEIGHT} (the backbone downsamples 16x)")
    need(args.width >= MIN_WIDTH, "--width", f">= {MIN_WIDTH} (the backbone downsamples 16x)")
    for flag in ("--clusters", "--instances", "--k2", "--min-samples", "--hard-neg-k", "--eval-every",
                 "--eval-trials", "--extract-batch"):
        need(getattr(args, flag[2:].replace("-", "_")) >= 1, flag, "an integer >= 1")
    need(args.k1 >= 2 and args.k1 >= args.k2, "--k1", f">= 2 and >= --k2 ({args.k2})")
    need(args.method != "mbmil" or args.k1 % 2 == 0, "--k1", "even for MBMIL (k1/2 neighbours per modality)")
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


# ---------------------------------------------------------------------------------------------------
# Run folder: one configuration per folder; resume, branch, never overwrite unasked.

# Flags that cannot change what a run computes or reports: they may differ between a run and its resume.
RUNTIME_FLAGS = frozenset({"out", "resume", "overwrite", "init_from", "check_images", "workers", "device",
                           "threads", "extract_batch", "eval_every", "eval_untrained", "select_on_test",
                           "allow_count_mismatch"})
# Flags that stage one never reads: a stage two may branch off a shared stage one with other values.
STAGE_TWO_FLAGS = frozenset({"association", "oclr", "alpha", "beta", "sinkhorn_lambda", "hard_neg_k",
                             "epochs", "eval_trials", "iters", "lr_steps"})   # iters, lr_steps: compared per stage
RUN_FILES = ("last.pth", "stage1.pth", "results.json", "metrics.jsonl", "log.txt", "args.json")


def result_args(args):
    """The flags that decide a run's result, {name: value}."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_FLAGS}


def preset_args(args):
    """The result flags the presets give for this method, dataset and trial."""
    argv = ["--method", args.method, "--dataset", args.dataset] + (["--trial", str(args.trial)] if args.trial else [])
    return result_args(fill_presets(get_args_parser().parse_args(argv)))


def changed_flags(args):
    """{flag: (preset value, this run's value)} for every result flag off its preset."""
    preset = preset_args(args)
    return {k: (preset.get(k), v) for k, v in result_args(args).items() if preset.get(k) != v}


def default_out(args):
    """runs/<method>_<dataset>[_trial<t>], then one tag per flag off its preset (--seed 2 -> seed-2,
    --no-oclr -> no-oclr, a path -> data-root-<hash>), so every configuration has its own folder."""
    tags = []
    for key, (_, value) in changed_flags(args).items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            tags.append(name if value else f"no-{name}")
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
            else str(value)
        safe = len(text) <= 24 and all(c.isalnum() or c in ".,+-" for c in text)
        tags.append(f"{name}-{text if safe else short_hash(text)}")
    name = "_".join([f"{args.method}_{args.dataset}" + (f"_trial{args.trial}" if args.trial else "")] + tags)
    if len(name) > 120:
        name = f"{args.method}_{args.dataset}" + (f"_trial{args.trial}" if args.trial else "") + \
            "_cfg-" + short_hash(json.dumps(changed_flags(args), sort_keys=True, default=str))
    return os.path.join("runs", name)


def short_hash(text):
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def describe(value):
    """A flag's value as it is typed: 300,200 for a list, the text of a string."""
    return ",".join(map(str, value)) if isinstance(value, list) else value if isinstance(value, str) \
        else json.dumps(value)


def check_same_run(saved, args, path, keys, what):
    """Refuse `path` when a flag among `keys` differs from the run it was written by (naming each)."""
    preset = preset_args(args)
    current = result_args(args)
    diffs = [f"--{k.replace('_', '-')} {describe(saved.get(k, preset.get(k)))} (saved) vs "
             f"{describe(current[k])} (now)" for k in keys if saved.get(k, preset.get(k)) != current[k]]
    if diffs:
        raise SystemExit(f"train.py: error: {path} {what}, but these flags differ: " + "; ".join(diffs) +
                         ". Run the other configuration in its own folder (drop --out for the default "
                         "one), or give the same flags.")


def stage_one_view(run):
    """What stage one computes from, for comparing a stage1.pth with a new run's flags."""
    return {"iters_stage_one": run["iters"][0],
            "lr_stage_one": [learning_rate(e, argparse.Namespace(**run)) for e in range(run["stage_one_epochs"])]}


def plan_run(args):
    """Decide, before anything is written, how this run starts: a dict with "mode" (fresh, resume,
    init) and the checkpoint to start from. Every refusal comes from here."""
    own = os.path.join(args.out, "last.pth")
    present = [f for f in ("last.pth", "stage1.pth", "results.json") if os.path.isfile(os.path.join(args.out, f))]
    if args.resume == "none":
        if present and not args.overwrite:
            raise SystemExit(f"train.py: error: --resume none, but {args.out} already holds a run "
                             f"({', '.join(present)}); add --overwrite to replace it, or give another --out")
        return {"mode": "fresh", "replace": bool(present)}
    path = own if args.resume == "auto" else args.resume
    if args.resume != "auto" and os.path.abspath(path) != os.path.abspath(own) and present:
        raise SystemExit(f"train.py: error: --resume {path}: {args.out} already holds another run "
                         f"({', '.join(present)}); give another --out")
    if os.path.isfile(path):
        ckpt = load_checkpoint(path, method=args.method, dataset=args.dataset, trial=args.trial)
        keys = [k for k in result_args(args) if k != "epochs"]
        check_same_run(ckpt["args"], args, path, keys, "was written by a run with other flags")
        if args.epochs < ckpt["epoch"]:
            raise SystemExit(f"train.py: error: --epochs {args.epochs}, but {path} has {ckpt['epoch']} epochs "
                             f"done; give --epochs >= {ckpt['epoch']} (or another --out)")
        return {"mode": "resume", "path": path, "ckpt": ckpt, "own": path == own}
    if present:   # results.json or stage1.pth without last.pth: not a state this code leaves
        raise SystemExit(f"train.py: error: {args.out} holds {', '.join(present)} but no last.pth to resume "
                         f"from; give another --out, or --resume none --overwrite to replace it")
    if args.init_from:
        ckpt = load_checkpoint(args.init_from, method=args.method, dataset=args.dataset, trial=args.trial)
        if ckpt.get("stage_one_end") is not True or ckpt["epoch"] != args.stage_one_epochs:
            raise SystemExit(f"train.py: error: --init-from {args.init_from}: expected a stage1.pth written at the "
                             f"end of stage one (--stage-one-epochs {args.stage_one_epochs}); it holds "
                             f"{ckpt['epoch']} epochs")
        saved = dict(ckpt["args"], **stage_one_view(ckpt["args"]))
        view = argparse.Namespace(**dict(vars(args), **stage_one_view(vars(args))))
        keys = [k for k in result_args(args) if k not in STAGE_TWO_FLAGS]
        check_same_run(saved, view, args.init_from, keys + list(stage_one_view(vars(args))),
                       "holds a stage one trained with other flags")
        return {"mode": "init", "path": args.init_from, "ckpt": ckpt}
    return {"mode": "fresh", "replace": False}


def open_run_folder(args, plan, history):
    """Create or continue the folder: log.txt and metrics.jsonl hold exactly the checkpoint's epochs
    (lines an interrupted epoch wrote are cut), args.json the resolved flags. Returns the Log."""
    os.makedirs(args.out, exist_ok=True)
    if plan.get("replace"):             # --resume none --overwrite
        for name in RUN_FILES:
            if os.path.isfile(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    log_path = os.path.join(args.out, "log.txt")
    keep = plan["ckpt"].get("log_bytes", 0) if plan.get("own") else 0
    if os.path.isfile(log_path) and os.path.getsize(log_path) > keep:
        with open(log_path, "r+b") as f:
            f.truncate(keep)
    write_atomic(os.path.join(args.out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
    record = dict(vars(args), changed_from_preset={k: list(v) for k, v in changed_flags(args).items()})
    write_atomic(os.path.join(args.out, "args.json"), json.dumps(record, indent=1, default=str))
    return Log(args.out)


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class Log:
    """Prints a line and appends it to <out>/log.txt; metrics go to <out>/metrics.jsonl."""

    def __init__(self, out):
        self.out = out

    def __call__(self, msg):
        tqdm.write(msg)
        with open(os.path.join(self.out, "log.txt"), "a") as f:
            f.write(msg + "\n")

    def size(self):
        path = os.path.join(self.out, "log.txt")
        return os.path.getsize(path) if os.path.isfile(path) else 0

    def metrics(self, record):
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------
# Data

def load_training_set(args):
    """(vis, ir) ImageLists of the training split; renders the synthetic set if needed."""
    if args.dataset == "regdb":
        from data.regdb import regdb_train
        return regdb_train(args.data_root, args.trial)
    from data.sysu import SYSU_TRAIN_COUNTS, sysu_train
    expected = SYSU_TRAIN_COUNTS
    if args.dataset == "synthetic":
        from data.synthetic import META, ensure_synthetic
        meta_path = os.path.join(args.data_root, META)
        rendered = {}
        if os.path.isfile(meta_path):  # a set rendered before, possibly with other sizes: keep them
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("layout") != "sysu":   # never overwrite another layout's set
                raise SystemExit(f"{meta_path}: a synthetic set in the {meta.get('layout')!r} layout; "
                                 "--dataset synthetic reads the SYSU-MM01 layout (python -m data.synthetic --out DIR)")
            rendered = meta["args"]
        # renders the default demo set if it is missing, or again if it is of an older format
        expected = ensure_synthetic(args.data_root, progress=True, **rendered)["train_counts"]
    return sysu_train(args.data_root, expected=None if args.allow_count_mismatch else expected)


def check_test_set(args):
    """The test protocol's images as ImageLists, listed now so that a missing file or split, or a query
    set without one match in its gallery, stops the run before training rather than after it."""
    if args.dataset == "regdb":
        from data.regdb import regdb_test
        settings = {d: regdb_test(args.data_root, args.trial, direction=d) for d in ("v2t", "t2v")}
    else:
        from data.sysu import sysu_test
        settings = {f"{mode} trial {t}": sysu_test(args.data_root, mode=mode, trial=t)
                    for mode in ("all", "indoor") for t in range(args.eval_trials)}
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
        raise ValueError(f"{len(errors)} of {len(paths)} training and test images cannot be used: " +
                         "; ".join(errors[:3]) + ("; ..." if len(errors) > 3 else ""))
    tqdm.write(f"checked {len(paths)} images in {time.time() - t:.1f} s")


def run_evaluation(model, args, trials):
    """The official protocol of the dataset: SYSU all + indoor single-shot, or RegDB V->T and T->V."""
    fn = model.modality_fn()
    common = dict(height=args.height, width=args.width, device=args.device, batch_size=args.extract_batch,
                  num_workers=args.workers)
    model.eval()
    if args.dataset == "regdb":
        return evaluate.evaluate_regdb(fn, args.data_root, args.trial, **common)
    return evaluate.evaluate_sysu(fn, args.data_root, trials=range(trials), **common)


def headline(results):
    """{setting: mean mAP} of an evaluation result, for the one-line epoch summary."""
    return {name: round(r["mean"]["mAP"], 2) for name, r in results.items()}


def extract(model, images, args):
    model.eval()
    return evaluate.extract_features(model.modality_fn(), images, args.height, args.width, device=args.device,
                                     batch_size=args.extract_batch, flip=False, num_workers=args.workers,
                                     desc=f"features {'vis' if images.modality == VIS else 'ir'}").to(args.device)


def cluster(feats, args, log, name, gt=None, modality=None):
    """Jaccard + DBSCAN (docs/mult.md §4) -> (labels int64 [N], similarity csr) with a one-line summary."""
    t = time.time()
    sim = clustering.jaccard_similarity(feats, args.k1, args.k2, modality=modality)
    labels = clustering.dbscan(sim, args.eps, args.min_samples)
    k = int(labels.max()) + 1
    msg = f"clustering {name}: {k} clusters, {100 * np.mean(labels < 0):.1f}% outliers"
    if gt is not None:
        prec, rec = evaluate.pair_precision_recall(labels, gt)
        msg += f", pair precision {100 * prec:.1f}% recall {100 * rec:.1f}% (ground truth, diagnostics only)"
    log(msg + f", {time.time() - t:.1f} s")
    return labels, sim


# ---------------------------------------------------------------------------------------------------
# Training epochs

def make_loader(vis, ir, batches, args, epoch, stage):
    tfm = transforms.train_transforms(args.height, args.width, 2 if args.augment == "light" else stage,
                                      method=args.method, pad=max(1, round(10 * args.height / 288)))
    data = TrainBatches(vis, ir, tfm, batches, seed=epoch_seed(args, epoch))
    return DataLoader(data, batch_size=None, shuffle=False, num_workers=args.workers,
                      persistent_workers=False)


def epoch_seed(args, epoch, salt=0):
    return int(np.random.SeedSequence([args.seed, epoch, salt]).generate_state(1)[0])


def forward_batch(model, batch, args):
    """One forward of the two visible views and the IR images: (f_v0, f_v1, f_r), each [B, D]."""
    v0, v1, r = (batch[k].to(args.device, non_blocking=True) for k in ("v0", "v1", "r"))
    with torch.autocast(device_type=torch.device(args.device).type, enabled=args.amp):
        f = model(torch.cat([v0, v1]), r).float()
    b = v0.shape[0]
    return f[:b], f[b:2 * b], f[2 * b:]


def optimise(optimizer, loss, epoch, it):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, iteration {it}: stopping. The last "
                                 f"good checkpoint is last.pth of the previous epoch; try a lower --lr or --amp off.")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_mult_epoch(model, optimizer, loader, banks, epoch, args, labels, soft=None):
    """MULT stage one (§7.2) when `soft` is None, else stage two (AMIRL + OCLR, §7.3-7.5)."""
    model.train()
    total, parts_sum = 0.0, {}
    for it, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, file=sys.stderr)):
        vi, ri = batch["vis_index"].to(args.device), batch["ir_index"].to(args.device)
        f_v0, f_v1, f_r = forward_batch(model, batch, args)
        if soft is None:
            loss, updates = memory.stage_one_loss(banks, f_v0, f_v1, f_r, labels["v"][vi], labels["r"][ri])
        else:
            hard = {k: labels[k][vi if k[0] == "v" else ri] for k in ("vv", "vr", "rr", "rv")}
            target = {k: soft[k][vi if k[0] == "v" else ri] for k in ("vv", "vr", "rr", "rv")}
            loss, parts, updates = memory.stage_two_loss(banks, f_v0, f_v1, f_r, hard, target, epoch, oclr=args.oclr)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
        optimise(optimizer, loss, epoch, it)
        memory.apply_updates(banks, updates)
        total += loss.item()
    n = max(len(loader), 1)
    return total / n, {k: v / n for k, v in parts_sum.items()}


def mult_epoch(model, optimizer, vis, ir, epoch, args, log):
    """Pseudo-labels + one epoch of MULT. Returns the epoch record, or None when DBSCAN found no cluster."""
    stage = 1 if epoch < args.stage_one_epochs else 2
    feats_v, feats_r = extract(model, vis, args), extract(model, ir, args)
    labels_v, sim_v = cluster(feats_v, args, log, "vis", vis.pids)
    labels_r, sim_r = cluster(feats_r, args, log, "ir", ir.pids)
    if labels_v.max() < 0 or labels_r.max() < 0:
        return None
    rng = np.random.default_rng([args.seed, epoch])
    to_dev = lambda a: torch.as_tensor(a, device=args.device)
    centers_v = clustering.cluster_centers(feats_v, to_dev(labels_v))
    centers_r = clustering.cluster_centers(feats_r, to_dev(labels_r))
    make = lambda c: memory.ClusterMemory(c, momentum=args.momentum, temp=args.temp)
    record = {"clusters_vis": int(labels_v.max()) + 1, "clusters_ir": int(labels_r.max()) + 1}
    if stage == 1:
        banks = {"v": make(centers_v), "r": make(centers_r)}
        batches = samplers.stage_one_batches(labels_v, labels_r, args.iters[0], args.clusters, args.instances, rng)
        labels, soft = {"v": to_dev(labels_v), "r": to_dev(labels_r)}, None
    else:
        t = time.time()
        lt = associate(args.association, feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, args)
        msg = (f"label transfer ({args.association}): sinkhorn iterations {lt.sinkhorn_iters}, propagation "
               f"iterations {lt.prop_iters}, {time.time() - t:.1f} s")
        record["cross_accuracy"] = acc = cross_accuracies(lt, vis, ir, labels_v, labels_r)
        msg += f"; cross-label accuracy vis->ir {100 * acc['vis']:.1f}% ir->vis {100 * acc['ir']:.1f}%"
        if args.association == "mult" and args.dataset == "synthetic":  # same features, the OT baseline
            ot = associate("ot", feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, args)
            record["cross_accuracy_ot"] = acc_ot = cross_accuracies(ot, vis, ir, labels_v, labels_r)
            msg += f" (OT on the same features: {100 * acc_ot['vis']:.1f}% / {100 * acc_ot['ir']:.1f}%)"
        log(msg)
        banks = {"v": make(centers_v), "r": make(centers_r), "rv": make(centers_v), "vr": make(centers_r),
                 "cv": make(centers_v), "cr": make(centers_r)}
        hard = {"vv": lt.labels_v, "rr": lt.labels_r, "vr": lt.cross_v, "rv": lt.cross_r}
        batches = samplers.stage_two_batches(hard["vv"], hard["rv"], hard["vr"], hard["rr"], args.iters[1],
                                             args.clusters, args.instances, rng)
        labels = {k: to_dev(v) for k, v in hard.items()}
        mixed = lt.mixed(args.beta)  # CE targets β·onehot(h) + (1-β)·Y* (§5.5)
        soft = {"vv": mixed.soft_v, "rr": mixed.soft_r, "vr": mixed.soft_cross_v, "rv": mixed.soft_cross_r}
    loader = make_loader(vis, ir, batches, args, epoch, stage)
    loss, parts = train_mult_epoch(model, optimizer, loader, banks, epoch, args, labels, soft)
    record.update(stage=stage, loss=loss, **{f"loss_{k}": v for k, v in parts.items()})
    return record


def associate(method, feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, args):
    return mult.associate(method, feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, alpha=args.alpha,
                          temp=args.temp, sinkhorn_lambda=args.sinkhorn_lambda)


def cross_accuracies(lt, vis, ir, labels_v, labels_r):
    """Share of samples whose cross-modality label names a cluster of their own identity (diagnostics)."""
    return {"vis": evaluate.cross_label_accuracy(lt.cross_v, vis.pids, labels_r, ir.pids),
            "ir": evaluate.cross_label_accuracy(lt.cross_r, ir.pids, labels_v, vis.pids)}


def mbmil_epoch(model, optimizer, vis, ir, epoch, args, log):
    """Pseudo-labels + one epoch of MBMIL (docs/mbmil.md §A.2-A.5). None when DBSCAN found no cluster."""
    stage = 1 if epoch < args.stage_one_epochs else 2
    rng = np.random.default_rng([args.seed, epoch])
    feats_v, feats_r = extract(model, vis, args), extract(model, ir, args)
    # Subset rule (§A.2): the visible set is split at random each epoch, one part for the intra-modality
    # step, the complement for the global step (ratio 1.0: both use every visible image).
    n_v = len(vis)
    if args.subset_ratio < 1.0:
        perm = rng.permutation(n_v)
        cut = int(round(args.subset_ratio * n_v))
        intra_idx, glob_idx = np.sort(perm[:cut]), np.sort(perm[cut:])
    else:
        intra_idx = glob_idx = np.arange(n_v)
    labels_v = np.full(n_v, -1, dtype=np.int64)
    labels_v[intra_idx], _ = cluster(feats_v[intra_idx], args, log, "vis (intra subset)", vis.pids[intra_idx])
    labels_r, _ = cluster(feats_r, args, log, "ir", ir.pids)
    if labels_v.max() < 0 or labels_r.max() < 0:
        return None
    to_dev = lambda a: torch.as_tensor(a, device=args.device)
    hybrid = lambda c: memory.HybridMemory(c, momentum=args.momentum, temp=args.temp)
    mem_v = hybrid(clustering.cluster_centers(feats_v, to_dev(labels_v)))
    mem_r = hybrid(clustering.cluster_centers(feats_r, to_dev(labels_r)))
    batches = samplers.stage_one_batches(labels_v, labels_r, args.iters[stage - 1], args.clusters,
                                         args.instances, rng)
    loaders = [make_loader(vis, ir, batches, args, epoch, stage)]
    record = {"clusters_vis": int(labels_v.max()) + 1, "clusters_ir": int(labels_r.max()) + 1, "stage": stage}
    if stage == 2:
        n_g = len(glob_idx)
        feats_g = torch.cat([feats_v[glob_idx], feats_r])                     # [N_g + N_r, D]
        modality = np.r_[np.full(n_g, VIS), np.full(len(ir), IR)]
        gt = np.r_[vis.pids[glob_idx], ir.pids]
        g_labels, _ = cluster(feats_g, args, log, "global (modality-aware)", gt, modality=modality)
        record["global"] = global_cluster_stats(g_labels, modality, gt)
        if args.dataset == "synthetic":  # the plain Jaccard on the same features, for comparison
            plain = clustering.dbscan(clustering.jaccard_similarity(feats_g, args.k1, args.k2), args.eps,
                                      args.min_samples)
            record["global_plain"] = global_cluster_stats(plain, modality, gt)
        log("global clusters: " + describe_global(record))
        if g_labels.max() < 0:
            return None
        centers, proto_labels, proto_index = memory.split_prototypes(feats_g, to_dev(g_labels), to_dev(modality))
        mem_g = hybrid(centers)
        glob_v = np.full(n_v, -1, dtype=np.int64)
        glob_v[glob_idx] = g_labels[:n_g]
        proto_v = torch.full((n_v,), -1, dtype=torch.int64, device=args.device)
        proto_v[to_dev(glob_idx)] = proto_index[:n_g]
        glob = {"v": to_dev(glob_v), "r": to_dev(g_labels[n_g:]), "pv": proto_v, "pr": proto_index[n_g:],
                "protos": proto_labels}
        gbatches = samplers.stage_one_batches(glob_v, g_labels[n_g:], args.iters[1], args.clusters,
                                              args.instances, rng)
        loaders.append(make_loader(vis, ir, gbatches, args, epoch + 100_000, stage))
    intra = {"v": to_dev(labels_v), "r": to_dev(labels_r)}
    loss = train_mbmil_epoch(model, optimizer, loaders, (mem_v, mem_r), mem_g if stage == 2 else None,
                             intra, glob if stage == 2 else None, epoch, args)
    record.update(loss)
    return record


def train_mbmil_epoch(model, optimizer, loaders, intra_mems, mem_g, intra, glob, epoch, args):
    """Per iteration: the intra-modality step, then (stage two) the global split-and-contrast step (§A.3)."""
    model.train()
    mem_v, mem_r = intra_mems
    sums = {"loss_intra": 0.0, "loss_global": 0.0}
    batches = zip(*loaders) if len(loaders) == 2 else ((b, None) for b in loaders[0])
    for it, (batch, gbatch) in enumerate(tqdm(batches, total=len(loaders[0]), desc=f"epoch {epoch}",
                                              leave=False, file=sys.stderr)):
        # (1) L_intra^vis + L_intra^ir: both visible views share the pseudo-label.
        vi, ri = batch["vis_index"].to(args.device), batch["ir_index"].to(args.device)
        f_v0, f_v1, f_r = forward_batch(model, batch, args)
        f_v, y_v, y_r = torch.cat([f_v0, f_v1]), intra["v"][vi].repeat(2), intra["r"][ri]
        hybrid = args.intra_loss == "hybrid"
        loss = (memory.intra_loss(mem_v, f_v, y_v, margin=args.intra_margin, hybrid=hybrid)
                + memory.intra_loss(mem_r, f_r, y_r, margin=args.intra_margin, hybrid=hybrid))
        optimise(optimizer, loss, epoch, it)
        mem_v.update(f_v.detach(), y_v)
        mem_r.update(f_r.detach(), y_r)
        sums["loss_intra"] += loss.item()
        if gbatch is None:
            continue
        # (2) ½(L_glb^ir + L_glb^vis): multi-positive contrast over modality-specific prototypes.
        vi, ri = gbatch["vis_index"].to(args.device), gbatch["ir_index"].to(args.device)
        g_v0, g_v1, g_r = forward_batch(model, gbatch, args)
        g_v = torch.cat([g_v0, g_v1])
        loss = 0.5 * (memory.global_loss(mem_g, g_r, glob["r"][ri], glob["protos"], args.hard_neg_k)
                      + memory.global_loss(mem_g, g_v, glob["v"][vi].repeat(2), glob["protos"], args.hard_neg_k))
        optimise(optimizer, loss, epoch, it)
        mem_g.update(torch.cat([g_v, g_r]).detach(), torch.cat([glob["pv"][vi].repeat(2), glob["pr"][ri]]))
        sums["loss_global"] += loss.item()
    n = max(len(loaders[0]), 1)
    out = {k: v / n for k, v in sums.items() if glob is not None or k == "loss_intra"}
    return dict(out, loss=sum(out.values()))


def global_cluster_stats(labels, modality, gt):
    """Clusters holding both modalities, and the precision of the cross-modality pairs they imply."""
    keep = labels >= 0
    lab, mod, ids = labels[keep], modality[keep], gt[keep]
    k = int(labels.max()) + 1
    if k == 0:
        return {"clusters": 0, "mixed": 0, "cross_pair_precision": 0.0, "cross_pairs": 0}
    n_vis = np.bincount(lab[mod == VIS], minlength=k)
    n_ir = np.bincount(lab[mod == IR], minlength=k)
    # Cross pairs (vis, ir) in one cluster, and those of one identity, from contingency counts: O(N).
    _, inv = np.unique(np.stack([lab, ids]), axis=1, return_inverse=True)
    per_id_vis = np.bincount(inv.ravel()[mod == VIS], minlength=inv.max() + 1)
    per_id_ir = np.bincount(inv.ravel()[mod == IR], minlength=inv.max() + 1)
    pairs = int(n_vis @ n_ir)
    correct = int(per_id_vis @ per_id_ir)
    return {"clusters": k, "mixed": int(np.sum((n_vis > 0) & (n_ir > 0))),
            "cross_pair_precision": correct / pairs if pairs else 0.0, "cross_pairs": pairs}


def describe_global(record):
    g = record["global"]
    msg = (f"modality-aware Jaccard: {g['clusters']} clusters, {g['mixed']} with both modalities, "
           f"cross-modality pair precision {100 * g['cross_pair_precision']:.1f}% of {g['cross_pairs']} pairs")
    if "global_plain" in record:
        p = record["global_plain"]
        msg += (f" | plain Jaccard: {p['clusters']} clusters, {p['mixed']} with both modalities, "
                f"precision {100 * p['cross_pair_precision']:.1f}% of {p['cross_pairs']} pairs")
    return msg


# ---------------------------------------------------------------------------------------------------
# The loop

def make_optimizer(model, args):
    """Adam, two parameter groups (BN-neck and the rest) at the same lr (docs/mult.md §8)."""
    neck = [p for p in model.bnneck.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("bnneck.")]
    return torch.optim.Adam([{"params": rest}, {"params": neck}], lr=args.lr, weight_decay=args.weight_decay)


def learning_rate(epoch, args):
    """Step schedule x0.1 at each of --lr-steps: MULT keys it on the absolute epoch (§8); MBMIL restarts it
    in stage two (a fresh stage-two run in the official code)."""
    if args.method == "mbmil" and epoch >= args.stage_one_epochs:
        epoch -= args.stage_one_epochs
    return args.lr * 0.1 ** sum(epoch >= s for s in args.lr_steps)


def main(args):
    args = resolve_args(args)
    plan = plan_run(args)                          # every refusal about the run folder, nothing written yet
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis, ir = load_training_set(args)
        test_paths = check_test_set(args)
    if args.check_images:
        check_images([vis, ir] + test_paths, args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    weights = args.pretrained
    if weights == "synthetic":  # the ImageNet stand-in of the CPU demo (pretrain.py)
        from pretrain import ensure_pretrained
        weights = ensure_pretrained(os.path.join(os.path.dirname(os.path.normpath(args.data_root)),
                                                 "synthetic-pretrain"), arch=args.arch, height=args.height,
                                    width=args.width, device=args.device)
    model = TwoStreamNet(args.arch, weights).to(args.device)
    optimizer = make_optimizer(model, args)
    start, history, untrained = 0, [], None
    if plan["mode"] != "fresh":
        ckpt = plan["ckpt"]
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        start, history, untrained = ckpt["epoch"], ckpt["history"], ckpt.get("untrained")

    # Every check has passed: only now is the run folder written.
    log = open_run_folder(args, plan, history)
    log("arguments: " + json.dumps(vars(args)))
    changed = changed_flags(args)
    log(f"run folder {args.out}: " + ("the preset configuration" if not changed else "off the preset in " + ", ".join(
        f"--{k.replace('_', '-')} {describe(v)}" for k, (_, v) in changed.items())))
    for w in caught:
        log(f"warning: {w.message}")
    log(f"data: {args.dataset} at {args.data_root}: {len(vis)} vis and {len(ir)} ir training images")
    if args.pretrained == "synthetic":
        log(f"initial weights: {weights} (supervised on a disjoint synthetic population, "
            "one class per identity and modality)")
    if plan["mode"] == "resume":
        log(f"resumed from {plan['path']}: epochs 0..{start - 1} done, continuing at epoch {start}")
    elif plan["mode"] == "init":
        log(f"initialised from {plan['path']}: stage one (epochs 0..{start - 1}) shared, stage two starts here")
    elif args.eval_untrained:
        untrained = run_evaluation(model, args, args.eval_trials)
        log("untrained model (reference for the learning curve):\n" + evaluate.format_table(untrained))
    results = None
    for epoch in range(start, args.epochs):
        t0 = time.time()
        if args.method == "mbmil" and epoch == args.stage_one_epochs and epoch > 0:
            optimizer = make_optimizer(model, args)  # stage two starts a fresh optimiser (§A.4)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, args)
        step = mult_epoch if args.method == "mult" else mbmil_epoch
        record = step(model, optimizer, vis, ir, epoch, args, log)
        if record is None:
            log(f"epoch {epoch}: DBSCAN found no cluster (eps {args.eps}); this epoch trains nothing and the model "
                f"is unchanged. If this persists, raise --eps or check the features.")
            record = {"stage": 1 if epoch < args.stage_one_epochs else 2, "skipped": "no clusters"}
        last = epoch == args.epochs - 1
        if last or (epoch + 1) % args.eval_every == 0:
            results = run_evaluation(model, args, args.eval_trials if last else 1)
            record["eval"] = headline(results)
        record.update(epoch=epoch, lr=learning_rate(epoch, args), time=round(time.time() - t0, 1))
        history.append(record)
        log(f"epoch {epoch} (stage {record['stage']}): " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
            if k not in ("epoch", "stage", "cross_accuracy_ot", "global", "global_plain")))
        # The checkpoint first, then the metrics line: a crash between the two leaves a line missing,
        # which the resume rewrites from the checkpoint's history, never one line twice.
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "args": vars(args), "history": history, "untrained": untrained,
                 "torch_rng": torch.get_rng_state(), "results": results if last else None,
                 "log_bytes": log.size()}
        save_checkpoint(state, os.path.join(args.out, "last.pth"))
        if epoch + 1 == args.stage_one_epochs:   # the branching point of stage-two ablations (--init-from)
            save_checkpoint(dict(state, stage_one_end=True), os.path.join(args.out, "stage1.pth"))
        log.metrics(record)
    if results is None:  # a finished run resumed: evaluate its final model
        results = run_evaluation(model, args, args.eval_trials)
    report(results, untrained, history, args, log)
    return results


def report(results, untrained, history, args, log):
    if untrained is not None:
        log("untrained model:\n" + evaluate.format_table(untrained))
    log(f"final model (last epoch, {history[-1]['epoch']}):\n" + evaluate.format_table(results))
    if args.select_on_test:
        scored = [r for r in history if "eval" in r]
        best = max(scored, key=lambda r: next(iter(r["eval"].values())))
        log(f"[model selection on the TEST set, not a valid protocol] best epoch {best['epoch']}: {best['eval']}")
    write_atomic(os.path.join(args.out, "results.json"),
                 json.dumps({"final": results, "untrained": untrained}, indent=2))


def cli(argv=None):
    """main() for the command line: a problem with the input is one line on stderr and a non-zero exit
    status, not a traceback (VIREID_TRACEBACK=1 shows the traceback)."""
    try:
        return main(get_args_parser().parse_args(argv))
    except (ValueError, OSError, FloatingPointError) as err:
        if os.environ.get("VIREID_TRACEBACK"):
            raise
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:           # a refused flag or run folder: its message, exit status 2
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        print("train.py: interrupted; the same command resumes from the last finished epoch", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    cli()
