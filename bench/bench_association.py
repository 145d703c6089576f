"""Benchmark of the association step: where does MULT's label transfer beat cluster-level OT and PGM?

MULT (He et al., IJCV 2024) starts from the optimal-transport assignment of each sample to the other modality's
cluster centers and propagates labels over homogeneous (Jaccard) and heterogeneous (instance-level Sinkhorn)
affinities; its baselines are that OT assignment alone (`ot`) and a Hungarian matching of the cluster centers
(`pgm`). This bench scores the labels of each on generated features whose cross-modality structure is known and
set by knobs, through the call train.py makes: `mult.associate(method, feats_v, feats_r, labels_v, labels_r, sim_v,
sim_r, alpha, temp, sinkhorn_lambda)`.

Generated features (`generate`, a pure function of the seed; unit identity prototypes mu_i in R^D):
  visible  x = normalise(mu_i + camera * u_{v,i,c} + spread * n)
  infrared y = normalise(normalise(mu_i + shift * g + distortion * e_i) + camera * u_{r,i,c} + spread * n)
  g: one unit direction shared by all identities (the shared modality shift); e_i: a unit direction per identity
  (the identity-dependent distortion of its infrared prototype); u_{m,i,c}: a unit direction per (modality,
  identity, camera), c drawn uniformly from the modality's cameras (per-camera sub-clusters); n ~ N(0, I / D)
  (norm about 1: the spread within an identity). Images per identity and modality: per_id * (1 + imbalance * w),
  w uniform in [-1, 1], rounded, at least 1, drawn for every identity and modality.
Clusters: ground truth (labels = identities, the upper bound) or `clustering.jaccard_similarity` (k1, k2) +
`clustering.dbscan(eps)` per modality on the generated features, over a range of eps. MULT's affinities are the
same Jaccard similarities (`--affinity` replaces them for an ablation).

Metrics (ground truth is used here only to score):
  acc v->r, r->v: `diagnostics.cross_label_accuracy` (train.py's diagnostic): the share of samples whose
    cross-modality label names a cluster of the other modality whose majority identity is their own.
  mAP hard, soft: cross-modality retrieval by the pseudo labels. A visible query i ranks every infrared sample j
    by the score s_ij, relevant = same ground-truth identity; AP as usual, mAP = the mean over queries, and the
    table shows the mean of the two directions (visible queries over the infrared set, infrared queries over the
    visible set, JSON: both). Hard: s_ij = [cross_v_i == labels_r_j] (the pair is positive when the visible
    sample's infrared-space label is the infrared sample's own label; the other direction likewise in the
    visible space). Soft: s_ij = <Z^_vr_i, Y^_rr_j>, the beta-mixed soft labels train.py uses as CE targets
    (beta * onehot(h) + (1 - beta) * Y*; for OT and PGM one-hot, so soft = hard). Tied scores are ranked in
    expectation over a random order (McSherry & Najork, ECIR 2008), so a binary score gets no advantage from
    the order of the samples.
  features mAP: the same retrieval by the cosine similarity of the features themselves (no labels): how much
    cross-modality signal the features carry.
Every setting is run over --seeds seeds; a cell is the mean +- sample std over the seeds, and "mult - ot" the
mean +- std of the paired difference (same features and clusters) with the number of seeds where MULT is ahead.

    python bench/bench_association.py            # the tables: 7 settings x (gt + 3 eps) x 5 seeds, about 2 min
    python bench/bench_association.py --quick    # N about 900, 4 settings, 2 seeds: seconds
    python bench/bench_association.py --ablate   # MULT's ingredients (alpha, affinities, lambda, beta), about 3 min
    python bench/bench_association.py --quick --alpha 1.0 --affinity knn   # any variant for the whole table
"""
import argparse
import json
import os
import sys
import time


import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clustering  # noqa: E402
from plumbing import diagnostics  # noqa: E402
import mult  # noqa: E402

# The base setting: SYSU-like 2:1 visible:infrared images, 4 visible and 2 infrared cameras.
BASE = dict(ids=100, vis_per_id=12, ir_per_id=6, imbalance=0.5, cams_vis=4, cams_ir=2, dim=128,
            spread=0.6, camera=1.0, shift=0.5, distortion=1.5)
