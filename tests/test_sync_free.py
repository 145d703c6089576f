"""No wait for the device in train.py's training step but one read-back of the losses per read-out.

Counted on the CPU by bench/bench_syncs.py's counter: the project's calls of Tensor.tolist / numpy / __array__ /
cpu and every operator whose result a GPU must read back (item, bool, nonzero, unique, repeat_interleave without
output_size, boolean indexing, ...) made from the project's code. The step's device half of the input pipeline is
checked apart (tests/test_fake_device.py), so each epoch's batches are drawn before its step is counted.
"""
import math
import os
import sys

import numpy as np
import pytest
import torch

import memory
import train
from demo.synthetic import render_sysu
from plumbing import logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import bench_syncs  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("synthetic"))
    render_sysu(path, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    return path


@pytest.mark.parametrize("method", ["mult", "mbmil"])
def test_one_read_back_per_read_out_and_none_in_between(root, tmp_path, monkeypatch, method):
    log = []
    for name in ("train_mult", "train_mbmil"):
        monkeypatch.setattr(train, name, getattr(train, name))          # restored afterwards
    bench_syncs.counted_steps(train, REPO, log)
    monkeypatch.setattr(logs, "READ_EVERY", 2)
    train.main(["--method", method, "--data-root", root, "--out", str(tmp_path / "run"), "--iters", "5",
                *bench_syncs.TINY])
    assert [(m, stage, iters) for m, stage, iters, _ in log] == [(method, 1, 5), (method, 2, 5)]
    for _, stage, iters, events in log:
        # read-outs after iterations 2, 4 and 5: one .tolist() of the stacked losses each, nothing else
        assert len(events) == math.ceil(iters / 2), (stage, events)
        assert all(what == "tolist" and site.startswith(os.path.join("plumbing", "distributed.py"))
                   for what, site in events), events


def test_the_counter_sees_what_would_wait(tmp_path):
    """The counter is not blind: device-side labels make the bank updates and MBMIL's positives check read back,
    host labels do not; an .item() in the project's code counts, the optimizer's own step counter does not."""
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(12, 8, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    bank = memory.ClusterMemory(torch.randn(4, 8, generator=gen))
    with bench_syncs.counting(REPO) as counter:
        bank.update(feats, labels.numpy(), check=False)
    assert counter.events == []
    with bench_syncs.counting(REPO) as counter:
        bank.update(feats, labels)
    assert {what for what, _ in counter.events} >= {"cpu", "_local_scalar_dense"}    # the labels, the row check
    proto = torch.tensor([0, 0, 1, 2, 3])
    with bench_syncs.counting(REPO) as counter:
        memory.multi_positive_loss(torch.randn(3, 5), np.array([0, 1, 3]), proto, check=False)
    assert counter.events == []
    with bench_syncs.counting(REPO) as counter:
        memory.multi_positive_loss(torch.randn(3, 5), np.array([0, 1, 3]), proto)
    assert [what for what, _ in counter.events] == ["cpu", "numpy"]          # check_positives reads proto_labels
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters())
    with bench_syncs.counting(REPO) as counter:
        net(torch.ones(1, 2)).sum().backward()
        opt.step()                                  # Adam reads its step counter, a CPU tensor on every device
        train.distributed.mean_over_ranks(torch.ones(2), train.distributed.World())
    assert [what for what, _ in counter.events] == ["tolist"]
