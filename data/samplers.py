"""Batch samplers driven by pseudo-label arrays and an own np.random.Generator.

MULT (He et al., IJCV 2024), docs/mult.md §1.5, Eq. (1.6): stage one draws `clusters` visible and,
independently, `clusters` infrared clusters per batch; stage two draws clusters/2 visible-space
and clusters/2 infrared-space clusters, each contributing `instances` (visible, infrared) pairs.
MBMIL (Wang et al., AAAI 2026), docs/mbmil.md §A.4: its per-modality PK batches (P clusters x
K instances, drawn independently per modality, camera-free) are `stage_one_batches`' draw; its subset
rule (§A.2), which visible rows each step clusters, is `visible_split`.

Only pseudo-labels enter here, never ground-truth ids; `rng` is required (no global RNG).
A whole epoch is built at once; each function returns int64 row indices [num_batches, B, 2]
(column 0 a visible row, column 1 an infrared row).
Label -1 (a DBSCAN outlier) is never drawn.
Instances of a cluster with more than `instances` members are drawn without replacement, of a
smaller cluster with replacement (the official rule).

Fewer clusters than asked: every batch then uses all eligible clusters, so B shrinks; the
official sampler would crash. No eligible cluster at all raises ValueError.
Paper vs official code: the official sampler draws from NumPy's global RNG with a Python loop
per sample; here one generator drives a vectorised draw, so the streams (not the
distributions) differ.
"""
import numbers

import numpy as np


def stage_one_batches(labels_v, labels_r, num_batches, clusters=12, instances=12, rng=None):
    """MULT stage one (docs/mult.md §1.5): unrelated per-modality cluster batches.

    labels_v: int [N_v] DBSCAN labels of the visible rows (-1 = outlier, never drawn)
    labels_r: int [N_r] DBSCAN labels of the infrared rows
    Per batch: `clusters` distinct visible clusters and, independently, `clusters` distinct
    infrared clusters, `instances` images of each. Pair j of a batch couples the j-th visible and
    the j-th infrared draw, which are unrelated.
    With fewer non-empty clusters in either modality, both halves use c = min(clusters, K_v', K_r')
    clusters per batch so that they still pair up.
    Returns int64 [num_batches, B, 2], B = c * instances. MBMIL's PK batches (docs/mbmil.md §A.4)
    are the same draw, P = clusters, K = instances.
    """
    _check_rng(rng)
    num_batches = _check_count(num_batches, "num_batches")
    clusters = _check_count(clusters, "clusters")
    instances = _check_count(instances, "instances")
    vis = _Members(_check_labels(labels_v, "labels_v"))
    ir = _Members(_check_labels(labels_r, "labels_r"))
    if vis.clusters.size == 0:
        raise _no_cluster("stage_one_batches", "labels_v (visible)")
    if ir.clusters.size == 0:
        raise _no_cluster("stage_one_batches", "labels_r (infrared)")
    c = min(clusters, vis.clusters.size, ir.clusters.size)
    rows_vis = vis.draw(_choose(vis.clusters, num_batches, c, rng), instances, rng)  # [nb, B]
    rows_ir = ir.draw(_choose(ir.clusters, num_batches, c, rng), instances, rng)     # [nb, B]
    return np.stack([rows_vis, rows_ir], axis=2)


def stage_two_batches(h_vv, h_rv, h_vr, h_rr, num_batches, clusters=12, instances=12, rng=None):
    """MULT stage two (docs/mult.md §1.5, Eq. (1.6)): cluster-paired cross-modality batches.

    h_vv: int [N_v] labels of the visible rows in visible space
    h_rv: int [N_r] labels of the infrared rows in visible space
    h_vr: int [N_v] labels of the visible rows in infrared space
    h_rr: int [N_r] labels of the infrared rows in infrared space
    E_v = clusters present in both h_vv and h_rv; E_r = clusters present in both h_rr and h_vr.
    Per batch: clusters/2 distinct ids c from E_v, then clusters/2 distinct ids c' from E_r.
    Positions 0 .. (clusters/2) * instances - 1 are visible-anchored: per c, `instances` visible
    rows with h_vv = c paired with `instances` infrared rows with h_rv = c. The rest are
    infrared-anchored: per c', visible rows with h_vr = c' and infrared rows with h_rr = c'.
    If E_v or E_r is smaller than clusters/2, all of it is used in every batch.
    Returns int64 [num_batches, B, 2], B = (c_v + c_r) * instances.
    """
    _check_rng(rng)
    num_batches = _check_count(num_batches, "num_batches")
    clusters = _check_count(clusters, "clusters", minimum=2)
    if clusters % 2:
        raise ValueError(f"clusters must be even in stage two (half visible-anchored, half "
                         f"infrared-anchored), got {clusters}")
    instances = _check_count(instances, "instances")
    h_vv, h_rv = _check_labels(h_vv, "h_vv"), _check_labels(h_rv, "h_rv")
    h_vr, h_rr = _check_labels(h_vr, "h_vr"), _check_labels(h_rr, "h_rr")
    if h_vv.size != h_vr.size or h_rv.size != h_rr.size:
        raise ValueError(f"h_vv and h_vr label the N_v visible rows and h_rv and h_rr the N_r "
                         f"infrared rows; got lengths h_vv {h_vv.size}, h_vr {h_vr.size}, "
                         f"h_rv {h_rv.size}, h_rr {h_rr.size}")
    vv, rv, vr, rr = _Members(h_vv), _Members(h_rv), _Members(h_vr), _Members(h_rr)
    e_v = np.intersect1d(vv.clusters, rv.clusters)   # sorted, [|E_v|]
    e_r = np.intersect1d(rr.clusters, vr.clusters)
    if e_v.size == 0:
        raise _no_cluster("stage_two_batches", "E_v (visible clusters with both visible and "
                          "infrared members, h_vv and h_rv)")
    if e_r.size == 0:
        raise _no_cluster("stage_two_batches", "E_r (infrared clusters with both infrared and "
                          "visible members, h_rr and h_vr)")
    half = clusters // 2
    chosen_v = _choose(e_v, num_batches, min(half, e_v.size), rng)   # [nb, c_v]
    chosen_r = _choose(e_r, num_batches, min(half, e_r.size), rng)   # [nb, c_r]
    rows_vis = np.concatenate([vv.draw(chosen_v, instances, rng),
                               vr.draw(chosen_r, instances, rng)], axis=1)   # [nb, B]
    rows_ir = np.concatenate([rv.draw(chosen_v, instances, rng),
                              rr.draw(chosen_r, instances, rng)], axis=1)    # [nb, B]
    return np.stack([rows_vis, rows_ir], axis=2)


