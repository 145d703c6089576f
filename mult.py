"""MULT: Modality-Unified Label Transfer, and the association baselines it is compared with.

Paper: L. He, D. Cheng, N. Wang, X. Gao, "Exploring Homogeneous and Heterogeneous Consistent Label
Associations for Unsupervised Visible-Infrared Person ReID", IJCV 2024 (arXiv 2402.00672), the
MULT module of the method (stage two, every epoch). This is the official code's algorithm
(docs/mult.md §0 says what of the paper was available), written out with its equations in
docs/mult.md: §5 (label transfer, Eqs. (5.1)-(5.18)), §6 (the OT and PGM baselines, Eq. (6.1)),
§11 items 6-8 (the exact speed-ups). Figure symbols: S^v, S^r are A_v, A_r below; S^{vr}, S^{rv}
are T_vr, T_rv.

    out = label_transfer(feats_v, feats_r, labels_v, labels_r, sim_v, sim_r)   # a LabelTransfer
    out = out.mixed(beta=0.7)           # soft labels -> the CE targets of Eq. (5.18)
    out = associate("ot", feats_v, feats_r, labels_v, labels_r)                 # or a baseline

Sizes: N_v, N_r samples, K_v, K_r DBSCAN clusters, D feature size. Everything is float32 on the
features' device. Hard labels come back as numpy int64, soft labels as float32 tensors.
Imports torch, numpy, scipy and the standard library only: the file can be copied alone into
another codebase (tests/test_copy_one_file.py does so). Checked against the slow dense float64
transcription of §5 in tests/test_mult.py (`ref_mult`, `ref_sinkhorn`, `ref_propagate`,
`brute_progressive`).

Paper vs official code: the official code multiplies by explicit dense diag(a) (N_v x N_v) and
diag(b) (N_r x N_r) matrices and keeps dense A_v, A_r, Π, T_vr and T_rv. Here A_v, A_r are sparse,
the plan is never formed (T_vr Z = (G (b ⊙ Z)) ⊘ (G b), T_rv Y = (Gᵀ (a ⊙ Y)) ⊘ (Gᵀ a)), and the
kernel G [N_v, N_r] is the only dense array of that size: same results up to float rounding.
Paper vs official code: where a whole row or column of exp(-λQ) underflows, the official float32
Sinkhorn returns NaN; here the kernel is rescaled by row and column factors that cancel exactly
(Eq. (5.6), `_scaled_kernel`), so finite official results are unchanged and the rest are finite.
"""
import warnings
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

ASSOCIATIONS = ("mult", "ot", "pgm")


