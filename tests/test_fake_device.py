"""Device mixing and waits for the device, caught without a GPU: the step's tensor code on "cuda" FakeTensors.

PyTorch's FakeTensorMode (torch._subclasses.fake_tensor) makes tensors that carry a device, shape and dtype but no
data: on a machine without CUDA it accepts device="cuda", raises FakeTensorDeviceMismatchError where a CPU tensor
meets a "cuda" one in an operator (a zero-dimensional CPU tensor excepted, as on a GPU), and raises
DataDependentOutputException / DynamicOutputShapeException where code reads a value back (item, bool, tolist,
nonzero, unique, ...), which on a GPU would wait for the device. Forward passes run under it; backward does not.
What runs here on "cuda": the network's forward (train and eval mode, channels_last and bf16 autocast too) and
train.forward_batch; MULT's losses and bank updates, MBMIL's losses and updates, with the host labels train.py
gives them; the device half of the cached input (CachedTrainBatches.augment of a plan made on the host) for
MULT's two stages and MBMIL's pipelines; the extraction's per-batch tensor code (features.batch_features with the
cache's uint8 batches). A recording mode beside it checks that every copy from the host to "cuda" is
non-blocking and that ToTensor's / 255 divides by a "cuda" tensor (a true division on CUDA). Not covered: the
backward pass, the optimizer, collectives, and what the host does (the plan, the clustering).
"""
import argparse
import contextlib
import math

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import features
import memory
import train
from data import transforms as T
from data.common import IR, VIS, ImageList
from data.fast import batched as B
from data.fast.cache import build_cache
from data.fast.loader import CachedImageDataset, CachedTrainBatches
from model import TwoStreamNet

H, W = 32, 16


class Record(TorchDispatchMode):
    """Every operator call, in order: (name, args, kwargs)."""

    def __init__(self):
        super().__init__()
        self.calls, self.on = [], True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on:
            self.calls.append((func.overloadpacket.__name__, args, kwargs))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self):
        """Not recording: the setup of a test (weights, banks), not the step."""
        self.on = False
        try:
            yield
        finally:
            self.on = True

    def blocking_uploads(self):
        """Copies from the CPU to "cuda" that wait (non_blocking False): the operators and their sources."""
        out = []
        for name, args, kwargs in self.calls:
            if name == "_to_copy" and torch.device(kwargs.get("device") or args[0].device).type == "cuda":
                src, blocking = args[0], not kwargs.get("non_blocking", False)
            elif name == "copy_" and args[0].device.type == "cuda":
                src, blocking = args[1], not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            else:
                continue
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and src.dim() > 0 and blocking:
                out.append((name, tuple(src.shape)))
        return out


def fake_cuda():
    """FakeTensorMode in which real (CPU) tensors met by an operator become fake CPU tensors."""
    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """RAM caches of 12 visible and 12 infrared JPEGs, some of them grey."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lists = []
    for modality in (VIS, IR):
        paths = []
        for i in range(12):
            pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            if modality == IR or i % 4 == 0:
                pixels[:] = pixels[..., :1]                           # three equal channels
            paths.append(str(root / f"{modality}_{i}.jpg"))
            Image.fromarray(pixels).save(paths[-1], quality=95)
        lists.append(ImageList(paths, np.arange(12) % 4, np.full(12, 1 + 2 * modality), modality))
    return lists, {way: [build_cache(images, H, W, way, progress=False) for images in lists]
                   for way in ("bilinear", "bicubic")}


@contextlib.contextmanager
def cuda_autocast(monkeypatch):
    """torch.autocast("cuda") as on a GPU with bf16 (without CUDA it turns itself off with a warning)."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        yield


