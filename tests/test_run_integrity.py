"""Run integrity: every number a run prints is that run's; bad input fails before training; nothing is lost.

Each test reproduces one way a researcher's workflow (a main run, ablations, seeds, resumes) could give a
silent wrong result or lose work, on a tiny synthetic set, and asserts the exit status, that the message
names the flag or file, and that nothing was written or lost (file lists and checksums before and after).
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import model as model_module
import train
from plumbing import checkpoints, logs
from demo.synthetic import render_sysu

TINY = ["--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16", "--k1", "6", "--k2", "2",
        "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1", "--extract-batch", "64",
        "--eval-every", "100", "--no-eval-untrained", "--workers", "0", "--eps", "0.6"]
TWO = ["--epochs", "2", "--stage-one-epochs", "1"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    return root


def cli(*argv):
    """train.py as the command line runs it: (exit status, results or None)."""
    try:
        return 0, train.cli(list(argv))
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 1, None


def snapshot(folder):
    """{relative path: sha1} of every file under `folder` ({} if it does not exist), but the run folder's lock
    file, which names the process that last held it."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name == ".lock":
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


def refused(capsys, folder, *argv, names):
    """Run argv, expect a non-zero exit with a message naming each of `names`, and `folder` unchanged."""
    before = snapshot(folder)
    status, _ = cli(*argv)
    err = capsys.readouterr().err
    assert status != 0, argv
    for name in names:
        assert name in err, (name, err)
    assert snapshot(folder) == before
    return err


