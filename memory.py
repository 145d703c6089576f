"""Cluster memories and contrastive losses of MULT and MBMIL.

MULT: He, Cheng, Wang, Gao, "Exploring Homogeneous and Heterogeneous Consistent Label Associations
for Unsupervised Visible-Infrared Person ReID", IJCV 2024 (arXiv 2402.00672); docs/mult.md §7: one
memory class (§7.1, Eqs. (7.1)-(7.2)), stage one (§7.2, Eq. (7.3)), the six stage-two banks
(§7.3), AMIRL by absolute epoch parity (§7.4, Eqs. (7.4)-(7.11)) and OCLR (§7.5, Eq. (7.12)). The
loss forms follow the official code (docs/mult.md §0 says what of the paper was available).

MBMIL (BMIL): Wang, Gong, Li, Ji, "Modality-Aware Bias Mitigation and Invariance Learning for
Unsupervised Visible-Infrared Person Re-Identification", AAAI 2026 (arXiv 2512.07760);
docs/mbmil.md §A.3, Eqs. (A.3.1)-(A.3.7): the centroid + hard dual memory, the intra-modality
loss, the modality split of global clusters into prototypes and the multi-positive
"split-and-contrast" loss L_glb^m.

Usage, per iteration: compute the losses (all logits read the pre-update banks), call
backward and the optimizer step, then update the memories under no_grad:

    loss, updates = stage_one_loss(banks, feats_v0, feats_v1, feats_r, y_v, y_r)   # MULT
    loss.backward(); optimizer.step()
    apply_updates(banks, updates)          # MBMIL: intra_loss(memory, ...), then memory.update

Shapes: B rows in a batch (B_v visible per view, B_r infrared), K slots, D feature size.
Labels may be integer tensors or NumPy integer arrays. A training loop holds them on the host (the samplers'
batches index the pseudo-labels there): given as NumPy arrays they are checked on the host, copied to the
device without a wait, and the bank updates plan their steps on the host, so that a training step never waits
for the device to read a value back. The checks that would read the device (finite feature rows, positives of
MBMIL's labels) can be left to the caller with check=False (train.py checks the loss once per read-out and the
labels once per epoch).
Imports torch, NumPy and the standard library only: the file can be copied alone into another codebase
(tests/test_copy_one_file.py does so). Checked against the slow loop references and the
hand-written loss combinations in tests/test_memory.py (`ref_sequential_update`,
`ref_hybrid_update`, `expected_stage_two`, `ref_split`, `ref_multi_positive`).
"""
import numpy as np
import torch
import torch.nn.functional as F


class ClusterMemory:
    """A non-learnable bank M [K, D] of L2-normalised cluster vectors (docs/mult.md §7.1).

    Initialised to C̄ = C/‖C‖ (normalised DBSCAN centers), rebuilt every epoch. `momentum` m is
    the weight of the OLD entry: M[y] <- m·M[y] + (1-m)·f̄, then re-normalised (m = 0.1).
    """

    def __init__(self, centers, momentum=0.1, temp=0.05):
        _check_memory_args(centers, momentum, temp, "ClusterMemory")
        self.bank = F.normalize(centers.detach(), dim=1)          # C̄ [K, D], a fresh tensor
        self.momentum, self.temp = float(momentum), float(temp)

    def logits(self, feats):
        """s(f; M) = f̄ Mᵀ / τ (docs/mult.md Eq. (7.1)). feats [B, D] -> [B, K]; the gradient flows to
        feats only."""
        _check_feats(feats, self.bank.shape[1], "feats")
        return F.normalize(feats, dim=1) @ self.bank.t().to(feats.dtype) / self.temp

    @torch.no_grad()
    def update(self, feats, labels, check=True):
        """Sequential momentum update (docs/mult.md §7.1, Eq. (7.2)), vectorised exactly.

        For each row i in batch order: M[y_i] <- normalize(m·M[y_i] + (1-m)·f̄_i). Rows of
        different labels commute, so step t updates the t-th occurrence of every label at once
        (unique indices per step; the loop runs over t = max count per label, not over rows).
        feats [B, D], labels int [B] in -1..K-1; rows labelled -1 (outliers) are skipped.
        The steps are planned on the host from the labels (NumPy labels: without reading the device).
        check=False skips the check that every feature row is finite and non-zero (a device read).
        The bank is replaced by a new tensor, so logits computed earlier keep their values.
        """
        f, y = _labelled_unit_rows(feats, labels, self.bank, check)   # [n, D] on the device, [n] on the host
        if len(y) == 0:
            return
        rank = _occurrence_rank(y)
        order = np.argsort(rank, kind="stable")                   # step 0 first, batch order inside
        sizes = np.bincount(rank).tolist()                        # rows per step
        f, y = f.index_select(0, _to(order, f.device)), _to(y[order], f.device)
        bank, m = self.bank.clone(), self.momentum
        for f_t, y_t in zip(f.split(sizes), y.split(sizes)):
            bank.index_copy_(0, y_t, F.normalize(m * bank[y_t] + (1 - m) * f_t, dim=1))
        self.bank = bank


