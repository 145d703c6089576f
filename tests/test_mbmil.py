"""MBMIL-specific behaviour: bias-mitigated global clustering, and the two optimiser steps per iteration."""
import numpy as np
import torch

import clustering
import train
from demo.synthetic import render_sysu


def offset_features(seed=0, ids=12, per_modality=8, dim=32, offset=6.0, noise=0.35):
    """Identity centres shared by both modalities plus a strong modality offset: [N, D], modality, ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    shift = rng.normal(size=dim)
    shift *= offset / np.linalg.norm(shift)
    feats, mods, pids = [], [], []
    for m in (0, 1):
        for i in range(ids):
            x = centres[i] + m * shift + noise * rng.normal(size=(per_modality, dim))
            feats.append(x)
            mods += [m] * per_modality
            pids += [i] * per_modality
    x = torch.tensor(np.concatenate(feats), dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=1), np.array(mods), np.array(pids)


def mixed_clusters(labels, modality):
    return sum(1 for k in range(labels.max() + 1) if len(set(modality[labels == k])) == 2)


def test_modality_aware_distance_mixes_modalities_where_plain_does_not():
    x, modality, pids = offset_features()
    # within one modality the identities are well separated: the plain distance finds them, per modality
    plain = clustering.dbscan(clustering.jaccard_similarity(x, k1=10, k2=3), eps=0.5)
    aware = clustering.dbscan(clustering.jaccard_similarity(x, k1=10, k2=3, modality=modality), eps=0.5)
    assert plain.max() >= 0 and mixed_clusters(plain, modality) == 0
    assert mixed_clusters(aware, modality) >= 10      # of 12 identities
    # ... and the mixed clusters are right: most cross-modality pairs they imply share the identity
    same = [pids[i] == pids[j] for k in range(aware.max() + 1)
            for i in np.flatnonzero((aware == k) & (modality == 0))
            for j in np.flatnonzero((aware == k) & (modality == 1))]
    assert len(same) > 0 and np.mean(same) > 0.8


def test_two_optimiser_steps_per_iteration_intra_then_global(tmp_path, monkeypatch):
    """Stage two of MBMIL: each iteration steps on the intra-modality loss, then on the global loss."""
    root = str(tmp_path / "data")
    render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    steps = []
    real = train.optimise

    def spy(optimizer, loss, epoch, it):
        steps.append((epoch, it, loss.grad_fn is not None))
        real(optimizer, loss, epoch, it)

    monkeypatch.setattr(train, "optimise", spy)
    calls = []
    for name in ("intra_loss", "global_loss"):
        fn = getattr(train.memory, name)
        monkeypatch.setattr(train.memory, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    train.main([
        "--method", "mbmil", "--data-root", root, "--out", str(tmp_path / "run"), "--arch", "resnet18",
        "--pretrained", "none", "--height", "32", "--width", "16", "--k1", "6", "--k2", "2", "--clusters", "2",
        "--instances", "2", "--iters", "3", "--epochs", "2", "--stage-one-epochs", "1", "--eps", "0.6",
        "--eval-every", "100", "--eval-trials", "1", "--no-eval-untrained"])
    stage_one = [s for s in steps if s[0] == 0]
    stage_two = [s for s in steps if s[0] == 1]
    assert len(stage_one) == 3                       # one step an iteration
    assert [s[1] for s in stage_two] == [0, 0, 1, 1, 2, 2]   # two steps an iteration
    # per iteration: two intra terms (vis, ir) before the step, then two global terms (ir, vis)
    assert calls[6:] == ["intra_loss", "intra_loss", "global_loss", "global_loss"] * 3
