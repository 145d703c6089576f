"""Checkpoints (one format for both methods, complete and atomic) and the backbone's initial weights.

A checkpoint is a dict saved by torch.save: the model, the optimizer and its loss scaler, the next epoch, the
resolved flags ("args"), the history of epoch records, the RNG state, the bytes of log.txt, the training set's
fingerprint (checks.training_fingerprint, which a resume compares), and at the end of a run its results.
`save_checkpoint` writes a temporary file and renames it, so a crash leaves the previous one.
"""
import os
import shutil
import socket
import urllib.parse
import warnings

import torch
import torchvision

from model import ARCHS, TwoStreamNet, load_backbone_weights

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
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a folder; expected a checkpoint file written by train.py, "
                                f"e.g. {os.path.join(path, 'last.pth')}")
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
    check_model_fits(ckpt.get("model"), args.get("arch"), f"checkpoint {path}")
    return ckpt


def check_model_fits(state, arch, what):
    """ValueError in one line when the state dict `state` is not that of a TwoStreamNet(arch): a file whose model
    another --arch wrote (a resnet18 run holding resnet50 weights), or a truncated one. Compared against a model
    built on the meta device: shapes only, no memory, a tenth of a second."""
    if arch not in ARCHS:
        raise ValueError(f"{what}: its --arch is {arch!r}; expected one of {ARCHS}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: its 'model' entry is not a state dict of tensors; expected a file written by "
                         f"train.py")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in TwoStreamNet(arch).state_dict().items()}
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if not (wrong or missing or extra):
        return
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} of other shapes (e.g. {wrong[0]}: {list(state[wrong[0]].shape)} in the file, "
                     f"{list(expected[wrong[0]])} in a {arch})")
    parts += [f"{len(names)} {what} (e.g. {names[0]})" for names, what in ((missing, "missing"), (extra, "unknown"))
              if names]
    dim = state["bnneck.weight"].shape[0] if isinstance(state.get("bnneck.weight"), torch.Tensor) else None
    holds = {2048: "resnet50", 512: "resnet18"}.get(dim)
    raise ValueError(f"{what} says --arch {arch}, but its model tensors do not fit a {arch}: {', '.join(parts)}"
                     + (f"; they are {holds} weights (a {dim}-dim BN-neck)" if holds and holds != arch else "")
                     + "; expected the model train.py wrote with that --arch")


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


def restore(model, optimizer, run, args):
    """The run's state: fresh, or its checkpoint's model, optimizer, RNG, next epoch and history, read by every rank
    from the file rank 0 checked while preparing the run (a broadcast would send the whole optimizer state through
    rank 0's device). -> {"start", "history", "untrained", "results"}; "results" only for a finished run."""
    state = {"start": 0, "history": [], "untrained": None, "results": None, "training_set": run.get("training_set")}
    plan = run["plan"]
    ckpt = load_checkpoint(plan["path"]) if plan["mode"] != "fresh" else None
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
            "torch_rng": torch.get_rng_state(), "results": state["results"], "log_bytes": run_log.size(),
            "training_set": state.get("training_set")}
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
        if args.pretrained not in ("none", ""):
            check_backbone_file(args.pretrained, args.arch)
        return None if args.pretrained in ("none", "") else args.pretrained
    from demo.pretrain import ensure_pretrained
    return ensure_pretrained(os.path.join(os.path.dirname(os.path.normpath(args.data_root)), "synthetic-pretrain"),
                             arch=args.arch, height=args.height, width=args.width, device=args.device)


def check_backbone_file(path, arch):
    """model.load_backbone_weights's refusals (a missing file, not a state dict, another --arch: one line each)
    now, before the checks and caches that precede building the model, into a ResNet on the meta device: shapes
    are compared, nothing is allocated."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")             # "copying into a meta parameter is a no-op": the point here
        load_backbone_weights(getattr(torchvision.models, arch)(weights=None), path)


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