# ---------------------------------------------------------------------------------------------
# MULT memories and losses (docs/mult.md §7.2-7.5)

def mult_banks(centers_v, centers_r, stage_two, momentum=0.1, temp=0.05):
    """MULT's memories, each initialised to the cluster centers of its label space (docs/mult.md §7.2-7.3):
    centers_v [K_v, D], centers_r [K_r, D]. Stage one: "vis" M_v and "ir" M_r. Stage two adds "ir_to_vis" M_{r→v}
    [K_v] and "vis_to_ir" M_{v→r} [K_r] (the other modality's features under their transferred labels), and
    "unified_vis" M_{c,v} [K_v], "unified_ir" M_{c,r} [K_r] (both modalities in one label space)."""
    in_vis_space = ("vis", "ir_to_vis", "unified_vis")
    names = ("vis", "ir", "ir_to_vis", "vis_to_ir", "unified_vis", "unified_ir") if stage_two else ("vis", "ir")
    return {name: ClusterMemory(centers_v if name in in_vis_space else centers_r, momentum, temp) for name in names}


def stage_one_loss(banks, feats_v0, feats_v1, feats_r, y_v, y_r):
    """Stage one, docs/mult.md §7.2, Eq. (7.3):
    L_stage1 = CE(s(v0; M_v), ℓ^v) + CE(s(v1; M_v), ℓ^v) + CE(s(r; M_r), ℓ^r).

    banks {"vis": M_v [K_v, D], "ir": M_r [K_r, D]}; feats_v0, feats_v1 [B_v, D] (two visible views);
    feats_r [B_r, D]; y_v int [B_v] in 0..K_v-1, y_r int [B_r] in 0..K_r-1 (DBSCAN outliers are
    dropped by the sampler). Returns (loss, updates), updates in call order.
    """
    _check_inputs(banks, ("vis", "ir"), feats_v0, feats_v1, feats_r)
    updates = []
    s_v0 = _read(banks, "vis", feats_v0, y_v, updates, "y_v", allow_outliers=False)
    s_v1 = _read(banks, "vis", feats_v1, y_v, updates, "y_v", allow_outliers=False)
    s_r = _read(banks, "ir", feats_r, y_r, updates, "y_r", allow_outliers=False)
    y_v, y_r = _to(y_v, s_v0.device), _to(y_r, s_r.device)
    loss = F.cross_entropy(s_v0, y_v) + F.cross_entropy(s_v1, y_v) + F.cross_entropy(s_r, y_r)
    return loss, updates


