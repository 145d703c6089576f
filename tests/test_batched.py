"""The decode-once cache and the batched augmentation against the per-image pipeline of data/transforms.py.

Identical where the operation is the same (pad + crop + flip, ColorJitter, ToTensor, Normalize, erasing,
ChannelExchange, ChannelAdapGray, LinearTransform's rectangles, draws and mask); within float rounding where the
arithmetic differs (LinearTransform's x0 * M against its region-by-region products).
"""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

import features
import data.transforms as T
from data.fast import batched as B
from data.fast import draws as D
from data.fast.cache import build_cache, decode_resized
from data.common import IR, VIS, ImageList
from data.fast.loader import CachedTrainBatches, _Augmented, _Plans, cached_loader
from data.loader import TrainBatches

H, W, PAD = 32, 16, 2


def picture(seed, size=(24, 48), grey=False, dark=False):
    """A smooth random RGB PIL image (w, h); grey: three equal channels; dark: a black patch (exact zeros)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((6, 4, 3)) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    arr = np.asarray(base, dtype=np.float32) + rng.normal(0, 8, (size[1], size[0], 3))
    if dark:
        arr[size[1] // 4:size[1] // 4 + size[1] // 2, :size[0] // 2] = 0
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert("L").convert("RGB") if grey else img


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """20 visible and 20 infrared JPEGs, a quarter of them with a black patch; RAM caches of both."""
    root = tmp_path_factory.mktemp("images")
    lists = []
    for modality, grey in ((VIS, False), (IR, True)):
        paths = []
        for i in range(20):
            path = str(root / f"{modality}_{i:02d}.jpg")
            picture(100 * modality + i, grey=grey, dark=i % 4 == 0).save(path, quality=90)
            paths.append(path)
        lists.append(ImageList(paths, np.arange(20) % 5, np.full(20, 1 + 2 * modality), modality))
    return lists


def caches(tiny, interpolation):
    return [build_cache(images, H, W, interpolation, progress=False) for images in tiny]


def batches_of(seed, count=2, size=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 20, (count, size, 2)).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# Decode once

def test_cache_rows_are_the_pipelines_resize(tiny, tmp_path):
    vis, ir = tiny
    for interpolation in ("bilinear", "bicubic"):
        ram = build_cache(vis, H, W, interpolation, progress=False)
        disk = build_cache(vis, H, W, interpolation, path=str(tmp_path / f"vis_{interpolation}.u8"), progress=False)
        for i, path in enumerate(vis.paths):
            pil = np.asarray(T.Resize(H, W, interpolation)(Image.open(path).convert("RGB"))).transpose(2, 0, 1)
            assert np.array_equal(ram.images[i].numpy(), pil)
            assert np.array_equal(disk.images[i].numpy(), decode_resized(path, H, W, interpolation))
    grey = build_cache(ir, H, W, progress=False)
    assert bool(grey.grey.all()) and not bool(ram.grey.any())
    zeros = [(ram.images[i] == 0).sum(dim=(1, 2)).tolist() for i in range(len(vis))]
    assert ram.zeros.tolist() == zeros and ram.zeros[0].min() > ram.zeros[1].max()   # image 0 has a black patch


def test_cache_file_reused_refreshed_and_checked(tiny, tmp_path):
    vis, _ = tiny
    folder = tmp_path / "set"
    folder.mkdir()
    paths = []
    for i, src in enumerate(vis.paths[:6]):
        paths.append(str(folder / f"{i}.jpg"))
        Image.open(src).save(paths[-1], quality=90)
    images = ImageList(paths, np.zeros(6), np.ones(6), VIS)
    path = str(tmp_path / "run" / "vis.u8")
    first = build_cache(images, H, W, path=path, progress=False)
    assert "built" in first.summary and os.path.isfile(path + ".json")
    again = build_cache(images, H, W, path=path, progress=False)
    assert "reused (6 images" in again.summary and torch.equal(again.images, first.images)
    # a changed file (new content, size and mtime): that row is decoded again, and the summary names it
    picture(999, size=(30, 40)).save(paths[2], quality=80)
    changed = build_cache(images, H, W, path=path, progress=False)
    assert "1 file changed, decoded again" in changed.summary and paths[2] in changed.summary
    assert np.array_equal(changed.images[2].numpy(), decode_resized(paths[2], H, W))
    assert torch.equal(changed.images[:2], first.images[:2])
    current = build_cache(images, H, W, path=path, progress=False)
    assert "reused" in current.summary                                              # the key was updated
    # a spawned worker gets the file's path, not its pixels
    clone = pickle.loads(pickle.dumps(current))
    assert torch.equal(clone.images, current.images) and len(pickle.dumps(current)) < current.images.numel()
    # another size is another cache; a missing file is an error that names it
    assert "rebuilt" in build_cache(images, H + 4, W, path=path, progress=False).summary
    os.remove(paths[4])
    with pytest.raises(FileNotFoundError, match="4.jpg"):
        build_cache(images, H, W, path=path, progress=False)


def test_cache_bad_arguments(tiny):
    vis, _ = tiny
    for kwargs, text in ((dict(height=0), "height"), (dict(interpolation="nearest"), "interpolation"),
                         (dict(workers=-1), "workers")):
        args = {**dict(height=H, width=W, interpolation="bilinear", workers=0), **kwargs}
        with pytest.raises(ValueError, match=text):
            build_cache(vis, **args)
    with pytest.raises(TypeError, match="ImageList"):
        build_cache(vis.paths, H, W)


@pytest.mark.parametrize("interpolation,block", [("bilinear", None), ("bicubic", None), ("bilinear", 1)])
def test_features_from_the_cache_are_those_of_decoding(tiny, interpolation, block, monkeypatch):
    """Feature extraction reads the training cache: its images, and so its features, are the decoded ones
    bit for bit, for any subset of the rows in any order, whatever blocks ToTensor + Normalize run in (block:
    images a block, None: the default size, which holds every image of these tests)."""
    from data.fast.loader import CachedImageDataset
    from data.loader import ImageDataset
    if block:
        monkeypatch.setattr(B, "CPU_BLOCK_BYTES", block * 3 * H * W * 4)
    vis, _ = tiny
    cache = build_cache(vis, H, W, interpolation, progress=False)
    tfm = T.test_transform(H, W, interpolation)
    part = vis.subset(np.array([7, 3, 19, 0, 12]))
    ref, ours = ImageDataset(part, tfm), CachedImageDataset(part, cache, tfm, batch_size=2)
    assert len(ours) == 3
    x, index = zip(*(ours[k] for k in range(3)))
    assert torch.equal(torch.cat(index), torch.arange(5))
    assert torch.equal(torch.cat(x), torch.stack([ref[i][0] for i in range(5)]))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    model_fn = lambda x, modality: net(x)
    args = dict(batch_size=3, flip=True, interpolation=interpolation, progress=False)
    assert torch.equal(features.extract_features(model_fn, part, H, W, cache=cache, **args),
                       features.extract_features(model_fn, part, H, W, **args))


def test_cached_features_refuse_a_cache_that_does_not_hold_the_images(tiny):
    from data.fast.loader import CachedImageDataset
    vis, ir = tiny
    cache = build_cache(vis, H, W, "bilinear", progress=False)
    with pytest.raises(ValueError, match=r"20 of the 20 images are not in the cache .*, the first .*1_00.jpg"):
        CachedImageDataset(ir, cache, T.test_transform(H, W), 4)
    with pytest.raises(ValueError, match="32x16 bilinear images, but the transform resizes to 32x16 bicubic"):
        CachedImageDataset(vis, cache, T.test_transform(H, W, "bicubic"), 4)
    with pytest.raises(ValueError, match="test_transform"):
        CachedImageDataset(vis, cache, T.train_transforms(H, W, 2)["v0"], 4)
    with pytest.raises(TypeError, match="ImageCache"):
        CachedImageDataset(vis, vis, T.test_transform(H, W), 4)
    with pytest.raises(ValueError, match="batch_size"):
        CachedImageDataset(vis, cache, T.test_transform(H, W), 0)
    with pytest.raises(IndexError):
        CachedImageDataset(vis, cache, T.test_transform(H, W), 8)[3]


# ---------------------------------------------------------------------------------------------------
# Steps, one by one, against the per-image steps on the same draws

@pytest.mark.parametrize("height,width,pad", [(32, 16, 2), (30, 18, 3)])   # 18: not a multiple of 4 bytes
def test_crop_is_pad_crop_flip(height, width, pad):
    imgs = [picture(s, size=(width, height)) for s in range(8)]
    src = torch.from_numpy(np.stack([np.asarray(i).transpose(2, 0, 1) for i in imgs]))
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.integers(0, 8, 12))
    top, left = (torch.from_numpy(rng.integers(0, 2 * pad + 1, 12)) for _ in range(2))
    flip = torch.from_numpy(rng.random(12) < 0.5)
    channels = torch.from_numpy(rng.integers(0, 3, 12))
    full, one = B.crop(src, rows, top, left, flip, pad), B.crop(src, rows, top, left, flip, pad, channels)
    for j in range(12):
        ref = TF.crop(TF.pad(imgs[rows[j]], pad, fill=0), int(top[j]), int(left[j]), height, width)
        ref = np.asarray(TF.hflip(ref) if flip[j] else ref).transpose(2, 0, 1)
        assert np.array_equal(full[j].numpy(), ref)
        assert np.array_equal(one[j, 0].numpy(), ref[channels[j]])


def test_head_and_tail_draws_consume_like_the_steps():
    """Without LinearTransform, the draws of a view are those of its Compose, call for call."""
    img = picture(0, size=(W, H))
    for method in ("mult", "mbmil"):
        for stage in (1, 2):
            pipes = T.train_transforms(H, W, stage, method, pad=PAD)
            for key in ("v0", "v1", "r"):
                rec = D.parse_recipe(pipes[key])
                if rec.linear is not None:               # data-dependent: test_linear_transform_masks_and_draws
                    continue
                for seed in range(20):
                    ref, ours = np.random.default_rng(seed), np.random.default_rng(seed)
                    pipes[key](img, ref)
                    D.draw_head(rec, ours)
                    D.draw_tail(rec, ours)
                    assert ref.bit_generator.state == ours.bit_generator.state


def mask_loop(lt, x, rng):
    """LinearTransform's loop written out, returning its mask M as well (the reference for the masks)."""
    x, mask = x.clone(), torch.ones_like(x)
    if rng.random() > lt.p:
        return x, mask
    for _ in range(lt.max_iter):
        rect = T._draw_rectangle(x.shape[1], x.shape[2], rng, lt.area, lt.ratio)
        if rect is None:
            continue
        top, left, h, w = rect
        region = x[:, top:top + h, left:left + w]
        peak = region.amax(dim=(1, 2))
        positive = peak > 0
        b = torch.ones_like(peak)
        if int(positive.sum()):
            b[positive] = torch.from_numpy(rng.beta(0.5, 0.5, size=int(positive.sum()))).float()
        peak = torch.where(positive, peak, torch.ones_like(peak))
        region.div_(peak[:, None, None]).mul_(b[:, None, None])
        mask[:, top:top + h, left:left + w].mul_((b / peak)[:, None, None])
        if mask.min() <= lt.tmin:
            break
    return x, mask


