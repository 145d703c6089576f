"""Evaluation: the SYSU-MM01, RegDB and LLCM test protocols, and the evaluation command line.

Protocol of MULT (He et al., IJCV 2024; docs/mult.md §9), which MBMIL (Wang et al., AAAI 2026) shares: every
test image is extracted once (the flip-averaged feature, features.py), each trial's query and gallery are indexed
into them, and metrics.py scores each trial (the distance, the metric, optional re-ranking).
- SYSU-MM01 (Wu et al., "RGB-Infrared Cross-Modality Person Re-Identification", ICCV 2017; docs/mult.md §9):
  query = every IR test image (cams 3 and 6); gallery = one visible image per (identity, camera) drawn
  with seed `trial` (all-search cams 1, 2, 4, 5; indoor-search cams 1, 2), 10 draws.
- RegDB (Nguyen et al., "Person Recognition System Based on a Combination of Body Images from Visible
  Light and Thermal Cameras", Sensors 2017; docs/mult.md §9): visible->thermal and thermal->visible on the
  test half of split t; one model per split.
- LLCM (Zhang & Wang, "Diverse Embedding Expansion Network and Low-Light Cross-Modality Benchmark for
  Visible-Infrared Person Re-identification", CVPR 2023; docs/llcm.md §3-§4, its official evaluation):
  IR->VIS (the official default; query = every infrared test image, gallery = one visible image per
  (identity, camera) drawn with seed `trial`, 10 draws) and VIS->IR (the reverse).

    python evaluate.py --dataset sysu --checkpoint runs/mult_sysu/last.pth --trials 0-9
    python evaluate.py --dataset regdb --trial 3 --checkpoint runs/mult_regdb_trial3/last.pth
    python evaluate.py --dataset llcm --checkpoint runs/mult_llcm/last.pth --rerank
    python evaluate.py --dataset synthetic --model pixels --save-features feats.npz --out out/
    python evaluate.py --from-features feats.npz
    python evaluate.py --summarize runs/mult_regdb_trial*
    python evaluate.py --plot runs/mult_synthetic runs/mult_synthetic_association-ot --out mult_vs_ot.png

The file reads top to bottom: the protocols (`evaluate_sysu`, `evaluate_regdb`, `evaluate_llcm`,
`evaluate_from_features`), their steps, then the CLI. Tables and rank lists are plumbing/reports.py's.
"""
import argparse
import json
import logging
import os
import time
import zipfile

import numpy as np
import torch

from data.datasets import ROOTS
from data.transforms import RESIZE
from features import extract_features, pixel_model
from metrics import METRICS, RERANK_DEFAULTS, eval_llcm, eval_regdb, eval_sysu, pairwise_distance, re_ranking
from plumbing.checkpoints import model_from_checkpoint
from plumbing.checks import check_evaluate_flags, check_writable
from plumbing.cli import run as run_cli
from plumbing.device import configure as configure_device, fixed_algorithms
from plumbing.curves import plot_runs
from plumbing.logs import setup as setup_logging
from plumbing.reports import format_table, summarize_runs, write_ranklist_index, write_summary, write_trial_ranklists

logger = logging.getLogger("evaluate")


# ----------------------------------------------------------------------------- protocols
# Each protocol reads the query and gallery of every (setting, trial) with the dataset's reader, extracts
# the test images once (extracted: feats [M, D]; paths, pids, camids, modality [M]), finds each trial's
# query and gallery rows among them (a run: setting, trial, rows [Q], rows [G]), then `_evaluate_runs`:
# per run the distances [Q, G], the protocol's metric, one row of results.
def evaluate_sysu(model_fn, root, modes=("all", "indoor"), trials=range(10), shot="single",
                  height=288, width=144, device="cpu", batch_size=64, num_workers=0,
                  save_features=None, save_ranklist=0, ranklist_dir=None, rerank=None,
                  ranklist_images=0, interpolation="bilinear", amp="off"):
    """SYSU-MM01 protocol (docs/mult.md §9) -> {mode: {"protocol", "shot", "rerank", "trials": [{"trial",
    "R1", ..., "mINP", "num_query", "num_gallery", "num_valid"}], "mean": {...}, "std": {...}}},
    metrics in percent. The query (every IR test image, the same in each mode and trial) and the gallery
    candidates (all-search's; indoor-search's cameras 1, 2 are among them) are extracted once; each
    trial's gallery, one draw from the candidates, is indexed into them.
    rerank: None, or the keyword arguments of `re_ranking` (e.g. {}) to re-rank every distance.
    amp: "bf16" or "fp16" extracts under that autocast (features float32 either way); "off" (default).
    save_features: an .npz of the features and of each trial's rows, for `evaluate_from_features`.
    save_ranklist K > 0: each setting's first trial as a text rank list in ranklist_dir, and with
    ranklist_images M > 0 as M pictures plus an index page (reports.write_ranklist_images)."""
    from data.sysu import sysu_gallery_candidates, sysu_test
    modes, trials = _check_settings("evaluate_sysu", "modes", modes, ("all", "indoor"), trials)
    tests = {(mode, trial): sysu_test(root, mode, trial, shot) for mode in modes for trial in trials}
    _check_rerank(rerank, [(len(q), len(g)) for q, g in tests.values()])
    widest = "all" if "all" in modes else "indoor"               # indoor's cameras 1, 2 are among all's
    sides = [(sysu_gallery_candidates(root, widest), f"{widest} gallery"), (tests[modes[0], trials[0]][0], "query")]
    extracted = _extract(model_fn, sides, height, width, batch_size, device, num_workers, interpolation, amp)
    return _evaluate_runs(extracted, _runs(tests, extracted), {"protocol": "sysu", "shot": shot},
                          save_features, save_ranklist, ranklist_dir, rerank, ranklist_images)