def label_transfer(feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, alpha=0.2, temp=0.05,
                   sinkhorn_lambda=25.0, *, sinkhorn_max_iter=500, sinkhorn_tol=0.1,
                   prop_max_iter=20, prop_tol=0.01):
    """Modality-Unified Label Transfer, docs/mult.md §5, Eqs. (5.7)-(5.17) (stage two, every epoch).

    feats_v [N_v, D], feats_r [N_r, D]: L2-normalised features of all instances (torch).
    labels_v [N_v], labels_r [N_r]: DBSCAN labels, numpy int64, -1 = outlier.
    sim_v [N_v, N_v], sim_r [N_r, N_r]: scipy sparse S = 1 - D_Jaccard (absent pairs: D = 1).
    alpha: anchor weight α (0.2); temp: softmax temperature τ of Y⁰ (0.05); sinkhorn_lambda: λ (25).
    Returns a LabelTransfer with Y*_vv, Y*_rr, Z*_vr, Z*_rv and their argmax labels h.

    Steps: centers C (4.11); Y⁰_vv = softmax(F_v C_vᵀ / τ), Y⁰_rr likewise (5.7); Z⁰_vr, Z⁰_rv
    one-hot argmax of S(Q(F, C); λ) (5.8); A = rownorm(S), sparse (5.9); Π = S(Q(F_v, F_r); λ),
    T_vr = rownorm(Π), T_rv = rownorm(Πᵀ) (5.10); then the two runs (5.16),
    (Y*_vv, Z*_rv) = P(A_v, A_r, T_vr, T_rv, Y⁰_vv, Z⁰_rv), (Y*_rr, Z*_vr) = P(A_r, A_v, T_rv, T_vr,
    Y⁰_rr, Z⁰_vr).
    """
    feats_v, feats_r, labels_v, labels_r, k_v, k_r = _check_inputs(
        feats_v, feats_r, labels_v, labels_r, alpha=alpha, temp=temp,
        sinkhorn_lambda=sinkhorn_lambda, sinkhorn_max_iter=sinkhorn_max_iter,
        prop_max_iter=prop_max_iter)
    lam = float(sinkhorn_lambda)
    c_v, c_r = cluster_centers(feats_v, labels_v), cluster_centers(feats_r, labels_r)   # (4.11)
    a_v = _affinity(_check_similarity(sim_v, len(feats_v), "sim_v"), feats_v.device)    # A_v (5.9)
    a_r = _affinity(_check_similarity(sim_r, len(feats_r), "sim_r"), feats_r.device)    # A_r (5.9)

    # §5.2 initial labels: Y⁰ (5.7) soft; Z⁰ (5.8) by transport to the other modality's centers
    y0_vv = torch.softmax(feats_v @ c_v.t() / temp, dim=1)                  # [N_v, K_v]
    y0_rr = torch.softmax(feats_r @ c_r.t() / temp, dim=1)                  # [N_r, K_r]
    h0_vr, it_vr = _ot_argmax(feats_v, c_r, lam, sinkhorn_max_iter, sinkhorn_tol)   # [N_v] in K_r
    h0_rv, it_rv = _ot_argmax(feats_r, c_v, lam, sinkhorn_max_iter, sinkhorn_tol)   # [N_r] in K_v

    # §5.3 heterogeneous affinity Π = S(Q(F_v, F_r); λ) (5.10): G is the one dense [N_v, N_r] array
    G, q_col = _scaled_kernel(feats_v, feats_r, lam)
    a, b, it_inst = _sinkhorn(G, torch.exp(-lam * q_col) / len(feats_r), sinkhorn_max_iter,
                              sinkhorn_tol)                                  # a [N_v], b [N_r]
    row_sum = torch.mv(G, b)                                                 # [N_v] (G b)_i
    col_sum = torch.mv(G.t(), a)                                             # [N_r] (Gᵀ a)_j

    def to_vis(x):   # T_vr x (5.11): [N_r, K] -> [N_v, K]; T_vr[i, j] = G_ij b_j / (G b)_i
        return torch.mm(G, x * b[:, None]).div_(row_sum[:, None])

    def to_ir(x):    # T_rv x (5.11): [N_v, K] -> [N_r, K]; T_rv[j, i] = G_ij a_i / (Gᵀ a)_j
        return torch.mm(G.t(), x * a[:, None]).div_(col_sum[:, None])

    # §5.5 the two runs (5.16): visible label space, then infrared label space
    y_vv, z_rv, it_p_v = _propagate(a_v.matmul, a_r.matmul, to_vis, to_ir, y0_vv,
                                    _onehot(h0_rv, k_v), alpha, prop_max_iter, prop_tol)
    y_rr, z_vr, it_p_r = _propagate(a_r.matmul, a_v.matmul, to_ir, to_vis, y0_rr,
                                    _onehot(h0_vr, k_r), alpha, prop_max_iter, prop_tol)
    del G
    _check_finite({"Y*_vv": y_vv, "Y*_rr": y_rr, "Z*_vr": z_vr, "Z*_rv": z_rv})
    h_vv, h_rr, h_vr, h_rv = (_numpy(t.argmax(1)) for t in (y_vv, y_rr, z_vr, z_rv))   # (5.17)
    return LabelTransfer(h_vv, h_rr, h_vr, h_rv, y_vv, y_rr, z_vr, z_rv, k_v, k_r,
                         (it_vr, it_rv, it_inst), (it_p_v, it_p_r))


