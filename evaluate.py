"""Evaluation: the SYSU-MM01, RegDB and LLCM test protocols and their metrics, k-reciprocal re-ranking,
feature extraction and the evaluation CLI.

Protocol of MULT (He et al., IJCV 2024; docs/mult.md §9), which MBMIL (Wang et al., AAAI 2026) shares:
each image's eval feature and its horizontal flip's are averaged and L2-normalised again (9.1); the
distance is squared Euclidean in float64 (9.2); the ranking is NumPy's default argsort; AP, INP and
the CMC as (9.3)-(9.5). Queries without a correct match are left out of every average, as officially.
- SYSU-MM01 (Wu et al., "RGB-Infrared Cross-Modality Person Re-Identification", ICCV 2017; docs/mult.md §9):
  query = every IR test image (cams 3 and 6); gallery = one visible image per (identity, camera) drawn
  with seed `trial` (all-search cams 1, 2, 4, 5; indoor-search cams 1, 2), 10 draws; a cam-3 query never
  sees cam-2 gallery images; the CMC counts distinct identities.
- RegDB (Nguyen et al., "Person Recognition System Based on a Combination of Body Images from Visible
  Light and Thermal Cameras", Sensors 2017; docs/mult.md §9): visible->thermal and thermal->visible on the
  test half of split t; one model per split.
- LLCM (Zhang & Wang, "Diverse Embedding Expansion Network and Low-Light Cross-Modality Benchmark for
  Visible-Infrared Person Re-identification", CVPR 2023; docs/llcm.md §3-§4, its official evaluation):
  IR->VIS (the official default; query = every infrared test image, gallery = one visible image per
  (identity, camera) drawn with seed `trial`, 10 draws) and VIS->IR (the reverse); a query never sees
  gallery images of its own identity in its own camera number (4.1); the CMC counts distinct identities.
Optional, off by default: k-reciprocal re-ranking (Zhong et al., CVPR 2017), `re_ranking`; the papers of
this field report without it.

The file reads top to bottom: the metrics (`eval_sysu`, `eval_regdb`, `eval_llcm`), re-ranking, feature
extraction (`extract_features`, `pairwise_distance`), the protocols (`evaluate_sysu`, `evaluate_regdb`,
`evaluate_llcm`, `evaluate_from_features`: the test images extracted once, each trial indexed into
them), then the CLI. Reports (tables of one run and across runs, rank lists) are in reports.py.
Imports at module level: torch, numpy, scipy and the standard library only, so that the metrics, the
distance and the re-ranking work from a copy of this file alone (tests/test_copy_evaluate.py). Imported
where needed: tqdm and data/ (readers, test transform) by the extraction and the protocols, reports.py by
the rank lists and the CLI. Checked against slow references written in the tests: `reference_metrics`
and `reference_re_ranking` in tests/test_evaluate.py, `reference_llcm` in tests/test_llcm.py.

    python evaluate.py --dataset sysu --checkpoint runs/mult_sysu/last.pth --trials 0-9
    python evaluate.py --dataset regdb --trial 3 --checkpoint runs/mult_regdb_trial3/last.pth
    python evaluate.py --dataset llcm --checkpoint runs/mult_llcm/last.pth --rerank
    python evaluate.py --dataset synthetic --model pixels --save-features feats.npz --out out/
    python evaluate.py --from-features feats.npz
    python evaluate.py --summarize runs/mult_regdb_trial*
"""
import argparse
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

