"""clustering.py against slow dense references written here (docs/mult.md §4.1-4.2, docs/mbmil.md §A.2)."""
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import clustering
from clustering import cluster_centers, dbscan, jaccard_similarity


# ----------------------------------------------------------------------------------------------- data
def make_features(n, d=32, clusters=0, dup=0, seed=0, noise=0.35):
    """Unit rows rounded to multiples of 2**-11: every dot product is exact in float32 in any summation
    order, so the kNN rankings of the code and of the float64 reference agree bit for bit (ties included)."""
    rng = np.random.default_rng(seed)
    if clusters:
        centers = rng.normal(size=(clusters, d))
        x = centers[rng.integers(clusters, size=n)] + noise * np.sqrt(2) * rng.normal(size=(n, d)) / 2
    else:
        x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = np.round(x * 2**11) / 2**11
    if dup:                                       # exact duplicates: exact distance ties
        x[rng.choice(n, dup, replace=False)] = x[rng.choice(n, dup, replace=False)]
    return torch.tensor(x, dtype=torch.float32)


def sign_features(n, d=16, seed=0):
    """Rows of +-1/4 (norm exactly 1): few distinct distances, so ties everywhere."""
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.choice([-0.25, 0.25], size=(n, d)), dtype=torch.float32)


# ------------------------------------------------------------------------------ dense reference (§4.1)
def reference_jaccard(x, k1, k2, modality=None):
    """d_J as a dense N x N float64 array, straight from docs/mult.md §4.1 / docs/mbmil.md §A.2."""
    x = x.numpy().astype(np.float64)
    n = len(x)
    sim = x @ x.T
    dist = 2 - 2 * sim

    def ranked(i, cand):                          # self first, then similarity desc, index asc
        return sorted(cand, key=lambda j: (j != i, -sim[i, j], j))

    if modality is None:
        lists = [ranked(i, range(n))[:k1] for i in range(n)]
        qe = [[(j, 1 / k2) for j in lists[i][:k2]] for i in range(n)]
    else:
        vis = [j for j in range(n) if modality[j] == 0]
        ir = [j for j in range(n) if modality[j] == 1]
        lv, li = [ranked(i, vis) for i in range(n)], [ranked(i, ir) for i in range(n)]
        lists = [ranked(i, lv[i][:k1 // 2] + li[i][:k1 // 2]) for i in range(n)]
        qe = [[(j, 0.5 / k2) for j in lv[i][:k2] + li[i][:k2]] for i in range(n)]

    def recip(i, m):
        return [j for j in lists[i][:m] if i in lists[j][:m]]

    half = int(np.round(k1 / 2)) + 1
    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        e = list(r)
        for c in r:
            rc = recip(c, half)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                e += rc
        e = np.unique(e)
        w = np.exp(-dist[i, e])
        v[i, e] = w / w.sum()
    vt = np.zeros((n, n))
    for i in range(n):
        for j, w in qe[i]:
            vt[i] += w * v[j]
    s = np.array([[np.minimum(vt[i], vt[j]).sum() for j in range(n)] for i in range(n)])
    return np.maximum(1 - s / (2 - s), 0)


def check_against_reference(x, k1, k2, modality=None):
    s = jaccard_similarity(x, k1, k2, modality)
    d_ref = reference_jaccard(x, k1, k2, modality)
    assert isinstance(s, sp.csr_matrix) and s.has_sorted_indices and s.shape == (len(x), len(x))
    dense = s.toarray()
    np.testing.assert_allclose(dense, 1 - d_ref, atol=1e-5, rtol=0)
    stored = np.zeros(dense.shape, bool)
    stored[np.repeat(np.arange(len(x)), np.diff(s.indptr)), s.indices] = True
    assert np.array_equal(stored, d_ref < 1)      # stored exactly where d_J < 1
    assert (s != s.T).nnz == 0 and np.all(s.diagonal() == 1)
    return s


# ------------------------------------------------------------------------------------ Jaccard tests
@pytest.mark.parametrize("n,k1,k2,clusters,dup", [
    (40, 4, 1, 0, 0), (40, 5, 2, 4, 3), (40, 6, 2, 0, 4), (120, 10, 6, 8, 0),
    (120, 20, 6, 0, 5), (120, 30, 6, 6, 6), (300, 30, 6, 15, 10), (300, 20, 2, 0, 0)])
def test_standard_matches_dense_reference(n, k1, k2, clusters, dup):
    check_against_reference(make_features(n, clusters=clusters, dup=dup, seed=n + k1), k1, k2)


@pytest.mark.parametrize("n,k1,k2,clusters", [(40, 4, 1, 0), (60, 6, 2, 5), (120, 10, 6, 8),
                                              (120, 20, 6, 0), (300, 30, 6, 15)])
def test_modality_aware_matches_dense_reference(n, k1, k2, clusters):
    x = make_features(n, clusters=clusters, dup=3, seed=7 * n + k1)
    rng = np.random.default_rng(n)
    modality = (rng.random(n) < 0.4).astype(np.int64)    # mixed order, unequal sizes
    if clusters:                                          # a modality offset, as between vis and ir
        offset = torch.tensor(rng.normal(size=x.shape[1]), dtype=torch.float32)
        x = torch.nn.functional.normalize(x + 0.5 * torch.as_tensor(modality)[:, None] * offset, dim=1)
        x = torch.round(x * 2**11) / 2**11
    check_against_reference(x, k1, k2, torch.as_tensor(modality))


@pytest.mark.parametrize("modality", [None, "mixed"])
def test_exact_ties_broken_by_smaller_index(modality):
    x = sign_features(80, seed=3)
    mod = None if modality is None else np.arange(80) % 3 == 0
    check_against_reference(x, 8, 3, None if mod is None else mod.astype(np.int64))


def test_hand_checked_two_groups():
    """Two far-apart groups of 4: supports never cross, so cross pairs have d_J = 1 (not stored)."""
    a = torch.tensor([[1.0, 0], [0.96, 0.28], [0.8, 0.6], [0.6, 0.8]])
    x = torch.zeros(8, 4)
    x[:4, :2], x[4:, 2:] = a, a
    s = jaccard_similarity(x, k1=4, k2=1)
    dense = s.toarray()
    assert np.all(dense[:4, 4:] == 0) and np.all(dense[4:, :4] == 0)
    assert np.allclose(dense[:4, :4], dense[4:, 4:])          # the two groups are copies
    assert np.all(dense[:4, :4] > 0) and np.all(dense.diagonal() == 1)


def test_permutation_equivariance():
    x = make_features(150, clusters=10, seed=5)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    s, sp_ = jaccard_similarity(x, 10, 3).toarray(), jaccard_similarity(x[perm], 10, 3).toarray()
    np.testing.assert_allclose(sp_, s[perm][:, perm], atol=1e-6)


def test_bad_inputs():
    x = make_features(50)
    bad = [({"features": x * 2}, "L2-normalised"), ({"features": x.clone().fill_(float("nan"))}, "NaN"),
           ({"features": x.numpy()}, "features"), ({"features": x[:10]}, "fewer than k1"),
           ({"k1": 1}, "k1"), ({"k2": 31}, "k2"), ({"k2": 0}, "k2"), ({"k1": 30.0}, "k1"),
           ({"modality": np.zeros(49, np.int64)}, "modality"), ({"modality": np.zeros(50, np.int64)}, "only"),
           ({"modality": np.full(50, 2)}, "modality"), ({"modality": np.arange(50) % 2, "k1": 11}, "even"),
           ({"modality": (np.arange(50) < 5).astype(int)}, "at least"),
           ({"modality": (np.arange(50) % 2).astype(float)}, "modality")]
    for kwargs, words in bad:
        args = {"features": x, "k1": 30, "k2": 6, **kwargs}
        with pytest.raises(ValueError, match=words):
            jaccard_similarity(**args)


def test_blocked_knn_with_small_blocks(monkeypatch):
    """Many blocks and chunks (tiny budgets) give the same result as one block; ties included."""
    x = torch.cat([make_features(150, d=16, clusters=8, dup=6, seed=11), sign_features(50, seed=1)])
    mod = np.arange(200) % 3 == 1
    for modality in (None, mod.astype(np.int64)):
        ref = jaccard_similarity(x, 20, 6, modality).toarray()
        monkeypatch.setattr(clustering, "BLOCK_BYTES", 4 * 256 * 256)
        monkeypatch.setattr(clustering, "CHUNK", 2000)
        monkeypatch.setattr(clustering, "BUFFER_BYTES", 8 * 200 * 7)
        np.testing.assert_allclose(jaccard_similarity(x, 20, 6, modality).toarray(), ref, atol=1e-6)
        monkeypatch.undo()


@pytest.mark.parametrize("features", ["quantised", "signs"])
def test_blocked_knn_against_brute_force(monkeypatch, features):
    """The kNN lists (several blocks, the strided top-k prefilter, tie recomputation) equal a full stable sort
    by (similarity desc, index asc) with self first, for one group and for two column groups."""
    x = make_features(1200, dup=20, seed=8) if features == "quantised" else sign_features(1200, seed=8)
    monkeypatch.setattr(clustering, "BLOCK_BYTES", 4 * 512 * 512)
    sim = (x.double() @ x.double().T).numpy()
    np.fill_diagonal(sim, np.inf)
    for bounds, k in [([(0, 1200)], 10), ([(0, 700), (700, 1200)], 7)]:
        lists = clustering._knn_blocked(x, bounds, [k] * len(bounds))
        for (s0, e0), (v, i) in zip(bounds, lists):
            ref = s0 + np.argsort(-sim[:, s0:e0], axis=1, kind="stable")[:, :k]
            assert np.array_equal(i.numpy(), ref)
            vals = np.take_along_axis(sim, ref, 1)
            assert np.array_equal(v.numpy()[np.isfinite(vals)], vals[np.isfinite(vals)].astype(np.float32))


def test_strided_topk_values():
    torch.manual_seed(0)
    sim = torch.randn(1024, 1536)                  # both lanes long enough for the strided prefilter
    for dim in (0, 1):
        v, pos = clustering._topk(sim, 20, dim)
        ref = (sim if dim == 1 else sim.T).topk(20, dim=1).values
        assert torch.equal(v, ref)
        assert torch.equal((sim if dim == 1 else sim.T).gather(1, pos), v)


def test_moderate_size_is_sparse_and_quick():
    """N = 3000, D = 64, 60 identities: the result stays sparse (no N x N anywhere) and takes seconds."""
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(60, 64), dim=1)
    x = centers[torch.randint(60, (3000,))] + 0.1 * torch.randn(3000, 64)
    x = torch.nn.functional.normalize(x, dim=1)
    t = time.perf_counter()
    s = jaccard_similarity(x, 30, 6)
    assert time.perf_counter() - t < 20
    assert 3000 * 10 < s.nnz < 0.05 * 3000**2
    labels = dbscan(s, 0.6)
    assert 50 <= labels.max() + 1 <= 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    x = make_features(400, clusters=20, dup=4, seed=2)
    mod = (np.arange(400) % 4 == 0).astype(np.int64)
    for modality in (None, mod):
        cpu = jaccard_similarity(x, 30, 6, modality).toarray()
        gpu = jaccard_similarity(x.cuda(), 30, 6, None if modality is None else torch.as_tensor(mod).cuda())
        np.testing.assert_allclose(gpu.toarray(), cpu, atol=1e-6)
        assert dbscan(gpu, 0.6).tolist() == dbscan(jaccard_similarity(x, 30, 6, modality), 0.6).tolist()


# ------------------------------------------------------------------------------------- DBSCAN tests
def reference_dbscan(s, eps, min_samples):
    """scikit-learn's algorithm step by step: neighbourhoods, core points, index-order scan, stack DFS."""
    n = s.shape[0]
    stored = s.toarray() != 0 if sp.issparse(s) else s != 0
    dist = np.where(stored, np.float32(1) - s.toarray().astype(np.float32), np.float32(1))
    neigh = [sorted(set(np.flatnonzero(dist[i] <= eps)) | {i}) for i in range(n)]
    core = [len(nb) >= min_samples for nb in neigh]
    labels, label = [-1] * n, 0
    for i in range(n):
        if labels[i] != -1 or not core[i]:
            continue
        stack = [i]
        while stack:
            p = stack.pop()
            if labels[p] != -1:
                continue
            labels[p] = label
            if core[p]:
                stack += [q for q in neigh[p] if labels[q] == -1]
        label += 1
    return np.array(labels)


def random_graph(n, radius, seed):
    """Similarities of random 2-D points: S = 1 - dist/radius for dist < radius (sparse, symmetric)."""
    rng = np.random.default_rng(seed)
    p = rng.random((n, 2))
    d = np.linalg.norm(p[:, None] - p[None], axis=2)
    s = np.where(d < radius, 1 - d / radius, 0).astype(np.float32)
    return sp.csr_matrix(s)


@pytest.mark.parametrize("seed", range(6))
def test_dbscan_matches_sklearn_algorithm(seed):
    s = random_graph(250, 0.12, seed)
    for eps, min_samples in [(0.3, 3), (0.5, 4), (0.7, 5), (0.2, 2), (0.6, 8), (0.45, 1)]:
        got = dbscan(s, eps, min_samples)
        assert got.dtype == np.int64
        assert np.array_equal(got, reference_dbscan(s, eps, min_samples)), (eps, min_samples)


def test_dbscan_on_jaccard_output():
    x = make_features(300, clusters=15, seed=4)
    s = jaccard_similarity(x, 20, 6)
    for eps in (0.3, 0.5, 0.6, 0.8):
        assert np.array_equal(dbscan(s, eps), reference_dbscan(s, eps, 4))


def test_dbscan_hand_checked():
    """Cliques {0..3} and {6..9} hold the core points (min_samples 4). 4 and 5 are border points of both
    (neighbours 3 and 6): both take cluster 0, the first to reach them. 10 is alone (0.2 is too far)."""
    n = 11
    s = sp.lil_matrix((n, n), dtype=np.float32)
    edges = [(a, b) for a in range(4) for b in range(a)] + [(a, b) for a in range(6, 10) for b in range(6, a)]
    for a, b in edges + [(3, 4), (4, 6), (3, 5), (5, 6)]:
        s[a, b] = s[b, a] = 0.9
    s[9, 10] = s[10, 9] = 0.2                   # distance 0.8 > eps: not a neighbour
    labels = dbscan(s.tocsr(), eps=0.5, min_samples=4)
    assert labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert dbscan(s.tocsr(), eps=0.05, min_samples=2).tolist() == [-1] * n     # no cluster: all outliers
    # eps is inclusive, computed as 1 - S in float32
    two = sp.csr_matrix(np.array([[1, 0.75], [0.75, 1]], np.float32))
    assert dbscan(two, 0.25, 2).tolist() == [0, 0] and dbscan(two, 0.2499, 2).tolist() == [-1, -1]


def test_dbscan_bad_inputs():
    s = random_graph(30, 0.3, 0)
    for kwargs, words in [({"eps": 0}, "eps"), ({"eps": 1}, "eps"), ({"eps": float("nan")}, "eps"),
                          ({"eps": True}, "eps"), ({"min_samples": 0}, "min_samples"),
                          ({"similarity": s.toarray()}, "scipy.sparse"),
                          ({"similarity": s[:, :20]}, "square"),
                          ({"similarity": sp.csr_matrix(np.triu(s.toarray()))}, "symmetric"),
                          ({"similarity": s * 2}, r"\[0, 1\]")]:
        args = {"similarity": s, "eps": 0.5, "min_samples": 4, **kwargs}
        with pytest.raises(ValueError, match=words):
            dbscan(**args)


# -------------------------------------------------------------------------------- centers tests
def test_cluster_centers():
    torch.manual_seed(0)
    x = torch.randn(7, 3)
    labels = np.array([1, 0, -1, 1, 2, 0, 1])
    c = cluster_centers(x, labels)
    ref = torch.stack([x[labels == k].mean(0) for k in range(3)])
    assert c.shape == (3, 3) and torch.allclose(c, ref, atol=1e-6)
    assert torch.allclose(cluster_centers(x, torch.as_tensor(labels)), ref, atol=1e-6)
    for bad, words in [(np.full(7, -1), "no clusters"), (np.array([0, 2, 2, 2, 0, 0, -1]), "label 1"),
                       (np.zeros(6, int), "labels"), (np.zeros(7), "labels"), (np.full(7, -2), ">= -1")]:
        with pytest.raises(ValueError, match=words):
            cluster_centers(x, bad)
