"""An ImageNet stand-in for the synthetic CPU demo: supervised pretraining of a plain ResNet on a disjoint
synthetic population, one class per (identity, modality).

Both papers start from ImageNet ResNet-50 (docs/mult.md §2; docs/mbmil.md §A.4), and unsupervised re-ID from
random weights does not bootstrap in a few CPU minutes: a random network's features are nearly collinear (mean
cosine 0.99 on the synthetic set) and its pseudo-labels stay near chance. ImageNet weights cannot be downloaded
here, so the synthetic preset starts from weights of the same kind: a classifier trained with labels on images
of *another* population (rendered with another seed, so disjoint identities). Its classes are (identity,
modality) pairs: it learns to tell people apart within each modality, as ImageNet features do on real visible
and near-infrared images, but it is never told which infrared person is which visible one, so the
cross-modality association still has to come from the unsupervised method. Visible images go through the
training transforms' two visible views (full colour, or one channel replicated) with equal odds, infrared
images through the infrared one. The weights are a torchvision ResNet state dict, loaded into both stems and
the shared layers exactly as `--pretrained PATH` loads ImageNet's.

    python -m demo.pretrain --out datasets/synthetic-pretrain   # train.py --dataset synthetic does this itself
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.common import read_image
from demo.synthetic import FORMAT_VERSION, ensure_synthetic
from data.sysu import IR_CAMS, VIS_CAMS
from data.transforms import crop_pad, train_transforms

SETTINGS = dict(modalities="both", arch="resnet18", height=64, width=32, num_ids=100, seed=1000, epochs=10,
                batch_size=128, lr=1e-3)


class PretrainImages(Dataset):
    """(augmented image, class) for the images of a SYSU-layout folder; a class is an (identity, modality).

    modalities: "both", or "visible" (an ablation: the infrared stem then starts from weights that never saw an
    infrared image)
    """

    def __init__(self, root, height, width, seed, modalities="both"):
        if modalities not in ("both", "visible"):
            raise ValueError(f"modalities must be 'both' or 'visible', got {modalities!r}")
        cams = VIS_CAMS + (IR_CAMS if modalities == "both" else ())
        rows = sorted((p, cam in IR_CAMS) for cam in cams
                      for p in glob.glob(os.path.join(root, f"cam{cam}", "*", "*.jpg")))
        if not rows:
            raise FileNotFoundError(f"no image under {root}/cam{{{','.join(map(str, cams))}}}/")
        self.paths = [p for p, _ in rows]
        self.ir = np.array([ir for _, ir in rows])
        classes = [f"{os.path.basename(os.path.dirname(p))}/{int(ir)}" for p, ir in rows]   # "<identity>/<is ir>"
        _, self.labels = np.unique(classes, return_inverse=True)
        tf = train_transforms(height, width, 2, pad=crop_pad(height))
        self.transform, self.transform_v1, self.transform_r = tf["v0"], tf["v1"], tf["r"]
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        tf = self.transform_r if self.ir[i] else (self.transform_v1 if rng.random() < 0.5 else self.transform)
        return tf(read_image(self.paths[i]), rng), int(self.labels[i])


def pretrain(out, modalities="both", arch="resnet18", height=64, width=32, num_ids=100, seed=1000, epochs=10,
             batch_size=128, lr=1e-3, device="cpu"):
    """Render the disjoint population under out/data, train, and write out/<arch>.pth; returns its path."""
    settings = dict(modalities=modalities, arch=arch, height=height, width=width, num_ids=num_ids, seed=seed,
                    epochs=epochs, batch_size=batch_size, lr=lr, data_version=FORMAT_VERSION)
    os.makedirs(out, exist_ok=True)
    data_root = os.path.join(out, "data")
    ensure_synthetic(data_root, num_ids=num_ids, seed=seed, progress=True)
    data = PretrainImages(data_root, height, width, seed, modalities)
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=int(data.labels.max()) + 1).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        data.epoch = epoch
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
        correct = total = 0
        net.train()
        for x, y in tqdm(loader, desc=f"pretrain epoch {epoch}", leave=False, file=sys.stderr):
            logits = net(x.to(device))
            loss = F.cross_entropy(logits, y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (logits.argmax(1).cpu() == y).sum().item()
            total += len(y)
        print(f"pretrain epoch {epoch}: loss {loss.item():.3f}, train accuracy {100 * correct / total:.1f}%")
    path = os.path.join(out, f"{arch}.pth")
    state = {k: v.cpu() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(out, "pretrain.json"), "w") as f:
        json.dump(dict(settings, seconds=round(time.time() - start, 1)), f, indent=1)
    return path


def ensure_pretrained(out, device="cpu", **kwargs):
    """Path of the weights for these settings, pretraining first if they are missing or differ."""
    settings = dict(SETTINGS, **kwargs)
    expected = dict(settings, data_version=FORMAT_VERSION)     # weights of an older data format are stale
    path = os.path.join(out, f"{settings['arch']}.pth")
    try:
        with open(os.path.join(out, "pretrain.json")) as f:
            done = json.load(f)
        if os.path.isfile(path) and all(done.get(k) == v for k, v in expected.items()):
            return path
    except (OSError, ValueError):
        pass
    return pretrain(out, device=device, **settings)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=str, default="datasets/synthetic-pretrain", help="output folder")
    p.add_argument("--arch", choices=("resnet18", "resnet50"), default=SETTINGS["arch"])
    p.add_argument("--height", type=int, default=SETTINGS["height"])
    p.add_argument("--width", type=int, default=SETTINGS["width"])
    p.add_argument("--epochs", type=int, default=SETTINGS["epochs"])
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--modalities", choices=("visible", "both"), default=SETTINGS["modalities"])
    args = p.parse_args(argv)
    print(ensure_pretrained(args.out, device=args.device, arch=args.arch, height=args.height, width=args.width,
                            epochs=args.epochs, modalities=args.modalities))


if __name__ == "__main__":
    main()
