"""Run folders: one configuration per folder, resumable, branchable, never overwritten unasked.

A researcher's workflow is a main run, then ablations, seeds and resumes; this file keeps their numbers
apart. Used by train.py:

    plan = plan_run(args, preset, learning_rate)   # every refusal; nothing is written before it returns
    check_test_set(args); check_images(...)        # the data, listed and decoded before the first epoch
    log = open_run_folder(args, plan, history)     # only now is the folder written

- The default folder names every flag that changes the result and is not the preset's (`default_out`).
- A resume compares the checkpoint's result-changing flags with the current ones (`plan_run`); only
  RUNTIME_FLAGS may differ, and --epochs may grow; a --input cached checkpoint of the release whose
  ColorJitter ran in float32 goes on only into epochs without ColorJitter (`check_jitter`).
- `stage1.pth` (written by train.py at the end of stage one) starts the stage-two ablations of
  `--init-from`, whose stage-one flags must agree.
- log.txt and metrics.jsonl hold exactly the checkpoint's epochs (`open_run_folder`).
"""
import argparse
import atexit
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.common import read_image, unusable
from model import load_checkpoint


# Flags that cannot change what a run computes or reports: they may differ between a run and its resume.
RUNTIME_FLAGS = frozenset({"out", "resume", "overwrite", "init_from", "check_images", "workers", "device",
                           "threads", "extract_batch", "eval_every", "eval_untrained", "select_on_test",
                           "allow_count_mismatch", "diagnostics", "dist_timeout", "cache_dir", "rank",
                           "world_size"})
# Flags that stage one never reads: a stage two may branch off a shared stage one with other values.
STAGE_TWO_FLAGS = frozenset({"association", "oclr", "alpha", "beta", "sinkhorn_lambda", "hard_neg_k",
                             "epochs", "eval_trials", "iters", "lr_steps"})   # iters, lr_steps: compared per stage
RUN_FILES = ("last.pth", "stage1.pth", "results.json", "metrics.jsonl", "log.txt", "args.json")
# The value a result flag had before it existed, where that is not today's default: runs of the releases before
# --input all trained on the per-image pipeline, which is now --input pil.
BEFORE_THE_FLAG = {"input": "pil"}
# The arithmetic of --input cached's ColorJitter, kept in every checkpoint: "pil", PIL's own, bit for bit. The
# release that introduced --input cached ran PIL's formulas in float32 and saved no such entry.
CACHED_JITTER = "pil"


