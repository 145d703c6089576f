"""Evaluation: the SYSU-MM01, RegDB and LLCM test protocols, their metrics, re-ranking, feature
extraction, reports (tables, rank lists, summaries across runs) and a CLI.

Implements the test protocol of MULT (He et al., IJCV 2024; docs/mult.md §9), which MBMIL (Wang
et al., AAAI 2026) shares: each image's eval feature and its horizontal flip's are averaged and
L2-normalised again; distance is squared Euclidean in float64; ranking is NumPy's default argsort.
- SYSU-MM01: query = every IR test image (cams 3 and 6); gallery = one visible image per
  (identity, camera) drawn with seed `trial` (all-search cams 1, 2, 4, 5; indoor-search cams 1, 2),
  10 draws; a cam-3 query never sees cam-2 gallery images; the CMC counts distinct identities.
- RegDB: visible->thermal and thermal->visible on the test half of split t; one model per split.
- LLCM (Zhang & Wang, CVPR 2023, its official evaluation): IR->VIS (the official default; query =
  every infrared test image, gallery = one visible image per (identity, camera) drawn with seed
  `trial`, 10 draws) and VIS->IR (the reverse); a query never sees gallery images of its own
  identity in its own camera number; the CMC counts distinct identities (data/llcm.py).
Metrics: rank-k CMC; with hits at 1-based ranks p_1 < ... < p_n, AP = (1/n) sum_t t/p_t and
INP = n/p_n. Queries without a correct match are left out of every average, as officially.
Optional, off by default: k-reciprocal re-ranking (Zhong et al., CVPR 2017), `re_ranking`; the
papers of this field report without it.

    python evaluate.py --dataset sysu --checkpoint runs/mult_sysu/last.pth --trials 0-9
    python evaluate.py --dataset regdb --trial 3 --checkpoint runs/mult_regdb_trial3/last.pth
    python evaluate.py --dataset llcm --checkpoint runs/mult_llcm/last.pth --rerank
    python evaluate.py --dataset synthetic --model pixels --save-features feats.npz --out out/
    python evaluate.py --from-features feats.npz
    python evaluate.py --summarize runs/mult_regdb_trial*
"""
import argparse
import html
import json
import logging
import os
import sys
import time
import zipfile

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from tqdm import tqdm

logger = logging.getLogger("evaluate")
METRICS = ("R1", "R5", "R10", "R20", "mAP", "mINP")
LABELS = {"all": "SYSU all-search", "indoor": "SYSU indoor-search",
          "v2t": "RegDB visible->thermal", "t2v": "RegDB thermal->visible",
          "i2v": "LLCM IR->VIS", "v2i": "LLCM VIS->IR", "v2i_transposed": "LLCM VIS->IR transposed"}
QUERY_BLOCK = 1024   # queries ranked at once: memory stays at a few [QUERY_BLOCK, G] arrays
RERANK_BLOCK_BYTES = 32 * 2**20   # rows of the joint distance held at once by the re-ranking
RERANK_CHUNK = 2**22              # entries per chunk in the re-ranking's sparse steps
DATASET_ROOTS = {"sysu": "datasets/SYSU-MM01", "regdb": "datasets/RegDB", "llcm": "datasets/LLCM",
                 "synthetic": "datasets/synthetic"}


# ----------------------------------------------------------------------------- metrics (numpy)
def _check_metric_inputs(distmat, max_rank, **ids):
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
    out = {}
    for name, values in ids.items():
        values = np.asarray(values)
        n = num_q if name.startswith("q_") else num_g
        if values.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},) to match distmat {distmat.shape}, "
                             f"got {values.shape}")
        out[name] = values
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise ValueError(f"max_rank: expected an integer >= 1, got {max_rank!r}")
    return distmat, int(max_rank), out


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


def _rank_metrics(distmat, q_pids, g_pids, keep_of, distinct, max_rank, return_valid, caller):
    """CMC, mAP, mINP over blocks of QUERY_BLOCK queries; keep_of(rows) -> [B, G] kept mask."""
    num_q = len(distmat)
    blocks = [slice(s, s + QUERY_BLOCK) for s in range(0, num_q, QUERY_BLOCK)]
    parts = [_query_scores(distmat[b], q_pids[b], g_pids, keep_of(b), distinct) for b in blocks]
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


def _exclusion(protocol, q_pids, g_pids, q_camids, g_camids):
    """rows -> bool [B, G] in gallery order: the gallery images the queries `rows` never see.
    SYSU-MM01: camera-2 images for a camera-3 query (one room); LLCM: the query's own identity in its
    own camera number; RegDB: none."""
    if protocol == "sysu":
        return lambda b: (q_camids[b, None] == 3) & (g_camids[None, :] == 2)
    if protocol == "llcm":
        return lambda b: (q_pids[b, None] == g_pids[None, :]) & (q_camids[b, None] == g_camids[None, :])
    return lambda b: np.zeros((len(q_pids[b]), len(g_pids)), dtype=bool)


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
    distmat, max_rank, a = _check_metric_inputs(distmat, max_rank, q_pids=q_pids, g_pids=g_pids,
                                                q_camids=q_camids, g_camids=g_camids)
    drop = _exclusion("sysu", a["q_pids"], a["g_pids"], a["q_camids"], a["g_camids"])
    return _rank_metrics(distmat, a["q_pids"], a["g_pids"], lambda b: ~drop(b), True, max_rank,
                         return_valid, "eval_sysu")


def eval_regdb(distmat, q_pids, g_pids, max_rank=20, return_valid=False):
    """RegDB metrics (docs/mult.md §9): standard CMC on the full ranked list, AP and INP, no exclusion.

    distmat [Q, G] -> (cmc [max_rank], mAP, mINP) [+ number of valid queries]; as `eval_sysu`.
    """
    distmat, max_rank, a = _check_metric_inputs(distmat, max_rank, q_pids=q_pids, g_pids=g_pids)
    keep_of = lambda b: np.ones((len(a["q_pids"][b]), distmat.shape[1]), dtype=bool)  # noqa: E731
    return _rank_metrics(distmat, a["q_pids"], a["g_pids"], keep_of, False, max_rank, return_valid,
                         "eval_regdb")


def eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, return_valid=False):
    """LLCM metrics (Zhang & Wang, CVPR 2023, as its official evaluation code computes them).

    distmat [Q, G] -> (cmc [max_rank] in [0, 1], mAP, mINP) [+ number of valid queries].
    For each query, every gallery image of its identity AND its camera number is dropped (visible
    camN and infrared camN are one camera). Then as `eval_sysu`: the CMC over distinct identities of
    the kept list, mAP and mINP on the kept list, averages over valid queries (a kept match).
    Official code notes: it adds the all-zero CMC of each invalid query to the sum and divides by the
    number of valid queries, which is the mean over the valid ones, computed here directly. The
    ranking is the same np.argsort, so ties resolve alike.
    """
    distmat, max_rank, a = _check_metric_inputs(distmat, max_rank, q_pids=q_pids, g_pids=g_pids,
                                                q_camids=q_camids, g_camids=g_camids)
    drop = _exclusion("llcm", a["q_pids"], a["g_pids"], a["q_camids"], a["g_camids"])
    return _rank_metrics(distmat, a["q_pids"], a["g_pids"], lambda b: ~drop(b), True, max_rank,
                         return_valid, "eval_llcm")


# ----------------------------------------------------------------------------- re-ranking (numpy / scipy)
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


# ----------------------------------------------------------------------------- features
def _model_output(model_fn, x, modality):
    f = model_fn(x, modality)
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"model_fn: expected a [B, D] tensor for B = {x.shape[0]} images, got {shape}")
    if not torch.isfinite(f).all():
        raise ValueError(f"model_fn returned NaN/inf features (modality {modality}); check the "
                         "checkpoint and the input normalisation")
    return f.float()


def extract_features(model_fn, images, height, width, batch_size=64, device="cpu", flip=True,
                     num_workers=0, desc=None, interpolation="bilinear", progress=True):
    """Test features of an ImageList (docs/mult.md §9) -> float32 [N, D] on the CPU, rows in list order.
    interpolation: of the resize to height x width ("bilinear" as MULT's code; MBMIL's resizes bicubic).

    model_fn(x [B, 3, H, W] on `device`, modality) -> [B, D] eval features; with `flip` the
    feature of the image and of its horizontal flip are averaged, then L2-normalised again.
    The caller puts its model in eval mode; this runs under torch.no_grad().
    """
    from data.loader import ImageDataset
    from data.transforms import test_transform
    if len(images) == 0:
        raise ValueError("extract_features: `images` is empty; expected at least one image")
    if batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    pin = torch.device(device).type == "cuda"
    loader = torch.utils.data.DataLoader(ImageDataset(images, test_transform(height, width, interpolation)),
                                         batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=pin)
    out = None
    with torch.no_grad():
        for x, index in tqdm(loader, desc=desc or "features", unit="batch", file=sys.stderr, disable=not progress):
            x = x.to(device, non_blocking=True)                     # [B, 3, H, W]
            f = _model_output(model_fn, x, images.modality)         # [B, D]
            if flip:
                f = (f + _model_output(model_fn, torch.flip(x, dims=[3]), images.modality)) / 2
            f = F.normalize(f, dim=1).cpu()
            if out is None:
                out = torch.empty(len(images), f.shape[1])
            out[index] = f
    return out


def pairwise_distance(q, g):
    """Squared Euclidean distance of unit rows, 2 - 2 q.g, in float64: q [Q, D], g [G, D] -> [Q, G]."""
    def unit_rows(x, name):
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
    q, g = unit_rows(q, "q"), unit_rows(g, "g")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"pairwise_distance: feature sizes differ: q {q.shape}, g {g.shape}")
    return 2.0 - 2.0 * (q @ g.T)


def pixel_model(x, modality):
    """The trivial baseline: the normalised image average-pooled to 16 x 8, flattened,
    L2-normalised. x [B, 3, H, W] -> [B, 384]; `modality` is unused."""
    return F.normalize(F.adaptive_avg_pool2d(x, (16, 8)).flatten(1), dim=1)


# ----------------------------------------------------------------------------- runner
def _pool_add(pool, images, extract, desc):
    """Pool rows [N] of `images`; only images whose path the pool has not seen are extracted."""
    new = list({p: i for i, p in enumerate(images.paths) if p not in pool["row"]}.values())
    if new:
        sub, start = images.subset(new), time.perf_counter()
        pool["row"].update({p: len(pool["row"]) + k for k, p in enumerate(sub.paths)})
        pool["parts"].append((sub, extract(sub, desc)))
        logger.info("features %s: %d images, %.1f s", desc, len(sub), time.perf_counter() - start)
    return np.array([pool["row"][p] for p in images.paths], dtype=np.int64)


def _finish_pool(pool):
    """The pool as arrays: feats float32 [M, D]; paths [M]; pids, camids, modality int64 [M]."""
    subs, feats = zip(*pool["parts"])
    return {"feats": torch.cat(feats).numpy(), "paths": [p for s in subs for p in s.paths],
            "pids": np.concatenate([s.pids for s in subs]),
            "camids": np.concatenate([s.camids for s in subs]),
            "modality": np.concatenate([np.full(len(s), s.modality, dtype=np.int64) for s in subs])}


def _extractor(model_fn, height, width, batch_size, device, num_workers, interpolation):
    return lambda images, desc: extract_features(model_fn, images, height, width, batch_size,
                                                 device, True, num_workers, desc, interpolation)