def evaluate_regdb(model_fn, root, trial, directions=("v2t", "t2v"), height=288, width=144,
                   device="cpu", batch_size=64, num_workers=0, save_features=None,
                   save_ranklist=0, ranklist_dir=None, rerank=None, ranklist_images=0, interpolation="bilinear",
                   amp="off"):
    """RegDB protocol on split `trial` (1..10; docs/mult.md §9) -> results as `evaluate_sysu`. The model
    must have been trained on the same split; combine 10 runs with `mean_over_trials`. Both directions
    use the split's test visible and thermal images, each extracted once."""
    from data.regdb import regdb_test
    directions, _ = _check_settings("evaluate_regdb", "directions", directions, ("v2t", "t2v"))
    tests = {(direction, int(trial)): regdb_test(root, trial, direction) for direction in directions}
    _check_rerank(rerank, [(len(q), len(g)) for q, g in tests.values()])
    query, gallery = tests[directions[0], int(trial)]            # the other direction: the two swapped
    sides = [(query, f"{directions[0]} query"), (gallery, f"{directions[0]} gallery")]
    extracted = _extract(model_fn, sides, height, width, batch_size, device, num_workers, interpolation, amp)
    return _evaluate_runs(extracted, _runs(tests, extracted), {"protocol": "regdb"},
                          save_features, save_ranklist, ranklist_dir, rerank, ranklist_images)


def evaluate_llcm(model_fn, root, directions=("i2v", "v2i"), trials=range(10), height=288, width=144,
                  device="cpu", batch_size=64, num_workers=0, save_features=None, save_ranklist=0,
                  ranklist_dir=None, rerank=None, ranklist_images=0, interpolation="bilinear", amp="off"):
    """LLCM protocol (docs/llcm.md §3-§4; data/llcm.py) -> results as `evaluate_sysu`, one setting per
    direction: "i2v" (infrared queries, the official default), "v2i" (visible queries), and on request
    "v2i_transposed" (the official code's visible-to-infrared mode, where the sampled infrared images
    rank every visible image). Every visible and every infrared test image is extracted once; each
    trial's sampled side (one image per identity and camera, seed `trial`) is indexed into them."""
    from data.llcm import DIRECTIONS, llcm_gallery_candidates, llcm_test
    directions, trials = _check_settings("evaluate_llcm", "directions", directions, DIRECTIONS, trials)
    tests = {(d, trial): llcm_test(root, d, trial) for d in directions for trial in trials}
    _check_rerank(rerank, [(len(q), len(g)) for q, g in tests.values()])
    sides = [(llcm_gallery_candidates(root, "i2v"), "visible"),   # every visible test image
             (llcm_gallery_candidates(root, "v2i"), "infrared")]  # every infrared test image
    extracted = _extract(model_fn, sides, height, width, batch_size, device, num_workers, interpolation, amp)
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
    _check_rerank(rerank, [(len(q), len(g)) for _, _, q, g in chosen])
    return _evaluate_runs(extracted, chosen, info, None, save_ranklist, ranklist_dir, rerank, ranklist_images)


