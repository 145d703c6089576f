"""End-to-end: short MULT and MBMIL runs on a tiny synthetic set, resume, evaluation, bad inputs."""
import json
import os

import pytest
import torch

import evaluate
import memory
import train
from data.datasets import training_set
from plumbing import checks
from demo.synthetic import render_sysu

TINY = ["--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16", "--k1", "6", "--k2", "2",
        "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1", "--extract-batch", "64",
        "--eval-every", "100", "--no-eval-untrained"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    return root


def run(root, out, *extra):
    return train.main(["--data-root", root, "--out", str(out), *TINY, *extra])


def history(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def state(out):
    return torch.load(os.path.join(out, "last.pth"), weights_only=False)


@pytest.mark.parametrize("method", ["mult", "mbmil"])
def test_both_stages_resume_reproduces_and_evaluates(tiny_root, tmp_path, method):
    """3 epochs in one go == 2 epochs, stop, resume for the third: identical weights and optimiser."""
    common = ("--method", method, "--epochs", "3", "--stage-one-epochs", "2", "--eps", "0.6")
    full = tmp_path / "full"
    results = run(tiny_root, full, *common)
    records = history(full)
    assert [r["stage"] for r in records] == [1, 1, 2]
    assert set(results) == {"all", "indoor"} and 0 <= results["all"]["mean"]["mAP"] <= 100
    if method == "mult":
        assert "cross_accuracy" in records[2] and records[2]["loss_oclr"] > 0
    else:
        assert records[2]["global"]["clusters"] >= 0 and records[2]["loss_global"] > 0

    part = tmp_path / "part"
    run(tiny_root, part, *common[:3], "2", *common[4:])          # --epochs 2: stops after epoch 1
    run(tiny_root, part, *common)                                # --resume auto continues at epoch 2
    assert "resumed from" in open(os.path.join(part, "log.txt")).read()
    a, b = state(full), state(part)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert history(part)[-1]["loss"] == records[-1]["loss"]

    # the saved checkpoint evaluates through the CLI path (model_from_checkpoint)
    out = tmp_path / "eval"
    evaluate.main(["--dataset", "synthetic", "--data-root", tiny_root, "--checkpoint",
                   str(full / "last.pth"), "--trials", "0", "--out", str(out)])
    with open(out / "results.json") as f:
        saved = json.load(f)["results"]
    assert saved["all"]["mean"]["mAP"] == pytest.approx(results["all"]["trials"][0]["mAP"])


def test_checkpoint_of_another_method_is_refused(tiny_root, tmp_path):
    run(tiny_root, tmp_path, "--epochs", "1", "--stage-one-epochs", "1")
    with pytest.raises(ValueError, match="--method mult"):
        run(tiny_root, tmp_path, "--method", "mbmil", "--epochs", "1", "--stage-one-epochs", "1")
    with pytest.raises(ValueError, match="--method mult"):
        evaluate.main(["--dataset", "synthetic", "--data-root", tiny_root, "--checkpoint",
                       str(tmp_path / "last.pth"), "--method", "mbmil", "--trials", "0"])


def test_epoch_without_clusters_is_skipped_with_a_message(tiny_root, tmp_path):
    run(tiny_root, tmp_path, "--epochs", "1", "--stage-one-epochs", "1", "--eps", "0.0001")
    assert "DBSCAN found no cluster" in open(tmp_path / "log.txt").read()
    assert history(tmp_path)[0]["skipped"] == "no clusters"
    torch.manual_seed(1)                     # --seed 1: the run's initial weights
    before = train.TwoStreamNet("resnet18")
    after = state(tmp_path)["model"]
    assert all(torch.equal(v, after[k]) for k, v in before.state_dict().items())
    # MBMIL's stage two: its global clustering may be the one that found nothing; the message names its flag
    mbmil = tmp_path / "mbmil"
    run(tiny_root, mbmil, "--method", "mbmil", "--epochs", "1", "--stage-one-epochs", "0", "--global-eps", "0.0001")
    assert "raise --eps or --global-eps" in open(mbmil / "log.txt").read()


def test_nan_loss_stops_with_a_message(tiny_root, tmp_path, monkeypatch):
    def nan_loss(banks, f_v0, *rest):
        return f_v0.sum() * float("nan"), []
    monkeypatch.setattr(memory, "stage_one_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 0"):
        run(tiny_root, tmp_path, "--epochs", "1", "--stage-one-epochs", "1", "--eps", "0.6")


def test_bad_arguments(tiny_root, tmp_path):
    with pytest.raises(SystemExit, match="1..10"):
        run(tiny_root, tmp_path, "--dataset", "regdb", "--trial", "11")
    with pytest.raises(FileNotFoundError):
        run(str(tmp_path / "missing"), tmp_path / "out", "--dataset", "sysu")


def test_synthetic_set_of_an_older_format_is_rerendered_and_another_layout_kept(tmp_path, monkeypatch):
    from demo import synthetic
    root = tmp_path / "old"
    render_sysu(root, num_ids=6, images_per_cam=1, height=16, width=8, seed=4)
    meta_path = root / synthetic.META
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, version=synthetic.FORMAT_VERSION - 1)))
    args = train.resolve_args(train.get_args_parser().parse_args(["--data-root", str(root), "--out", str(tmp_path)]))
    vis, ir, _, _ = checks.check_data(args)             # renders the demo's set on first use
    fresh = json.loads(meta_path.read_text())
    assert fresh["version"] == synthetic.FORMAT_VERSION and fresh["args"] == meta["args"]   # same sizes, new format
    assert len(vis) == meta["train_counts"]["vis"] and len(ir) == meta["train_counts"]["ir"]

    regdb = tmp_path / "regdb"
    synthetic.render_regdb(regdb, num_ids=4, height=16, width=8, seed=4)
    before = sorted(p.name for p in regdb.iterdir())
    args.data_root = str(regdb)
    with pytest.raises(ValueError, match="layout"):
        training_set(args.dataset, args.data_root)
    assert sorted(p.name for p in regdb.iterdir()) == before