def stage_two_loss(banks, feats_v0, feats_v1, feats_r, hard, soft, epoch, oclr=True):
    """Stage two, AMIRL (docs/mult.md §7.4) + OCLR (§7.5): L_stage2 = L_ms + L_ma + L_oclr, every
    weight 1 (Eq. (7.11)); even epochs Eqs. (7.5)-(7.7), odd epochs Eqs. (7.8)-(7.10).

    banks (each a ClusterMemory with D columns), named by label space and by whose features update them:
           "vis" M_v [K_v] and "ir" M_r [K_r], each modality in its own clusters;
           "ir_to_vis" M_{r→v} [K_v], infrared features under their transferred visible labels;
           "vis_to_ir" M_{v→r} [K_r], visible features under their transferred infrared labels;
           "unified_vis" M_{c,v} [K_v] and "unified_ir" M_{c,r} [K_r], both modalities in one label space.
    feats_v0, feats_v1 [B_v, D] visible views; feats_r [B_r, D].
    hard: int labels h_vv ("vis"), h_vr ("vis_to_ir") [B_v] and h_rr ("ir"), h_rv ("ir_to_vis") [B_r]: a label
          key names the samples' modality and, after "_to_", the label space it points into.
    soft: β-mixed Ŷ_vv [B_v, K_v], Ŷ_vr [B_v, K_r], Ŷ_rr [B_r, K_r], Ŷ_rv [B_r, K_v].
    epoch: the ABSOLUTE epoch; even -> visible label space (13 terms), odd -> infrared label
    space (14 terms); oclr=False drops the 6 L_oclr terms (ablation).
    Each s(x; M) is computed once (pre-update bank) and registers one update; the plain reads
    ŝ of L_oclr register none. Returns (loss, {"ms", "ma", "oclr"} as detached 0-d tensors, to be read back
    when they are logged, updates).
    """
    if int(epoch) != epoch:
        raise ValueError(f"stage_two_loss: epoch must be an integer, got {epoch!r}")
    even = int(epoch) % 2 == 0
    needed = ("vis", "ir", "ir_to_vis", "unified_vis") if even else ("vis", "ir", "vis_to_ir", "unified_ir")
    _check_inputs(banks, needed, feats_v0, feats_v1, feats_r)
    for key in ("vis", "vis_to_ir", "ir", "ir_to_vis"):
        if key not in hard or key not in soft:
            raise KeyError(f"stage_two_loss: hard and soft need key {key!r}")
    u = []
    v0, v1, r = feats_v0, feats_v1, feats_r                        # the v0, v1, r of docs/mult.md §7.4

    def s(name, feats, key):   # s(x; M) with its update (name, x, h_key) registered once
        return _read(banks, name, feats, hard[key], u, f"hard[{key!r}]")

    def ce(logits, key):       # CE(·, Ŷ_key), Eq. (7.4)
        return soft_ce(logits, soft[key], f"soft[{key!r}]")

    def s_hat(name, feats):    # ŝ(x; M), a plain read: no update
        return banks[name].logits(feats)

    if even:   # visible label space: M_v, M_r, M_{r→v}, M_{c,v}
        v0_v, v1_v = s("vis", v0, "vis"), s("vis", v1, "vis")
        r_r, r_rv = s("ir", r, "ir"), s("ir_to_vis", r, "ir_to_vis")
        v0_c, v1_c = s("unified_vis", v0, "vis"), s("unified_vis", v1, "vis")
        r_c = s("unified_vis", r, "ir_to_vis")
        l_ms = ce(v0_v, "vis") + ce(v1_v, "vis") + ce(r_r, "ir") + ce(r_rv, "ir_to_vis")           # (7.5)
        l_ma = ce(v0_c, "vis") + ce(v1_c, "vis") + ce(r_c, "ir_to_vis")                            # (7.6)
        if oclr:   # targets: the other view on M_v, infrared on M_{r→v}; then the other bank (7.7)
            l_oclr = (sce(v0_c, v1_v) + sce(v1_c, v0_v) + sce(r_c, r_rv) + sce(v0_c, s_hat("ir_to_vis", v1))
                      + sce(v1_c, s_hat("ir_to_vis", v0)) + sce(r_c, s_hat("vis", r)))
    else:      # infrared label space: M_v, M_r, M_{v→r}, M_{c,r}
        v0_v, v1_v = s("vis", v0, "vis"), s("vis", v1, "vis")
        v0_vr, v1_vr = s("vis_to_ir", v0, "vis_to_ir"), s("vis_to_ir", v1, "vis_to_ir")
        r_r = s("ir", r, "ir")
        v0_c, v1_c = s("unified_ir", v0, "vis_to_ir"), s("unified_ir", v1, "vis_to_ir")
        r_c = s("unified_ir", r, "ir")
        l_ms = (ce(v0_v, "vis") + ce(v1_v, "vis") + ce(v0_vr, "vis_to_ir") + ce(v1_vr, "vis_to_ir")
                + ce(r_r, "ir"))                                                                   # (7.8)
        l_ma = ce(v0_c, "vis_to_ir") + ce(v1_c, "vis_to_ir") + ce(r_c, "ir")                       # (7.9)
        if oclr:   # targets: the other view on M_{v→r}, infrared on M_r; then the other bank (7.10)
            l_oclr = (sce(v0_c, v1_vr) + sce(v1_c, v0_vr) + sce(r_c, r_r) + sce(v0_c, s_hat("ir", v1))
                      + sce(v1_c, s_hat("ir", v0)) + sce(r_c, s_hat("vis_to_ir", r)))
    if not oclr:
        l_oclr = torch.zeros((), dtype=l_ms.dtype, device=l_ms.device)
    return l_ms + l_ma + l_oclr, {"ms": l_ms.detach(), "ma": l_ma.detach(), "oclr": l_oclr.detach()}, u


