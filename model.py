"""Two-stream ResNet for visible-infrared re-ID, and the checkpoint format shared by both methods.

MULT (He et al., IJCV 2024), docs/mult.md §2; MBMIL (Wang et al., AAAI 2026) uses the same AGW-style network.
- Modality-specific stems (conv1 -> bn1 -> ReLU -> maxpool), one per modality, each from its own ResNet.
- Shared layer1..layer4 from a third ResNet, last stage with stride 1 (288x144 -> 18x9 map).
- GeM pooling with a fixed p = 3: (mean over positions of x^3 + 1e-12)^(1/3).
- BN-neck: BatchNorm1d(D) with the bias frozen at zero and the weight drawn from N(1, 0.01).
  Training returns the BN-neck feature f; eval returns f / ||f||.

Paper vs official code: the official network also runs a gradient-reversal discriminator whose output
never reaches a loss (and crashes on NumPy >= 1.24); it is dropped here, as are the unused learnable GeM
parameter and the dead layer1..4 of the two stem networks (they never receive a gradient).
"""
import os
import shutil
import socket
import urllib.parse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# torchvision's ImageNet V1 weights (not DEFAULT, which is V2 for ResNet-50). The MULT code used the
# original release of the same V1 weights, resnet50-19c8e357.pth; either file is accepted.
IMAGENET_V1_FILES = {
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
}
IMAGENET_V1_URL = "https://download.pytorch.org/models/{}"
CONNECT_TIMEOUT_S = 5     # offline machines fail the reachability check within this, never hang
TRANSFER_TIMEOUT_S = 60   # a stalled download ends with an error after this many idle seconds
ARCHS = tuple(IMAGENET_V1_FILES)
CHECKPOINT_FORMAT = "vireid-checkpoint-v1"


def gem(x, p=3.0, eps=1e-12):
    """Generalised-mean pooling with fixed p: [B, C, H, W] -> [B, C]."""
    return (x.pow(p).mean(dim=(2, 3)) + eps).pow(1.0 / p)


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


def load_backbone_weights(net, path):
    """Load a torchvision-style ResNet state dict from `path` into `net` (fc ignored); clear errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained: weight file not found: {path} (expected a torchvision "
                                f"ResNet state dict such as resnet50-0676ba61.pth, or 'imagenet' / 'none')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"--pretrained: {path} is not a weight file torch.load can read safely "
                         f"({type(err).__name__}); expected a torchvision ResNet state dict saved with "
                         f"torch.save, e.g. resnet50-0676ba61.pth") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"--pretrained: {path} holds a {type(state).__name__}, expected a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    expected = {k for k in net.state_dict() if not k.startswith("fc.")}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"--pretrained: {path} does not fit this backbone: {len(missing)} tensors missing, "
                         f"e.g. {missing[:3]} (is it a weight file of the same --arch?)")
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"--pretrained: {path} does not fit this backbone: {err}") from None


def _resnet(arch, pretrained):
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    net = getattr(torchvision.models, arch)(weights=None)
    if pretrained == "imagenet":
        load_backbone_weights(net, imagenet_weights_path(arch))
    elif pretrained not in (None, "none", ""):
        load_backbone_weights(net, pretrained)
    return net


def _set_last_stride_one(layer4):
    """Make the first block of layer4 keep the resolution (stride 1 in its conv and its shortcut)."""
    block = layer4[0]
    for conv in (getattr(block, "conv2", None), getattr(block, "conv1", None)):
        if conv is not None and conv.stride != (1, 1):
            conv.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


class TwoStreamNet(nn.Module):
    """Visible stem + infrared stem -> shared layer1..4 -> GeM -> BN-neck (docs/mult.md §2).

    forward(x_vis [B_v, 3, H, W] or None, x_ir [B_r, 3, H, W] or None) -> [B_v + B_r, D], visible rows
    first. Both modalities go through the shared layers in one batch, so BN statistics mix them.
    """

    def __init__(self, arch="resnet50", pretrained="none", last_stride=1):
        super().__init__()
        stems = []
        for _ in range(2):  # one ResNet per stem, each with its own ImageNet copy
            net = _resnet(arch, pretrained)
            stems.append(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool))
        self.stem_vis, self.stem_ir = stems
        shared = _resnet(arch, pretrained)
        if last_stride == 1:
            _set_last_stride_one(shared.layer4)
        self.shared = nn.Sequential(shared.layer1, shared.layer2, shared.layer3, shared.layer4)
        self.feature_dim = shared.fc.in_features
        self.bnneck = nn.BatchNorm1d(self.feature_dim)
        nn.init.normal_(self.bnneck.weight, 1.0, 0.01)
        nn.init.zeros_(self.bnneck.bias)
        self.bnneck.bias.requires_grad_(False)  # frozen zero bias
        self.arch = arch

    def forward(self, x_vis=None, x_ir=None):
        maps = []
        if x_vis is not None:
            maps.append(self.stem_vis(x_vis))
        if x_ir is not None:
            maps.append(self.stem_ir(x_ir))
        if not maps:
            raise ValueError("TwoStreamNet.forward: give x_vis, x_ir or both")
        x = self.shared(torch.cat(maps))          # [B, D, H/16, W/16] with last stride 1
        f = self.bnneck(gem(x))                   # [B, D]
        return f if self.training else F.normalize(f, dim=1)

    def modality_fn(self):
        """(images, modality) -> features, the interface evaluate.extract_features expects."""
        def fn(x, modality):
            return self(x_vis=x) if modality == 0 else self(x_ir=x)
        return fn


# ---------------------------------------------------------------------------------------------------
# Checkpoints: one format for both methods; complete and atomic.

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


def load_checkpoint(path, method=None, dataset=None, trial=None):
    """Read a checkpoint and check it is ours and matches the method / dataset / trial asked for."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vireid checkpoint (expected a file written by train.py)")
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
    model = TwoStreamNet(arch=args["arch"], pretrained="none")
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    meta = {k: args.get(k) for k in ("height", "width", "dataset", "method", "trial", "data_root", "arch")}
    meta["epoch"] = ckpt["epoch"]
    return model.modality_fn(), meta
