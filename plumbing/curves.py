"""A run's learning curves as a picture: curves.png in its run folder, and several runs overlaid (evaluate.py --plot).

Everything drawn comes from the run folder's files: metrics.jsonl (one record per epoch), args.json (the flags) and,
once the run has finished, results.json (the untrained model's scores, drawn at epoch -1: the model before epoch 0).
`series` turns the records into curves and is the only step with logic; the drawing only draws what it returns.
matplotlib is imported when a picture is drawn and used through its object API on the Agg canvas: no pyplot, no
global backend, no display.

    refresh_run_curves("runs/mult_synthetic", record)   # after an epoch: redrawn if the epoch took REFRESH_S or more
    write_run_curves("runs/mult_synthetic")      # -> runs/mult_synthetic/curves.png; a failure is a warning line
    plot_runs(["runs/mult_synthetic", "runs/mult_synthetic_association-ot"], "mult_vs_ot.png")
"""
import importlib.util
import json
import logging
import os

from plumbing.runs import RUNTIME_FLAGS, describe

CURVES = "curves.png"
REFRESH_S = 10     # an epoch this long is worth a new picture: drawing takes about half a second, at most 5% of it
FORMATS = (".png", ".pdf", ".svg")                 # what --plot --out may end with
NAME_FLAGS = ("method", "dataset", "trial")        # a run folder's name: these, then its flags off the preset
SETTINGS = {"all": "all-search", "indoor": "indoor", "v2t": "V→T", "t2v": "T→V", "i2v": "IR→VIS", "v2i": "VIS→IR",
            "v2i_transposed": "VIS→IR transposed"}     # the test settings' legends
PANELS = ("test mAP (%)", "test R1 (%)", "training loss", "clusters",
          "cross-modality labels against ground truth (%):\na diagnostic, never seen by training", "learning rate")
DIAGNOSTICS, LR = 4, 5                               # panels drawn apart: their empty note, a log scale
STYLES = ("-", "--", ":", "-.")                     # an overlay's curves of one panel: line style and marker
MARKERS = ("o", "s", "^", "D")
NOTE = ("epoch -1: the untrained model; a test score is one gallery draw, the last epoch's the mean of "
        "--eval-trials. Vertical lines: solid, stage two starts; dotted, the lr drops x0.1.")
SEEDS_NOTE = "Several seeds: their mean, in a band from the lowest to the highest."

log = logging.getLogger(__name__)


def refresh_run_curves(out, record, untrained=None):
    """After an epoch (its `record`): redraw out/curves.png when the epoch took REFRESH_S seconds or more, so that a
    long run can be watched; the end of a run always draws (`write_run_curves`). -> as write_run_curves, or None."""
    return write_run_curves(out, untrained) if record.get("time", 0) >= REFRESH_S else None


def write_run_curves(out, untrained=None):
    """Draw out/curves.png from the run's files -> its path, or None when it could not be drawn. Never raises:
    a run must not stop for its picture, so a failure is one warning line. untrained: the untrained model's
    results (evaluate.py's dict), when the run evaluated it; otherwise results.json's, if the run has one."""
    path = os.path.join(out, CURVES)
    try:
        run = read_run(out, untrained)
        _draw([run], [(os.path.basename(os.path.normpath(out)), [0])], path, overlay=False)
        return path
    except Exception as err:            # matplotlib missing, a full disk, a bug in the drawing: training goes on
        message = (str(err).strip().splitlines() or [""])[0][:200]
        log.warning(f"warning: curves: {path} not drawn ({type(err).__name__}: {message}); training goes on")
        return None


def plot_runs(folders, out):
    """evaluate.py --plot: the curves of several runs of one dataset in one picture `out`, each run labelled by the
    flags in which it differs from the others (`run_labels`). Refused in one sentence: no --out or another file
    type, a folder that is not a run, a run named twice, runs of different datasets. -> [(label, [folder])]"""
    if not out or not out.lower().endswith(FORMATS):
        raise ValueError(f"--plot needs --out FILE ending in {', '.join(FORMATS)} (the picture); "
                         + (f"got --out {out}" if out else "no --out was given"))
    seen = {}
    for folder in folders:
        key = os.path.realpath(folder)
        if key in seen:
            raise ValueError(f"--plot: the run {folder} is named twice ({seen[key]} and {folder}); name each run once")
        seen[key] = folder
    runs = [read_run(f) for f in folders]
    datasets = {}
    for run in runs:
        datasets.setdefault(str(run["args"].get("dataset")), []).append(run["folder"])
    if len(datasets) > 1:
        raise ValueError("--plot: the runs are of different datasets (" + "; ".join(
            f"{d}: {', '.join(f)}" for d, f in sorted(datasets.items())) + "); plot one dataset at a time")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install -r requirements.txt")
    groups = run_labels([r["args"] for r in runs], [r["folder"] for r in runs])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _draw(runs, groups, out, overlay=True)
    return [(label, [runs[i]["folder"] for i in members]) for label, members in groups]