logger = logging.getLogger("evaluate")
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
def extract_features(model_fn, images, height, width, batch_size=64, device="cpu", flip=True,
                     num_workers=0, desc=None, interpolation="bilinear", progress=True, cache=None):
    """Test features of an ImageList (docs/mult.md (9.1)) -> float32 [N, D] on the CPU, rows in list order.
    interpolation: of the resize to height x width ("bilinear" as MULT's code; MBMIL's resizes bicubic).
    cache: None, or a data.cache.ImageCache holding every image of `images` at that size and interpolation
    (train.py's decode-once training cache): the images are read from it, not decoded again; the same pixels.

    model_fn(x [B, 3, H, W] on `device`, modality) -> [B, D] eval features; with `flip` the
    feature of the image and of its horizontal flip are averaged, then L2-normalised again.
    The caller puts its model in eval mode; this runs under torch.no_grad().
    """
    from tqdm import tqdm
    from data.loader import CachedImageDataset, ImageDataset
    from data.transforms import test_transform
    if len(images) == 0:
        raise ValueError("extract_features: `images` is empty; expected at least one image")
    if batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    pin = torch.device(device).type == "cuda"
    transform = test_transform(height, width, interpolation)
    if cache is None:
        loader = torch.utils.data.DataLoader(ImageDataset(images, transform), batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, pin_memory=pin)
    else:                  # whole batches from the cache, the same batches as above
        loader = torch.utils.data.DataLoader(CachedImageDataset(images, cache, transform, batch_size),
                                             batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin)
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
    """Squared Euclidean distance of unit rows (docs/mult.md (9.2)), 2 - 2 q.g, in float64:
    q [Q, D], g [G, D] -> [Q, G]."""
    q, g = _check_unit_rows(q, "q"), _check_unit_rows(g, "g")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"pairwise_distance: feature sizes differ: q {q.shape}, g {g.shape}")
    return 2.0 - 2.0 * (q @ g.T)


def pixel_model(x, modality):
    """The trivial baseline: the normalised image average-pooled to 16 x 8, flattened,
    L2-normalised. x [B, 3, H, W] -> [B, 384]; `modality` is unused."""
    return F.normalize(F.adaptive_avg_pool2d(x, (16, 8)).flatten(1), dim=1)


def _model_output(model_fn, x, modality):
    """model_fn(x, modality), checked: a finite [B, D] tensor, as float32."""
    f = model_fn(x, modality)
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"model_fn: expected a [B, D] tensor for B = {x.shape[0]} images, got {shape}")
    if not torch.isfinite(f).all():
        raise ValueError(f"model_fn returned NaN/inf features (modality {modality}); check the "
                         "checkpoint and the input normalisation")
    return f.float()


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


# ----------------------------------------------------------------------------- protocols
# Each protocol reads the query and gallery of every (setting, trial) with the dataset's reader, extracts
# the test images once (extracted: feats [M, D]; paths, pids, camids, modality [M]), finds each trial's
# query and gallery rows among them (a run: setting, trial, rows [Q], rows [G]), then `_evaluate_runs`:
# per run the distances [Q, G], the protocol's metric, one row of results.
def evaluate_sysu(model_fn, root, modes=("all", "indoor"), trials=range(10), shot="single",
                  height=288, width=144, device="cpu", batch_size=64, num_workers=0,
                  save_features=None, save_ranklist=0, ranklist_dir=None, rerank=None,
                  ranklist_images=0, interpolation="bilinear"):
    """SYSU-MM01 protocol (docs/mult.md §9) -> {mode: {"protocol", "shot", "rerank", "trials": [{"trial",
    "R1", ..., "mINP", "num_query", "num_gallery", "num_valid"}], "mean": {...}, "std": {...}}},
    metrics in percent. The query (every IR test image, the same in each mode and trial) and the gallery
    candidates (all-search's; indoor-search's cameras 1, 2 are among them) are extracted once; each
    trial's gallery, one draw from the candidates, is indexed into them.
    rerank: None, or the keyword arguments of `re_ranking` (e.g. {}) to re-rank every distance.
    save_features: an .npz of the features and of each trial's rows, for `evaluate_from_features`.
    save_ranklist K > 0: each setting's first trial as a text rank list in ranklist_dir, and with
    ranklist_images M > 0 as M pictures plus an index page (reports.write_ranklist_images)."""
    from data.sysu import sysu_gallery_candidates, sysu_test
    modes, trials = _check_settings("evaluate_sysu", "modes", modes, ("all", "indoor"), trials)
    tests = {(mode, trial): sysu_test(root, mode, trial, shot) for mode in modes for trial in trials}
    widest = "all" if "all" in modes else "indoor"               # indoor's cameras 1, 2 are among all's
    sides = [(sysu_gallery_candidates(root, widest), f"{widest} gallery"), (tests[modes[0], trials[0]][0], "query")]
    extracted = _extract(model_fn, sides, height, width, batch_size, device, num_workers, interpolation)
    return _evaluate_runs(extracted, _runs(tests, extracted), {"protocol": "sysu", "shot": shot},
                          save_features, save_ranklist, ranklist_dir, rerank, ranklist_images)


