"""LLCM: the reader (data/llcm.py) on tiny hand-written and rendered layouts, the metric against a slow
per-query reference, the protocol runner and the CLI end to end."""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import metrics
import features
import evaluate as ev
from plumbing import reports
from data.common import IR, VIS
from data.llcm import (DIRECTIONS, IR_CAMS, LLCM_TRAIN_COUNTS, VIS_CAMS, llcm_gallery_candidates,
                       llcm_test, llcm_train)
from demo.synthetic import META, ensure_synthetic, render_llcm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_IDS = [7, 3, 5]                  # written unsorted; id 9 has folders but is not a test id
TRAIN = {VIS: [("train/vis/cam2/0002/b.jpg", 1), ("train/vis/cam1/0001/a.jpg", 0),
               ("train/vis/cam9/0002/a.jpg", 1), ("train/other/x.jpg", 4)],
         IR: [("train/nir/cam4/0001/a.jpg", 0), ("train/nir/cam1/0002/c.jpg", 1)]}


def n_files(pid, modality, cam):
    """Images in test_{vis,nir}/cam{cam}/{pid:04d}/ of the hand-written layout (0 = no folder)."""
    if modality == IR and cam == 3:
        return 0
    return (pid * 5 + cam * 3 + 2 * modality) % 4


def write_image(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def llcm_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("llcm") / "LLCM")
    for modality, folder, cams in ((VIS, "test_vis", VIS_CAMS), (IR, "test_nir", range(1, 10))):
        for cam in cams:
            os.makedirs(os.path.join(root, folder, f"cam{cam}"))
            for pid in TEST_IDS + [9]:
                for k in reversed(range(n_files(pid, modality, cam))):    # created in reverse order
                    write_image(os.path.join(root, folder, f"cam{cam}", f"{pid:04d}", f"{k:04d}.jpg"),
                                pid * 100 + cam * 10 + k + 1000 * modality)
    # what the readers must skip: hidden files, resource forks, notes, an empty infrared cam3
    for rel in ("test_vis/.DS_Store", "test_vis/cam1/0003/.DS_Store", "test_vis/cam1/0003/._0000.jpg",
                "test_nir/cam2/0005/notes.txt", "test_nir/cam3/.DS_Store"):
        with open(os.path.join(root, rel), "w") as f:
            f.write("not an image")
    os.makedirs(os.path.join(root, "idx"))
    for modality, name in ((VIS, "train_vis.txt"), (IR, "train_nir.txt")):
        lines = []
        for k, (rel, label) in enumerate(TRAIN[modality]):
            write_image(os.path.join(root, rel), 5000 + k)
            lines.append(f"{rel} {label}\n" + ("\n" if k == 1 else ""))    # a blank line is tolerated
        with open(os.path.join(root, "idx", name), "w") as f:
            f.writelines(lines)
    with open(os.path.join(root, "idx", "test_id.txt"), "w") as f:
        f.write(",".join(map(str, TEST_IDS)) + "\n")
    return root


