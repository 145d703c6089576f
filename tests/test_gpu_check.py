"""Tests for bench/gpu_check.py: its CPU path end to end (the path CI can run), the generated features, and the
comparisons it reports (they must see a difference where there is one)."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import clustering
import mult

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu_check as gc  # noqa: E402

# Smaller than the cpu preset, so that the whole run takes seconds.
SMALL = ["--device", "cpu", "--sizes", "600", "300", "--dim", "128", "--ids", "12", "--height", "32", "--width",
         "16", "--clusters", "4", "--instances", "2", "--warmup", "1", "--iters", "1", "--epoch-iters", "2",
         "--threads", "1"]


def test_cpu_run_prints_every_row_and_cpu_against_cpu_is_identical(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    results = gc.main(gc.get_args_parser().parse_args(SMALL + ["--channels-last", "--extract", "--extract-batch",
                                                               "200", "--json", str(out)]))
    text = capsys.readouterr().out
    assert "a second CPU run" in text                          # says that the device side is not CUDA
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]                            # table rows, headers included
    assert [r[:2] for r in rows if r[0].startswith(("jaccard", "dbscan", "label_"))] == [
        ["jaccard_similarity (standard)", "vis 600"], ["jaccard_similarity (standard)", "ir 300"],
        ["jaccard_similarity (modality-aware)", "vis+ir 900"], ["dbscan (standard Jaccard)", "vis 600"],
        ["dbscan (standard Jaccard)", "ir 300"], ["dbscan (modality-aware Jaccard)", "vis+ir 900"],
        ["label_transfer", "vis 600 + ir 300"]]
    assert all(r[3] == "yes" and r[5] == "yes" for r in rows[1:8])   # identical, within tolerance
    assert [r[:2] for r in rows if r[0] == "fp32"] == [["fp32", "contiguous"], ["fp32", "channels_last"]]
    assert [r[0] for r in rows[-7:]] == ["extraction", "clustering vis", "clustering ir", "label transfer",
                                         "memories", "training", "total"]
    assert "compare: 7 of 7 identical within tolerance" in text
    compare = results["compare"]
    assert [r["step"].split(" ")[0] for r in compare] == ["jaccard_similarity"] * 3 + ["dbscan"] * 3 + \
        ["label_transfer"]
    assert all(r["identical"] and r["ok"] for r in compare)
    assert all(r["max_abs_diff"] == 0 for r in compare if r["max_abs_diff"] is not None)   # CPU is deterministic
    assert all(r["cpu_s"] > 0 and r["device_s"] > 0 and r["peak_gb"] is None for r in compare)
    assert [(r["precision"], r["memory_format"]) for r in results["throughput"]] == [
        ("fp32", "contiguous"), ("fp32", "channels_last")]                # the cpu preset: fp32 only
    assert all(r["images_per_iter"] == 24 and r["images_per_s"] > 0 for r in results["throughput"])
    phases = [r["phase"] for r in results["epoch"]]
    assert phases == ["extraction", "clustering vis", "clustering ir", "label transfer", "memories", "training",
                      "total"]
    assert results["epoch"][-1]["seconds"] == sum(r["seconds"] for r in results["epoch"][:-1])
    saved = json.loads(out.read_text())
    assert saved["compare"] == json.loads(json.dumps(compare)) and saved["setup"]["args"]["device"] == "cpu"
    # (b) train.py itself: both methods, both inputs, CPU against CPU: the same clusters, losses and mAP
    assert [(r["method"], r["input"], r["precision"]) for r in results["train"]] == [
        ("mult", "cached", "fp32"), ("mult", "pil", "fp32"), ("mbmil", "cached", "fp32"), ("mbmil", "pil", "fp32")]
    assert all(r["ok"] and r["labels_agree"] == 1 and r["max_loss_rel_diff"] == 0 and r["max_map_diff"] == 0
               for r in results["train"]), results["train"]
    # (c) the batched augmentation, every pipeline, bit for bit; (d) real input against synthetic; (e) two ranks
    assert [r["pipeline"] for r in results["augment"]] == ["mult stage 1", "mult stage 2", "mbmil stage 1"]
    assert all(r["ok"] and r["values_differing"] == 0 for r in results["augment"])
    assert [r["input"] for r in results["input"]] == ["synthetic", "cached, MULT stage 1", "cached, MULT stage 2"]
    assert all(r["images_per_s"] > 0 and r["ok"] is None for r in results["input"])     # judged on a GPU only
    assert results["input"][1]["vs_synthetic"] > 0
    assert [r["ok"] for r in results["distributed"]] == [True] and results["distributed"][0]["max_loss_rel_diff"] < 1e-3
    summary = [line for line in text.splitlines() if line.startswith("gpu_check:")]
    assert len(summary) == 1 and summary[0].startswith("gpu_check: PASS (compare 7/7, train 4/4, augment 3/3")
    assert list(saved) == ["setup", "compare", "train", "augment", "throughput", "input", "distributed", "epoch",
                           "summary"]


def test_json_holds_each_section_as_it_ends(tmp_path, monkeypatch):
    """A loan that ends mid-run keeps what ran: the JSON is written after every section."""
    out = tmp_path / "gpu_check.json"

    def cut(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(gc.gpu_runs, "augment_check", cut)
    with pytest.raises(KeyboardInterrupt):
        gc.main(gc.get_args_parser().parse_args(SMALL + ["--sections", "compare", "augment", "--json", str(out)]))
    saved = json.loads(out.read_text())
    assert list(saved) == ["setup", "compare"] and len(saved["compare"]) == 7


def test_a_difference_fails_the_row_and_the_summary():
    ref = {"labels": [{"vis": np.array([0, 0, 1]), "ir": np.array([1, -1])}], "curve": [2.0, 3.0],
           "mAP": {"all": 50.0}, "seconds": 1.0, "error": None}
    same = gc.gpu_runs.compare_runs("mult", "cached", "fp32", ref, ref)
    assert same["ok"] and same["labels_agree"] == 1
    moved = dict(ref, labels=[{"vis": np.array([0, 1, 1]), "ir": np.array([1, -1])}])
    assert not gc.gpu_runs.compare_runs("mult", "cached", "fp32", ref, moved)["ok"]          # fp32: all equal
    assert gc.gpu_runs.compare_runs("mult", "cached", "bf16", ref, moved)["labels_agree"] == 0.8
    drift = dict(ref, curve=[2.0, 3.01])
    assert not gc.gpu_runs.compare_runs("mult", "cached", "fp32", ref, drift)["ok"]
    assert gc.gpu_runs.compare_runs("mult", "cached", "bf16", ref, drift)["ok"]               # within 5e-2
    broken = dict(ref, error="RuntimeError: CUDA error")
    row = gc.gpu_runs.compare_runs("mult", "pil", "fp16", ref, broken)
    assert not row["ok"] and "CUDA error" in row["detail"]
    line = gc.summary({"train": [same, row], "input": [{"ok": None}]}, ["train", "input"])
    assert line.startswith("FAIL (train 1/2, input 0/0 (1 not judged)); failed: train: device: RuntimeError")


def test_skip_cpu_reference_compares_nothing_and_says_so(capsys):
    results = gc.main(gc.get_args_parser().parse_args(SMALL + ["--sections", "compare", "--skip-cpu-reference"]))
    text = capsys.readouterr().out
    assert "no CPU reference run" in text and "throughput" not in results and "epoch" not in results
    assert all(r["identical"] is None and r["cpu_s"] is None and r["device_s"] > 0 for r in results["compare"])


def test_generated_features_are_a_pure_function_of_the_seed():
    a, b, c = (gc.make_features(300, 200, 128, 10, seed) for seed in (0, 0, 1))
    assert all(torch.equal(x, y) if torch.is_tensor(x) else np.array_equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    feat_v, feat_r, pid_v, pid_r = a
    assert feat_v.shape == (300, 128) and feat_r.shape == (200, 128) and feat_v.dtype == torch.float32
    assert torch.allclose(feat_v.norm(dim=1), torch.ones(300), atol=1e-5)
    assert set(pid_v) <= set(range(10)) and set(pid_r) <= set(range(10))
    labels = clustering.dbscan(clustering.jaccard_similarity(feat_v), 0.6)   # clustered: DBSCAN finds them
    assert 7 <= labels.max() + 1 <= 12 and np.mean(labels < 0) < 0.2


def test_compare_csr_sees_values_and_patterns():
    a = sp.random(50, 50, density=0.1, format="csr", random_state=0, dtype=np.float32)
    assert gc.compare_csr(a, a.copy()) == (True, 0, 0.0)
    b = a.copy()
    b.data[3] += 1e-3
    same, only, diff = gc.compare_csr(a, b)
    assert same and only == 0 and abs(diff - 1e-3) < 1e-6
    c = a.tolil()
    r, k = a.nonzero()
    c[r[0], k[0]] = 0                                          # one entry removed, one added
    c[0, int(np.setdiff1d(np.arange(50), a[0].indices)[0])] = 0.5
    same, only, diff = gc.compare_csr(a, c.tocsr())
    assert not same and only == 2 and diff == 0.0


def test_compare_transfer_counts_hard_and_soft_differences():
    feat_v, feat_r, _, _ = gc.make_features(200, 150, 128, 8, 0)
    sims = [clustering.jaccard_similarity(f) for f in (feat_v, feat_r)]
    labels = [clustering.dbscan(s, 0.6) for s in sims]
    lt = mult.label_transfer(feat_v, feat_r, *labels, *sims)
    assert gc.compare_transfer(lt, lt) == (True, 0, 0.0)
    other = dataclasses.replace(lt, cross_v=lt.cross_v.copy(), soft_r=lt.soft_r + 1e-3)
    other.cross_v[:3] = (other.cross_v[:3] + 1) % lt.K_r
    same, differ, diff = gc.compare_transfer(lt, other)
    assert not same and differ == 3 and abs(diff - 1e-3) < 1e-6
