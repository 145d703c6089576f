"""Run folders: one configuration per folder, resumable, branchable, never overwritten unasked.

A researcher's workflow is a main run, then ablations, seeds and resumes; this file keeps their numbers
apart. Used by train.py, on rank 0:

    with hold_run_folder(args.out):                    # an OS lock: a second start of the run is refused at once
        plan = plan_run(args, learning_rate)           # every refusal about the folder
        ...                                            # the checks before the first epoch (plumbing/checks.py)
        with open_run_folder(args, plan, history, preset) as run_log:   # only now are the run's files written

- The default folder names every flag that changes the result and is not the preset's (`default_out`).
- A resume compares the checkpoint's result-changing flags with the current ones (`plan_run`); only
  RUNTIME_FLAGS may differ, and --epochs may grow. Its training images must be those it started with
  (`check_same_data`, once the data are listed).
- `stage1.pth` (written by train.py at the end of stage one) starts the stage-two ablations of
  `--init-from`, whose stage-one flags must agree.
- log.txt and metrics.jsonl hold exactly the checkpoint's epochs (`open_run_folder`).
"""
import argparse
import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager

from plumbing.checkpoints import load_checkpoint
from plumbing.logs import NoRunLog, RunLog

# Flags that cannot change what a run computes or reports: they may differ between a run and its resume.
RUNTIME_FLAGS = frozenset({"out", "resume", "overwrite", "init_from", "check_images", "workers", "device",
                           "threads", "extract_batch", "eval_every", "eval_untrained", "select_on_test",
                           "allow_count_mismatch", "diagnostics", "dist_timeout", "cache_dir", "rank",
                           "world_size"})
# Flags that stage one never reads: a stage two may branch off a shared stage one with other values.
STAGE_TWO_FLAGS = frozenset({"association", "oclr", "alpha", "beta", "sinkhorn_lambda", "hard_neg_k",
                             "epochs", "eval_trials", "iters", "lr_steps"})   # iters, lr_steps: compared per stage
RUN_FILES = ("last.pth", "stage1.pth", "results.json", "metrics.jsonl", "log.txt", "args.json", "curves.png")
LOCK = ".lock"
log = logging.getLogger(__name__)


def add_run_flags(parser):
    """train.py's flags of where and how a run runs: its folder and resume, its evaluation and diagnostics, the
    device and precision, the input pipeline and processes. Of them --amp, --input and --sync-bn change results
    (they name the run folder when off the default), and the evaluation flags what is reported."""
    a = parser.add_argument
    a("--allow-count-mismatch", action="store_true", help="accept a SYSU-MM01 or LLCM with non-official counts")
    a("--diagnostics", action=argparse.BooleanOptionalAction, default=None,
      help="also run the baselines on the same features each stage-two epoch (MULT: OT's labels; MBMIL: the plain "
           "Jaccard's clusters) and log their quality; changes no result (default: synthetic only)")
    a("--eval-every", type=int, default=None, help="evaluate every N epochs (1; the last epoch always)")
    a("--eval-trials", type=int, default=None, help="SYSU / LLCM gallery draws of the final evaluation (10)")
    a("--eval-untrained", action=argparse.BooleanOptionalAction, default=None,
      help="evaluate the untrained model first, the reference of the learning curve (default: synthetic only)")
    a("--select-on-test", action="store_true",
      help="ALSO report the best epoch by test mAP (model selection on the test set; labelled as such)")
    a("--out", type=str, default=None,
      help="run folder (default runs/<method>_<dataset>[_trial<t>] + the flags off the preset)")
    a("--resume", type=str, default="auto", help="auto (continue --out if it has last.pth), a checkpoint, or none")
    a("--overwrite", action="store_true", help="with --resume none: replace the run already in --out")
    a("--init-from", type=str, default=None,
      help="a stage1.pth: start this run's stage two from that shared stage one (its stage-one flags must agree)")
    a("--check-images", action=argparse.BooleanOptionalAction, default=True,
      help="decode every training and test image once before training (on; with --input cached the cache build "
           "decodes the training images)")
    a("--device", type=str, default=None, help="cpu, cuda, cuda:1 (default: cuda if available; torchrun: "
      "cuda:LOCAL_RANK). On CUDA convolutions may use TF32, matrix products (logits, kNN) stay IEEE float32")
    a("--amp", choices=("off", "bf16", "fp16"), default="off",
      help="mixed precision of the backbone in training, feature extraction and evaluation (off; bf16 on GPUs "
           "that have it); features leave it as float32, and memories, losses and clustering stay float32; fp16 "
           "scales the loss. off on CUDA: convolutions in TF32, matrix products in IEEE float32")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=False, help="channels-last memory format")
    a("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
      help="under torchrun, BatchNorm statistics of the whole global batch (on; --no-sync-bn: each rank's share)")
    a("--dist-timeout", type=int, default=1800, help="seconds a rank waits for the others before it stops (1800)")
    a("--input", choices=("cached", "pil"), default="cached",
      help="training input: cached (default: each image decoded and resized once into a uint8 cache, augmented "
           "in batches on --device, the same pixels) or pil (per image, the reference); docs/training.md")
    a("--cache-dir", type=str, default=None,
      help="folder of the --input cached image caches (default: <out>/cache); runs of one dataset may share one")
    a("--workers", type=int, default=None, help="data-loading processes (papers' presets: 4)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--extract-batch", type=int, default=None, help="batch size of feature extraction (128)")


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