def read_run(folder, untrained=None):
    """{"folder", "args", "records", "series"} of a run folder, the untrained model's scores from `untrained` or else
    from results.json; a sentence naming the file for a folder that is not a run (no metrics.jsonl, or no args.json)
    or a file that is not train.py's."""
    metrics, args_path = os.path.join(folder, "metrics.jsonl"), os.path.join(folder, "args.json")
    if not os.path.isfile(metrics):
        raise ValueError(f"--plot: {folder} is not a run folder (no metrics.jsonl; train.py writes it after each "
                         f"epoch)")
    if not os.path.isfile(args_path):
        raise ValueError(f"--plot: {folder} has metrics.jsonl but no args.json: not a train.py run folder")
    records = []
    with open(metrics) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record["epoch"], int):
                    raise ValueError
            except (ValueError, KeyError):
                raise ValueError(f"--plot: {metrics} line {n} is not an epoch record of train.py") from None
            records.append(record)
    try:
        with open(args_path) as f:
            args = json.load(f)
        if not isinstance(args, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"--plot: {args_path} is not the flags of a train.py run (JSON object)") from None
    results_path = os.path.join(folder, "results.json")
    try:
        if untrained is None and os.path.isfile(results_path):
            with open(results_path) as f:
                untrained = json.load(f).get("untrained")
        curves = series(records, untrained)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--plot: {metrics} (with {results_path}) holds records train.py does not write") from None
    return {"folder": folder, "args": args, "records": records, "series": curves}


def series(records, untrained=None):
    """The curves of a run's epoch records (metrics.jsonl, in file order), each an (x, y) pair of lists.
    -> {"epochs": [epoch of every record], "test": {"mAP"/"R1": {setting: (x, y)}} (x = -1: the untrained
    model), "loss": {key: (x, y)} ("loss" and its parts), "loss_iterations": (x, y) (x spreads an epoch's
    iterations over epoch ± 0.5), "clusters": {name: (x, y)}, "diagnostics": {name: (x, y)} (percent),
    "lr": (x, y), "stage_two": the first epoch of stage two or None, "lr_drops": [epochs whose lr is lower
    than the epoch before's]}."""
    out = {"epochs": [r["epoch"] for r in records], "test": {"mAP": {}, "R1": {}}, "loss": {},
           "loss_iterations": ([], []), "clusters": {}, "diagnostics": {}, "lr": ([], []), "stage_two": None,
           "lr_drops": []}

    def add(group, name, x, y):
        if y is not None:
            xs, ys = group.setdefault(name, ([], []))
            xs.append(x)
            ys.append(y)

    if untrained:
        for setting, entry in untrained.items():
            for metric in ("mAP", "R1"):
                add(out["test"][metric], setting, -1, round(entry["mean"][metric], 2))
    previous_lr = None
    for r in records:
        e = r["epoch"]
        for setting, scores in eval_scores(r).items():
            for metric, value in scores.items():
                add(out["test"][metric], setting, e, value)
        for key in sorted(k for k in r if k == "loss" or k.startswith("loss_") and k != "loss_per_iteration"):
            add(out["loss"], key, e, r[key])
        per_it = r.get("loss_per_iteration") or []
        for i, value in enumerate(per_it):
            out["loss_iterations"][0].append(e - 0.5 + (i + 0.5) / len(per_it))
            out["loss_iterations"][1].append(value)
        add(out["clusters"], "vis", e, r.get("clusters_vis"))
        add(out["clusters"], "ir", e, r.get("clusters_ir"))
        add(out["clusters"], "global", e, r.get("global", {}).get("clusters"))
        add(out["clusters"], "global, holding both modalities", e, r.get("global", {}).get("mixed"))
        for key, who in (("cross_accuracy", "labels"), ("cross_accuracy_ot", "OT on the same features")):
            for side, arrow in (("vis", "vis→ir"), ("ir", "ir→vis")):
                add(out["diagnostics"], f"{who} {arrow}", e, _percent(r.get(key, {}).get(side)))
        for key, who in (("global", "global clusters"), ("global_plain", "plain Jaccard's clusters")):
            add(out["diagnostics"], f"{who}: cross-modality pair precision", e,
                _percent(r.get(key, {}).get("cross_pair_precision")))
        if r.get("stage") == 2 and out["stage_two"] is None:
            out["stage_two"] = e
        if "lr" in r:
            out["lr"][0].append(e)
            out["lr"][1].append(r["lr"])
            if previous_lr is not None and r["lr"] < previous_lr:
                out["lr_drops"].append(e)
            previous_lr = r["lr"]
    return out