def result_args(args):
    """The flags that decide a run's result, {name: value}."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_FLAGS}


def changed_flags(args, preset):
    """{flag: (preset value, this run's value)} for every result flag off its `preset` ({flag: value})."""
    return {k: (preset.get(k), v) for k, v in result_args(args).items() if preset.get(k) != v}


def default_out(args, preset):
    """runs/<method>_<dataset>[_trial<t>], then one tag per flag off its preset (--seed 2 -> seed-2,
    --no-oclr -> no-oclr, a path -> data-root-<hash>), so every configuration has its own folder."""
    tags = []
    for key, (_, value) in changed_flags(args, preset).items():
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
            "_cfg-" + short_hash(json.dumps(changed_flags(args, preset), sort_keys=True, default=str))
    return os.path.join("runs", name)


def short_hash(text):
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def describe(value):
    """A flag's value as it is typed: 300,200 for a list, the text of a string."""
    return ",".join(map(str, value)) if isinstance(value, list) else value if isinstance(value, str) \
        else json.dumps(value)


def check_same_run(saved, args, preset, path, keys, what):
    """Refuse `path` when a flag among `keys` differs from the run it was written by (naming each);
    a flag the checkpoint predates counts as the value it had then (BEFORE_THE_FLAG), else as its preset value."""
    current = result_args(args)
    was = lambda k: saved.get(k, BEFORE_THE_FLAG.get(k, preset.get(k)))
    diffs = [f"--{k.replace('_', '-')} {describe(was(k))} (saved) vs {describe(current[k])} (now)"
             for k in keys if was(k) != current[k]]
    if diffs:
        raise SystemExit(f"train.py: error: {path} {what}, but these flags differ: " + "; ".join(diffs) +
                         ". Run the other configuration in its own folder (drop --out for the default "
                         "one), or give the same flags.")


def stage_one_view(run, learning_rate):
    """What stage one computes from, beyond its flags: its iterations and the lr of each of its epochs."""
    return {"iters_stage_one": run["iters"][0],
            "lr_stage_one": [learning_rate(e, argparse.Namespace(**run)) for e in range(run["stage_one_epochs"])]}


def check_jitter(ckpt, args, path, jitters):
    """Refuse to go on from a --input cached checkpoint whose epochs ran the float32 ColorJitter when the
    epochs still to train run ColorJitter: the run would switch arithmetic half-way (the epochs after it
    would be neither release's). jitters(epoch, args): that epoch's training views run ColorJitter."""
    saved, done = ckpt["args"], ckpt["epoch"]
    if saved.get("input", BEFORE_THE_FLAG["input"]) != "cached" or ckpt.get("jitter") == CACHED_JITTER:
        return
    if any(jitters(e, args) for e in range(done)) and any(jitters(e, args) for e in range(done, args.epochs)):
        raise SystemExit(f"train.py: error: {path} was trained with --input cached by an earlier release, whose "
                         f"ColorJitter ran in float32; this release's is PIL's, bit for bit, so the epochs from {done} "
                         f"on would be trained with another jitter than its first {done}. "
                         f"Start the run again (another --out, or --resume none --overwrite), or finish it with "
                         f"the earlier release.")


def plan_run(args, preset, learning_rate, jitters=lambda epoch, args: False):
    """Decide, before anything is written, how this run starts: a dict with "mode" (fresh, resume,
    init) and the checkpoint to start from. Every refusal about the folder comes from here.
    preset: {flag: value} of the presets for this method and dataset; learning_rate(epoch, args);
    jitters(epoch, args): that epoch's training views run ColorJitter (`check_jitter`)."""
    holder = lock_holder(args.out)
    if holder is not None:
        raise SystemExit(f"train.py: error: {args.out} is being written by another run (process {holder}); wait for "
                         f"it to finish or stop it (two runs in one folder would interleave their epochs)")
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
        check_same_run(ckpt["args"], args, preset, path, keys, "was written by a run with other flags")
        if args.epochs < ckpt["epoch"]:
            raise SystemExit(f"train.py: error: --epochs {args.epochs}, but {path} has {ckpt['epoch']} epochs "
                             f"done; give --epochs >= {ckpt['epoch']} (or another --out)")
        check_jitter(ckpt, args, path, jitters)
        return {"mode": "resume", "path": path, "ckpt": ckpt, "own": path == own, "log_bytes": ckpt.get("log_bytes", 0)}
    if present:   # results.json or stage1.pth without last.pth: not a state this code leaves
        raise SystemExit(f"train.py: error: {args.out} holds {', '.join(present)} but no last.pth to resume "
                         f"from; give another --out, or --resume none --overwrite to replace it")
    if args.init_from:
        ckpt = load_checkpoint(args.init_from, method=args.method, dataset=args.dataset, trial=args.trial)
        if ckpt.get("stage_one_end") is not True or ckpt["epoch"] != args.stage_one_epochs:
            raise SystemExit(f"train.py: error: --init-from {args.init_from}: expected a stage1.pth written at the "
                             f"end of stage one (--stage-one-epochs {args.stage_one_epochs}); it holds "
                             f"{ckpt['epoch']} epochs")
        saved = dict(ckpt["args"], **stage_one_view(ckpt["args"], learning_rate))
        extra = stage_one_view(vars(args), learning_rate)
        view = argparse.Namespace(**dict(vars(args), **extra))
        keys = [k for k in result_args(args) if k not in STAGE_TWO_FLAGS]
        check_same_run(saved, view, preset, args.init_from, keys + list(extra),
                       "holds a stage one trained with other flags")
        check_jitter(ckpt, args, args.init_from, jitters)
        return {"mode": "init", "path": args.init_from, "ckpt": ckpt}
    return {"mode": "fresh", "replace": False}


def open_run_folder(args, plan, history, preset):
    """Create or continue the folder: log.txt and metrics.jsonl hold exactly the checkpoint's epochs
    (lines an interrupted epoch wrote are cut), args.json the resolved flags. Returns the Log."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, LOCK), "w") as f:    # held until release_run_folder (see lock_holder)
        f.write(f"{os.getpid()}\n")
    atexit.register(release_run_folder, args.out)          # if the run never reaches its own release
    if plan.get("replace"):             # --resume none --overwrite
        for name in RUN_FILES:
            if os.path.isfile(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    log_path = os.path.join(args.out, "log.txt")
    keep = plan.get("log_bytes", 0) if plan.get("own") else 0
    if os.path.isfile(log_path) and os.path.getsize(log_path) > keep:
        with open(log_path, "r+b") as f:
            f.truncate(keep)
    write_atomic(os.path.join(args.out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
    record = dict(vars(args), changed_from_preset={k: list(v) for k, v in changed_flags(args, preset).items()})
    write_atomic(os.path.join(args.out, "args.json"), json.dumps(record, indent=1, default=str))
    return Log(args.out)


LOCK = ".lock"


@contextmanager
def run_folder(args, plan, history, preset, main=True):
    """The run's Log for the time of the run: `open_run_folder` and the folder's hold on entry (rank 0; the
    other ranks get a NullLog), the hold dropped on exit, however the run ends."""
    if not main:
        yield NullLog()
        return
    try:
        yield open_run_folder(args, plan, history, preset)
    finally:
        release_run_folder(args.out)


def release_run_folder(out):
    """Drop this process's hold on `out` (the end of a run, however it ends)."""
    path = os.path.join(out, LOCK)
    if lock_holder(out) is None and os.path.isfile(path):
        os.remove(path)


def lock_holder(out):
    """The pid of another live process that holds `out`'s lock, or None (no lock, a lock of this process, or of
    a process that has died)."""
    try:
        with open(os.path.join(out, LOCK)) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)            # PermissionError: alive, another user's
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class NullLog:
    """The log of a rank other than 0: it says and writes nothing."""

    def __call__(self, msg):
        pass

    file_only = metrics = __call__

    def size(self):
        return 0


class Log:
    """Prints a line and appends it to <out>/log.txt; metrics go to <out>/metrics.jsonl."""

    def __init__(self, out):
        self.out = out

    def __call__(self, msg):
        tqdm.write(msg)
        self.file_only(msg)

    def file_only(self, msg):
        """Appends to log.txt without printing (the full tables the screen summarises)."""
        with open(os.path.join(self.out, "log.txt"), "a") as f:
            f.write(msg + "\n")

    def size(self):
        path = os.path.join(self.out, "log.txt")
        return os.path.getsize(path) if os.path.isfile(path) else 0

    def metrics(self, record):
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------
# The data, checked before the first epoch

def check_test_set(args):
    """The test protocol's images as ImageLists, listed now so that a missing file or split, or a query
    set without one match in its gallery, stops the run before training rather than after it."""
    if args.dataset == "regdb":
        from data.regdb import regdb_test
        settings = {d: regdb_test(args.data_root, args.trial, direction=d) for d in ("v2t", "t2v")}
    elif args.dataset == "llcm":
        from data.llcm import llcm_test
        settings = {f"{d} trial {t}": llcm_test(args.data_root, direction=d, trial=t)
                    for d in ("i2v", "v2i") for t in range(args.eval_trials)}
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
        raise unusable(errors, len(paths), "images checked")
    tqdm.write(f"checked {len(paths)} images in {time.time() - t:.1f} s")