# Each setting changes one knob of BASE (the command line can change BASE itself).
SETTINGS = {
    "no gap": dict(shift=0.0, distortion=0.0),
    "shift only": dict(distortion=0.0),
    "base": dict(),
    "strong distortion": dict(distortion=3.0),
    "strong camera sub-clusters": dict(camera=1.5),
    "wide spread": dict(spread=1.2),
    "equal counts": dict(imbalance=0.0),
}
QUICK = dict(ids=50, seeds=2, settings=["no gap", "base", "strong distortion", "strong camera sub-clusters"],
             eps=[0.55])
EPS = [0.4, 0.55, 0.7]                                 # DBSCAN eps of the full run: split, about right, merged
ABLATION_SETTINGS = ["shift only", "base", "strong camera sub-clusters"]
# At alpha = 1 the propagation keeps Y0 and Z0 and only smooths them once with the homogeneous affinities: MULT
# without the heterogeneous (Sinkhorn plan) transfer. With "identity" affinities that smoothing does nothing.
ABLATIONS = (("as set", {}), ("alpha 0.1", dict(alpha=0.1)), ("alpha 0.5", dict(alpha=0.5)),
             ("alpha 1 (no heterogeneous transfer)", dict(alpha=1.0)), ("kNN affinities", dict(affinity="knn")),
             ("no homogeneous affinities", dict(affinity="identity")), ("lambda 10", dict(lam=10.0)),
             ("lambda 50", dict(lam=50.0)), ("beta 1 (hard labels only)", dict(beta=1.0)),
             ("beta 0 (Y* only)", dict(beta=0.0)))
METHODS = mult.ASSOCIATIONS                            # ("mult", "ot", "pgm")


def get_args_parser():
    p = argparse.ArgumentParser("bench_association", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help=f"small run: {QUICK}")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (5; --quick: 2)")
    p.add_argument("--seed0", type=int, default=0, help="first seed")
    p.add_argument("--settings", type=str, nargs="+", default=None, choices=list(SETTINGS),
                   help="settings to run (all; --quick: QUICK's; --ablate: ABLATION_SETTINGS)")
    p.add_argument("--eps", type=float, nargs="+", default=None,
                   help=f"DBSCAN eps values ({EPS}; --quick and --ablate: 0.55); ground-truth clusters are "
                        "always run too")
    p.add_argument("--k1", type=int, default=30, help="Jaccard k1 (30)")
    p.add_argument("--k2", type=int, default=6, help="Jaccard k2 (6)")
    p.add_argument("--min-samples", type=int, default=4, help="DBSCAN min_samples (4)")
    for name, value in BASE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                       help=f"base setting: {name} ({value})")
    p.add_argument("--alpha", type=float, default=0.2, help="MULT anchor weight alpha (0.2; 1.0 = no transfer)")
    p.add_argument("--temp", type=float, default=0.05, help="softmax temperature of Y0 (0.05)")
    p.add_argument("--lam", type=float, default=25.0, help="Sinkhorn lambda (25)")
    p.add_argument("--beta", type=float, default=0.7, help="hard/soft mix of the soft mAP's labels (0.7)")
    p.add_argument("--affinity", type=str, default="jaccard", choices=["jaccard", "knn", "identity"],
                   help="MULT's homogeneous affinities: the Jaccard similarities (default), plain kNN cosine "
                        "similarities over k1 neighbours, or none (identity)")
    p.add_argument("--ablate", action=argparse.BooleanOptionalAction, default=False,
                   help="MULT under each variant of ABLATIONS (alpha, affinities, lambda, beta) on "
                        "ABLATION_SETTINGS, against OT and PGM")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=str, default="", help="also write every per-seed result to this file")
    return p


