"""demo/pretrain.py: the (identity, modality) classes of the ImageNet stand-in, and when its weights are stale."""
import json
import os

import numpy as np
import pytest

from demo import pretrain
from demo import synthetic as S


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre") / "data"
    S.render_sysu(root, num_ids=8, images_per_cam=2, height=16, width=8, seed=3)
    return str(root)


def _pid_and_modality(path):
    cam = int(os.path.basename(os.path.dirname(os.path.dirname(path)))[3:])
    return os.path.basename(os.path.dirname(path)), cam in pretrain.IR_CAMS


def test_one_class_per_identity_and_modality(tiny_root):
    data = pretrain.PretrainImages(tiny_root, 16, 8, seed=0, modalities="both")
    keys = [_pid_and_modality(p) for p in data.paths]
    assert data.ir.any() and (~data.ir).any()
    assert data.labels.max() + 1 == len(set(keys))
    for c in np.unique(data.labels):                  # each class is exactly one (identity, modality)
        assert len({keys[i] for i in np.flatnonzero(data.labels == c)}) == 1
    x, y = data[int(np.flatnonzero(data.ir)[0])]
    assert tuple(x.shape) == (3, 16, 8) and y == data.labels[np.flatnonzero(data.ir)[0]]


def test_visible_only_ablation_and_bad_argument(tiny_root):
    data = pretrain.PretrainImages(tiny_root, 16, 8, seed=0, modalities="visible")
    assert len(data) > 0 and not data.ir.any()
    with pytest.raises(ValueError, match="modalities"):
        pretrain.PretrainImages(tiny_root, 16, 8, seed=0, modalities="infrared")


def test_weights_of_an_older_data_format_are_retrained(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pretrain, "pretrain", lambda out, device, **kw: calls.append(kw) or "retrained")
    (tmp_path / "resnet18.pth").write_bytes(b"weights")
    done = dict(pretrain.SETTINGS, data_version=S.FORMAT_VERSION)
    (tmp_path / "pretrain.json").write_text(json.dumps(done))
    assert pretrain.ensure_pretrained(str(tmp_path)) == str(tmp_path / "resnet18.pth") and not calls
    (tmp_path / "pretrain.json").write_text(json.dumps(dict(done, data_version=S.FORMAT_VERSION - 1)))
    assert pretrain.ensure_pretrained(str(tmp_path)) == "retrained" and calls == [pretrain.SETTINGS]