@pytest.mark.parametrize("height,width,pad,max_iter", [(36, 18, 2, 1000), (48, 24, 1, 1000), (36, 18, 2, 6)])
def test_linear_transform_masks_and_draws(height, width, pad, max_iter):
    """Rectangles, Beta draws, stop and mask M bit for bit; x0 * M within float rounding of the loop's x."""
    lt = T.LinearTransform(p=0.9, max_iter=max_iter)
    imgs = [picture(s, size=(width, height), dark=s % 3 == 0) for s in range(24)]
    imgs.append(Image.new("RGB", (width, height)))                              # all zero: never stops
    src = torch.from_numpy(np.stack([np.asarray(i).transpose(2, 0, 1) for i in imgs]))
    n = len(imgs)
    rng = np.random.default_rng(1)
    top, left = (torch.from_numpy(rng.integers(0, 2 * pad + 1, n)) for _ in range(2))
    flip = torch.from_numpy(rng.random(n) < 0.5)
    crops = B.crop(src, torch.arange(n), top, left, flip, pad)
    rngs = [np.random.default_rng([5, j]) for j in range(n)]
    gate = [not r.random() > lt.p for r in rngs]
    zeros = (src == 0).sum(dim=(2, 3))
    masks = D.resolve_linear(lt, crops, gate, rngs, zeros, pad, first=4, more=3)   # several rounds
    x0 = crops.float().div_(255)                                           # ToTensor
    ours = B.linear_(x0.clone(), masks)
    m_ours = B.linear_(torch.ones_like(x0), masks)
    for j in range(n):
        ref_rng = np.random.default_rng([5, j])
        x_ref, m_ref = mask_loop(lt, x0[j], ref_rng)
        assert torch.equal(m_ours[j], m_ref)                                     # the mask, bit for bit
        assert ref_rng.bit_generator.state == rngs[j].bit_generator.state       # the same draws, same stop
        real = lt(x0[j].clone(), np.random.default_rng([5, j]))                 # data.transforms itself
        assert torch.equal(real, x_ref)
        assert torch.allclose(ours[j], real, rtol=1e-6, atol=1e-7)            # products vs step by step
    assert masks.steps[gate.index(False)] == 0 and masks.steps[-1] >= (1 if gate[-1] else 0)