def copy_of(root, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(root, dst)
    return dst


def reference_groups(root, modality):
    """Slow reference: the sorted image files of every (test id, camera) folder, official order."""
    folder, cams = ("test_vis", VIS_CAMS) if modality == VIS else ("test_nir", IR_CAMS)
    groups = []
    for pid in sorted(TEST_IDS):
        for cam in cams:
            d = os.path.join(root, folder, f"cam{cam}", f"{pid:04d}")
            if os.path.isdir(d):
                names = sorted(n for n in os.listdir(d) if n.endswith(".jpg") and not n.startswith("."))
                if names:
                    groups.append([os.path.join(d, n) for n in names])
    return groups


def reference_draw(root, modality, trial):
    """The official draw: random.seed(trial) once, then random.choice per folder, in order."""
    state = random.getstate()
    try:
        random.seed(trial)
        return [random.choice(files) for files in reference_groups(root, modality)]
    finally:
        random.setstate(state)


# ----------------------------------------------------------------------------- training lists
def test_llcm_train_rows_and_counts(llcm_root):
    vis, ir = llcm_train(llcm_root, expected=None)
    for images, modality in ((vis, VIS), (ir, IR)):
        want = sorted(os.path.join(llcm_root, rel) for rel, _ in TRAIN[modality])
        assert images.paths == want and images.modality == modality
        labels = dict((os.path.join(llcm_root, rel), lab) for rel, lab in TRAIN[modality])
        assert images.pids.tolist() == [labels[p] for p in want]
    assert vis.camids.tolist() == [0, 1, 2, 9] and ir.camids.tolist() == [1, 4]   # 0: no camN folder
    good = {"ids": 3, "vis": 4, "ir": 2}                                 # labels {0, 1, 4}
    assert llcm_train(llcm_root, expected=good)[0].paths == vis.paths
    with pytest.raises(ValueError) as err:
        llcm_train(llcm_root)                                            # the official counts
    for text in ("found 4, expected 16946", "found 2, expected 13975", "found 3, expected 713",
                 "expected=None", "--allow-count-mismatch"):
        assert text in str(err.value)
    assert LLCM_TRAIN_COUNTS == {"ids": 713, "vis": 16946, "ir": 13975}
    with pytest.raises(ValueError, match="expected must be None or a dict"):
        llcm_train(llcm_root, expected={"images": 3})


@pytest.mark.parametrize("line", ["train/vis/cam1/0001/a.jpg", "train/vis/cam1/0001/a.jpg x",
                                  "a.jpg 1 2", "train/vis/cam1/0001/a.jpg 1.5"])
def test_llcm_train_malformed_line(llcm_root, tmp_path, line):
    root = copy_of(llcm_root, tmp_path)
    path = os.path.join(root, "idx", "train_vis.txt")
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=r"train_vis.txt:6: expected '<path relative to the LLCM root> "
                                         r"<integer label>'"):
        llcm_train(root, expected=None)


def test_llcm_train_missing_files(llcm_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="LLCM root not found.*nowhere"):
        llcm_train(str(tmp_path / "nowhere"), expected=None)
    root = copy_of(llcm_root, tmp_path)
    os.remove(os.path.join(root, "train", "nir", "cam4", "0001", "a.jpg"))
    with pytest.raises(FileNotFoundError, match=r"cam4/0001/a.jpg \(listed in .*train_nir.txt; 1 of 2"):
        llcm_train(root, expected=None)
    os.remove(os.path.join(root, "idx", "train_nir.txt"))
    with pytest.raises(FileNotFoundError, match="index file not found: .*train_nir.txt"):
        llcm_train(root, expected=None)
    with open(os.path.join(root, "idx", "train_nir.txt"), "w") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="train_nir.txt lists no image"):
        llcm_train(root, expected=None)


# ----------------------------------------------------------------------------- test protocol
def test_llcm_query_official_order(llcm_root):
    query, gallery = llcm_test(llcm_root, "i2v", 0)
    want = [p for group in reference_groups(llcm_root, IR) for p in group]
    assert query.paths == want and query.paths != sorted(want)          # id-major, not path order
    assert query.modality == IR and gallery.modality == VIS
    assert set(query.camids.tolist()) <= set(IR_CAMS) and 3 not in query.camids
    assert query.pids.tolist() == [int(p.split(os.sep)[-2]) for p in want]
    assert query.camids.tolist() == [int(p.split(os.sep)[-3][3:]) for p in want]
    assert 9 not in query.pids and not any(os.path.basename(p).startswith(".") for p in query.paths)
    query, gallery = llcm_test(llcm_root, "v2i", 0)
    assert query.paths == [p for group in reference_groups(llcm_root, VIS) for p in group]
    assert query.modality == VIS and gallery.modality == IR


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_llcm_draw_matches_official_and_is_deterministic(llcm_root, direction):
    sampled = IR if direction != "i2v" else VIS
    draws = []
    for trial in range(4):
        query, gallery = llcm_test(llcm_root, direction, trial)
        drawn, every = (query, gallery) if direction == "v2i_transposed" else (gallery, query)
        assert drawn.paths == reference_draw(llcm_root, sampled, trial) and drawn.modality == sampled
        assert every.paths == [p for g in reference_groups(llcm_root, 1 - sampled) for p in g]
        assert llcm_test(llcm_root, direction, trial)[0].paths == query.paths     # same trial, same draw
        draws.append(drawn.paths)
    assert len(set(map(tuple, draws))) > 1                                # trials differ
    assert len(draws[0]) == len(reference_groups(llcm_root, sampled))     # one per (id, camera) folder
    candidates = llcm_gallery_candidates(llcm_root, direction)
    assert candidates.paths == [p for g in reference_groups(llcm_root, sampled) for p in g]
    assert set(draws[2]) <= set(candidates.paths)


