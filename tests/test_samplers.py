"""data/samplers.py: batch composition of docs/mult.md §1.5 (MBMIL's PK batches are stage one's draw)."""
import numpy as np
import pytest

from data.samplers import stage_one_batches, stage_two_batches


def blocks(rows, labels, instances):
    """Per batch, the label of each `instances`-long block; asserts each block is one cluster."""
    lab = labels[rows]                                            # [nb, B]
    nb, b = lab.shape
    lab = lab.reshape(nb, b // instances, instances)
    assert (lab == lab[:, :, :1]).all(), "a block mixes clusters"
    return lab[:, :, 0]                                           # [nb, c]


def check_draw_rule(rows, labels, instances, sizes):
    """Slow reference of the replacement rule, block by block."""
    for batch in rows:
        for block in batch.reshape(-1, instances):
            n = sizes[labels[block[0]]]
            if n > instances:
                assert len(set(block.tolist())) == instances      # without replacement
            else:
                assert set(block.tolist()) <= set(np.flatnonzero(labels == labels[block[0]]))


def make_labels(rng, n, k, outliers=0.2):
    labels = rng.integers(0, k, n)
    labels[rng.random(n) < outliers] = -1
    return labels


def test_stage_one_composition():
    rng = np.random.default_rng(0)
    lv, lr = make_labels(rng, 400, 20), make_labels(rng, 300, 15)
    lv[lv == 3] = -1                                              # an all-outlier cluster id
    lv[np.flatnonzero(lv == 5)[2:]] = -1                          # a 2-member cluster
    out = stage_one_batches(lv, lr, num_batches=30, clusters=6, instances=4, rng=rng)
    assert out.shape == (30, 24, 2) and out.dtype == np.int64
    for rows, labels in ((out[..., 0], lv), (out[..., 1], lr)):
        assert (labels[rows] >= 0).all()                          # no outliers
        ids = blocks(rows, labels, 4)                             # [30, 6]
        assert all(len(set(b.tolist())) == 6 for b in ids)        # distinct clusters per batch
        assert set(ids.ravel().tolist()) == set(labels[labels >= 0].tolist())   # all get drawn
        check_draw_rule(rows, labels, 4, np.bincount(labels[labels >= 0]))
    # the halves are independent: visible and infrared cluster ids are unrelated
    assert not (blocks(out[..., 0], lv, 4) == blocks(out[..., 1], lr, 4)).all()


def test_replacement_rule_statistics():
    labels = np.repeat(np.arange(3), [12, 13, 5])                 # n = instances, n > instances, n < instances
    out = stage_one_batches(labels, labels, 200, clusters=3, instances=12,
                            rng=np.random.default_rng(1))[..., 0]
    per = {k: [] for k in range(3)}
    for batch in out:
        for block in batch.reshape(3, 12):
            per[int(labels[block[0]])].append(block)
    assert all(len(set(b.tolist())) == 12 for b in per[1])       # 13 > 12: never a repeat
    repeats = sum(len(set(b.tolist())) < 12 for b in per[0])     # 12 = 12: with replacement
    assert repeats > 190                                          # P(no repeat) = 12!/12^12
    # without replacement stays uniform: every member of the 13-cluster drawn ~12/13 of batches
    freq = np.bincount(np.concatenate(per[1]), minlength=30)[12:25] / 200
    assert np.abs(freq - 12 / 13).max() < 0.06


def test_determinism_and_seed():
    rng_labels = np.random.default_rng(5)
    lv, lr = make_labels(rng_labels, 200, 10), make_labels(rng_labels, 150, 8)
    a = stage_one_batches(lv, lr, 5, 4, 3, rng=np.random.default_rng(7))
    b = stage_one_batches(lv, lr, 5, 4, 3, rng=np.random.default_rng(7))
    c = stage_one_batches(lv, lr, 5, 4, 3, rng=np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    h = [make_labels(rng_labels, n, 6, 0) for n in (200, 150, 200, 150)]
    assert np.array_equal(stage_two_batches(*h, 4, rng=np.random.default_rng(3)),
                          stage_two_batches(*h, 4, rng=np.random.default_rng(3)))


def test_too_few_and_zero_clusters():
    lv = np.array([0, 0, 1, 1, 1, 2, -1, 2])                      # 3 visible clusters
    lr = np.arange(40) % 10                                       # 10 infrared clusters
    out = stage_one_batches(lv, lr, 6, clusters=12, instances=2, rng=np.random.default_rng(0))
    assert out.shape == (6, 6, 2)                                 # c = min(12, 3, 10) = 3
    for ids in blocks(out[..., 0], lv, 2):
        assert sorted(ids.tolist()) == [0, 1, 2]                  # all of them, every batch
    none = np.full(8, -1)
    with pytest.raises(ValueError, match="DBSCAN found no cluster"):
        stage_one_batches(none, lr, 2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels_r"):
        stage_one_batches(lv, none, 2, rng=np.random.default_rng(0))


def test_stage_two_anchoring():
    rng = np.random.default_rng(2)
    n_v, n_r = 300, 200
    h_vv, h_rv = rng.integers(0, 10, n_v), rng.integers(0, 10, n_r)
    h_vr, h_rr = rng.integers(0, 8, n_v), rng.integers(0, 8, n_r)
    h_rv[h_rv == 9] = 8                                           # visible cluster 9: no IR member
    h_vr[h_vr == 0] = 1                                           # IR cluster 0: no visible member
    h_vv[np.flatnonzero(h_vv == 4)[3:]] = 5                       # a 3-member visible cluster
    e_v, e_r = set(range(9)), set(range(1, 8))
    out = stage_two_batches(h_vv, h_rv, h_vr, h_rr, num_batches=40, clusters=6, instances=5, rng=rng)
    assert out.shape == (40, 30, 2)
    vis, ir = out[..., 0], out[..., 1]
    first, second = slice(0, 15), slice(15, 30)                   # 3 clusters x 5 instances each
    c = blocks(vis[:, first], h_vv, 5)                            # visible-anchored: h_vv == c ...
    assert np.array_equal(blocks(ir[:, first], h_rv, 5), c)       # ... and h_rv == c
    c2 = blocks(vis[:, second], h_vr, 5)                          # IR-anchored: h_vr == c' ...
    assert np.array_equal(blocks(ir[:, second], h_rr, 5), c2)     # ... and h_rr == c'
    assert set(c.ravel().tolist()) == e_v and set(c2.ravel().tolist()) == e_r
    assert all(len(set(b.tolist())) == 3 for b in c) and all(len(set(b.tolist())) == 3 for b in c2)
    check_draw_rule(vis[:, first], h_vv, 5, np.bincount(h_vv))
    check_draw_rule(ir[:, second], h_rr, 5, np.bincount(h_rr))
    # too few: E_v of 2 clusters -> both used in every batch, E_r still gives 3
    small = np.where(h_vv < 2, h_vv, -1), np.where(h_rv < 2, h_rv, -1)
    out = stage_two_batches(small[0], small[1], h_vr, h_rr, 5, 6, 5, rng=rng)
    assert out.shape == (5, 25, 2)
    assert all(sorted(b.tolist()) == [0, 1] for b in blocks(out[:, :10, 0], small[0], 5))


def test_stage_two_errors():
    rng = np.random.default_rng(0)
    h = [np.zeros(5, int), np.zeros(4, int), np.zeros(5, int), np.zeros(4, int)]
    with pytest.raises(ValueError, match="even"):
        stage_two_batches(*h, 2, clusters=5, rng=rng)
    with pytest.raises(ValueError, match="lengths"):
        stage_two_batches(h[0], h[1], h[1], h[3], 2, rng=rng)
    with pytest.raises(ValueError, match="E_v"):
        stage_two_batches(h[0], h[1] + 1, h[2], h[3], 2, rng=rng)   # no shared visible cluster
    with pytest.raises(ValueError, match="E_r"):
        stage_two_batches(h[0], h[1], h[2] + 3, h[3], 2, rng=rng)


def test_bad_input():
    labels = np.arange(10) % 3
    with pytest.raises(TypeError, match="Generator"):
        stage_one_batches(labels, labels, 2, 2, 2, 0)
    for bad, text in ((labels.reshape(2, 5), "1-D"), (labels.astype(float), "integer"),
                      (labels - 2, "-1")):
        with pytest.raises(ValueError, match=text):
            stage_one_batches(labels, bad, 2, 2, 2, np.random.default_rng(0))
    for args, text in (((0, 2, 2), "num_batches"), ((2, 0, 2), "clusters"), ((2, 2, 1.5), "instances")):
        with pytest.raises(ValueError, match=text):
            stage_one_batches(labels, labels, *args, np.random.default_rng(0))


def test_rng_required_and_tensor_labels():
    import torch
    labels = np.arange(12) % 3
    with pytest.raises(TypeError, match="required"):
        stage_one_batches(labels, labels, 2)
    positional = stage_one_batches(labels, labels, 2, 2, 2, np.random.default_rng(0))
    keyword = stage_one_batches(torch.from_numpy(labels), labels, 2, 2, 2, rng=np.random.default_rng(0))
    assert np.array_equal(positional, keyword)
