"""One logging system for both entry points: Python's `logging`, printed above the progress bars, and a run's
log.txt and metrics.jsonl.

Every module logs to `logging.getLogger(__name__)`; nothing is configured at import. An entry point calls
`setup()` once: lines of level INFO and above go to stdout through `tqdm.write`, so that they never tear a
progress bar (the bars are on stderr). A training run adds its folder's log.txt for as long as it runs
(`RunLog`); a line meant for the file only (the full per-trial tables the screen summarises) carries
`extra=FILE_ONLY`. Processes other than rank 0 of a torchrun job print warnings and errors only.

    log = logging.getLogger(__name__)
    log.info("clustering vis: 412 clusters")          # screen and log.txt
    log.info(full_table, extra=FILE_ONLY)             # log.txt only
"""
import json
import logging
import math
import os

import torch
from tqdm import tqdm

from plumbing.distributed import mean_over_ranks

FILE_ONLY = {"file_only": True}
READ_EVERY = 50   # training iterations between two read-backs of their losses: the step's only wait for the device


class _Console(logging.Handler):
    """stdout, one record a line, through tqdm.write so that a live progress bar is redrawn below it."""

    def emit(self, record):
        if getattr(record, "file_only", False):
            return
        try:
            tqdm.write(self.format(record))
        except Exception:                     # logging's own contract: a handler never raises
            self.handleError(record)


def setup(main=True):
    """Print this process's log lines (INFO and above; warnings only on a rank other than 0). Idempotent."""
    root = logging.getLogger()
    if not any(isinstance(h, _Console) for h in root.handlers):
        console = _Console()
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    root.setLevel(logging.INFO if main else logging.WARNING)


class RunLog:
    """A run folder's log.txt (every line logged while the run is open) and metrics.jsonl (one JSON line per
    epoch). Use as a context manager: the file stops receiving lines when the run ends, however it ends."""

    def __init__(self, out):
        self.out = out
        self.handler = logging.FileHandler(os.path.join(out, "log.txt"), encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def __enter__(self):
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()

    def size(self):
        """Bytes of log.txt so far: a checkpoint records it, and a resume cuts the lines of an unfinished epoch."""
        self.handler.flush()
        path = os.path.join(self.out, "log.txt")
        return os.path.getsize(path) if os.path.isfile(path) else 0

    def metrics(self, record):
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


class NoRunLog:
    """The RunLog of a rank other than 0: it writes nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def size(self):
        return 0

    def metrics(self, record):
        pass


class LossReadout:
    """An epoch's per-iteration losses, kept on the device and read back to the host once every READ_EVERY
    iterations and at the end: a training step never waits for the device but there. Each read-back checks every
    loss; one that is not finite stops the run naming its iteration (the steps after it, up to the read-back, ran
    on; no checkpoint of the epoch is written). Under torchrun the losses are means over the ranks (one all-reduce
    per read-back). The progress bar shows each interval's mean total loss.

        losses = LossReadout(epoch, world)
        for batch in losses.progress(loader):  # the epoch's progress bar (rank 0)
            losses.add(loss, part_1, part_2)   # 0-dim device tensors, the total first; no wait
        rows = losses.read()                   # [[loss, part_1, part_2] as floats, one per iteration]
    """

    def __init__(self, epoch, world):
        self.epoch, self.world, self.bar = epoch, world, None
        self.pending, self.rows = [], []

    def progress(self, batches, total=None):
        """`batches` under the epoch's progress bar, which shows each read-back's mean loss."""
        self.bar = tqdm(batches, total=total, desc=f"epoch {self.epoch}", leave=False, disable=not self.world.main)
        return self.bar

    def add(self, *values):
        self.pending.append(torch.stack([v.detach() for v in values]))
        if len(self.pending) == READ_EVERY:
            self._read()

    def read(self):
        self._read()
        return self.rows

    def _read(self):
        if not self.pending:
            return
        first = len(self.rows)
        values = mean_over_ranks(torch.stack(self.pending), self.world)          # [n][P] floats: the one wait
        self.pending.clear()
        for i, row in enumerate(values):
            bad = [v for v in row if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(
                    f"loss is {bad[0]} at epoch {self.epoch}, iteration {first + i} (read back after iteration "
                    f"{first + len(values) - 1}): stopping. The last good checkpoint is last.pth of the previous "
                    f"epoch; try a lower --lr or --amp off.")
        self.rows.extend(values)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(f"loss {sum(row[0] for row in values) / len(values):.3f}")