def test_llcm_camera_folders_outside_the_protocol(llcm_root, tmp_path):
    root = copy_of(llcm_root, tmp_path)
    os.makedirs(os.path.join(root, "test_vis", "cam10"))
    with pytest.raises(ValueError, match=r"test_vis/cam10 is not a camera of the protocol.*cam1, cam2"):
        llcm_test(root, "i2v", 0)
    shutil.rmtree(os.path.join(root, "test_vis", "cam10"))
    write_image(os.path.join(root, "test_nir", "cam3", "0003", "0000.jpg"), 1)
    with pytest.raises(ValueError, match=r"test_nir/cam3 is not a camera of the protocol.*infrared"):
        llcm_test(root, "v2i", 0)
    shutil.rmtree(os.path.join(root, "test_nir", "cam3"))               # no cam3 folder: fine
    assert len(llcm_test(root, "v2i", 0)[1]) > 0
    shutil.rmtree(os.path.join(root, "test_vis", "cam5"))
    with pytest.raises(FileNotFoundError, match=r"camera folder not found: .*test_vis/cam5"):
        llcm_test(root, "i2v", 0)


def test_llcm_test_bad_inputs(llcm_root, tmp_path):
    for kwargs, text in (({"direction": "ir2vis"}, "direction"), ({"trial": -1}, "trial"),
                         ({"trial": 1.5}, "trial")):
        with pytest.raises(ValueError, match=text):
            llcm_test(llcm_root, **kwargs)
    root = copy_of(llcm_root, tmp_path)
    with open(os.path.join(root, "idx", "test_id.txt"), "w") as f:
        f.write("3,x,5\n")
    with pytest.raises(ValueError, match="test_id.txt:1: expected integer ids .*'x'"):
        llcm_test(root)
    os.remove(os.path.join(root, "idx", "test_id.txt"))
    with pytest.raises(FileNotFoundError, match="test_id.txt"):
        llcm_test(root)
    shutil.rmtree(os.path.join(root, "test_nir"))
    with pytest.raises(FileNotFoundError, match="test folder not found: .*test_nir"):
        llcm_gallery_candidates(root, "v2i")