@dataclass
class LabelTransfer:
    """Pseudo-labels of one association step (docs/mult.md §5.5), one type for MULT, OT and PGM.

    labels_v [N_v] in 0..K_v-1: visible samples in visible-cluster space (h_vv), numpy int64
    labels_r [N_r] in 0..K_r-1: infrared samples in infrared-cluster space (h_rr)
    cross_v  [N_v] in 0..K_r-1: visible samples in infrared-cluster space (h_vr)
    cross_r  [N_r] in 0..K_v-1: infrared samples in visible-cluster space (h_rv)
    soft_v [N_v, K_v], soft_r [N_r, K_r], soft_cross_v [N_v, K_r], soft_cross_r [N_r, K_v]:
        Y*_vv, Y*_rr, Z*_vr, Z*_rv (Eq. (5.16)), float32 on the features' device, rows summing to 1;
        hard labels are their row argmax (Eq. (5.17), ties to the lowest index)
    K_v, K_r: DBSCAN's cluster counts (a cluster may end with no argmax members)
    sinkhorn_iters: (visible -> infrared centers, infrared -> visible centers, instances);
        0 = not run
    prop_iters: (visible-space run, infrared-space run); 0 = not run
    beta: None for the raw Y*; the beta of `mixed` once mixed
    """
    labels_v: np.ndarray
    labels_r: np.ndarray
    cross_v: np.ndarray
    cross_r: np.ndarray
    soft_v: torch.Tensor
    soft_r: torch.Tensor
    soft_cross_v: torch.Tensor
    soft_cross_r: torch.Tensor
    K_v: int
    K_r: int
    sinkhorn_iters: tuple[int, int, int]
    prop_iters: tuple[int, int]
    beta: float | None = None

    def mixed(self, beta=0.7):
        """A copy with soft labels Ŷ = β·onehot(h) + (1 − β)·Y*, the CE targets (docs/mult.md
        Eq. (5.18))."""
        if self.beta is not None:
            raise ValueError(f"mixed: soft labels are already mixed with beta={self.beta}")
        return replace(self, soft_v=soft_targets(self.labels_v, self.soft_v, beta),
                       soft_r=soft_targets(self.labels_r, self.soft_r, beta),
                       soft_cross_v=soft_targets(self.cross_v, self.soft_cross_v, beta),
                       soft_cross_r=soft_targets(self.cross_r, self.soft_cross_r, beta), beta=beta)


def soft_targets(hard, soft, beta=0.7):
    """Ŷ = β·onehot(h, K) + (1 − β)·Y* (docs/mult.md §5.5, Eq. (5.18); β = 0.7).

    hard [N] int labels in 0..K-1 (numpy or torch), soft [N, K] -> [N, K] float32 on soft's device.
    """
    hard = _check_soft_targets(hard, soft, beta)                # int64 [N] on soft's device
    out = soft.float() * (1.0 - beta)
    return out.scatter_add_(1, hard[:, None], torch.full_like(out[:, :1], beta))


def ot_association(feats_v, feats_r, labels_v, labels_r, sinkhorn_lambda=25.0, *,
                   sinkhorn_max_iter=500, sinkhorn_tol=0.1):
    """Plain optimal-transport association (`optimal_transport`, docs/mult.md §6), a MULT ablation.

    Homogeneous labels = DBSCAN labels; cross labels = the OT argmax of Eq. (5.8) for every
    instance; soft labels = one-hot. Same inputs and return type as `label_transfer`, without sim.
    Paper vs official code: the official one-hot puts outliers (-1) into the last cluster; here an
    outlier gets its Y⁰ argmax (nearest center, Eq. (5.7)).
    """
    feats_v, feats_r, labels_v, labels_r, k_v, k_r = _check_inputs(
        feats_v, feats_r, labels_v, labels_r, sinkhorn_lambda=sinkhorn_lambda,
        sinkhorn_max_iter=sinkhorn_max_iter)
    c_v, c_r = cluster_centers(feats_v, labels_v), cluster_centers(feats_r, labels_r)   # (4.11)
    x_v, it_vr = _ot_argmax(feats_v, c_r, float(sinkhorn_lambda), sinkhorn_max_iter, sinkhorn_tol)
    x_r, it_rv = _ot_argmax(feats_r, c_v, float(sinkhorn_lambda), sinkhorn_max_iter, sinkhorn_tol)
    h_v, h_r = _fill_outliers(feats_v, labels_v, c_v), _fill_outliers(feats_r, labels_r, c_r)
    return _hard_result(h_v, h_r, x_v, x_r, k_v, k_r, (it_vr, it_rv, 0))


