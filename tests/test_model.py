import os
import socket
import urllib.error

import pytest
import torch
import torchvision

from model import TwoStreamNet, gem
from plumbing import checkpoints
from plumbing.checkpoints import imagenet_weights_path, load_checkpoint, model_from_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return TwoStreamNet("resnet18")


def test_shapes_and_last_stride(net):
    net.train()
    x_vis, x_ir = torch.randn(3, 3, 64, 32), torch.randn(2, 3, 64, 32)
    assert net(x_vis, x_ir).shape == (5, 512)
    # stride 1 in layer4: a 64x32 input leaves a 4x2 map (1/16), not 2x1 (1/32)
    assert net.shared(net.stem_vis(x_vis)).shape[-2:] == (4, 2)


def test_modality_routing(net):
    """Visible rows depend only on the visible stem, infrared rows only on the infrared stem."""
    net.eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        vis_before, ir_before = net(x_vis=x), net(x_ir=x)
        saved = net.stem_ir[0].weight.clone()
        net.stem_ir[0].weight.add_(0.5)
        vis_after, ir_after = net(x_vis=x), net(x_ir=x)
        net.stem_ir[0].weight.copy_(saved)
    assert torch.equal(vis_before, vis_after)
    assert not torch.allclose(ir_before, ir_after)


def test_eval_features_unit_norm_and_bnneck(net):
    net.eval()
    with torch.no_grad():
        f = net(torch.randn(4, 3, 64, 32), torch.randn(4, 3, 64, 32))
    assert torch.allclose(f.norm(dim=1), torch.ones(8), atol=1e-5)
    assert not net.bnneck.bias.requires_grad and torch.count_nonzero(net.bnneck.bias) == 0


def test_gem_is_cubic_mean():
    x = torch.rand(2, 3, 4, 5)
    assert torch.allclose(gem(x), (x.pow(3).mean(dim=(2, 3)) + 1e-12).pow(1 / 3))


def test_weights_from_local_file(tmp_path, monkeypatch):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    reads = []
    monkeypatch.setattr(torch, "load", lambda *a, _load=torch.load, **k: reads.append(a[0]) or _load(*a, **k))
    net = TwoStreamNet("resnet18", pretrained=str(path))
    assert reads == [str(path)]                       # one read for the two stems and the shared layers
    for got in (net.stem_vis[0].weight, net.stem_ir[0].weight):
        assert torch.equal(got, ref.conv1.weight)
    assert net.stem_vis[0].weight.data_ptr() != net.stem_ir[0].weight.data_ptr()     # each its own copy
    assert torch.equal(net.shared[3][1].conv2.weight, ref.layer4[1].conv2.weight)


def test_random_weights_are_drawn_per_resnet():
    """Without a weight file each stem keeps its own ResNet's draw, in the order stems, then shared layers."""
    torch.manual_seed(3)
    draws = [torchvision.models.resnet18(weights=None) for _ in range(3)]
    torch.manual_seed(3)
    net = TwoStreamNet("resnet18")
    for got, ref in zip((net.stem_vis[0], net.stem_ir[0], net.shared[0][0].conv1), (d.conv1 if i < 2 else
                        d.layer1[0].conv1 for i, d in enumerate(draws))):
        assert torch.equal(got.weight, ref.weight)
    assert not torch.equal(net.stem_vis[0].weight, net.stem_ir[0].weight)


def test_weight_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="weight file not found"):
        TwoStreamNet("resnet18", pretrained=str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        TwoStreamNet("resnet18", pretrained=str(tmp_path / "bad.pth"))


class _Connection:
    def close(self):
        pass


def _no_download(*args, **kwargs):
    raise AssertionError("no download expected")


def test_imagenet_offline_gives_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    folder = str(tmp_path / "cache" / "hub" / "checkpoints")
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    # the host answers but the transfer fails
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: _Connection())

    def fails(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fails)
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth") as err:
        TwoStreamNet("resnet18", imagenet_weights_path("resnet18"))
    for text in (folder, url, "no route to host", "--pretrained none"):
        assert text in str(err.value)
    # no network at all: the reachability check fails within its timeout, the download never starts
    timeouts = []

    def unreachable(address, timeout=None):
        timeouts.append(timeout)
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    with pytest.raises(FileNotFoundError, match="Name or service not known") as err:
        TwoStreamNet("resnet18", imagenet_weights_path("resnet18"))
    assert folder in str(err.value) and url in str(err.value)
    assert timeouts and all(t is not None and t <= 10 for t in timeouts)


def test_imagenet_cached_file_is_used_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(2)
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), folder / "resnet18-f37072fd.pth")
    monkeypatch.setattr(socket, "create_connection", _no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    net = TwoStreamNet("resnet18", imagenet_weights_path("resnet18"))
    assert torch.equal(net.stem_ir[0].weight, ref.conv1.weight)
    assert torch.equal(net.shared[3][1].conv2.weight, ref.layer4[1].conv2.weight)


def test_imagenet_download_goes_into_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    calls = []

    def download(url, model_dir=None, **kwargs):       # stands in for torchvision's download
        calls.append((url, model_dir, kwargs))
        os.makedirs(model_dir, exist_ok=True)
        torch.save(ref.state_dict(), os.path.join(model_dir, os.path.basename(url)))
        return ref.state_dict()

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: _Connection())
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    net = TwoStreamNet("resnet18", imagenet_weights_path("resnet18"))
    folder = str(tmp_path / "home" / "hub" / "checkpoints")
    assert len(calls) == 1                                   # downloaded once, for all three copies
    assert calls[0][:2] == (checkpoints.IMAGENET_V1_URL.format("resnet18-f37072fd.pth"), folder)
    assert calls[0][2]["check_hash"] and calls[0][2]["progress"]
    assert torch.equal(net.stem_vis[0].weight, ref.conv1.weight)


def test_checkpoint_roundtrip_and_method_check(tmp_path, net):
    args = {"arch": "resnet18", "method": "mult", "dataset": "synthetic", "trial": None, "height": 64, "width": 32}
    path = str(tmp_path / "last.pth")
    save_checkpoint({"model": net.state_dict(), "epoch": 3, "args": args}, path)
    with pytest.raises(ValueError, match="--method mult"):
        load_checkpoint(path, method="mbmil")
    with pytest.raises(ValueError, match="--dataset synthetic"):
        load_checkpoint(path, dataset="sysu")
    fn, meta = model_from_checkpoint(path)
    assert meta["epoch"] == 3 and meta["height"] == 64
    x = torch.randn(2, 3, 64, 32)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(fn(x, 1), net(x_ir=x))
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a vireid checkpoint"):
        load_checkpoint(str(tmp_path / "other.pth"))
