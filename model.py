"""Two-stream ResNet for visible-infrared re-ID, the network both methods train.

MULT (He et al., IJCV 2024), docs/mult.md §2; MBMIL (Wang et al., AAAI 2026) uses the same AGW-style network.
- Modality-specific stems (conv1 -> bn1 -> ReLU -> maxpool), one per modality, each from its own ResNet.
- Shared layer1..layer4 from a third ResNet, last stage with stride 1 (288x144 -> 18x9 map).
- GeM pooling with a fixed p = 3: (mean over positions of x^3 + 1e-12)^(1/3).
- BN-neck: BatchNorm1d(D) with the bias frozen at zero and the weight drawn from N(1, 0.01).
  Training returns the BN-neck feature f; eval returns f / ||f||.

    net = TwoStreamNet("resnet50", "resnet50-0676ba61.pth")   # a torchvision ImageNet state dict, or None
    f = net(x_vis, x_ir)                                       # [B_v + B_r, D], visible rows first

Paper vs official code: the official network also runs a gradient-reversal discriminator whose output
never reaches a loss (and crashes on NumPy >= 1.24); it is dropped here, as are the unused learnable GeM
parameter and the dead layer1..4 of the two stem networks (they never receive a gradient).
Imports torch, torchvision and the standard library only. Finding or downloading the ImageNet weights, and
checkpoints, are plumbing/checkpoints.py's.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCHS = ("resnet50", "resnet18")


class TwoStreamNet(nn.Module):
    """Visible stem + infrared stem -> shared layer1..4 -> GeM -> BN-neck (docs/mult.md §2).

    forward(x_vis [B_v, 3, H, W] or None, x_ir [B_r, 3, H, W] or None) -> [B_v + B_r, D], visible rows
    first. Both modalities go through the shared layers in one batch, so BN statistics mix them.
    """

    def __init__(self, arch="resnet50", pretrained=None, last_stride=1):
        """pretrained: a torchvision ResNet state dict file loaded into both stems and the shared layers (the
        papers start from ImageNet's), or None / "none" for random weights."""
        super().__init__()
        *stem_nets, shared = (_resnet(arch) for _ in range(3))   # one ResNet per stem, a third for the layers
        if pretrained not in (None, "none", ""):
            state = backbone_state(shared, pretrained)           # the file read once, each its own copy of it
            for net in (*stem_nets, shared):
                net.load_state_dict(state, strict=False)
        self.stem_vis, self.stem_ir = (nn.Sequential(n.conv1, n.bn1, n.relu, n.maxpool) for n in stem_nets)
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
        """(images, modality) -> features, the interface features.extract_features expects."""
        def fn(x, modality):
            return self(x_vis=x) if modality == 0 else self(x_ir=x)
        return fn


def gem(x, p=3.0, eps=1e-12):
    """Generalised-mean pooling with fixed p: [B, C, H, W] -> [B, C]."""
    return (x.pow(p).mean(dim=(2, 3)) + eps).pow(1.0 / p)


def load_backbone_weights(net, path):
    """Load a torchvision-style ResNet state dict from `path` into `net` (fc ignored); clear errors."""
    net.load_state_dict(backbone_state(net, path), strict=False)


def backbone_state(net, path):
    """The torchvision-style ResNet state dict in `path`, without fc, checked to fit `net` (one-line errors)."""
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
    current = net.state_dict()
    wrong = [k for k in sorted(expected)
             if not isinstance(state[k], torch.Tensor) or state[k].shape != current[k].shape]
    if wrong:                 # one line, not load_state_dict's line per tensor (a resnet50 file in a resnet18: 23)
        k = wrong[0]
        have = list(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        raise ValueError(f"--pretrained: {path} does not fit this backbone: {len(wrong)} tensors of other shapes, "
                         f"e.g. {k}: {have} in the file, {list(current[k].shape)} here (is it a weight file of the "
                         f"same --arch?)")
    return state


def _resnet(arch):
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    return getattr(torchvision.models, arch)(weights=None)


def _set_last_stride_one(layer4):
    """Make the first block of layer4 keep the resolution (stride 1 in its conv and its shortcut)."""
    block = layer4[0]
    for conv in (getattr(block, "conv2", None), getattr(block, "conv1", None)):
        if conv is not None and conv.stride != (1, 1):
            conv.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)
