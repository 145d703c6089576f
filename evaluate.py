"""Evaluation: the SYSU-MM01 and RegDB test protocols, their metrics, feature extraction and a CLI.

Implements the test protocol of MULT (He et al., IJCV 2024; docs/mult.md §9), which MBMIL (Wang
et al., AAAI 2026) shares: each image's eval feature and its horizontal flip's are averaged and
L2-normalised again; distance is squared Euclidean in float64; ranking is NumPy's default argsort.
- SYSU-MM01: query = every IR test image (cams 3 and 6); gallery = one visible image per
  (identity, camera) drawn with seed `trial` (all-search cams 1, 2, 4, 5; indoor-search cams 1, 2),
  10 draws; a cam-3 query never sees cam-2 gallery images; the CMC counts distinct identities.
- RegDB: visible->thermal and thermal->visible on the test half of split t; one model per split.
Metrics: rank-k CMC; with hits at 1-based ranks p_1 < ... < p_n, AP = (1/n) sum_t t/p_t and
INP = n/p_n. Queries without a correct match are left out of every average, as officially.

    python evaluate.py --dataset sysu --checkpoint runs/mult_sysu/last.pth --trials 0-9
    python evaluate.py --dataset regdb --trial 3 --checkpoint runs/mult_regdb_trial3/last.pth
    python evaluate.py --dataset synthetic --model pixels --save-features feats.npz --out out/
    python evaluate.py --from-features feats.npz
"""
import argparse
import json
import logging
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

logger = logging.getLogger("evaluate")
METRICS = ("R1", "R5", "R10", "R20", "mAP", "mINP")
LABELS = {"all": "SYSU all-search", "indoor": "SYSU indoor-search",
          "v2t": "RegDB visible->thermal", "t2v": "RegDB thermal->visible"}