def evaluate_regdb(model_fn, root, trial, directions=("v2t", "t2v"), height=288, width=144,
                   device="cpu", batch_size=64, num_workers=0, save_features=None,
                   save_ranklist=0, ranklist_dir=None, rerank=None, ranklist_images=0, interpolation="bilinear"):
    """RegDB protocol on split `trial` (1..10; docs/mult.md §9) -> results as `evaluate_sysu`. The model
    must have been trained on the same split; combine 10 runs with `mean_over_trials`. Both directions
    use the split's test visible and thermal images, each extracted once."""
    from data.regdb import regdb_test
    directions, _ = _check_settings("evaluate_regdb", "directions", directions, ("v2t", "t2v"))
    tests = {(direction, int(trial)): regdb_test(root, trial, direction) for direction in directions}
    query, gallery = tests[directions[0], int(trial)]            # the other direction: the two swapped
    sides = [(query, f"{directions[0]} query"), (gallery, f"{directions[0]} gallery")]
    extracted = _extract(model_fn, sides, height, width, batch_size, device, num_workers, interpolation)
    return _evaluate_runs(extracted, _runs(tests, extracted), {"protocol": "regdb"},
                          save_features, save_ranklist, ranklist_dir, rerank, ranklist_images)


def evaluate_llcm(model_fn, root, directions=("i2v", "v2i"), trials=range(10), height=288, width=144,
                  device="cpu", batch_size=64, num_workers=0, save_features=None, save_ranklist=0,
                  ranklist_dir=None, rerank=None, ranklist_images=0, interpolation="bilinear"):
    """LLCM protocol (docs/llcm.md §3-§4; data/llcm.py) -> results as `evaluate_sysu`, one setting per
    direction: "i2v" (infrared queries, the official default), "v2i" (visible queries), and on request
    "v2i_transposed" (the official code's visible-to-infrared mode, where the sampled infrared images
    rank every visible image). Every visible and every infrared test image is extracted once; each
    trial's sampled side (one image per identity and camera, seed `trial`) is indexed into them."""
    from data.llcm import DIRECTIONS, llcm_gallery_candidates, llcm_test
    directions, trials = _check_settings("evaluate_llcm", "directions", directions, DIRECTIONS, trials)
    tests = {(d, trial): llcm_test(root, d, trial) for d in directions for trial in trials}
    sides = [(llcm_gallery_candidates(root, "i2v"), "visible"),   # every visible test image
             (llcm_gallery_candidates(root, "v2i"), "infrared")]  # every infrared test image
    extracted = _extract(model_fn, sides, height, width, batch_size, device, num_workers, interpolation)
    return _evaluate_runs(extracted, _runs(tests, extracted), {"protocol": "llcm"},
                          save_features, save_ranklist, ranklist_dir, rerank, ranklist_images)


def evaluate_from_features(path, settings=None, trials=None, save_ranklist=0, ranklist_dir=None,
                           rerank=None, ranklist_images=0):
    """Re-run the metrics from a `save_features` file, without a model; `settings` / `trials`
    select among the saved ones (default: all). Returns the same results as the original run
    (re-ranked with `rerank`, as in the protocols)."""
    extracted, runs, info = _load_features(path)
    chosen = [r for r in runs if (settings is None or r[0] in settings)
              and (trials is None or r[1] in set(trials))]
    if not chosen:
        raise ValueError(f"{path}: no saved evaluation matches settings={settings}, trials="
                         f"{None if trials is None else list(trials)}; saved: {[r[:2] for r in runs]}")
    return _evaluate_runs(extracted, chosen, info, None, save_ranklist, ranklist_dir, rerank, ranklist_images)


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


