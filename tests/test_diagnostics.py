"""Pseudo-label diagnostics against hand-checked cases and slow pair-by-pair references."""
import numpy as np
import pytest

from plumbing import diagnostics


def test_pair_precision_recall_hand_checked():
    # clusters {0,1,2} {3,4}, outlier 5; ids  a a b | b b | a
    # same-cluster pairs: 3 + 1 = 4, of which same id: (0,1), (3,4) = 2  -> precision 2/4
    # same-id pairs: a {0,1,5} 3, b {2,3,4} 3 = 6                         -> recall 2/6
    prec, rec = diagnostics.pair_precision_recall([0, 0, 0, 1, 1, -1], [7, 7, 8, 8, 8, 7])
    assert prec == 0.5 and rec == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)
    labels, pids = rng.integers(-1, 6, 80), rng.integers(0, 9, 80)
    same_c = (labels[:, None] == labels[None]) & (labels[:, None] >= 0)
    same_i = pids[:, None] == pids[None]
    off = ~np.eye(80, dtype=bool)
    prec, rec = diagnostics.pair_precision_recall(labels, pids)
    assert prec == pytest.approx((same_c & same_i & off).sum() / (same_c & off).sum())
    assert rec == pytest.approx((same_c & same_i & off).sum() / (same_i & off).sum())


def test_cross_label_accuracy_hand_checked():
    # other modality: cluster 0 = ids 5 5 6 -> named 5; cluster 1 = ids 6 7 -> tie, named 6
    labels_other, pids_other = [0, 0, 0, 1, 1, -1], [5, 5, 6, 6, 7, 9]
    # samples: (cross 0, id 5) right, (1, 7) wrong, (1, 6) right, (-1, 5) not counted -> 2/3
    acc = diagnostics.cross_label_accuracy([0, 1, 1, -1], [5, 7, 6, 5], labels_other, pids_other)
    assert acc == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="cross"):
        diagnostics.cross_label_accuracy([2], [5], labels_other, pids_other)


def test_global_cluster_stats_against_pair_loop():
    rng = np.random.default_rng(3)
    n = 60
    labels, modality, gt = rng.integers(-1, 5, n), rng.integers(0, 2, n), rng.integers(0, 6, n)
    got = diagnostics.global_cluster_stats(labels, modality, gt)
    pairs = correct = 0
    for i in range(n):                      # every (visible, infrared) pair in one cluster
        for j in range(n):
            if modality[i] == 0 and modality[j] == 1 and labels[i] >= 0 and labels[i] == labels[j]:
                pairs += 1
                correct += gt[i] == gt[j]
    mixed = sum(1 for k in range(labels.max() + 1)
                if ((labels == k) & (modality == 0)).any() and ((labels == k) & (modality == 1)).any())
    assert got == {"clusters": labels.max() + 1, "mixed": mixed, "cross_pairs": pairs,
                   "cross_pair_precision": pytest.approx(correct / pairs)}
    assert diagnostics.global_cluster_stats(np.full(4, -1), np.array([0, 1, 0, 1]), np.arange(4))["clusters"] == 0
