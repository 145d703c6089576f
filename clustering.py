"""Pseudo-labels: the exact sparse k-reciprocal Jaccard distance (standard and modality-aware), and DBSCAN.

Papers: MULT (He et al., "Exploring Homogeneous and Heterogeneous Consistent Label Associations for Unsupervised
Visible-Infrared Person ReID", IJCV 2024), its per-modality clustering: the k-reciprocal Jaccard distance of Zhong
et al. (CVPR 2017) with the official code's list lengths, docs/mult.md §4.1, Eqs. (4.1)-(4.7), then DBSCAN and
the cluster centers, §4.2, Eqs. (4.8)-(4.11). MBMIL (Wang et al., "Modality-Aware Bias Mitigation and Invariance
Learning for Unsupervised Visible-Infrared Person Re-Identification", AAAI 2026), its bias-mitigated global
clustering: the modality-aware Jaccard distance, docs/mbmil.md §A.2, Eqs. (A.2.2)-(A.2.4) (balanced neighbour
lists, modality-balanced query expansion).

    S = jaccard_similarity(features, k1=30, k2=6)       # csr [N, N] float32, S = 1 - d_J, symmetric, S_ii = 1
    labels = dbscan(S, eps=0.6, min_samples=4)          # int64 [N], -1 = outlier
    centers = cluster_centers(features, labels)         # [K, D] means, not re-normalised

Imports torch, numpy, scipy and the standard library only: the file can be copied alone into another codebase
(tests/test_copy_one_file.py does so). Checked against the slow dense references written in
tests/test_clustering.py (`reference_jaccard`, `reference_dbscan`).

Exactness: the dense definition up to float32 rounding of sums. Rankings use the float32 dot product x_i . x_j
(descending = squared distance 2 - 2 x_i . x_j ascending), ties broken by the smaller index; a point is always
first in its own list (its self-similarity counts as +inf, so rounding never puts a duplicate in front).
Speed (no N x N array anywhere; the work runs on features.device; docs/mult.md §11 items 1-5):
  - kNN: symmetric blocked GEMM into one reused block; each block pair I <= J serves the rows of I (row
    top-k) and of J (column top-k): half the arithmetic of X @ X.T. Rows whose k-th and (k+1)-th values tie
    are recomputed with a stable sort.
  - Sets, V, query expansion and the sum of minima are vectorised over row chunks. Membership tests,
    de-duplication and sums use reused dense scratch rows [rows, N] as an exact hash table: only touched
    cells are read or reset, and nothing is sorted. Jaccard pairs are enumerated through the columns of Ṽ
    (an inverted index), each unordered pair once, at O(sum_k c_k^2) for column counts c_k.
  - DBSCAN: connected components of the core-point graph (scipy) plus a vectorised border rule.
Paper vs official code: the official code forms dense N x N matrices and uses faiss for the kNN; the values
are the same up to float32 rounding and the order of exactly tied neighbours.
Paper vs official code (MBMIL): the official code hard-codes k1 = 30 (15 + 15) and k2 = 6 per modality for the
global distance; here they are the k1 and k2 arguments, with the same defaults.
"""
import numbers
import time
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

BLOCK_BYTES = 64 * 2**20    # one block of similarities in the kNN (a [4096, 4096] float32 buffer, reused)
CHUNK = 2**20               # contributions per chunk in the sparse steps
BUFFER_BYTES = 32 * 2**20   # dense scratch rows [rows, N] (float32 sums + int32 owners), reused
NORM_TOL = 1e-3             # allowed | ||x_i|| - 1 |