def test_cell_maxima_against_numpy():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (5, 3, 20, 12), dtype=np.uint8))
    y_end = torch.tensor([[4, 9, 19, 19], [19, 19, 19, 19], [0, 1, 2, 19], [7, 15, 19, 19], [3, 4, 5, 19]])
    x_end = torch.tensor([[5, 11, 11], [0, 10, 11], [11, 11, 11], [2, 3, 11], [6, 7, 11]])
    got = D.cell_maxima(images, y_end, x_end)
    for i in range(5):
        ys = [0] + [int(e) + 1 for e in y_end[i]]
        xs = [0] + [int(e) + 1 for e in x_end[i]]
        for a in range(4):
            for b in range(3):
                if ys[a] < ys[a + 1] and xs[b] < xs[b + 1]:
                    want = images[i, :, ys[a]:ys[a + 1], xs[b]:xs[b + 1]].amax(dim=(1, 2))
                    assert torch.equal(got[i, :, a, b], want)


@pytest.mark.parametrize("op", [0, 1, 2, 3])
def test_color_jitter_is_pil_bit_for_bit(op):
    """Each adjustment on the 8-bit values equals torchvision's on the PIL image, over factors across their whole
    range (hue both ways, and the shifts that wrap); the images include black patches and saturated colours."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
    rng = np.random.default_rng(op)
    for s in range(24):
        img = picture(s, size=(36, 72), dark=s % 3 == 0)
        if s % 4 == 1:                                   # saturated colours: values clipped at 0 and 255
            img = Image.fromarray(np.clip((np.asarray(img, dtype=np.int64) - 128) * 3 + 128, 0, 255).astype(np.uint8))
        f = float(rng.uniform(-0.5, 0.5) if op == 3 else rng.uniform(0.0, 2.0))
        want = torch.from_numpy(np.asarray(adjust(img, f)).transpose(2, 0, 1).copy())
        x = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())[None].float()
        factors = torch.full((1, 4), float("nan"), dtype=torch.float64)
        factors[0, op] = f
        B.color_jitter_(x, [(op,)], factors)
        assert torch.equal(x[0], want.float()), (op, s, f)


def test_color_jitter_of_all_four_in_every_order_is_pil():
    """Whole ColorJitters, in the orders and with the factors the per-image pipeline draws, equal its result."""
    jitter = T.ColorJitter()
    for s in range(12):
        img = picture(40 + s, size=(20, 40), dark=s % 2 == 0)
        want = torch.from_numpy(np.asarray(jitter(img, np.random.default_rng(s))).transpose(2, 0, 1).copy())
        rng = np.random.default_rng(s)
        order = rng.permutation(4)
        factors = torch.tensor([[rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5),
                                 rng.uniform(-0.5, 0.5)]], dtype=torch.float64)
        x = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())[None].float()
        B.color_jitter_(x, [tuple(int(k) for k in order)], factors)
        assert torch.equal(x[0], want.float()), s


def test_color_jitter_skips_what_pil_leaves_unchanged_on_grey():
    grey = picture(3, size=(16, 32), grey=True)
    for adjust in (TF.adjust_saturation, TF.adjust_hue):
        for f in (0.3, 1.7, -0.4, 0.45):
            if adjust is TF.adjust_hue and abs(f) > 0.5 or adjust is TF.adjust_saturation and f < 0:
                continue
            assert np.array_equal(np.asarray(adjust(grey, f)), np.asarray(grey))
    order = torch.tensor([[3, 2, 1, 0], [3, 2, 1, 0]])
    factors = torch.tensor([[1.2, 0.8, 1.1, 0.2], [1.2, float("nan"), 1.1, 0.2]])
    seqs = B.jitter_sequences(order, factors, torch.tensor([True, False]))
    assert seqs == [(1, 0), (3, 2, 0)]


# ---------------------------------------------------------------------------------------------------
# Whole batches against TrainBatches

def pil_units(diff, key):
    """A difference of normalised values in units of 1/255 of the [0, 1] image (times the channel's std)."""
    std = torch.tensor(T.IMAGENET_STD)[None, :, None, None]
    return diff.abs() * std * 255


@pytest.mark.parametrize("method,stage,block", [("mult", 1, None), ("mult", 2, None), ("mbmil", 1, None),
                                                ("mbmil", 2, None), ("mult", 1, 3), ("mult", 2, 3), ("mbmil", 1, 3)])
def test_cached_batches_match_train_batches(tiny, method, stage, block, monkeypatch):
    """block: on the CPU, ToTensor + Normalize run in blocks of this many three-channel images (None: the
    default size, which holds all 16 of a view here); 3 splits every part, one-channel ones in blocks of 9."""
    if block:
        monkeypatch.setattr(B, "CPU_BLOCK_BYTES", block * 3 * H * W * 4)
    vis, ir = tiny
    cache_vis, cache_ir = caches(tiny, "bilinear" if method == "mult" else "bicubic")
    tfm = T.train_transforms(H, W, stage, method, pad=PAD)
    batches = batches_of(stage)
    ref, ours = TrainBatches(vis, ir, tfm, batches, seed=3), CachedTrainBatches(cache_vis, cache_ir, tfm, batches, 3)
    for b in range(len(batches)):
        want, got = ref[b], ours[b]
        assert set(got) == set(want)
        assert torch.equal(got["vis_index"], want["vis_index"]) and torch.equal(got["ir_index"], want["ir_index"])
        for key in ("v0", "v1", "r"):
            linear = any(isinstance(s, T.LinearTransform) for s in tfm[key].steps)
            if not linear:
                assert torch.equal(got[key], want[key]), key                # the same operations, bit for bit
                continue
            assert pil_units(got[key] - want[key], key).max() < 1e-3         # LinearTransform: float rounding only


def test_every_channel_branch_is_exercised(tiny):
    """ChannelAdapGray's four outcomes (channel, grey, unchanged) all occur in a stage-two batch, bit for bit."""
    vis, ir = tiny
    cache_vis, cache_ir = caches(tiny, "bilinear")
    tfm = T.train_transforms(H, W, 2, pad=PAD)
    batches = batches_of(9, count=1, size=48)
    got, want = CachedTrainBatches(cache_vis, cache_ir, tfm, batches, 11)[0], TrainBatches(vis, ir, tfm, batches, 11)[0]
    assert torch.equal(got["r"], want["r"])
    mixes = {D.draw_tail(D.parse_recipe(tfm["r"]), _after_head(tfm["r"], [11, 0, j, 1]))[1] for j in range(48)}
    assert mixes == {-1, 0, 1, 2, 3}


def _after_head(pipe, seed):
    rng = np.random.default_rng(seed)
    D.draw_head(D.parse_recipe(pipe), rng)
    return rng


def test_workers_and_the_device_split_do_not_change_a_batch(tiny, tmp_path):
    cache_vis = build_cache(tiny[0], H, W, path=str(tmp_path / "vis.u8"), progress=False)   # memory-mapped
    cache_ir = build_cache(tiny[1], H, W, progress=False)
    tfm = T.train_transforms(H, W, 1, pad=PAD)
    data = CachedTrainBatches(cache_vis, cache_ir, tfm, batches_of(4, count=3), seed=21)
    runs = [list(cached_loader(data, num_workers=n)) for n in (0, 2)]
    runs.append(list(_Augmented(data, DataLoader(_Plans(data), batch_size=None, num_workers=2))))  # GPU path
    assert len(cached_loader(data)) == 3
    for batches in zip(*runs):
        for other in batches[1:]:
            assert all(torch.equal(batches[0][k], other[k]) for k in batches[0])


def test_bad_inputs(tiny):
    cache_vis, cache_ir = caches(tiny, "bilinear")
    tfm = T.train_transforms(H, W, 2, pad=PAD)
    good = batches_of(0)
    with pytest.raises(ValueError, match="resizes to 36x16"):
        CachedTrainBatches(cache_vis, cache_ir, T.train_transforms(36, W, 2, pad=PAD), good, 0)
    with pytest.raises(ValueError, match="bicubic"):
        CachedTrainBatches(cache_vis, cache_ir, T.train_transforms(H, W, 2, "mbmil", pad=PAD), good, 0)
    with pytest.raises(TypeError, match="ImageCache"):
        CachedTrainBatches(cache_vis.images, cache_ir, tfm, good, 0)
    with pytest.raises(ValueError, match="'v0', 'v1' and 'r'"):
        CachedTrainBatches(cache_vis, cache_ir, {"v0": tfm["v0"]}, good, 0)
    bad = good.copy()
    bad[0, 0, 1] = 20
    with pytest.raises(ValueError, match="infrared rows"):
        CachedTrainBatches(cache_vis, cache_ir, tfm, bad, 0)
    with pytest.raises(ValueError, match="step sequences"):
        D.parse_recipe(T.test_transform(H, W))
    with pytest.raises(IndexError):
        CachedTrainBatches(cache_vis, cache_ir, tfm, good, 0)[2]


def test_train_with_the_cached_input_resumes_on_its_cache(tmp_path, monkeypatch):
    """--input cached end to end: the caches are built in the run folder, decoding each training image once
    (the image check leaves them to the build); a resumed run reuses them without decoding any, and equals the
    uninterrupted one."""
    import collections
    import json
    import data.fast.cache
    import data.loader
    import train
    from plumbing import checks
    from demo.synthetic import render_sysu
    reads = collections.Counter()

    def counted(read):
        def read_image(path):
            reads[os.path.abspath(path)] += 1
            return read(path)
        return read_image
    for module in (data.fast.cache, data.loader, checks):  # every read_image of a training run
        monkeypatch.setattr(module, "read_image", counted(module.read_image))
    root = str(tmp_path / "data")
    render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    tiny = ["--data-root", root, "--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16",
            "--k1", "6", "--k2", "2", "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1",
            "--eval-every", "100", "--no-eval-untrained", "--workers", "0", "--eps", "0.6", "--input", "cached",
            "--stage-one-epochs", "1", "--augment", "paper"]
    full, part = tmp_path / "full", tmp_path / "part"
    train.cli([*tiny, "--epochs", "3", "--out", str(full)])
    keys = sorted(p for p in (full / "cache").iterdir() if p.suffix == ".json")
    assert [p.name.rsplit("_", 1)[0] for p in keys] == ["ir_32x16_bilinear", "vis_32x16_bilinear"]
    training = [row[0] for p in keys for row in json.loads(p.read_text())["rows"]]
    assert len(set(training)) == len(training) > 0 and [reads[p] for p in training] == [1] * len(training)
    assert len(reads) > len(training)                       # the test images were checked and evaluated
    train.cli([*tiny, "--epochs", "2", "--out", str(part)])
    stale = part / "cache" / "vis_32x16_bilinear.u8"           # a file the cache does not name: never read
    stale.write_bytes(b"\0" * 100)
    reads.clear()
    train.cli([*tiny, "--epochs", "3", "--out", str(part)])
    assert not any(reads[p] for p in training)
    log = (part / "log.txt").read_text()
    assert "reused" in log and stale.exists()
    curve = lambda run: [x for line in open(run / "metrics.jsonl") for x in json.loads(line)["loss_per_iteration"]]
    assert curve(full) == curve(part)


@pytest.mark.parametrize("method", ["mult", "mbmil"])
def test_cached_and_pil_input_train_the_same_model_where_their_steps_agree(tmp_path, method):
    """With the stage-two augmentation throughout (--augment light; MBMIL's has ColorJitter), every step of the
    batched pipeline and the cached feature extraction is bit for bit the per-image one: the same run."""
    import json
    import train
    from demo.synthetic import render_sysu
    root = str(tmp_path / "data")
    render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    tiny = ["--data-root", root, "--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16",
            "--k1", "6", "--k2", "2", "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1",
            "--eval-every", "100", "--no-eval-untrained", "--workers", "0", "--eps", "0.6", "--epochs", "2",
            "--stage-one-epochs", "1", "--augment", "light", "--no-check-images", "--method", method]
    for name in ("cached", "pil"):
        train.cli([*tiny, "--input", name, "--out", str(tmp_path / name)])
    record = lambda run: [{k: v for k, v in json.loads(line).items() if k != "time"}
                          for line in open(tmp_path / run / "metrics.jsonl")]
    assert record("cached") == record("pil") and len(record("pil")) == 2


def test_runs_share_a_cache_dir_and_their_results_do_not_change(tmp_path):
    """--cache-dir: a second configuration of the same data reuses the first one's files (nothing in its run
    folder), another dataset in the same folder gets files of its own, and a run on the shared cache trains as one
    on its own cache."""
    import json
    import train
    from demo.synthetic import render_sysu
    roots = [str(tmp_path / name) for name in ("data", "other")]
    for seed, root in enumerate(roots):
        render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=seed)
    tiny = ["--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16", "--k1", "6", "--k2", "2",
            "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1", "--eval-every", "100",
            "--no-eval-untrained", "--workers", "0", "--eps", "0.6", "--input", "cached", "--epochs", "1",
            "--stage-one-epochs", "1", "--no-check-images"]
    shared = tmp_path / "shared"
    train.cli([*tiny, "--data-root", roots[0], "--out", str(tmp_path / "own")])
    train.cli([*tiny, "--data-root", roots[0], "--out", str(tmp_path / "a"), "--cache-dir", str(shared)])
    train.cli([*tiny, "--data-root", roots[0], "--out", str(tmp_path / "b"), "--cache-dir", str(shared), "--seed", "2"])
    assert "built" in (tmp_path / "a" / "log.txt").read_text()
    assert "reused" in (tmp_path / "b" / "log.txt").read_text()
    assert not (tmp_path / "a" / "cache").exists() and not (tmp_path / "b" / "cache").exists()
    assert len(list(shared.glob("*.u8"))) == 2 and not list(shared.glob("*.tmp"))
    curve = lambda run: [x for line in open(tmp_path / run / "metrics.jsonl")
                         for x in json.loads(line)["loss_per_iteration"]]
    assert curve("a") == curve("own") and curve("b") != curve("a")
    train.cli([*tiny, "--data-root", roots[1], "--out", str(tmp_path / "c"), "--cache-dir", str(shared)])
    assert len(list(shared.glob("*.u8"))) == 4