def evaluate_sysu(model_fn, root, modes=("all", "indoor"), trials=range(10), shot="single",
                  height=288, width=144, device="cpu", batch_size=64, num_workers=0,
                  save_features=None, save_ranklist=0, ranklist_dir=None, rerank=None,
                  ranklist_images=0, interpolation="bilinear"):
    """SYSU-MM01 protocol (docs/mult.md §9) -> {mode: {"protocol", "shot", "rerank", "trials": [{"trial",
    "R1", ..., "mINP", "num_query", "num_gallery", "num_valid"}], "mean": {...}, "std": {...}}},
    metrics in percent. Each image is extracted once: the query once, the gallery candidates of
    each mode once (indoor's are a subset of all's); each trial picks its gallery by path.
    rerank: None, or the keyword arguments of `re_ranking` (e.g. {}) to re-rank every distance.
    save_ranklist K > 0: each setting's first trial as a text rank list in ranklist_dir, and with
    ranklist_images M > 0 as M pictures plus an index page (`write_ranklist_images`)."""
    from data.sysu import sysu_gallery_candidates, sysu_test
    modes, trials = list(modes), [int(t) for t in trials]
    if not modes or not set(modes) <= {"all", "indoor"} or not trials:
        raise ValueError(f"evaluate_sysu: modes must be a non-empty subset of ('all', 'indoor') "
                         f"and trials non-empty, got modes={modes}, trials={trials}")
    extract = _extractor(model_fn, height, width, batch_size, device, num_workers, interpolation)
    pool, plan = {"row": {}, "parts": []}, []
    for mode in modes:
        candidates = sysu_gallery_candidates(root, mode)
        cand_row = dict(zip(candidates.paths, _pool_add(pool, candidates, extract, f"{mode} gallery")))
        for trial in trials:
            query, gallery = sysu_test(root, mode=mode, trial=trial, shot=shot)
            q_rows = _pool_add(pool, query, extract, "query")
            missing = [p for p in gallery.paths if p not in cand_row]
            if missing:
                raise ValueError(f"sysu_test(mode={mode!r}, trial={trial}): gallery image {missing[0]} "
                                 f"(and {len(missing) - 1} more) not in sysu_gallery_candidates")
            plan.append((mode, trial, q_rows, np.array([cand_row[p] for p in gallery.paths])))
    info = {"protocol": "sysu", "shot": shot}
    return _run_plan(_finish_pool(pool), plan, info, save_features, save_ranklist, ranklist_dir,
                     rerank, ranklist_images)


def evaluate_regdb(model_fn, root, trial, directions=("v2t", "t2v"), height=288, width=144,
                   device="cpu", batch_size=64, num_workers=0, save_features=None,
                   save_ranklist=0, ranklist_dir=None, rerank=None, ranklist_images=0, interpolation="bilinear"):
    """RegDB protocol on split `trial` (1..10; docs/mult.md §9) -> results as `evaluate_sysu`. The model
    must have been trained on the same split; combine 10 runs with `mean_over_trials`."""
    from data.regdb import regdb_test
    directions = list(directions)
    if not directions or not set(directions) <= {"v2t", "t2v"}:
        raise ValueError(f"evaluate_regdb: directions must be a non-empty subset of ('v2t', "
                         f"'t2v'), got {directions}")
    extract = _extractor(model_fn, height, width, batch_size, device, num_workers, interpolation)
    pool, plan = {"row": {}, "parts": []}, []
    for direction in directions:
        query, gallery = regdb_test(root, trial, direction=direction)
        q_rows = _pool_add(pool, query, extract, f"{direction} query")
        plan.append((direction, int(trial), q_rows, _pool_add(pool, gallery, extract, f"{direction} gallery")))
    info = {"protocol": "regdb"}
    return _run_plan(_finish_pool(pool), plan, info, save_features, save_ranklist, ranklist_dir,
                     rerank, ranklist_images)


def evaluate_llcm(model_fn, root, directions=("i2v", "v2i"), trials=range(10), height=288, width=144,
                  device="cpu", batch_size=64, num_workers=0, save_features=None, save_ranklist=0,
                  ranklist_dir=None, rerank=None, ranklist_images=0, interpolation="bilinear"):
    """LLCM protocol (Zhang & Wang, CVPR 2023; data/llcm.py) -> results as `evaluate_sysu`, one
    setting per direction: "i2v" (infrared queries, the official default), "v2i" (visible queries),
    and on request "v2i_transposed" (the official code's visible-to-infrared mode, where the sampled
    infrared images rank every visible image). Each test image is extracted once; each trial picks
    the sampled side (one image per identity and camera, seed `trial`) by path."""
    from data.llcm import DIRECTIONS, llcm_gallery_candidates, llcm_test
    directions, trials = list(directions), [int(t) for t in trials]
    if not directions or not set(directions) <= set(DIRECTIONS) or not trials:
        raise ValueError(f"evaluate_llcm: directions must be a non-empty subset of {DIRECTIONS} and "
                         f"trials non-empty, got directions={directions}, trials={trials}")
    extract = _extractor(model_fn, height, width, batch_size, device, num_workers, interpolation)
    pool, plan = {"row": {}, "parts": []}, []
    for direction in directions:
        _pool_add(pool, llcm_gallery_candidates(root, direction), extract, f"{direction} sampled side")
        for trial in trials:
            query, gallery = llcm_test(root, direction, trial)
            plan.append((direction, trial, _pool_add(pool, query, extract, f"{direction} query"),
                         _pool_add(pool, gallery, extract, f"{direction} gallery")))
    return _run_plan(_finish_pool(pool), plan, {"protocol": "llcm"}, save_features, save_ranklist,
                     ranklist_dir, rerank, ranklist_images)