def epochs_in(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


def weights(out, name="last.pth"):
    return torch.load(os.path.join(out, name), weights_only=False)["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- 1. a folder per configuration

def test_readme_ablation_commands_each_train_their_own_model(tiny_root, tmp_path, monkeypatch, capsys):
    """The README's main command, then --association ot, then --seed 2, all with the default --out."""
    monkeypatch.chdir(tmp_path)
    base = ["--data-root", tiny_root, *TINY, *TWO]
    for extra in ([], ["--association", "ot"], ["--seed", "2"]):
        assert cli(*base, *extra)[0] == 0
    capsys.readouterr()
    folders = sorted(os.listdir("runs"))
    assert len(folders) == 3
    saved = {f: json.load(open(os.path.join("runs", f, "args.json"))) for f in folders}
    assert sorted((a["association"], a["seed"]) for a in saved.values()) == [("mult", 1), ("mult", 2), ("ot", 1)]
    models = [weights(os.path.join("runs", f)) for f in folders]
    assert not same_weights(models[0], models[1]) and not same_weights(models[0], models[2]) \
        and not same_weights(models[1], models[2])
    for f in folders:   # each results.json is the evaluation of that folder's own model
        results = json.load(open(os.path.join("runs", f, "results.json")))["final"]
        assert results["all"]["mean"]["mAP"] == torch.load(os.path.join("runs", f, "last.pth"),
                                                           weights_only=False)["results"]["all"]["mean"]["mAP"]
    # the tags say what differs from the preset
    assert any("association-ot" in f for f in folders) or all("cfg-" in f for f in folders)
    # the same command again resumes its own folder (finished: it only reports)
    before = snapshot("runs")
    assert cli(*base, "--association", "ot")[0] == 0
    assert "resumed from" in capsys.readouterr().out
    assert sorted(os.listdir("runs")) == folders
    assert {k: v for k, v in snapshot("runs").items() if k.endswith(".pth")} == \
        {k: v for k, v in before.items() if k.endswith(".pth")}


def test_default_out_names_the_flags_off_the_preset():
    parse = lambda *a: train.resolve_args(train.get_args_parser().parse_args(list(a)))
    assert parse().out == os.path.join("runs", "mult_synthetic")
    assert parse("--dataset", "regdb", "--trial", "3").out == os.path.join("runs", "mult_regdb_trial3")
    assert parse("--association", "ot").out == os.path.join("runs", "mult_synthetic_association-ot")
    assert parse("--seed", "2", "--no-oclr").out == os.path.join("runs", "mult_synthetic_oclr-False".replace(
        "oclr-False", "no-oclr_seed-2"))
    assert parse("--lr", "0.001").out == os.path.join("runs", "mult_synthetic_lr-0.001")
    assert parse("--workers", "3", "--device", "cpu", "--eval-every", "5").out == os.path.join("runs", "mult_synthetic")
    root = parse("--data-root", "/some/where/else").out
    assert root.startswith(os.path.join("runs", "mult_synthetic_data-root-")) and "/some" not in root


@pytest.mark.parametrize("flag, value, shown", [("--data-root", None, "--data-root"), ("--height", "48", "--height 32"),
                                                ("--lr", "0.001", "--lr"), ("--arch", "resnet50", "--arch resnet18")])
def test_resume_refuses_changed_settings(tiny_root, tmp_path, capsys, flag, value, shown):
    out = str(tmp_path / "run")
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO)[0] == 0
    capsys.readouterr()
    if value is None:       # another data root with the same images
        value = str(tmp_path / "copy")
        shutil.copytree(tiny_root, value)
    argv = ["--data-root", tiny_root, "--out", out, *TINY, *TWO, flag, value]
    if flag == "--data-root":
        argv = ["--out", out, *TINY, *TWO, flag, value]
    err = refused(capsys, out, *argv, names=[shown, "(saved)", "(now)"])
    assert "Traceback" not in err


def test_a_checkpoint_of_an_earlier_release_is_refused_with_how_to_start_afresh(tiny_root, tmp_path, capsys):
    """A run folder of an earlier release (its checkpoint's format) is not resumed, nor branched from: one line
    names the file and says how to start afresh, and the folder is left as it was. Evaluation still reads it."""
    out = str(tmp_path / "run")
    argv = ["--data-root", tiny_root, "--out", out, *TINY, *TWO]
    assert cli(*argv)[0] == 0
    for name in ("last.pth", "stage1.pth"):
        path = os.path.join(out, name)
        ckpt = torch.load(path, weights_only=False)
        ckpt["format"] = "vireid-checkpoint-v1"
        torch.save(ckpt, path)
    capsys.readouterr()
    err = refused(capsys, out, *argv, "--epochs", "3", names=[os.path.join(out, "last.pth"), "earlier release",
                                                              "--resume none --overwrite"])
    assert len(err.strip().splitlines()) == 1
    refused(capsys, out, "--data-root", tiny_root, "--out", str(tmp_path / "branch"), *TINY, *TWO,
            "--init-from", os.path.join(out, "stage1.pth"), "--no-oclr", names=["stage1.pth", "earlier release"])
    assert not (tmp_path / "branch").exists()
    fn, meta = checkpoints.model_from_checkpoint(os.path.join(out, "last.pth"))
    assert meta["epoch"] == 2


def test_resume_refuses_fewer_epochs_than_done(tiny_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO)[0] == 0
    capsys.readouterr()
    refused(capsys, out, "--data-root", tiny_root, "--out", out, *TINY, "--epochs", "1", "--stage-one-epochs", "1",
            names=["--epochs 1", "2 epochs done"])


# --------------------------------------------------------------------------- 2. branching from stage one

def test_init_from_stage_one_equals_the_uninterrupted_ablation(tiny_root, tmp_path, capsys):
    common = ["--data-root", tiny_root, *TINY, "--epochs", "3", "--stage-one-epochs", "1"]
    main, ot, branch = (str(tmp_path / n) for n in ("main", "ot", "branch"))
    assert cli(*common, "--out", main)[0] == 0
    assert cli(*common, "--out", ot, "--association", "ot", "--no-oclr")[0] == 0
    stage1 = os.path.join(main, "stage1.pth")
    assert torch.load(stage1, weights_only=False)["epoch"] == 1
    assert cli(*common, "--out", branch, "--association", "ot", "--no-oclr", "--init-from", stage1)[0] == 0
    assert "initialised from" in capsys.readouterr().out
    assert same_weights(weights(ot), weights(branch))
    assert epochs_in(branch) == [0, 1, 2]
    with open(os.path.join(ot, "metrics.jsonl")) as a, open(os.path.join(branch, "metrics.jsonl")) as b:
        strip = lambda r: {k: v for k, v in json.loads(r).items() if k != "time"}
        assert [strip(r) for r in a] == [strip(r) for r in b]


def test_init_from_refuses_another_stage_one(tiny_root, tmp_path, capsys):
    common = ["--data-root", tiny_root, *TINY, "--epochs", "2", "--stage-one-epochs", "1"]
    main = str(tmp_path / "main")
    assert cli(*common, "--out", main)[0] == 0
    capsys.readouterr()
    stage1 = os.path.join(main, "stage1.pth")
    refused(capsys, str(tmp_path), *common, "--out", str(tmp_path / "b"), "--lr", "0.001", "--init-from", stage1,
            names=["--lr", "(saved)"])
    refused(capsys, str(tmp_path), *common, "--out", str(tmp_path / "c"), "--k1", "8", "--init-from", stage1,
            names=["--k1 6 (saved) vs 8 (now)"])
    refused(capsys, str(tmp_path), "--data-root", tiny_root, *TINY, "--epochs", "3", "--stage-one-epochs", "2",
            "--out", str(tmp_path / "d"), "--init-from", stage1, names=["--init-from", "end of stage one"])


# --------------------------------------------------------------------------- 3. validated before the first epoch

@pytest.mark.parametrize("argv, named", [
    (["--iters", "2,0"], "--iters"), (["--iters", "a"], "--iters"), (["--eval-every", "0"], "--eval-every"),
    (["--eval-trials", "0"], "--eval-trials"), (["--height", "4"], "--height"), (["--width", "2"], "--width"),
    (["--epochs", "0"], "--epochs"), (["--stage-one-epochs", "5"], "--stage-one-epochs"),
    (["--clusters", "0"], "--clusters"), (["--beta", "1.5"], "--beta"), (["--eps", "0"], "--eps"),
    (["--seed", "-1"], "--seed"), (["--lr-steps", "x"], "--lr-steps"),
    (["--dataset", "regdb", "--trial", "11"], "--trial"),
    (["--resume", "nowhere.pth"], "--resume"), (["--init-from", "nowhere.pth"], "--init-from"),
    (["--overwrite"], "--overwrite"), (["--method", "mbmil", "--global-k1", "7"], "--global-k1"),
    (["--out", "/proc/vireid-run"], "--out /proc/vireid-run: cannot write"),      # os.access says yes to root there
    (["--cache-dir", "/proc/vireid-cache"], "--cache-dir /proc/vireid-cache: cannot write")])
def test_bad_flags_refused_before_anything_is_written(tiny_root, tmp_path, capsys, argv, named):
    out = tmp_path / "run"
    refused(capsys, str(tmp_path), "--data-root", tiny_root, "--out", str(out), *TINY, *TWO, *argv, names=[named])
    assert not out.exists()


def corrupt(root, rel):
    with open(os.path.join(root, rel), "wb") as f:
        f.write(b"not a jpeg")


@pytest.mark.parametrize("damage, named", [
    (lambda r: corrupt(r, first(r, "cam3", test=True)), "cannot decode image"),
    (lambda r: os.remove(os.path.join(r, "exp", "test_id.txt")), "test_id.txt"),
    (lambda r: corrupt(r, first(r, "cam1", test=False)), "cannot decode image"),
    (lambda r: open(os.path.join(r, "exp", "test_id.txt"), "w").write(
        open(os.path.join(r, "exp", "test_id.txt")).read().strip() + "," + first_train_id(r) + "\n"), "disjoint"),
])
def test_bad_test_or_training_data_refused_before_training(tiny_root, tmp_path, capsys, damage, named):
    root = str(tmp_path / "data")
    shutil.copytree(tiny_root, root)
    damage(root)
    out = tmp_path / "run"
    refused(capsys, root, "--data-root", root, "--out", str(out), *TINY, *TWO, names=[named])
    assert not out.exists()


def split_ids(root, name):
    return [int(x) for x in open(os.path.join(root, "exp", f"{name}_id.txt")).read().replace(",", " ").split()]


def first_train_id(root):
    return str(split_ids(root, "train")[0])


def first(root, cam, test):
    ids = split_ids(root, "test") if test else split_ids(root, "train")
    for pid in ids:
        folder = os.path.join(root, cam, f"{pid:04d}")
        if os.path.isdir(folder):
            return os.path.relpath(os.path.join(folder, sorted(os.listdir(folder))[0]), root)
    raise AssertionError("no such image")


def test_test_labels_that_match_nothing_are_refused(tmp_path, capsys):
    from demo.synthetic import render_regdb
    root = tmp_path / "regdb"
    render_regdb(root, num_ids=6, height=32, width=16, seed=0)
    path = root / "idx" / "test_thermal_1.txt"
    lines = [line.rsplit(" ", 1) for line in path.read_text().splitlines()]
    path.write_text("".join(f"{p} {int(label) + 1000}\n" for p, label in lines))    # no visible test label
    refused(capsys, str(tmp_path), "--dataset", "regdb", "--data-root", str(root), "--out", str(tmp_path / "run"),
            *TINY, *TWO, "--k1", "2", "--k2", "1", names=["no query identity appears in the gallery"])


# --------------------------------------------------------------------------- 4. nothing deleted or overwritten unasked

def test_resume_none_refuses_a_finished_run_unless_overwrite(tiny_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO)[0] == 0
    capsys.readouterr()
    refused(capsys, out, "--data-root", tiny_root, "--out", out, *TINY, *TWO, "--resume", "none",
            names=["--overwrite", "last.pth"])
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO, "--resume", "none", "--overwrite")[0] == 0
    assert epochs_in(out) == [0, 1]                          # one run in metrics.jsonl, not two
    assert open(os.path.join(out, "log.txt")).read().count("epoch 0 (stage") == 1


