"""Tests for evaluate.py: protocol metrics against a slow per-query reference and hand-checked
cases, feature extraction (flip averaging), the protocols, saved features, the CLI, and reports.py:
rank lists and their pictures, the tables of one run and across runs."""
import json
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import metrics
import features
import evaluate as ev
from plumbing import reports
from data.common import IR, VIS, ImageList, read_image
from demo.synthetic import render_regdb, render_sysu
from data.sysu import sysu_gallery_candidates, sysu_test
from data.transforms import test_transform


# ----------------------------------------------------------------------------- slow reference
def reference_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, sysu):
    """Per query, with plain lists: rank by np.argsort, drop cam-2 images for cam-3 queries
    (SYSU), CMC over distinct ids (SYSU) or the full list (RegDB), AP and INP from hit ranks."""
    order = np.argsort(distmat, axis=1)
    cmcs, aps, inps = [], [], []
    for i in range(len(q_pids)):
        ranked = [int(j) for j in order[i]
                  if not (sysu and q_camids[i] == 3 and g_camids[j] == 2)]
        hits = [r + 1 for r, j in enumerate(ranked) if g_pids[j] == q_pids[i]]
        if not hits:
            continue
        n = len(hits)
        aps.append(sum((t + 1) / p for t, p in enumerate(hits)) / n)
        inps.append(n / hits[-1])
        if sysu:
            distinct = []
            for j in ranked:
                if g_pids[j] not in distinct:
                    distinct.append(g_pids[j])
            rank = distinct.index(q_pids[i]) + 1
        else:
            rank = hits[0]
        cmcs.append([1.0 if rank <= k else 0.0 for k in range(1, max_rank + 1)])
    cmc = [sum(c[k] for c in cmcs) / len(cmcs) for k in range(max_rank)]
    return np.array(cmc), sum(aps) / len(aps), sum(inps) / len(inps), len(cmcs)


def random_case(seed, num_q, num_g, num_ids):
    rng = np.random.default_rng(seed)
    distmat = rng.integers(0, 6, size=(num_q, num_g)).astype(np.float64)   # many exact ties
    g_pids = rng.integers(0, num_ids, num_g)
    q_pids = rng.integers(0, num_ids + 3, num_q)          # some ids absent from the gallery
    q_camids = rng.choice([3, 6], num_q)
    g_camids = rng.choice([1, 2, 4, 5], num_g)
    return distmat, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize("seed,num_q,num_g,num_ids", [(0, 40, 30, 8), (1, 25, 60, 20),
                                                      (2, 60, 12, 5), (3, 7, 200, 50)])
@pytest.mark.parametrize("max_rank", [1, 5, 20])
def test_metrics_match_reference(seed, num_q, num_g, num_ids, max_rank, monkeypatch):
    monkeypatch.setattr(metrics, "QUERY_BLOCK", 16)      # several query blocks, one partial
    d, qp, gp, qc, gc = random_case(seed, num_q, num_g, num_ids)
    for sysu in (True, False):
        if sysu:
            got = metrics.eval_sysu(d, qp, gp, qc, gc, max_rank=max_rank, return_valid=True)
        else:
            got = metrics.eval_regdb(d, qp, gp, max_rank=max_rank, return_valid=True)
        cmc, m_ap, m_inp, n_valid = reference_metrics(d, qp, gp, qc, gc, max_rank, sysu)
        assert got[0].dtype == np.float64 and got[0].shape == (max_rank,)
        np.testing.assert_allclose(got[0], cmc, rtol=0, atol=1e-12)
        assert abs(got[1] - m_ap) < 1e-12 and abs(got[2] - m_inp) < 1e-12
        assert got[3] == n_valid
        assert 0 < n_valid < num_q or num_g >= 200   # the case has skipped queries