def jaccard_similarity(features, k1=30, k2=6, modality=None, timings=None):
    """S = 1 - d_J, the k-reciprocal Jaccard similarity: docs/mult.md §4.1, Eqs. (4.1)-(4.7); with `modality`,
    the modality-aware distance of docs/mbmil.md §A.2, Eqs. (A.2.2)-(A.2.4).

    features: float tensor [N, D], L2-normalised rows, any device (the work runs there; float32 arithmetic).
    k1: main list length counting the point itself (half lists have round(k1/2) + 1 entries, NumPy rounding).
    k2: query-expansion list length counting the point itself (per modality in the modality-aware mode).
    modality: None, or int array/tensor [N] with 0 = visible, 1 = infrared in any order: the modality-aware
        distance (k1 even; each list is the k1/2 nearest visible plus the k1/2 nearest infrared samples).
        Both modalities must be present: with one only, use modality=None (the standard distance).
    timings: None, or a dict that receives the seconds of each phase, "knn", "recip+exp", "V+QE" and
        "jaccard" (each measured once the device's queued work is done; bench/bench_clustering.py reads it).
    Returns scipy.sparse.csr_matrix [N, N], float32, symmetric, sorted indices, S_ii = 1; it stores every pair
    with d_J < 1, and every pair not stored has d_J = 1 exactly.
    """
    x, mod = _check_inputs(features, k1, k2, modality)
    n, lap = x.shape[0], _stopwatch(timings, x.device)
    lists = _neighbour_lists(x, k1, k2, mod)                    # L_i (4.1) / (A.2.2), expansion rows
    lap("knn")
    e_pairs = _expanded_sets(lists["main"], k1)                 # j in E_i: R(i), R_h(i) (4.2), E_i (4.3)
    lap("recip+exp")
    v = _weights(x, e_pairs, lists["known"])                    # V (4.4), CSR
    del e_pairs
    vt = _query_expansion(v, lists["qe_idx"], lists["qe_w"])    # Ṽ (4.5) / (A.2.4)
    del v, lists
    lap("V+QE")
    pairs = list(_jaccard_pairs(vt, n))                         # s_ij (4.6) for i <= j
    del vt
    similarity = _symmetric_csr(pairs, n)                       # S = 1 - d_J (4.7)
    lap("jaccard")
    return similarity