def soft_ce(logits, target, name="target"):
    """CE(z, Ŷ) = −(1/B) Σ_b Σ_k Ŷ_bk log softmax(z_b)_k (docs/mult.md Eq. (7.4)). [B, K], [B, K] ->
    scalar."""
    if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"{name}: expected soft labels of shape {tuple(logits.shape)}, got "
                         f"{tuple(getattr(target, 'shape', ()))}")
    return -(target.to(logits.device, logits.dtype) * F.log_softmax(logits, dim=1)).sum(1).mean()


def sce(p_logits, q_logits, temp=0.2):
    """OCLR's SCE(p ← q) = −(1/B) Σ_b Σ_k softmax(q_b/0.2)_k log softmax(p_b)_k (docs/mult.md §7.5,
    Eq. (7.12)).

    p_logits, q_logits [B, K] (both already / τ). Neither side is detached: the gradient also
    flows through the target q into the encoder, as in the official code.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"sce: p_logits {tuple(p_logits.shape)} and q_logits "
                         f"{tuple(q_logits.shape)} must have the same shape")
    return -(F.softmax(q_logits / temp, dim=1) * F.log_softmax(p_logits, dim=1)).sum(1).mean()


@torch.no_grad()
def apply_updates(banks, updates, check=True):
    """Apply the registered bank updates (Eq. (7.2)) in REVERSE call order (docs/mult.md §7.1).

    Official code vs this file: the official memories update inside autograd backward, which runs
    the calls on one bank in roughly reverse order, and a later-run backward already sees the
    updated bank when it computes its input gradient. Here all logits (and gradients) use the
    pre-update banks, and this function reproduces the final bank state; the only difference is
    that gradient subtlety, which is negligible (docs/mult.md §7.1, §14.4).
    updates: list of (bank_name, feats [B, D], labels [B]) as returned by the loss functions.
    check: passed on to each update (False: no device read).
    """
    for name, feats, labels in reversed(updates):
        if name not in banks:
            raise KeyError(f"apply_updates: update for bank {name!r}, banks have {sorted(banks)}")
        banks[name].update(feats, labels, check=check)


# ---------------------------------------------------------------------------------------------
# MBMIL (docs/mbmil.md §A.3)

class HybridMemory:
    """Centroid bank + hard bank [K, D], both initialised to the L2-normalised centers
    (docs/mbmil.md §A.3).

    μ = momentum is the weight of the OLD value (μ = 0.1 keeps only 10% of it); τ = temp.
    """

    def __init__(self, centers, momentum=0.1, temp=0.05):
        _check_memory_args(centers, momentum, temp, "HybridMemory")
        self.centroid = F.normalize(centers.detach(), dim=1)                           # [K, D]
        self.hard = self.centroid.clone()                                              # [K, D]
        self.momentum, self.temp = float(momentum), float(temp)

    def logits(self, feats):
        """feats [B, D] -> (f̄ hardᵀ/τ [B, K], f̄ centroidᵀ/τ [B, K]); grad flows to feats only."""
        _check_feats(feats, self.centroid.shape[1], "feats")
        f = F.normalize(feats, dim=1)
        return f @ self.hard.t().to(f.dtype) / self.temp, f @ self.centroid.t().to(f.dtype) / self.temp

    @torch.no_grad()
    def update(self, feats, labels, check=True):
        """One momentum step per label present in the batch (labels -1 skipped), docs/mbmil.md
        Eqs. (A.3.4)-(A.3.5):

        centroid[y] <- normalize(μ·centroid[y] + (1-μ)·mean_{i: y_i = y} f̄_i)
        hard[y]     <- normalize(μ·hard[y] + (1-μ)·f̄_{i*}), i* = the row of label y least similar
                       (cosine) to the current hard[y]; ties -> first in batch order.
        feats [B, D], labels int [B] in -1..K-1 (for the global memory: prototype indices). The labels
        present are found on the host; check=False skips the device read of ClusterMemory.update's check.
        """
        f, y = _labelled_unit_rows(feats, labels, self.centroid, check)   # [n, D] on the device, [n] on the host
        n, mu = len(y), self.momentum
        if n == 0:
            return
        uniq, inv, counts = (_to(a, f.device) for a in np.unique(y, return_inverse=True, return_counts=True))
        y = _to(y, f.device)
        mean = torch.zeros(len(uniq), f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, inv, f)
        mean = mean / counts[:, None].to(f.dtype)                                     # [U, D]
        sim = (f * self.hard[y]).sum(1)                                               # [n]
        low = torch.full((len(uniq),), float("inf"), dtype=f.dtype, device=f.device)
        low = low.scatter_reduce(0, inv, sim, "amin")                                 # [U]
        row = torch.where(sim == low[inv], torch.arange(n, device=f.device), n)       # [n]
        first = torch.full_like(uniq, n).scatter_reduce(0, inv, row, "amin")          # [U]
        self.centroid = self.centroid.index_copy(
            0, uniq, F.normalize(mu * self.centroid[uniq] + (1 - mu) * mean, dim=1))
        self.hard = self.hard.index_copy(
            0, uniq, F.normalize(mu * self.hard[uniq] + (1 - mu) * f[first], dim=1))


def intra_loss(memory, feats, labels, margin=0.2, hybrid=True, batch_mean=None):
    """Intra-modality loss (docs/mbmil.md §A.3, Eq. (A.3.7)):
    L_intra = ½[CE(hard) + max(0, CE(centroid) − margin)].

    hybrid=False gives plain InfoNCE on the centroid bank, CE(centroid). CE is the batch-mean
    hard-label cross-entropy of f̄ Mᵀ/τ. feats [B, D], labels int [B] in 0..K-1.
    Paper vs official code: the paper (per its summary) writes plain InfoNCE; the hybrid form
    with the 0.2 clamp is only in the official code and is our default.
    batch_mean: applied to each batch-mean CE before the clamp; a batch split over processes passes the
    mean over all of them (the clamp of the whole batch's mean is not the mean of clamped shares).
    """
    hard_logits, centroid_logits = memory.logits(feats)
    labels = _to(_check_labels(labels, feats.shape[0], memory.centroid.shape[0], "labels", False),
                 centroid_logits.device)
    mean = batch_mean or (lambda x: x)     # over several processes: the mean over the whole batch
    ce_centroid = mean(F.cross_entropy(centroid_logits, labels))
    if not hybrid:
        return ce_centroid
    return 0.5 * (mean(F.cross_entropy(hard_logits, labels)) + torch.clamp(ce_centroid - margin, min=0))


def split_prototypes(feats, global_labels, modality):
    """Split each global cluster z into its visible and its infrared mean ("split", docs/mbmil.md
    §A.3, Eq. (A.3.1)): K_{z,m} = (1/n_{z,m}) Σ_{i: z_i = z, m_i = m} f̄_i.

    feats [N, D] (rows are L2-normalised before averaging), global_labels int [N] (-1 =
    outlier), modality int [N] with 0 = visible, 1 = infrared. Returns
      centers [P, D]: the per-(z, modality) means of the normalised rows, NOT re-normalised;
      proto_labels int64 [P]: the global label z of each prototype;
      proto_index int64 [N]: the prototype of each row's own modality (-1 for outliers).
    Prototypes are ordered by (z, modality); a one-modality cluster gives one prototype.
    """
    labels, modality = _check_split_inputs(feats, global_labels, modality)
    keep = labels >= 0
    f = _unit_rows(feats, "feats")[keep]                             # [n, D]
    key = labels[keep] * 2 + modality[keep].long()                  # (z, modality) -> 2z + m
    uniq, inv, counts = torch.unique(key, return_inverse=True, return_counts=True)   # sorted
    centers = torch.zeros(len(uniq), feats.shape[1], dtype=f.dtype, device=f.device)
    centers = centers.index_add_(0, inv, f) / counts[:, None].to(f.dtype)            # [P, D]
    proto_index = torch.full_like(labels, -1)
    proto_index[keep] = inv
    return centers, uniq // 2, proto_index


def global_loss(memory, feats, labels, proto_labels, hard_neg_k=50, check=True):
    """L_glb = ½(L_glb^m on the hard bank + L_glb^m on the centroid bank), docs/mbmil.md §A.3,
    Eq. (A.3.6).

    memory: the HybridMemory of the prototypes (centers from split_prototypes); feats [B, D];
    labels int [B] GLOBAL labels; proto_labels [P]. Update the memory afterwards with the
    batch's prototype indices (proto_index), not with the global labels. check: multi_positive_loss's.
    """
    hard_logits, centroid_logits = memory.logits(feats)
    return 0.5 * (multi_positive_loss(hard_logits, labels, proto_labels, hard_neg_k, check)
                  + multi_positive_loss(centroid_logits, labels, proto_labels, hard_neg_k, check))


def multi_positive_loss(logits, labels, proto_labels, hard_neg_k=50, check=True):
    """Multi-positive InfoNCE over prototypes with hard negatives, L_glb^m (docs/mbmil.md §A.3,
    Eqs. (A.3.2)-(A.3.3)).

    loss_i = −(1/|P(z_i)|) Σ_{p ∈ P(z_i)} log[exp(logits_ip) / Σ_{j ∈ S(x_i)} exp(logits_ij)],
    P(z_i) = prototypes whose global label is z_i; S(x_i) = the top `hard_neg_k` entries after
    setting the positives to +inf (all positives plus the hardest negatives; all P if fewer).
    logits [B, P] (already / τ), labels int [B], proto_labels int [P]. Returns the batch mean.
    check: that every label has between 1 and hard_neg_k positives (check_positives; False leaves it to the
    caller, who checks each epoch's labels once, without reading the device).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, P], got {tuple(logits.shape)}")
    b, p = logits.shape
    if not isinstance(proto_labels, torch.Tensor) or proto_labels.shape != (p,):
        raise ValueError(f"proto_labels: expected a tensor [{p}] (one global label per prototype)")
    labels = _check_labels(labels, b, None, "labels", allow_outliers=False)
    if b and check:
        check_positives(labels, proto_labels, hard_neg_k)
    labels = _to(labels, logits.device)
    pos = labels[:, None] == proto_labels[None, :].to(logits.device)   # [B, P]
    n_pos = pos.sum(1)                                                 # [B]
    k = min(int(hard_neg_k), p)
    top = logits.detach().masked_fill(pos, float("inf")).topk(k, dim=1).indices   # S(x_i), [B, k]
    log_p = F.log_softmax(logits.gather(1, top), dim=1)                         # over S(x_i)
    sel_pos = pos.gather(1, top).to(log_p.dtype)                                # [B, k]
    return (-(log_p * sel_pos).sum(1) / n_pos.to(log_p.dtype)).mean()


def check_positives(labels, proto_labels, hard_neg_k):
    """Every global label of `labels` has a prototype, and no more than hard_neg_k of them (S(x_i) holds every
    positive); ValueError otherwise. labels int [B], proto_labels int [P]: tensors (read back) or NumPy arrays."""
    labels, proto = _host(labels), _host(proto_labels)
    uniq, counts = np.unique(proto, return_counts=True)
    at = np.minimum(np.searchsorted(uniq, labels), max(len(uniq) - 1, 0))
    n_pos = np.where(uniq[at] == labels, counts[at], 0) if len(uniq) else np.zeros(len(labels), np.int64)
    if len(n_pos) and n_pos.min() == 0:
        raise ValueError("labels: a batch label has no prototype in proto_labels")
    if len(n_pos) and n_pos.max() > hard_neg_k:
        raise ValueError(f"hard_neg_k = {hard_neg_k} is smaller than the {n_pos.max()} positives of "
                         f"a row; S(x_i) must hold every positive")


# ---------------------------------------------------------------------------------------------
# shared steps

def _read(banks, name, feats, labels, updates, label_name, allow_outliers=True):
    """s(feats; banks[name]) and register the bank update (name, feats.detach(), labels)."""
    bank = banks[name]
    labels = _check_labels(labels, feats.shape[0], bank.bank.shape[0], label_name, allow_outliers)
    updates.append((name, feats.detach(), labels))
    return bank.logits(feats)


def _occurrence_rank(y):
    """rank[i] = how many earlier rows of y (in batch order) carry the label y[i]: int64 [n] -> [n], NumPy."""
    order = np.argsort(y, kind="stable")                        # groups labels, keeps batch order
    grouped = y[order]
    new = np.r_[True, grouped[1:] != grouped[:-1]]              # the first row of each label
    starts = np.maximum.accumulate(np.where(new, np.arange(len(y)), 0))
    rank = np.empty_like(y)
    rank[order] = np.arange(len(y)) - starts
    return rank


def _unit_rows(feats, name, check=True):
    """f̄ = f/‖f‖ per row, [B, D] -> [B, D]; rows are pre-scaled by their max |entry|, so huge
    values cannot overflow ‖f‖ into a silent zero. NaN/Inf or all-zero rows raise (check=False: not
    checked, which would read the device; they become NaN rows)."""
    scale = feats.abs().amax(1, keepdim=True)                       # [B, 1]; NaN/Inf propagate
    if check and feats.shape[0] and not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(f"{name}: contains NaN or Inf, or an all-zero row")
    return F.normalize(feats / scale, dim=1)


def _labelled_unit_rows(feats, labels, bank, check=True):
    """Checked update inputs: the L2-normalised rows of `feats` whose label is not -1 [n, D], on the bank's
    device and dtype, and those labels, int64 [n] on the host. bank [K, D]; feats [B, D]; labels int [B] in
    -1..K-1 (a tensor is read back once: give host labels to keep the device busy)."""
    k, d = bank.shape
    _check_feats(feats, d, "feats")
    labels = _host(_check_labels(labels, feats.shape[0], k, "labels", True))
    keep = np.flatnonzero(labels >= 0)
    f = _unit_rows(feats.to(bank.device, bank.dtype), "feats", check)
    return f.index_select(0, _to(keep, bank.device)), labels[keep]


def _host(labels):
    """Integer labels as a NumPy array: a tensor is read back (from a device, that waits for it)."""
    return labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)


def _to(labels, device):
    """Integer labels as an int64 tensor on `device`; from the host the copy does not wait (the driver stages
    pageable memory before the call returns, so the source may change afterwards)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return labels.to(device, non_blocking=labels.device.type == "cpu")


# ---------------------------------------------------------------------------------------------
# input checks

def _check_feats(feats, dim, name):
    """`feats` must be a floating [B, dim] tensor (dim=None: any D); returns it."""
    if not isinstance(feats, torch.Tensor) or not feats.is_floating_point() or feats.dim() != 2:
        raise ValueError(f"{name}: expected a floating-point tensor [B, D], got "
                         f"{type(feats).__name__} {getattr(feats, 'shape', '')}")
    if dim is not None and feats.shape[1] != dim:
        raise ValueError(f"{name}: feature size {feats.shape[1]} does not match the memory's D = {dim}")
    return feats


def _check_labels(labels, n, k, name, allow_outliers):
    """`labels` must be an integer tensor or NumPy array [n], values in [0, k) (k=None: no upper bound; -1
    allowed if allow_outliers); returns them as int64, where they are (an int64 array as the same object).
    A NumPy array is checked on the host; a tensor on a device is read back once."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: expected an integer array [B], got {labels.dtype} {labels.shape}")
    elif not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor [B], got {type(labels).__name__} "
                         f"{getattr(labels, 'dtype', '')} {getattr(labels, 'shape', '')}")
    if len(labels) != n:
        raise ValueError(f"{name}: {len(labels)} labels for {n} feature rows")
    if n:
        lo, hi = (int(labels.min()), int(labels.max())) if isinstance(labels, np.ndarray) \
            else torch.stack(torch.aminmax(labels)).tolist()
        if lo < (-1 if allow_outliers else 0) or (k is not None and hi >= k):
            allowed = f"{-1 if allow_outliers else 0}..{'' if k is None else k - 1}"
            raise ValueError(f"{name}: values must lie in {allowed} (K = {k}), found {lo}..{hi}")
    return labels.astype(np.int64, copy=False) if isinstance(labels, np.ndarray) else labels.long()


