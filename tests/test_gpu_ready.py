"""What a GPU run needs that a CPU can check: the CUDA device made current for any index, the HSV tables once per
device, /dev/shm checked before the first epoch, --amp over extraction and evaluation, the TF32 choice stated and
cuDNN's autotuner where the shapes are fixed."""
import argparse

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import evaluate
import features
import train
from data.fast import batched as B
from plumbing import checks, device, distributed, runs


def test_a_cuda_device_with_an_index_becomes_current_without_torchrun(monkeypatch):
    calls = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    assert distributed.setup("cuda:1") == distributed.World(0, 1, "cuda:1")
    assert calls == [torch.device("cuda:1")]
    distributed.setup("cpu")
    distributed.setup("cuda")                     # no index: the current device already
    assert calls == [torch.device("cuda:1")]


def test_hsv_tables_are_one_copy_per_device_whatever_its_name(monkeypatch):
    """"cuda" and "cuda:0" (0 the current device) are one device: one copy of the 128 MB of tables, not two."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert B.resolved("cuda") == B.resolved("cuda:0") == torch.device("cuda", 0)
    assert B.resolved("cpu") == torch.device("cpu") and B.resolved("cuda:1") == torch.device("cuda", 1)
    tables = (torch.arange(4, dtype=torch.int32), torch.arange(4, dtype=torch.int32))   # stand-ins
    monkeypatch.setattr(B, "_HSV_TABLES", {"cpu": tables})
    with FakeTensorMode(allow_non_fake_inputs=True):                  # "cuda" tensors without a GPU
        a, b = B.hsv_tables("cuda"), B.hsv_tables(torch.device("cuda", 0))
    assert a is b and sorted(B._HSV_TABLES) == ["cpu", "cuda:0"]


def resolved(argv):
    return train.resolve_args(train.get_args_parser().parse_args(argv))


SYSU_SIZE = ["--height", "288", "--width", "144", "--clusters", "12", "--instances", "12", "--extract-batch", "128",
             "--device", "cpu"]


def test_shared_memory_is_checked_before_the_first_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checks, "shm_free_bytes", lambda: 64 * 2**20)         # Docker's default
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.cli(["--out", str(out), "--workers", "4", "--input", "pil", *SYSU_SIZE])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "/dev/shm" in err and "--shm-size" in err and "--workers 0" in err and "64 MiB free" in err
    assert not out.exists()                                                  # nothing written
    args = resolved(["--out", str(out), "--workers", "0", *SYSU_SIZE])        # no workers: nothing to pass
    assert checks.shared_memory_need(args) == 0
    monkeypatch.setattr(checks, "shm_free_bytes", lambda: None)               # no /dev/shm to check
    resolved(["--out", str(out), "--workers", "4", *SYSU_SIZE])


def test_shared_memory_need_by_hand(monkeypatch):
    monkeypatch.setattr(checks, "shm_free_bytes", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = resolved(["--workers", "4", "--input", "pil", *SYSU_SIZE])
    image = 3 * 288 * 144
    pil = 3 * 144 * image * 4                                 # three float32 views of 144 pairs: 215 MB a batch
    assert checks.shared_memory_need(args) == 9 * pil         # 4 workers x 2 in flight + 1 in use
    args.method = "mbmil"                                     # stage two: two loaders at once
    assert checks.shared_memory_need(args) == 9 * 2 * pil
    args.method, args.input, args.device = "mult", "cached", "cuda"
    assert checks.shared_memory_need(args) == 9 * 128 * image * 4     # uint8 crops: the extraction's floats lead
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")               # four ranks on the machine, a quarter of a batch each
    args.input = "pil"
    assert checks.shared_memory_need(args) == 4 * 9 * 128 * image * 4


def test_amp_covers_extraction_and_evaluation_and_features_leave_as_float32(monkeypatch):
    seen = []

    def model_fn(x, modality):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.nn.functional.conv2d(x, torch.ones(4, 3, 3, 3)).flatten(1)   # bf16 under autocast
    for amp, on in (("off", False), ("bf16", True)):
        f = features.batch_features(model_fn, torch.randn(2, 3, 4, 4), 0, "cpu", flip=True, amp=amp)
        assert f.dtype == torch.float32 and seen[-1] == on
    args = argparse.Namespace(device="cpu", amp="bf16", dataset="synthetic", data_root="x", trial=None, height=4,
                              width=4, extract_batch=2, workers=0, method="mult")
    got = {}
    monkeypatch.setattr(evaluate, "evaluate_dataset", lambda model_fn, *a, **k: got.update(k))

    class Net(torch.nn.Module):
        def modality_fn(self):
            return model_fn
    evaluate.evaluate_run(Net(), args, 1)
    assert got["amp"] == "bf16"                                   # the evaluation runs in --amp's precision
    parser = evaluate.get_args_parser()
    assert parser.parse_args(["--amp", "bf16"]).amp == "bf16" and parser.parse_args([]).amp == "off"


def test_tf32_choice_and_the_autotuner_of_fixed_shapes():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
        torch.backends.cudnn.benchmark = False
        device.configure("cpu", autotune=True)                    # nothing to choose on the CPU
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, True)
        assert not torch.backends.cudnn.benchmark
        device.configure("cuda", autotune=True)                   # convolutions TF32, matrix products IEEE float32
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, False)
        assert torch.backends.cudnn.benchmark                     # training: every batch the same shapes
        with device.fixed_algorithms("cuda"):
            assert not torch.backends.cudnn.benchmark             # extraction and evaluation: a shorter last batch
        assert torch.backends.cudnn.benchmark
        device.configure("cuda")                                  # evaluate.py: no autotuner
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved
    parser = argparse.ArgumentParser()
    runs.add_run_flags(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert "TF32" in helps["amp"] and "TF32" in helps["device"]


def test_host_labels_give_the_banks_todays_values():
    """The bank updates planned on the host from NumPy labels give the values of tensor labels, bit for bit."""
    import memory
    gen = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(40, 16, generator=gen), torch.randint(-1, 6, (40,), generator=gen)
    a, b = memory.ClusterMemory(torch.randn(6, 16, generator=gen)), memory.ClusterMemory(torch.ones(6, 16))
    b.bank = a.bank.clone()
    a.update(feats, labels)
    b.update(feats, labels.numpy(), check=False)
    assert torch.equal(a.bank, b.bank)
    h1, h2 = memory.HybridMemory(torch.randn(6, 16, generator=gen)), memory.HybridMemory(torch.ones(6, 16))
    h1.hard = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=1)
    h2.centroid, h2.hard = h1.centroid.clone(), h1.hard.clone()
    h1.update(feats, labels)
    h2.update(feats, np.asarray(labels), check=False)
    assert torch.equal(h1.centroid, h2.centroid) and torch.equal(h1.hard, h2.hard)
