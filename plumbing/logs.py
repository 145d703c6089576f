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
import os

from tqdm import tqdm

FILE_ONLY = {"file_only": True}


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
