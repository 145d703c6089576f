"""Checkpoints (one format for both methods, complete and atomic) and the backbone's initial weights.

A checkpoint is a dict saved by torch.save: the model, the optimizer and its loss scaler, the next epoch, the
resolved flags ("args"), the history of epoch records, the RNG state, the bytes of log.txt, and at the end of
a run its results. `save_checkpoint` writes a temporary file and renames it, so a crash leaves the previous one.
"""
import os
import shutil
import socket
import urllib.parse

import torch

from model import TwoStreamNet

CHECKPOINT_FORMAT = "vireid-checkpoint-v2"
# torchvision's ImageNet V1 weights (not DEFAULT, which is V2 for ResNet-50). The MULT code used the
# original release of the same V1 weights, resnet50-19c8e357.pth; either file is accepted.
IMAGENET_V1_FILES = {
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
}
IMAGENET_V1_URL = "https://download.pytorch.org/models/{}"
CONNECT_TIMEOUT_S = 5     # offline machines fail the reachability check within this, never hang
TRANSFER_TIMEOUT_S = 60   # a stalled download ends with an error after this many idle seconds


def save_checkpoint(state, path):
    """Write `state` to `path` atomically (temporary file + rename)."""
    state = dict(state, format=CHECKPOINT_FORMAT)
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:       # torch reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(folder).free / 2**20
        raise OSError(f"cannot write checkpoint {path}: {str(err).splitlines()[0][:200]}; "
                      f"{free:.0f} MiB free in {folder} (is it full?). The previous checkpoint, "
                      f"if any, is unchanged.") from None


def load_checkpoint(path, method=None, dataset=None, trial=None, resume=False):
    """Read a checkpoint and check it is ours and matches the method / dataset / trial asked for. Evaluation
    reads the model of any release's checkpoint (the network is unchanged since the first); a run continues
    (`resume`) only from this release's, whose every entry it knows."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(ckpt, dict) or not str(ckpt.get("format")).startswith("vireid-checkpoint-"):
        raise ValueError(f"{path} is not a vireid checkpoint (expected a file written by train.py)")
    if resume and ckpt["format"] != CHECKPOINT_FORMAT:
        raise SystemExit(f"train.py: error: {path} was written by an earlier release of vireid; start the run "
                         f"afresh with --resume none --overwrite (or give another --out)")
    args = ckpt["args"]
    for name, want in (("method", method), ("dataset", dataset), ("trial", trial)):
        have = args.get(name)
        if want is not None and have != want:
            raise ValueError(f"checkpoint {path} was trained with --{name} {have}, but --{name} {want} was "
                             f"asked for; use a checkpoint of the same {name} (or another --out folder)")
    return ckpt


def model_from_checkpoint(path, device="cpu", method=None):
    """Build the eval-mode model stored in a checkpoint: (model_fn(images, modality), meta).
    `method` ("mult" / "mbmil"), when given, must be the one the checkpoint was trained with."""
    ckpt = load_checkpoint(path, method=method)
    args = ckpt["args"]
    model = TwoStreamNet(arch=args["arch"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    meta = {k: args.get(k) for k in ("height", "width", "dataset", "method", "trial", "data_root", "arch")}
    meta["epoch"] = ckpt["epoch"]
    return model.modality_fn(), meta


def restore(model, optimizer, run, args, world):
    """The run's state: fresh, or its checkpoint's model, optimizer, RNG, next epoch and history (rank 0 read the
    checkpoint while preparing the run; the other ranks read it now). -> {"start", "history", "untrained",
    "results"}; "results" only for a finished run."""
    state = {"start": 0, "history": [], "untrained": None, "results": None}
    plan = run["plan"]
    ckpt = run.pop("ckpt", None) if world.main else load_checkpoint(plan["path"]) if plan["mode"] != "fresh" else None
    if ckpt is None:
        return state
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    optimizer.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["torch_rng"])
    state.update(start=ckpt["epoch"], history=ckpt["history"], untrained=ckpt.get("untrained"))
    if ckpt["epoch"] == args.epochs:
        state["results"] = ckpt.get("results")
    return state


def save_epoch(model, optimizer, args, state, run_log):
    """The end of an epoch on disk: last.pth (and at the end of stage one stage1.pth, the branching point of
    --init-from ablations), then the epoch's metrics line. The checkpoint comes first: a crash between the two
    leaves a line missing, which the resume rewrites from the checkpoint's history, never a line twice."""
    epoch = state["history"][-1]["epoch"]
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": optimizer.scaler.state_dict(),
            "epoch": epoch + 1, "args": vars(args), "history": state["history"], "untrained": state["untrained"],
            "torch_rng": torch.get_rng_state(), "results": state["results"], "log_bytes": run_log.size()}
    save_checkpoint(ckpt, os.path.join(args.out, "last.pth"))
    if epoch + 1 == args.stage_one_epochs:
        save_checkpoint(dict(ckpt, stage_one_end=True), os.path.join(args.out, "stage1.pth"))
    run_log.metrics(state["history"][-1])


def initial_weights(args):
    """The file (or None) of the backbone's initial weights: --pretrained, the ImageNet V1 file of the torch cache
    (downloaded first if missing and online), or for the CPU demo the stand-in that demo/pretrain.py trains once
    and caches beside the data."""
    if args.pretrained == "imagenet":
        return imagenet_weights_path(args.arch)
    if args.pretrained != "synthetic":
        return None if args.pretrained in ("none", "") else args.pretrained
    from demo.pretrain import ensure_pretrained
    return ensure_pretrained(os.path.join(os.path.dirname(os.path.normpath(args.data_root)), "synthetic-pretrain"),
                             arch=args.arch, height=args.height, width=args.width, device=args.device)


def imagenet_weights_path(arch):
    """The V1 weight file of `arch` in the torch hub cache ($TORCH_HOME/hub/checkpoints). When it is
    not there and the machine is online, torchvision's own download puts it there first (progress bar,
    hash check), as torchvision users expect; offline, a clear error within seconds."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in IMAGENET_V1_FILES[arch]:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    name = IMAGENET_V1_FILES[arch][0]
    url = IMAGENET_V1_URL.format(name)
    try:
        _download_to_cache(url, folder)
    except (OSError, RuntimeError) as err:    # URLError and timeouts are OSErrors; a bad hash a RuntimeError
        names = " or ".join(IMAGENET_V1_FILES[arch])
        raise FileNotFoundError(
            f"--pretrained imagenet: ImageNet V1 weights for {arch} not found; looked for {names} in "
            f"{folder}, and downloading {url} failed ({getattr(err, 'reason', err)}). On a connected "
            f"machine fetch {url} and copy it into that folder (or set TORCH_HOME), or pass --pretrained "
            f"/path/to/{name}, or --pretrained none to train from scratch.") from None
    return os.path.join(folder, name)


def _download_to_cache(url, folder):
    """torch.hub.load_state_dict_from_url (what torchvision's weight enums call) into `folder`, with
    the hash check; a host that cannot be reached fails at once instead of hanging."""
    socket.create_connection((urllib.parse.urlsplit(url).hostname, 443), timeout=CONNECT_TIMEOUT_S).close()
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TRANSFER_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(url, model_dir=folder, map_location="cpu", progress=True,
                                           check_hash=True)
    finally:
        socket.setdefaulttimeout(saved)
