"""Re-ID metrics of the SYSU-MM01, RegDB and LLCM protocols, the test distance, and k-reciprocal re-ranking.

Protocol of MULT (He et al., IJCV 2024; docs/mult.md §9), which MBMIL (Wang et al., AAAI 2026) shares: the
distance is squared Euclidean of unit features in float64 (9.2); the ranking is NumPy's default argsort; AP,
INP and the CMC as (9.3)-(9.5). Queries without a correct match are left out of every average, as officially.
- SYSU-MM01 (Wu et al., "RGB-Infrared Cross-Modality Person Re-Identification", ICCV 2017): a camera-3 query
  never sees camera-2 gallery images; the CMC counts distinct identities.
- RegDB (Nguyen et al., Sensors 2017): the standard CMC on the full ranked list, no exclusion.
- LLCM (Zhang & Wang, CVPR 2023; docs/llcm.md §4, its official evaluation): a query never sees gallery images
  of its own identity in its own camera number (4.1); the CMC counts distinct identities.
Optional, off by default: k-reciprocal re-ranking (Zhong et al., CVPR 2017), `re_ranking`; the papers of this
field report without it.

    cmc, mAP, mINP = eval_sysu(pairwise_distance(q_feats, g_feats), q_pids, g_pids, q_camids, g_camids)

Imports torch, numpy, scipy and the standard library only: copy this file alone into another codebase
(tests/test_copy_metrics.py does so). Checked against slow references written in the tests:
`reference_metrics` and `reference_re_ranking` in tests/test_evaluate.py, `reference_llcm` in tests/test_llcm.py.
The protocols that draw the galleries and call these functions are evaluate.py's.
"""
import logging

import numpy as np
import scipy.sparse as sp
import torch

logger = logging.getLogger(__name__)

METRICS = ("R1", "R5", "R10", "R20", "mAP", "mINP")   # the reported scores, in percent
QUERY_BLOCK = 1024   # queries ranked at once: memory stays at a few [QUERY_BLOCK, G] arrays
RERANK_BLOCK_BYTES = 32 * 2**20   # rows of the joint distance held at once by the re-ranking
RERANK_CHUNK = 2**22              # entries per chunk in the re-ranking's sparse steps

# ----------------------------------------------------------------------------- metrics (numpy)
def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, return_valid=False):
    """SYSU-MM01 metrics (docs/mult.md §9). distmat [Q, G] -> (cmc [max_rank] in [0, 1], mAP, mINP).

    Gallery images of camera 2 are dropped for queries of camera 3. CMC: on the ranked list after
    exclusion keep the first image of each identity; rank-k = the true identity is among the
    first k distinct ones (if fewer than max_rank distinct ids remain the CMC stays at its last
    value). mAP / mINP use the full list after exclusion. Averages are over valid queries (those
    with a match); `return_valid=True` appends their number, otherwise skips are logged.
    Official code notes: it averages the CMC in float32 and shortens it when G < max_rank; here
    float64, always max_rank long. The ranking is the same np.argsort, so ties resolve alike.
    """
    checked = _check_metric_inputs(distmat, max_rank, q_pids, g_pids, q_camids, g_camids)
    return _rank_metrics("sysu", *checked, return_valid, "eval_sysu")


def eval_regdb(distmat, q_pids, g_pids, max_rank=20, return_valid=False):
    """RegDB metrics (docs/mult.md §9): standard CMC on the full ranked list, AP and INP, no exclusion.

    distmat [Q, G] -> (cmc [max_rank], mAP, mINP) [+ number of valid queries]; as `eval_sysu`.
    """
    checked = _check_metric_inputs(distmat, max_rank, q_pids, g_pids)
    return _rank_metrics("regdb", *checked, return_valid, "eval_regdb")


def eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, return_valid=False):
    """LLCM metrics (docs/llcm.md §4, as the dataset's official evaluation code computes them).

    distmat [Q, G] -> (cmc [max_rank] in [0, 1], mAP, mINP) [+ number of valid queries].
    For each query, every gallery image of its identity AND its camera number is dropped (visible
    camN and infrared camN are one camera). Then as `eval_sysu`: the CMC over distinct identities of
    the kept list, mAP and mINP on the kept list, averages over valid queries (a kept match).
    Official code notes: it adds the all-zero CMC of each invalid query to the sum and divides by the
    number of valid queries, which is the mean over the valid ones, computed here directly. The
    ranking is the same np.argsort, so ties resolve alike.
    """
    checked = _check_metric_inputs(distmat, max_rank, q_pids, g_pids, q_camids, g_camids)
    return _rank_metrics("llcm", *checked, return_valid, "eval_llcm")