def pgm_association(feats_v, feats_r, labels_v, labels_r):
    """Progressive-graph-matching association (`PGM_matching`, docs/mult.md §6; Wu & Ye, CVPR 2023).

    Cluster-level Hungarian matching on the cost W_kl = exp(−cos(C_v,k, C_r,l)) between normalised
    centers (Eq. (6.1)); each instance inherits its cluster's match; soft labels = one-hot. Same
    inputs and return type as `label_transfer`, without sim.
    Paper vs official code: the official code handles only K_v >= K_r (otherwise it crashes) and
    indexes outliers (-1) as the last cluster; here K_v < K_r is the mirror image (the infrared
    side gets the extra rounds) and outliers first get their Y⁰ argmax (nearest center, Eq. (5.7)).
    """
    feats_v, feats_r, labels_v, labels_r, k_v, k_r = _check_inputs(feats_v, feats_r, labels_v,
                                                                   labels_r)
    c_v, c_r = cluster_centers(feats_v, labels_v), cluster_centers(feats_r, labels_r)   # (4.11)
    h_v, h_r = _fill_outliers(feats_v, labels_v, c_v), _fill_outliers(feats_r, labels_r, c_r)
    cos = torch.nn.functional.normalize(c_v, dim=1) @ torch.nn.functional.normalize(c_r, dim=1).t()
    cost = np.exp(-cos.double().cpu().numpy())                               # W [K_v, K_r] (6.1)
    if k_v >= k_r:
        v_to_r, r_to_v = _progressive_matching(cost)
    else:
        r_to_v, v_to_r = _progressive_matching(cost.T)
    return _hard_result(h_v, h_r, _long_tensor(v_to_r, h_v.device)[h_v],
                        _long_tensor(r_to_v, h_v.device)[h_r], k_v, k_r, (0, 0, 0))


def associate(method, feats_v, feats_r, labels_v, labels_r, sim_v=None, sim_r=None, alpha=0.2,
              temp=0.05, sinkhorn_lambda=25.0):
    """Dispatch for `--association mult|ot|pgm` (docs/mult.md §5, §6): label_transfer,
    ot_association or pgm_association (the baselines ignore sim_*, alpha and temp; PGM also
    sinkhorn_lambda)."""
    if method not in ASSOCIATIONS:
        raise ValueError(f"method: expected one of {ASSOCIATIONS}, got {method!r}")
    if method == "mult":
        return label_transfer(feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, alpha, temp,
                              sinkhorn_lambda)
    if method == "ot":
        return ot_association(feats_v, feats_r, labels_v, labels_r, sinkhorn_lambda)
    return pgm_association(feats_v, feats_r, labels_v, labels_r)


def cluster_centers(features, labels):
    """C_k = (1/n_k)·Σ_{i: ℓ_i = k} x_i, NOT re-normalised (docs/mult.md §4.2, Eq. (4.11)).

    features [N, D], labels [N] int (numpy or torch; -1 = outlier, left out) -> C [K, D].
    """
    labels = _long_tensor(labels, features.device)
    k = int(labels.max()) + 1
    slot = torch.where(labels < 0, k, labels)                                # outliers -> spare row
    sums = features.new_zeros(k + 1, features.shape[1]).index_add_(0, slot, features)[:k]
    counts = torch.bincount(slot, minlength=k + 1)[:k]
    if bool((counts == 0).any()):
        raise ValueError("labels: every cluster id 0..K-1 needs at least one member")
    return sums / counts[:, None].to(sums.dtype)


# ----------------------------------------------------------------------------- steps of §5
def _scaled_kernel(x, y, lam):
    """The Sinkhorn kernel of docs/mult.md §5.1, rescaled against underflow (Eq. (5.6)): x [n, D],
    y [m, D] -> (G̃ [n, m] float32, q_col [m]).

    Q_ij = ‖x_i‖² + ‖y_j‖² − 2 x_i·y_j (Eq. (5.1), the general formula: centers are not unit-norm);
    q_row = row minima of Q, q_col = column minima of Q − q_row; G̃ = exp(−λ(Q − q_row − q_col)).
    Every row and column of G̃ holds a 1 and no entry exceeds 1. G̃ = diag(e^{λ q_row}) G
    diag(e^{λ q_col}) for the official G = exp(−λQ) (Eq. (5.2)), so the Sinkhorn on G̃ from
    b̃⁰ = e^{−λ q_col} / m yields ã = a e^{−λ q_row}, b̃ = b e^{−λ q_col} at every step:
    the same ratios b/b′ (same stopping), the same plan diag(ã) G̃ diag(b̃) = diag(a) G diag(b),
    the same argmax_k G_ik b_k, T_vr and T_rv, because the row factor cancels in G b and the column
    factor in Gᵀ a. Built in place: the [n, m] output is the only allocation of that size.
    """
    G = torch.addmm(y.square().sum(1)[None], x, y.t(), alpha=-2.0)         # [n, m]
    G.add_(x.square().sum(1)[:, None])                                       # Q
    G.sub_(G.amin(dim=1, keepdim=True))                                      # Q - q_row >= 0
    q_col = G.amin(dim=0)                                                    # [m]
    G.sub_(q_col).mul_(-lam).exp_()
    return G, q_col