def test_network_forward_and_forward_batch_on_cuda(monkeypatch):
    torch.manual_seed(0)
    model = TwoStreamNet("resnet18")
    args = argparse.Namespace(device="cuda", channels_last=False, amp="off")
    batch = {k: torch.randn(2, 3, H, W) for k in ("v0", "v1", "r")}          # from the loader, on the host
    with fake_cuda(), Record() as rec:
        with rec.paused():
            net = model.to("cuda").train()                          # setup: the weights' copies may wait
        f_v0, f_v1, f_r = train.forward_batch(net, batch, args)
        assert f_v0.device.type == "cuda" and f_r.shape == (2, 512) and f_v0.dtype == torch.float32
        assert train.forward_batch(net, batch, argparse.Namespace(device="cuda", channels_last=True, amp="off"))[
            0].shape == (2, 512)
        on_cuda = {k: v.to("cuda", non_blocking=True) for k, v in batch.items()}
        with cuda_autocast(monkeypatch):      # (copies from the host would ask the missing driver about pinning)
            f = train.forward_batch(net, on_cuda, argparse.Namespace(device="cuda", channels_last=False, amp="bf16"))
        assert f[0].dtype == torch.float32 and f[0].shape == (2, 512)
        net.eval()
        g = net(x_ir=torch.randn(3, 3, H, W, device="cuda"))
        assert g.device.type == "cuda" and g.shape == (3, 512)
        with pytest.raises(RuntimeError, match="device"):          # the check is live: a CPU batch is caught
            net(x_vis=torch.randn(2, 3, H, W))
        with pytest.raises(FakeTensorDeviceMismatchError):
            torch.randn(2, device="cuda") + torch.randn(2)
    assert rec.blocking_uploads() == []


def test_memory_losses_and_updates_on_cuda_with_host_labels():
    gen = torch.Generator().manual_seed(0)
    centers = {k: torch.randn(5, 16, generator=gen) for k in ("v", "r")}
    y_v, y_r = np.array([0, 1, 1, 4]), np.array([2, 3, 3, 0])                 # host labels, as train.py's
    soft = {k: torch.softmax(torch.randn(4, 5, generator=gen), 1) for k in ("vis", "ir", "vis_to_ir", "ir_to_vis")}
    # Setup, once an epoch: the memories are checked (a read) when made, here on the CPU, then moved.
    banks = {k: memory.ClusterMemory(centers["v" if k in ("vis", "ir_to_vis", "unified_vis") else "r"])
             for k in ("vis", "ir", "ir_to_vis", "vis_to_ir", "unified_vis", "unified_ir")}
    hybrid = memory.HybridMemory(centers["v"])
    with fake_cuda(), Record() as rec:
        feats = [torch.randn(4, 16, device="cuda") for _ in range(3)]
        with rec.paused():
            for bank in banks.values():
                bank.bank = bank.bank.to("cuda")
            hybrid.centroid, hybrid.hard = hybrid.centroid.to("cuda"), hybrid.hard.to("cuda")
            soft = {k: v.to("cuda") for k, v in soft.items()}
            protos = torch.tensor([0, 0, 1, 2, 2]).to("cuda")
        loss, updates = memory.stage_one_loss(banks, *feats, y_v, y_r)
        memory.apply_updates(banks, updates, check=False)
        hard = {"vis": y_v, "ir": y_r, "vis_to_ir": y_v, "ir_to_vis": y_r}
        for epoch in (40, 41):
            loss, parts, updates = memory.stage_two_loss(banks, *feats, hard, soft, epoch)
            memory.apply_updates(banks, updates, check=False)
        assert loss.device.type == "cuda" and parts["oclr"].device.type == "cuda"
        assert all(b.bank.device.type == "cuda" for b in banks.values())
        intra = memory.intra_loss(hybrid, feats[0], y_v)
        hybrid.update(feats[0], np.r_[y_v[:3], -1], check=False)
        glob = memory.global_loss(hybrid, feats[1], np.array([0, 1, 2, 2]), protos, hard_neg_k=3, check=False)
        assert intra.device.type == glob.device.type == hybrid.hard.device.type == "cuda"
        with rec.paused(), pytest.raises(Exception):   # labels on the device are read back: not on a fake
            banks["vis"].update(feats[0], torch.tensor(y_v).to("cuda"))
    assert rec.blocking_uploads() == []


