"""Tests for mult.py: MULT label transfer (docs/mult.md §5) and the OT / PGM baselines (§6).

The reference below is the slow, dense, float64 transcription of §5: dense kernel, explicit
diag(a) G diag(b) plan, dense row-normalised A, T_vr, T_rv, Python loops for the centers.
"""
import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import mult


# ----------------------------------------------------------------------------- data
def make_case(seed, n_v=70, n_r=50, dim=16, ids=6, outlier_frac=0.1, thr=0.5):
    """Clustered unit features for both modalities, DBSCAN-like labels (splits, merges, -1) with
    unequal K_v, K_r, and sparse symmetric similarities S = max(0, cos - thr) / (1 - thr), diag 1."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(ids, dim))
    offset = 0.6 * rng.normal(size=dim)
    feats, labels = [], []
    for n, shift in ((n_v, 0.0), (n_r, 1.0)):
        pid = rng.integers(0, ids, n)
        x = means[pid] + shift * offset + 0.45 * rng.normal(size=(n, dim))
        feats.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        labels.append(pid.copy())
    labels[0][labels[0] == 0] = ids                    # visible: split id 0 into a new cluster ...
    labels[0][(labels[0] == ids) & (rng.random(n_v) < 0.5)] = 0
    labels[1][labels[1] == 1] = 2                      # ... infrared: merge ids 1 and 2
    sims = []
    for i in range(2):
        lab = labels[i]
        lab[rng.random(len(lab)) < outlier_frac] = -1
        _, lab[lab >= 0] = np.unique(lab[lab >= 0], return_inverse=True)
        cos = feats[i] @ feats[i].T
        s = np.clip((cos - thr) / (1 - thr), 0, 1)
        np.fill_diagonal(s, 1.0)
        sims.append(sp.csr_matrix(s))
    fv, fr = (torch.tensor(f, dtype=torch.float32) for f in feats)
    return fv, fr, labels[0], labels[1], sims[0], sims[1]


# ----------------------------------------------------------------------------- dense reference (§5)
def ref_sinkhorn(Q, lam=25.0, max_iter=500, tol=0.1):
    """S(Q; lambda) of §5.1, literally: returns the plan diag(a) G diag(b) and the iterations."""
    G = np.exp(-lam * Q)
    n, m = Q.shape
    b = np.ones(m) / m
    err, t = 1e6, 0
    while err > tol and t < max_iter:
        a = (1 / n) / (G @ b)
        b_new = (1 / m) / (G.T @ a)
        if t % 10 == 0:
            err = np.nansum(np.abs(b / b_new - 1))
        b = b_new
        t += 1
    return np.diag(a) @ G @ np.diag(b), t


def sqdist(x, y):
    return (x ** 2).sum(1)[:, None] + (y ** 2).sum(1)[None] - 2 * x @ y.T


def ref_centers(f, lab):
    return np.stack([f[lab == k].mean(0) for k in range(lab.max() + 1)])


def rownorm(m):
    return m / m.sum(1, keepdims=True)


def ref_propagate(A_a, A_b, T_ab, T_ba, Y0, Z0, alpha, max_iter=20, tol=0.01):
    Y, Z = Y0, Z0
    for t in range(1, max_iter + 1):
        Yt = (1 - alpha) * T_ab @ Z + alpha * Y0
        Zt = (1 - alpha) * T_ba @ Yt + alpha * Z0
        Yn = 0.5 * A_a @ Yt + 0.5 * Yt
        Zn = 0.5 * A_b @ Zt + 0.5 * Zt
        delta = max(np.abs(Zn - Z).sum() / np.abs(Z).sum(), np.abs(Yn - Y).sum() / np.abs(Y).sum())
        Y, Z = Yn, Zn
        if delta <= tol:
            break
    return Y, Z, t


def ref_mult(fv, fr, lv, lr, sv, sr, alpha=0.2, temp=0.05, lam=25.0, max_iter=500):
    fv, fr = fv.double().numpy(), fr.double().numpy()
    cv, cr = ref_centers(fv, lv), ref_centers(fr, lr)
    softmax = lambda z: rownorm(np.exp(z - z.max(1, keepdims=True)))   # noqa: E731
    Y0_vv, Y0_rr = softmax(fv @ cv.T / temp), softmax(fr @ cr.T / temp)
    P_vr, it_vr = ref_sinkhorn(sqdist(fv, cr), lam, max_iter)
    P_rv, it_rv = ref_sinkhorn(sqdist(fr, cv), lam, max_iter)
    Z0_vr, Z0_rv = np.eye(len(cr))[P_vr.argmax(1)], np.eye(len(cv))[P_rv.argmax(1)]
    Pi, it = ref_sinkhorn(sqdist(fv, fr), lam, max_iter)
    T_vr, T_rv = rownorm(Pi), rownorm(Pi.T)
    A_v, A_r = rownorm(sv.toarray()), rownorm(sr.toarray())
    Y_vv, Z_rv, pv = ref_propagate(A_v, A_r, T_vr, T_rv, Y0_vv, Z0_rv, alpha)
    Y_rr, Z_vr, pr = ref_propagate(A_r, A_v, T_rv, T_vr, Y0_rr, Z0_vr, alpha)
    return dict(soft_v=Y_vv, soft_r=Y_rr, soft_cross_v=Z_vr, soft_cross_r=Z_rv,
                sinkhorn_iters=(it_vr, it_rv, it), prop_iters=(pv, pr))


def assert_matches_reference(out, ref, margin_check=True):
    for key, hard in (("soft_v", "labels_v"), ("soft_r", "labels_r"),
                      ("soft_cross_v", "cross_v"), ("soft_cross_r", "cross_r")):
        soft = getattr(out, key)
        assert soft.dtype == torch.float32 and soft.shape == ref[key].shape, key
        np.testing.assert_allclose(soft.double().numpy(), ref[key], atol=1e-4, err_msg=key)
        top2 = np.sort(ref[key], axis=1)[:, -2:]
        if margin_check:   # the hard labels are only meaningful where the reference is not tied
            assert (top2[:, 1] - top2[:, 0] > 1e-4).all(), key
        lab = getattr(out, hard)
        assert lab.dtype == np.int64
        np.testing.assert_array_equal(lab, ref[key].argmax(1), err_msg=hard)
    assert out.sinkhorn_iters == ref["sinkhorn_iters"]
    assert out.prop_iters == ref["prop_iters"]


# ----------------------------------------------------------------------------- MULT
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_label_transfer_matches_dense_reference(seed):
    fv, fr, lv, lr, sv, sr = make_case(seed)
    out = mult.label_transfer(fv, fr, lv, lr, sv, sr)
    ref = ref_mult(fv, fr, lv, lr, sv, sr)
    assert (out.K_v, out.K_r) == (lv.max() + 1, lr.max() + 1) and out.K_v != out.K_r
    assert (lv < 0).any() and (lr < 0).any()
    assert_matches_reference(out, ref)
    for soft in (out.soft_v, out.soft_r, out.soft_cross_v, out.soft_cross_r):
        torch.testing.assert_close(soft.sum(1), torch.ones(len(soft)), atol=1e-5, rtol=0)


def test_label_transfer_sinkhorn_cap_and_iteration_counts():
    """A cap of 7 stops every Sinkhorn mid-way: the output must use the last a and updated b."""
    fv, fr, lv, lr, sv, sr = make_case(5, n_v=90, n_r=40, ids=5)
    out = mult.label_transfer(fv, fr, lv, lr, sv, sr, sinkhorn_max_iter=7)
    ref = ref_mult(fv, fr, lv, lr, sv, sr, max_iter=7)
    assert out.sinkhorn_iters == (7, 7, 7)
    assert_matches_reference(out, ref)
    full = mult.label_transfer(fv, fr, lv, lr, sv, sr)
    assert all(it % 10 == 1 or it == 500 for it in full.sinkhorn_iters)   # the 1, 11, 21... rule
    assert max(full.sinkhorn_iters) > 1


@pytest.mark.parametrize("side", ["vis", "ir"])
def test_underflow_guard_antipodal_sample(side):
    """Both modalities near one direction u, one sample at -u: its row (vis) or column (ir) of
    exp(-25 Q) underflows in float32 and the naive float32 Sinkhorn (the official arithmetic)
    returns inf/NaN; ours is finite and matches the float64 reference."""
    fv, fr, lv, lr, sv, sr = make_case(7, n_v=40, n_r=30, ids=3)
    u = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(0)), dim=0)
    fv, fr = (F.normalize(u + 0.3 * f, dim=1) for f in (fv, fr))
    (fv if side == "vis" else fr)[0] = -u
    cross = fv @ fr.T
    assert (cross[0] if side == "vis" else cross[:, 0]).max() < -0.9
    Q = fv.square().sum(1)[:, None] + fr.square().sum(1)[None] - 2 * cross
    G = torch.exp(-25.0 * Q)                                     # naive float32 Sinkhorn
    b = torch.full((len(fr),), 1.0 / len(fr))
    for _ in range(11):
        a = (1.0 / len(fv)) / (G @ b)
        b = (1.0 / len(fr)) / (G.T @ a)
    assert not torch.isfinite(a[:, None] * G * b).all()
    out = mult.label_transfer(fv, fr, lv, lr, sv, sr)
    assert_matches_reference(out, ref_mult(fv, fr, lv, lr, sv, sr))


def test_scaled_kernel_sinkhorn_equals_plain_when_finite():
    """Row/column rescaling changes a, b only by the known factors, and not the iteration count."""
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(20, 8, generator=g, dtype=torch.float64), dim=1)
    Gs, q_col = mult._scaled_kernel(x, y, 25.0)
    Q = torch.cdist(x, y) ** 2
    q_row = Q.amin(1)
    assert (Gs <= 1).all() and (Gs.amax(0) == 1).all() and (Gs.amax(1) == 1).all()
    b0 = torch.full((20,), 1 / 20, dtype=torch.float64)
    a1, b1, it1 = mult._sinkhorn(torch.exp(-25.0 * Q), b0)
    a2, b2, it2 = mult._sinkhorn(Gs, torch.exp(-25.0 * q_col) / 20)
    assert it1 == it2
    torch.testing.assert_close(a2, a1 * torch.exp(-25.0 * q_row), rtol=1e-9, atol=0)
    torch.testing.assert_close(b2, b1 * torch.exp(-25.0 * q_col), rtol=1e-9, atol=0)


def test_mixed_soft_targets():
    fv, fr, lv, lr, sv, sr = make_case(0)
    out = mult.label_transfer(fv, fr, lv, lr, sv, sr)
    mix = out.mixed(0.7)
    assert mix.beta == 0.7 and out.beta is None
    for key, hard in (("soft_v", "labels_v"), ("soft_cross_r", "cross_r")):
        soft, lab = getattr(out, key), getattr(out, hard)
        expect = 0.3 * soft.numpy() + 0.7 * np.eye(soft.shape[1])[lab]
        np.testing.assert_allclose(getattr(mix, key).numpy(), expect, atol=1e-6)
        np.testing.assert_array_equal(getattr(mix, key).argmax(1).numpy(), lab)
    with pytest.raises(ValueError, match="already mixed"):
        mix.mixed()
    with pytest.raises(ValueError, match="beta"):
        mult.soft_targets(out.labels_v, out.soft_v, 1.5)


def test_cluster_centers_hand_checked():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    c = mult.cluster_centers(f, np.array([0, 0, 1, -1]))
    torch.testing.assert_close(c, torch.tensor([[0.5, 0.5], [0.6, 0.8]]))


# ----------------------------------------------------------------------------- baselines
def test_ot_association_matches_reference():
    fv, fr, lv, lr, sv, sr = make_case(11)
    out = mult.ot_association(fv, fr, lv, lr)
    f64v, f64r = fv.double().numpy(), fr.double().numpy()
    cv, cr = ref_centers(f64v, lv), ref_centers(f64r, lr)
    P_vr, it_vr = ref_sinkhorn(sqdist(f64v, cr))
    P_rv, it_rv = ref_sinkhorn(sqdist(f64r, cv))
    exp_v = np.where(lv >= 0, lv, (f64v @ cv.T).argmax(1))     # outliers -> nearest center
    exp_r = np.where(lr >= 0, lr, (f64r @ cr.T).argmax(1))
    np.testing.assert_array_equal(out.labels_v, exp_v)
    np.testing.assert_array_equal(out.labels_r, exp_r)
    np.testing.assert_array_equal(out.cross_v, P_vr.argmax(1))
    np.testing.assert_array_equal(out.cross_r, P_rv.argmax(1))
    assert out.sinkhorn_iters == (it_vr, it_rv, 0)
    np.testing.assert_array_equal(out.soft_cross_v.numpy(), np.eye(out.K_r)[out.cross_v])
    assert out.mixed(0.7).soft_v.equal(out.soft_v)


def brute_progressive(cost):
    """All injective maps of the K_b columns to rows, then the leftover rows, round by round."""
    k_a, k_b = cost.shape
    best = min(itertools.permutations(range(k_a), k_b),
               key=lambda rows: sum(cost[r, c] for c, r in enumerate(rows)))
    a_to_b = -np.ones(k_a, dtype=int)
    a_to_b[list(best)] = np.arange(k_b)
    b_to_a = np.array(best)
    while (a_to_b < 0).any():
        left = np.flatnonzero(a_to_b < 0)
        m = min(len(left), k_b)
        choice = min(((rows, cols) for rows in itertools.combinations(left, m)
                      for cols in itertools.permutations(range(k_b), m)),
                     key=lambda rc: sum(cost[r, c] for r, c in zip(*rc)))
        a_to_b[list(choice[0])] = choice[1]
    return a_to_b, b_to_a


@pytest.mark.parametrize("shape", [(6, 4), (7, 3), (4, 4)])
def test_progressive_matching_brute_force(shape):
    cost = np.random.default_rng(sum(shape)).random(shape)
    a_to_b, b_to_a = mult._progressive_matching(cost)
    ref_a, ref_b = brute_progressive(cost)
    np.testing.assert_array_equal(a_to_b, ref_a)
    np.testing.assert_array_equal(b_to_a, ref_b)


def test_pgm_hand_checked_and_both_orders():
    """K_v = 3 > K_r = 2 and the mirrored K_v = 2 < K_r = 3 (the official code crashes there)."""
    e = torch.eye(3)
    fv = torch.stack([e[0], e[0], e[1], e[1], e[2], e[2], F.normalize(e[0] + 0.1 * e[1], dim=0)])
    lv = np.array([0, 0, 1, 1, 2, 2, -1])
    fr = F.normalize(torch.stack([e[1], e[1] + 0.1 * e[2], e[0], e[0]]), dim=1)
    lr = np.array([0, 0, 1, 1])
    out = mult.pgm_association(fv, fr, lv, lr)
    # one-to-one: v0 <-> r1, v1 <-> r0; v2 (unmatched) goes to its closest IR center r0
    np.testing.assert_array_equal(out.labels_v, [0, 0, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(out.cross_v, [1, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(out.cross_r, [1, 1, 0, 0])
    swap = mult.pgm_association(fr, fv, lr, lv)
    np.testing.assert_array_equal(swap.cross_r, out.cross_v)
    np.testing.assert_array_equal(swap.cross_v, out.cross_r)
    assert swap.soft_cross_r.shape == (7, 2) and swap.prop_iters == (0, 0)


def test_associate_dispatch():
    fv, fr, lv, lr, sv, sr = make_case(1)
    np.testing.assert_array_equal(mult.associate("mult", fv, fr, lv, lr, sv, sr).cross_r,
                                  mult.label_transfer(fv, fr, lv, lr, sv, sr).cross_r)
    for method, fn in (("ot", mult.ot_association), ("pgm", mult.pgm_association)):
        np.testing.assert_array_equal(mult.associate(method, fv, fr, lv, lr, sv, sr).cross_v,
                                      fn(fv, fr, lv, lr).cross_v)
    with pytest.raises(ValueError, match="method"):
        mult.associate("bccm", fv, fr, lv, lr, sv, sr)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    fv, fr, lv, lr, sv, sr = make_case(0)
    call = mult.label_transfer
    with pytest.raises(ValueError, match="feats_v: rows must be L2-normalised"):
        call(fv * 2, fr, lv, lr, sv, sr)
    with pytest.raises(ValueError, match="feats_r"):
        call(fv, fr.numpy(), lv, lr, sv, sr)
    with pytest.raises(ValueError, match="feats_v, feats_r"):
        call(fv, F.normalize(fr[:, :8], dim=1), lv, lr, sv, sr)
    bad = lv.copy()
    bad[bad == 1] = 0
    with pytest.raises(ValueError, match=r"labels_v: .*ids \[1\]"):
        call(fv, fr, bad, lr, sv, sr)
    with pytest.raises(ValueError, match=r"labels_r: expected integer labels of shape"):
        call(fv, fr, lv, lr[:-1], sv, sr)
    with pytest.raises(ValueError, match="labels_r: .*at least one cluster"):
        call(fv, fr, lv, -np.ones_like(lr), sv, sr)
    with pytest.raises(ValueError, match="sim_v: expected a scipy.sparse"):
        call(fv, fr, lv, lr, sv.toarray(), sr)
    with pytest.raises(ValueError, match="sim_r: expected shape"):
        call(fv, fr, lv, lr, sv, sv)
    nodiag = sr.tolil()
    nodiag.setdiag(0)
    with pytest.raises(ValueError, match="sim_r: the diagonal must be 1"):
        call(fv, fr, lv, lr, sv, nodiag.tocsr())
    with pytest.raises(ValueError, match="alpha"):
        call(fv, fr, lv, lr, sv, sr, alpha=1.5)
    with pytest.raises(ValueError, match="sinkhorn_max_iter"):
        call(fv, fr, lv, lr, sv, sr, sinkhorn_max_iter=0)