def dbscan(similarity, eps, min_samples=4):
    """DBSCAN on d = 1 - S (docs/mult.md §4.2, Eqs. (4.8)-(4.10)), labelled exactly as scikit-learn's
    DBSCAN(metric="precomputed").

    similarity: scipy.sparse matrix [N, N], symmetric, values in [0, 1] (as jaccard_similarity returns);
        pairs not stored have distance 1. A stored pair's distance is 1 - S, formed and compared with eps in
        S's dtype (float32 for jaccard_similarity's output), as scikit-learn does on a float32 matrix.
    eps: in (0, 1); j is a neighbour of i when 1 - S_ij <= eps; every point is its own neighbour.
    min_samples: a point with at least this many neighbours (itself included) is a core point.
    Returns int64 [N]: clusters 0..K-1 numbered in index order of their first core point; a border point takes
    the lowest-numbered cluster among its core neighbours (the first to reach it in sklearn's scan); -1 =
    outlier. With no core point every label is -1 (a valid result).
    """
    s = _check_similarity(similarity, eps, min_samples)         # canonical CSR
    n, data = s.shape[0], s.data
    if n == 0:
        return np.empty(0, dtype=np.int64)
    eps, r, c, step = data.dtype.type(eps), [], [], max(1, n // 16)   # compared in S's dtype, as sklearn
    for r0 in range(0, n, step):                                     # row chunks: bounded temporaries
        r1 = min(r0 + step, n)
        e0, e1 = s.indptr[r0], s.indptr[r1]
        rows, cols = np.repeat(np.arange(r0, r1), np.diff(s.indptr[r0:r1 + 1])), s.indices[e0:e1]
        near = ((1 - data[e0:e1]) <= eps) & (rows != cols)           # j in N_eps(i) (4.8), self excluded
        r.append(rows[near])
        c.append(cols[near])
    r, c = np.concatenate(r), np.concatenate(c)
    _check_symmetric(r, c, n)
    core = 1 + np.bincount(r, minlength=n) >= min_samples           # (4.8), i counted in N_eps(i)
    labels = np.full(n, -1, dtype=np.int64)
    both = core[r] & core[c]                                         # i ~ j (4.9)
    graph = sp.csr_matrix((np.ones(both.sum(), np.int8), (r[both], c[both])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    core_idx = np.flatnonzero(core)
    _, first = np.unique(comp[core_idx], return_index=True)          # first core point of each component
    cluster = np.full(comp.max() + 1 if n else 0, -1, dtype=np.int64)
    cluster[comp[core_idx[np.sort(first)]]] = np.arange(first.size)
    labels[core_idx] = cluster[comp[core_idx]]
    border = ~core[r] & core[c]                                      # (border point, core neighbour)
    best = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(best, r[border], labels[c[border]])                # (4.10)
    has = best < np.iinfo(np.int64).max
    labels[has] = best[has]
    return labels


def cluster_centers(features, labels):
    """C_k = (1/n_k) Σ_{i: ℓ_i = k} x_i, the mean of the rows with label k (docs/mult.md §4.2, Eq. (4.11)), not
    re-normalised.

    features: tensor [N, D]; labels: int array or tensor [N], -1 (outliers) ignored.
    Returns tensor [K, D] on features.device, K = labels.max() + 1; every label 0..K-1 needs a member.
    """
    lab, counts = _check_cluster_labels(features, labels)            # int64 [N], members per cluster [K]
    keep = torch.as_tensor(np.flatnonzero(lab >= 0), device=features.device)
    idx = torch.as_tensor(lab, device=features.device)[keep]
    sums = torch.zeros(len(counts), features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, idx, features.detach()[keep])
    return sums / torch.as_tensor(counts, dtype=features.dtype, device=features.device)[:, None]


# ----------------------------------------------------------------------------------------- Jaccard steps
def _neighbour_lists(x, k1, k2, mod):
    """The neighbour lists L_i and the query-expansion rows and weights, in the input index space.

    Standard (docs/mult.md §4.1 step 1, d_ij of Eq. (4.1)): L_i = the k1 nearest; query expansion over
    L_i⁽ᵏ²⁾ with weights 1/k2 (Eq. (4.5)).
    Modality-aware (docs/mbmil.md §A.2): L_i = N^V(i, k1/2) ∪ N^I(i, k1/2) re-sorted by similarity
    (Eq. (A.2.2)); query expansion over N^V(i, k2) and N^I(i, k2) with weights ½·1/k2 (Eq. (A.2.4); for every
    k2, also k2 = 1).
    Returns dict: main [N, k1] (the lists L_i used for reciprocity), qe_idx [N, q] and qe_w [q] (query
    expansion rows and weights), known: [(sim, idx)] lists whose x_i . x_j are known (self included).
    """
    n = x.shape[0]
    rows = torch.arange(n, device=x.device)[:, None]
    if mod is None:
        lists = _knn_blocked(x, [(0, n)], [k1])
        main, qe_idx, qe_w = lists[0][1], lists[0][1][:, :k2], torch.full((k2,), 1.0 / k2, device=x.device)
    else:
        order = torch.argsort(mod, stable=True)                      # visible first, index order kept
        n_v = int((mod == 0).sum())
        km = max(k1 // 2, k2)
        lists = []
        for v, i in _knn_blocked(x[order], [(0, n_v), (n_v, n)], [km, km]):
            v_o, i_o = torch.empty_like(v), torch.empty_like(i)
            v_o[order], i_o[order] = v, order[i]                     # rows and columns back to input order
            lists.append((v_o, i_o))
        h = k1 // 2
        _, main = _sort_lists(torch.cat([lists[0][0][:, :h], lists[1][0][:, :h]], 1),
                              torch.cat([lists[0][1][:, :h], lists[1][1][:, :h]], 1))
        qe_idx = torch.cat([lists[0][1][:, :k2], lists[1][1][:, :k2]], 1)
        qe_w = torch.full((2 * k2,), 0.5 / k2, device=x.device)
    self_sim = (x * x).sum(1)[:, None]
    known = [(torch.where(i == rows, self_sim, v), i) for v, i in lists]
    return {"main": main, "qe_idx": qe_idx, "qe_w": qe_w, "known": known}


def _knn_blocked(x, bounds, ks):
    """Exact top-k per row within each column group by x_i . x_j, i.e. by d_ij of docs/mult.md Eq. (4.1)
    ascending, through a symmetric blocked GEMM (§11 item 1).

    x: [N, D]; bounds: [(start, end)] contiguous column groups covering 0..N; ks: list length per group.
    Returns per group (val [N, k], idx [N, k]) sorted by (similarity desc, index asc), self = +inf first.
    """
    n, dev = x.shape[0], x.device
    b = max(256, int((BLOCK_BYTES / 4) ** 0.5) // 256 * 256)
    blocks = [(s, min(s + b, e), g) for g, (s0, e) in enumerate(bounds) for s in range(s0, e, b)]
    kk = [min(k + 1, e - s) for k, (s, e) in zip(ks, bounds)]   # one extra column to detect boundary ties
    best_v = [torch.full((n, m), -float("inf"), device=dev) for m in kk]
    best_i = [torch.zeros((n, m), dtype=torch.long, device=dev) for m in kk]
    buf = torch.empty(min(b, n) ** 2, device=dev)                   # reused block of similarities

    def merge(g, r0, r1, v, i):                                      # fold candidates into the running lists
        v, i = torch.cat([best_v[g][r0:r1], v], 1), torch.cat([best_i[g][r0:r1], i], 1)
        v, pos = v.topk(kk[g], dim=1)
        best_v[g][r0:r1], best_i[g][r0:r1] = v, i.gather(1, pos)

    with _ieee_fp32():
        for a, (r0, r1, g0) in enumerate(blocks):
            for c0, c1, g1 in blocks[a:]:
                sim = buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                torch.mm(x[r0:r1], x[c0:c1].T, out=sim)              # [B_r, B_c]
                if r0 == c0:
                    sim.diagonal().fill_(float("inf"))
                v, i = _topk(sim, kk[g1], 1)
                merge(g1, r0, r1, v, i + c0)
                if r0 != c0:
                    v, i = _topk(sim, kk[g0], 0)
                    merge(g0, c0, c1, v, i + r0)
        out = []
        for g, ((s, e), k) in enumerate(zip(bounds, ks)):
            v, i = _sort_lists(best_v[g], best_i[g])
            if kk[g] > k:                                            # ties across the k-th place: recompute
                rows = (v[:, k - 1] == v[:, k]).nonzero().flatten()
                for c in torch.split(rows, max(1, int(BLOCK_BYTES / 4 / (e - s)))):
                    sim = x[c] @ x[s:e].T                            # [C, group size]
                    own = (c >= s) & (c < e)
                    sim[own.nonzero().flatten(), c[own] - s] = float("inf")
                    sv, si = sim.sort(dim=1, descending=True, stable=True)
                    v[c, :k], i[c, :k] = sv[:, :k], si[:, :k] + s
            out.append((v[:, :k].contiguous(), i[:, :k].contiguous()))
    return out


def _topk(sim, k, dim):
    """Top-k along `dim` (1: of each row, 0: of each column) of sim [R, C] -> values, positions [lanes, k].

    Exact values; arbitrary choice among entries tied at the k-th value (as torch.topk). A max over g = 8
    strided slices first picks the k best slices, so only 8k entries per lane are ranked.
    """
    g, length = 8, sim.shape[dim]
    if length % g or length < 4 * g * k:
        return (sim if dim == 1 else sim.T).topk(min(k, length), dim=1)
    w = length // g
    if dim == 1:
        slices = sim.view(sim.shape[0], g, w).amax(1)               # [R, w]: max of columns q, q + w, ...
    else:
        slices = sim.view(g, w, sim.shape[1]).amax(0).T             # [C, w]
    _, q = slices.topk(k, dim=1)
    pos = (q[:, :, None] + w * torch.arange(g, device=sim.device)).flatten(1)   # [lanes, 8k]
    cand = sim.gather(1, pos) if dim == 1 else sim.gather(0, pos.T).T
    v, p = cand.topk(k, dim=1)
    return v, pos.gather(1, p)


def _sort_lists(v, i):
    """Sort each row by (value desc, index asc)."""
    i, o = i.sort(dim=1)
    v = v.gather(1, o)
    v, o = v.sort(dim=1, descending=True, stable=True)
    return v, i.gather(1, o)


def _expanded_sets(main, k1):
    """The pairs (i, j), j ∈ E_i, as (row, col), rows sorted: docs/mult.md §4.1 steps 2-3, Eqs. (4.2)-(4.3)
    (docs/mbmil.md Eq. (A.2.3) on the balanced lists).

    R(i) = {j ∈ L_i⁽ᵏ¹⁾ : i ∈ L_j⁽ᵏ¹⁾} and R_h(i) = {j ∈ L_i⁽ᵐ⁺¹⁾ : i ∈ L_j⁽ᵐ⁺¹⁾}, m = round(k1/2) (4.2);
    E_i = R(i) ∪ R_h(c) for every c ∈ R(i) with |R_h(c) ∩ R(i)| > ⅔·|R_h(c)| (strict; (4.3)).
    Membership in R(i; k1) is a lookup in the scratch rows, where the members of each row are marked.
    """
    n, dev = main.shape[0], main.device
    mh1 = int(np.round(k1 / 2)) + 1
    main_mask, half_mask = _reciprocal(main, k1), _reciprocal(main, mh1)
    half_size = half_mask.sum(1)
    half_lists = main[:, :mh1].contiguous()
    max_rows, mark, owner = _scratch(n, dev)
    step = max(1, min(max_rows, CHUNK // (k1 * mh1)))
    rows_out, cols_out = [], []
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        local = torch.arange(r1 - r0, device=dev)[:, None] * n
        c, in_main = main[r0:r1], main_mask[r0:r1]                   # candidates c, [B, k1]
        members = (local + c).masked_select(in_main)                 # cells of R(i; k1)
        mark.index_fill_(0, members, 1)
        cand = half_lists.index_select(0, c.flatten()).view(r1 - r0, k1, mh1)   # R(c; half), padded
        valid = half_mask.index_select(0, c.flatten()).view_as(cand)
        inside = mark.index_select(0, (local[:, :, None] + cand).flatten()).view_as(cand) == 1
        mark.index_fill_(0, members, 0)
        inter = (inside & valid).sum(2)
        ok = in_main & (3 * inter > 2 * half_size.index_select(0, c.flatten()).view_as(c))
        cols = torch.cat([torch.where(in_main, c, -1),
                          torch.where(ok[:, :, None] & valid, cand, -1).flatten(1)], 1)   # row-major
        flat = (local + cols).masked_select(cols >= 0)
        flat = flat.masked_select(_first(flat, owner))
        rows_out.append(flat // n + r0)
        cols_out.append(flat % n)
    return torch.cat(rows_out), torch.cat(cols_out)


def _reciprocal(lists, m):
    """bool [N, m]: j = L_i[t] is k-reciprocal within the first m entries, i.e. i ∈ L_j⁽ᵐ⁾ (Eq. (4.2))."""
    n, lm = lists.shape[0], lists[:, :m].contiguous()
    out = torch.empty(n, m, dtype=torch.bool, device=lists.device)
    step = max(1, CHUNK // (m * m))
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        back = lm.index_select(0, lm[r0:r1].flatten()).view(r1 - r0, m, m)        # L_j[:m] for j in L_i[:m]
        out[r0:r1] = (back == torch.arange(r0, r1, device=lists.device)[:, None, None]).any(2)
    return out


def _weights(x, e_pairs, known):
    """V as CSR, docs/mult.md §4.1 step 4, Eq. (4.4): V_ij = exp(−d_ij) / Σ_{j′ ∈ E_i} exp(−d_ij′) for j ∈ E_i,
    with d_ij = 2 − 2 x_i·x_j (4.1).

    Similarities come from the kNN lists where known (looked up through the scratch rows), the rest from
    dot products of gathered rows. Returns (indptr [N+1], cols [nnz], vals [nnz]), rows sorted.
    """
    row, col = e_pairs
    n, d, dev = x.shape[0], x.shape[1], x.device
    indptr = torch.zeros(n + 1, dtype=torch.long, device=dev)
    indptr[1:] = torch.bincount(row, minlength=n).cumsum(0)
    max_rows, table, owner = _scratch(n, dev)
    sim = torch.empty(row.numel(), device=dev)
    hit = torch.empty(row.numel(), dtype=torch.bool, device=dev)
    for r0 in range(0, n, max_rows):
        r1 = min(r0 + max_rows, n)
        local = torch.arange(r1 - r0, device=dev)[:, None] * n
        k_flat = torch.cat([(local + i[r0:r1]).flatten() for _, i in known])
        table[k_flat] = torch.cat([v[r0:r1].flatten() for v, _ in known])
        owner[k_flat] = -1                                           # mark known cells
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        e_flat = (row[e0:e1] - r0) * n + col[e0:e1]
        hit[e0:e1] = owner[e_flat] == -1
        sim[e0:e1] = table[e_flat]
        table[k_flat], owner[k_flat] = 0, 0
    miss = (~hit).nonzero().flatten()
    step = max(1, BUFFER_BYTES // (8 * d))
    xr, xc = torch.empty(step, d, device=dev), torch.empty(step, d, device=dev)
    for m in torch.split(miss, step):
        a, c = xr[:m.numel()], xc[:m.numel()]
        torch.index_select(x, 0, row[m], out=a)
        torch.index_select(x, 0, col[m], out=c)
        sim[m] = a.mul_(c).sum(1)
    w = torch.exp(-(2 - 2 * sim))
    total = torch.zeros(n, device=dev).index_add_(0, row, w)
    return indptr, col, w / total[row]


def _query_expansion(v, qe_idx, qe_w):
    """Ṽ_i = Σ_t w_t V_{q_it} as (row, col, val), rows sorted: Ṽ_i = (1/k2)·Σ_{j ∈ L_i⁽ᵏ²⁾} V_j (docs/mult.md
    Eq. (4.5)), or the ½/½ average over the k2 nearest of each modality (docs/mbmil.md Eq. (A.2.4))."""
    indptr, cols, vals = v
    n, q = qe_idx.shape
    lens = indptr[1:] - indptr[:-1]
    row_base = torch.arange(n, device=cols.device)[:, None].expand(n, q)

    def make(r0, r1):
        src = qe_idx[r0:r1].flatten()                                # rows of V to add, [(r1 - r0) * q]
        pos, w, base = _runs(indptr[src], lens[src], qe_w.repeat(r1 - r0), (row_base[r0:r1] - r0).flatten() * n)
        return base + cols.index_select(0, pos), vals.index_select(0, pos) * w

    return _sum_pairs(make, lens[qe_idx].sum(1), n)


def _jaccard_pairs(vt, n):
    """s_ij = Σ_k min(Ṽ_ik, Ṽ_jk) for every pair i <= j with overlapping supports (docs/mult.md Eq. (4.6); §11
    item 4).

    Pairs are enumerated through the columns of Ṽ (an inverted index): for an entry (i, k), it and every
    later entry (j > i) of column k contribute min(Ṽ_ik, Ṽ_jk). Returns (i, j, s), i non-decreasing.
    """
    row, col, val = vt[0].long(), vt[1].long(), vt[2]
    order = _column_order(row, col, n)                              # CSC order, rows ascending
    csc_row, csc_val = row[order], val[order]
    csc_pos = torch.empty_like(order)
    csc_pos[order] = torch.arange(order.numel(), device=order.device)
    after = torch.bincount(col, minlength=n).cumsum(0)[col] - csc_pos    # (i, k) and the entries below
    row_ptr = torch.zeros(n + 1, dtype=torch.long, device=row.device)
    row_ptr[1:] = torch.bincount(row, minlength=n).cumsum(0)
    row_cost = torch.zeros(n, dtype=torch.long, device=row.device).index_add_(0, row, after)

    def make(r0, r1):
        e0, e1 = int(row_ptr[r0]), int(row_ptr[r1])
        pos, a, base = _runs(csc_pos[e0:e1], after[e0:e1], val[e0:e1], (row[e0:e1] - r0) * n)
        return base + csc_row.index_select(0, pos), torch.minimum(a, csc_val.index_select(0, pos))

    return _sum_pairs(make, row_cost, n)


def _column_order(row, col, n):
    """Permutation putting entries (rows non-decreasing) in column order, rows ascending within a column."""
    if col.device.type != "cpu":
        return torch.argsort(col, stable=True)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row.numpy(), minlength=n))])
    ids = np.arange(col.numel(), dtype=np.int64)
    return torch.from_numpy(sp.csr_matrix((ids, col.numpy(), indptr), shape=(n, n)).tocsc().data)


def _symmetric_csr(pairs, n):
    """S_ij = s_ij/(2 − s_ij) = 1 − d_J (d_J clipped at 0; docs/mult.md Eqs. (4.6)-(4.7)) for the pairs i <= j,
    mirrored; S_ii = 1.

    pairs: list [i, j, s] of tensors [P], i non-decreasing, each diagonal pair once; consumed (emptied) so
    that its memory is released early. Returns canonical CSR float32.
    """
    i, j, s = pairs
    pairs.clear()
    sim = torch.clamp(s / (2 - s), max=1.0).cpu().numpy()
    i, j = i.cpu().numpy(), j.cpu().numpy()
    sim[i == j] = 0.5                                                # 0.5 + 0.5 = 1 exactly once mirrored
    if not (sim > 0).all():                                          # s underflowed: d_J = 1, not stored
        keep = sim > 0
        i, j, sim = i[keep], j[keep], sim[keep]
    upper = sp.csr_matrix((sim, j, np.concatenate([[0], np.cumsum(np.bincount(i, minlength=n))])), (n, n))
    del i, j, s, sim
    upper.sort_indices()
    return (upper + upper.T).tocsr()


# ----------------------------------------------------------------------------------------- shared helpers
def _scratch(n, device):
    """Reused dense scratch rows [rows, N]: float32 sums and int32 owners (an exact hash table per chunk)."""
    rows = max(1, min(n, BUFFER_BYTES // (8 * n)))
    return rows, torch.zeros(rows * n, device=device), torch.zeros(rows * n, dtype=torch.int32, device=device)


def _first(flat, owner):
    """Mask keeping one entry per distinct value of flat (exact, O(len(flat)); owner is scratch)."""
    ids = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device)
    owner.index_copy_(0, flat, ids)                                  # duplicates: one write survives
    return owner.index_select(0, flat) == ids


def _sum_pairs(make, row_cost, n):
    """Sum contributions over duplicate (row, col) pairs, in row chunks of about CHUNK contributions.

    make(r0, r1) -> (flat, val): contributions of rows r0..r1-1 at cells flat = (row - r0) * N + col. Each
    chunk is summed in dense scratch rows (cache-sized), and one representative per cell is picked through
    an 'owner' scratch, so only touched cells are read or reset. Returns (row, col, sum), rows sorted.
    """
    max_rows, acc, owner = _scratch(n, row_cost.device)
    cum = np.concatenate([[0], np.cumsum(row_cost.cpu().numpy())])
    out, r0 = [], 0
    while r0 < n:
        r1 = int(np.searchsorted(cum, cum[r0] + CHUNK, side="right")) - 1
        r1 = min(max(r1, r0 + 1), r0 + max_rows, n)
        flat, val = make(r0, r1)
        acc.index_add_(0, flat, val)
        flat = flat.masked_select(_first(flat, owner))
        out.append(((flat // n + r0).int(), (flat % n).int(), acc.index_select(0, flat)))
        acc.index_fill_(0, flat, 0)
        r0 = r1
    return tuple(torch.cat(t) for t in zip(*out))


def _runs(starts, counts, *per_run):
    """Expand runs (start, count): positions start..start+count-1 of every run, flattened in order, and
    each per-run tensor repeated over its run."""
    total = int(counts.sum())
    seg = torch.repeat_interleave(counts, output_size=total)         # run id of every position
    first = torch.cumsum(counts, 0) - counts                         # exclusive cumsum
    pos = (starts - first).index_select(0, seg) + torch.arange(total, device=counts.device)
    return (pos,) + tuple(t.index_select(0, seg) for t in per_run)


@contextmanager
def _ieee_fp32():
    """No TF32 in CUDA matmuls inside this block: rankings need IEEE float32 products."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _stopwatch(timings, device):
    """lap(name): the seconds since the previous lap (or this call) into timings[name], once the device's queued
    work is done; a no-op when timings is None."""
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    last = None if timings is None else [now()]

    def lap(name):
        if timings is not None:
            last.append(now())
            timings[name] = last[-1] - last[-2]
    return lap


# ----------------------------------------------------------------------------------------- input checks
def _check_inputs(features, k1, k2, modality):
    """Validated float32 features [N, D] and modality (int64 tensor [N] or None); a clear error otherwise."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features: expected a float torch.Tensor [N, D], got {type(features).__name__} "
                         f"{tuple(getattr(features, 'shape', ()))}")
    if not all(isinstance(k, numbers.Integral) for k in (k1, k2)) or k1 < 2 or not 1 <= k2 <= k1:
        raise ValueError(f"k1, k2: expected ints with k1 >= 2 and 1 <= k2 <= k1, got k1 = {k1!r}, k2 = {k2!r}")
    n = features.shape[0]
    if n < k1:
        raise ValueError(f"features: N = {n} samples is fewer than k1 = {k1}")
    x = features.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features: contains NaN or Inf")
    norms = x.norm(dim=1)
    worst = int((norms - 1).abs().argmax())
    if abs(float(norms[worst]) - 1) > NORM_TOL:
        raise ValueError(f"features: rows must be L2-normalised (|norm - 1| <= {NORM_TOL}); row {worst} "
                         f"has norm {float(norms[worst]):.6g} (use torch.nn.functional.normalize)")
    if modality is None:
        return x, None
    mod = np.asarray(modality.detach().cpu() if isinstance(modality, torch.Tensor) else modality)
    if mod.shape != (n,) or not np.issubdtype(mod.dtype, np.integer) or not np.isin(mod, (0, 1)).all():
        raise ValueError(f"modality: expected an int array [N = {n}] of 0 (visible) / 1 (infrared), got dtype "
                         f"{mod.dtype}, shape {mod.shape}, values {np.unique(mod)[:4]}")
    if k1 % 2:
        raise ValueError(f"k1: the modality-aware distance takes k1/2 per modality, so k1 must be even, got {k1}")
    counts = np.bincount(mod, minlength=2)
    if counts.min() == 0:
        raise ValueError(f"modality: only {'visible' if counts[0] else 'infrared'} samples present; the "
                         "modality-aware distance needs both (use modality=None for the standard distance)")
    if counts.min() < max(k1 // 2, k2):
        raise ValueError(f"modality: {counts[0]} visible and {counts[1]} infrared samples; each modality needs "
                         f"at least max(k1/2, k2) = {max(k1 // 2, k2)}")
    return x, torch.as_tensor(mod, dtype=torch.long, device=x.device)


def _check_similarity(similarity, eps, min_samples):
    """DBSCAN's inputs checked; returns the similarity as canonical CSR (duplicates summed)."""
    if not sp.issparse(similarity) or similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity: expected a square scipy.sparse matrix, got {type(similarity).__name__} "
                         f"{getattr(similarity, 'shape', '')}")
    if not isinstance(eps, numbers.Real) or not 0 < eps < 1:
        raise ValueError(f"eps: expected a number in (0, 1), got {eps!r}")
    if not isinstance(min_samples, numbers.Integral) or min_samples < 1:
        raise ValueError(f"min_samples: expected an int >= 1, got {min_samples!r}")
    s = similarity.tocsr()
    if not s.has_canonical_format:
        s = s.copy()
        s.sum_duplicates()
    data = s.data
    if s.shape[0] and (not np.issubdtype(data.dtype, np.floating) or not np.isfinite(data).all()
                       or (data.size and (data.min() < 0 or data.max() > 1))):
        raise ValueError("similarity: values must be finite floats in [0, 1]")
    return s


def _check_symmetric(r, c, n):
    """The eps-neighbour pairs (r, c) must be symmetric, as they are for a symmetric S."""
    adj = sp.csr_matrix((np.ones(r.size, np.int8), (r, c)), shape=(n, n))
    if (adj != adj.T).nnz:
        raise ValueError("similarity: must be symmetric (S_ij = S_ji)")


def _check_cluster_labels(features, labels):
    """cluster_centers' inputs checked -> (labels as int64 numpy [N], member counts [K], all > 0)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features: expected a float torch.Tensor [N, D], got {type(features).__name__}")
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim != 1 or len(lab) != features.shape[0] or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels: expected an int array [N = {features.shape[0]}], got dtype {lab.dtype} "
                         f"shape {lab.shape}")
    if lab.size and lab.min() < -1:
        raise ValueError(f"labels: values must be >= -1 (-1 = outlier), got {lab.min()}")
    k = int(lab.max()) + 1 if lab.size else 0
    if k <= 0:
        raise ValueError("labels: no clusters (every label is -1)")
    counts = np.bincount(lab[lab >= 0], minlength=k)
    if (counts == 0).any():
        raise ValueError(f"labels: clusters must be numbered 0..K-1; label {np.flatnonzero(counts == 0)[0]} "
                         "has no member")
    return lab.astype(np.int64), counts