QUERY_BLOCK = 1024   # queries ranked at once: memory stays at a few [QUERY_BLOCK, G] arrays
DATASET_ROOTS = {"sysu": "datasets/SYSU-MM01", "regdb": "datasets/RegDB",
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
    keep_of = lambda b: ~((a["q_camids"][b, None] == 3) & (a["g_camids"][None, :] == 2))  # noqa: E731
    return _rank_metrics(distmat, a["q_pids"], a["g_pids"], keep_of, True, max_rank, return_valid,
                         "eval_sysu")


def eval_regdb(distmat, q_pids, g_pids, max_rank=20, return_valid=False):
    """RegDB metrics (docs/mult.md §9): standard CMC on the full ranked list, AP and INP, no exclusion.

    distmat [Q, G] -> (cmc [max_rank], mAP, mINP) [+ number of valid queries]; as `eval_sysu`.
    """
    distmat, max_rank, a = _check_metric_inputs(distmat, max_rank, q_pids=q_pids, g_pids=g_pids)
    keep_of = lambda b: np.ones((len(a["q_pids"][b]), distmat.shape[1]), dtype=bool)  # noqa: E731
    return _rank_metrics(distmat, a["q_pids"], a["g_pids"], keep_of, False, max_rank, return_valid,
                         "eval_regdb")


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
                     num_workers=0, desc=None):
    """Test features of an ImageList (docs/mult.md §9) -> float32 [N, D] on the CPU, rows in list order.

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
    loader = torch.utils.data.DataLoader(ImageDataset(images, test_transform(height, width)),
                                         batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=pin)
    out = None
    with torch.no_grad():
        for x, index in tqdm(loader, desc=desc or "features", unit="batch", file=sys.stderr):
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


def _extractor(model_fn, height, width, batch_size, device, num_workers):
    return lambda images, desc: extract_features(model_fn, images, height, width, batch_size,
                                                 device, True, num_workers, desc)


def evaluate_sysu(model_fn, root, modes=("all", "indoor"), trials=range(10), shot="single",
                  height=288, width=144, device="cpu", batch_size=64, num_workers=0,
                  save_features=None, save_ranklist=0, ranklist_dir=None):
    """SYSU-MM01 protocol (docs/mult.md §9) -> {mode: {"protocol", "shot", "trials": [{"trial", "R1",
    ..., "mINP", "num_query", "num_gallery", "num_valid"}], "mean": {...}, "std": {...}}},
    metrics in percent. Each image is extracted once: the query once, the gallery candidates of
    each mode once (indoor's are a subset of all's); each trial picks its gallery by path."""
    from data.sysu import sysu_gallery_candidates, sysu_test
    modes, trials = list(modes), [int(t) for t in trials]
    if not modes or not set(modes) <= {"all", "indoor"} or not trials:
        raise ValueError(f"evaluate_sysu: modes must be a non-empty subset of ('all', 'indoor') "
                         f"and trials non-empty, got modes={modes}, trials={trials}")
    extract = _extractor(model_fn, height, width, batch_size, device, num_workers)
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
    return _run_plan(_finish_pool(pool), plan, info, save_features, save_ranklist, ranklist_dir)


def evaluate_regdb(model_fn, root, trial, directions=("v2t", "t2v"), height=288, width=144,
                   device="cpu", batch_size=64, num_workers=0, save_features=None,
                   save_ranklist=0, ranklist_dir=None):
    """RegDB protocol on split `trial` (1..10; docs/mult.md §9) -> results as `evaluate_sysu`. The model
    must have been trained on the same split; combine 10 runs with `mean_over_trials`."""
    from data.regdb import regdb_test
    directions = list(directions)
    if not directions or not set(directions) <= {"v2t", "t2v"}:
        raise ValueError(f"evaluate_regdb: directions must be a non-empty subset of ('v2t', "
                         f"'t2v'), got {directions}")
    extract = _extractor(model_fn, height, width, batch_size, device, num_workers)
    pool, plan = {"row": {}, "parts": []}, []
    for direction in directions:
        query, gallery = regdb_test(root, trial, direction=direction)
        q_rows = _pool_add(pool, query, extract, f"{direction} query")
        plan.append((direction, int(trial), q_rows, _pool_add(pool, gallery, extract, f"{direction} gallery")))
    info = {"protocol": "regdb"}
    return _run_plan(_finish_pool(pool), plan, info, save_features, save_ranklist, ranklist_dir)


def _summarise(settings):
    for entry in settings.values():
        table = np.array([[row[m] for m in METRICS] for row in entry["trials"]])
        entry["mean"] = dict(zip(METRICS, table.mean(0).tolist()))
        entry["std"] = dict(zip(METRICS, table.std(0).tolist()))


def _run_plan(pool, plan, info, save_features=None, save_ranklist=0, ranklist_dir=None):
    """Metrics of each (setting, trial, query rows, gallery rows) of `plan` over the feature pool."""
    if save_ranklist and ranklist_dir is None:
        raise ValueError("save_ranklist > 0 needs ranklist_dir (the folder for the rank lists)")
    if save_features:
        _save_pool(save_features, pool, plan, info)
    settings, sysu = {}, info["protocol"] == "sysu"
    for setting, trial, q, g in plan:
        distmat = pairwise_distance(pool["feats"][q], pool["feats"][g])   # [Q, G]
        q_pids, g_pids, q_cams, g_cams = pool["pids"][q], pool["pids"][g], pool["camids"][q], pool["camids"][g]
        if sysu:
            cmc, m_ap, m_inp, n_valid = eval_sysu(distmat, q_pids, g_pids, q_cams, g_cams, return_valid=True)
        else:
            cmc, m_ap, m_inp, n_valid = eval_regdb(distmat, q_pids, g_pids, return_valid=True)
        entry = settings.setdefault(setting, {**info, "trials": []})
        if save_ranklist and not entry["trials"]:
            write_ranklist(os.path.join(ranklist_dir, f"ranklist_{setting}_trial{trial}.txt"), distmat,
                           [pool["paths"][i] for i in q], [pool["paths"][i] for i in g], q_pids,
                           g_pids, save_ranklist, *((q_cams, g_cams) if sysu else ()))
        scores = 100 * np.r_[cmc[[0, 4, 9, 19]], m_ap, m_inp]
        entry["trials"].append({"trial": trial, **dict(zip(METRICS, scores.tolist())),
                                "num_query": len(q), "num_gallery": len(g), "num_valid": n_valid})
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


def evaluate_from_features(path, settings=None, trials=None, save_ranklist=0, ranklist_dir=None):
    """Re-run the metrics from a `save_features` file, without a model; `settings` / `trials`
    select among the saved ones (default: all). Returns the same results as the original run."""
    pool, plan, info = _load_pool(path)
    chosen = [p for p in plan if (settings is None or p[0] in settings)
              and (trials is None or p[1] in set(trials))]
    if not chosen:
        raise ValueError(f"{path}: no saved evaluation matches settings={settings}, trials="
                         f"{None if trials is None else list(trials)}; saved: {[p[:2] for p in plan]}")
    return _run_plan(pool, chosen, info, None, save_ranklist, ranklist_dir)


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
        if info.get("protocol") not in ("sysu", "regdb"):
            raise ValueError(f"unknown protocol {info.get('protocol')!r}")
    except ValueError as err:
        raise ValueError(f"--from-features {path}: not {expected} ({err})") from None
    except (OSError, EOFError, KeyError, IndexError, TypeError, AttributeError, zipfile.BadZipFile) as err:
        raise ValueError(f"--from-features {path}: not {expected} (unreadable: "
                         f"{type(err).__name__})") from None
    return pool, plan, info


def write_ranklist(path, distmat, q_paths, g_paths, q_pids, g_pids, k, q_camids=None, g_camids=None):
    """One line per query: its path, then its top-k gallery paths, each prefixed + (correct
    identity) or - (wrong), tab-separated. With camids (SYSU) cam-3 queries skip cam-2 images."""
    if np.shape(distmat) != (len(q_paths), len(g_paths)):
        raise ValueError(f"write_ranklist: distmat {np.shape(distmat)} does not match "
                         f"{len(q_paths)} query and {len(g_paths)} gallery paths")
    order = np.argsort(distmat, axis=1)                             # [Q, G], as the metrics
    drop = np.zeros(distmat.shape, dtype=bool)
    if q_camids is not None:
        drop = (np.asarray(q_camids)[:, None] == 3) & (np.asarray(g_camids)[order] == 2)
    order = np.take_along_axis(order, np.argsort(drop, axis=1, kind="stable"), axis=1)[:, :k]
    n_kept = np.minimum((~drop).sum(1), k)
    correct = np.asarray(g_pids)[order] == np.asarray(q_pids)[:, None]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, q_path in enumerate(q_paths):
            marks = ("+" if c else "-" for c in correct[i, :n_kept[i]])
            f.write("\t".join([q_path] + [m + g_paths[j] for m, j in zip(marks, order[i])]) + "\n")


def format_table(results):
    """The results as a table: one row per (setting, trial), a mean row per setting, notes."""
    head = f"{'setting':<24}{'trial':>9}" + "".join(f"{m:>8}" for m in METRICS)
    lines, notes = [head, "-" * len(head)], []
    for name, entry in results.items():
        label = LABELS.get(name, name)
        for row in entry["trials"]:
            lines.append(f"{label:<24}{row['trial']:>9}" + "".join(f"{row[m]:8.2f}" for m in METRICS))
        skipped = [f"{r['num_query'] - r['num_valid']}/{r['num_query']} (trial {r['trial']})"
                   for r in entry["trials"] if r["num_valid"] < r["num_query"]]
        if skipped:
            notes.append(f"note: {label}: queries with no match in the gallery, left out of the "
                         f"averages as officially: {', '.join(skipped)}")
        if len(entry["trials"]) > 1:
            tag = f"mean({len(entry['trials'])})"
            lines.append(f"{label:<24}{tag:>9}" + "".join(f"{entry['mean'][m]:8.2f}" for m in METRICS))
    return "\n".join(lines + notes)


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
    p = argparse.ArgumentParser("evaluate.py", description="vireid evaluation: SYSU-MM01 / RegDB protocols")
    p.add_argument("--dataset", type=str, default="sysu", choices=list(DATASET_ROOTS),
                   help="synthetic uses the SYSU layout and protocol")
    p.add_argument("--data-root", type=str, default=None, help="default: the dataset's preset root")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=str, default=None, choices=["pixels"], help="a built-in baseline")
    src.add_argument("--checkpoint", type=str, default=None, help="a checkpoint written by train.py")
    p.add_argument("--method", type=str, default=None, choices=["mult", "mbmil"],
                   help="with --checkpoint: refuse a checkpoint trained with another method")
    src.add_argument("--from-features", type=str, default=None, help="an .npz from --save-features")
    p.add_argument("--mode", type=str, default="both", choices=["all", "indoor", "both"], help="SYSU search mode")
    p.add_argument("--trials", type=parse_trials, default=None,
                   help="SYSU gallery seeds, e.g. '0-9' (the standard 10 draws; default) or '0,3'")
    p.add_argument("--trial", type=int, default=1, help="RegDB split 1..10 (the checkpoint's own split)")
    p.add_argument("--shot", type=str, default="single", choices=["single", "multi"], help="SYSU gallery")
    p.add_argument("--height", type=int, default=None, help="input height (288; a checkpoint supplies its own)")
    p.add_argument("--width", type=int, default=None, help="input width (144; a checkpoint supplies its own)")
    p.add_argument("--batch-size", type=int, default=64, help="test batch size (64)")
    p.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loading workers (4, at most the number of CPU cores)")
    p.add_argument("--save-features", type=str, default=None, help="write the features to this .npz")
    p.add_argument("--save-ranklist", type=int, default=0, metavar="K",
                   help="write the top-K rank list of each setting's first trial into --out")
    p.add_argument("--out", type=str, default=None, help="folder for results.json and rank lists")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.save_ranklist and not args.out:
        raise SystemExit("--save-ranklist needs --out DIR (where the rank lists go)")
    if not (args.model or args.checkpoint or args.from_features):
        raise SystemExit("give --model pixels, --checkpoint PATH or --from-features PATH")
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
    for key, value in vars(args).items():
        print(f"{key}: {value}")
    common = dict(save_ranklist=args.save_ranklist, ranklist_dir=args.out)
    if args.from_features:
        results = evaluate_from_features(args.from_features, None if args.mode == "both" else modes,
                                         args.trials, **common)
    else:
        common.update(height=args.height, width=args.width, device=args.device,
                      batch_size=args.batch_size, num_workers=args.workers,
                      save_features=args.save_features)
        if args.dataset == "regdb":
            results = evaluate_regdb(model_fn, args.data_root, args.trial, **common)
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