def _summarise(settings):
    for entry in settings.values():
        table = np.array([[row[m] for m in METRICS] for row in entry["trials"]])
        entry["mean"] = dict(zip(METRICS, table.mean(0).tolist()))
        entry["std"] = dict(zip(METRICS, table.std(0).tolist()))


def _protocol_metrics(protocol, distmat, q_pids, g_pids, q_cams, g_cams):
    if protocol == "regdb":
        return eval_regdb(distmat, q_pids, g_pids, return_valid=True)
    metric = eval_llcm if protocol == "llcm" else eval_sysu
    return metric(distmat, q_pids, g_pids, q_cams, g_cams, return_valid=True)


def _run_plan(pool, plan, info, save_features=None, save_ranklist=0, ranklist_dir=None, rerank=None,
              ranklist_images=0):
    """Metrics of each (setting, trial, query rows, gallery rows) of `plan` over the feature pool."""
    if save_ranklist and ranklist_dir is None:
        raise ValueError("save_ranklist > 0 needs ranklist_dir (the folder for the rank lists)")
    if ranklist_images and not save_ranklist:
        raise ValueError("ranklist_images > 0 needs save_ranklist K > 0 (the gallery images per row)")
    if save_features:
        _save_pool(save_features, pool, plan, info)
    if rerank is not None:
        rerank = {"k1": 20, "k2": 6, "lambda_value": 0.3, **rerank}
    settings, protocol, pages, qq = {}, info["protocol"], [], (None, None)
    feats = pool["feats"]
    for setting, trial, q, g in plan:
        distmat = pairwise_distance(feats[q], feats[g])             # [Q, G]
        if rerank is not None:
            if qq[0] is None or not np.array_equal(qq[0], q):       # the query is shared by trials
                qq = (q, pairwise_distance(feats[q], feats[q]))
            distmat = re_ranking(distmat, qq[1], pairwise_distance(feats[g], feats[g]), **rerank)
        q_pids, g_pids, q_cams, g_cams = pool["pids"][q], pool["pids"][g], pool["camids"][q], pool["camids"][g]
        cmc, m_ap, m_inp, n_valid = _protocol_metrics(protocol, distmat, q_pids, g_pids, q_cams, g_cams)
        entry = settings.setdefault(setting, {**info, "rerank": rerank, "trials": []})
        if save_ranklist and not entry["trials"]:
            name = os.path.join(ranklist_dir, f"ranklist_{setting}_trial{trial}")
            q_paths, g_paths = [pool["paths"][i] for i in q], [pool["paths"][i] for i in g]
            write_ranklist(name + ".txt", distmat, q_paths, g_paths, q_pids, g_pids, save_ranklist,
                           q_cams, g_cams, protocol)
            if ranklist_images:
                title = f"{_label(setting, entry)}, trial {trial}"
                pages.append((title, write_ranklist_images(
                    name, distmat, q_paths, g_paths, q_pids, g_pids, save_ranklist, ranklist_images,
                    q_cams, g_cams, protocol, title=title)))
        scores = 100 * np.r_[cmc[[0, 4, 9, 19]], m_ap, m_inp]
        entry["trials"].append({"trial": trial, **dict(zip(METRICS, scores.tolist())),
                                "num_query": len(q), "num_gallery": len(g), "num_valid": n_valid})
    if pages:
        _write_index(os.path.join(ranklist_dir, "index.html"), "rank lists",
                     [(f'<a href="{html.escape(os.path.relpath(p, ranklist_dir))}">{html.escape(t)}</a>',)
                      for t, p in pages])
    _summarise(settings)
    return settings


def mean_over_trials(results_list):
    """Merge results of separate runs (RegDB: one model per split) into one, with trial means."""
    if not results_list:
        raise ValueError("mean_over_trials: expected a non-empty list of results")
    settings = {}
    for results in results_list:
        for name, entry in results.items():
            merged = settings.setdefault(name, {**entry, "trials": []})["trials"]
            if {r["trial"] for r in merged} & {r["trial"] for r in entry["trials"]}:
                raise ValueError(f"mean_over_trials: setting {name!r} has the same trial twice")
            merged += entry["trials"]
    _summarise(settings)
    return settings


def _save_pool(path, pool, plan, info):
    """One .npz: every extracted row (feats, paths, pids, camids, modality; for SYSU the query and
    the gallery candidates) and each (setting, trial)'s query / gallery rows q{i} / g{i}."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"feats": pool["feats"], "paths": np.array(pool["paths"], dtype=str),
              "pids": pool["pids"], "camids": pool["camids"], "modality": pool["modality"],
              "info": np.array(json.dumps(info)), "plan": np.array(json.dumps([p[:2] for p in plan]))}
    for i, (_, _, q, g) in enumerate(plan):
        arrays[f"q{i}"], arrays[f"g{i}"] = q, g
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def evaluate_from_features(path, settings=None, trials=None, save_ranklist=0, ranklist_dir=None,
                           rerank=None, ranklist_images=0):
    """Re-run the metrics from a `save_features` file, without a model; `settings` / `trials`
    select among the saved ones (default: all). Returns the same results as the original run
    (re-ranked with `rerank`, as in the runners)."""
    pool, plan, info = _load_pool(path)
    chosen = [p for p in plan if (settings is None or p[0] in settings)
              and (trials is None or p[1] in set(trials))]
    if not chosen:
        raise ValueError(f"{path}: no saved evaluation matches settings={settings}, trials="
                         f"{None if trials is None else list(trials)}; saved: {[p[:2] for p in plan]}")
    return _run_plan(pool, chosen, info, None, save_ranklist, ranklist_dir, rerank, ranklist_images)


def _load_pool(path):
    """(pool, plan, info) of a --save-features file; ValueError naming the file for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--from-features: file not found: {path}")
    expected = "an .npz written by evaluate.py --save-features"
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"feats", "paths", "pids", "camids", "modality", "info", "plan"} - set(z.files)
            if missing:
                raise ValueError(f"missing arrays {sorted(missing)}")
            pool = {k: z[k] for k in ("feats", "pids", "camids", "modality")}
            pool["paths"] = z["paths"].tolist()
            info = json.loads(str(z["info"]))
            plan = [(s, t, z[f"q{i}"], z[f"g{i}"]) for i, (s, t) in enumerate(json.loads(str(z["plan"])))]
        m = len(pool["feats"])
        if pool["feats"].ndim != 2 or any(len(pool[k]) != m for k in ("pids", "camids", "modality", "paths")):
            raise ValueError("feats, paths, pids, camids and modality do not have one row each")
        for _, _, q, g in plan:
            if not (np.issubdtype(q.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)) \
                    or min(q.min(initial=0), g.min(initial=0)) < 0 or max(q.max(initial=0), g.max(initial=0)) >= m:
                raise ValueError("a query or gallery index lies outside the saved rows")
        if info.get("protocol") not in ("sysu", "regdb", "llcm"):
            raise ValueError(f"unknown protocol {info.get('protocol')!r}")
    except ValueError as err:
        raise ValueError(f"--from-features {path}: not {expected} ({err})") from None
    except (OSError, EOFError, KeyError, IndexError, TypeError, AttributeError, zipfile.BadZipFile) as err:
        raise ValueError(f"--from-features {path}: not {expected} (unreadable: "
                         f"{type(err).__name__})") from None
    return pool, plan, info