def _extract(model_fn, sides, height, width, batch_size, device, num_workers, interpolation):
    """Flip-averaged features of the test images, one side [(ImageList, description)] after the other ->
    extracted = {"feats": float32 [M, D], "paths": [M], "pids", "camids", "modality": int64 [M]}."""
    feats = []
    for images, desc in sides:
        start = time.perf_counter()
        feats.append(extract_features(model_fn, images, height, width, batch_size, device, True,
                                      num_workers, desc, interpolation))
        logger.info("features %s: %d images, %.1f s", desc, len(images), time.perf_counter() - start)
    lists = [images for images, _ in sides]
    return {"feats": torch.cat(feats).numpy(), "paths": [p for images in lists for p in images.paths],
            "pids": np.concatenate([images.pids for images in lists]),
            "camids": np.concatenate([images.camids for images in lists]),
            "modality": np.concatenate([np.full(len(x), x.modality, dtype=np.int64) for x in lists])}


def _runs(tests, extracted):
    """{(setting, trial): (query, gallery) ImageLists} -> runs [(setting, trial, query rows int64 [Q],
    gallery rows [G])]: where each trial's images sit among the extracted ones, found by path."""
    row = {p: i for i, p in enumerate(extracted["paths"])}
    missing = [p for query, gallery in tests.values() for p in query.paths + gallery.paths if p not in row]
    if missing:
        raise ValueError(f"{len(missing)} test images (e.g. {missing[0]}) are not among the extracted "
                         "ones; did the dataset change during the evaluation?")
    rows = lambda images: np.array([row[p] for p in images.paths], dtype=np.int64)   # noqa: E731
    return [(setting, trial, rows(query), rows(gallery))
            for (setting, trial), (query, gallery) in tests.items()]


def _evaluate_runs(extracted, runs, info, save_features=None, save_ranklist=0, ranklist_dir=None,
                   rerank=None, ranklist_images=0):
    """Results (as `evaluate_sysu`) of the runs [(setting, trial, query rows [Q], gallery rows [G])] of the
    extracted features: per run the distances [Q, G] (re-ranked on request) and the protocol's metric."""
    _check_outputs(save_ranklist, ranklist_dir, ranklist_images)
    if save_features:
        _save_features(save_features, extracted, runs, info)
    if rerank is not None:
        rerank = {"k1": 20, "k2": 6, "lambda_value": 0.3, **rerank}
    protocol = info["protocol"]
    feats, pids, camids = extracted["feats"], extracted["pids"], extracted["camids"]
    results, pages, q_q = {}, [], None
    for setting, trial, q, g in runs:
        distmat = pairwise_distance(feats[q], feats[g])             # [Q, G]
        if rerank is not None:
            if q_q is None or not np.array_equal(q_q[0], q):        # trials share their query: once
                q_q = (q, pairwise_distance(feats[q], feats[q]))
            distmat = re_ranking(distmat, q_q[1], pairwise_distance(feats[g], feats[g]), **rerank)
        if protocol == "regdb":
            cmc, m_ap, m_inp, n_valid = eval_regdb(distmat, pids[q], pids[g], return_valid=True)
        else:
            metric = eval_llcm if protocol == "llcm" else eval_sysu
            cmc, m_ap, m_inp, n_valid = metric(distmat, pids[q], pids[g], camids[q], camids[g],
                                               return_valid=True)
        entry = results.setdefault(setting, {**info, "rerank": rerank, "trials": []})
        if save_ranklist and not entry["trials"]:                   # each setting's first trial
            from reports import write_trial_ranklists
            pages += write_trial_ranklists(ranklist_dir, setting, trial, entry, distmat, extracted, q, g,
                                           save_ranklist, ranklist_images)
        scores = 100 * np.r_[cmc[[0, 4, 9, 19]], m_ap, m_inp]
        entry["trials"].append({"trial": trial, **dict(zip(METRICS, scores.tolist())),
                                "num_query": len(q), "num_gallery": len(g), "num_valid": n_valid})
    if pages:
        from reports import write_ranklist_index
        write_ranklist_index(ranklist_dir, pages)
    _summarise(results)
    return results


def _summarise(settings):
    """Adds each setting's "mean" and "std" (ddof 0) over its trials, for every METRICS."""
    for entry in settings.values():
        table = np.array([[row[m] for m in METRICS] for row in entry["trials"]])
        entry["mean"] = dict(zip(METRICS, table.mean(0).tolist()))
        entry["std"] = dict(zip(METRICS, table.std(0).tolist()))