# ----------------------------------------------------------------------------- generated features
def generate(seed, ids=100, vis_per_id=12, ir_per_id=6, imbalance=0.5, cams_vis=4, cams_ir=2, dim=128,
             spread=0.6, camera=1.0, shift=0.5, distortion=1.5):
    """Feature sets of both modalities, a pure function of the arguments (see the module docstring; the
    defaults are BASE).

    Returns dict: feat_v [N_v, D], feat_r [N_r, D] float32 torch, L2-normalised rows; pid_v [N_v], pid_r [N_r]
    identities 0..ids-1 (every identity in both modalities, samples sorted by identity); cam_v, cam_r cameras.
    The draws of fixed size come first, so the knobs other than ids, dim, cameras and counts scale the same
    random numbers (one seed, common random numbers across settings).
    """
    if not (ids >= 2 and dim >= 2 and cams_vis >= 1 and cams_ir >= 1 and vis_per_id >= 1 and ir_per_id >= 1
            and 0 <= imbalance < 1 and min(spread, camera, shift, distortion) >= 0):
        raise ValueError("generate: expected ids, dim >= 2, cameras and per_id >= 1, imbalance in [0, 1), "
                         "spread, camera, shift, distortion >= 0")
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)   # noqa: E731
    mu = unit(rng.standard_normal((ids, dim)))                       # [ids, D] identity prototypes
    g = unit(rng.standard_normal(dim))                               # [D] shared shift direction
    e = unit(rng.standard_normal((ids, dim)))                        # [ids, D] distortion directions
    u = {"v": unit(rng.standard_normal((ids, cams_vis, dim))),       # [ids, cams, D] camera directions
         "r": unit(rng.standard_normal((ids, cams_ir, dim)))}
    draw = rng.random((2, ids))                                      # [2, ids] count draws
    proto = {"v": mu, "r": unit(mu + shift * g + distortion * e)}
    out = {}
    for row, (m, per_id, cams) in enumerate((("v", vis_per_id, cams_vis), ("r", ir_per_id, cams_ir))):
        counts = np.maximum(1, np.rint(per_id * (1 + imbalance * (2 * draw[row] - 1)))).astype(np.int64)
        pid = np.repeat(np.arange(ids), counts)                      # [N]
        cam = rng.integers(0, cams, len(pid))                        # [N]
        noise = rng.standard_normal((len(pid), dim)) / np.sqrt(dim)  # [N, D], norm about 1
        x = unit(proto[m][pid] + camera * u[m][pid, cam] + spread * noise)
        out[f"feat_{m}"] = torch.from_numpy(x.astype(np.float32))
        out[f"pid_{m}"], out[f"cam_{m}"] = pid, cam
    return out


# ----------------------------------------------------------------------------- metrics
def _expected_precision(n_before, rel_before, m, k):
    """Mean precision at the relevant items of a tie group, in expectation over its random order.

    A group of m tied items holding k relevant ones follows n_before items with rel_before relevant. A relevant
    item at offset y in the group has, on average, y (k - 1) / (m - 1) relevant items before it inside the group,
    so E = (1/m) sum_{y<m} (rel_before + 1 + c y) / (n_before + 1 + y), c = (k - 1) / (m - 1), which is
    c + (rel_before + 1 - c (n_before + 1)) (H_{n_before + m} - H_{n_before}) / m with the harmonic numbers
    H_n = sum_{i<=n} 1/i. Integer arrays, any shape.
    """
    n_before, rel_before, m, k = (np.asarray(a, dtype=np.int64) for a in (n_before, rel_before, m, k))
    harmonic_numbers = np.r_[0.0, np.cumsum(1.0 / np.arange(1, int((n_before + m).max(initial=0)) + 1))]
    c = np.where(m > 1, (k - 1) / np.maximum(m - 1, 1), 0.0)
    harmonic = harmonic_numbers[n_before + m] - harmonic_numbers[n_before]
    return c + (rel_before + 1 - c * (n_before + 1)) * harmonic / np.maximum(m, 1)   # m = 0: empty, k = 0


def tie_map(scores, pid_q, pid_g, block=512):
    """mAP of ranking the gallery by descending scores [Q, G] (numpy), ties in expectation, relevant = same id.

    Sorted rows are cut into groups of equal scores; each group adds k * E (`_expected_precision`) to its row;
    AP = that sum / R, R = the relevant items of the row (queries with R = 0 are left out). Blocks of queries.
    """
    aps = []
    for q0 in range(0, len(pid_q), block):
        s = scores[q0:q0 + block]
        order = np.argsort(-s, axis=1, kind="stable")                # [B, G]
        s = np.take_along_axis(s, order, axis=1)
        rel = pid_g[order] == pid_q[q0:q0 + block, None]             # [B, G] bool
        start = np.ones_like(rel)
        start[:, 1:] = s[:, 1:] != s[:, :-1]                         # a tie group starts here
        rows, cols = np.nonzero(start)                               # group starts, row-major
        ends = np.append(cols[1:], 0)
        ends[np.append(rows[1:] != rows[:-1], True)] = s.shape[1]    # a row's last group ends at G
        rel_before = (np.cumsum(rel, axis=1) - rel)[rows, cols]
        in_group = np.add.reduceat(rel.ravel(), rows * s.shape[1] + cols)  # relevant items per group
        e = _expected_precision(cols, rel_before, ends - cols, in_group)
        total = np.bincount(rows, weights=in_group * e, minlength=len(s))
        num_rel = rel.sum(axis=1)
        aps.append(total[num_rel > 0] / num_rel[num_rel > 0])
    return float(np.concatenate(aps).mean())


