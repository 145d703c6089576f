"""Reports of evaluate.py's results: the per-run table, a training run's epoch lines and end-of-run summary, the
table across runs, and rank lists (text, and pictures with an index page).

Results are the dicts of evaluate.evaluate_sysu / evaluate_regdb / evaluate_llcm: {setting: {"protocol",
"rerank", "trials": [{"trial", "R1", ..., "mINP", "num_query", "num_gallery", "num_valid"}], "mean",
"std"}}, metrics in percent. Rank lists follow the protocol's ranking and exclusion (docs/mult.md §9,
docs/llcm.md (4.1)): NumPy's default argsort, then the images `metrics.excluded` names dropped.
Imports numpy and metrics.py; Pillow and data/ (to read the images) only for the pictures; plumbing/curves.py
for a run's learning curves.

    print(format_table(results))                   # one row per (setting, trial), a mean row per setting
    print(format_summary(final, untrained))        # the end-of-run table, with the change from untrained
    text, summary = summarize_runs(["runs/a", "runs/b"])   # across run folders: mean ± std
    write_ranklist("r.txt", distmat, q_paths, g_paths, q_pids, g_pids, 10, q_camids, g_camids, "sysu")
"""
import html
import json
import logging
import os

import numpy as np

from metrics import METRICS, excluded
from plumbing.curves import eval_scores, write_run_curves
from plumbing.logs import FILE_ONLY
from plumbing.runs import RUNTIME_FLAGS, write_atomic

LABELS = {"all": "SYSU all-search", "indoor": "SYSU indoor-search",
          "v2t": "RegDB visible->thermal", "t2v": "RegDB thermal->visible",
          "i2v": "LLCM IR->VIS", "v2i": "LLCM VIS->IR", "v2i_transposed": "LLCM VIS->IR transposed"}
SUMMARY_METRICS = ("R1", "mAP", "mINP")   # the columns of the end-of-run table and of the table across runs
TILE_H, TILE_W, PAD = 128, 64, 6   # rank-list pictures: each image shown at 128 x 64 px
# May differ between the runs of one table: what cannot change a result, what the table's rows are about, and the
# record of which flags left the presets (args.json's changed_from_preset, e.g. {"seed": 2}).
_RUN_ARGS_IGNORED = RUNTIME_FLAGS | {"seed", "trial", "data_root", "amp", "changed_from_preset"}


log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- a training run
def skipped_epoch(epoch, args):
    """The record of an epoch whose clustering found no cluster (it trains nothing), and its log line naming the
    flags to raise: --eps, and in MBMIL's stage two --global-eps (its global clustering may be the one)."""
    stage = 1 if epoch < args.stage_one_epochs else 2
    eps = [f"--eps {args.eps}"] + [f"--global-eps {args.global_eps}"] * (args.method == "mbmil" and stage == 2)
    log.info(f"epoch {epoch}: DBSCAN found no cluster ({', '.join(eps)}); this epoch trains nothing and the model "
             f"is unchanged. If this persists, raise {' or '.join(e.split()[0] for e in eps)} or check the features.")
    return {"stage": stage, "skipped": "no clusters"}


def epoch_line(record):
    """One epoch record as the log's one line: 'epoch 3 (stage 1): clusters_vis 412, ..., loss 7.21, ..., test all
    R1 18.73 mAP 23.28, indoor R1 19.86 mAP 27.89, lr ...'."""
    hidden = ("epoch", "stage", "cross_accuracy", "cross_accuracy_ot", "global", "global_plain", "loss_per_iteration")

    def show(key, value):
        if key == "eval":
            return "test " + ", ".join(setting + "".join(f" {m} {v:.2f}" for m, v in scores.items())
                                       for setting, scores in eval_scores(record).items())
        return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
    return f"epoch {record['epoch']} (stage {record['stage']}): " + ", ".join(
        show(k, v) for k, v in record.items() if k not in hidden)


def final_report(results, untrained, history, args):
    """The end of a training run: the full per-trial tables to log.txt and results.json, one compact table to
    the screen (with the untrained model's beside it when there is one), and the run's learning curves, redrawn."""
    curves = write_run_curves(args.out, untrained)
    if untrained is not None:
        log.info("untrained model:\n" + format_table(untrained), extra=FILE_ONLY)
    last = history[-1]["epoch"]
    log.info(f"final model (last epoch, {last}):\n" + format_table(results), extra=FILE_ONLY)
    log.info(f"final model (last epoch, {last})" + (", against the untrained one" if untrained else "")
             + ", means over the gallery trials:\n" + format_summary(results, untrained)
             + f"\nper-trial tables: {os.path.join(args.out, 'log.txt')}, {os.path.join(args.out, 'results.json')}"
             + (f"; learning curves: {curves}" if curves else ""))
    if args.select_on_test:
        scored = [r for r in history if "eval" in r]
        best = max(scored, key=lambda r: next(iter(eval_scores(r).values()))["mAP"])
        log.info(f"[model selection on the TEST set, not a valid protocol] best epoch {best['epoch']}: "
                 f"{eval_scores(best)}")
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"final": results, "untrained": untrained}, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "results.json"))