def test_a_refused_resume_leaves_args_json_alone(tiny_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO)[0] == 0
    capsys.readouterr()
    refused(capsys, out, "--data-root", tiny_root, "--out", out, *TINY, *TWO, "--seed", "5", names=["--seed 1"])


def test_a_kill_between_checkpoint_and_metrics_leaves_no_epoch_twice(tiny_root, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real = logs.RunLog.metrics

    def killed(self, record):          # the process dies after last.pth of epoch 0 is written
        raise KeyboardInterrupt
    monkeypatch.setattr(logs.RunLog, "metrics", killed)
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO)[0] == 130
    assert torch.load(os.path.join(out, "last.pth"), weights_only=False)["epoch"] == 1
    monkeypatch.setattr(logs.RunLog, "metrics", real)
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO)[0] == 0
    assert epochs_in(out) == [0, 1]
    log = open(os.path.join(out, "log.txt")).read()
    assert log.count("epoch 0 (stage") == 1 and log.count("epoch 1 (stage") == 1


def test_a_kill_inside_an_epoch_cuts_its_log_lines(tiny_root, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = train.mult_epoch

    def dies_in_epoch_one(model, optimizer, vis, ir, epoch, args):
        if epoch == 1:
            train.log.info("epoch 1 (stage 2): half-written")
            raise KeyboardInterrupt
        return real(model, optimizer, vis, ir, epoch, args)
    monkeypatch.setattr(train, "mult_epoch", dies_in_epoch_one)
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO)[0] == 130
    monkeypatch.setattr(train, "mult_epoch", real)
    assert cli("--data-root", tiny_root, "--out", out, *TINY, *TWO)[0] == 0
    log = open(os.path.join(out, "log.txt")).read()
    assert "half-written" not in log and log.count("epoch 1 (stage") == 1 and epochs_in(out) == [0, 1]