def test_metrics_sysu_hand_checked():
    # gallery:   0      1      2      3      4      5
    # pid:       1      2      2      1      3      1
    # cam:       2      1      4      1      5      4      distances 0..5 for every query
    d = np.tile(np.arange(6.0), (3, 1))
    g_pids, g_cams = np.array([1, 2, 2, 1, 3, 1]), np.array([2, 1, 4, 1, 5, 4])
    q_pids, q_cams = np.array([1, 1, 9]), np.array([3, 6, 3])
    # query 0 (cam 3): gallery 0 dropped; list = 2 2 1 3 1; hits at p = 3, 5
    #   AP = (1/3 + 2/5) / 2 = 11/30; INP = 2/5; distinct ids 2 1 3 -> true id at rank 2
    # query 1 (cam 6): list = 1 2 2 1 3 1; hits at p = 1, 4, 6
    #   AP = (1/1 + 2/4 + 3/6) / 3 = 2/3; INP = 3/6; distinct rank 1
    # query 2: id 9 absent -> skipped
    cmc, m_ap, m_inp, n_valid = metrics.eval_sysu(d, q_pids, g_pids, q_cams, g_cams, max_rank=5,
                                             return_valid=True)
    np.testing.assert_allclose(cmc, [0.5, 1, 1, 1, 1], atol=1e-15)   # stays past 3 distinct ids
    assert abs(m_ap - (11 / 30 + 2 / 3) / 2) < 1e-15
    assert abs(m_inp - (2 / 5 + 1 / 2) / 2) < 1e-15
    assert n_valid == 2


def test_metrics_regdb_hand_checked(caplog):
    # query pid 1; ranked gallery pids 2 1 3 1 -> hits at p = 2, 4
    # AP = (1/2 + 2/4) / 2 = 1/2; INP = 2/4; CMC 0 1 1 1, then stays at 1 past G = 4
    d = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    with caplog.at_level(logging.WARNING, logger="metrics"):
        cmc, m_ap, m_inp = metrics.eval_regdb(d, np.array([1, 7]), np.array([2, 1, 3, 1]), max_rank=6)
    np.testing.assert_array_equal(cmc, [0, 1, 1, 1, 1, 1])
    assert m_ap == 0.5 and m_inp == 0.5
    assert "1 of 2 queries" in caplog.text           # the skipped query is reported


def test_metric_errors():
    d = np.zeros((2, 3))
    qp, gp, qc, gc = np.array([1, 2]), np.array([1, 2, 3]), np.array([3, 6]), np.array([1, 2, 4])
    with pytest.raises(ValueError, match="NaN"):
        metrics.eval_sysu(np.where(np.eye(2, 3) > 0, np.nan, 0.0), qp, gp, qc, gc)
    with pytest.raises(ValueError, match="empty gallery"):
        metrics.eval_regdb(np.zeros((2, 0)), qp, gp[:0])
    with pytest.raises(ValueError, match="empty query"):
        metrics.eval_regdb(np.zeros((0, 3)), qp[:0], gp)
    with pytest.raises(ValueError, match="none of the 2 queries"):
        metrics.eval_regdb(d, np.array([8, 9]), gp)
    with pytest.raises(ValueError, match="g_pids"):
        metrics.eval_regdb(d, qp, gp[:2])
    with pytest.raises(ValueError, match="q_camids"):
        metrics.eval_sysu(d, qp, gp, qc[:1], gc)
    with pytest.raises(ValueError, match="max_rank"):
        metrics.eval_regdb(d, qp, gp, max_rank=0)


def test_pairwise_distance_and_pixel_model():
    torch.manual_seed(0)
    q, g = F.normalize(torch.randn(5, 7), dim=1), F.normalize(torch.randn(4, 7), dim=1)
    dist = metrics.pairwise_distance(q, g)
    euclid = ((q.double()[:, None] - g.double()[None]) ** 2).sum(-1).numpy()
    assert dist.dtype == np.float64 and dist.shape == (5, 4)
    np.testing.assert_allclose(dist, euclid, atol=1e-6)     # float32 rows are unit to ~1e-7
    np.testing.assert_allclose(dist, 2 - 2 * (q.double() @ g.double().T).numpy(), atol=1e-15)
    with pytest.raises(ValueError, match="L2-normalised"):
        metrics.pairwise_distance(q * 2, g)
    with pytest.raises(ValueError, match="feature sizes"):
        metrics.pairwise_distance(q, F.normalize(g[:, :6], dim=1))
    x = torch.randn(2, 3, 32, 16)
    f = features.pixel_model(x, IR)
    manual = x.reshape(2, 3, 16, 2, 8, 2).mean((3, 5)).flatten(1)   # 2 x 2 blocks
    assert f.shape == (2, 384)
    torch.testing.assert_close(f, manual / manual.norm(dim=1, keepdim=True))