def excluded(protocol, q_pids, g_pids, q_camids=None, g_camids=None):
    """bool [Q, G]: the gallery images each query never sees. SYSU-MM01 ("sysu", docs/mult.md §9): camera-2
    images for a camera-3 query (one room); LLCM ("llcm", docs/llcm.md (4.1)): the query's own identity in
    its own camera number; RegDB ("regdb"): none."""
    if protocol == "sysu":
        return (q_camids[:, None] == 3) & (g_camids[None, :] == 2)
    if protocol == "llcm":
        return (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] == g_camids[None, :])
    return np.zeros((len(q_pids), len(g_pids)), dtype=bool)


def _rank_metrics(protocol, distmat, max_rank, q_pids, g_pids, q_camids, g_camids, return_valid, caller):
    """CMC, mAP, mINP over blocks of QUERY_BLOCK queries (the CMC over distinct identities but for RegDB)."""
    num_q = len(distmat)
    parts = []
    for b in (slice(s, s + QUERY_BLOCK) for s in range(0, num_q, QUERY_BLOCK)):
        q_cams = None if q_camids is None else q_camids[b]
        keep = ~excluded(protocol, q_pids[b], g_pids, q_cams, g_camids)     # [B, G] gallery order
        parts.append(_query_scores(distmat[b], q_pids[b], g_pids, keep, distinct=protocol != "regdb"))
    valid, ap, inp, match_rank = (np.concatenate(x) for x in zip(*parts))
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f"{caller}: none of the {num_q} queries has a correct match in the "
                         "gallery (check the query/gallery identities)")
    if num_valid < num_q and not return_valid:
        logger.warning("%s: %d of %d queries have no correct match in the gallery and are left "
                       "out of every average", caller, num_q - num_valid, num_q)
    cmc = (match_rank[:, None] <= np.arange(1, max_rank + 1)[None, :]).mean(0)
    out = (cmc.astype(np.float64), float(ap.mean()), float(inp.mean()))
    return out + (num_valid,) if return_valid else out


def _query_scores(distmat, q_pids, g_pids, keep, distinct):
    """Per query of a block: valid [B] (has a kept match) and, for the valid ones, AP, INP and
    the CMC rank of the match (first hit, or distinct-identity rank). keep [B, G] gallery order."""
    order = np.argsort(distmat, axis=1)                             # [B, G]; official (unstable)
    kept = np.take_along_axis(keep, order, axis=1)                  # [B, G] in rank order
    hit = (g_pids[order] == q_pids[:, None]) & kept                 # [B, G] correct match at rank
    n_hits = hit.sum(1)
    valid = n_hits > 0
    hit, kept, n_hits, rows = hit[valid], kept[valid], n_hits[valid], np.arange(int(valid.sum()))
    pos = np.maximum(np.cumsum(kept, axis=1), 1)                    # 1-based rank after exclusion
    ap = np.where(hit, np.cumsum(hit, axis=1) / pos, 0.0).sum(1) / n_hits   # (1/n) sum_t t/p_t
    inp = n_hits / pos[rows, hit.shape[1] - 1 - np.argmax(hit[:, ::-1], axis=1)]   # n / p_n
    if distinct:
        match_rank = _distinct_rank(order[valid], keep[valid], g_pids, q_pids[valid])
    else:
        match_rank = pos[rows, np.argmax(hit, axis=1)]              # p_1
    return valid, ap, inp, match_rank


def _distinct_rank(order, keep, g_pids, q_pids):
    """1-based rank of each query's identity in its ranked list of *distinct* gallery identities.

    order: [B, G] gallery index at each rank; keep: [B, G] gallery images not excluded (gallery
    order). Every query must have a kept match. No per-row sort: the first kept rank of each
    identity u, first[q, u], is a min-reduction over u's gallery columns; the true identity's
    distinct rank is the number of identities whose first kept image comes no later than its own.
    """
    num_q, num_g = order.shape
    ids, code = np.unique(g_pids, return_inverse=True)              # U identities; code [G]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(num_g)[None, :], axis=1)   # rank[q, j] of gallery j
    rank = np.where(keep, rank, num_g)                              # excluded: never first
    cols = np.argsort(code, kind="stable")                          # gallery columns by identity
    starts = np.flatnonzero(np.r_[True, np.diff(code[cols]) != 0])
    first = np.minimum.reduceat(rank[:, cols], starts, axis=1)      # [B, U]
    own = first[np.arange(num_q), np.searchsorted(ids, q_pids)]     # [B]
    return (first <= own[:, None]).sum(1)