def test_a_failed_build_names_every_bad_file_and_leaves_nothing(tmp_path):
    """Training images that cannot be decoded: one ValueError naming each (every file is tried first); the build
    removes its temporary file and the folders it made."""
    paths = [str(tmp_path / f"{i}.jpg") for i in range(6)]
    for i, path in enumerate(paths):
        picture(i).save(path)
    for path in paths[1:4:2]:
        with open(path, "wb") as f:
            f.write(b"not an image")
    images = ImageList(paths, np.arange(6), np.ones(6, dtype=np.int64), VIS)
    with pytest.raises(ValueError, match="2 of 6 training images cannot be used") as err:
        build_cache(images, H, W, path=str(tmp_path / "run" / "cache" / "vis.u8"), progress=False)
    assert paths[1] in str(err.value) and paths[3] in str(err.value) and "cannot decode image" in str(err.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# The cache trusts nothing it has not checked (issue 26)

def six_images(tiny, folder, seed=0):
    """An ImageList of six JPEGs of its own in `folder` (copies of tiny's visible ones, or other pictures)."""
    folder.mkdir()
    paths = []
    for i in range(6):
        paths.append(str(folder / f"{i}.jpg"))
        (Image.open(tiny[0].paths[i]) if seed == 0 else picture(1000 * seed + i)).save(paths[-1], quality=90)
    return ImageList(paths, np.zeros(6), np.ones(6), VIS)


def test_a_damaged_or_foreign_cache_file_is_detected_and_decoded_again(tiny, tmp_path):
    import shutil
    images = six_images(tiny, tmp_path / "set")
    path = str(tmp_path / "cache" / "vis.u8")
    first = build_cache(images, H, W, path=path, progress=False)
    want = first.images.clone()
    with open(path, "r+b") as f:                                  # scramble a few bytes of row 3
        f.seek(3 * 3 * H * W + 100)
        f.write(bytes(range(7, 57)))
    again = build_cache(images, H, W, path=path, progress=False)
    assert "1 of 6 rows damaged" in again.summary and images.paths[3] in again.summary
    assert torch.equal(again.images, want)
    assert "checksum verified" in build_cache(images, H, W, path=path, progress=False).summary
    other = build_cache(six_images(tiny, tmp_path / "other", seed=5), H, W, path=str(tmp_path / "o.u8"),
                        progress=False)
    shutil.copyfile(str(tmp_path / "o.u8"), path)                 # a foreign file of the very same size
    assert not torch.equal(other.images, want)
    again = build_cache(images, H, W, path=path, progress=False)
    assert "6 of 6 rows damaged" in again.summary and torch.equal(again.images, want)


def test_a_replaced_image_of_the_same_size_and_mtime_is_decoded_again(tiny, tmp_path):
    images = six_images(tiny, tmp_path / "set")
    path = str(tmp_path / "vis.u8")
    build_cache(images, H, W, path=path, progress=False)
    by_size = sorted(range(6), key=lambda i: os.path.getsize(images.paths[i]))
    row, victim, donor = by_size[-1], images.paths[by_size[-1]], images.paths[by_size[0]]
    st, old = os.stat(victim), open(victim, "rb").read()
    new = open(donor, "rb").read()
    new += b"\0" * (len(old) - len(new))                          # a JPEG decoder ignores bytes after its end
    with open(victim, "wb") as f:                                 # the donor's picture, padded to the same size
        f.write(new)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))          # and its modification time restored
    assert (os.path.getsize(victim), os.stat(victim).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = build_cache(images, H, W, path=path, progress=False)
    assert "1 file changed, decoded again" in again.summary and victim in again.summary
    assert np.array_equal(again.images[row].numpy(), decode_resized(donor, H, W))
    os.chmod(donor, 0o600)                                        # a new ctime, the same bytes: not decoded
    assert "same content" in build_cache(images, H, W, path=path, progress=False).summary


def test_a_cache_of_an_earlier_format_is_rebuilt(tiny, tmp_path):
    import json
    images = six_images(tiny, tmp_path / "set")
    path = str(tmp_path / "vis.u8")
    built = build_cache(images, H, W, path=path, progress=False)
    key = json.loads(open(path + ".json").read())
    key["header"]["format"] = "vireid-image-cache-v1"
    key["rows"] = [[row[0], row[1], row[2], row[8], row[9]] for row in key["rows"]]   # v1: path, size, mtime, facts
    open(path + ".json", "w").write(json.dumps(key))
    again = build_cache(images, H, W, path=path, progress=False)
    assert "rebuilt (an earlier release's format" in again.summary and torch.equal(again.images, built.images)


def test_a_build_without_the_space_it_needs_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    """The space is checked before any image is decoded, and reserved (posix_fallocate) so that a disk filling up
    during the build cannot end in a bus error: either way one OSError naming the folder and the size."""
    import errno
    import shutil as shutil_module
    import data.fast.cache as C
    images = six_images(tiny, tmp_path / "set")
    folder = tmp_path / "run" / "cache"
    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=64 * 1024))
    with pytest.raises(OSError) as err:                           # 6 x 3 x 288 x 144 bytes on 64 KB
        build_cache(images, 288, 144, path=str(folder / "vis.u8"), progress=False)
    assert str(folder) in str(err.value) and "0.7 MB needed, 0.1 MB free" in str(err.value)
    assert len(str(err.value).splitlines()) == 1 and not (tmp_path / "run").exists()
    monkeypatch.setattr(shutil_module, "disk_usage", real)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(C.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="not enough space for the image cache vis.u8 in .*cache: 0.0 MB needed"):
        build_cache(images, H, W, path=str(folder / "vis.u8"), progress=False)
    assert not (tmp_path / "run").exists()


