"""memory.py against slow loop references and hand-written loss combinations (CPU, seconds)."""
import math

import pytest
import torch
import torch.nn.functional as F

from memory import (ClusterMemory, HybridMemory, apply_updates, global_loss, intra_loss, mult_banks,
                    multi_positive_loss, sce, split_prototypes, stage_one_loss, stage_two_loss)


# ----------------------------------------------------------------------------- references

def ref_sequential_update(bank, feats, labels, m):
    """docs/mult.md §7.1 one sample at a time: M[y] <- m M[y] + (1-m) f/|f|, then M[y] /= |M[y]|."""
    bank = bank.clone()
    for f, y in zip(feats, labels.tolist()):
        if y < 0:
            continue
        v = m * bank[y] + (1 - m) * f / f.norm()
        bank[y] = v / v.norm()
    return bank


def ref_hybrid_update(centroid, hard, feats, labels, mu):
    centroid, hard = centroid.clone(), hard.clone()
    new_c, new_h = centroid.clone(), hard.clone()
    for y in sorted(set(labels.tolist()) - {-1}):
        rows = [i for i in range(len(labels)) if labels[i] == y]
        fs = [feats[i] / feats[i].norm() for i in rows]
        mean = sum(fs) / len(fs)
        v = mu * centroid[y] + (1 - mu) * mean
        new_c[y] = v / v.norm()
        best, best_sim = None, math.inf
        for f in fs:                               # first strictly smaller wins: ties -> first
            s = float(f @ hard[y])
            if s < best_sim:
                best, best_sim = f, s
        v = mu * hard[y] + (1 - mu) * best
        new_h[y] = v / v.norm()
    return new_c, new_h


def ref_soft_ce(logits, target):
    return -(target * torch.log_softmax(logits, 1)).sum(1).mean()


def ref_sce(p, q, temp=0.2):
    return -(torch.softmax(q / temp, 1) * torch.log_softmax(p, 1)).sum(1).mean()


def s(f, bank, temp=0.05):
    return F.normalize(f, dim=1) @ bank.t() / temp


def random_banks(gen, k_v, k_r, d):
    sizes = {"vis": k_v, "ir": k_r, "ir_to_vis": k_v, "vis_to_ir": k_r, "unified_vis": k_v, "unified_ir": k_r}
    return {name: ClusterMemory(torch.randn(k, d, generator=gen)) for name, k in sizes.items()}


def random_stage_two_inputs(gen, b_v=6, b_r=5, k_v=4, k_r=3, d=8):
    banks = random_banks(gen, k_v, k_r, d)
    f_v0, f_v1, f_r = (torch.randn(b, d, generator=gen, requires_grad=True)
                       for b in (b_v, b_v, b_r))
    k_of = {"vis": k_v, "vis_to_ir": k_r, "ir": k_r, "ir_to_vis": k_v}
    b_of = {"vis": b_v, "vis_to_ir": b_v, "ir": b_r, "ir_to_vis": b_r}
    hard = {key: torch.randint(0, k_of[key], (b_of[key],), generator=gen) for key in k_of}
    soft = {key: torch.softmax(torch.randn(b_of[key], k_of[key], generator=gen), 1) for key in k_of}
    return banks, f_v0, f_v1, f_r, hard, soft