def _check_metric_inputs(distmat, max_rank, q_pids, g_pids, *camids):
    """-> (distmat float64 [Q, G], max_rank, q_pids, g_pids, q_camids, g_camids), ids as arrays;
    camids: (q_camids, g_camids), or none (RegDB: then both None)."""
    distmat = np.asarray(distmat, dtype=np.float64)
    if distmat.ndim != 2:
        raise ValueError(f"distmat: expected a 2-D [num_query, num_gallery] array, got {distmat.shape}")
    num_q, num_g = distmat.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"distmat: empty {'query' if num_q == 0 else 'gallery'} set "
                         f"(shape {distmat.shape}); expected at least one of each")
    if not np.isfinite(distmat).all():
        raise ValueError(f"distmat: {int((~np.isfinite(distmat)).sum())} NaN/inf entries; "
                         "expected finite distances")
    ids = [np.asarray(v) for v in (q_pids, g_pids, *camids)]
    for name, values, n in zip(("q_pids", "g_pids", "q_camids", "g_camids"), ids, (num_q, num_g) * 2):
        if values.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},) to match distmat {distmat.shape}, "
                             f"got {values.shape}")
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise ValueError(f"max_rank: expected an integer >= 1, got {max_rank!r}")
    return (distmat, int(max_rank), *ids, *[None] * (4 - len(ids)))


# ----------------------------------------------------------------------------- the test distance
def pairwise_distance(q, g):
    """Squared Euclidean distance of unit rows (docs/mult.md (9.2)), 2 - 2 q.g, in float64:
    q [Q, D], g [G, D] -> [Q, G]."""
    q, g = _check_unit_rows(q, "q"), _check_unit_rows(g, "g")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"pairwise_distance: feature sizes differ: q {q.shape}, g {g.shape}")
    return 2.0 - 2.0 * (q @ g.T)



def _check_unit_rows(x, name):
    """x (tensor or array) -> float64 array [N, D] of finite, L2-normalised rows."""
    x = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"pairwise_distance: {name} must be a non-empty 2-D array, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"pairwise_distance: {name} has NaN/inf entries")
    norms = np.linalg.norm(x, axis=1)
    if np.abs(norms - 1).max() > 1e-3:
        raise ValueError(f"pairwise_distance: {name} rows must be L2-normalised (norms from "
                         f"{norms.min():.4g} to {norms.max():.4g})")
    return x


# ----------------------------------------------------------------------------- re-ranking (numpy / scipy)
RERANK_DEFAULTS = {"k1": 20, "k2": 6, "lambda_value": 0.3}   # re_ranking's: those of Zhong et al. on Market-1501


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
    Encoding", CVPR 2017, §3), as its widely used Python version computes it -> final distance [Q, G].

    q_g_dist [Q, G], q_q_dist [Q, Q], g_g_dist [G, G]: distances (here the squared Euclidean ones of
    `pairwise_distance`). With N = Q + G, d = [[q_q, q_g], [q_gᵀ, g_g]] squared entrywise (in float32,
    as that version squares whatever it is given; squared Euclidean input, as usual, makes d the 4th
    power of the Euclidean distance) and each row divided by its maximum:
      1. L(i): the k1 + 1 nearest of i by d, i itself counted; R(i) = {j in L(i) : i in L(j)};
      2. R*(i) = R(i) plus R_h(c) for each c in R(i) with |R_h(c) ∩ R(i)| > 2/3 |R_h(c)|, where R_h
         is R over half lists of round(k1/2) + 1 entries;
      3. V_ij = exp(-d_ij) / sum_{j' in R*(i)} exp(-d_ij') for j in R*(i), else 0;
      4. local query expansion: V_i <- the mean of V_j over the k2 nearest j of i (i counted; none
         for k2 = 1);
      5. Jaccard distance d_J(i, j) = 1 - s / (2 - s), s = sum_k min(V_ik, V_jk);
      6. final = (1 - lambda) d_J + lambda d, on the query rows and the gallery columns.
    No N x N array is formed: the lists come from row blocks of d, V and its expansion are sparse,
    and the sums of minima run over (query, gallery) pairs that share a column of V.
    Paper vs widely used code: ties in the neighbour lists go to the smaller index (a stable sort),
    where the widely used quicksort leaves their order unspecified. That code divides the columns by
    their maxima and transposes, which is this row normalisation for symmetric q_q and g_g.
    Returns float64 [Q, G]; smaller is closer.
    """
    qg, qq, gg, k1, k2, lam = _check_rerank_inputs(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)
    num_q, num_g = qg.shape
    n = num_q + num_g
    ranks, row_max = _rerank_lists(qq, qg, gg, max(k1 + 1, k2))   # [N, m] nearest first, [N]
    rows, cols = _rerank_expansion(ranks[:, :k1 + 1], k1)          # (i, j) for j in R*(i), sorted
    w = np.exp(-_rerank_entries(qq, qg, gg, row_max, rows, cols).astype(np.float64))
    v = sp.csr_matrix((w / np.bincount(rows, w, n)[rows], (rows, cols)), shape=(n, n))   # [N, N]
    if k2 > 1:
        expand = sp.csr_matrix((np.full(n * k2, 1.0 / k2), ranks[:, :k2].ravel(),
                                np.arange(0, n * k2 + 1, k2)), shape=(n, n))
        v = expand @ v                                              # row i: mean of its k2 rows
    s = _rerank_min_sums(v[:num_q].tocsc(), v[num_q:].tocsc())     # [Q, G]
    jaccard = 1.0 - s / (2.0 - s)
    original = _squared32(qg) / row_max[:num_q, None]               # float32, as d above
    return (1.0 - lam) * jaccard + lam * original.astype(np.float64)


def _squared32(d):
    """Entrywise square (float64) stored as float32: the widely used version's input step."""
    return np.square(d).astype(np.float32)


