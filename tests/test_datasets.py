"""Readers (data/sysu.py, data/regdb.py) and Datasets (data/loader.py) on tiny on-disk datasets."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data.transforms as T
from data.common import IR, VIS, read_image
from data.loader import ImageDataset, TrainBatches
from data.regdb import regdb_test, regdb_train
from data.samplers import stage_one_batches
from data.sysu import (GALLERY_CAMS, sysu_gallery_candidates, sysu_gallery_draw, sysu_test,
                       sysu_train)

TRAIN_IDS, VAL_IDS, TEST_IDS = [3, 1, 2], [5, 4], [12, 10, 11]


def n_files(pid, cam):
    """Images in cam{cam}/{pid:04d}/ of the fake SYSU (0 = no folder)."""
    if pid in VAL_IDS and cam in (1, 2):
        return 0                      # like the real data: validation ids lack cams 1 and 2
    if (pid, cam) == (10, 4):
        return 12                     # exercises min(10, len) in multi-shot
    return (pid * 7 + cam * 3) % 4    # 0..3, some folders missing


def write_image(path, seed, size=(6, 12)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def sysu_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sysu") / "SYSU-MM01")
    for cam in range(1, 7):
        os.makedirs(os.path.join(root, f"cam{cam}"))
        for pid in TRAIN_IDS + VAL_IDS + TEST_IDS:
            for k in reversed(range(n_files(pid, cam))):   # created in reverse name order
                write_image(os.path.join(root, f"cam{cam}", f"{pid:04d}", f"{k + 1:04d}.jpg"),
                            seed=pid * 100 + cam * 10 + k)
    os.makedirs(os.path.join(root, "exp"))
    for name, ids in (("train_id", TRAIN_IDS), ("val_id", VAL_IDS), ("test_id", TEST_IDS)):
        with open(os.path.join(root, "exp", f"{name}.txt"), "w") as f:
            f.write(",".join(map(str, ids)) + "\n")
    return root


def copy_of(root, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(root, dst)
    return dst


def reference_files(root, pids, cams):
    """Slow reference: every file of the (pid, cam) folders, via os.listdir."""
    out = []
    for pid in pids:
        for cam in cams:
            folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
            if os.path.isdir(folder):
                out.append(sorted(os.path.join(folder, f) for f in os.listdir(folder)))
    return out


# ---------------------------------------------------------------- SYSU training set

def test_sysu_train_rows(sysu_root):
    vis, ir = sysu_train(sysu_root, expected=None)
    ids = sorted(TRAIN_IDS + VAL_IDS)
    for images, cams, modality in ((vis, (1, 2, 4, 5), VIS), (ir, (3, 6), IR)):
        want = sorted(p for group in reference_files(sysu_root, ids, cams) for p in group)
        assert images.paths == want and len(want) == sum(n_files(p, c) for p in ids for c in cams)
        assert images.modality == modality
        assert images.pids.dtype == np.int64 and images.camids.dtype == np.int64
        assert images.pids.tolist() == [int(p.split(os.sep)[-2]) for p in want]
        assert images.camids.tolist() == [int(p.split(os.sep)[-3][3:]) for p in want]
        assert set(images.pids.tolist()) == set(ids)            # train ∪ val
        assert all(os.path.isabs(p) for p in images.paths)
    assert set(vis.camids.tolist()) <= {1, 2, 4, 5} and set(ir.camids.tolist()) <= {3, 6}


def test_sysu_train_count_check(sysu_root):
    vis, ir = sysu_train(sysu_root, expected=None)
    good = {"ids": 5, "vis": len(vis), "ir": len(ir)}
    assert sysu_train(sysu_root, expected=good)[0].paths == vis.paths
    with pytest.raises(ValueError) as err:
        sysu_train(sysu_root)                                   # the real SYSU counts
    msg = str(err.value)
    for text in (f"found {len(vis)}, expected 22258", f"found {len(ir)}, expected 11909",
                 "found 5, expected 395", "5 Rank-1", "expected=None", "--allow-count-mismatch"):
        assert text in msg
    with pytest.raises(ValueError, match="expected must be None or a dict"):
        sysu_train(sysu_root, expected={"images": 3})


def test_sysu_train_missing_paths(sysu_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sysu_train(str(tmp_path / "nowhere"), expected=None)
    root = copy_of(sysu_root, tmp_path)
    os.remove(os.path.join(root, "exp", "val_id.txt"))
    with pytest.raises(FileNotFoundError, match="val_id.txt"):
        sysu_train(root, expected=None)
    shutil.rmtree(os.path.join(root, "cam5"))
    with pytest.raises(FileNotFoundError, match="cam5"):
        sysu_train(root, expected=None)


def test_sysu_train_bad_split_and_empty_id(sysu_root, tmp_path):
    root = copy_of(sysu_root, tmp_path)
    path = os.path.join(root, "exp", "train_id.txt")
    with open(path, "w") as f:
        f.write("1,2,x\n")
    with pytest.raises(ValueError, match="train_id.txt:1"):
        sysu_train(root, expected=None)
    with open(path, "w") as f:
        f.write("1,2,3,7\n")          # id 7 has no folder at all
    with pytest.raises(ValueError, match="training id 7 has no visible image"):
        sysu_train(root, expected=None)
    with pytest.raises(ValueError, match="visible id 7"):   # the count message lists it too
        sysu_train(root)


# ---------------------------------------------------------------- SYSU test protocol

def test_sysu_query_official_order(sysu_root):
    for mode in ("all", "indoor"):
        query, _ = sysu_test(sysu_root, mode=mode)
        want = [p for group in reference_files(sysu_root, sorted(TEST_IDS), (3, 6)) for p in group]
        assert query.paths == want and query.paths != sorted(want)   # id-major, not path order
        assert query.modality == IR and set(query.camids.tolist()) <= {3, 6}
        assert query.pids.tolist() == [int(p.split(os.sep)[-2]) for p in want]


def reference_gallery(root, mode, trial, shot):
    """The official draw: random.seed(trial), then choice / sample over sorted folder paths."""
    state = random.getstate()
    try:
        random.seed(trial)
        out = []
        for files in reference_files(root, sorted(TEST_IDS), GALLERY_CAMS[mode]):
            if shot == "single":
                out.append(random.choice(files))
            else:
                out += random.sample(files, min(10, len(files)))
        return out
    finally:
        random.setstate(state)


@pytest.mark.parametrize("shot", ["single", "multi"])
@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_sysu_gallery_matches_official_draw(sysu_root, mode, shot):
    draws = []
    for trial in range(4):
        _, gallery = sysu_test(sysu_root, mode=mode, trial=trial, shot=shot)
        assert gallery.paths == reference_gallery(sysu_root, mode, trial, shot)
        assert gallery.modality == VIS and set(gallery.camids.tolist()) <= set(GALLERY_CAMS[mode])
        assert gallery.pids.tolist() == [int(p.split(os.sep)[-2]) for p in gallery.paths]
        draws.append(gallery.paths)
    assert draws[0] != draws[1]                                  # trials differ
    folders = len(reference_files(sysu_root, TEST_IDS, GALLERY_CAMS[mode]))
    if shot == "single":
        assert len(draws[0]) == folders
    else:
        assert sum(p.split(os.sep)[-3:-1] == ["cam4", "0010"] for p in draws[0]) == (10 if mode == "all" else 0)


def test_sysu_gallery_candidates_consistent(sysu_root):
    all_cams = sysu_gallery_candidates(sysu_root, "all")
    indoor = sysu_gallery_candidates(sysu_root, "indoor")
    assert set(all_cams.camids.tolist()) == {1, 2, 4, 5} and set(indoor.camids.tolist()) == {1, 2}
    assert set(indoor.paths) < set(all_cams.paths)
    assert all_cams.paths == [p for g in reference_files(sysu_root, sorted(TEST_IDS), (1, 2, 4, 5)) for p in g]
    for trial in (0, 3):
        index = sysu_gallery_draw(all_cams, trial, "single")
        assert index.dtype == np.int64
        assert sysu_test(sysu_root, "all", trial)[1].paths == all_cams.subset(index).paths


def test_sysu_test_bad_arguments(sysu_root):
    for kwargs, text in (({"mode": "outdoor"}, "mode"), ({"shot": "few"}, "shot"),
                         ({"trial": -1}, "trial"), ({"trial": 1.5}, "trial"),
                         ({"trial": True}, "trial")):
        with pytest.raises(ValueError, match=text):
            sysu_test(sysu_root, **kwargs)
    with pytest.raises(ValueError, match="mode"):
        sysu_gallery_candidates(sysu_root, "outdoor")


def test_sysu_query_id_without_gallery_image(sysu_root, tmp_path):
    root = copy_of(sysu_root, tmp_path)
    for cam in (1, 2):
        shutil.rmtree(os.path.join(root, f"cam{cam}", "0011"), ignore_errors=True)
    assert len(sysu_test(root, "all")[1]) > 0                    # cams 4/5 still have id 11
    with pytest.warns(UserWarning, match="e.g. 11"):            # indoor: skipped as officially
        query, gallery = sysu_test(root, "indoor")
    assert 11 in query.pids and 11 not in gallery.pids
    for cam in (4, 5):
        shutil.rmtree(os.path.join(root, f"cam{cam}", "0011"), ignore_errors=True)
    with pytest.raises(ValueError, match="test id 11"):          # all-search: the copy is broken
        sysu_test(root, "all")
    shutil.rmtree(os.path.join(root, "cam6"))
    with pytest.raises(FileNotFoundError, match="cam6"):
        sysu_test(root, "all")


def test_read_image_corrupt_file(sysu_root, tmp_path):
    bad = str(tmp_path / "bad.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg at all")
    with pytest.raises(OSError, match="bad.jpg"):
        read_image(bad)
    vis, _ = sysu_train(sysu_root, expected=None)
    images = vis.subset([0, 1])
    images.paths[1] = bad
    dataset = ImageDataset(images, T.test_transform(8, 4))
    assert dataset[0][0].shape == (3, 8, 4) and dataset[0][1] == 0
    with pytest.raises(OSError, match="bad.jpg"):
        dataset[1]


# ---------------------------------------------------------------- RegDB

REGDB_IDS = {1: ([1, 2, 3], [4, 5]), 2: ([2, 4, 5], [1, 3])}   # trial -> (train ids, test ids)


@pytest.fixture(scope="module")
def regdb_root(tmp_path_factory):
    """Fake RegDB: 3 images per id and modality; index lines in a shuffled order."""
    root = str(tmp_path_factory.mktemp("regdb") / "RegDB")
    rng = np.random.default_rng(0)
    for folder, tag in (("Visible", "v"), ("Thermal", "t")):
        for pid in range(1, 6):
            os.makedirs(os.path.join(root, folder, str(pid)))
            for k in range(3):
                open(os.path.join(root, folder, str(pid), f"{tag}_{pid:02d}_{k}.bmp"), "wb").close()
    os.makedirs(os.path.join(root, "idx"))
    for trial, splits in REGDB_IDS.items():
        for split, ids in zip(("train", "test"), splits):
            for modality, folder, tag in (("visible", "Visible", "v"), ("thermal", "Thermal", "t")):
                lines = [f"{folder}/{pid}/{tag}_{pid:02d}_{k}.bmp {pid - 1}" for pid in ids for k in range(3)]
                lines = [lines[i] for i in rng.permutation(len(lines))]
                with open(os.path.join(root, "idx", f"{split}_{modality}_{trial}.txt"), "w") as f:
                    f.write("\n".join(lines) + "\n")
    return root


def read_index(root, name):
    with open(os.path.join(root, "idx", name)) as f:
        rows = [line.split() for line in f if line.strip()]
    return [os.path.join(root, r[0]) for r in rows], [int(r[1]) for r in rows]


@pytest.mark.parametrize("trial", [1, 2])
def test_regdb_train(regdb_root, trial):
    vis, ir = regdb_train(regdb_root, trial)
    for images, name, camid, modality in ((vis, "visible", 1, VIS), (ir, "thermal", 2, IR)):
        paths, labels = read_index(regdb_root, f"train_{name}_{trial}.txt")
        label_of = dict(zip(paths, labels))
        assert images.paths == sorted(paths) and paths != sorted(paths)
        assert images.pids.tolist() == [label_of[p] for p in images.paths]
        assert set(images.pids.tolist()) == {pid - 1 for pid in REGDB_IDS[trial][0]}
        assert images.camids.tolist() == [camid] * len(paths) and images.modality == modality


def test_regdb_test_directions(regdb_root):
    v_paths, v_labels = read_index(regdb_root, "test_visible_2.txt")
    t_paths, t_labels = read_index(regdb_root, "test_thermal_2.txt")
    query, gallery = regdb_test(regdb_root, 2, "v2t")
    assert query.paths == v_paths and query.pids.tolist() == v_labels and query.modality == VIS
    assert gallery.paths == t_paths and gallery.pids.tolist() == t_labels and gallery.modality == IR
    assert set(query.camids.tolist()) == {1} and set(gallery.camids.tolist()) == {2}
    query, gallery = regdb_test(regdb_root, 2, "t2v")
    assert query.paths == t_paths and query.modality == IR and gallery.paths == v_paths
    with pytest.raises(ValueError, match="direction"):
        regdb_test(regdb_root, 2, "v2v")


@pytest.mark.parametrize("trial", [0, 11, "x", 1.0, True])
def test_regdb_bad_trial(regdb_root, trial):
    with pytest.raises(ValueError, match=r"1\.\.10.*one model is trained per trial"):
        regdb_train(regdb_root, trial)
    with pytest.raises(ValueError, match=r"1\.\.10"):
        regdb_test(regdb_root, trial)


def test_regdb_missing_files(regdb_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        regdb_train(str(tmp_path / "nowhere"), 1)
    with pytest.raises(FileNotFoundError, match="train_visible_3.txt"):
        regdb_train(regdb_root, 3)
    root = copy_of(regdb_root, tmp_path)
    os.remove(os.path.join(root, "Thermal", "4", "t_04_1.bmp"))
    regdb_train(root, 1)                                          # id 4 is a test id in trial 1
    with pytest.raises(FileNotFoundError, match="t_04_1.bmp"):
        regdb_train(root, 2)


@pytest.mark.parametrize("line", ["Visible/1/v_01_0.bmp", "Visible/1/v_01_0.bmp  0",
                                  "Visible/1/v_01_0.bmp x", "Visible/1/v_01_0.bmp 0 extra"])
def test_regdb_malformed_line(regdb_root, tmp_path, line):
    root = copy_of(regdb_root, tmp_path)
    path = os.path.join(root, "idx", "train_visible_1.txt")
    with open(path) as f:
        lines = f.read().splitlines()
    lines[2] = line
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train_visible_1.txt:3: expected '<relative path> <integer label>'"):
        regdb_train(root, 1)


# ---------------------------------------------------------------- Datasets (data/loader.py)

@pytest.fixture(scope="module")
def small_sets(sysu_root):
    vis, ir = sysu_train(sysu_root, expected=None)
    return vis, ir, T.train_transforms(16, 8, stage=1, method="mult")


def test_train_batches_reference_and_workers(small_sets):
    vis, ir, transforms = small_sets
    rng = np.random.default_rng(0)
    batches = stage_one_batches(vis.pids % 3, ir.pids % 2, num_batches=3, clusters=2,
                                instances=3, rng=rng)                       # [3, 6, 2]
    dataset = TrainBatches(vis, ir, transforms, batches, seed=7)
    assert len(dataset) == 3
    item = dataset[1]
    for key in ("v0", "v1", "r"):
        assert item[key].shape == (6, 3, 16, 8) and item[key].dtype == torch.float32
    assert item["vis_index"].tolist() == batches[1, :, 0].tolist()
    assert item["ir_index"].tolist() == batches[1, :, 1].tolist()
    # the per-image generator rule, checked against a direct call
    j = 4
    img = read_image(vis.paths[batches[1, j, 0]])
    gen = np.random.default_rng([7, 1, j])
    assert torch.equal(item["v0"][j], transforms["v0"](img, gen))
    assert torch.equal(item["v1"][j], transforms["v1"](img, gen))
    img_ir = read_image(ir.paths[batches[1, j, 1]])
    assert torch.equal(item["r"][j], transforms["r"](img_ir, np.random.default_rng([7, 1, j, 1])))
    # worker count does not matter
    runs = [list(DataLoader(dataset, batch_size=None, num_workers=n)) for n in (0, 2)]
    for a, b in zip(*runs):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(TrainBatches(vis, ir, transforms, batches, seed=8)[1]["v0"], item["v0"])


def test_train_batches_bad_input(small_sets):
    vis, ir, transforms = small_sets
    good = np.zeros((2, 4, 2), dtype=np.int64)
    bad_rows = good.copy()
    bad_rows[1, 2, 1] = len(ir)
    for batches, text in ((good[..., 0], "num_batches, B, 2"), (good.astype(float), "integer"),
                          (bad_rows, "infrared rows")):
        with pytest.raises(ValueError, match=text):
            TrainBatches(vis, ir, transforms, batches, seed=0)
    with pytest.raises(ValueError, match="'v0', 'v1' and 'r'"):
        TrainBatches(vis, ir, {"v0": transforms["v0"]}, good, seed=0)
    with pytest.raises(ValueError, match="seed"):
        TrainBatches(vis, ir, transforms, good, seed=-1)
    with pytest.raises(IndexError):
        TrainBatches(vis, ir, transforms, good, seed=0)[2]
