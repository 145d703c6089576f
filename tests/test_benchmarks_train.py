"""train.py on the other benchmarks: LLCM on a generated layout, RegDB's ten-split runner, MBMIL's own flags."""
import json
import os
import shutil

import pytest

import clustering
import train
from demo.synthetic import render_llcm, render_regdb

TINY = ["--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16", "--k1", "6", "--k2", "2",
        "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1", "--extract-batch", "64",
        "--eval-every", "100", "--no-eval-untrained", "--workers", "0", "--eps", "0.6", "--global-k1", "6",
        "--global-k2", "2", "--global-eps", "0.6"]


def cli(*argv):
    try:
        return 0, train.cli(list(argv))
    except SystemExit as exit:
        return exit.code, None


@pytest.fixture(scope="module")
def llcm_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("llcm")
    render_llcm(root, num_ids=9, images_per_cam=1, height=32, width=16, seed=0)
    return str(root)


@pytest.mark.parametrize("method", ["mult", "mbmil"])
def test_llcm_trains_and_evaluates_both_directions(llcm_root, tmp_path, method):
    status, results = cli("--dataset", "llcm", "--method", method, "--data-root", llcm_root, "--out",
                          str(tmp_path / "run"), *TINY, "--epochs", "2", "--stage-one-epochs", "1")
    assert status == 0 and set(results) == {"i2v", "v2i"}
    assert all(0 <= r["mean"]["mAP"] <= 100 for r in results.values())
    saved = json.load(open(tmp_path / "run" / "results.json"))["final"]
    assert saved["i2v"]["mean"] == results["i2v"]["mean"]


def test_llcm_counts_are_checked(llcm_root, tmp_path, capsys):
    """A generated set is checked against the counts it recorded; without its record, against the
    official ones, and refused unless --allow-count-mismatch."""
    root = tmp_path / "copy"
    shutil.copytree(llcm_root, root)
    os.remove(root / "synthetic.json")
    status, _ = cli("--dataset", "llcm", "--data-root", str(root), "--out", str(tmp_path / "run"), *TINY)
    err = capsys.readouterr().err
    assert status == 2 and "--allow-count-mismatch" in err and "16946" in err.replace(",", "")
    assert not (tmp_path / "run").exists()


def test_regdb_ten_splits_resume_after_an_interruption(tmp_path, monkeypatch, capsys):
    root = tmp_path / "regdb"
    render_regdb(root, num_ids=8, height=32, width=16, seed=0)
    argv = ["--dataset", "regdb", "--trial", "all", "--data-root", str(root), "--out", str(tmp_path / "ten"),
            *TINY, "--epochs", "1", "--stage-one-epochs", "1"]
    real, trained = train.mult_epoch, []

    def interrupted_at_split_3(model, optimizer, vis, ir, epoch, args):
        if args.trial == 3:
            raise KeyboardInterrupt
        trained.append(args.trial)
        return real(model, optimizer, vis, ir, epoch, args)
    monkeypatch.setattr(train, "mult_epoch", interrupted_at_split_3)
    assert cli(*argv)[0] == 130
    assert trained == [1, 2] and not (tmp_path / "ten" / "summary.txt").exists()

    def counted(model, optimizer, vis, ir, epoch, args):
        trained.append(args.trial)
        return real(model, optimizer, vis, ir, epoch, args)
    monkeypatch.setattr(train, "mult_epoch", counted)
    trained.clear()
    status, summary = cli(*argv)
    assert status == 0 and trained == list(range(3, 11))          # splits 1 and 2 are read back, not retrained
    assert [r["trial"] for r in summary["runs"]] == list(range(1, 11))
    for t in range(1, 11):
        final = json.load(open(tmp_path / "ten" / f"trial{t}" / "results.json"))["final"]
        assert summary["runs"][t - 1]["results"]["v2t"]["mAP"] == final["v2t"]["mean"]["mAP"]
    text = (tmp_path / "ten" / "summary.txt").read_text()
    assert "mean" in text and ("±" in text or "+-" in text)


def test_regdb_ten_splits_default_folders(tmp_path, monkeypatch):
    """Without --out each split trains in the folder `--trial t` alone would use (runs/mult_regdb_trial<t>[_tags]),
    so a split run alone and the ten-split runner share it, and the table goes to runs/mult_regdb_ten-splits[_tags]."""
    root = tmp_path / "regdb"
    render_regdb(root, num_ids=8, height=32, width=16, seed=0)
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "regdb", "--data-root", str(root), *TINY, "--epochs", "1", "--stage-one-epochs", "1"]
    one = train.resolve_args(train.get_args_parser().parse_args([*argv, "--trial", "4"])).out
    assert cli(*argv, "--trial", "all")[0] == 0
    folders = sorted(os.listdir("runs"))
    tags = one[len("runs/mult_regdb_trial4"):]
    assert one.startswith("runs/mult_regdb_trial4") and os.path.isfile(os.path.join(one, "results.json"))
    assert folders == sorted([f"mult_regdb_trial{t}{tags}" for t in range(1, 11)] + [f"mult_regdb_ten-splits{tags}"])
    assert os.path.isfile(os.path.join("runs", f"mult_regdb_ten-splits{tags}", "summary.txt"))


@pytest.mark.parametrize("value", ["0", "11", "x", "1,2"])
def test_bad_trial_values(tmp_path, capsys, value):
    status, _ = cli("--dataset", "regdb", "--trial", value, "--data-root", str(tmp_path), "--out", str(tmp_path / "r"))
    assert status == 2 and "--trial" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_mbmil_global_clustering_has_its_own_flags(llcm_root, tmp_path, monkeypatch):
    """--k1 changes the intra-modality clustering only; --global-k1 the global one only."""
    calls, real = [], clustering.jaccard_similarity

    def spy(features, k1=30, k2=6, modality=None):
        calls.append((k1, k2, modality is not None))
        return real(features, k1, k2, modality=modality)
    monkeypatch.setattr(clustering, "jaccard_similarity", spy)
    argv = [*TINY, "--k1", "4", "--global-k1", "8", "--no-diagnostics"]
    assert cli("--dataset", "llcm", "--method", "mbmil", "--data-root", llcm_root, "--out", str(tmp_path / "r"),
               *argv, "--epochs", "2", "--stage-one-epochs", "1")[0] == 0
    assert {c for c in calls if not c[2]} == {(4, 2, False)} and {c for c in calls if c[2]} == {(8, 2, True)}