# ----------------------------------------------------------------------------- tiny data
def write_image(path, pid, seed):
    rng = np.random.default_rng(seed)
    base = np.array([pid * 40 % 256, pid * 90 % 256, pid * 150 % 256])
    pixels = np.clip(base + rng.integers(-30, 30, (32, 16, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_sysu(tmp_path_factory):
    """A rendered 10-identity SYSU-MM01 layout (3 test ids), read by the real data.sysu."""
    root = str(tmp_path_factory.mktemp("data") / "sysu")
    meta = render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16)
    return root, meta


class CountingModel:
    """pixel_model that counts the images it sees and records the modalities."""
    def __init__(self):
        self.seen, self.modalities = 0, set()

    def __call__(self, x, modality):
        self.seen += x.shape[0]
        self.modalities.add(modality)
        return features.pixel_model(x, modality)


def test_extract_features_flip_average(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", i, i) for i in range(5)]
    images = ImageList(paths, np.arange(5), np.full(5, 3), IR)
    weight = torch.randn(3 * 32 * 3, 6, generator=torch.Generator().manual_seed(0))
    seen = []

    def toy(x, modality):          # left three columns: not flip-invariant; not normalised
        seen.append(modality)
        return x[:, :, :, :3].flatten(1) @ weight

    got = features.extract_features(toy, images, 32, 16, batch_size=2)
    x = torch.stack([test_transform(32, 16)(read_image(p)) for p in paths])
    f, f_flip = toy(x, IR), toy(torch.flip(x, dims=[3]), IR)
    assert got.dtype == torch.float32 and got.shape == (5, 6) and set(seen) == {IR}
    torch.testing.assert_close(got, F.normalize((f + f_flip) / 2, dim=1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, F.normalize(f, dim=1), atol=1e-3)   # the flip matters
    torch.testing.assert_close(features.extract_features(toy, images, 32, 16, flip=False),
                               F.normalize(f, dim=1), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="NaN/inf"):
        features.extract_features(lambda x, m: toy(x, m) * float("nan"), images, 32, 16)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        features.extract_features(lambda x, m: toy(x, m)[:1], images, 32, 16)


def test_evaluate_sysu_features_file_and_ranklist(tmp_path, tiny_sysu):
    root, _ = tiny_sysu
    model = CountingModel()
    npz = str(tmp_path / "feats.npz")
    res = ev.evaluate_sysu(model, root, trials=[0, 1], height=32, width=16, batch_size=8,
                           save_features=npz, save_ranklist=3, ranklist_dir=str(tmp_path / "rl"))
    query, _ = sysu_test(root)
    candidates = sysu_gallery_candidates(root, "all")
    # each distinct image extracted once (x2 for the flip): indoor candidates are a subset
    assert model.seen == 2 * (len(query) + len(candidates)) and model.modalities == {VIS, IR}
    # direct computation for one (mode, trial)
    q_feat = features.extract_features(features.pixel_model, query, 32, 16)
    _, gallery = sysu_test(root, mode="indoor", trial=1)
    g_feat = features.extract_features(features.pixel_model, gallery, 32, 16)
    cmc, m_ap, m_inp = metrics.eval_sysu(metrics.pairwise_distance(q_feat, g_feat), query.pids,
                                    gallery.pids, query.camids, gallery.camids)
    row = res["indoor"]["trials"][1]
    assert row["trial"] == 1 and row["num_gallery"] == len(gallery)
    np.testing.assert_allclose([row["R1"], row["R5"], row["mAP"], row["mINP"]],
                               [100 * cmc[0], 100 * cmc[4], 100 * m_ap, 100 * m_inp], atol=1e-4)
    assert res["all"]["protocol"] == "sysu" and res["all"]["shot"] == "single"
    assert res["all"]["mean"]["mAP"] == pytest.approx(np.mean([r["mAP"] for r in res["all"]["trials"]]))
    # the saved features reproduce the same numbers without a model
    again = ev.evaluate_from_features(npz)
    assert again == res
    assert reports.format_table(again) == reports.format_table(res) and "mean(2)" in reports.format_table(res)
    only = ev.evaluate_from_features(npz, settings=["all"], trials=[1])
    assert list(only) == ["all"] and only["all"]["trials"] == res["all"]["trials"][1:]
    with pytest.raises(ValueError, match="no saved evaluation"):
        ev.evaluate_from_features(npz, trials=[7])
    # rank list of the first trial: one line per query, 3 marked gallery paths
    lines = (tmp_path / "rl" / "ranklist_all_trial0.txt").read_text().splitlines()
    assert len(lines) == len(query) and [ln.split("\t")[0] for ln in lines] == query.paths
    assert all(len(ln.split("\t")) == 4 and all(f[0] in "+-" for f in ln.split("\t")[1:])
               for ln in lines)
    row = res["all"]["trials"][0]          # top-1 image = top-1 distinct identity
    top1 = sum(ln.split("\t")[1][0] == "+" for ln in lines)
    assert top1 == pytest.approx(row["R1"] / 100 * row["num_valid"])


def test_write_ranklist_hand_checked(tmp_path):
    # query a (cam 3, pid 1): ranked g0 g1 g2 g3; g1 is cam 2 -> dropped -> g0(-) g2(+) (g3 cut)
    # query b (cam 6, pid 2): ranked g3 g2 g1 g0 -> g3(-) g2(-)
    d = np.array([[0.0, 1, 2, 3], [3.0, 2, 1, 0]])
    path = tmp_path / "r.txt"
    reports.write_ranklist(str(path), d, ["a", "b"], ["g0", "g1", "g2", "g3"], np.array([1, 2]),
                      np.array([3, 2, 1, 4]), 2, np.array([3, 6]), np.array([1, 2, 4, 5]))
    assert path.read_text() == "a\t-g0\t+g2\nb\t-g3\t-g2\n"
    # without camids nothing is dropped; k beyond the gallery size lists everything
    reports.write_ranklist(str(path), d[:1], ["a"], ["g0", "g1", "g2", "g3"], np.array([1]),
                      np.array([3, 2, 1, 4]), 9)
    assert path.read_text() == "a\t-g0\t-g1\t+g2\t-g3\n"
    with pytest.raises(ValueError, match="gallery paths"):
        reports.write_ranklist(str(path), d, ["a", "b"], ["g0"], np.array([1, 2]), np.array([3]), 1)


def test_evaluate_regdb_and_mean_over_trials(tmp_path, monkeypatch):
    def regdb_test(root, trial, direction="v2t"):
        vis = ImageList([write_image(tmp_path / f"v{t}_{p}.png", p, p) for t in (0, 1) for p in range(3)],
                        [0, 1, 2] * 2, [1] * 6, VIS)
        ir = ImageList([write_image(tmp_path / f"t{t}_{p}.png", p, 9 + p) for t in (0, 1) for p in range(3)],
                       [0, 1, 2] * 2, [2] * 6, IR)
        return (vis, ir) if direction == "v2t" else (ir, vis)

    monkeypatch.setitem(sys.modules, "data.regdb", types.SimpleNamespace(regdb_test=regdb_test))
    model = CountingModel()
    res = ev.evaluate_regdb(model, "unused", 2, height=32, width=16)
    assert model.seen == 2 * 12                      # v2t and t2v share their 12 images
    vis, ir = regdb_test("", 2)
    dist = metrics.pairwise_distance(features.extract_features(features.pixel_model, vis, 32, 16),
                                features.extract_features(features.pixel_model, ir, 32, 16))
    for name, d in (("v2t", dist), ("t2v", dist.T)):
        cmc, m_ap, _ = metrics.eval_regdb(d, vis.pids, ir.pids)
        row = res[name]["trials"][0]
        assert row["trial"] == 2 and row["R1"] == pytest.approx(100 * cmc[0])
        assert row["mAP"] == pytest.approx(100 * m_ap)
    other = json.loads(json.dumps(res))
    for row in other["v2t"]["trials"] + other["t2v"]["trials"]:
        row.update(trial=5, R1=row["R1"] - 10, mAP=0.0)
    merged = ev.mean_over_trials([res, other])
    v2t = merged["v2t"]
    assert [r["trial"] for r in v2t["trials"]] == [2, 5]
    assert v2t["mean"]["R1"] == pytest.approx(res["v2t"]["trials"][0]["R1"] - 5)
    assert v2t["mean"]["mAP"] == pytest.approx(res["v2t"]["mean"]["mAP"] / 2)
    assert "mean(2)" in reports.format_table(merged) and "RegDB thermal->visible" in reports.format_table(merged)
    with pytest.raises(ValueError, match="same trial twice"):
        ev.mean_over_trials([res, res])


def test_parse_trials():
    assert ev.parse_trials("0-9") == list(range(10))
    assert ev.parse_trials("0,3") == [0, 3] and ev.parse_trials("0-2,5") == [0, 1, 2, 5]
    for bad in ("a", "3-1", "1-", ""):
        with pytest.raises(Exception, match="--trials"):
            ev.parse_trials(bad)


def test_cli_synthetic(tmp_path, tiny_sysu, capsys):
    root, _ = tiny_sysu
    out = tmp_path / "out"
    res = ev.main(["--dataset", "synthetic", "--data-root", root, "--model", "pixels",
                   "--trials", "0,1", "--mode", "all", "--height", "32", "--width", "16",
                   "--device", "cpu", "--workers", "0", "--out", str(out),
                   "--save-features", str(tmp_path / "f.npz")])
    saved = json.loads((out / "results.json").read_text())
    direct = ev.evaluate_sysu(features.pixel_model, root, modes=["all"], trials=[0, 1], height=32, width=16)
    assert saved["results"] == json.loads(json.dumps(direct)) and res == direct
    assert saved["args"]["trials"] == [0, 1] and saved["args"]["dataset"] == "synthetic"
    text = capsys.readouterr().out
    assert "data_root: " + root in text and "SYSU all-search" in text
    again = ev.main(["--from-features", str(tmp_path / "f.npz"), "--workers", "0"])
    assert again == direct
    with pytest.raises(SystemExit):
        ev.main(["--dataset", "synthetic", "--data-root", root])       # no model given


def test_real_readers_on_synthetic_data(tmp_path, tiny_sysu):
    """Gallery and query sizes with the real readers; RegDB end to end on a rendered split."""
    root, meta = tiny_sysu
    res = ev.evaluate_sysu(features.pixel_model, root, trials=[0, 2], height=32, width=16)
    for mode in ("all", "indoor"):
        query, gallery = sysu_test(root, mode=mode, trial=2)
        cands = sysu_gallery_candidates(root, mode)
        row = res[mode]["trials"][1]
        assert row["num_query"] == len(query) == meta["test_counts"]["ir"]
        assert row["num_gallery"] == len(set(zip(cands.pids.tolist(), cands.camids.tolist())))
    render_regdb(str(tmp_path / "regdb"), num_ids=6, height=32, width=16)
    reg = ev.evaluate_regdb(features.pixel_model, str(tmp_path / "regdb"), 2, height=32, width=16)
    assert [r["num_query"] for r in (reg["v2t"]["trials"][0], reg["t2v"]["trials"][0])] == [30, 30]
    assert reg["v2t"]["trials"][0]["trial"] == 2 and 0 < reg["v2t"]["mean"]["R20"] <= 100


def test_cli_checkpoint_uses_its_input_size(tmp_path, tiny_sysu, monkeypatch):
    root, _ = tiny_sysu
    calls = []

    def model_from_checkpoint(path, device, method=None):
        calls.append((path, device))
        meta = {"height": 32, "width": 16, "dataset": "synthetic", "method": "mult"}
        return features.pixel_model, meta

    monkeypatch.setattr(ev, "model_from_checkpoint", model_from_checkpoint)
    out = tmp_path / "out"
    ev.main(["--dataset", "synthetic", "--data-root", root, "--checkpoint", "ck.pth", "--mode",
             "indoor", "--trials", "0", "--width", "8", "--device", "cpu", "--workers", "0",
             "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert calls == [("ck.pth", "cpu")] and saved["method"] == "mult"
    assert (saved["args"]["height"], saved["args"]["width"]) == (32, 8)   # the command line wins
    assert list(saved["results"]) == ["indoor"]


# ----------------------------------------------------------------------------- re-ranking
def reference_re_ranking(qg, qq, gg, k1, k2, lam):
    """Dense and slow, straight from the definition: the joint distance squared and divided by its
    row maximum, k-reciprocal lists by a stable argsort, the 2/3 expansion, Gaussian weights, query
    expansion over the k2 nearest, Jaccard by sums of minima, the lambda mix."""
    num_q = len(qg)
    d = np.square(np.block([[qq, qg], [qg.T, gg]])).astype(np.float32)
    d = d / d.max(1, keepdims=True)
    n, rank = len(d), np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, m):
        return [int(j) for j in rank[i, :m] if i in rank[j, :m]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1 + 1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2)) + 1)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        e = sorted(expanded)
        w = np.exp(-d[i, e].astype(np.float64))
        v[i, e] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    final = np.zeros((num_q, n - num_q))
    for i in range(num_q):
        for j in range(num_q, n):
            s = np.minimum(v[i], v[j]).sum()
            final[i, j - num_q] = (1 - lam) * (1 - s / (2 - s)) + lam * d[i, j]
    return final


def rerank_case(seed, num_q, num_g, ties):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_q + num_g, 4))
    if ties:                                   # coarse features: many exactly equal distances
        x = np.round(x, 0) + (np.abs(np.round(x, 0)).sum(1, keepdims=True) == 0)
        x[3] = x[num_q + 1]                    # a query equal to a gallery image
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, g = x[:num_q], x[num_q:]
    sym = lambda a: (a + a.T) / 2              # noqa: E731  exactly symmetric, as distances are
    return metrics.pairwise_distance(q, g), sym(metrics.pairwise_distance(q, q)), sym(metrics.pairwise_distance(g, g))


@pytest.mark.parametrize("seed,num_q,num_g,ties", [(0, 12, 30, False), (1, 20, 25, True), (2, 5, 40, True)])
@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (6, 3, 0.0), (5, 1, 0.5), (7, 12, 1.0)])
def test_re_ranking_matches_dense_reference(seed, num_q, num_g, ties, k1, k2, lam, monkeypatch):
    monkeypatch.setattr(metrics, "RERANK_BLOCK_BYTES", 4 * 7 * (num_q + num_g))   # blocks of 7 rows
    monkeypatch.setattr(metrics, "RERANK_CHUNK", 500)                             # many sparse chunks
    qg, qq, gg = rerank_case(seed, num_q, num_g, ties)
    got = metrics.re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == qg.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, reference_re_ranking(qg, qq, gg, k1, k2, lam), rtol=0, atol=1e-6)