# ----------------------------------------------------------------------------- tables
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
    sizes = {json.dumps(e["input_size"]) for e in results.values() if e.get("input_size")}
    for size in map(json.loads, sorted(sizes)):
        (h, w), (th, tw) = size["evaluated"], size["trained"]
        notes.append(f"note: evaluated at {h}x{w} (--height x --width), but the model was trained at {th}x{tw}: "
                     f"these are not the numbers of the trained model's own input size")
    return "\n".join(lines + notes)


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


def write_summary(folder, text, summary):
    """A table across runs into `folder` (made if missing): summary.txt as printed, summary.json as returned by
    summarize_runs, each replaced atomically."""
    os.makedirs(folder, exist_ok=True)
    write_atomic(os.path.join(folder, "summary.txt"), text + "\n")
    write_atomic(os.path.join(folder, "summary.json"), json.dumps(summary, indent=2))


def summarize_runs(folders):
    """The table across training runs -> (text, summary): RegDB one row per split, otherwise one per
    run (seed), each with every setting's trial-mean R1, mAP and mINP, then mean ± std over the runs
    (std with ddof 0, as over gallery trials).

    Each folder holds train.py's results.json ({"final": results, "untrained": ...}) and args.json;
    evaluate.py's results.json ({"results": ..., "args": ...}) is read too.
    summary = {"dataset", "method", "runs": [{"folder", "seed", "trial", "results": {setting: means
    of all METRICS}}], "mean": {setting: {metric}}, "std": {...}}. Refused with one sentence: a
    folder without results.json, a folder named twice (by its real path), runs of different datasets or
    methods, the same RegDB split twice, runs with different settings.
    """
    folders = list(folders)
    if not folders:
        raise ValueError("--summarize: give at least one run folder")
    seen = {}
    for folder in folders:            # one run twice would count as two and shrink the std: refused
        real = os.path.realpath(folder)
        if real in seen:
            raise ValueError(f"--summarize: {folder} names the same run folder as {seen[real]} ({real}); give "
                             f"each run once")
        seen[real] = folder
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
    """{"folder", "args", "trial", "results"} of one run folder; a sentence naming it when it is not one."""
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


def _label(name, entry):
    return LABELS.get(name, name) + (" (re-ranked)" if entry.get("rerank") else "")


def _rerank_note(results):
    params = next((e["rerank"] for e in results.values() if e.get("rerank")), None)
    if not params:
        return []
    return [f"note: re-ranked: k-reciprocal re-ranking (Zhong et al., CVPR 2017), k1 {params['k1']}, "
            f"k2 {params['k2']}, lambda {params['lambda_value']}; papers in this field report without it"]


# ----------------------------------------------------------------------------- rank lists
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


def write_trial_ranklists(folder, setting, trial, entry, distmat, extracted, q, g, k, num_images=0):
    """The rank lists of one trial of a protocol: folder/ranklist_{setting}_trial{trial}.txt and, with
    num_images M > 0, M pictures in the folder of that name (`write_ranklist_images`).
    extracted: the test images as evaluate extracts them ({"paths", "pids", "camids"}, [M] each); q [Q],
    g [G]: the trial's rows of them; entry: the setting's results (its "protocol" and "rerank").
    Returns [(title, the pictures' index page)], or [] without pictures."""
    name = os.path.join(folder, f"ranklist_{setting}_trial{trial}")
    q_paths, g_paths = [extracted["paths"][i] for i in q], [extracted["paths"][i] for i in g]
    ids = (extracted["pids"][q], extracted["pids"][g])
    cams, protocol = (extracted["camids"][q], extracted["camids"][g]), entry["protocol"]
    write_ranklist(name + ".txt", distmat, q_paths, g_paths, *ids, k, *cams, protocol)
    if not num_images:
        return []
    title = f"{_label(setting, entry)}, trial {trial}"
    return [(title, write_ranklist_images(name, distmat, q_paths, g_paths, *ids, k, num_images, *cams,
                                          protocol, title=title))]


def write_ranklist_index(folder, pages):
    """folder/index.html linking the picture pages [(title, path)] of `write_trial_ranklists`."""
    links = [(f'<a href="{html.escape(os.path.relpath(p, folder))}">{html.escape(t)}</a>',) for t, p in pages]
    _write_index(os.path.join(folder, "index.html"), "rank lists", links)


def _ranked(distmat, k, q_pids, g_pids, q_camids, g_camids, protocol):
    """Top-k gallery columns per query after the protocol's exclusion -> (order [Q, <= k], n_kept [Q])."""
    order = np.argsort(distmat, axis=1)                             # [Q, G], as the metrics
    drop = np.zeros(order.shape, dtype=bool)
    if q_camids is not None:
        drop = np.take_along_axis(excluded(protocol, np.asarray(q_pids), np.asarray(g_pids),
                                           np.asarray(q_camids), np.asarray(g_camids)), order, axis=1)
    order = np.take_along_axis(order, np.argsort(drop, axis=1, kind="stable"), axis=1)[:, :k]
    return order, np.minimum((~drop).sum(1), k)


def _write_index(path, title, rows, head=()):
    """A minimal HTML page: a title and one table (cells already escaped)."""
    cells = lambda tag, row: "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in row) + "</tr>"   # noqa: E731
    body = "\n".join([cells("th", head)] * bool(head) + [cells("td", r) for r in rows])
    with open(path, "w") as f:
        f.write(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"</head>\n<body><h1>{html.escape(title)}</h1>\n<table border='1' cellpadding='4'>\n"
                f"{body}\n</table></body></html>\n")