# ----------------------------------------------------------------------------- ClusterMemory

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_cluster_update_matches_sequential_rule(seed, momentum):
    gen = torch.Generator().manual_seed(seed)
    k, d, b = 7, 16, 48
    mem = ClusterMemory(torch.randn(k, d, generator=gen), momentum=momentum)
    feats = torch.randn(b, d, generator=gen) * 3
    labels = torch.randint(-1, k - 2, (b,), generator=gen)   # repeats, outliers, untouched slots
    expected = ref_sequential_update(mem.bank, feats, labels, momentum)
    mem.update(feats, labels)
    assert (labels == -1).any() and torch.bincount(labels[labels >= 0]).max() >= 5
    torch.testing.assert_close(mem.bank, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(mem.bank.norm(dim=1), torch.ones(k))


def test_cluster_update_hand_checked():
    mem = ClusterMemory(torch.tensor([[2.0, 0.0], [0.0, 5.0]]), momentum=0.1)
    torch.testing.assert_close(mem.bank, torch.eye(2))         # stored normalised
    mem.update(torch.tensor([[0.0, 3.0], [7.0, 0.0]]), torch.tensor([0, -1]))
    v = torch.tensor([0.1, 0.9])                                # 0.1·old + 0.9·new
    torch.testing.assert_close(mem.bank, torch.stack([v / v.norm(), torch.tensor([0.0, 1.0])]))


def test_cluster_logits_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    mem = ClusterMemory(torch.randn(5, 8, generator=gen), temp=0.05)
    feats = torch.randn(3, 8, generator=gen, requires_grad=True)
    logits = mem.logits(feats)
    torch.testing.assert_close(logits, F.normalize(feats, dim=1) @ mem.bank.t() / 0.05)
    logits[:, 0].sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert not mem.bank.requires_grad and mem.bank.grad is None
    # update after backward leaves already computed logits untouched
    before = logits.detach().clone()
    mem.update(feats.detach(), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(logits.detach(), before)


def test_cluster_errors():
    mem = ClusterMemory(torch.randn(4, 6))
    with pytest.raises(ValueError, match="labels: values must lie in -1..3"):
        mem.update(torch.randn(2, 6), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="labels"):
        mem.update(torch.randn(2, 6), torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match="NaN"):
        mem.update(torch.tensor([[float("nan")] * 6, [1.0] * 6]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        mem.update(torch.tensor([[1.0] * 5 + [float("-inf")]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="all-zero row"):
        mem.update(torch.zeros(1, 6), torch.tensor([-1]))
    big = torch.full((2, 6), 1e38)                              # ‖f‖² overflows float32
    expected = ref_sequential_update(mem.bank, big / 1e38, torch.tensor([3, 3]), 0.1)
    mem.update(big, torch.tensor([3, 3]))
    torch.testing.assert_close(mem.bank, expected)
    with pytest.raises(ValueError, match="feature size 5"):
        mem.logits(torch.randn(2, 5))
    with pytest.raises(ValueError, match="2 feature rows"):
        mem.update(torch.randn(2, 6), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="centers"):
        ClusterMemory(torch.zeros(3, 4))


# ----------------------------------------------------------------------------- MULT losses

def test_mult_banks_start_from_their_label_spaces_centers():
    """Stage one: M_v, M_r; stage two adds M_{r->v}, M_{c,v} over the visible clusters and M_{v->r}, M_{c,r} over
    the infrared ones (docs/mult.md §7.3), each a fresh normalised copy of its centers."""
    gen = torch.Generator().manual_seed(4)
    c_v, c_r = torch.randn(5, 8, generator=gen), torch.randn(3, 8, generator=gen)
    one = mult_banks(c_v, c_r, stage_two=False, momentum=0.3, temp=0.1)
    assert sorted(one) == ["ir", "vis"]
    two = mult_banks(c_v, c_r, stage_two=True)
    space = {"vis": c_v, "ir_to_vis": c_v, "unified_vis": c_v, "ir": c_r, "vis_to_ir": c_r, "unified_ir": c_r}
    assert sorted(two) == sorted(space)
    for name, centers in space.items():
        torch.testing.assert_close(two[name].bank, F.normalize(centers, dim=1))
    assert two["vis"].bank is not two["unified_vis"].bank                     # updated apart
    assert (one["vis"].momentum, one["vis"].temp) == (0.3, 0.1)


def test_stage_one_loss_hand_computed():
    gen = torch.Generator().manual_seed(1)
    banks = {"vis": ClusterMemory(torch.randn(4, 8, generator=gen)),
             "ir": ClusterMemory(torch.randn(3, 8, generator=gen))}
    f_v0, f_v1, f_r = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen), \
        torch.randn(6, 8, generator=gen)
    y_v, y_r = torch.tensor([0, 1, 1, 3, 2]), torch.tensor([0, 2, 2, 1, 0, 1])
    loss, updates = stage_one_loss(banks, f_v0, f_v1, f_r, y_v, y_r)

    def ce(logits, y):
        return -torch.log_softmax(logits, 1)[torch.arange(len(y)), y].mean()
    expected = (ce(s(f_v0, banks["vis"].bank), y_v) + ce(s(f_v1, banks["vis"].bank), y_v)
                + ce(s(f_r, banks["ir"].bank), y_r))
    torch.testing.assert_close(loss, expected)
    assert [u[0] for u in updates] == ["vis", "vis", "ir"]
    assert updates[1][1] is not f_v1 and torch.equal(updates[1][1], f_v1)
    with pytest.raises(ValueError, match="y_v"):
        stage_one_loss(banks, f_v0, f_v1, f_r, torch.tensor([0, 1, -1, 3, 2]), y_r)


def expected_stage_two(banks, f_v0, f_v1, f_r, Y, even):
    """docs/mult.md §7.4 written out term by term."""
    B = {name: mem.bank for name, mem in banks.items()}
    v, r, c = B["vis"], B["ir"], B["unified_vis" if even else "unified_ir"]          # M_v, M_r, M_c
    y_v, y_r, y_vr, y_rv = Y["vis"], Y["ir"], Y["vis_to_ir"], Y["ir_to_vis"]
    if even:
        rv = B["ir_to_vis"]                                                          # M_{r→v}
        ms = (ref_soft_ce(s(f_v0, v), y_v) + ref_soft_ce(s(f_v1, v), y_v)
              + ref_soft_ce(s(f_r, r), y_r) + ref_soft_ce(s(f_r, rv), y_rv))
        ma = ref_soft_ce(s(f_v0, c), y_v) + ref_soft_ce(s(f_v1, c), y_v) + ref_soft_ce(s(f_r, c), y_rv)
        oclr = (ref_sce(s(f_v0, c), s(f_v1, v)) + ref_sce(s(f_v1, c), s(f_v0, v))
                + ref_sce(s(f_r, c), s(f_r, rv)) + ref_sce(s(f_v0, c), s(f_v1, rv))
                + ref_sce(s(f_v1, c), s(f_v0, rv)) + ref_sce(s(f_r, c), s(f_r, v)))
    else:
        vr = B["vis_to_ir"]                                                          # M_{v→r}
        ms = (ref_soft_ce(s(f_v0, v), y_v) + ref_soft_ce(s(f_v1, v), y_v)
              + ref_soft_ce(s(f_v0, vr), y_vr) + ref_soft_ce(s(f_v1, vr), y_vr)
              + ref_soft_ce(s(f_r, r), y_r))
        ma = ref_soft_ce(s(f_v0, c), y_vr) + ref_soft_ce(s(f_v1, c), y_vr) + ref_soft_ce(s(f_r, c), y_r)
        oclr = (ref_sce(s(f_v0, c), s(f_v1, vr)) + ref_sce(s(f_v1, c), s(f_v0, vr))
                + ref_sce(s(f_r, c), s(f_r, r)) + ref_sce(s(f_v0, c), s(f_v1, r))
                + ref_sce(s(f_v1, c), s(f_v0, r)) + ref_sce(s(f_r, c), s(f_r, vr)))
    return ms, ma, oclr


@pytest.mark.parametrize("epoch", [40, 41, 88, 89])
def test_stage_two_loss_hand_computed(epoch):
    gen = torch.Generator().manual_seed(epoch)
    banks, f_v0, f_v1, f_r, hard, soft = random_stage_two_inputs(gen)
    ms, ma, oclr = expected_stage_two(banks, f_v0, f_v1, f_r, soft, even=epoch % 2 == 0)
    loss, parts, _ = stage_two_loss(banks, f_v0, f_v1, f_r, hard, soft, epoch)
    torch.testing.assert_close(loss, ms + ma + oclr)
    assert parts == pytest.approx({"ms": ms.item(), "ma": ma.item(), "oclr": oclr.item()}, rel=1e-5)
    loss_no, parts_no, _ = stage_two_loss(banks, f_v0, f_v1, f_r, hard, soft, epoch, oclr=False)
    torch.testing.assert_close(loss_no, ms + ma)
    assert parts_no["oclr"] == 0.0


@pytest.mark.parametrize("epoch,oclr,n_terms", [(40, True, 13), (41, True, 14),
                                                (42, False, 7), (43, False, 8)])
def test_stage_two_number_of_terms(epoch, oclr, n_terms):
    # every bank row equal -> uniform softmax: each CE or SCE term is exactly log K
    k, d = 6, 4
    names = ("vis", "ir", "ir_to_vis", "vis_to_ir", "unified_vis", "unified_ir")
    banks = {name: ClusterMemory(torch.ones(k, d)) for name in names}
    gen = torch.Generator().manual_seed(0)
    f_v0, f_v1, f_r = torch.randn(3, d, generator=gen), torch.randn(3, d, generator=gen), \
        torch.randn(2, d, generator=gen)
    hard = {"vis": torch.zeros(3, dtype=torch.long), "vis_to_ir": torch.zeros(3, dtype=torch.long),
            "ir": torch.zeros(2, dtype=torch.long), "ir_to_vis": torch.zeros(2, dtype=torch.long)}
    soft = {key: torch.softmax(torch.randn(len(h), k, generator=gen), 1) for key, h in hard.items()}
    loss, _, _ = stage_two_loss(banks, f_v0, f_v1, f_r, hard, soft, epoch, oclr=oclr)
    assert loss.item() == pytest.approx(n_terms * math.log(k), rel=1e-5)


def test_stage_two_updates_call_order_and_reverse_application():
    gen = torch.Generator().manual_seed(5)
    banks, f_v0, f_v1, f_r, hard, soft = random_stage_two_inputs(gen)
    _, _, up_even = stage_two_loss(banks, f_v0, f_v1, f_r, hard, soft, epoch=40)
    assert [u[0] for u in up_even] == ["vis", "vis", "ir", "ir_to_vis", "unified_vis", "unified_vis", "unified_vis"]
    _, _, up_odd = stage_two_loss(banks, f_v0, f_v1, f_r, hard, soft, epoch=41)
    assert [u[0] for u in up_odd] == ["vis", "vis", "vis_to_ir", "vis_to_ir", "ir"] + ["unified_ir"] * 3
    assert torch.equal(up_odd[5][2], hard["vis_to_ir"]) and torch.equal(up_odd[7][2], hard["ir"])
    assert all(not u[1].requires_grad for u in up_odd)

    start = {name: mem.bank.clone() for name, mem in banks.items()}
    apply_updates(banks, up_even)
    # by hand, reverse call order: on M_{c,v} r (h_rv), then v1, then v0 (h_vv)
    cv = ref_sequential_update(start["unified_vis"], f_r.detach(), hard["ir_to_vis"], 0.1)
    cv = ref_sequential_update(cv, f_v1.detach(), hard["vis"], 0.1)
    cv = ref_sequential_update(cv, f_v0.detach(), hard["vis"], 0.1)
    torch.testing.assert_close(banks["unified_vis"].bank, cv, atol=1e-6, rtol=0)
    v = ref_sequential_update(ref_sequential_update(start["vis"], f_v1.detach(), hard["vis"], 0.1),
                              f_v0.detach(), hard["vis"], 0.1)
    torch.testing.assert_close(banks["vis"].bank, v, atol=1e-6, rtol=0)
    forward = ref_sequential_update(ref_sequential_update(start["vis"], f_v0.detach(), hard["vis"], 0.1),
                                    f_v1.detach(), hard["vis"], 0.1)
    assert (forward - v).abs().max() > 1e-3                    # the order is observable
    torch.testing.assert_close(banks["vis_to_ir"].bank, start["vis_to_ir"])  # untouched in an even epoch

    class Recorder:
        def __init__(self):
            self.calls = []

        def update(self, feats, labels, check=True):
            self.calls.append(int(labels[0]))
    rec = {"a": Recorder()}
    apply_updates(rec, [("a", torch.zeros(1, 2), torch.tensor([i])) for i in range(3)])
    assert rec["a"].calls == [2, 1, 0]


def test_stage_two_bad_inputs():
    gen = torch.Generator().manual_seed(2)
    banks, f_v0, f_v1, f_r, hard, soft = random_stage_two_inputs(gen)
    bad = dict(soft, ir_to_vis=soft["ir_to_vis"][:, :2])
    with pytest.raises(ValueError, match=r"soft\['ir_to_vis'\]"):
        stage_two_loss(banks, f_v0, f_v1, f_r, hard, bad, 40)
    with pytest.raises(ValueError, match=r"hard\['vis_to_ir'\]"):
        stage_two_loss(banks, f_v0, f_v1, f_r, dict(hard, vis_to_ir=hard["vis_to_ir"] + 3), soft, 41)
    with pytest.raises(KeyError, match="unified_ir"):
        stage_two_loss({k: v for k, v in banks.items() if k != "unified_ir"}, f_v0, f_v1, f_r, hard, soft, 41)


def test_sce_value_and_gradient_into_both_sides():
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(4, 5, generator=gen, requires_grad=True)
    q = torch.randn(4, 5, generator=gen, requires_grad=True)
    out = sce(p, q)
    torch.testing.assert_close(out, ref_sce(p, q))
    out.backward()
    assert p.grad.abs().sum() > 0 and q.grad.abs().sum() > 0   # the target side is not detached
    # hand check, B = 1, K = 2: target softmax([0, 0.2]/0.2) = [1, e]/(1+e)
    val = sce(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.2]]))
    t = math.e / (1 + math.e)
    assert val.item() == pytest.approx(-((1 - t) * math.log(0.25) + t * math.log(0.75)))


# ----------------------------------------------------------------------------- MBMIL

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hybrid_update_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    k, d, b = 6, 10, 40
    mem = HybridMemory(torch.randn(k, d, generator=gen), momentum=0.3)
    mem.hard = F.normalize(torch.randn(k, d, generator=gen), dim=1)   # hard differs from centroid
    feats = torch.randn(b, d, generator=gen)
    labels = torch.randint(-1, k - 1, (b,), generator=gen)
    exp_c, exp_h = ref_hybrid_update(mem.centroid, mem.hard, feats, labels, 0.3)
    mem.update(feats, labels)
    torch.testing.assert_close(mem.centroid, exp_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(mem.hard, exp_h, atol=1e-6, rtol=0)


def test_hybrid_update_tie_takes_first_in_batch():
    mem = HybridMemory(torch.eye(3), momentum=0.1)
    # rows 1 and 2 both have cosine 0 to hard[0] = e1 (exact tie); row 1 comes first
    feats = torch.tensor([[1.0, 1.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    mem.update(feats, torch.tensor([0, 0, 0]))
    v = torch.tensor([0.1, 0.9, 0.0])
    torch.testing.assert_close(mem.hard[0], v / v.norm())
    mean = (F.normalize(feats, dim=1)).mean(0)
    c = 0.1 * torch.tensor([1.0, 0, 0]) + 0.9 * mean
    torch.testing.assert_close(mem.centroid[0], c / c.norm())
    torch.testing.assert_close(mem.hard[1:], torch.eye(3)[1:])


def test_intra_loss_hybrid_plain_and_clamp():
    gen = torch.Generator().manual_seed(4)
    mem = HybridMemory(torch.randn(5, 8, generator=gen), temp=0.05)
    mem.hard = F.normalize(torch.randn(5, 8, generator=gen), dim=1)
    feats, labels = torch.randn(6, 8, generator=gen), torch.tensor([0, 1, 4, 4, 2, 0])

    def ce(bank):
        return -torch.log_softmax(s(feats, bank), 1)[torch.arange(6), labels].mean()
    ce_h, ce_c = ce(mem.hard), ce(mem.centroid)
    assert ce_c.item() > 0.2
    torch.testing.assert_close(intra_loss(mem, feats, labels), 0.5 * (ce_h + ce_c - 0.2))
    torch.testing.assert_close(intra_loss(mem, feats, labels, hybrid=False), ce_c)
    big = ce_c.item() + 1.0                                     # clamp hits 0
    torch.testing.assert_close(intra_loss(mem, feats, labels, margin=big), 0.5 * ce_h)
    with pytest.raises(ValueError, match="labels"):
        intra_loss(mem, feats, torch.tensor([0, 1, 4, 5, 2, 0]))


def ref_split(feats, labels, modality):
    groups = {}
    for i in range(len(labels)):
        if labels[i] >= 0:
            groups.setdefault((int(labels[i]), int(modality[i])), []).append(i)
    keys = sorted(groups)
    centers = torch.stack([torch.stack([feats[i] / feats[i].norm() for i in groups[key]]).mean(0)
                           for key in keys])
    index = [-1 if labels[i] < 0 else keys.index((int(labels[i]), int(modality[i])))
             for i in range(len(labels))]
    return centers, torch.tensor([key[0] for key in keys]), torch.tensor(index)


def test_split_prototypes_matches_loop():
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(14, 5, generator=gen)
    labels = torch.tensor([3, 0, 3, -1, 0, 7, 7, 3, -1, 0, 7, 3, 5, 5])
    modality = torch.tensor([0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0])
    # cluster 0 and 7 are one-modality (IR only / visible only), 3 and 5 have both
    centers, proto_labels, proto_index = split_prototypes(feats, labels, modality)
    exp_c, exp_l, exp_i = ref_split(feats, labels, modality)
    assert proto_labels.tolist() == [0, 3, 3, 5, 5, 7] == exp_l.tolist()
    assert torch.equal(proto_index, exp_i) and proto_index[3] == -1
    torch.testing.assert_close(centers, exp_c)
    assert (centers.norm(dim=1) < 1).any()                      # not re-normalised
    with pytest.raises(ValueError, match="modality"):
        split_prototypes(feats, labels, torch.full((14,), 2))
    with pytest.raises(ValueError, match="outlier"):
        split_prototypes(feats, torch.full((14,), -1), modality)


def ref_multi_positive(logits, labels, proto_labels, k):
    losses = []
    for i in range(logits.shape[0]):
        pos = [j for j in range(logits.shape[1]) if proto_labels[j] == labels[i]]
        neg = sorted((j for j in range(logits.shape[1]) if j not in pos),
                     key=lambda j: -float(logits[i, j].detach()))
        cand = pos + neg[:max(0, min(k, logits.shape[1]) - len(pos))]
        denom = torch.logsumexp(logits[i, cand], 0)
        losses.append(-sum(logits[i, p] - denom for p in pos) / len(pos))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("hard_neg_k", [4, 50])   # P = 9: hard negatives selected / all used
def test_multi_positive_loss_matches_loop(hard_neg_k):
    gen = torch.Generator().manual_seed(7)
    proto_labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 5])     # 1 or 2 positives per label
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 2])
    logits = torch.randn(8, 9, generator=gen, requires_grad=True)
    out = multi_positive_loss(logits, labels, proto_labels, hard_neg_k)
    torch.testing.assert_close(out, ref_multi_positive(logits, labels, proto_labels, hard_neg_k))
    out.backward()
    if hard_neg_k == 4:   # a row with 1 positive keeps 3 negatives: 5 of its 8 entries get no grad
        assert int((logits.grad[1] == 0).sum()) == 5


def test_multi_positive_loss_hand_checked_and_errors():
    # one row, prototypes [z=0, z=0, z=1, z=2], logits [1, 2, 5, 0], k = 3 -> S = {0, 1, 2}
    logits = torch.tensor([[1.0, 2.0, 5.0, 0.0]])
    denom = math.log(math.e + math.e ** 2 + math.e ** 5)
    expected = -((1 - denom) + (2 - denom)) / 2
    out = multi_positive_loss(logits, torch.tensor([0]), torch.tensor([0, 0, 1, 2]), 3)
    assert out.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="no prototype"):
        multi_positive_loss(logits, torch.tensor([9]), torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="hard_neg_k"):
        multi_positive_loss(logits, torch.tensor([0]), torch.tensor([0, 0, 1, 2]), 1)


def test_global_loss_averages_both_banks():
    gen = torch.Generator().manual_seed(8)
    feats = torch.randn(20, 6, generator=gen)
    labels = torch.randint(0, 4, (20,), generator=gen)
    modality = torch.arange(20) % 2
    centers, proto_labels, proto_index = split_prototypes(feats, labels, modality)
    mem = HybridMemory(centers)
    mem.update(feats[:7] + 0.5, proto_index[:7])                # hard and centroid now differ
    batch = torch.randn(5, 6, generator=gen)
    y = labels[:5]
    out = global_loss(mem, batch, y, proto_labels, hard_neg_k=3)
    exp = 0.5 * (ref_multi_positive(s(batch, mem.hard), y, proto_labels, 3)
                 + ref_multi_positive(s(batch, mem.centroid), y, proto_labels, 3))
    torch.testing.assert_close(out, exp)