# ----------------------------------------------------------------------------- reports
def _ranked(distmat, k, q_pids, g_pids, q_camids, g_camids, protocol):
    """Top-k gallery columns per query after the protocol's exclusion -> (order [Q, <= k], n_kept [Q])."""
    order = np.argsort(distmat, axis=1)                             # [Q, G], as the metrics
    drop = np.zeros(order.shape, dtype=bool)
    if q_camids is not None:
        drop = np.take_along_axis(_exclusion(protocol, np.asarray(q_pids), np.asarray(g_pids),
                                             np.asarray(q_camids), np.asarray(g_camids))(slice(None)),
                                  order, axis=1)
    order = np.take_along_axis(order, np.argsort(drop, axis=1, kind="stable"), axis=1)[:, :k]
    return order, np.minimum((~drop).sum(1), k)


def write_ranklist(path, distmat, q_paths, g_paths, q_pids, g_pids, k, q_camids=None, g_camids=None,
                   protocol="sysu"):
    """One line per query: its path, then its top-k gallery paths, each prefixed + (correct
    identity) or - (wrong), tab-separated. With camids the protocol's exclusion applies (SYSU: cam-3
    queries skip cam-2 images; LLCM: a query skips its own identity in its own camera)."""
    if np.shape(distmat) != (len(q_paths), len(g_paths)):
        raise ValueError(f"write_ranklist: distmat {np.shape(distmat)} does not match "
                         f"{len(q_paths)} query and {len(g_paths)} gallery paths")
    order, n_kept = _ranked(distmat, k, q_pids, g_pids, q_camids, g_camids, protocol)
    correct = np.asarray(g_pids)[order] == np.asarray(q_pids)[:, None]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, q_path in enumerate(q_paths):
            marks = ("+" if c else "-" for c in correct[i, :n_kept[i]])
            f.write("\t".join([q_path] + [m + g_paths[j] for m, j in zip(marks, order[i])]) + "\n")


TILE_H, TILE_W, PAD = 128, 64, 6   # rank-list pictures: each image shown at 128 x 64 px


def write_ranklist_images(folder, distmat, q_paths, g_paths, q_pids, g_pids, k, num_queries,
                          q_camids=None, g_camids=None, protocol="sysu", title=""):
    """Rank-list pictures: for `num_queries` queries spread evenly over the list, one PNG each with
    the query and its top-k gallery images (after the protocol's exclusion, as `write_ranklist`),
    framed green (same identity) or red (another), with rank, distance and identity printed under
    each; and folder/index.html showing them all. Pillow only. Returns the index page's path."""
    from PIL import Image, ImageDraw
    from data.common import read_image
    if np.shape(distmat) != (len(q_paths), len(g_paths)) or k < 1 or num_queries < 1:
        raise ValueError(f"write_ranklist_images: distmat {np.shape(distmat)} must match {len(q_paths)} "
                         f"queries and {len(g_paths)} gallery paths, k ({k}) and num_queries "
                         f"({num_queries}) must be >= 1")
    order, n_kept = _ranked(distmat, k, q_pids, g_pids, q_camids, g_camids, protocol)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    chosen = np.unique(np.linspace(0, len(q_paths) - 1, min(num_queries, len(q_paths))).round().astype(int))
    cam = lambda camids, i: "" if camids is None else f" cam {camids[i]}"   # noqa: E731
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in chosen:
        ranks = order[i, :n_kept[i]]
        canvas = Image.new("RGB", (PAD + (len(ranks) + 1) * (TILE_W + 2 * PAD) + PAD,
                                   18 + TILE_H + 2 * PAD + 30), "white")
        draw = ImageDraw.Draw(canvas)
        where = "/".join(os.path.normpath(q_paths[i]).split(os.sep)[-4:])
        draw.text((PAD, 3), f"{title}  query {i}: {where}"[:160], fill="black")
        tiles = [(q_paths[i], (90, 90, 90), ["query", f"id {q_pids[i]}" + cam(q_camids, i)])]
        tiles += [(g_paths[j], (0, 170, 0) if g_pids[j] == q_pids[i] else (210, 0, 0),
                   [f"{r + 1}: {distmat[i, j]:.3f}", f"id {g_pids[j]}" + cam(g_camids, j)])
                  for r, j in enumerate(ranks)]
        for t, (path, colour, text) in enumerate(tiles):
            x = PAD + t * (TILE_W + 2 * PAD) + (PAD if t else 0)
            draw.rectangle([x - 3, 18 + PAD - 3, x + TILE_W + 2, 18 + PAD + TILE_H + 2], fill=colour)
            canvas.paste(read_image(path).resize((TILE_W, TILE_H)), (x, 18 + PAD))
            for line, words in enumerate(text):
                draw.text((x, 18 + TILE_H + 2 * PAD + line * 12), words, fill=colour if t else "black")
        name = f"query{i:05d}.png"
        canvas.save(os.path.join(folder, name))
        hit = bool(len(ranks)) and bool(g_pids[ranks[0]] == q_pids[i])
        rows.append((str(i), html.escape(q_paths[i]), str(q_pids[i]), "yes" if hit else "no",
                     f'<img src="{name}" alt="query {i}">'))
    index = os.path.join(folder, "index.html")
    _write_index(index, title or "rank list", rows, ("query", "path", "id", "rank-1 correct", f"top {k}"))
    return index


