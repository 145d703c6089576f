"""Tests for demo/synthetic.py: determinism, infrared encoding, identity signal, layouts, caching."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo import synthetic as S
from data.common import IR, VIS

SMALL = dict(num_ids=20, images_per_cam=2, height=64, width=32, seed=0)


def _hashes(root):
    root = Path(root)
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def sysu(tmp_path_factory):
    out = tmp_path_factory.mktemp("sysu") / "SYSU-MM01"
    return out, S.render_sysu(out, **SMALL)


def test_same_arguments_same_bytes_other_seed_differs(sysu, tmp_path):
    out, _ = sysu
    again = S.render_sysu(tmp_path / "again", **SMALL)
    assert again == json.loads((out / S.META).read_text())
    assert _hashes(out) == _hashes(tmp_path / "again")
    S.render_sysu(tmp_path / "seed1", **{**SMALL, "seed": 1})
    mine, other = _hashes(out), _hashes(tmp_path / "seed1")
    common = [k for k in other if k.endswith(".jpg") and k in mine]
    assert len(common) > 100 and all(other[k] != mine[k] for k in common)


def test_more_ids_or_images_leave_existing_images_unchanged(tmp_path):
    S.render_sysu(tmp_path / "a", num_ids=6, images_per_cam=2, height=64, width=32, seed=3)
    S.render_sysu(tmp_path / "b", num_ids=9, images_per_cam=3, height=64, width=32, seed=3)
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    shared = [k for k in a if k.endswith(".jpg") and k in b]
    assert len(shared) > 40 and all(a[k] == b[k] for k in shared)


def test_infrared_decodes_to_three_equal_channels_visible_does_not(sysu):
    out, _ = sysu
    ir_files = sorted(out.glob("cam[36]/*/*.jpg"))
    vis_files = sorted(out.glob("cam[1245]/*/*.jpg"))
    assert len(ir_files) > 40 and len(vis_files) > 80
    for f in ir_files:
        x = _pixels(f)
        assert x.shape == (64, 32, 3)
        assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]), f
    for f in vis_files:
        x = _pixels(f).astype(int)
        assert np.abs(x[..., 0] - x[..., 1]).mean() > 2 or np.abs(x[..., 1] - x[..., 2]).mean() > 2


def test_identity_signal_stronger_than_per_image_nuisance():
    """Within one camera, 4x4-pooled pixels: (a) a different identity is further away than the
    same identity seen in another image (mean absolute difference, views drawn independently);
    (b) the nearest neighbour among 12 ids x 3 images is nearly always the same identity."""
    ids = [S.draw_identity(0, p) for p in range(1, 13)]
    for cam, modality in ((1, VIS), (3, IR)):
        camera = S.draw_camera(0, cam, modality)
        x = []
        for i, ident in enumerate(ids):
            for k in range(3):
                rng = np.random.default_rng([i, k])
                img = S.render_image(ident, camera, S.draw_view(rng), rng, 64, 32).astype(float)
                x.append(img.reshape(16, 4, 8, 4, 3).mean(axis=(1, 3)).ravel())
        x, pid = np.array(x), np.repeat(np.arange(12), 3)
        dist = np.array([[np.abs(a - b).mean() for b in x] for a in x])     # slow and plain
        same = pid[:, None] == pid[None, :]
        off_diag = ~np.eye(len(x), dtype=bool)
        assert dist[~same].mean() > 1.3 * dist[same & off_diag].mean(), cam
        np.fill_diagonal(dist, np.inf)
        assert (pid[dist.argmin(axis=1)] == pid).mean() >= 0.85, cam


def test_raw_pixels_match_within_visible_but_not_across_modalities(sysu):
    """Nearest neighbour on 32x16 grey pixels (centred, unit norm), gallery from another camera:
    visible->visible must be clearly better than infrared->visible (the modality gap is real)."""
    out, _ = sysu
    files = sorted(out.glob("cam*/*/*.jpg"))
    cam = np.array([int(f.parent.parent.name[3:]) for f in files])
    pid = np.array([int(f.parent.name) for f in files])
    x = np.array([np.asarray(Image.open(f).convert("L").resize((16, 32)), float).ravel()
                  for f in files])
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    is_ir = np.isin(cam, [3, 6])

    def accuracy(query, gallery):
        hits = []
        for q in np.flatnonzero(query):
            g = np.flatnonzero(gallery & (cam != cam[q]))
            hits.append(pid[g[np.argmax(x[g] @ x[q])]] == pid[q])
        return np.mean(hits)
    within, across = accuracy(~is_ir, ~is_ir), accuracy(is_ir, ~is_ir)
    assert within > 0.25 and across < 0.15 and within > 3 * across, (within, across)


def test_infrared_follows_luminance_only_in_part():
    lum, ir = [], []
    for pid in range(1, 1501):
        g = S.draw_identity(5, pid)
        for part in ("upper", "lower"):
            for c in ("a", "b"):
                lum.append(g[part][c][:3] @ [0.299, 0.587, 0.114])
                ir.append(g[part][c][3])
    lum, ir = np.array(lum), np.array(ir)
    w = S.NIR_FROM_LUMA
    assert 0 < w < 1
    own = (ir - w * (0.1 + 0.8 * lum)) / (1 - w)       # the garment's own reflectance
    assert own.min() >= 0.05 - 1e-9 and own.max() <= 1.4 + 1e-9 and np.ptp(own) > 0.7
    assert abs(np.corrcoef(lum, own)[0, 1]) < 0.05     # drawn independently of the colour
    assert 0.5 < np.corrcoef(lum, ir)[0, 1] < 0.99     # so luminance predicts infrared only in part


def test_split_sizes_hand_checked():
    assert S._split_sizes(100) == (55, 15, 30)
    assert S._split_sizes(6) == (3, 1, 2)
    assert S._split_sizes(3) == (1, 1, 1)


def test_sysu_layout_counts_and_missing_folders(tmp_path):
    out = tmp_path / "sysu"
    meta = S.render_sysu(out, num_ids=60, images_per_cam=2, height=16, width=8, seed=2)
    assert sorted(p.name for p in out.iterdir()) == [f"cam{c}" for c in range(1, 7)] + [
        "exp", S.META]
    assert sorted(p.name for p in (out / "exp").iterdir()) == [
        "test_id.txt", "train_id.txt", "val_id.txt"]
    split = {}
    for name in ("train", "val", "test"):
        lines = (out / "exp" / f"{name}_id.txt").read_text().splitlines()
        assert len(lines) == 1
        split[name] = [int(t) for t in lines[0].split(",")]
    assert [len(split[n]) for n in ("train", "val", "test")] == [33, 9, 18]
    assert sorted(sum(split.values(), [])) == list(range(1, 61))         # each id exactly once
    present = {}
    for c in range(1, 7):
        for d in (out / f"cam{c}").iterdir():
            assert d.name == f"{int(d.name):04d}" and 1 <= int(d.name) <= 60
            assert sorted(f.name for f in d.iterdir()) == ["0001.jpg", "0002.jpg"]
            present.setdefault(int(d.name), set()).add(c)
    for p in range(1, 61):
        assert present[p] & {1, 2, 4, 5} and present[p] & {3, 6}, p
        if p in split["test"]:
            assert present[p] & {1, 2}, p
    missing = sorted(f"cam{c}/{p:04d}" for p in range(1, 61) for c in range(1, 7)
                     if c not in present[p])
    assert sorted(meta["missing_folders"]) == missing
    assert 0.04 <= sum(c not in present[p] for p in present for c in (1, 2, 4, 5)) / 240 <= 0.16
    train = sorted(split["train"] + split["val"])                   # the SYSU loader's rule
    count = lambda cams: sum(len(list((out / f"cam{c}" / f"{p:04d}").glob("*.jpg")))
                             for p in train for c in cams if c in present[p])
    assert meta["train_counts"] == dict(ids=42, vis=count([1, 2, 4, 5]), ir=count([3, 6]))
    assert meta["splits"] == dict(train=33, val=9, test=18)
    assert json.loads((out / S.META).read_text()) == meta


def test_regdb_layout(tmp_path):
    out = tmp_path / "RegDB"
    meta = S.render_regdb(out, num_ids=6, height=32, width=16, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["Thermal", "Visible", "idx", S.META]
    for folder in ("Visible", "Thermal"):
        assert sorted(int(d.name) for d in (out / folder).iterdir()) == list(range(1, 7))
        assert all(len(list(d.glob("*.jpg"))) == 10 for d in (out / folder).iterdir())
    assert len(list((out / "idx").iterdir())) == 40
    splits = set()
    for t in range(1, 11):
        ids = {}
        for part in ("train", "test"):
            per_mod = []
            for name, folder in (("visible", "Visible"), ("thermal", "Thermal")):
                lines = (out / "idx" / f"{part}_{name}_{t}.txt").read_text().splitlines()
                pairs = [line.split(" ") for line in lines]
                assert all(len(p) == 2 and (out / p[0]).is_file() for p in pairs)
                pids = [int(p[0].split("/")[1]) for p in pairs]
                assert all(p[0].startswith(f"{folder}/") for p in pairs)
                assert [int(p[1]) for p in pairs] == [q - 1 for q in pids]
                assert all(pids.count(q) == 10 for q in set(pids))
                per_mod.append(sorted(set(pids)))
            assert per_mod[0] == per_mod[1]
            ids[part] = per_mod[0]
        assert len(ids["train"]) == len(ids["test"]) == 3
        assert sorted(ids["train"] + ids["test"]) == list(range(1, 7))
        splits.add(tuple(ids["train"]))
    assert len(splits) == 10                                        # ten different trials
    ir = _pixels(out / "Thermal" / "4" / "synth_t_00003_4.jpg")
    assert np.array_equal(ir[..., 0], ir[..., 2])
    assert meta["train_counts"] == dict(ids=3, vis=30, ir=30) and meta["trials"] == 10


def test_ensure_synthetic_renders_only_when_arguments_change(tmp_path):
    out = tmp_path / "syn"
    args = dict(num_ids=4, images_per_cam=1, height=16, width=8)
    first = S.ensure_synthetic(out, **args)
    stamp = (out / S.META).stat().st_mtime_ns
    (out / "sentinel").write_text("kept if not re-rendered")
    assert S.ensure_synthetic(out, seed=0, **args) == first         # defaults filled in
    assert (out / "sentinel").exists() and (out / S.META).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="sentinel"):       # a file it did not write: refused
        S.ensure_synthetic(out, **{**args, "images_per_cam": 2})
    assert (out / "sentinel").read_text() == "kept if not re-rendered"
    (out / "sentinel").unlink()
    changed = S.ensure_synthetic(out, **{**args, "images_per_cam": 2})
    assert changed["args"]["images_per_cam"] == 2 and changed["train_counts"]["vis"] > 0
    regdb = S.ensure_synthetic(out, layout="regdb", num_ids=4, height=16, width=8)
    assert regdb["layout"] == "regdb" and (out / "idx").is_dir() and not (out / "cam1").exists()


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="num_ids"):
        S.render_sysu(tmp_path / "a", num_ids=2)
    with pytest.raises(TypeError, match="height"):
        S.render_sysu(tmp_path / "a", height="64")
    with pytest.raises(TypeError, match="images_per_cam"):
        S.ensure_synthetic(tmp_path / "a", layout="regdb", images_per_cam=3)
    with pytest.raises(ValueError, match="layout"):
        S.ensure_synthetic(tmp_path / "a", layout="market")
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("a real dataset")
    with pytest.raises(FileExistsError, match="real"):
        S.render_sysu(real, num_ids=4, images_per_cam=1, height=16, width=8)
    assert (real / "keep.txt").read_text() == "a real dataset"
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path / "b"), "--regdb", "--images-per-cam", "3"])


@pytest.mark.parametrize("flags, named", [(["--images-per-cam", "0"], "--images-per-cam"),
                                          (["--ids", "1"], "--ids"), (["--height", "4"], "--height")])
def test_cli_refuses_bad_sizes_by_flag(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exit:
        S.main(["--out", str(tmp_path / "c"), *flags])
    assert exit.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_rerender_only_over_a_set_it_wrote(tmp_path):
    """A folder is replaced only if every file in it is listed in its synthetic.json."""
    out = tmp_path / "syn"
    S.render_sysu(out, num_ids=4, images_per_cam=1, height=16, width=8)
    meta = json.loads((out / S.META).read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != S.META)
    assert meta["files"] == on_disk
    (out / "cam1" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        S.render_sysu(out, num_ids=4, images_per_cam=2, height=16, width=8)
    assert (out / "cam1" / "notes.txt").read_text() == "mine"
    assert json.loads((out / S.META).read_text()) == meta                       # nothing re-rendered
    old = dict(meta)
    del old["files"]                                                             # a set of an older version
    (out / "cam1" / "notes.txt").unlink()
    (out / S.META).write_text(json.dumps(old))
    with pytest.raises(FileExistsError, match="lists no files"):
        S.render_sysu(out, num_ids=4, images_per_cam=2, height=16, width=8)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != S.META) == on_disk


def test_cli_writes_and_reports(tmp_path, capsys):
    S.main(["--out", str(tmp_path / "cli"), "--ids", "4", "--images-per-cam", "1",
            "--height", "16", "--width", "8", "--seed", "7"])
    text = capsys.readouterr().out
    meta = json.loads((tmp_path / "cli" / S.META).read_text())
    assert meta["args"] == dict(num_ids=4, images_per_cam=1, height=16, width=8, seed=7)
    assert "train:" in text and " s" in text