def _sinkhorn(G, b, max_iter=500, tol=0.1, check_every=10):
    """Entropic OT with uniform marginals, S(Q; λ): docs/mult.md §5.1, Eqs. (5.3)-(5.5). Kernel
    G [n, m], start b.

    Iterates a = (1/n) ⊘ (G b); b′ = (1/m) ⊘ (Gᵀ a) (5.3); at t % 10 == 0,
    err = Σ_j |b_j / b′_j − 1| (NaN ignored; (5.4)); b ← b′; stops once err <= tol (initial err
    1e6) or after max_iter iterations, so a run lasts 1, 11, 21, ... or max_iter iterations.
    Returns (a [n], b [m], iterations): the last a and the updated b; the plan diag(a) G diag(b)
    (5.5) is never formed.
    float32 like the official code (err is summed in float64); where err lands within rounding of
    tol, a float64 run may stop 10 iterations earlier or later.
    """
    n, m = G.shape
    err, it = 1e6, 0
    while err > tol and it < max_iter:
        a = (1.0 / n) / torch.mv(G, b)                                       # [n]
        b_new = (1.0 / m) / torch.mv(G.t(), a)                               # [m]
        if it % check_every == 0:
            err = float(torch.nansum((b / b_new - 1).abs(), dtype=torch.float64))
        b = b_new
        it += 1
    return a, b, it


def _ot_argmax(x, centers, lam, max_iter, tol):
    """The one-hot Z⁰ of docs/mult.md Eq. (5.8) as labels: argmax_k Π_ik for Π = S(‖x_i − C_k‖²; λ).

    x [N, D], centers [K, D] -> (labels [N] int64 torch, iterations). a_i is constant along row i,
    so argmax_k Π_ik = argmax_k G_ik b_k (ties to the lowest k).
    """
    G, q_col = _scaled_kernel(x, centers, lam)                               # [N, K]
    _, b, it = _sinkhorn(G, torch.exp(-lam * q_col) / len(centers), max_iter, tol)
    return (G * b).argmax(dim=1), it


def _affinity(sim, device):
    """A = rownorm(1 − D) = rownorm(S) of docs/mult.md Eq. (5.9), as a sparse CSR tensor [n, n]
    float32 (§11 item 6).

    sim: checked scipy CSR float64 S = 1 - D_Jaccard [n, n], stored where D < 1, diagonal 1. A
    row-normalised copy of the values is made; no diagonal matrix.
    """
    n = sim.shape[0]
    row_sum = np.asarray(sim.sum(axis=1)).ravel()                            # [n], >= 1
    values = sim.data / np.repeat(row_sum, np.diff(sim.indptr))
    with warnings.catch_warnings():                                          # "CSR is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(sim.indptr.astype(np.int64)),
            torch.from_numpy(sim.indices.astype(np.int64)),
            torch.from_numpy(values.astype(np.float32)), size=(n, n), check_invariants=False,
        ).to(device)


def _propagate(smooth_a, smooth_b, transfer_ab, transfer_ba, y0, z0, alpha, max_iter, tol):
    """Label propagation P(A_a, A_b, T_ab, T_ba, Y⁰, Z⁰; α), docs/mult.md §5.4, Gauss-Seidel:

        Ỹ = (1 − α) T_ab Z + α Y⁰ (5.12);   Z̃ = (1 − α) T_ba Ỹ + α Z⁰, with the new Ỹ (5.13);
        Y ← ½ A_a Ỹ + ½ Ỹ;   Z ← ½ A_b Z̃ + ½ Z̃ (5.14);
    until δ = max(‖ΔZ‖₁ / ‖Z‖₁, ‖ΔY‖₁ / ‖Y‖₁) <= tol (5.15; that update is kept), at most
    max_iter times. y0 [N_a, K]: a-instances over a-clusters; z0 [N_b, K]: b-instances over
    a-clusters. smooth_* apply A_*, transfer_* apply T_*. Returns (Y*, Z*, iterations).
    """
    y, z = y0, z0
    for it in range(1, max_iter + 1):
        y_t = transfer_ab(z).mul_(1.0 - alpha).add_(y0, alpha=alpha)         # [N_a, K]
        z_t = transfer_ba(y_t).mul_(1.0 - alpha).add_(z0, alpha=alpha)       # [N_b, K]
        y_new = smooth_a(y_t).add_(y_t).mul_(0.5)
        z_new = smooth_b(z_t).add_(z_t).mul_(0.5)
        delta = max(_rel_l1(z_new, z), _rel_l1(y_new, y))
        y, z = y_new, z_new
        if delta <= tol:
            break
    return y, z, it