def test_re_ranking_changes_the_ranking_and_checks_inputs():
    qg, qq, gg = rerank_case(4, 10, 20, False)
    final = metrics.re_ranking(qg, qq, gg)
    assert np.isfinite(final).all() and not np.array_equal(np.argsort(final, 1), np.argsort(qg, 1))
    # lambda 1: the original distance, squared and row-normalised over [qq, qg]
    rows = np.square(np.hstack([qq, qg])).astype(np.float32)
    np.testing.assert_allclose(metrics.re_ranking(qg, qq, gg, lambda_value=1.0),
                               (np.square(qg).astype(np.float32) / rows.max(1, keepdims=True)), atol=1e-7)
    for kwargs, text in (({"k1": 0}, "k1"), ({"k1": 30}, "k1"), ({"k2": 31}, "k2"),
                         ({"lambda_value": 1.5}, "lambda_value"), ({"k1": 2.5}, "k1")):
        with pytest.raises(ValueError, match=text):
            metrics.re_ranking(qg, qq, gg, **kwargs)
    with pytest.raises(ValueError, match="g_g_dist"):
        metrics.re_ranking(qg, qq, gg[:5, :5])
    with pytest.raises(ValueError, match="NaN"):
        metrics.re_ranking(np.where(qg > 1, np.nan, qg), qq, gg)
    with pytest.raises(ValueError, match="all zero"):
        metrics.re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)), k1=2, k2=1)