def _write_index(path, title, rows, head=()):
    """A minimal HTML page: a title and one table (cells already escaped)."""
    cells = lambda tag, row: "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in row) + "</tr>"   # noqa: E731
    body = "\n".join([cells("th", head)] * bool(head) + [cells("td", r) for r in rows])
    with open(path, "w") as f:
        f.write(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"</head>\n<body><h1>{html.escape(title)}</h1>\n<table border='1' cellpadding='4'>\n"
                f"{body}\n</table></body></html>\n")


def _label(name, entry):
    return LABELS.get(name, name) + (" (re-ranked)" if entry.get("rerank") else "")


def _rerank_note(results):
    params = next((e["rerank"] for e in results.values() if e.get("rerank")), None)
    if not params:
        return []
    return [f"note: re-ranked: k-reciprocal re-ranking (Zhong et al., CVPR 2017), k1 {params['k1']}, "
            f"k2 {params['k2']}, lambda {params['lambda_value']}; papers in this field report without it"]


def format_table(results):
    """The results as a table: one row per (setting, trial), a mean row per setting, notes."""
    width = max([24] + [len(_label(n, e)) + 1 for n, e in results.items()])
    head = f"{'setting':<{width}}{'trial':>9}" + "".join(f"{m:>8}" for m in METRICS)
    lines, notes = [head, "-" * len(head)], _rerank_note(results)
    for name, entry in results.items():
        label = _label(name, entry)
        for row in entry["trials"]:
            lines.append(f"{label:<{width}}{row['trial']:>9}" + "".join(f"{row[m]:8.2f}" for m in METRICS))
        skipped = [f"{r['num_query'] - r['num_valid']}/{r['num_query']} (trial {r['trial']})"
                   for r in entry["trials"] if r["num_valid"] < r["num_query"]]
        if skipped:
            notes.append(f"note: {label}: queries with no match in the gallery, left out of the "
                         f"averages as officially: {', '.join(skipped)}")
        if len(entry["trials"]) > 1:
            tag = f"mean({len(entry['trials'])})"
            lines.append(f"{label:<{width}}{tag:>9}" + "".join(f"{entry['mean'][m]:8.2f}" for m in METRICS))
    return "\n".join(lines + notes)


SUMMARY_METRICS = ("R1", "mAP", "mINP")


def format_summary(final, untrained=None):
    """The end-of-run table: one line per setting with the final model's trial means of R1, mAP
    and mINP; with `untrained` (results of the model before training), its means beside and the
    relative change in percent, 100 (final - untrained) / untrained."""
    width = max([24] + [len(_label(n, e)) + 1 for n, e in final.items()])
    cols = "".join(f"{m:>8}" for m in SUMMARY_METRICS)
    head = f"{'setting':<{width}}{cols}"
    if untrained is not None:
        head += "  | untrained" + cols + "  | change" + "".join(f"{m:>9}" for m in SUMMARY_METRICS)
    lines = [head, "-" * len(head)]
    for name, entry in final.items():
        have = [entry["mean"][m] for m in SUMMARY_METRICS]
        line = f"{_label(name, entry):<{width}}" + "".join(f"{v:8.2f}" for v in have)
        if untrained is not None and name in untrained:
            before = [untrained[name]["mean"][m] for m in SUMMARY_METRICS]
            change = [f"{100 * (a - b) / b:+8.1f}%" if b else f"{'n/a':>9}" for a, b in zip(have, before)]
            line += "  |" + " " * 9 + "".join(f"{v:8.2f}" for v in before) + "  |" + " " * 7 + "".join(change)
        lines.append(line)
    return "\n".join(lines + _rerank_note(final))


_RUN_ARGS_IGNORED = {"seed", "trial", "out", "resume", "device", "workers", "threads", "data_root",
                     "eval_every", "extract_batch", "amp"}