def evaluate_dataset(model_fn, dataset, root, trial=1, trials=range(10), **kwargs):
    """The dataset's protocol in its standard settings: SYSU-MM01 (and the synthetic set, in its layout) all- and
    indoor-search single-shot, RegDB visible->thermal and thermal->visible of split `trial`, LLCM IR->VIS and
    VIS->IR; gallery draws `trials`. kwargs: those of evaluate_sysu (height, width, device, ...)."""
    if dataset == "regdb":
        return evaluate_regdb(model_fn, root, trial, **kwargs)
    if dataset == "llcm":
        return evaluate_llcm(model_fn, root, trials=trials, **kwargs)
    return evaluate_sysu(model_fn, root, trials=trials, **kwargs)


def evaluate_run(model, args, trials):
    """A training run's evaluation (train.py's flags `args`): its dataset's protocol with `trials` gallery draws,
    at its size, resize and --amp precision, with the same convolution algorithms every time (no autotuner)."""
    model.eval()
    with fixed_algorithms(args.device):
        return evaluate_dataset(model.modality_fn(), args.dataset, args.data_root, args.trial, range(trials),
                                height=args.height, width=args.width, device=args.device, amp=args.amp,
                                batch_size=args.extract_batch, num_workers=args.workers,
                                interpolation=RESIZE[args.method])


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


def _extract(model_fn, sides, height, width, batch_size, device, num_workers, interpolation, amp="off"):
    """Flip-averaged features of the test images, one side [(ImageList, description)] after the other ->
    extracted = {"feats": float32 [M, D], "paths": [M], "pids", "camids", "modality": int64 [M]}."""
    feats = []
    for images, desc in sides:
        start = time.perf_counter()
        feats.append(extract_features(model_fn, images, height, width, batch_size, device, True,
                                      num_workers, desc, interpolation, amp=amp))
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
        rerank = {**RERANK_DEFAULTS, **rerank}
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
            pages += write_trial_ranklists(ranklist_dir, setting, trial, entry, distmat, extracted, q, g,
                                           save_ranklist, ranklist_images)
        scores = 100 * np.r_[cmc[[0, 4, 9, 19]], m_ap, m_inp]
        entry["trials"].append({"trial": trial, **dict(zip(METRICS, scores.tolist())),
                                "num_query": len(q), "num_gallery": len(g), "num_valid": n_valid})
    if pages:
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


def _check_rerank(rerank, sizes):
    """Re-ranking's neighbour counts against the smallest trial, [(Q, G)], before any feature is extracted
    (metrics.re_ranking: k1 in 1..Q+G-1, k2 in 1..Q+G)."""
    if rerank is None:
        return
    n = min(q + g for q, g in sizes)
    for flag, key, high in (("--rerank-k1", "k1", n - 1), ("--rerank-k2", "k2", n)):
        value = rerank.get(key, RERANK_DEFAULTS[key])
        if isinstance(value, (int, np.integer)) and not 1 <= value <= high:
            raise ValueError(f"{flag} {value}: re-ranking needs 1..{high} here (the smallest trial has {n} query "
                             f"and gallery images)")