def _rel_l1(new, old):
    """‖new − old‖₁ / ‖old‖₁, entrywise (the terms of Eq. (5.15))."""
    return float((new - old).abs().sum(dtype=torch.float64) / old.abs().sum(dtype=torch.float64))


# ----------------------------------------------------------------------------- steps of §6
def _fill_outliers(features, labels, centers):
    """DBSCAN labels with each outlier (-1) set to argmax_k of Y⁰ = softmax(F Cᵀ / τ) (Eq. (5.7)),
    i.e. its most similar center. [N] numpy int64 -> [N] torch int64 on the features' device."""
    out = torch.tensor(labels, dtype=torch.int64, device=features.device)
    outlier = out < 0
    out[outlier] = (features[outlier] @ centers.t()).argmax(dim=1)
    return out


def _progressive_matching(cost):
    """Hungarian matching of docs/mult.md §6 (PGM_matching) for cost [K_a, K_b] with K_a >= K_b.

    Round one: a one-to-one assignment of all K_b columns to distinct rows (the official zero-padded
    square problem). Then the still unmatched rows are assigned again against all columns, round
    after round, until every row has a column. Returns (a_to_b [K_a], b_to_a [K_b]), b_to_a from
    round one.
    """
    k_a, k_b = cost.shape
    rows, cols = linear_sum_assignment(cost)                                 # K_b pairs
    a_to_b = np.full(k_a, -1, dtype=np.int64)
    a_to_b[rows] = cols
    b_to_a = np.empty(k_b, dtype=np.int64)
    b_to_a[cols] = rows
    while (a_to_b < 0).any():
        left = np.flatnonzero(a_to_b < 0)
        r, c = linear_sum_assignment(cost[left])
        a_to_b[left[r]] = c
    return a_to_b, b_to_a


def _hard_result(h_v, h_r, x_v, x_r, k_v, k_r, sinkhorn_iters):
    """LabelTransfer with one-hot soft labels (the baselines have no soft labels)."""
    return LabelTransfer(_numpy(h_v), _numpy(h_r), _numpy(x_v), _numpy(x_r), _onehot(h_v, k_v),
                         _onehot(h_r, k_r), _onehot(x_v, k_r), _onehot(x_r, k_v), k_v, k_r,
                         sinkhorn_iters, (0, 0))


# ----------------------------------------------------------------------------- conversions
def _onehot(labels, k):
    """labels [N] int64 torch -> onehot [N, k] float32 on the labels' device."""
    return torch.zeros(len(labels), k, device=labels.device).scatter_(1, labels[:, None], 1.0)


def _numpy(labels):
    return labels.cpu().numpy().astype(np.int64)


def _long_tensor(x, device):
    """Integer labels (numpy or torch) as an int64 tensor on `device`."""
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return x.to(device=device, dtype=torch.int64)


# ----------------------------------------------------------------------------- input checks
def _check_inputs(feats_v, feats_r, labels_v, labels_r, **params):
    """Checked float32 features, int64 labels and K_v, K_r. params: alpha in [0, 1], *_max_iter a
    positive integer, every other a positive number."""
    for name, value in params.items():
        if name == "alpha":
            expect, ok = "a value in [0, 1]", 0.0 <= value <= 1.0
        elif name.endswith("max_iter"):
            expect, ok = "a positive integer", value >= 1 and value % 1 == 0
        else:
            expect, ok = "a positive number", value > 0
        if not ok:
            raise ValueError(f"{name}: expected {expect}, got {value}")
    feats_v, feats_r = _check_features(feats_v, feats_r)
    labels_v, k_v = _check_labels(labels_v, len(feats_v), "labels_v")
    labels_r, k_r = _check_labels(labels_r, len(feats_r), "labels_r")
    return feats_v, feats_r, labels_v, labels_r, k_v, k_r