def hard_map(cross, pid_q, labels_g, pid_g):
    """tie_map for the binary score [cross_i == labels_g_j], from contingency counts in O(N).

    cross [Q] pseudo labels of the queries in the gallery's label space, labels_g [G] the gallery's own labels
    (every label >= 0). Two tie groups per query: the m1 gallery items sharing its label (k1 of its identity),
    then the other G - m1.
    """
    ids, code_g = np.unique(pid_g, return_inverse=True)
    code_q = np.searchsorted(ids, pid_q)
    num_k = int(max(labels_g.max(), cross.max())) + 1
    joint = np.bincount(labels_g * len(ids) + code_g, minlength=num_k * len(ids)).reshape(num_k, len(ids))
    m1 = joint.sum(axis=1)[cross]                                    # [Q]
    k1 = joint[cross, code_q]                                        # [Q]
    num_rel = np.bincount(code_g, minlength=len(ids))[code_q]        # [Q]
    first = _expected_precision(0, 0, m1, k1)
    second = _expected_precision(m1, k1, len(pid_g) - m1, num_rel - k1)
    ap = (k1 * np.where(k1 > 0, first, 0) + (num_rel - k1) * np.where(num_rel > k1, second, 0)) / num_rel
    return float(ap.mean())


def label_metrics(lt, data, labels_v, labels_r, beta):
    """Accuracies and mAPs (see the module docstring) of one LabelTransfer -> dict of floats."""
    pv, pr = data["pid_v"], data["pid_r"]
    soft = lt.mixed(beta)
    s_vr = (soft.soft_cross_v @ soft.soft_r.t()).numpy()             # [N_v, N_r] visible queries
    s_rv = (soft.soft_cross_r @ soft.soft_v.t()).numpy()             # [N_r, N_v] infrared queries
    return {"acc_vr": diagnostics.cross_label_accuracy(lt.cross_v, pv, labels_r, pr),
            "acc_rv": diagnostics.cross_label_accuracy(lt.cross_r, pr, labels_v, pv),
            "map_hard_vr": hard_map(lt.cross_v, pv, lt.labels_r, pr),
            "map_hard_rv": hard_map(lt.cross_r, pr, lt.labels_v, pv),
            "map_soft_vr": tie_map(s_vr, pv, pr), "map_soft_rv": tie_map(s_rv, pr, pv)}


# ----------------------------------------------------------------------------- one setting
def knn_similarity(features, k):
    """Plain kNN similarities for the affinity ablation: S_ij = max(cos_ij, 0) for j among the k nearest of i
    (itself included) or i among j's, diagonal 1; scipy csr [N, N]. Dense cosines: bench sizes only."""
    cos = features @ features.t()                                    # [N, N]
    val, idx = cos.topk(min(k, len(cos)), dim=1)                     # [N, k], self first
    rows = np.repeat(np.arange(len(cos)), idx.shape[1])
    s = sp.csr_matrix((val.clamp(0, 1).numpy().ravel(), (rows, idx.numpy().ravel())), shape=cos.shape)
    s = s.maximum(s.T).tolil()
    s.setdiag(1.0)
    return s.tocsr()


def _affinities(data, sims, affinity, k1):
    """MULT's homogeneous similarities per modality: the Jaccard ones, plain kNN, or none (identity)."""
    if affinity == "jaccard":
        return sims
    if affinity == "knn":
        return {m: knn_similarity(data[f"feat_{m}"], k1) for m in "vr"}
    return {m: sp.identity(len(data[f"feat_{m}"]), format="csr", dtype=np.float32) for m in "vr"}