def test_rerank_in_the_runners_and_from_features(tmp_path, tiny_sysu):
    root, _ = tiny_sysu
    npz = str(tmp_path / "f.npz")
    plain = ev.evaluate_sysu(features.pixel_model, root, modes=["all"], trials=[0], height=32, width=16,
                             save_features=npz)
    rr = ev.evaluate_from_features(npz, rerank={"k1": 8, "k2": 3})
    assert plain["all"]["rerank"] is None
    assert rr["all"]["rerank"] == {"k1": 8, "k2": 3, "lambda_value": 0.3}
    query, gallery = sysu_test(root, "all", 0)
    q, g = (features.extract_features(features.pixel_model, x, 32, 16) for x in (query, gallery))
    dist = metrics.pairwise_distance
    d = metrics.re_ranking(dist(q, g), dist(q, q), dist(g, g), k1=8, k2=3)
    cmc, m_ap, _ = metrics.eval_sysu(d, query.pids, gallery.pids, query.camids, gallery.camids)
    assert rr["all"]["trials"][0]["mAP"] == pytest.approx(100 * m_ap, abs=1e-4)
    assert rr["all"]["trials"][0]["R1"] == pytest.approx(100 * cmc[0], abs=1e-4)
    text = reports.format_table(rr)
    assert "SYSU all-search (re-ranked)" in text and "k1 8, k2 3, lambda 0.3" in text
    assert "re-ranked" not in reports.format_table(plain)