def check_same_run(saved, args, path, keys, what):
    """Refuse `path` when a flag among `keys` differs from the run it was written by (naming each)."""
    current = result_args(args)
    diffs = [f"--{k.replace('_', '-')} {describe(saved.get(k))} (saved) vs {describe(current[k])} (now)"
             for k in keys if saved.get(k) != current[k]]
    if diffs:
        raise SystemExit(f"train.py: error: {path} {what}, but these flags differ: " + "; ".join(diffs) +
                         ". Run the other configuration in its own folder (drop --out for the default "
                         "one), or give the same flags.")


def check_same_data(plan, fingerprint, saved):
    """Refuse a resume (or an --init-from branch) whose training images are not those its checkpoint trained on,
    naming what changed: images added, removed, or replaced (another content digest). fingerprint, saved: the
    current and the checkpoint's checks.training_fingerprint; a checkpoint that records none (written before the
    fingerprint was) is not compared."""
    if plan["mode"] == "fresh" or saved is None:
        return
    changes = []
    for name in ("vis", "ir"):
        before = {row[0]: row[5] for row in saved[name]}
        now = {row[0]: row[5] for row in fingerprint[name]}
        for what, paths in (("added", sorted(now.keys() - before.keys())),
                            ("removed", sorted(before.keys() - now.keys())),
                            ("replaced", sorted(p for p in now.keys() & before.keys() if now[p] != before[p]))):
            if paths:
                changes.append(f"{len(paths)} {name} image{'s' * (len(paths) > 1)} {what} ("
                               + ", ".join(paths[:2]) + (", ..." if len(paths) > 2 else "") + ")")
    if changes:
        how = ("restore them, or start afresh with --resume none --overwrite (or give another --out)"
               if plan["mode"] == "resume" else "restore them, or train stage one on these images (drop --init-from)")
        raise SystemExit(f"train.py: error: the training images under {fingerprint['root']} changed since "
                         f"{plan['path']} was written: {'; '.join(changes)}; a run continues on the images it "
                         f"started with: {how}")


def stage_one_view(run, learning_rate):
    """What stage one computes from, beyond its flags: its iterations and the lr of each of its epochs."""
    return {"iters_stage_one": run["iters"][0],
            "lr_stage_one": [learning_rate(e, argparse.Namespace(**run)) for e in range(run["stage_one_epochs"])]}