# ----------------------------------------------------------------------------- metric
def reference_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Per query, with plain lists: rank by np.argsort, drop same id AND same camera, distinct-id CMC
    summed over all queries and divided by the valid ones (the official quirk), AP / INP."""
    order = np.argsort(distmat, axis=1)
    cmc_sum, aps, inps = np.zeros(max_rank), [], []
    for i in range(len(q_pids)):
        kept = [int(j) for j in order[i] if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        hits = [r + 1 for r, j in enumerate(kept) if g_pids[j] == q_pids[i]]
        distinct = []
        for j in kept:
            if g_pids[j] not in distinct:
                distinct.append(g_pids[j])
        curve = np.zeros(max_rank)
        if q_pids[i] in distinct:
            curve[distinct.index(q_pids[i]):] = 1
        cmc_sum += curve                              # invalid queries add zeros
        if hits:
            aps.append(sum((t + 1) / p for t, p in enumerate(hits)) / len(hits))
            inps.append(len(hits) / hits[-1])
    return cmc_sum / len(aps), np.mean(aps), np.mean(inps), len(aps)


@pytest.mark.parametrize("seed,num_q,num_g,num_ids", [(0, 40, 30, 6), (1, 25, 70, 15), (2, 9, 150, 40)])
def test_eval_llcm_matches_reference(seed, num_q, num_g, num_ids, monkeypatch):
    monkeypatch.setattr(metrics, "QUERY_BLOCK", 8)
    rng = np.random.default_rng(seed)
    d = rng.integers(0, 5, (num_q, num_g)).astype(np.float64)          # many exact ties
    g_pids, q_pids = rng.integers(0, num_ids, num_g), rng.integers(0, num_ids + 2, num_q)
    g_cams, q_cams = rng.integers(1, 4, num_g), rng.integers(1, 4, num_q)   # few cameras: many drops
    for max_rank in (1, 5, 20):
        got = metrics.eval_llcm(d, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, return_valid=True)
        cmc, m_ap, m_inp, n_valid = reference_llcm(d, q_pids, g_pids, q_cams, g_cams, max_rank)
        np.testing.assert_allclose(got[0], cmc, rtol=0, atol=1e-12)
        assert abs(got[1] - m_ap) < 1e-12 and abs(got[2] - m_inp) < 1e-12 and got[3] == n_valid
        assert 0 < n_valid < num_q                                     # the case skips queries


def test_eval_llcm_hand_checked():
    # gallery:  0      1      2      3      4          query: id 1, camera 2
    # id, cam:  (1,2)  (2,1)  (1,4)  (3,2)  (1,2)      distances 0..4
    # kept list (same id AND camera dropped): 1 (id 2), 2 (id 1), 3 (id 3); a hit at p = 2
    #   AP = 1/2, INP = 1/2; distinct ids 2 1 3 -> rank 2
    # query 2: id 1, camera 4: drops gallery 2 only; hits at p = 1, 4 -> AP (1 + 2/4) / 2, INP 2/4
    # query 3: id 2, camera 1: its only match is in its own camera -> no match, skipped
    d = np.tile(np.arange(5.0), (3, 1))
    g_pids, g_cams = np.array([1, 2, 1, 3, 1]), np.array([2, 1, 4, 2, 2])
    cmc, m_ap, m_inp, n_valid = metrics.eval_llcm(d, np.array([1, 1, 2]), g_pids, np.array([2, 4, 1]), g_cams,
                                             max_rank=4, return_valid=True)
    np.testing.assert_allclose(cmc, [0.5, 1, 1, 1])
    assert m_ap == pytest.approx((0.5 + 0.75) / 2) and m_inp == pytest.approx((0.5 + 0.5) / 2)
    assert n_valid == 2
    with pytest.raises(ValueError, match="none of the 1 queries"):
        metrics.eval_llcm(d[:1], np.array([2]), g_pids, np.array([1]), g_cams)
    with pytest.raises(ValueError, match="g_camids"):
        metrics.eval_llcm(d, np.array([1, 1, 2]), g_pids, np.array([2, 4, 1]), g_cams[:3])


# ----------------------------------------------------------------------------- rendered layout, runner, CLI
@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic") / "llcm")
    return root, render_llcm(root, num_ids=6, images_per_cam=1, height=32, width=16)


def test_rendered_llcm_reads_through_the_real_loader(rendered):
    root, meta = rendered
    assert meta["layout"] == "llcm" and meta["splits"] == {"train": 4, "test": 2}
    vis, ir = llcm_train(root, expected=meta["train_counts"])
    assert (len(vis), len(ir)) == (meta["train_counts"]["vis"], meta["train_counts"]["ir"])
    assert set(vis.camids.tolist()) <= set(VIS_CAMS) and set(ir.camids.tolist()) <= set(IR_CAMS)
    cam3 = os.path.join(root, "test_nir", "cam3")
    assert os.path.isdir(cam3) and not os.listdir(cam3)                # the empty infrared camera 3
    query, gallery = llcm_test(root, "i2v", 0)
    assert len(query) == meta["test_counts"]["ir"] and 3 not in query.camids
    assert len(llcm_gallery_candidates(root, "i2v")) == meta["test_counts"]["vis"]
    assert ensure_synthetic(root, layout="llcm", num_ids=6, images_per_cam=1, height=32, width=16) == meta
    assert json.loads(open(os.path.join(root, META)).read())["train_counts"] == meta["train_counts"]


class CountingModel:
    def __init__(self):
        self.seen = 0

    def __call__(self, x, modality):
        self.seen += x.shape[0]
        return features.pixel_model(x, modality)


def test_evaluate_llcm_runner(rendered):
    root, meta = rendered
    model = CountingModel()
    res = ev.evaluate_llcm(model, root, directions=DIRECTIONS, trials=[0, 1], height=32, width=16)
    test = meta["test_counts"]
    assert model.seen == 2 * (test["vis"] + test["ir"])                  # every test image once (+ flip)
    assert list(res) == list(DIRECTIONS) and res["i2v"]["protocol"] == "llcm"
    for direction in DIRECTIONS:
        query, gallery = llcm_test(root, direction, 1)
        q = features.extract_features(features.pixel_model, query, 32, 16)
        g = features.extract_features(features.pixel_model, gallery, 32, 16)
        cmc, m_ap, m_inp = metrics.eval_llcm(metrics.pairwise_distance(q, g), query.pids, gallery.pids,
                                        query.camids, gallery.camids)
        row = res[direction]["trials"][1]
        assert (row["num_query"], row["num_gallery"]) == (len(query), len(gallery))
        np.testing.assert_allclose([row["R1"], row["mAP"], row["mINP"]],
                                   [100 * cmc[0], 100 * m_ap, 100 * m_inp], atol=1e-4)
    assert res["i2v"]["trials"][0]["num_query"] == test["ir"]
    assert res["v2i_transposed"]["trials"][0]["num_gallery"] == test["vis"]
    assert "LLCM IR->VIS" in reports.format_table(res) and "LLCM VIS->IR transposed" in reports.format_table(res)
    with pytest.raises(ValueError, match="directions"):
        ev.evaluate_llcm(model, root, directions=["t2v"])


def test_cli_llcm_end_to_end(rendered, tmp_path, capsys):
    root, _ = rendered
    out = tmp_path / "out"
    res = ev.main(["--dataset", "llcm", "--model", "pixels", "--data-root", root, "--trials", "0-2",
                   "--height", "32", "--width", "16", "--device", "cpu", "--workers", "0",
                   "--out", str(out)])
    assert list(res) == ["i2v", "v2i"] and [r["trial"] for r in res["i2v"]["trials"]] == [0, 1, 2]
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(res)) and saved["args"]["dataset"] == "llcm"
    assert "LLCM VIS->IR" in capsys.readouterr().out
    only = ev.main(["--dataset", "llcm", "--model", "pixels", "--data-root", root, "--trials", "0",
                    "--direction", "v2i_transposed", "--height", "32", "--width", "16", "--workers", "0"])
    assert list(only) == ["v2i_transposed"]
    with pytest.raises(SystemExit, match="--direction applies to --dataset llcm"):
        ev.main(["--dataset", "sysu", "--model", "pixels", "--direction", "i2v"])


def test_cli_bad_input_is_one_sentence(tmp_path):
    """The command line prints one sentence naming the folder, never a traceback."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--dataset", "llcm",
                           "--model", "pixels", "--data-root", str(tmp_path / "missing"), "--workers", "0"],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "LLCM root not found" in proc.stderr and str(tmp_path / "missing") in proc.stderr


def test_synthetic_cli_llcm(tmp_path, capsys):
    from demo import synthetic as S
    S.main(["--out", str(tmp_path / "cli"), "--llcm", "--ids", "4", "--images-per-cam", "1",
            "--height", "16", "--width", "8", "--seed", "3"])
    meta = json.loads((tmp_path / "cli" / META).read_text())
    assert meta["layout"] == "llcm" and meta["args"] == dict(num_ids=4, images_per_cam=1, height=16, width=8,
                                                             seed=3)
    assert "wrote llcm layout" in capsys.readouterr().out
    assert llcm_train(str(tmp_path / "cli"), expected=meta["train_counts"])[0].modality == VIS
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path / "x"), "--llcm", "--regdb"])