def test_the_training_cli_on_a_full_cache_dir_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    import shutil as shutil_module
    import train
    from demo.synthetic import render_sysu
    root = str(tmp_path / "data")
    render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=64 * 1024))
    with pytest.raises(SystemExit) as exit:
        train.cli(["--data-root", root, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "small"),
                   "--arch", "resnet18", "--pretrained", "none", "--height", "64", "--width", "32", "--k1", "6",
                   "--k2", "2", "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1",
                   "--no-eval-untrained", "--eps", "0.6", "--workers", "0", "--epochs", "1", "--stage-one-epochs", "1",
                   "--no-check-images"])
    err = capsys.readouterr().err.strip().split("\n")[-1]
    assert exit.value.code == 2 and "not enough space for the image caches" in err and str(tmp_path / "small") in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "small").exists()


KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import data.fast.cache as C
from data.common import ImageList, VIS
paths = sys.argv[3:]
real = C.read_image
def read_then_die(path):
    if path == paths[2]:
        os.kill(os.getpid(), signal.SIGKILL)             # as a SIGKILL or an OOM kill would, mid-build
    return real(path)
C.read_image = read_then_die
C.build_cache(ImageList(paths, np.zeros(len(paths)), np.ones(len(paths)), VIS), 32, 16, path=sys.argv[2],
              progress=False)
