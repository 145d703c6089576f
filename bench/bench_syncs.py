"""Waits for the device per training iteration: what in train.py's step reads a value back, counted on the CPU.

On a GPU every read-back of a device value (item, tolist, bool, a data-dependent shape) stops the host until the
device has run everything queued before it, so the next iteration's kernels are not queued ahead. This counts
them without a GPU, for train_mult and train_mbmil, in both stages, over a short training of the synthetic set:

- in the Python of the project (any file under the code folder but tests/ and bench/): calls of Tensor.tolist,
  .numpy, .__array__ and .cpu (on a GPU each copies the device's data back);
- in the operators (a TorchDispatchMode): those whose result a GPU must read back before it can go on:
  _local_scalar_dense (item, bool, int, float of a tensor), nonzero, unique, unique_consecutive, masked_select,
  bincount, repeat_interleave without output_size, equal, indexing with a boolean mask. An operator counts when
  the Python that called it is the project's, directly or through torch's functional wrappers (torch.unique);
  the optimizer's own reads of its step counter (a CPU tensor on every device) do not count.
The input pipeline is not the step: each epoch's batches are built before the step runs (its device half, the
batched augmentation, reads nothing back either: tests/test_fake_device.py runs it on a "cuda" FakeTensor).

    python bench/bench_syncs.py                     # this checkout
    python bench/bench_syncs.py --code /tmp/old     # another checkout of the project (e.g. `git archive` of HEAD)

tests/test_sync_free.py asserts the bound with the same counter: one read-back per read-out of the losses
(plumbing.logs.READ_EVERY iterations), none in between.
"""
import argparse
import contextlib
import os
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
           "masked_select", "bincount", "equal", "argwhere"}
PY_READS = ("tolist", "numpy", "__array__", "cpu")
TORCH = os.path.dirname(torch.__file__)
HERE = os.path.abspath(__file__)


class SyncCounter(TorchDispatchMode):
    """While active, appends (what, file:line) to .events for every read-back in code under `root`."""

    def __init__(self, root):
        super().__init__()
        self.root, self.events = os.path.abspath(root), []

    def project(self, filename):
        path = os.path.abspath(filename)
        return path.startswith(self.root + os.sep) and not path.startswith(
            (os.path.join(self.root, "tests") + os.sep, os.path.join(self.root, "bench") + os.sep))

    def caller(self, frame):
        """The first frame outside torch and this file, or None when the call came through the optimizer."""
        while frame is not None:
            name = os.path.abspath(frame.f_code.co_filename)
            if name.startswith(os.path.join(TORCH, "optim")):
                return None
            if name != HERE and not name.startswith(TORCH + os.sep):
                return frame
            frame = frame.f_back
        return None

    def note(self, what, frame):
        frame = self.caller(frame)
        if frame is not None and self.project(frame.f_code.co_filename):
            self.events.append((what, f"{os.path.relpath(frame.f_code.co_filename, self.root)}:{frame.f_lineno}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        syncs = name in SYNCING or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                    and isinstance(args[0], torch.Tensor) and len(args) < 3) or \
            (name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or [])))
        if syncs:
            self.note(name, sys._getframe(1))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def python_reads(self):
        """Tensor.tolist, .numpy, .__array__, .cpu called from the project's Python, counted."""
        saved = {m: getattr(torch.Tensor, m) for m in PY_READS}

        def wrap(m, real):
            def read(t, *a, **k):
                self.note(m, sys._getframe(1))
                return real(t, *a, **k)
            return read
        try:
            for m, real in saved.items():
                setattr(torch.Tensor, m, wrap(m, real))
            yield self
        finally:
            for m, real in saved.items():
                setattr(torch.Tensor, m, real)


@contextlib.contextmanager
def counting(root):
    """A SyncCounter active for the block (operators and the project's Python)."""
    counter = SyncCounter(root)
    with counter.python_reads(), counter:
        yield counter


def counted_steps(train, root, log):
    """Wrap train.train_mult and train.train_mbmil: their loaders are drawn first (not counted), then the step
    runs inside a SyncCounter; `log` gets (method, stage, iterations, events) per epoch."""
    real = {"mult": train.train_mult, "mbmil": train.train_mbmil}

    def step(method):
        def run(net, optimizer, loader, banks, pseudo, epoch, *rest):
            drawn = [list(x) for x in loader] if method == "mbmil" else list(loader)
            with counting(root) as counter:
                out = real[method](net, optimizer, drawn, banks, pseudo, epoch, *rest)
            stage = 2 if ("hard" in pseudo or "global" in pseudo) else 1
            log.append((method, stage, len(drawn[0] if method == "mbmil" else drawn), counter.events))
            return out
        return run
    train.train_mult, train.train_mbmil = step("mult"), step("mbmil")


TINY = ["--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16", "--k1", "6", "--k2", "2",
        "--clusters", "2", "--instances", "2", "--eval-trials", "1", "--extract-batch", "64", "--eval-every",
        "100", "--no-eval-untrained", "--no-diagnostics", "--workers", "0", "--eps", "0.6", "--global-k1", "6",
        "--global-k2", "2", "--global-eps", "0.6", "--no-check-images", "--epochs", "2", "--stage-one-epochs", "1",
        "--device", "cpu"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", default=os.path.dirname(os.path.dirname(HERE)),
                   help="the project checkout to measure (default: this one)")
    p.add_argument("--iters", type=int, default=4, help="iterations per epoch (4)")
    args = p.parse_args(argv)
    root = os.path.abspath(args.code)
    sys.path.insert(0, root)
    import train
    from demo.synthetic import render_sysu
    log = []
    counted_steps(train, root, log)
    try:
        from plumbing import logs
        logs.READ_EVERY = 10 ** 6                # one read-out at the end of each epoch
    except ImportError:                          # the code before the loss read-out (--code)
        pass
    with tempfile.TemporaryDirectory() as tmp:
        render_sysu(os.path.join(tmp, "data"), num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
        for method in ("mult", "mbmil"):
            train.main(["--method", method, "--data-root", os.path.join(tmp, "data"), "--out",
                        os.path.join(tmp, method), "--iters", str(args.iters), *TINY])
    print(f"# read-backs of the device in train.py's step, {root} (tiny synthetic run, world of one)")
    print("| method | stage | iterations | read-backs | per iteration | where (count) |")
    print("|---|---|---|---|---|---|")
    for method, stage, iters, events in log:
        where = {}
        for what, site in events:
            where[f"{what} {site}"] = where.get(f"{what} {site}", 0) + 1
        sites = "; ".join(f"{k} ({v})" for k, v in sorted(where.items(), key=lambda kv: -kv[1]))
        print(f"| {method} | {stage} | {iters} | {len(events)} | {len(events) / max(iters, 1):.2f} | {sites} |")
    return log


if __name__ == "__main__":
    main()