def visible_split(n_v, ratio, rng):
    """The subset rule (§A.2): the visible set split at random each epoch, one part for the intra step, the
    complement for the global step; ratio 1.0 gives every visible image to both. -> (intra rows, global rows)."""
    if ratio >= 1.0:
        return np.arange(n_v), np.arange(n_v)
    perm = rng.permutation(n_v)
    cut = int(round(ratio * n_v))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


class _Members:
    """Rows grouped by cluster: `rows[start[k]:start[k] + count[k]]` are the rows of cluster k."""

    def __init__(self, labels):
        valid = np.flatnonzero(labels >= 0)
        self.rows = valid[np.argsort(labels[valid], kind="stable")]        # [N'] grouped by label
        self.count = np.bincount(labels[valid], minlength=int(labels.max(initial=-1)) + 1)  # [K]
        self.start = np.cumsum(self.count) - self.count                        # [K]
        self.clusters = np.flatnonzero(self.count)                             # non-empty ids

    def draw(self, chosen, instances, rng):
        """`instances` rows of each cluster in `chosen` [nb, c] -> rows [nb, c * instances].

        Cluster of n members: n > instances -> a uniform random subset without replacement (in
        random order); n <= instances -> `instances` uniform draws with replacement.
        """
        nb, c = chosen.shape
        flat = chosen.reshape(-1)                                    # [M], M = nb * c
        n = self.count[flat]                                         # [M]
        offset = np.empty((flat.size, instances), dtype=np.int64)   # position inside the cluster
        small = n <= instances
        offset[small] = rng.integers(0, n[small, None], size=(int(small.sum()), instances))
        big = np.flatnonzero(~small)
        if big.size:
            # without replacement, all big clusters at once: one random key per member, sort
            # by (cluster slot, key), keep the first `instances` of every slot
            size = n[big]                                             # [M']
            first = np.cumsum(size) - size                            # [M'] slot start in `order`
            slot = np.repeat(np.arange(big.size), size)               # [T], T = sum(size)
            order = np.lexsort((rng.random(slot.size), slot))         # [T]
            take = first[:, None] + np.arange(instances)              # [M', instances]
            offset[big] = order[take] - first[:, None]
        rows = self.rows[self.start[flat][:, None] + offset]         # [M, instances]
        return rows.reshape(nb, c * instances)


def _choose(clusters, num_batches, c, rng):
    """Per batch, c distinct ids from `clusters` in random order: [num_batches, c]."""
    keys = rng.random((num_batches, clusters.size))
    return clusters[np.argsort(keys, axis=1)[:, :c]]


# ----------------------------------------------------------------------------- input checks
def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); "
                        f"it is required, got {type(rng).__name__}")


def _check_count(value, name, minimum=1):
    if not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_labels(labels, name):
    """1-D int64 copy of `labels` (NumPy array, list, or torch tensor on any device), >= -1."""
    if hasattr(labels, "detach"):   # a torch tensor, possibly on the GPU
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{name} must be a 1-D integer array of cluster labels (-1 = outlier), "
                         f"got dtype {arr.dtype} and shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < -1:
        raise ValueError(f"{name} has label {arr.min()}; labels must be -1 (outlier) or >= 0")
    return arr


def _no_cluster(name, what):
    return ValueError(f"{name}: {what} has no eligible cluster (every label is -1 or the array "
                      f"is empty): DBSCAN found no cluster, so there is nothing to train on; "
                      f"check the features and the clustering eps")