def summarize_runs(folders):
    """The table across training runs -> (text, summary): RegDB one row per split, otherwise one per
    run (seed), each with every setting's trial-mean R1, mAP and mINP, then mean ± std over the runs
    (std with ddof 0, as over gallery trials).

    Each folder holds train.py's results.json ({"final": results, "untrained": ...}) and args.json;
    evaluate.py's results.json ({"results": ..., "args": ...}) is read too.
    summary = {"dataset", "method", "runs": [{"folder", "seed", "trial", "results": {setting: means
    of all METRICS}}], "mean": {setting: {metric}}, "std": {...}}. Refused with one sentence: a
    folder without results.json, runs of different datasets or methods, the same RegDB split twice,
    runs with different settings.
    """
    folders = list(folders)
    if not folders:
        raise ValueError("--summarize: give at least one run folder")
    runs = [_read_run(f) for f in folders]
    for key in ("dataset", "method"):
        values = sorted({str(r["args"].get(key)) for r in runs})
        if len(values) > 1:
            raise ValueError(f"--summarize: the runs are of different {key}s ({', '.join(values)}: "
                             + ", ".join(f"{r['folder']} {r['args'].get(key)}" for r in runs)
                             + f"); summarise one {key} at a time")
    dataset, method = runs[0]["args"].get("dataset"), runs[0]["args"].get("method")
    if dataset == "regdb":
        seen = {}
        for r in runs:
            if r["trial"] in seen:
                raise ValueError(f"--summarize: RegDB split {r['trial']} appears twice ({seen[r['trial']]} "
                                 f"and {r['folder']}); give one run per split")
            seen[r["trial"]] = r["folder"]
        runs.sort(key=lambda r: r["trial"])
    names = list(runs[0]["results"])
    for r in runs[1:]:
        if list(r["results"]) != names:
            raise ValueError(f"--summarize: {r['folder']} has the settings {list(r['results'])}, "
                             f"{runs[0]['folder']} has {names}; summarise runs evaluated alike")
    table = {n: np.array([[r["results"][n]["mean"][m] for m in METRICS] for r in runs]) for n in names}
    summary = {"dataset": dataset, "method": method,
               "runs": [{"folder": r["folder"], "seed": r["args"].get("seed"), "trial": r["trial"],
                         "results": {n: dict(r["results"][n]["mean"]) for n in names}} for r in runs],
               "mean": {n: dict(zip(METRICS, t.mean(0).tolist())) for n, t in table.items()},
               "std": {n: dict(zip(METRICS, t.std(0).tolist())) for n, t in table.items()}}
    return _format_runs(summary, runs, {n: _label(n, runs[0]["results"][n]) for n in names}), summary


def _read_run(folder):
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--summarize: {folder} has no results.json (train.py writes it when a "
                                f"run finishes; is the run complete, and is this its run folder?)")
    try:
        with open(path) as f:
            saved = json.load(f)
        results = saved["final"] if "final" in saved else saved["results"]
        args = saved.get("args")
        if os.path.isfile(os.path.join(folder, "args.json")):
            with open(os.path.join(folder, "args.json")) as f:
                args = json.load(f)
        if not isinstance(args, dict) or not results or not all("mean" in e for e in results.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--summarize: {path} (with {folder}/args.json) is not the output of a train.py or "
                         f"evaluate.py run") from None
    trial = args.get("trial")
    if args.get("dataset") == "regdb" and not isinstance(trial, int):
        raise ValueError(f"--summarize: {folder} is a RegDB run without a split number (args 'trial')")
    return {"folder": folder, "args": args, "trial": trial, "results": results}


def _format_runs(summary, runs, labels):
    """The text of `summarize_runs`: per setting R1 / mAP / mINP columns, a row per run, mean ± std."""
    col, names = 13, list(labels)
    regdb = summary["dataset"] == "regdb"
    tag = lambda r: f"split {r['trial']}" if regdb else f"seed {r['args'].get('seed')}"  # noqa: E731
    width = max([16] + [len(f"{tag(r)}  {r['folder']}") + 2 for r in runs])
    lines = [f"{len(runs)} runs of {summary['method']} on {summary['dataset']}",
             " " * width + "".join(f"{labels[n][:3 * col - 2]:^{3 * col}}" for n in names),
             f"{'run':<{width}}" + "".join(f"{m:>{col}}" for _ in names for m in SUMMARY_METRICS)]
    lines.append("-" * len(lines[-1]))
    for r, row in zip(runs, summary["runs"]):
        lines.append(f"{tag(r) + '  ' + r['folder']:<{width}}"
                     + "".join(f"{row['results'][n][m]:{col}.2f}" for n in names for m in SUMMARY_METRICS))
    lines.append(f"{f'mean ± std ({len(runs)})':<{width}}" + "".join(
        f"{summary['mean'][n][m]:.2f}±{summary['std'][n][m]:.2f}".rjust(col)
        for n in names for m in SUMMARY_METRICS))
    differ = sorted(k for k in set().union(*(r["args"] for r in runs)) - _RUN_ARGS_IGNORED
                    if len({json.dumps(r["args"].get(k), sort_keys=True) for r in runs}) > 1)
    if differ:
        lines.append("note: the runs also differ in " + ", ".join(
            f"{k} ({', '.join(sorted({str(r['args'].get(k)) for r in runs}))})" for k in differ))
    return "\n".join(line.rstrip() for line in lines)