def spread(curves):
    """Several runs' curves of one quantity (seeds) as one: per x, the mean, the lowest and the highest value of the
    runs that have it. curves: [(x, y)] -> (x, mean, low, high); one run's curve is itself."""
    at = {}
    for x, y in curves:
        for xi, yi in zip(x, y):
            at.setdefault(xi, []).append(yi)
    xs = sorted(at)
    return xs, [sum(at[x]) / len(at[x]) for x in xs], [min(at[x]) for x in xs], [max(at[x]) for x in xs]


def eval_scores(record):
    """The test scores of an epoch record -> {setting: {"R1", "mAP"}} ({} when the epoch was not evaluated). An
    earlier release recorded the mAP alone ({setting: mAP}); its records give {setting: {"mAP"}}."""
    return {setting: {"mAP": v} if isinstance(v, (int, float)) else {m: v[m] for m in ("R1", "mAP") if m in v}
            for setting, v in record.get("eval", {}).items()}


def run_labels(run_args, folders):
    """The legend of --plot -> [(label, [run index])]. A run is labelled by the flags that name runs (method,
    dataset, trial and each run's flags off its preset, as run folders are named) whose values are not the same in
    every run, as typed (--association ot --seed 2): the method's always, another flag when a run of the same
    method is named by it (so MULT shows --association mult beside OT's --association ot, and MBMIL does not).
    When other flags differ too, runs that differ only in --seed share one entry and colour, "(seeds 1, 2, 3)":
    the seeds' spread. A run that no flag tells apart is named by its folder."""
    named = [_name_flags(a) for a in run_args]
    keys = list(NAME_FLAGS) + sorted({k for n in named for k in n} - set(NAME_FLAGS))
    differ = [k for k in keys if len({_flag(k, a.get(k)) for a in run_args}) > 1]
    own = [[_flag(k, a.get(k)) for k in differ
            if k in NAME_FLAGS or any(k in n and b.get("method") == a.get("method") for n, b in zip(named, run_args))]
           for a in run_args]
    groups = {}
    for i, flags in enumerate(own):
        groups.setdefault(tuple(f for f in flags if not f.startswith("--seed ")), []).append(i)
    out = []
    for key, members in groups.items():
        seeds = [run_args[i].get("seed") for i in members]
        if len(groups) > 1 and len(members) > 1 and len(set(seeds)) == len(members):
            out.append((" ".join(key + (f"(seeds {', '.join(map(str, seeds))})",)), members))
        else:
            out += [(" ".join(own[i]), [i]) for i in members]
    labels = [label for label, _ in out]
    return [(label if label and labels.count(label) == 1 else f"{label} {folders[m[0]]}".strip(), m)
            for label, m in out]


def _name_flags(args):
    """{flag: value} naming a run as its folder does; for an args.json without "changed_from_preset" (an earlier
    release), every flag that can change the result."""
    changed = args.get("changed_from_preset")
    changed = sorted(changed) if isinstance(changed, dict) else sorted(k for k in args if k not in RUNTIME_FLAGS)
    keys = [k for k in NAME_FLAGS if args.get(k) is not None] + [k for k in changed if k not in NAME_FLAGS]
    return {k: args.get(k) for k in keys if k != "changed_from_preset"}


def _flag(key, value):
    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {describe(value)}"


def _percent(value):
    return None if value is None else round(100 * value, 2)