def _rerank_rows(qq, qg, gg, r0, r1):
    """Rows r0..r1-1 of d = [[q_q, q_g], [q_gᵀ, g_g]], squared, float32 [r1 - r0, N]."""
    num_q = qq.shape[0]
    parts = []
    if r0 < num_q:
        parts.append(np.hstack([qq[r0:min(r1, num_q)], qg[r0:min(r1, num_q)]]))
    if r1 > num_q:
        a, b = max(r0, num_q) - num_q, r1 - num_q
        parts.append(np.hstack([qg[:, a:b].T, gg[a:b]]))
    return _squared32(np.vstack(parts))


def _rerank_lists(qq, qg, gg, m):
    """The m nearest of every row of the row-normalised d, by (value, index), and the row maxima."""
    n = qq.shape[0] + gg.shape[0]
    step = max(1, RERANK_BLOCK_BYTES // (4 * n))
    ranks, row_max = np.empty((n, m), dtype=np.int64), np.empty(n, dtype=np.float32)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        block = _rerank_rows(qq, qg, gg, r0, r1)                    # [B, N]
        row_max[r0:r1] = block.max(1)
        if (row_max[r0:r1] == 0).any():
            raise ValueError(f"re_ranking: row {r0 + int(np.argmin(row_max[r0:r1]))} of the joint "
                             "distance is all zero; expected distinct samples")
        block /= row_max[r0:r1, None]
        kth = np.partition(block, m - 1, axis=1)[:, m - 1:m]        # [B, 1] the m-th smallest
        r, c = np.nonzero(block <= kth)                             # row-major, columns ascending
        order = np.lexsort((c, block[r, c], r))                     # by row, value, then index
        c = c[order]
        first = np.searchsorted(r[order], np.arange(r1 - r0))       # start of each row's candidates
        ranks[r0:r1] = c[first[:, None] + np.arange(m)]
    return ranks, row_max


def _reciprocal(lists):
    """bool [N, m]: j = lists[i, t] has i among its own first m, lists[j]."""
    n, m = lists.shape
    out = np.empty((n, m), dtype=bool)
    step = max(1, RERANK_CHUNK // (m * m))
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        back = lists[lists[r0:r1]]                                  # [B, m, m]
        out[r0:r1] = (back == np.arange(r0, r1)[:, None, None]).any(2)
    return out


def _rerank_expansion(main, k1):
    """Pairs (i, j), j in R*(i), as sorted (rows, cols) int64: R(i) and the R_h(c) that pass 2/3."""
    n, k = main.shape
    half = np.ascontiguousarray(main[:, :int(np.around(k1 / 2.0)) + 1])   # [N, h]
    in_main, in_half = _reciprocal(main), _reciprocal(half)
    members = np.where(in_main, main, -1)                           # R(i), -1 where not reciprocal
    half_size = in_half.sum(1)
    step = max(1, RERANK_CHUNK // (k * k * half.shape[1]))
    keys = []
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        c = main[r0:r1]                                             # [B, k] candidates
        cand, valid = half[c], in_half[c]                           # [B, k, h]: R_h(c), padded
        inside = (cand[..., None] == members[r0:r1, None, None, :]).any(3)      # in R(i)
        ok = in_main[r0:r1] & ((inside & valid).sum(2) > 2.0 / 3.0 * half_size[c])   # [B, k]
        row = np.arange(r0, r1)[:, None]
        keys.append((row * n + main[r0:r1])[in_main[r0:r1]])
        take = ok[:, :, None] & valid
        keys.append(np.broadcast_to(row[:, :, None], cand.shape)[take] * n + cand[take])
    keys = np.unique(np.concatenate(keys))
    return keys // n, keys % n


def _rerank_entries(qq, qg, gg, row_max, rows, cols):
    """d[rows, cols] of the row-normalised, squared joint distance, float32, without forming it."""
    num_q = qq.shape[0]
    out = np.empty(rows.shape, dtype=np.float32)
    for rq, cq in ((True, True), (True, False), (False, True), (False, False)):
        sel = np.flatnonzero(((rows < num_q) == rq) & ((cols < num_q) == cq))
        r, c = rows[sel], cols[sel]
        if rq and cq:
            raw = qq[r, c]
        elif rq:
            raw = qg[r, c - num_q]
        elif cq:
            raw = qg[c, r - num_q]
        else:
            raw = gg[r - num_q, c - num_q]
        out[sel] = _squared32(raw) / row_max[r]
    return out


def _rerank_min_sums(vq, vg):
    """s[i, j] = sum_k min(vq[i, k], vg[j, k]) -> dense [Q, G], over the columns of csc vq [Q, N] and
    vg [G, N]: each column contributes its (query, gallery) pairs of nonzeros, in chunks of columns."""
    num_q, num_g = vq.shape[0], vg.shape[0]
    count_q, count_g = np.diff(vq.indptr), np.diff(vg.indptr)
    pairs = count_q * count_g                                       # [N] pairs per column
    bounds = np.searchsorted(np.cumsum(pairs), np.arange(RERANK_CHUNK, pairs.sum(), RERANK_CHUNK))
    out = np.zeros(num_q * num_g)
    for c0, c1 in zip(np.r_[0, bounds], np.r_[bounds, len(pairs)]):
        if c1 <= c0:
            continue
        p = pairs[c0:c1]
        col = np.repeat(np.arange(c0, c1), p)
        local = np.arange(int(p.sum())) - np.repeat(np.cumsum(p) - p, p)   # pair index within its column
        iq = vq.indptr[col] + local // count_g[col]
        ig = vg.indptr[col] + local % count_g[col]
        np.add.at(out, vq.indices[iq] * num_g + vg.indices[ig], np.minimum(vq.data[iq], vg.data[ig]))
    return out.reshape(num_q, num_g)


def _check_rerank_inputs(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value):
    arrays = []
    for name, d in (("q_g_dist", q_g_dist), ("q_q_dist", q_q_dist), ("g_g_dist", g_g_dist)):
        d = d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)
        if d.ndim != 2 or d.size == 0 or not np.issubdtype(d.dtype, np.number):
            raise ValueError(f"re_ranking: {name} must be a non-empty 2-D array of distances, got {d.shape}")
        if not np.isfinite(d).all():
            raise ValueError(f"re_ranking: {name} has NaN/inf entries")
        arrays.append(d.astype(np.float64, copy=False))
    qg, qq, gg = arrays
    num_q, num_g = qg.shape
    if qq.shape != (num_q, num_q) or gg.shape != (num_g, num_g):
        raise ValueError(f"re_ranking: q_q_dist {qq.shape} and g_g_dist {gg.shape} must be "
                         f"({num_q}, {num_q}) and ({num_g}, {num_g}) to match q_g_dist {qg.shape}")
    n = num_q + num_g
    for name, k, low, high in (("k1", k1, 1, n - 1), ("k2", k2, 1, n)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not low <= k <= high:
            raise ValueError(f"re_ranking: {name} must be an int in {low}..{high} for {n} samples, got {k!r}")
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, (int, float, np.integer, np.floating)) \
            or not 0 <= lambda_value <= 1:
        raise ValueError(f"re_ranking: lambda_value must be a number in [0, 1], got {lambda_value!r}")
    return qg, qq, gg, int(k1), int(k2), float(lambda_value)