def _check_memory_args(centers, momentum, temp, cls):
    """A memory's centers [K, D] (finite, non-zero rows), momentum in [0, 1] and temp > 0."""
    if not isinstance(centers, torch.Tensor) or not centers.is_floating_point() or centers.dim() != 2 \
            or centers.shape[0] == 0:
        raise ValueError(f"{cls}: centers must be a non-empty floating-point tensor [K, D], got "
                         f"{type(centers).__name__} {getattr(centers, 'shape', '')}")
    if not bool(torch.isfinite(centers).all()) or bool((centers.norm(dim=1) == 0).any()):
        raise ValueError(f"{cls}: centers must be finite with non-zero rows")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{cls}: momentum must be in [0, 1] (weight of the old entry), got {momentum}")
    if not temp > 0:
        raise ValueError(f"{cls}: temp must be > 0, got {temp}")


def _check_inputs(banks, names, feats_v0, feats_v1, feats_r):
    """Every bank in `names` present; feats_v0, feats_v1 [B_v, D] and feats_r [B_r, D] with the
    banks' D."""
    for name in names:
        if name not in banks:
            raise KeyError(f"banks: missing bank {name!r}; have {sorted(banks)}")
    d = banks["vis"].bank.shape[1]
    for f, fname in ((feats_v0, "feats_v0"), (feats_v1, "feats_v1"), (feats_r, "feats_r")):
        _check_feats(f, d, fname)
    if feats_v0.shape != feats_v1.shape:
        raise ValueError(f"feats_v0 {tuple(feats_v0.shape)} and feats_v1 {tuple(feats_v1.shape)}: "
                         f"the two visible views must have the same shape")


def _check_split_inputs(feats, global_labels, modality):
    """split_prototypes' inputs checked -> (global labels int64 [N], modality tensor [N] of 0/1),
    with at least one non-outlier row."""
    n = _check_feats(feats, None, "feats").shape[0]
    labels = _check_labels(global_labels, n, None, "global_labels", allow_outliers=True)
    modality = torch.as_tensor(modality, device=feats.device)
    if modality.shape != (n,) or modality.is_floating_point() or \
            not bool(((modality == 0) | (modality == 1)).all()):
        raise ValueError(f"modality: expected an integer tensor [{n}] of 0 (visible) / 1 (infrared), "
                         f"got {modality.dtype} {tuple(modality.shape)}")
    if not bool((labels >= 0).any()):
        raise ValueError("global_labels: every row is an outlier (-1); no prototype to build")
    return labels, modality
