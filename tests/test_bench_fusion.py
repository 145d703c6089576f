"""Tests for bench/bench_fusion.py: its eager expressions are the pipeline's steps bit for bit, so that what it
times compiled is the same computation. The hue against data.fast.batched's PIL tables (themselves checked against
PIL in tests/test_batched.py) on random colours and on every colour with two equal channels (the maximum's ties
decide PIL's branch) and every grey; the tail against normalize_ and erase_."""
import os
import sys

import pytest
import torch

from data.fast import batched as B

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_fusion as bf  # noqa: E402


def _colours():
    g = torch.Generator().manual_seed(0)
    random = torch.randint(0, 256, (3, 1 << 18), generator=g)
    a, b = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    ties = [torch.stack(t) for t in ((a, a, b), (a, b, a), (b, a, a))]      # r = g, r = b, g = b
    x = torch.cat([random] + ties, dim=1).float()
    return x.view(3, 1024, -1).unsqueeze(0)


@pytest.mark.parametrize("f", [0.0, 0.1, -0.25, 0.5, -0.5])
def test_pil_hue_equals_the_pipelines_hue(f):
    x = _colours()
    f = torch.tensor([f], dtype=torch.float64)
    shift = B.hue_shift(f).view(1, 1, 1)
    want = x.clone()
    B._hue(want, f)
    assert torch.equal(bf.pil_hue(x, shift), want)


def test_pil_hue_differs_from_the_pipelines_hue_with_another_shift():
    x = _colours()
    f = torch.tensor([0.1], dtype=torch.float64)
    want = x.clone()
    B._hue(want, f)
    other = torch.full((1, 1, 1), int(255 * 0.1) + 1, dtype=torch.int32)
    assert not torch.equal(bf.pil_hue(x, other), want)


def test_fused_tail_equals_normalize_and_erase():
    g = torch.Generator().manual_seed(1)
    crop = torch.randint(0, 256, (6, 3, 32, 16), generator=g, dtype=torch.uint8)
    rect = torch.tensor([[0, 0, 0, 0], [3, 2, 10, 5], [0, 0, 32, 16], [20, 10, 12, 6], [5, 1, 1, 1], [0, 0, 0, 0]])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    fill = torch.tensor([0.1, -0.2, 0.3])
    chan = torch.arange(3).expand(6, 3)
    want = B.erase_(B.normalize_(crop.float(), chan, mean, std, from_bytes=True), chan, rect, fill)
    got = bf.fused_tail(crop, mean, std, fill, rect)
    assert torch.equal(got, want)
    assert (got[2] == fill[:, None, None]).all() and not (got[0] == fill[:, None, None]).any()