def write_json(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


# ----------------------------------------------------------------------------- CLI
def parse_trials(text):
    """'0-9' -> [0..9], '0,3' -> [0, 3], '0-2,5' -> [0, 1, 2, 5]."""
    trials = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise argparse.ArgumentTypeError(f"--trials: expected e.g. '0-9' or '0,3', got {text!r}")
        trials += list(range(int(lo), int(hi or lo) + 1))
    return trials


def get_args_parser():
    p = argparse.ArgumentParser("evaluate.py", description="vireid evaluation: SYSU-MM01 / RegDB / LLCM protocols")
    p.add_argument("--dataset", type=str, default="sysu", choices=list(DATASET_ROOTS),
                   help="synthetic uses the SYSU layout and protocol")
    p.add_argument("--data-root", type=str, default=None, help="default: the dataset's preset root")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=str, default=None, choices=["pixels"], help="a built-in baseline")
    src.add_argument("--checkpoint", type=str, default=None, help="a checkpoint written by train.py")
    p.add_argument("--method", type=str, default=None, choices=["mult", "mbmil"],
                   help="with --checkpoint: refuse a checkpoint trained with another method")
    src.add_argument("--from-features", type=str, default=None, help="an .npz from --save-features")
    src.add_argument("--summarize", type=str, nargs="+", default=None, metavar="RUN",
                     help="print (and with --out write) the table across run folders: RegDB per split, "
                          "otherwise per seed, with mean ± std")
    p.add_argument("--mode", type=str, default="both", choices=["all", "indoor", "both"], help="SYSU search mode")
    p.add_argument("--direction", type=str, default=None, choices=["both", "i2v", "v2i", "v2i_transposed"],
                   help="LLCM: both = i2v (IR->VIS, the official default) and v2i (VIS->IR; default); "
                        "v2i_transposed = the official code's VIS->IR, where sampled IR images rank all VIS")
    p.add_argument("--trials", type=parse_trials, default=None,
                   help="SYSU / LLCM gallery seeds, e.g. '0-9' (the standard 10 draws; default) or '0,3'")
    p.add_argument("--trial", type=int, default=1, help="RegDB split 1..10 (the checkpoint's own split)")
    p.add_argument("--shot", type=str, default="single", choices=["single", "multi"], help="SYSU gallery")
    p.add_argument("--height", type=int, default=None, help="input height (288; a checkpoint supplies its own)")
    p.add_argument("--width", type=int, default=None, help="input width (144; a checkpoint supplies its own)")
    p.add_argument("--batch-size", type=int, default=64, help="test batch size (64)")
    p.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loading workers (4, at most the number of CPU cores)")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=False,
                   help="k-reciprocal re-ranking of every distance (off; papers in this field report without it)")
    p.add_argument("--rerank-k1", type=int, default=20, help="re-ranking k1 (20)")
    p.add_argument("--rerank-k2", type=int, default=6, help="re-ranking k2 (6)")
    p.add_argument("--rerank-lambda", type=float, default=0.3,
                   help="re-ranking weight of the original distance (0.3)")
    p.add_argument("--save-features", type=str, default=None, help="write the features to this .npz")
    p.add_argument("--save-ranklist", type=int, default=0, metavar="K",
                   help="write the top-K rank list of each setting's first trial into --out")
    p.add_argument("--ranklist-images", type=int, default=0, metavar="M",
                   help="with --save-ranklist K: also M pictures per setting (query and top K, framed green / "
                        "red) and an index.html")
    p.add_argument("--out", type=str, default=None, help="folder for results.json and rank lists")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.summarize:
        text, summary = summarize_runs(args.summarize)
        print(text)
        if args.out:
            write_json(summary, os.path.join(args.out, "summary.json"))
            with open(os.path.join(args.out, "summary.txt"), "w") as f:
                f.write(text + "\n")
        return summary
    if args.save_ranklist < 0 or args.ranklist_images < 0:
        raise SystemExit("--save-ranklist and --ranklist-images take a count >= 0")
    if args.save_ranklist and not args.out:
        raise SystemExit("--save-ranklist needs --out DIR (where the rank lists go)")
    if args.ranklist_images and not args.save_ranklist:
        raise SystemExit("--ranklist-images M needs --save-ranklist K (the gallery images shown per query)")
    if args.direction and args.dataset != "llcm" and not args.from_features:
        raise SystemExit(f"--direction applies to --dataset llcm only (got --dataset {args.dataset})")
    if not (args.model or args.checkpoint or args.from_features):
        raise SystemExit("give --model pixels, --checkpoint PATH, --from-features PATH or --summarize RUN...")
    args.data_root = args.data_root or DATASET_ROOTS[args.dataset]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_fn, meta = pixel_model, {}
    if args.checkpoint:
        from model import model_from_checkpoint
        model_fn, meta = model_from_checkpoint(args.checkpoint, args.device, method=args.method)
        if meta.get("dataset") not in (None, args.dataset):
            logger.warning("the checkpoint was trained on %s; evaluating on %s", meta["dataset"], args.dataset)
        if args.dataset == "regdb" and meta.get("trial") not in (None, args.trial):
            logger.warning("RegDB: the checkpoint was trained on split %s but --trial is %d; "
                           "each split needs its own model", meta["trial"], args.trial)
    args.height = args.height or meta.get("height") or 288
    args.width = args.width or meta.get("width") or 144
    if args.dataset != "regdb" and not args.from_features:
        args.trials = args.trials or list(range(10))
    modes = ["all", "indoor"] if args.mode == "both" else [args.mode]
    directions = ["i2v", "v2i"] if args.direction in (None, "both") else [args.direction]
    for key, value in vars(args).items():
        print(f"{key}: {value}")
    rerank = dict(k1=args.rerank_k1, k2=args.rerank_k2, lambda_value=args.rerank_lambda) if args.rerank else None
    common = dict(save_ranklist=args.save_ranklist, ranklist_dir=args.out, rerank=rerank,
                  ranklist_images=args.ranklist_images)
    if args.from_features:
        chosen = None if args.mode == "both" and args.direction is None else \
            (modes if args.direction is None else directions)
        results = evaluate_from_features(args.from_features, chosen, args.trials, **common)
    else:
        common.update(height=args.height, width=args.width, device=args.device,
                      batch_size=args.batch_size, num_workers=args.workers,
                      save_features=args.save_features,
                      interpolation="bicubic" if meta.get("method") == "mbmil" else "bilinear")
        if args.dataset == "regdb":
            results = evaluate_regdb(model_fn, args.data_root, args.trial, **common)
        elif args.dataset == "llcm":
            results = evaluate_llcm(model_fn, args.data_root, directions, args.trials, **common)
        else:
            results = evaluate_sysu(model_fn, args.data_root, modes, args.trials, args.shot, **common)
    print(format_table(results))
    if args.out:
        write_json({"method": meta.get("method", args.model), "args": vars(args), "results": results},
                   os.path.join(args.out, "results.json"))
    return results


def cli(argv=None):
    """main() for the command line: a problem with the input is one line on stderr and exit status
    2, not a traceback (VIREID_TRACEBACK=1 shows the traceback)."""
    try:
        return main(argv)
    except (ValueError, OSError) as err:
        if os.environ.get("VIREID_TRACEBACK"):
            raise
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
