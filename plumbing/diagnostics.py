"""Pseudo-label diagnostics: how good the clusters and the cross-modality labels are, against ground truth.

Ground-truth identities never reach a loss or a sampler; when a dataset has them on disk (all of them do),
train.py logs these figures every epoch so that a researcher can see what the unsupervised method got right.
Every figure is exact and computed from contingency counts in O(N), no pair loop:
- `pair_precision_recall`: clusters of one modality against identities, over pairs of samples;
- `cross_label_accuracy`: the share of samples whose cross-modality label (MULT's label transfer,
  docs/mult.md §5.5) names a cluster of the other modality whose majority identity is their own;
- `global_cluster_stats`: MBMIL's global clusters (docs/mbmil.md §A.2): how many hold both modalities, and
  the precision of the cross-modality pairs they imply.
`mult_epoch` and `mbmil_epoch` compute and log them for one epoch of train.py, apart from the method's own lines.
Checked against slow references in tests/test_evaluate.py and tests/test_mbmil.py.
"""
import logging

import numpy as np
import torch

import clustering
import mult
from data.common import IR, VIS

log = logging.getLogger(__name__)


def pair_precision_recall(labels, pids):
    """Pseudo-label quality against ground truth (diagnostics only): over unordered pairs of
    samples, precision = same cluster and same id / same cluster, recall = same cluster and same
    id / same id. labels int [N] (-1 = outlier, in no pair), pids [N] -> (precision, recall);
    nan where a denominator is 0. Exact, from the cluster x identity contingency counts."""
    labels, pids = np.asarray(labels), np.asarray(pids)
    if labels.shape != pids.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and pids {pids.shape}: expected equal 1-D shapes")
    pairs = lambda counts: float((counts * (counts - 1) // 2).sum())   # noqa: E731
    clustered = labels >= 0
    _, joint = np.unique(np.stack([labels[clustered], pids[clustered]]), axis=1, return_counts=True)
    both = pairs(joint)
    same_cluster = pairs(np.unique(labels[clustered], return_counts=True)[1])
    same_id = pairs(np.unique(pids, return_counts=True)[1])
    return (both / same_cluster if same_cluster else float("nan"),
            both / same_id if same_id else float("nan"))


def cross_label_accuracy(cross, pids, labels_other, pids_other):
    """Share of samples whose cross-modality label names a cluster of their own identity
    (diagnostics only). cross int [N] in 0..K-1 (or -1: not counted), pids [N]; the K clusters
    of the other modality, labels_other int [M] (-1 = outlier), are named by the majority
    ground-truth id of their members pids_other [M] (ties: the smallest id)."""
    cross, pids = np.asarray(cross), np.asarray(pids)
    labels_other, pids_other = np.asarray(labels_other), np.asarray(pids_other)
    num_k = int(labels_other.max()) + 1 if labels_other.size else 0
    if cross.shape != pids.shape or labels_other.shape != pids_other.shape or cross.max(initial=-1) >= num_k:
        raise ValueError(f"cross_label_accuracy: cross {cross.shape} must match pids {pids.shape} and "
                         f"lie in -1..{num_k - 1}; labels_other {labels_other.shape} must match "
                         f"pids_other {pids_other.shape}")
    ids, code = np.unique(pids_other, return_inverse=True)
    member = labels_other >= 0
    counts = np.bincount(labels_other[member] * len(ids) + code[member],
                         minlength=num_k * len(ids)).reshape(num_k, len(ids))   # [K, U]
    name, named = ids[counts.argmax(1)], counts.sum(1) > 0
    used = cross >= 0
    if not used.any():
        return float("nan")
    return float((named[cross[used]] & (name[cross[used]] == pids[used])).mean())


def global_cluster_stats(labels, modality, gt):
    """Clusters holding both modalities, and the precision of the cross-modality pairs they imply.
    labels int [N] (-1 = outlier), modality [N] of VIS / IR, gt [N] identities -> dict."""
    keep = labels >= 0
    lab, mod, ids = labels[keep], modality[keep], gt[keep]
    k = int(labels.max()) + 1
    if k == 0:
        return {"clusters": 0, "mixed": 0, "cross_pair_precision": 0.0, "cross_pairs": 0}
    n_vis = np.bincount(lab[mod == VIS], minlength=k)                   # [K]
    n_ir = np.bincount(lab[mod == IR], minlength=k)
    # Cross pairs (vis, ir) in one cluster, and those of one identity, from contingency counts: O(N).
    _, inv = np.unique(np.stack([lab, ids]), axis=1, return_inverse=True)
    per_id_vis = np.bincount(inv.ravel()[mod == VIS], minlength=inv.max() + 1)
    per_id_ir = np.bincount(inv.ravel()[mod == IR], minlength=inv.max() + 1)
    pairs = int(n_vis @ n_ir)
    correct = int(per_id_vis @ per_id_ir)
    return {"clusters": k, "mixed": int(np.sum((n_vis > 0) & (n_ir > 0))),
            "cross_pair_precision": correct / pairs if pairs else 0.0, "cross_pairs": pairs}


# ----------------------------------------------------------------------------- an epoch's pseudo-labels
def mult_epoch(pseudo, feats_v, feats_r, vis, ir, args):
    """The ground-truth figures of one MULT epoch's pseudo-labels (train.mult_pseudo_labels' `pseudo`), logged in
    one line and returned as epoch-record entries: each modality's cluster pair precision and recall; in stage two
    the cross-label accuracy of both directions and, with --diagnostics, OT's on the same features."""
    clusters = pseudo["clusters"]
    parts = [_pairs("vis", clusters["vis"], vis.pids), _pairs("ir", clusters["ir"], ir.pids)]
    record = {}
    if "hard" in pseudo:
        hard = pseudo["hard"]
        record["cross_accuracy"] = _cross(hard["vis_to_ir"], hard["ir_to_vis"], clusters, vis, ir)
        acc = record["cross_accuracy"]
        parts.append(f"cross-label accuracy ({args.association}) vis->ir {100 * acc['vis']:.1f}% "
                     f"ir->vis {100 * acc['ir']:.1f}%")
        if args.diagnostics and args.association == "mult":   # the plain OT baseline on the same features
            ot = mult.associate("ot", feats_v, feats_r, clusters["vis"], clusters["ir"],
                                sinkhorn_lambda=args.sinkhorn_lambda)
            record["cross_accuracy_ot"] = _cross(ot.cross_v, ot.cross_r, clusters, vis, ir)
            acc = record["cross_accuracy_ot"]
            parts[-1] += f" (OT on the same features: {100 * acc['vis']:.1f}% / {100 * acc['ir']:.1f}%)"
    log.info("ground truth (diagnostics only): " + "; ".join(parts))
    return record


def mbmil_epoch(pseudo, feats_v, feats_r, vis, ir, args):
    """The ground-truth figures of one MBMIL epoch's pseudo-labels (train.mbmil_pseudo_labels' `pseudo`), logged
    and returned as epoch-record entries: the pair precision and recall of the intra step's clusters; in stage two
    how many global clusters hold both modalities and the precision of the cross-modality pairs they imply and,
    with --diagnostics, the same of the plain Jaccard distance's clusters of the same features."""
    intra = pseudo["intra_rows"]
    parts = [_pairs("vis (intra subset)", pseudo["clusters"]["vis"][intra], vis.pids[intra]),
             _pairs("ir", pseudo["clusters"]["ir"], ir.pids)]
    record = {}
    if "global" in pseudo:
        rows, labels, modality = pseudo["global_rows"], pseudo["global"]["labels"], pseudo["global"]["modality"]
        gt = np.r_[vis.pids[rows], ir.pids]
        record["global"] = global_cluster_stats(labels, modality, gt)
        parts.append(_pairs("global", labels, gt))
        if args.diagnostics:
            feats = torch.cat([feats_v[torch.as_tensor(rows, device=feats_v.device)], feats_r])
            plain = clustering.dbscan(clustering.jaccard_similarity(feats, args.global_k1, args.global_k2),
                                      args.global_eps, args.min_samples)
            record["global_plain"] = global_cluster_stats(plain, modality, gt)
        parts.append(describe_global(record))
    log.info("ground truth (diagnostics only): " + "; ".join(parts))
    return record


def describe_global(record):
    """MBMIL's global clusters of an epoch record, and the plain Jaccard's when it has them."""
    g = record["global"]
    msg = (f"modality-aware Jaccard: {g['clusters']} global clusters, {g['mixed']} with both modalities, "
           f"cross-modality pair precision {100 * g['cross_pair_precision']:.1f}% of {g['cross_pairs']} pairs")
    if "global_plain" in record:
        p = record["global_plain"]
        msg += (f" | plain Jaccard: {p['clusters']} clusters, {p['mixed']} with both modalities, "
                f"precision {100 * p['cross_pair_precision']:.1f}% of {p['cross_pairs']} pairs")
    return msg


def _pairs(name, labels, pids):
    precision, recall = pair_precision_recall(labels, pids)
    return f"{name} pair precision {100 * precision:.1f}% recall {100 * recall:.1f}%"


def _cross(cross_v, cross_r, clusters, vis, ir):
    """cross_label_accuracy of both directions: {"vis": vis->ir, "ir": ir->vis}."""
    return {"vis": cross_label_accuracy(cross_v, vis.pids, clusters["ir"], ir.pids),
            "ir": cross_label_accuracy(cross_r, ir.pids, clusters["vis"], vis.pids)}