def test_a_failed_checkpoint_write_removes_its_temporary_file(tmp_path, monkeypatch):
    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    path = tmp_path / "last.pth"
    path.write_bytes(b"previous")
    with pytest.raises(OSError, match=str(tmp_path)) as err:
        checkpoints.save_checkpoint({"epoch": 1}, str(path))
    assert "full" in str(err.value) and "inline_container" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"] and path.read_bytes() == b"previous"


def test_train_never_rerenders_over_files_it_did_not_write(tmp_path, capsys):
    from demo import synthetic
    root = tmp_path / "syn"
    render_sysu(root, num_ids=6, images_per_cam=1, height=16, width=8, seed=4)
    meta = json.loads((root / synthetic.META).read_text())
    (root / synthetic.META).write_text(json.dumps(dict(meta, version=synthetic.FORMAT_VERSION - 1)))
    (root / "my_notes.txt").write_text("keep me")
    refused(capsys, str(tmp_path), "--data-root", str(root), "--out", str(tmp_path / "run"), *TINY, *TWO,
            names=["my_notes.txt"])


# --------------------------------------------------------------------------- 5. bad data

def test_sysu_id_files_in_either_form(tiny_root, tmp_path):
    from data.sysu import sysu_train
    root = str(tmp_path / "data")
    shutil.copytree(tiny_root, root)
    one_line = sysu_train(root, expected=None)
    for name in ("train", "val", "test"):
        ids = split_ids(root, name)
        open(os.path.join(root, "exp", f"{name}_id.txt"), "w").write("\n".join(map(str, ids)) + "\n")
    per_line = sysu_train(root, expected=None)
    assert per_line[0].paths == one_line[0].paths and per_line[1].paths == one_line[1].paths
    open(os.path.join(root, "exp", "val_id.txt"), "a").write("12\nx13\n")
    with pytest.raises(ValueError, match=r"val_id.txt:\d+: .*'x13'"):
        sysu_train(root, expected=None)
    ids = split_ids(root, "train")
    open(os.path.join(root, "exp", "train_id.txt"), "w").write(f"{ids[0]},{ids[0]}\n")
    with pytest.raises(ValueError, match="listed twice"):
        sysu_train(root, expected=None)


def test_hidden_and_non_image_files_are_skipped_and_named(tiny_root, tmp_path):
    from data.sysu import sysu_train
    root = str(tmp_path / "data")
    shutil.copytree(tiny_root, root)
    clean = sysu_train(root, expected=None)
    folder = os.path.dirname(os.path.join(root, first(root, "cam1", test=False)))
    for name in (".DS_Store", "._0001.jpg", "notes.txt"):
        open(os.path.join(folder, name), "w").write("junk")
    with pytest.warns(UserWarning, match=r"skipped 3 hidden or non-image files.*\.DS_Store"):
        vis, ir = sysu_train(root, expected=None)
    assert vis.paths == clean[0].paths and ir.paths == clean[1].paths


def test_regdb_duplicated_lines_and_train_test_overlap(tmp_path):
    from data.regdb import regdb_train
    from demo.synthetic import render_regdb
    root = tmp_path / "regdb"
    render_regdb(root, num_ids=4, height=16, width=8, seed=0)
    idx = root / "idx"
    train_v = (idx / "train_visible_1.txt").read_text()
    (idx / "train_visible_1.txt").write_text(train_v + train_v.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"train_visible_1.txt:\d+: .* listed twice"):
        regdb_train(root, 1)
    (idx / "train_visible_1.txt").write_text(train_v)
    (idx / "test_visible_1.txt").write_text(train_v)           # train idx = test idx
    with pytest.raises(ValueError, match="disjoint"):
        regdb_train(root, 1)