# ----------------------------------------------------------------------------- rank-list pictures
def test_ranklist_images(tmp_path, tiny_sysu):
    root, _ = tiny_sysu
    out = tmp_path / "rl"
    res = ev.main(["--dataset", "synthetic", "--data-root", root, "--model", "pixels", "--trials", "0",
                   "--mode", "all", "--height", "32", "--width", "16", "--workers", "0", "--out", str(out),
                   "--save-ranklist", "4", "--ranklist-images", "3"])
    folder = out / "ranklist_all_trial0"
    pngs = sorted(folder.glob("query*.png"))
    assert len(pngs) == 3 and (folder / "index.html").is_file() and (out / "index.html").is_file()
    page = (folder / "index.html").read_text()
    assert all(p.name in page for p in pngs)
    assert "ranklist_all_trial0/index.html" in (out / "index.html").read_text()
    image = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert image.shape[1] == reports.PAD + 5 * (reports.TILE_W + 2 * reports.PAD) + reports.PAD     # query + top 4
    # frames: the pixel just outside each gallery tile is green (correct) or red (wrong), as the text list
    lines = (out / "ranklist_all_trial0.txt").read_text().splitlines()
    first = int(pngs[0].stem[5:])
    marks = [f[0] for f in lines[first].split("\t")[1:]]
    for t, mark in enumerate(marks, start=1):
        x = reports.PAD + t * (reports.TILE_W + 2 * reports.PAD) + reports.PAD - 2
        colour = tuple(image[18 + reports.PAD + reports.TILE_H // 2, x])
        assert colour == ((0, 170, 0) if mark == "+" else (210, 0, 0))
    assert res["all"]["trials"][0]["num_query"] == len(lines)
    with pytest.raises(SystemExit, match="--save-ranklist K"):
        ev.main(["--dataset", "synthetic", "--data-root", root, "--model", "pixels", "--out", str(out),
                 "--ranklist-images", "2"])


def test_write_ranklist_images_llcm_exclusion(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", i, i) for i in range(4)]
    d = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    # query 0: id 1 cam 2; gallery 0 is id 1 cam 2 -> dropped under LLCM, kept under RegDB
    index = reports.write_ranklist_images(str(tmp_path / "pics"), d, paths[:2], paths[1:], np.array([1, 5]),
                                     np.array([1, 5, 1]), 2, 5, np.array([2, 1]), np.array([2, 3, 4]),
                                     protocol="llcm", title="toy")
    assert sorted(os.listdir(tmp_path / "pics")) == ["index.html", "query00000.png", "query00001.png"]
    assert "toy" in open(index).read()
    reports.write_ranklist(str(tmp_path / "r.txt"), d, ["a", "b"], ["g0", "g1", "g2"], np.array([1, 5]),
                      np.array([1, 5, 1]), 2, np.array([2, 1]), np.array([2, 3, 4]), protocol="llcm")
    assert (tmp_path / "r.txt").read_text() == "a\t-g1\t+g2\nb\t-g2\t+g1\n"
    with pytest.raises(ValueError, match="num_queries"):
        reports.write_ranklist_images(str(tmp_path / "x"), d, paths[:2], paths[1:], [1, 5], [1, 5, 1], 2, 0)


# ----------------------------------------------------------------------------- run summaries
def fake_results(settings, shift, trials=(0,)):
    res = {}
    for k, name in enumerate(settings):
        rows = [{"trial": t, **{m: 10.0 * (k + 1) + shift + i + t for i, m in enumerate(metrics.METRICS)},
                 "num_query": 5, "num_gallery": 4, "num_valid": 5} for t in trials]
        res[name] = {"protocol": "x", "rerank": None, "trials": rows}
    ev._summarise(res)
    return res


def write_run(folder, args, results, layout="train"):
    folder.mkdir(parents=True)
    if layout == "train":
        (folder / "args.json").write_text(json.dumps(args))
        ev.write_json({"final": results, "untrained": None}, str(folder / "results.json"))
    else:
        ev.write_json({"method": args.get("method"), "args": args, "results": results},
                      str(folder / "results.json"))
    return str(folder)


def test_summarize_runs_regdb_and_sysu(tmp_path, capsys):
    base = {"method": "mult", "dataset": "regdb", "seed": 1, "association": "mult"}
    runs = [write_run(tmp_path / f"r{t}", {**base, "trial": t}, fake_results(["v2t", "t2v"], 2.0 * t))
            for t in (3, 1, 2)]
    text, summary = reports.summarize_runs(runs)
    assert [r["trial"] for r in summary["runs"]] == [1, 2, 3]              # per split, in order
    # split t: v2t R1 = 10 + 2t; t2v mAP = 20 + 2t + 4 -> over t = 1..3, means 14 and 28, std of (2, 4, 6)
    assert summary["mean"]["v2t"]["R1"] == pytest.approx(14) and summary["mean"]["t2v"]["mAP"] == pytest.approx(28)
    assert summary["std"]["t2v"]["mAP"] == pytest.approx(np.std([2.0, 4.0, 6.0]))
    assert "split 1" in text and "mean ± std (3)" in text and "14.00±1.63" in text
    assert "RegDB visible->thermal" in text and "RegDB thermal->visible" in text
    # SYSU seeds, one read from evaluate.py's own results.json
    sysu = [write_run(tmp_path / f"s{s}", {"method": "mult", "dataset": "sysu", "seed": s, "trial": None,
                                           "association": a}, fake_results(["all", "indoor"], s),
                      layout="train" if s < 3 else "eval") for s, a in ((1, "mult"), (2, "ot"), (3, "mult"))]
    text, summary = reports.summarize_runs(sysu)
    assert [r["seed"] for r in summary["runs"]] == [1, 2, 3] and "seed 2" in text
    assert "differ in association (mult, ot)" in text
    res = ev.main(["--summarize", *sysu, "--out", str(tmp_path / "sum")])
    assert res == summary and json.loads((tmp_path / "sum" / "summary.json").read_text()) == summary
    assert "seed 3" in capsys.readouterr().out


def test_summarize_notes_only_flags_that_change_results(tmp_path):
    """Seeds of one command: args.json records the seed among the flags changed from the preset, and runtime flags
    (another --cache-dir, --workers) change no number: no note. A real difference is still named."""
    base = {"method": "mult", "dataset": "sysu", "trial": None, "lr": 3.5e-4}
    seeds = [write_run(tmp_path / f"s{s}", {**base, "seed": s, "cache_dir": f"/c{s}", "workers": s,
                                            "changed_from_preset": {"seed": [1, s]} if s > 1 else {}},
                       fake_results(["all"], s)) for s in (1, 2)]
    text, _ = reports.summarize_runs(seeds)
    assert "note:" not in text
    lr = write_run(tmp_path / "lr", {**base, "seed": 3, "lr": 1e-3, "changed_from_preset": {"lr": [3.5e-4, 1e-3]}},
                   fake_results(["all"], 3))
    text, _ = reports.summarize_runs(seeds + [lr])
    assert "note: the runs also differ in lr (0.00035, 0.001)" in text and "changed_from_preset" not in text


def test_summarize_runs_errors(tmp_path):
    def reg(name, t, method="mult"):
        return write_run(tmp_path / name, {"method": method, "dataset": "regdb", "trial": t},
                         fake_results(["v2t", "t2v"], 0))

    a, b = reg("a", 1), reg("b", 1)
    with pytest.raises(ValueError, match=r"RegDB split 1 appears twice \(.*a and .*b\)"):
        reports.summarize_runs([a, b])
    s = write_run(tmp_path / "s", {"method": "mult", "dataset": "sysu", "seed": 1}, fake_results(["all"], 0))
    with pytest.raises(ValueError, match=r"different datasets \(regdb, sysu"):
        reports.summarize_runs([a, s])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no results.json"):
        reports.summarize_runs([a, str(tmp_path / "empty")])
    m = reg("m", 2, method="mbmil")
    with pytest.raises(ValueError, match="different methods"):
        reports.summarize_runs([a, m])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not the output of a train.py or evaluate.py run"):
        reports.summarize_runs([str(tmp_path / "bad")])


def test_format_summary():
    final, untrained = fake_results(["all", "indoor"], 5.0), fake_results(["all", "indoor"], 0.0)
    untrained["indoor"]["mean"]["mINP"] = 0.0
    text = reports.format_summary(final, untrained)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("SYSU all-search")
    # all: R1 15 vs 10 -> +50.0%; mAP (index 4) 19 vs 14 -> +35.7%
    assert "15.00" in lines[2] and "10.00" in lines[2] and "+50.0%" in lines[2] and "+35.7%" in lines[2]
    assert "n/a" in lines[3]
    alone = reports.format_summary(final)
    assert "untrained" not in alone and len(alone.splitlines()) == 4 and "25.00" in alone.splitlines()[3]


def test_rerank_defaults_are_re_rankings_own():
    """evaluate.py fills the re-ranking flags left unset from metrics.RERANK_DEFAULTS: they are re_ranking's."""
    import inspect
    params = inspect.signature(metrics.re_ranking).parameters
    assert metrics.RERANK_DEFAULTS == {k: params[k].default for k in ("k1", "k2", "lambda_value")}