def _save_features(path, extracted, runs, info):
    """One .npz: every extracted row (feats, paths, pids, camids, modality), the protocol (info), the
    (setting, trial) of each run (plan) and its query / gallery rows q{i} / g{i}."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"feats": extracted["feats"], "paths": np.array(extracted["paths"], dtype=str),
              "pids": extracted["pids"], "camids": extracted["camids"], "modality": extracted["modality"],
              "info": np.array(json.dumps(info)), "plan": np.array(json.dumps([r[:2] for r in runs]))}
    for i, (_, _, q, g) in enumerate(runs):
        arrays[f"q{i}"], arrays[f"g{i}"] = q, g
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def _load_features(path):
    """(extracted, runs, info) of a --save-features file; ValueError naming the file for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--from-features: file not found: {path}")
    expected = "an .npz written by evaluate.py --save-features"
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"feats", "paths", "pids", "camids", "modality", "info", "plan"} - set(z.files)
            if missing:
                raise ValueError(f"missing arrays {sorted(missing)}")
            extracted = {k: z[k] for k in ("feats", "pids", "camids", "modality")}
            extracted["paths"] = z["paths"].tolist()
            info = json.loads(str(z["info"]))
            runs = [(s, t, z[f"q{i}"], z[f"g{i}"]) for i, (s, t) in enumerate(json.loads(str(z["plan"])))]
        m = len(extracted["feats"])
        if extracted["feats"].ndim != 2 or any(len(v) != m for v in extracted.values()):
            raise ValueError("feats, paths, pids, camids and modality do not have one row each")
        for _, _, q, g in runs:
            rows = np.concatenate([q.ravel(), g.ravel()])
            if not (np.issubdtype(q.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)) \
                    or rows.min(initial=0) < 0 or rows.max(initial=0) >= m:
                raise ValueError("a query or gallery index lies outside the saved rows")
        if info.get("protocol") not in ("sysu", "regdb", "llcm"):
            raise ValueError(f"unknown protocol {info.get('protocol')!r}")
    except ValueError as err:
        raise ValueError(f"--from-features {path}: not {expected} ({err})") from None
    except (OSError, EOFError, KeyError, IndexError, TypeError, AttributeError, zipfile.BadZipFile) as err:
        raise ValueError(f"--from-features {path}: not {expected} (unreadable: "
                         f"{type(err).__name__})") from None
    return extracted, runs, info


def _check_settings(caller, name, chosen, allowed, trials=None):
    """-> (chosen as a list, trials as ints; None when not given)."""
    chosen, trials = list(chosen), None if trials is None else [int(t) for t in trials]
    if not chosen or not set(chosen) <= set(allowed) or trials == []:
        and_trials, got_trials = ("", "") if trials is None else (" and trials non-empty", f", trials={trials}")
        raise ValueError(f"{caller}: {name} must be a non-empty subset of {tuple(allowed)}{and_trials}, "
                         f"got {name}={chosen}{got_trials}")
    return chosen, trials


def _check_outputs(save_ranklist, ranklist_dir, ranklist_images):
    if save_ranklist and ranklist_dir is None:
        raise ValueError("save_ranklist > 0 needs ranklist_dir (the folder for the rank lists)")
    if ranklist_images and not save_ranklist:
        raise ValueError("ranklist_images > 0 needs save_ranklist K > 0 (the gallery images per row)")


# ----------------------------------------------------------------------------- CLI
DATASET_ROOTS = {"sysu": "datasets/SYSU-MM01", "regdb": "datasets/RegDB", "llcm": "datasets/LLCM",
                 "synthetic": "datasets/synthetic"}   # the default --data-root; train.py's presets use it too


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
    from reports import format_table, summarize_runs
    if args.summarize:
        text, summary = summarize_runs(args.summarize)
        print(text)
        if args.out:
            write_json(summary, os.path.join(args.out, "summary.json"))
            with open(os.path.join(args.out, "summary.txt"), "w") as f:
                f.write(text + "\n")
        return summary
    _check_args(args)
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


def write_json(results, path):
    """`results` as indented JSON in `path`, its folder made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def _check_args(args):
    """The command-line combinations argparse cannot refuse, one sentence each (--summarize is checked by
    reports.summarize_runs)."""
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


if __name__ == "__main__":
    cli()