def _check_features(feats_v, feats_r):
    """Both must be float tensors [N, D] on one device with L2-normalised rows; returns float32."""
    out = []
    for name, f in (("feats_v", feats_v), ("feats_r", feats_r)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or not f.is_floating_point() \
                or f.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty float tensor [N, D], got "
                             f"{type(f).__name__} {getattr(f, 'shape', '')}")
        f = f.detach().float()
        norms = f.norm(dim=1)
        if not bool(torch.isfinite(norms).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
        if float((norms - 1).abs().max()) > 1e-3:
            raise ValueError(f"{name}: rows must be L2-normalised (norm 1 +- 1e-3), found norms "
                             f"{float(norms.min()):.4g}..{float(norms.max()):.4g}")
        out.append(f)
    if out[0].shape[1] != out[1].shape[1] or out[0].device != out[1].device:
        raise ValueError(f"feats_v, feats_r: expected the same D and device, got "
                         f"{tuple(out[0].shape)} on {out[0].device} and {tuple(out[1].shape)} on "
                         f"{out[1].device}")
    return out


def _check_labels(labels, n, name):
    """DBSCAN labels [n]: -1 for outliers, clusters 0..K-1 all non-empty; returns (int64, K)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: expected integer labels of shape ({n},), got {labels.dtype} "
                         f"{labels.shape}")
    labels = labels.astype(np.int64)
    if labels.min() < -1 or labels.max() < 0:
        raise ValueError(f"{name}: expected -1 (outlier) or cluster ids 0..K-1 with at least one "
                         f"cluster, found {labels.min()}..{labels.max()}")
    k = int(labels.max()) + 1
    empty = np.flatnonzero(np.bincount(labels[labels >= 0], minlength=k) == 0)
    if len(empty):
        raise ValueError(f"{name}: cluster ids must run 0..K-1 with no gaps; ids "
                         f"{empty[:5].tolist()} have no members")
    return labels, k


def _check_similarity(sim, n, name):
    """A Jaccard similarity S = 1 - D: scipy sparse [n, n], values in [0, 1], diagonal 1; returns a
    float64 CSR copy with duplicates summed."""
    if not sp.issparse(sim):
        raise ValueError(f"{name}: expected a scipy.sparse matrix (S = 1 - D_Jaccard), got "
                         f"{type(sim).__name__}")
    if sim.shape != (n, n):
        raise ValueError(f"{name}: expected shape ({n}, {n}), got {sim.shape}")
    sim = sp.csr_matrix(sim, dtype=np.float64, copy=True)
    sim.sum_duplicates()
    if not np.isfinite(sim.data).all() or sim.data.min(initial=0) < 0 \
            or sim.data.max(initial=0) > 1 + 1e-5:
        raise ValueError(f"{name}: values must be similarities 1 - D in [0, 1]")
    bad = np.flatnonzero(np.abs(sim.diagonal() - 1) > 1e-3)
    if len(bad):
        raise ValueError(f"{name}: the diagonal must be 1 (1 - D_ii); rows {bad[:5].tolist()} "
                         f"have {sim.diagonal()[bad[:5]].tolist()}")
    return sim


def _check_soft_targets(hard, soft, beta):
    """soft_targets' inputs checked; returns hard as int64 [N] on soft's device."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
    if not isinstance(soft, torch.Tensor) or soft.dim() != 2:
        raise ValueError(f"soft: expected a tensor [N, K], got {type(soft).__name__}")
    hard = _long_tensor(hard, soft.device)
    if hard.shape != soft.shape[:1] or (len(hard) and not 0 <= int(hard.min()) <= int(hard.max())
                                        < soft.shape[1]):
        raise ValueError(f"hard: expected {soft.shape[0]} labels in 0..{soft.shape[1] - 1}")
    return hard


def _check_finite(results):
    """Every output of label_transfer finite (docs/mult.md §5.1 on underflow)."""
    for name, t in results.items():
        if not bool(torch.isfinite(t).all()):
            raise RuntimeError(f"label_transfer: {name} is not finite")
