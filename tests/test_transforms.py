"""data/transforms.py: pipelines of docs/mult.md §1.4 / docs/mbmil.md §A.4 and each random step."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import data.transforms as T

H, W = 32, 16


def image(seed=0, size=(20, 44)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def steps(pipeline):
    return [type(s).__name__ for s in pipeline.steps]


GEO = ["Resize", "Pad", "RandomCrop", "RandomHorizontalFlip"]
TABLE = {   # (method, stage) -> key -> step names after the geometric ones
    ("mult", 1): {"v0": ["ToTensor", "LinearTransform", "Normalize", "RandomErasing"],
                  "v1": ["ColorJitter", "ToTensor", "Normalize", "RandomErasing", "ChannelExchange"],
                  "r": ["ColorJitter", "ToTensor", "Normalize", "RandomErasing", "ChannelAdapGray"]},
    ("mult", 2): {"v0": ["ToTensor", "Normalize", "RandomErasing"],
                  "v1": ["ToTensor", "Normalize", "RandomErasing", "ChannelExchange"],
                  "r": ["ToTensor", "Normalize", "RandomErasing", "ChannelAdapGray"]},
    ("mbmil", 1): {"v0": ["ToTensor", "Normalize", "RandomErasing"],
                   "v1": ["ColorJitter", "ToTensor", "Normalize", "RandomErasing", "ChannelExchange"],
                   "r": ["ColorJitter", "ToTensor", "Normalize", "RandomErasing", "ChannelAdapGray"]},
    ("mbmil", 2): {"v0": ["ToTensor", "Normalize", "RandomErasing"],
                   "v1": ["ColorJitter", "ToTensor", "Normalize", "RandomErasing", "ChannelExchange"],
                   "r": ["ToTensor", "Normalize", "RandomErasing", "ChannelAdapGray"]},
}


@pytest.mark.parametrize("method,stage", list(TABLE))
def test_pipelines_follow_the_table(method, stage):
    pipes = T.train_transforms(H, W, stage, method)
    assert set(pipes) == {"v0", "v1", "r"}
    erase_p = 0.9 if (method, stage) == ("mult", 1) else 0.5
    for key, pipe in pipes.items():
        assert steps(pipe) == GEO + TABLE[method, stage][key]
        assert [s.p for s in pipe.steps if isinstance(s, T.RandomErasing)] == [erase_p]
        assert pipe.steps[0].interpolation == ("bilinear" if method == "mult" else "bicubic")
        for seed in range(3):
            out = pipe(image(seed), np.random.default_rng(seed))
            assert out.shape == (3, H, W) and out.dtype == torch.float32 and torch.isfinite(out).all()
            assert torch.equal(out, pipe(image(seed), np.random.default_rng(seed)))   # determinism
        assert not torch.equal(pipe(image(), np.random.default_rng(0)),
                               pipe(image(), np.random.default_rng(1)))


def test_bad_arguments():
    for args, text in (((0, W, 1), "height"), ((H, 1.5, 1), "width"), ((H, W, 3), "stage")):
        with pytest.raises(ValueError, match=text):
            T.train_transforms(*args)
    with pytest.raises(ValueError, match="method"):
        T.train_transforms(H, W, 1, method="agw")
    with pytest.raises(TypeError, match="PIL image"):
        T.test_transform(H, W)(torch.zeros(3, H, W))
    with pytest.raises(TypeError, match="needs rng"):
        T.train_transforms(H, W, 2)["v0"](image())
    with pytest.raises(ValueError, match="smaller than the crop"):
        T.RandomCrop(50, 10)(image(), np.random.default_rng(0))


def test_test_transform_matches_manual():
    img = image()
    out = T.test_transform(H, W)(img)
    want = TF.normalize(TF.to_tensor(img.resize((W, H), Image.BILINEAR)), T.IMAGENET_MEAN, T.IMAGENET_STD)
    assert out.shape == (3, H, W) and torch.allclose(out, want, atol=1e-6)


def test_pad_crop_flip():
    img = image(size=(W, H))
    pad, crop, flip = T.Pad(10), T.RandomCrop(H, W), T.RandomHorizontalFlip(0.5)
    padded = pad(img)
    assert padded.size == (W + 20, H + 20)
    assert np.asarray(padded)[:10].max() == 0 and np.asarray(padded)[:, -10:].max() == 0
    corners, flips = set(), 0
    for seed in range(300):
        twin = np.random.default_rng(seed)                        # replays the corner draw
        top, left = int(twin.integers(0, 21)), int(twin.integers(0, 21))
        rng = np.random.default_rng(seed)
        out = np.asarray(crop(padded, rng))
        assert np.array_equal(np.asarray(padded)[top:top + H, left:left + W], out)
        corners.update([top, left])
        flips += flip(img, rng) is not img
    assert corners == set(range(21))                              # 0..20, both ends inclusive
    assert 110 < flips < 190


def test_color_jitter():
    img = image()
    assert np.array_equal(np.asarray(T.ColorJitter(0, 0, 0, 0)(img, np.random.default_rng(0))), np.asarray(img))
    ratios = []
    grey = Image.new("RGB", (8, 8), (100, 100, 100))
    for seed in range(200):
        out = np.asarray(T.ColorJitter(0.5, 0, 0, 0)(grey, np.random.default_rng(seed)))
        ratios.append(out.mean() / 100)
    assert 0.49 <= min(ratios) < 0.6 and 1.4 < max(ratios) <= 1.51      # U[0.5, 1.5]
    outs = {np.asarray(T.ColorJitter()(img, np.random.default_rng(s))).tobytes() for s in range(5)}
    assert len(outs) == 5


def test_channel_exchange_always_single_channel():
    x = torch.rand(3, 6, 4)
    seen = []
    for seed in range(300):
        out = T.ChannelExchange(2)(x.clone(), np.random.default_rng(seed))
        assert out.shape == x.shape and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        seen.append(next(c for c in range(3) if torch.equal(out[0], x[c])))
    assert all(70 < seen.count(c) < 130 for c in range(3))      # uniform over 0..2
    grey = T._grey(x)
    hits = sum(torch.allclose(T.ChannelExchange(3)(x.clone(), np.random.default_rng(s))[0], grey)
               for s in range(200))
    assert 25 < hits < 80                                         # gray=3: grey with prob 1/4


def test_channel_adap_gray_statistics():
    x = torch.tensor([0.1, 0.5, 0.9])[:, None, None].repeat(1, 2, 2)
    grey = T._grey(x)
    counts = {"c0": 0, "c1": 0, "c2": 0, "grey": 0, "same": 0}
    n = 4000
    rng = np.random.default_rng(0)
    for _ in range(n):
        out = T.ChannelAdapGray(0.5)(x.clone(), rng)
        if torch.equal(out, x):
            counts["same"] += 1
        elif torch.allclose(out, grey.expand(3, 2, 2)):
            counts["grey"] += 1
        else:
            c = next(c for c in range(3) if torch.equal(out, x[c].expand(3, 2, 2)))
            counts[f"c{c}"] += 1
    freq = {k: v / n for k, v in counts.items()}
    for c in ("c0", "c1", "c2"):
        assert abs(freq[c] - 0.25) < 0.03
    assert abs(freq["grey"] - 0.125) < 0.025 and abs(freq["same"] - 0.125) < 0.025


def test_random_erasing_rectangle():
    fill = torch.tensor(T.ERASE_FILL)
    shapes = set()
    for seed in range(200):
        x = torch.rand(3, 30, 20) * 5 + 10                      # far from the fill constants
        out = T.RandomErasing(p=1.0)(x.clone(), np.random.default_rng(seed))
        changed = (out != x).any(0)                               # [30, 20]
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        top, h = int(rows[0]), len(rows)
        left, w = int(cols[0]), len(cols)
        assert changed.sum() == h * w and changed[top:top + h, left:left + w].all()   # a rectangle
        assert torch.equal(out[:, top:top + h, left:left + w],
                           fill[:, None, None].expand(3, h, w))  # filled per channel
        assert h < 30 and w < 20 and 0.02 * 600 * 0.5 < h * w < 0.4 * 600 * 1.5
        shapes.add((top == 0, top + h == 30))
    assert (True, False) in shapes and (False, True) in shapes  # corner reaches both ends
    x = torch.rand(3, 30, 20)
    assert torch.equal(T.RandomErasing(p=0.0)(x.clone(), np.random.default_rng(0)), x)
    erased = sum(not torch.equal(T.RandomErasing(0.5)(x.clone(), np.random.default_rng(s)), x)
                 for s in range(400))
    assert 160 < erased < 240


def test_linear_transform():
    lt = T.LinearTransform(p=1.0)
    for seed in range(20):
        x = torch.rand(3, 36, 18) * 0.98 + 0.01                   # strictly positive
        out = lt(x.clone(), np.random.default_rng(seed))
        assert out.min() >= 0 and out.max() <= 1
        # out = M * x with min(M) <= 1e-6 at the stop, and every factor was applied to regions
        assert (out / x).min() <= 1.5e-6
        assert torch.equal(out, lt(x.clone(), np.random.default_rng(seed)))
    x = torch.rand(3, 36, 18)
    assert torch.equal(T.LinearTransform(p=0.0)(x.clone(), np.random.default_rng(0)), x)
    zeros = torch.zeros(3, 12, 6)                                 # the official loop never ends here
    assert torch.equal(T.LinearTransform(p=1.0, max_iter=50)(zeros.clone(), np.random.default_rng(0)), zeros)