def _check_outputs(save_ranklist, ranklist_dir, ranklist_images):
    if save_ranklist and ranklist_dir is None:
        raise ValueError("save_ranklist > 0 needs ranklist_dir (the folder for the rank lists)")
    if ranklist_images and not save_ranklist:
        raise ValueError("ranklist_images > 0 needs save_ranklist K > 0 (the gallery images per row)")


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
    p.add_argument("--dataset", type=str, default="sysu", choices=list(ROOTS),
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
    src.add_argument("--plot", type=str, nargs="+", default=None, metavar="RUN",
                     help="draw the learning curves of run folders of one dataset into --out FILE.png, each run "
                          "labelled by the flags in which it differs from the others")
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
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="the backbone's precision (off; bf16 on GPUs that have it); features, distances and metrics "
                        "stay float32 / float64; convolutions on CUDA use TF32, matrix products IEEE float32")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loading workers (4, at most the number of CPU cores)")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=False,
                   help="k-reciprocal re-ranking of every distance (off; papers in this field report without it)")
    p.add_argument("--rerank-k1", type=int, default=None, help="re-ranking k1 (20), with --rerank")
    p.add_argument("--rerank-k2", type=int, default=None, help="re-ranking k2 (6), with --rerank")
    p.add_argument("--rerank-lambda", type=float, default=None,
                   help="re-ranking weight of the original distance (0.3), with --rerank")
    p.add_argument("--save-features", type=str, default=None, help="write the features to this .npz")
    p.add_argument("--save-ranklist", type=int, default=0, metavar="K",
                   help="write the top-K rank list of each setting's first trial into --out")
    p.add_argument("--ranklist-images", type=int, default=0, metavar="M",
                   help="with --save-ranklist K: also M pictures per setting (query and top K, framed green / "
                        "red) and an index.html")
    p.add_argument("--out", type=str, default=None,
                   help="folder for results.json and rank lists; with --plot, the picture (.png, .pdf or .svg)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    setup_logging()
    if args.summarize:
        if args.out:
            check_writable(args.out, "--out", args.out, "evaluate.py")
        text, summary = summarize_runs(args.summarize)
        print(text)
        if args.out:
            write_summary(args.out, text, summary)
        return summary
    if args.plot:
        if args.out:
            check_writable(os.path.dirname(os.path.abspath(args.out)), "--out", args.out, "evaluate.py")
        groups = plot_runs(args.plot, args.out)
        print(f"{args.out}: the curves of {len(args.plot)} runs: "
              + "; ".join(f"{label} ({', '.join(folders)})" for label, folders in groups))
        return groups
    check_evaluate_flags(args)
    args.data_root = args.data_root or ROOTS[args.dataset]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configure_device(args.device)                  # TF32 convolutions, IEEE float32 matrix products (CUDA)
    model_fn, meta = pixel_model, {}
    if args.checkpoint:
        model_fn, meta = model_from_checkpoint(args.checkpoint, args.device, method=args.method)
        if meta.get("dataset") not in (None, args.dataset):
            logger.warning("the checkpoint was trained on %s; evaluating on %s", meta["dataset"], args.dataset)
        if args.dataset == "regdb" and meta.get("trial") not in (None, args.trial):
            logger.warning("RegDB: the checkpoint was trained on split %s but --trial is %d; "
                           "each split needs its own model", meta["trial"], args.trial)
    args.height = args.height or meta.get("height") or 288
    args.width = args.width or meta.get("width") or 144
    resized = None                     # a checkpoint evaluated at another size than it trained at: said, not hidden
    if meta.get("height") and (args.height, args.width) != (meta["height"], meta["width"]):
        resized = {"evaluated": [args.height, args.width], "trained": [meta["height"], meta["width"]]}
        logger.warning("note: evaluating at %dx%d (--height, --width), but the checkpoint was trained at %dx%d",
                       args.height, args.width, meta["height"], meta["width"])
    if args.dataset != "regdb" and not args.from_features:
        args.trials = args.trials or list(range(10))
    modes = ["all", "indoor"] if args.mode == "both" else [args.mode]
    directions = ["i2v", "v2i"] if args.direction in (None, "both") else [args.direction]
    for key, value in vars(args).items():
        print(f"{key}: {value}")
    rerank = {k: v for k, v in (("k1", args.rerank_k1), ("k2", args.rerank_k2), ("lambda_value", args.rerank_lambda))
              if v is not None} if args.rerank else None
    common = dict(save_ranklist=args.save_ranklist, ranklist_dir=args.out, rerank=rerank,
                  ranklist_images=args.ranklist_images)
    if args.from_features:
        chosen = None if args.mode == "both" and args.direction is None else \
            (modes if args.direction is None else directions)
        results = evaluate_from_features(args.from_features, chosen, args.trials, **common)
    else:
        common.update(height=args.height, width=args.width, device=args.device,
                      batch_size=args.batch_size, num_workers=args.workers,
                      save_features=args.save_features, amp=args.amp,
                      interpolation=RESIZE[meta.get("method") or "mult"])
        if args.dataset == "regdb":
            results = evaluate_regdb(model_fn, args.data_root, args.trial, **common)
        elif args.dataset == "llcm":
            results = evaluate_llcm(model_fn, args.data_root, directions, args.trials, **common)
        else:
            results = evaluate_sysu(model_fn, args.data_root, modes, args.trials, args.shot, **common)
    for entry in results.values() if resized else ():
        entry["input_size"] = resized                          # format_table's note, and results.json's
    print(format_table(results))
    if args.out:
        write_json({"method": meta.get("method", args.model), "args": vars(args), "results": results},
                   os.path.join(args.out, "results.json"))
    return results


def write_json(results, path):
    """`results` as indented JSON in `path`, its folder made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def cli(argv=None):
    """main() as the command line runs it: a problem with the input is one line on stderr and exit status 2."""
    return run_cli(main, "evaluate.py", argv)


if __name__ == "__main__":
    cli()