def run_setting(seed, knobs, args, variants=(("", {}),)):
    """All clusterings x variants of one generated set -> list of result dicts (one per clustering x variant).

    variants: (name, overrides of alpha / temp / lam / beta / affinity); the first runs every method, the
    others MULT only (the ablation), and OT too where they change lambda, which OT uses as well. Features,
    Jaccard similarities and clusters are shared by all of them.
    """
    data = generate(seed, **knobs)
    fv, fr = data["feat_v"], data["feat_r"]
    sims = {m: clustering.jaccard_similarity(data[f"feat_{m}"], args.k1, args.k2) for m in "vr"}
    feature_map = (tie_map((fv @ fr.t()).numpy(), data["pid_v"], data["pid_r"])
                   + tie_map((fr @ fv.t()).numpy(), data["pid_r"], data["pid_v"])) / 2
    params = [{k: over.get(k, getattr(args, k)) for k in ("alpha", "temp", "lam", "beta", "affinity")}
              for _, over in variants]
    affinities = {p["affinity"]: _affinities(data, sims, p["affinity"], args.k1) for p in params}
    results = []
    for eps in [None] + list(args.eps):
        if eps is None:
            lv, lr = data["pid_v"].copy(), data["pid_r"].copy()
        else:
            lv, lr = (clustering.dbscan(sims[m], eps, args.min_samples) for m in "vr")
        if lv.max() < 0 or lr.max() < 0:
            continue                                                 # DBSCAN found no cluster
        prec_v, rec_v = diagnostics.pair_precision_recall(lv, data["pid_v"])
        prec_r, rec_r = diagnostics.pair_precision_recall(lr, data["pid_r"])
        info = {"seed": seed, "clusters": "gt" if eps is None else f"eps {eps}", "K_v": int(lv.max()) + 1,
                "K_r": int(lr.max()) + 1, "outliers": float(np.mean(np.r_[lv, lr] < 0)),
                "prec_v": prec_v, "rec_v": rec_v, "prec_r": prec_r, "rec_r": rec_r, "feature_map": feature_map}
        for n, ((name, over), p) in enumerate(zip(variants, params)):
            aff = affinities[p["affinity"]]
            res = {**info, "variant": name}
            for method in METHODS if n == 0 else ("mult", "ot") if "lam" in over else ("mult",):
                lt = mult.associate(method, fv, fr, lv, lr, aff["v"], aff["r"], alpha=p["alpha"],
                                    temp=p["temp"], sinkhorn_lambda=p["lam"])
                res[method] = label_metrics(lt, data, lv, lr, p["beta"])
            results.append(res)
    return results


# ----------------------------------------------------------------------------- tables
def _cell(values, scale=100.0):
    v = scale * np.asarray(values, dtype=np.float64)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def _delta(a, b):
    """Paired difference a - b over seeds, in points: mean ± std (seeds where a > b / seeds)."""
    d = 100.0 * (np.asarray(a) - np.asarray(b))
    return f"{d.mean():+.1f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.1f} ({int((d > 0).sum())}/{len(d)})"


def _values(res, method, key):
    """Per-seed values of a metric; map_hard / map_soft are the mean of the two directions."""
    if key.startswith("map_"):
        return [(r[method][f"{key}_vr"] + r[method][f"{key}_rv"]) / 2 for r in res]
    return [r[method][key] for r in res]


def _table(head, lines):
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1)] + lines)


def format_tables(rows):
    """rows: (setting, clusters, [per-seed result dicts]) -> (label table, pair table), markdown."""
    head_a = ("| setting | clusters | K_v / K_r | pair P / R vis, ir | "
              + " | ".join(f"acc {d}: {m}" for d in ("v→r", "r→v") for m in METHODS)
              + " | mult − ot v→r | mult − ot r→v |")
    head_b = ("| setting | clusters | features mAP | "
              + " | ".join(f"mAP {k}: {m}" for k in ("hard", "soft") for m in METHODS)
              + " | mult − ot hard | mult − ot soft |")
    lines_a, lines_b = [], []
    for setting, clusters, res in rows:
        mean = lambda key: np.mean([r[key] for r in res])           # noqa: E731
        lines_a.append(
            f"| {setting} | {clusters} | {mean('K_v'):.0f} / {mean('K_r'):.0f} | "
            f"{100 * mean('prec_v'):.0f} / {100 * mean('rec_v'):.0f}, {100 * mean('prec_r'):.0f} / "
            f"{100 * mean('rec_r'):.0f} | "
            + " | ".join(_cell(_values(res, m, f"acc_{d}")) for d in ("vr", "rv") for m in METHODS)
            + "".join(f" | {_delta(_values(res, 'mult', k), _values(res, 'ot', k))}" for k in ("acc_vr", "acc_rv"))
            + " |")
        lines_b.append(
            f"| {setting} | {clusters} | {_cell([r['feature_map'] for r in res])} | "
            + " | ".join(_cell(_values(res, m, f"map_{k}")) for k in ("hard", "soft") for m in METHODS)
            + "".join(f" | {_delta(_values(res, 'mult', k), _values(res, 'ot', k))}" for k in ("map_hard", "map_soft"))
            + " |")
    return _table(head_a, lines_a), _table(head_b, lines_b)