"""
LIVE_BUILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import data.fast.cache as C
fd = C._create_locked(sys.argv[2])
print("writing", flush=True)
time.sleep(60)
"""


def test_a_killed_builds_temporary_file_is_removed_by_the_next_build_but_never_a_live_one(tiny, tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    images = six_images(tiny, tmp_path / "set")
    path = str(tmp_path / "cache" / "vis.u8")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, repo, path, *images.paths])
    assert killed.wait() == -9
    left = [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")]
    assert left == [f"vis.u8.{killed.pid}.tmp"]
    stale = tmp_path / "cache" / "ir.u8.999999999.tmp"                # an unlocked file of a process long gone
    stale.write_bytes(b"\0" * 10)
    # a live build's file, named by a process id this machine does not run (a build on another machine sharing
    # the folder): its lock alone keeps it
    remote = tmp_path / "cache" / "vis.u8.999999998.tmp"
    live = subprocess.Popen([sys.executable, "-c", LIVE_BUILD, repo, str(remote)], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "writing"
        built = build_cache(images, 32, 16, path=path, progress=False)
        assert "removed 2 temporary files" in built.summary and f"vis.u8.{killed.pid}.tmp" in built.summary
        assert sorted(p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")) == [remote.name]
    finally:
        live.kill()
        live.wait()
    build_cache(images, 32, 16, path=path, progress=False)           # its writer gone, the file goes too
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")]
