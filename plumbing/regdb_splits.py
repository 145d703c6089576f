"""RegDB's protocol as one command (`train.py --dataset regdb --trial all`): one model per split, 1..10 in turn,
each in its own run folder (finished splits are read back, an interrupted one resumes), then the ten-split table.
Every split's folder, lists and images are checked before the first one trains.
"""
import argparse
import logging
import os

from data.regdb import REGDB_TRIALS
from plumbing import checks, distributed, reports, runs

log = logging.getLogger(__name__)


def run_all_splits(args, world, resolve_args, train_one, learning_rate):
    """The ten runs, then the table across them -> the summary dict (rank 0; None on the other ranks).
    resolve_args(args) -> a split's resolved flags, train_one(args, world) trains one split,
    learning_rate(epoch, args): train.py's."""
    splits = [resolve_args(argparse.Namespace(**dict(vars(args), trial=t, out=os.path.join(args.out, f"trial{t}")
                                                     if args.out else None))) for t in REGDB_TRIALS]
    distributed.on_rank_zero(world, _check_all, splits, args, learning_rate)
    for split in splits:
        log.info(f"RegDB split {split.trial} of 10: {split.out}")
        train_one(argparse.Namespace(**dict(vars(split), check_images=False)), world)
    if not world.main:
        return None
    folders = [split.out for split in splits]
    text, summary = reports.summarize_runs(folders)
    first = splits[0].out
    folder = args.out or os.path.join(os.path.dirname(first),
                                      os.path.basename(first).replace("_trial1", "_ten-splits", 1))
    reports.write_summary(folder, text, summary)
    log.info(f"RegDB, ten splits (one model each):\n{text}\nwritten to {folder}/summary.txt and summary.json")
    return summary


def _check_all(splits, args, learning_rate):
    """Every refusal of any split, and every image of every split decoded, before the first split trains."""
    lists = []
    for split in splits:
        plan = runs.plan_run(split, learning_rate)
        vis, ir, tests, _ = checks.check_data(split)
        if plan["mode"] != "fresh":                 # a split to resume: its training images must be its own
            saved = plan["ckpt"].get("training_set")
            runs.check_same_data(plan, checks.training_fingerprint(vis, ir, split.data_root, saved), saved)
        lists += [vis, ir, *tests]
    if args.check_images:
        checks.check_images(lists, args)