def format_ablation(rows):
    """rows: (setting, clusters, variant, [per-seed results], [per-seed results of the first variant]) ->
    MULT's metrics under each variant, its paired difference to OT on the same clusters (OT at the variant's
    lambda where it changes lambda), and the baselines."""
    keys = ("acc_vr", "acc_rv", "map_hard", "map_soft")
    head = ("| setting | clusters | variant | acc v→r | acc r→v | mAP hard | mAP soft | "
            "− ot: acc v→r | acc r→v | mAP soft |")
    lines = []
    for setting, clusters, variant, res, ref in rows:
        if variant == rows[0][2]:
            for m in ("ot", "pgm"):
                lines.append(f"| {setting} | {clusters} | {m} | "
                             + " | ".join(_cell(_values(ref, m, k)) for k in keys) + " | | | |")
        ot = res if variant != rows[0][2] and "ot" in res[0] else ref
        if ot is res:
            lines.append(f"| {setting} | {clusters} | ot, {variant} | "
                         + " | ".join(_cell(_values(res, "ot", k)) for k in keys) + " | | | |")
        lines.append(f"| {setting} | {clusters} | mult, {variant} | "
                     + " | ".join(_cell(_values(res, "mult", k)) for k in keys) + " | "
                     + " | ".join(_delta(_values(res, "mult", k), _values(ot, "ot", k))
                                  for k in ("acc_vr", "acc_rv", "map_soft")) + " |")
    return _table(head, lines)


def resolve(args):
    """The run's arguments: --quick / --ablate presets where the command line gave no value (it wins), and
    the base setting -> (args, base) with args a new namespace."""
    args = argparse.Namespace(**vars(args))
    if args.seeds is None:
        args.seeds = QUICK["seeds"] if args.quick else 5
    if args.eps is None:
        args.eps = QUICK["eps"] if args.quick or args.ablate else EPS
    if args.settings is None:
        args.settings = ABLATION_SETTINGS if args.ablate else QUICK["settings"] if args.quick else list(SETTINGS)
    base = {**BASE, **({"ids": QUICK["ids"]} if args.quick else {}),
            **{k: getattr(args, k) for k in BASE if getattr(args, k) is not None}}
    return args, base


def main(args):
    t0 = time.perf_counter()
    args, base = resolve(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = args.settings
    variants = ABLATIONS if args.ablate else (("", {}),)
    print(f"bench_association: base {base}; settings {settings}; clusters gt + eps {args.eps} (k1 {args.k1}, "
          f"k2 {args.k2}, min_samples {args.min_samples}); seeds {args.seed0}..{args.seed0 + args.seeds - 1}; "
          f"alpha {args.alpha}, temp {args.temp}, lambda {args.lam}, beta {args.beta}, affinity {args.affinity}"
          f"{'; ablation' if args.ablate else ''}; threads {torch.get_num_threads()}, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}", flush=True)
    rows, dump = [], []
    for name in settings:
        t = time.perf_counter()
        results = [r for s in range(args.seed0, args.seed0 + args.seeds)
                   for r in run_setting(s, {**base, **SETTINGS[name]}, args, variants)]
        dump += [{"setting": name, **r} for r in results]
        for clusters in dict.fromkeys(r["clusters"] for r in results):
            pick = lambda v: [r for r in results if r["clusters"] == clusters and r["variant"] == v]  # noqa: E731
            rows += [(name, clusters, v, pick(v), pick(variants[0][0])) for v, _ in variants]
        print(f"  {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    if args.ablate:
        print("\nMULT under each variant against OT and PGM on the same clusters (%), mean ± std over seeds; "
              "− ot: paired, (seeds ahead / seeds)\n")
        print(format_ablation(rows))
    else:
        table_a, table_b = format_tables([(s, c, res) for s, c, _, res, _ in rows])
        print("\nCross-modality label accuracy (%), mean ± std over seeds; mult − ot: paired, "
              "(seeds ahead / seeds)\n")
        print(table_a)
        print("\nCross-modality mAP of the pseudo-label pairs (%), mean of both directions\n")
        print(table_b)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s wall, {time.process_time():.1f} s CPU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "base": base, "results": dump}, f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