# ----------------------------------------------------------------------------- drawing
def _draw(runs, groups, path, overlay):
    """Six panels of `series` (PANELS) for one run (overlay False: a colour per curve, the loss with its parts and
    each iteration) or several (overlay True: a colour per group of runs, a line style per curve; the seeds of a
    group as their `spread`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 8.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    legend_rows = -(-len(groups) // 3) if overlay else 0      # a fixed layout: a computed one doubles the time
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.09, top=0.92 - 0.035 * legend_rows, wspace=0.17,
                        hspace=0.42)
    styles = [{} for _ in axes]            # overlay: per panel, curve name -> (index of STYLES and MARKERS, marked)
    points = [0 for _ in axes]
    for g, (_, members) in enumerate(groups):
        colour = f"C{g}"
        for p, (ax, curves) in enumerate(zip(axes, _group_curves([runs[i]["series"] for i in members], overlay))):
            for c, (name, xys, extra) in enumerate(curves):
                if overlay:    # a curve seen at one epoch only is a point: its marker tells it apart too
                    style, marked = styles[p].setdefault(name, (len(styles[p]) % len(STYLES), "marker" in extra))
                    kw = {"color": colour, "ls": STYLES[style], "lw": 1.2} | extra | (
                        {"marker": MARKERS[style]} if marked else {})
                else:
                    kw = {"color": f"C{c}", "label": name, "lw": 1.2} | extra
                x, mean, low, high = spread(xys)
                ax.plot(x, mean, **kw)
                if len(xys) > 1:
                    ax.fill_between(x, low, high, color=kw["color"], alpha=0.15, lw=0,
                                    step="mid" if kw.get("ds") == "steps-mid" else None)
                points[p] += len(x)
            marks = colour if overlay else "0.35"
            for e in {runs[i]["series"]["stage_two"] for i in members} - {None}:
                ax.axvline(e - 0.5, color=marks, lw=1, alpha=0.7)
            for e in {e for i in members for e in runs[i]["series"]["lr_drops"]}:
                ax.axvline(e - 0.5, color=marks, lw=1, ls=":", alpha=0.9)
    last = max(max([int(r["args"].get("epochs") or 0)] + [e + 1 for e in r["series"]["epochs"]]) for r in runs)
    first = -1 if any(x and x[0] == -1 for r in runs for x, _ in r["series"]["test"]["mAP"].values()) else 0
    for p, (ax, title) in enumerate(zip(axes, PANELS)):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.set_xlim(first - 0.6, last - 0.4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if not points[p]:
            empty = "none recorded (stage two, ground truth on disk)" if p == DIAGNOSTICS else "nothing recorded"
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="0.5", fontsize=9)
        elif overlay and len(styles[p]) > 1:
            ax.legend([Line2D([], [], color="0.2", ls=STYLES[st], marker=MARKERS[st] if marked else None, ms=3)
                       for st, marked in styles[p].values()], list(styles[p]), fontsize=7)
        elif not overlay and len(ax.get_legend_handles_labels()[1]) > 1:
            ax.legend(fontsize=7)
    axes[LR].set_yscale("log")
    if overlay:
        handles = [Line2D([], [], color=f"C{g}", lw=2) for g in range(len(groups))]
        fig.legend(handles, [label for label, _ in groups], loc="upper center", bbox_to_anchor=(0.5, 0.995),
                   fontsize=9, ncols=min(3, len(groups)), title=f"{len(runs)} runs on {runs[0]['args'].get('dataset')}")
    else:
        a = runs[0]["args"]
        done = len(runs[0]["series"]["epochs"])
        fig.suptitle(f"{runs[0]['folder']}: {a.get('method')} on {a.get('dataset')}, {done} of {a.get('epochs')} "
                     f"epochs", fontsize=12, y=0.985)
    seeds = any(len(members) > 1 for _, members in groups)
    fig.text(0.5, 0.008, NOTE + (" " + SEEDS_NOTE if seeds else ""), ha="center", va="bottom", fontsize=8, color="0.3")
    tmp = f"{path}.tmp{os.path.splitext(path)[1]}"
    fig.savefig(tmp)
    os.replace(tmp, path)


def _group_curves(runs_series, overlay):
    """Per panel, [(name, [(x, y) of each run that has it], plot keywords)] of runs drawn as one entry."""
    merged = [{} for _ in PANELS]
    for s in runs_series:
        for p, curves in enumerate(_panel_curves(s, overlay)):
            for name, xy, extra in curves:
                merged[p].setdefault(name, (extra, []))[1].append(xy)
    return [[(name, xys, extra) for name, (extra, xys) in panel.items()] for panel in merged]


def _panel_curves(s, overlay):
    """Per panel, [(name, (x, y), plot keywords)] of one run's series; an overlay keeps the curves runs share."""
    marker = {"marker": "o", "ms": 3}
    test = [[(SETTINGS.get(k, k), xy, marker) for k, xy in s["test"][m].items()] for m in ("mAP", "R1")]
    loss = [("loss" if overlay else "loss (epoch mean)", s["loss"]["loss"], {})] if "loss" in s["loss"] else []
    clusters = list(s["clusters"].items())
    diagnostics = [(k, xy) for k, xy in s["diagnostics"].items()
                   if not overlay or not k.startswith(("OT on", "plain"))]
    if not overlay:
        loss += [(k, xy, {}) for k, xy in s["loss"].items() if k != "loss"]
        if s["loss_iterations"][0]:
            loss.append(("per iteration", s["loss_iterations"], {"color": "0.75", "lw": 0.5, "zorder": 0}))
    else:
        clusters = [(k, xy) for k, xy in clusters if k != "global, holding both modalities"]
    return [*test, loss, [(k, xy, marker) for k, xy in clusters], [(k, xy, marker) for k, xy in diagnostics],
            [("lr", s["lr"], {"ds": "steps-mid"})]]         # an lr holds for its whole epoch
