"""Learning curves: every run draws curves.png from its metrics.jsonl after each epoch and at the end, a resume
continues the curve (no epoch twice), a failure to draw never stops training; evaluate.py --plot overlays runs,
labelled by the flags in which they differ, and refuses what it cannot plot in one line."""
import hashlib
import json
import os

import pytest
from PIL import Image

import evaluate
import train
from demo.synthetic import render_sysu
from plumbing import curves, reports

# The tiny flags of tests/test_run_integrity.py; every epoch evaluated, the untrained model too, one lr drop.
TINY = ["--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16", "--k1", "6", "--k2", "2",
        "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1", "--extract-batch", "64",
        "--eval-every", "100", "--no-eval-untrained", "--workers", "0", "--eps", "0.6"]
CURVE = [*TINY, "--eval-every", "1", "--eval-untrained", "--stage-one-epochs", "1", "--lr-steps", "2"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    return root


def cli(main, *argv):
    """An entry point as the command line runs it -> exit status."""
    try:
        main(list(argv))
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1


def sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory):
    """Three epochs of MULT in one go ("full"), the same stopped after two and resumed ("part", with the picture's
    hash after the first two epochs), and OT's stage two from full's stage one ("ot"). Every epoch redraws the
    picture, as an epoch of a real run (REFRESH_S seconds or more) does."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {name: str(tmp / name) for name in ("full", "part", "ot")}
    common = ["--data-root", tiny_root, *CURVE]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(curves, "REFRESH_S", 0)
        assert cli(train.cli, *common, "--epochs", "3", "--out", out["full"]) == 0
        assert cli(train.cli, *common, "--epochs", "2", "--out", out["part"]) == 0
        out["part_two_epochs"] = curves.read_run(out["part"])
        out["part_two_epochs_png"] = sha1(os.path.join(out["part"], "curves.png"))
        assert cli(train.cli, *common, "--epochs", "3", "--out", out["part"]) == 0
        assert cli(train.cli, *common, "--epochs", "3", "--out", out["ot"], "--association", "ot",
                   "--init-from", os.path.join(out["full"], "stage1.pth")) == 0
    return out


def test_a_run_draws_its_curves_from_its_epoch_records(runs):
    run = runs["part_two_epochs"]
    with Image.open(os.path.join(runs["part"], "curves.png")) as picture:
        assert picture.format == "PNG" and picture.size == (1500, 850)
    records, s = run["records"], run["series"]
    assert s["epochs"] == [0, 1] and s["stage_two"] == 1 and s["lr_drops"] == []
    for r in records:                      # the record keeps R1 beside the mAP of every setting
        assert set(r["eval"]) == {"all", "indoor"} and all(set(v) == {"R1", "mAP"} for v in r["eval"].values())
    for metric in ("mAP", "R1"):
        x, y = s["test"][metric]["indoor"]
        assert x == [-1, 0, 1]             # -1: the untrained model, from results.json
        assert y[1:] == [r["eval"]["indoor"][metric] for r in records]
        assert y[0] == round(json.load(open(os.path.join(runs["part"], "results.json")))["untrained"]["indoor"]
                             ["mean"][metric], 2)
    assert s["loss"]["loss"] == ([0, 1], [r["loss"] for r in records])
    assert sorted(s["loss"]) == ["loss", "loss_ma", "loss_ms", "loss_oclr"]
    assert s["loss_iterations"][1] == [v for r in records for v in r["loss_per_iteration"]]
    assert s["clusters"]["vis"] == ([0, 1], [r["clusters_vis"] for r in records])
    assert s["diagnostics"]["labels vis→ir"] == ([1], [round(100 * records[1]["cross_accuracy"]["vis"], 2)])


def test_a_resume_continues_the_curve_with_no_epoch_twice(runs):
    part, full = curves.read_run(runs["part"]), curves.read_run(runs["full"])
    assert part["series"]["epochs"] == [0, 1, 2]
    assert part["series"]["lr_drops"] == [2]                 # the drop after the resume is marked
    assert part["series"]["test"]["mAP"]["all"][0] == [-1, 0, 1, 2]
    assert part["series"] == full["series"]                  # the same curve as the uninterrupted run's
    assert sha1(os.path.join(runs["part"], "curves.png")) != runs["part_two_epochs_png"]   # redrawn


def test_the_end_of_run_table_names_the_picture(tiny_root, runs, capsys):
    assert cli(train.cli, "--data-root", tiny_root, *CURVE, "--epochs", "3", "--out", runs["full"],
               "--select-on-test") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and f"learning curves: {os.path.join(runs['full'], 'curves.png')}" in out
    best = max(curves.read_run(runs["full"])["records"], key=lambda r: r["eval"]["all"]["mAP"])
    assert f"best epoch {best['epoch']}: {best['eval']}" in out         # --select-on-test reads R1 and mAP


@pytest.mark.parametrize("refresh_s, draws", [(0, 2), (1e9, 1)])
def test_a_failure_to_draw_is_a_warning_and_training_goes_on(tiny_root, tmp_path, monkeypatch, capsys, refresh_s,
                                                             draws):
    """Each picture tried fails; the run ends as if nothing had happened. An epoch of REFRESH_S seconds or more is
    followed by a picture, a shorter one is not; the end of a run always draws (the last epoch's picture is the
    end's: drawn once)."""
    def broken(*args, **kwargs):
        raise RuntimeError("no room on the canvas\nsecond line")
    monkeypatch.setattr(curves, "_draw", broken)
    monkeypatch.setattr(curves, "REFRESH_S", refresh_s)
    out = str(tmp_path / "run")
    assert cli(train.cli, "--data-root", tiny_root, *TINY, "--epochs", "2", "--stage-one-epochs", "1",
               "--out", out) == 0
    printed = capsys.readouterr().out
    warning = f"warning: curves: {os.path.join(out, 'curves.png')} not drawn (RuntimeError: no room on the canvas); " \
              f"training goes on"
    assert printed.count(warning) == draws                   # (0, 2): after the first epoch, and at the end
    assert warning in open(os.path.join(out, "log.txt")).read()
    assert "learning curves:" not in printed and not os.path.exists(os.path.join(out, "curves.png"))
    assert os.path.isfile(os.path.join(out, "results.json"))


def test_plot_overlays_runs_labelled_by_the_flags_they_differ_in(runs, tmp_path, capsys):
    png = str(tmp_path / "figures" / "mult_vs_ot.png")
    groups = evaluate.main(["--plot", runs["full"], runs["ot"], "--out", png])
    assert groups == [("--association mult", [runs["full"]]), ("--association ot", [runs["ot"]])]
    assert f"--association ot ({runs['ot']})" in capsys.readouterr().out
    with Image.open(png) as picture:
        assert picture.format == "PNG"
    full, ot = curves.read_run(runs["full"])["series"], curves.read_run(runs["ot"])["series"]
    assert ot["epochs"] == [0, 1, 2]                         # OT's curve starts with the shared stage one
    assert ot["loss"]["loss"][1][0] == full["loss"]["loss"][1][0] and ot["loss"]["loss"][1][1:] != \
        full["loss"]["loss"][1][1:]


ARGS = dict(method="mult", dataset="synthetic", trial=None, seed=1, association="mult", oclr=True, lr=3.5e-4,
            iters=[60, 60], workers=1)
PRESET = {"mult": ARGS, "mbmil": dict(ARGS, method="mbmil", iters=[60, 30])}


def run_args(method="mult", **flags):
    """args.json of a run: the method's preset with `flags` off it, as train.py writes it."""
    preset = PRESET[method]
    return dict(preset, **flags, changed_from_preset={k: [preset.get(k), v] for k, v in flags.items()})


def labels(*args):
    return [(label, members) for label, members in curves.run_labels(list(args), [f"runs/{i}" for i in
                                                                                   range(len(args))])]


def test_labels_come_from_the_flags_that_differ():
    mult, ot, mbmil = run_args(), run_args(association="ot", oclr=False), run_args("mbmil")
    assert labels(mult, ot) == [("--association mult --oclr", [0]), ("--association ot --no-oclr", [1])]
    # another method shows its own flags off its preset, not MULT's (MBMIL has no association)
    assert labels(mult, ot, mbmil) == [("--method mult --association mult --oclr", [0]),
                                       ("--method mult --association ot --no-oclr", [1]), ("--method mbmil", [2])]
    # seeds of one configuration share an entry when another flag differs; alone, each seed is its own
    seeds = [run_args(seed=s) if s > 1 else run_args() for s in (1, 2, 3)]
    assert labels(*seeds, ot, run_args(association="ot", oclr=False, seed=2)) == [
        ("--association mult --oclr (seeds 1, 2, 3)", [0, 1, 2]), ("--association ot --no-oclr (seeds 1, 2)", [3, 4])]
    assert labels(*seeds[:2]) == [("--seed 1", [0]), ("--seed 2", [1])]
    assert labels(mult, dict(mult, lr=1e-3, changed_from_preset={"lr": [3.5e-4, 1e-3]})) == \
        [("--lr 0.00035", [0]), ("--lr 0.001", [1])]
    assert labels(mult, mult) == [("runs/0", [0]), ("runs/1", [1])]      # nothing tells them apart: their folders
    # an args.json without changed_from_preset: every result flag may name the run, runtime ones never
    assert labels(dict(ARGS, lr=1e-3, workers=4), ARGS) == [("--lr 0.001", [0]), ("--lr 0.00035", [1])]


def test_seeds_are_drawn_as_their_mean_within_their_range():
    """The data of a group's line and band: per epoch the mean, lowest and highest of the seeds that have it."""
    seed1, seed2, seed3 = ([0, 1, 2], [10.0, 20.0, 30.0]), ([0, 1, 2], [14.0, 26.0, 30.0]), ([0, 1], [12.0, 20.0])
    assert curves.spread([seed1, seed2, seed3]) == ([0, 1, 2], [12.0, 22.0, 30.0], [10.0, 20.0, 30.0],
                                                     [14.0, 26.0, 30.0])
    assert curves.spread([seed1]) == (seed1[0], seed1[1], seed1[1], seed1[1])


def fake_run(folder, dataset="synthetic", records=None):
    """A run folder as train.py leaves it after two epochs (metrics.jsonl and args.json)."""
    os.makedirs(folder)
    records = records or [{"epoch": e, "stage": 1, "loss": 5.0 - e, "clusters_vis": 4, "clusters_ir": 3,
                           "lr": 3.5e-4} for e in range(2)]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(run_args(dataset=dataset) if dataset != "synthetic" else run_args(), f)
    return folder


@pytest.mark.parametrize("case", ["datasets", "twice", "not a run", "no out", "not a picture", "bad line",
                                  "unwritable"])
def test_plot_refuses_in_one_line(tmp_path, capsys, case):
    a, b = fake_run(str(tmp_path / "a")), fake_run(str(tmp_path / "b"), dataset="sysu")
    png = str(tmp_path / "out.png")
    argv, expected = {
        "datasets": (["--plot", a, b, "--out", png],
                     f"the runs are of different datasets (synthetic: {a}; sysu: {b}); plot one dataset at a time"),
        "twice": (["--plot", a, os.path.join(a, ""), "--out", png], "is named twice"),
        "not a run": (["--plot", a, str(tmp_path), "--out", png], f"{tmp_path} is not a run folder (no metrics.jsonl"),
        "no out": (["--plot", a], "--plot needs --out FILE ending in .png"),
        "not a picture": (["--plot", a, "--out", str(tmp_path / "out.txt")], "got --out"),
        "bad line": (["--plot", a, "--out", png], "metrics.jsonl line 3 is not an epoch record of train.py"),
        "unwritable": (["--plot", a, "--out", "/proc/vireid.png"], "--out /proc/vireid.png: cannot write into /proc"),
    }[case]
    if case == "bad line":
        with open(os.path.join(a, "metrics.jsonl"), "a") as f:
            f.write('{"stage": 1}\n')
    assert cli(evaluate.cli, *argv) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(png) and not os.path.exists(tmp_path / "out.txt")


def test_records_of_an_earlier_release_are_read(tmp_path):
    """An earlier release recorded the test mAP alone per setting: its runs still plot, their R1 missing."""
    records = [{"epoch": 0, "stage": 1, "loss": 3.0, "lr": 1e-3},
               {"epoch": 1, "stage": 2, "loss": 2.0, "lr": 1e-4, "eval": {"all": 24.29, "indoor": 35.17}}]
    s = curves.read_run(fake_run(str(tmp_path / "old"), records=records))["series"]
    assert s["test"]["mAP"] == {"all": ([1], [24.29]), "indoor": ([1], [35.17])} and s["test"]["R1"] == {}
    assert s["stage_two"] == 1 and s["lr_drops"] == [1]
    assert "test all mAP 24.29, indoor mAP 35.17" in reports.epoch_line(records[1])
    assert "test all R1 18.73 mAP 23.28" in reports.epoch_line(dict(records[1], eval={"all": {"R1": 18.73,
                                                                                                "mAP": 23.28}}))