def plan_run(args, learning_rate):
    """Decide, before anything else is written, how this run starts: a dict with "mode" (fresh, resume,
    init) and the checkpoint to start from. Every refusal about the folder comes from here.
    learning_rate(epoch, args): train.py's (an --init-from branch must share stage one's lr schedule)."""
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
        ckpt = load_checkpoint(path, method=args.method, dataset=args.dataset, trial=args.trial, resume=True)
        keys = [k for k in result_args(args) if k != "epochs"]
        check_same_run(ckpt["args"], args, path, keys, "was written by a run with other flags")
        if args.epochs < ckpt["epoch"]:
            raise SystemExit(f"train.py: error: --epochs {args.epochs}, but {path} has {ckpt['epoch']} epochs "
                             f"done; give --epochs >= {ckpt['epoch']} (or another --out)")
        return {"mode": "resume", "path": path, "ckpt": ckpt, "own": path == own, "log_bytes": ckpt.get("log_bytes", 0)}
    if present:   # results.json or stage1.pth without last.pth: not a state this code leaves
        raise SystemExit(f"train.py: error: {args.out} holds {', '.join(present)} but no last.pth to resume "
                         f"from; give another --out, or --resume none --overwrite to replace it")
    if args.init_from:
        ckpt = load_checkpoint(args.init_from, method=args.method, dataset=args.dataset, trial=args.trial,
                               resume=True)
        if ckpt.get("stage_one_end") is not True or ckpt["epoch"] != args.stage_one_epochs:
            raise SystemExit(f"train.py: error: --init-from {args.init_from}: expected a stage1.pth written at the "
                             f"end of stage one (--stage-one-epochs {args.stage_one_epochs}); it holds "
                             f"{ckpt['epoch']} epochs")
        saved = dict(ckpt["args"], **stage_one_view(ckpt["args"], learning_rate))
        extra = stage_one_view(vars(args), learning_rate)
        view = argparse.Namespace(**dict(vars(args), **extra))
        keys = [k for k in result_args(args) if k not in STAGE_TWO_FLAGS]
        check_same_run(saved, view, args.init_from, keys + list(extra),
                       "holds a stage one trained with other flags")
        return {"mode": "init", "path": args.init_from, "ckpt": ckpt}
    return {"mode": "fresh", "replace": False}


@contextmanager
def hold_run_folder(out):
    """Hold `out` for this run: an exclusive flock on out/.lock, which the OS drops when the process ends however
    it ends, so that no stale lock ever needs deleting by hand. A second run of the same folder is refused at once,
    naming the process that holds it. A folder this call created is removed again if the run stops before
    writing anything else into it (a refused run leaves nothing behind)."""
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SystemExit(f"train.py: error: {out} is being written by another run ({holder}); wait for it to "
                         f"finish or stop it: two runs in one folder would interleave their epochs") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
             .encode())
    try:
        yield
    except BaseException:
        if created and os.listdir(out) == [LOCK]:
            os.remove(path)
            os.rmdir(out)
        raise
    finally:
        os.close(fd)                                   # releases the lock


def open_run_folder(args, plan, history, preset):
    """Create or continue the run's files: log.txt and metrics.jsonl hold exactly the checkpoint's epochs
    (lines an interrupted epoch wrote are cut), args.json the resolved flags. Returns the RunLog."""
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
    return RunLog(args.out)


@contextmanager
def run_log(args, run, state, preset, main=True):
    """The run's RunLog for the time of its epochs: on rank 0 its files opened (`open_run_folder`) and its first
    lines written (`log_start`); a NoRunLog, which writes nothing, on the other ranks.
    run: checks.prepare_run's dict; state: checkpoints.restore's."""
    if not main:
        yield NoRunLog()
        return
    with open_run_folder(args, run["plan"], state["history"], preset) as log_file:
        log_start(args, preset, run, state["start"])
        yield log_file


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def log_start(args, preset, run, start):
    """The first lines of a run's log: its flags, how it differs from the preset, its data, how it starts.
    run: checks.prepare_run's dict (plan, vis, ir, warnings, caches, weights)."""
    log.info("arguments: " + json.dumps(vars(args)))
    changed = changed_flags(args, preset)
    log.info(f"run folder {args.out}: " + ("the preset configuration" if not changed else "off the preset in "
             + ", ".join(f"--{k.replace('_', '-')} {describe(v)}" for k, (_, v) in changed.items())))
    for message in run["warnings"]:
        log.info(f"warning: {message}")
    log.info(f"data: {args.dataset} at {args.data_root}: {len(run['vis'])} vis and {len(run['ir'])} ir training "
             f"images")
    if run["caches"] is not None:
        log.info("; ".join(run["caches"][m].summary for m in ("vis", "ir")))
    if args.pretrained == "synthetic":
        log.info(f"initial weights: {run['weights']} (supervised on a disjoint synthetic population, one class per "
                 f"identity and modality)")
    plan = run["plan"]
    if plan["mode"] == "resume":
        log.info(f"resumed from {plan['path']}: epochs 0..{start - 1} done, continuing at epoch {start}")
    elif plan["mode"] == "init":
        log.info(f"initialised from {plan['path']}: stage one (epochs 0..{start - 1}) shared, stage two starts here")