def test_sixteen_bit_and_palette_images_decode_to_8_bit(tmp_path):
    from data.common import read_image
    values = (np.arange(32 * 16, dtype=np.int64).reshape(32, 16) * 128).astype(np.uint16)  # 0..65408
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = np.asarray(read_image(tmp_path / "deep.png"))
    want = np.floor(values / 257.0 + 0.5).astype(np.uint8)          # round(v / 257), the 16 -> 8 bit map
    assert got.dtype == np.uint8 and (got == want[..., None]).all() and (got < 255).mean() > 0.99   # not white
    rgb = np.random.default_rng(0).integers(0, 255, (32, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    palette = Image.open(tmp_path / "palette.png")
    assert palette.mode == "P"
    assert (np.asarray(read_image(tmp_path / "palette.png")) == np.asarray(palette.convert("RGB"))).all()


# --------------------------------------------------------------------------- 6. messages

@pytest.mark.parametrize("content", ["text", "empty", "no_info", "bad_json", "bad_rows"])
def test_malformed_feature_file_is_one_sentence(tmp_path, capsys, content):
    import evaluate
    path = tmp_path / "f.npz"
    arrays = dict(feats=np.eye(2, dtype=np.float32), paths=np.array(["a", "b"]), pids=np.array([1, 2]),
                  camids=np.array([1, 3]), modality=np.array([0, 1]), info=np.array('{"protocol": "sysu"}'),
                  plan=np.array('[["all", 0]]'), q0=np.array([1]), g0=np.array([0]))
    if content == "text":
        path.write_text("hello")
    elif content == "empty":
        path.write_bytes(b"")
    else:
        if content == "no_info":
            del arrays["info"]
        if content == "bad_json":
            arrays["plan"] = np.array("[[")
        if content == "bad_rows":
            arrays["g0"] = np.array([7])
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises(SystemExit) as exit:
        evaluate.cli(["--from-features", str(path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and str(path) in err and "Traceback" not in err


def test_text_file_as_pretrained_weights(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("these are not weights")
    with pytest.raises(ValueError) as err:
        model_module.TwoStreamNet("resnet18", str(path))
    assert str(path) in str(err.value) and "weights_only" not in str(err.value) and "issue" not in str(err.value)


def test_zero_feature_row_reports_its_norm():
    import clustering
    x = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    x[3] = 0
    with pytest.raises(ValueError, match="row 3 has norm 0 "):
        clustering.jaccard_similarity(x, 4, 2)


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from plumbing.runs import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_folder_another_live_run_writes_is_refused(tiny_root, tmp_path, capsys):
    """The run folder is held by an OS lock (flock) from the first step of a run: while another process holds it,
    a start is refused at once, naming that process; the lock dies with its process, so none is ever stale; a
    pid written into .lock (an earlier release's lock, or a reused pid) holds nothing."""
    import fcntl
    import subprocess
    import sys
    out = tmp_path / "run"
    out.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(out), repo], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        err = refused(capsys, str(out), "--data-root", tiny_root, "--out", str(out), *TINY, *TWO,
                      names=[f"process {other.pid}", str(out)])
        assert len(err.strip().splitlines()) == 1
    finally:
        other.kill()
        other.wait()
    assert cli("--data-root", tiny_root, "--out", str(out), *TINY, *TWO)[0] == 0     # died with its holder
    with open(out / ".lock", "r+") as f:                                           # released when the run ends
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid}\n")                             # a live pid, but no lock
        assert cli("--data-root", tiny_root, "--out", str(out), *TINY, "--epochs", "3",
                   "--stage-one-epochs", "1")[0] == 0
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_same_command_started_twice_trains_once(tiny_root, tmp_path):
    """The same command started twice, 0.3 s apart: one run trains, the other is refused at once with one line
    naming the live run (the folder is held from a run's first step, before its checks and its cache build),
    and log.txt holds each epoch once."""
    import subprocess
    import sys
    out = str(tmp_path / "run")
    argv = [sys.executable, "train.py", "--data-root", tiny_root, "--out", out, *TINY, *TWO, "--iters", "25"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors = [p.communicate(timeout=300)[1] for p in (first, second)]
    codes = [first.returncode, second.returncode]
    assert sorted(codes) == [0, 2], (codes, errors)
    loser = codes.index(2)
    winner = (first, second)[1 - loser]
    assert "being written by another run" in errors[loser] and f"process {winner.pid}" in errors[loser]
    assert len(errors[loser].strip().splitlines()) == 1 and "checking images" not in errors[loser]
    log = open(os.path.join(out, "log.txt")).read()
    assert log.count("epoch 0 (stage") == 1 and log.count("epoch 1 (stage") == 1 and epochs_in(out) == [0, 1]


# --------------------------------------------------------------------------- 7. issue 26: the last late checks

def copy_root(tiny_root, tmp_path, name="data"):
    root = str(tmp_path / name)
    shutil.copytree(tiny_root, root)
    return root


def one_line(err):
    """stderr holds one line of message, progress bars (redrawn with \\r) aside, and no traceback."""
    return len([line for line in err.split("\n") if line.strip() and "\r" not in line]) == 1 \
        and "Traceback" not in err


def undrawn_candidate(root, trials=1):
    """A gallery candidate (SYSU layout) that no all- or indoor-search draw of trials 0..trials-1 picks."""
    from data.sysu import sysu_gallery_candidates, sysu_test
    drawn = {p for mode in ("all", "indoor") for t in range(trials) for p in sysu_test(root, mode, t)[1].paths}
    return next(p for p in sysu_gallery_candidates(root, "all").paths if p not in drawn)


def test_a_broken_gallery_candidate_no_drawn_trial_picks_is_refused_before_training(tiny_root, tmp_path, capsys):
    """The first evaluation extracts every gallery candidate, not only the drawn ones: a broken candidate that the
    --eval-trials draws do not pick is refused by the check before the first epoch, not by the evaluation after."""
    root = copy_root(tiny_root, tmp_path)
    bad = undrawn_candidate(root)
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    out = tmp_path / "run"
    err = refused(capsys, root, "--data-root", root, "--out", str(out), *TINY, *TWO, names=["cannot decode image",
                                                                                           bad])
    assert one_line(err) and not out.exists()


def test_device_gpu_is_refused_before_anything(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    err = refused(capsys, str(tmp_path), "--data-root", tiny_root, "--out", str(out), *TINY, *TWO,
                  "--device", "gpu", names=["--device", "'gpu'", "cpu, cuda or cuda:N"])
    assert one_line(err) and not out.exists()


def test_a_resume_whose_training_images_changed_is_refused_naming_them(tiny_root, tmp_path, capsys):
    """An image removed, added, or replaced by another of the same size with its modification time restored,
    between a run and its resume (--allow-count-mismatch, so that the counts let it through): refused, naming
    what changed; the run folder is left as it was. Restored, the resume trains on."""
    root = copy_root(tiny_root, tmp_path)
    out = str(tmp_path / "run")
    argv = ["--data-root", root, "--out", out, *TINY, "--allow-count-mismatch"]
    assert cli(*argv, "--epochs", "1", "--stage-one-epochs", "1")[0] == 0
    capsys.readouterr()
    more = [*argv, "--epochs", "2", "--stage-one-epochs", "1"]
    victim = first(root, "cam1", test=False)
    path = os.path.join(root, victim)
    saved = open(path, "rb").read()
    stat = os.stat(path)
    os.remove(path)                                                               # removed
    err = refused(capsys, out, *more, names=["1 vis image removed", victim, "--resume none --overwrite"])
    assert one_line(err)
    with open(path, "wb") as f:                                                   # replaced: same size and mtime
        other = open(os.path.join(root, first(root, "cam2", test=False)), "rb").read()
        f.write((other + b"\0" * len(saved))[:len(saved)] if len(other) <= len(saved) else saved[::-1])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    refused(capsys, out, *more, names=["1 vis image replaced", victim])
    with open(path, "wb") as f:
        f.write(saved)
    shutil.copy(path, path.replace(".jpg", "_copy.jpg"))                            # added
    refused(capsys, out, *more, names=["1 vis image added", victim.replace(".jpg", "_copy.jpg")])
    os.remove(path.replace(".jpg", "_copy.jpg"))
    assert cli(*more)[0] == 0 and epochs_in(out) == [0, 1]                        # the same images: it resumes


def test_a_scrambled_cache_is_not_trained_on(tiny_root, tmp_path):
    """The decode-once cache's bytes scrambled between a run and its resume: the resume finds the damaged rows
    (their checksums), decodes them again, says so, and trains as the uninterrupted run did."""
    argv = ["--data-root", tiny_root, *TINY, "--stage-one-epochs", "1", "--no-check-images"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert cli(*argv, "--epochs", "2", "--out", full)[0] == 0
    assert cli(*argv, "--epochs", "1", "--out", part)[0] == 0
    for name in os.listdir(os.path.join(part, "cache")):
        if name.endswith(".u8"):
            path = os.path.join(part, "cache", name)
            data = np.fromfile(path, dtype=np.uint8)
            np.random.default_rng(0).permutation(data).tofile(path)
    assert cli(*argv, "--epochs", "2", "--out", part)[0] == 0
    log = open(os.path.join(part, "log.txt")).read()
    assert "rows damaged (their pixels no longer match their checksum) and decoded again" in log
    strip = lambda out: [{k: v for k, v in json.loads(r).items() if k not in ("time", "eval")}   # noqa: E731
                         for r in open(os.path.join(out, "metrics.jsonl"))]           # part evaluated epoch 0
    assert strip(part) == strip(full)
    assert json.load(open(os.path.join(part, "results.json"))) == json.load(open(os.path.join(full, "results.json")))


def tiny_checkpoint(tiny_root, tmp_path):
    out = str(tmp_path / "run")
    assert cli("--data-root", tiny_root, "--out", out, *TINY, "--epochs", "1", "--stage-one-epochs", "1")[0] == 0
    return out


def test_a_checkpoint_holding_another_archs_weights_is_one_line(tiny_root, tmp_path, capsys):
    """A resnet18 run's checkpoint holding resnet50 weights: evaluate.py and the resume each say so in one line,
    without a traceback or load_state_dict's size-mismatch line per tensor; so does a resnet50 --pretrained file
    for a resnet18."""
    import evaluate
    out = tiny_checkpoint(tiny_root, tmp_path)
    path = os.path.join(out, "last.pth")
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"] = model_module.TwoStreamNet("resnet50").state_dict()
    torch.save(ckpt, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        evaluate.cli(["--dataset", "synthetic", "--data-root", tiny_root, "--checkpoint", path, "--workers", "0"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and one_line(err) and path in err and "resnet50 weights" in err
    assert "size mismatch" not in err
    err = refused(capsys, out, "--data-root", tiny_root, "--out", out, *TINY, *TWO, names=[path, "resnet50 weights"])
    assert one_line(err) and "size mismatch" not in err
    weights = str(tmp_path / "r50.pth")
    torch.save(__import__("torchvision").models.resnet50(weights=None).state_dict(), weights)
    err = refused(capsys, str(tmp_path), "--data-root", tiny_root, "--out", str(tmp_path / "other"), *TINY, *TWO,
                  "--pretrained", weights, names=["--pretrained", weights, "23 tensors of other shapes"])
    assert one_line(err) and not (tmp_path / "other").exists()


def test_checkpoint_naming_a_folder_says_so(tiny_root, tmp_path, capsys):
    import evaluate
    with pytest.raises(SystemExit) as exit:
        evaluate.cli(["--dataset", "synthetic", "--data-root", tiny_root, "--checkpoint", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and one_line(err) and "--checkpoint" in err and "not a folder" in err


def test_a_regdb_idx_path_that_is_a_folder_says_so(tmp_path, capsys):
    from demo.synthetic import render_regdb
    root = tmp_path / "regdb"
    render_regdb(root, num_ids=6, height=32, width=16, seed=0)
    index = root / "idx" / "train_visible_1.txt"
    rel = index.read_text().splitlines()[2].rsplit(" ", 1)[0]
    os.remove(root / rel)
    os.makedirs(root / rel)
    err = refused(capsys, str(tmp_path), "--dataset", "regdb", "--data-root", str(root), "--out",
                  str(tmp_path / "run"), *TINY, *TWO, "--k1", "2", "--k2", "1",
                  names=["train_visible_1.txt:3", str(root / rel), "is a folder", "expected an image file"])
    assert one_line(err)


def test_a_sysu_folder_named_like_an_image_is_named_not_skipped_silently(tiny_root, tmp_path):
    from data.sysu import sysu_train
    root = copy_root(tiny_root, tmp_path)
    path = os.path.join(root, first(root, "cam1", test=False))
    os.remove(path)
    os.makedirs(path)
    with pytest.warns(UserWarning, match=r"1 folder .*named like an image, e\.g\. .*" + os.path.basename(path)):
        sysu_train(root, expected=None)


def test_an_llcm_test_folder_named_like_an_image_is_named_once(tmp_path):
    """A folder where LLCM's test set has an image is named in the warning, and the check before the first epoch
    repeats a reader's warning once, though the test lists are read once per trial."""
    from argparse import Namespace
    from data.llcm import llcm_test
    from demo.synthetic import render_llcm
    from plumbing import checks
    root = tmp_path / "llcm"
    render_llcm(root, num_ids=9, images_per_cam=1, height=32, width=16, seed=0)
    path = sorted((root / "test_nir").rglob("*.jpg"))[0]
    path.unlink()
    path.mkdir()
    with pytest.warns(UserWarning, match=r"LLCM test set: .*1 folder .*named like an image, e\.g\. .*" + path.name):
        llcm_test(str(root), "i2v", 0)
    args = Namespace(dataset="llcm", data_root=str(root), trial=None, allow_count_mismatch=False, eval_trials=3)
    warned = checks.check_data(args)[3]
    assert len([w for w in warned if "LLCM test set" in w]) == 1


def test_tiny_and_far_from_the_aspect_images_are_named_in_one_warning(tiny_root, tmp_path, capsys):
    """1x1 and 10000x10 images (a training image each, and a query) train, stretched as before, but the check
    before the first epoch names them in one warning line with their count."""
    root = copy_root(tiny_root, tmp_path)
    odd = [os.path.join(root, first(root, cam, test)) for cam, test in (("cam1", False), ("cam3", False),
                                                                         ("cam3", True))]
    for path, size in zip(odd, ((1, 1), (10000, 10), (1, 1))):
        Image.new("RGB", size, (90, 120, 150)).save(path)
    out = str(tmp_path / "run")
    assert cli("--data-root", root, "--out", out, *TINY, "--epochs", "1", "--stage-one-epochs", "1")[0] == 0
    lines = [line for line in open(os.path.join(out, "log.txt")) if "images are tiny" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: 3 of ") and "(1x1)" in lines[0]
    assert all(p in lines[0] for p in odd) and "(10000x10)" in lines[0]


def test_llcm_training_lists_naming_a_test_image_are_refused(tmp_path, capsys):
    from demo.synthetic import render_llcm
    root = tmp_path / "llcm"
    render_llcm(root, num_ids=9, images_per_cam=1, height=32, width=16, seed=0)
    index = root / "idx" / "train_vis.txt"
    lines = index.read_text().splitlines()
    test_image = next(str(p.relative_to(root)) for p in sorted((root / "test_vis").rglob("*.jpg")))
    lines[0] = f"{test_image} {lines[0].rsplit(' ', 1)[1]}"             # the same counts: only the overlap is wrong
    index.write_text("\n".join(lines) + "\n")
    err = refused(capsys, str(tmp_path), "--dataset", "llcm", "--data-root", str(root), "--out",
                  str(tmp_path / "run"), *TINY, *TWO, "--k1", "2", "--k2", "1",
                  names=["train_vis.txt", test_image, "disjoint"])
    assert one_line(err)


def test_summarize_refuses_a_run_named_twice(tmp_path, capsys):
    import evaluate
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"method": "mult", "dataset": "sysu", "seed": 1}))
    result = {"protocol": "sysu", "rerank": None, "trials": [], "mean": {m: 1.0 for m in ("R1", "R5", "R10",
                                                                                           "R20", "mAP", "mINP")}}
    (run / "results.json").write_text(json.dumps({"final": {"all": result}, "untrained": None}))
    os.symlink(run, tmp_path / "link")
    for twice in ([str(run), str(run) + "/"], [str(run), str(tmp_path / "link")]):
        with pytest.raises(SystemExit) as exit:
            evaluate.cli(["--summarize", *twice])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and one_line(err) and "same run folder" in err and twice[1] in err
    with pytest.raises(SystemExit) as exit:                         # the table is not printed, then lost
        evaluate.cli(["--summarize", str(run), "--out", "/proc/vireid-summary"])
    captured = capsys.readouterr()
    assert exit.value.code == 2 and one_line(captured.err) and "--out /proc/vireid-summary" in captured.err
    assert captured.out == ""


def fake_checkpoint(monkeypatch, height=32, width=16):
    import evaluate
    import features

    def model_from_checkpoint(path, device, method=None):
        return features.pixel_model, {"height": height, "width": width, "dataset": "synthetic", "method": "mult"}
    monkeypatch.setattr(evaluate, "model_from_checkpoint", model_from_checkpoint)


def test_evaluating_at_another_size_than_trained_says_so_in_the_table(tiny_root, tmp_path, monkeypatch, capsys):
    import evaluate
    fake_checkpoint(monkeypatch)
    out = tmp_path / "eval"
    evaluate.main(["--dataset", "synthetic", "--data-root", tiny_root, "--checkpoint", "ck.pth", "--mode", "all",
                   "--trials", "0", "--height", "64", "--width", "32", "--workers", "0", "--out", str(out)])
    table = capsys.readouterr().out
    assert "note: evaluated at 64x32" in table and "trained at 32x16" in table
    saved = json.loads((out / "results.json").read_text())["results"]["all"]
    assert saved["input_size"] == {"evaluated": [64, 32], "trained": [32, 16]}
    evaluate.main(["--dataset", "synthetic", "--data-root", tiny_root, "--checkpoint", "ck.pth", "--mode", "all",
                   "--trials", "0", "--workers", "0"])
    assert "note: evaluated at" not in capsys.readouterr().out                    # its own size: no note


@pytest.mark.parametrize("argv, named", [
    (["--rerank-k1", "-5"], "--rerank-k1"),                                     # without --rerank: not ignored
    (["--rerank", "--rerank-k1", "0"], "--rerank-k1"),
    (["--rerank", "--rerank-k2", "0"], "--rerank-k2"),
    (["--rerank", "--rerank-lambda", "1.5"], "--rerank-lambda"),
    (["--rerank", "--rerank-k1", "100000"], "--rerank-k1 100000"),              # beyond the test set's size
    (["--save-ranklist", "3", "--out", "{file}/eval"], "--out"),
    (["--out", "{file}"], "--out"),
    (["--save-ranklist", "3", "--out", "/proc/vireid-eval"], "--out"),        # os.access says yes to root there
    (["--save-features", "{folder}"], "--save-features"),
    (["--save-features", "{file}/feats.npz"], "--save-features"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "gpu"], "--device"),
    (["--out", "{folder}"], "a training run's"),                                # its results.json is not replaced
])
def test_evaluate_flags_are_checked_before_any_feature_is_extracted(tiny_root, tmp_path, monkeypatch, capsys,
                                                                     argv, named):
    """Every flag of evaluate.py in one line naming it, exit status 2, before a single feature is extracted (on
    SYSU-MM01 that is a minute of work lost per mistake) and with nothing written."""
    import evaluate
    (tmp_path / "file").write_text("in the way")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "args.json").write_text("{}")                          # a training run's folder
    argv = [a.format(file=tmp_path / "file", folder=tmp_path / "folder") for a in argv]

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted before the flags were checked")
    monkeypatch.setattr(evaluate, "extract_features", no_extraction)
    before = snapshot(str(tmp_path))
    with pytest.raises(SystemExit) as exit:
        evaluate.cli(["--dataset", "synthetic", "--data-root", tiny_root, "--model", "pixels", "--mode", "all",
                      "--trials", "0", "--workers", "0", *argv])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and one_line(err) and named in err
    assert snapshot(str(tmp_path)) == before


def test_what_rank_zero_sends_every_rank_holds_no_checkpoint(tiny_root, tmp_path):
    """A resume's preparation is broadcast to every rank (and onto its device): the checkpoint stays out of it, each
    rank reads the file itself. With the optimizer state inside, a multi-GPU resume sent hundreds of megabytes
    through rank 0 and restored the RNG from a CUDA tensor, which torch.set_rng_state refuses."""
    from contextlib import ExitStack
    from plumbing import checks
    out = str(tmp_path / "run")
    argv = ["--data-root", tiny_root, "--out", out, *TINY, "--stage-one-epochs", "1"]
    assert cli(*argv, "--epochs", "1")[0] == 0
    args = train.resolve_args(train.get_args_parser().parse_args(argv + ["--epochs", "2"]))
    with ExitStack() as hold:
        run = checks.prepare_run(args, hold, train.learning_rate, "bilinear")

    def tensors(value):
        if isinstance(value, torch.Tensor):
            return [value]
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
        return [t for v in items for t in tensors(v)]
    assert run["plan"]["mode"] == "resume" and run["weights"] is None       # --pretrained none: nothing to send
    assert tensors(run) == []
    model = train.TwoStreamNet(args.arch, None)
    state = checkpoints.restore(model, train.make_optimizer(model, args), run, args)    # read from the file
    saved = torch.load(os.path.join(out, "last.pth"), map_location="cpu", weights_only=False)
    assert state["start"] == 1 and all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())


def test_an_image_in_several_lists_is_decoded_once(tiny_root, monkeypatch):
    """RegDB's ten splits list the same images ten times over; the check before training decodes each once."""
    from types import SimpleNamespace
    from data.datasets import training_set
    from plumbing import checks
    vis, ir = training_set("synthetic", tiny_root)
    decoded, real = [], checks.read_image

    def counted(path):
        decoded.append(path)
        return real(path)
    monkeypatch.setattr(checks, "read_image", counted)
    sizes = checks.check_images([vis, ir, vis, ir, vis], SimpleNamespace(workers=0))
    assert sorted(decoded) == sorted(vis.paths + ir.paths) and set(sizes) == set(vis.paths + ir.paths)