@pytest.mark.parametrize("method,stage", [("mult", 1), ("mult", 2), ("mbmil", 1)])
def test_cached_augmentation_device_half_on_cuda(caches, monkeypatch, method, stage):
    (vis, ir), by_way = caches
    vis_cache, ir_cache = by_way["bicubic" if method == "mbmil" else "bilinear"]
    tfm = T.train_transforms(H, W, stage, method=method, pad=T.crop_pad(H))
    rows = np.random.default_rng(1).integers(0, 12, (2, 6, 2))                 # [batches, B, 2]
    plan = CachedTrainBatches(vis_cache, ir_cache, tfm, rows, seed=3).plan(1)  # the host half, on the CPU
    monkeypatch.setattr(B, "_HSV_TABLES", dict(B._HSV_TABLES))                # the fake "cuda" tables go after
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)              # a FakeTensor's "cuda" is cuda:0
    with fake_cuda():
        data = CachedTrainBatches(vis_cache, ir_cache, tfm, rows, seed=3, device="cuda")   # its constants, once
        with Record() as rec:
            batch = data.augment(plan)
        for k in ("v0", "v1", "r"):
            assert batch[k].device.type == "cuda" and batch[k].shape == (6, 3, H, W) and batch[k].dtype == torch.float32
    assert rec.blocking_uploads() == []
    # Every division by a "cuda" tensor (true division), or by a power of two (PIL's grey >> 16: exact either way).
    divisions = [args[1] for name, args, _ in rec.calls if name in ("div", "div_")]
    assert any(isinstance(d, torch.Tensor) and d.dim() == 0 for d in divisions)          # ToTensor's / 255
    assert all(d.device.type == "cuda" if isinstance(d, torch.Tensor) else math.log2(d).is_integer()
               for d in divisions), divisions


def test_byte_division_is_a_true_division_on_cuda():
    """ToTensor's / 255 on the device: a "cuda" tensor divisor (CUDA multiplies by the reciprocal of a number or
    of a CPU scalar, 1 ulp off PIL's quotient for 126 of the 256 byte values); the recorder tells them apart."""
    x = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    with fake_cuda(), Record() as rec:
        y = x.to("cuda")
        B.normalize_(y, torch.arange(3).expand(1, 3), torch.zeros(3).to("cuda"), torch.ones(3).to("cuda"),
                     from_bytes=True)
        y.div_(255)                                               # what the code did before, for contrast
    divs = [args[1] for name, args, _ in rec.calls if name == "div_"]
    assert len(divs) == 3
    assert all(isinstance(d, torch.Tensor) and d.device.type == "cuda" for d in divs[:2])   # / 255, / std
    assert not (isinstance(divs[2], torch.Tensor) and divs[2].device.type == "cuda")        # a number
    assert torch.equal(B.unit_bytes_(torch.arange(256, dtype=torch.float32)), torch.arange(256) / 255.0)


def test_extraction_tensor_code_on_cuda(caches, monkeypatch):
    (vis, _), by_way = caches
    vis_cache = by_way["bilinear"][0]
    data = CachedImageDataset(vis, vis_cache, T.test_transform(H, W), 5, as_bytes=True)
    x, index = data[1]                                                        # host: uint8 [5, 3, H, W]
    assert x.dtype == torch.uint8 and torch.equal(index, torch.arange(5, 10))
    torch.manual_seed(0)
    model = TwoStreamNet("resnet18").eval()
    with fake_cuda(), Record() as rec:
        with rec.paused():
            net = model.to("cuda")
        f = features.batch_features(net.modality_fn(), x, VIS, "cuda", flip=True, prepare=data.normalize)
        assert f.device.type == "cuda" and f.shape == (5, 512) and f.dtype == torch.float32
        images = data.normalize(x.to("cuda", non_blocking=True))
        with cuda_autocast(monkeypatch):
            assert features.batch_features(net.modality_fn(), images, VIS, "cuda", amp="bf16").dtype == torch.float32
    assert rec.blocking_uploads() == []


def test_global_batch_norm_is_pytorchs_fused_sync_batch_norm_on_cuda():
    """Under torchrun a CUDA model's BatchNorms become nn.SyncBatchNorm (fused kernels, CUDA only), a CPU model's
    GlobalBatchNorm; both keep every parameter, buffer and state-dict key, and the frozen BN-neck bias."""
    from plumbing import distributed
    torch.manual_seed(0)
    cpu = distributed.global_batch_norm(TwoStreamNet("resnet18"))
    kinds = {type(m) for m in cpu.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {distributed.GlobalBatchNorm}
    reference = TwoStreamNet("resnet18")
    with fake_cuda():
        model = reference.to("cuda")
        keys = list(model.state_dict())
        distributed.global_batch_norm(model)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert {type(m) for m in bns} == {torch.nn.SyncBatchNorm} and all(m.weight.is_cuda for m in bns)
        assert list(model.state_dict()) == keys and not model.bnneck.bias.requires_grad
        assert model.eval()(x_vis=torch.randn(2, 3, H, W, device="cuda")).shape == (2, 512)   # eval: plain BN
