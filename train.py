"""Train MULT (He et al., IJCV 2024) or MBMIL (Wang et al., AAAI 2026) end to end, both stages, one command.

    python train.py                                   # MULT on the synthetic demo set (rendered if missing)
    python train.py --dataset regdb --trial 1         # MULT on RegDB split 1 (one model per split)
    python train.py --dataset sysu --method mbmil     # MBMIL on SYSU-MM01
    torchrun --standalone --nproc_per_node=4 train.py --dataset sysu    # the same training on 4 GPUs

Every epoch is the papers' loop: extract the features of every training image -> cluster -> associate -> build
the memories -> train, then evaluate (docs/mult.md §3, docs/mbmil.md §A.4).
MULT:  per-modality Jaccard + DBSCAN (§4); stage one trains on intra-modality memories (§7.2); stage two adds the
       Modality-Unified Label Transfer (§5) and trains with AMIRL and OCLR (§7.3-7.5)          -> `mult_epoch`
MBMIL: per-modality clustering for the intra step; in stage two, one modality-aware global clustering
       (docs/mbmil.md §A.2) and split-and-contrast prototypes (§A.3)                          -> `mbmil_epoch`
The file reads in sections: presets and flags; MULT's epoch and its steps; MBMIL's; the steps both share; the
loop. Every random draw of an epoch (sampler, augmentation) is seeded by (--seed, epoch), so a resumed run
reproduces the uninterrupted one. Run folders, checks, checkpoints, logging and several processes: plumbing/.
"""
import argparse
import logging
import time
from contextlib import ExitStack

import numpy as np
import torch
from tqdm import tqdm

import clustering
import memory
import mult
from data import samplers, transforms
from data.common import IR, VIS
from data.datasets import ROOTS
from data.fast import use_huge_pages
from data.fast.loader import training_loader
from evaluate import evaluate_dataset
from features import extract_features
from model import TwoStreamNet
from plumbing import checkpoints, checks, diagnostics, distributed, reports, runs
from plumbing.cli import run as run_cli
from plumbing.logs import NoRunLog, setup as setup_logging
from plumbing.regdb_splits import run_all_splits

log = logging.getLogger("train")

# ---------------------------------------------------------------------------------------------------
# Presets and flags

# The papers' settings per dataset (docs/mult.md §8, §13; docs/mbmil.md §A.4), applied before the command line,
# so that any flag given wins. LLCM: neither paper gives values, so SYSU-MM01's (the other multi-camera set) are
# used, as the unsupervised methods that report LLCM start from theirs. The synthetic preset is the 2-core CPU
# demo: a ResNet-18 from demo/pretrain.py's stand-in for ImageNet weights, small images, few clusters per batch.
PAPER = dict(arch="resnet50", pretrained="imagenet", height=288, width=144, epochs=90, stage_one_epochs=40,
             clusters=12, instances=12, lr_steps="20,60,80", workers=4)
PRESETS = {
    "sysu": dict(PAPER, data_root=ROOTS["sysu"], iters="300,200", eps=0.6, global_eps=0.6, eval_trials=10),
    "regdb": dict(PAPER, data_root=ROOTS["regdb"], iters="100,100", eps=0.3, global_eps=0.3, eval_trials=1),
    "llcm": dict(PAPER, data_root=ROOTS["llcm"], iters="300,200", eps=0.6, global_eps=0.6, eval_trials=10),
    "synthetic": dict(data_root=ROOTS["synthetic"], arch="resnet18", pretrained="synthetic", height=64, width=32,
                      epochs=12, stage_one_epochs=6, iters="60,60", eps=0.5, global_eps=0.5, clusters=8,
                      instances=8, augment="light", lr_steps="6,9,11", eval_trials=10, workers=1),
}
# MBMIL: two stages of 50 epochs, each with a fresh Adam and StepLR(20, 0.1), 8 pseudo-ids x 16 instances. Its
# subset rule keeps half of SYSU's visible images per step; LLCM's visible-to-infrared ratio (1.21:1) is close
# to RegDB's 1:1, so it keeps them all. The synthetic steps (2 and 5 per stage) drop stage two at epochs 8, 11.
MBMIL_PRESETS = {
    "sysu": dict(epochs=100, stage_one_epochs=50, iters="200,200", clusters=8, instances=16, subset_ratio=0.5,
                 lr_steps="20,40"),
    "regdb": dict(epochs=100, stage_one_epochs=50, iters="100,100", clusters=8, instances=16, subset_ratio=1.0,
                  lr_steps="20,40"),
    "llcm": dict(epochs=100, stage_one_epochs=50, iters="200,200", clusters=8, instances=16, subset_ratio=1.0,
                 lr_steps="20,40"),
    "synthetic": dict(subset_ratio=0.5, clusters=8, instances=8, iters="60,30", lr_steps="2,5"),
}
DEFAULTS = dict(k1=30, k2=6, min_samples=4, lr=3.5e-4, weight_decay=5e-4, alpha=0.2, beta=0.7, temp=0.05,
                sinkhorn_lambda=25.0, momentum=0.1, subset_ratio=1.0, hard_neg_k=50, intra_margin=0.2,
                global_k1=30, global_k2=6, eval_every=1, extract_batch=128, augment="paper")
# MBMIL's global step draws its batches' augmentations from the seed of epoch + this offset, apart from the
# intra step's (which uses the epoch's own): two loaders of one epoch must not repeat each other's draws.
GLOBAL_STEP_SEED_OFFSET = 100_000


def get_args_parser():
    p = argparse.ArgumentParser("vireid training (MULT / MBMIL)")
    a = p.add_argument
    a("--method", choices=("mult", "mbmil"), default="mult", help="mult (IJCV'24, default) or mbmil (AAAI'26)")
    a("--dataset", choices=tuple(PRESETS), default="synthetic", help="synthetic (default demo), sysu, regdb, llcm")
    a("--data-root", type=str, default=None, help="dataset folder (layouts: docs/datasets.md)")
    a("--trial", type=str, default="1",
      help="RegDB split 1..10, or all: the protocol trains one model per split, then averages the ten")
    a("--allow-count-mismatch", action="store_true", help="accept a SYSU-MM01 or LLCM with non-official counts")
    a("--arch", choices=("resnet50", "resnet18"), default=None, help="backbone (papers: resnet50)")
    a("--pretrained", type=str, default=None,
      help="imagenet (torchvision V1, papers), a .pth path, none, or synthetic (demo/pretrain.py; the demo)")
    a("--height", type=int, default=None, help="input height (papers: 288)")
    a("--width", type=int, default=None, help="input width (papers: 144)")
    a("--epochs", type=int, default=None, help="total epochs, both stages (MULT: 90; MBMIL: 100)")
    a("--stage-one-epochs", type=int, default=None, help="epochs of stage one (MULT: 40; MBMIL: 50)")
    a("--iters", type=str, default=None, help="iterations per epoch, 'N' or 'stage1,stage2' (MULT SYSU: 300,200)")
    a("--augment", choices=("paper", "light"), default=None,
      help="paper: each stage's augmentations (docs/mult.md §1.4); light: stage two's throughout (the demo)")
    a("--clusters", type=int, default=None, help="clusters per batch (MULT: 12; MBMIL: 8)")
    a("--instances", type=int, default=None, help="images per cluster and modality (MULT: 12; MBMIL: 16)")
    a("--lr", type=float, default=None, help="Adam learning rate (3.5e-4)")
    a("--weight-decay", type=float, default=None, help="Adam weight decay (5e-4)")
    a("--lr-steps", type=str, default=None,
      help="epochs where the lr drops x0.1 (MULT: 20,60,80 absolute; MBMIL: 20,40 within each stage)")
    a("--eps", type=float, default=None, help="DBSCAN eps (SYSU 0.6, RegDB 0.3)")
    a("--k1", type=int, default=None, help="Jaccard k1 (30)")
    a("--k2", type=int, default=None, help="Jaccard k2 (6)")
    a("--min-samples", type=int, default=None, help="DBSCAN min_samples (4)")
    a("--association", choices=mult.ASSOCIATIONS, default="mult", help="MULT stage-two label association (mult)")
    a("--oclr", action=argparse.BooleanOptionalAction, default=True, help="OCLR loss (on; ablation: --no-oclr)")
    a("--alpha", type=float, default=None, help="label-transfer anchor weight α (0.2)")
    a("--beta", type=float, default=None, help="hard/soft label mix β (0.7)")
    a("--temp", type=float, default=None, help="memory temperature τ (0.05)")
    a("--sinkhorn-lambda", type=float, default=None, help="Sinkhorn λ (25)")
    a("--momentum", type=float, default=None, help="memory momentum, the weight of the old entry (0.1)")
    a("--subset-ratio", type=float, default=None, help="MBMIL: visible share of the intra step (SYSU 0.5, RegDB 1)")
    a("--hard-neg-k", type=int, default=None, help="MBMIL: candidates of the multi-positive loss (50)")
    a("--intra-margin", type=float, default=None, help="MBMIL: margin of the centroid term (0.2)")
    a("--intra-loss", choices=("hybrid", "infonce"), default="hybrid", help="MBMIL intra-modality loss (hybrid)")
    a("--global-k1", type=int, default=None, help="MBMIL: k1 of the modality-aware global clustering (30, even)")
    a("--global-k2", type=int, default=None, help="MBMIL: k2 of the global clustering (6)")
    a("--global-eps", type=float, default=None, help="MBMIL: DBSCAN eps of the global clustering (as --eps)")
    a("--diagnostics", action=argparse.BooleanOptionalAction, default=None,
      help="also run the baselines on the same features each stage-two epoch (MULT: OT's labels; MBMIL: the plain "
           "Jaccard's clusters) and log their quality; changes no result (default: synthetic only)")
    a("--eval-every", type=int, default=None, help="evaluate every N epochs (1; the last epoch always)")
    a("--eval-trials", type=int, default=None, help="SYSU / LLCM gallery draws of the final evaluation (10)")
    a("--eval-untrained", action=argparse.BooleanOptionalAction, default=None,
      help="evaluate the untrained model first, the reference of the learning curve (default: synthetic only)")
    a("--select-on-test", action="store_true",
      help="ALSO report the best epoch by test mAP (model selection on the test set; labelled as such)")
    a("--seed", type=int, default=1, help="seeds everything (1)")
    runs.add_run_flags(p)   # where and how the run runs: --out, --resume, --device, --amp, --input, --workers, ...
    return p


# ---------------------------------------------------------------------------------------------------
# MULT: one epoch (docs/mult.md §3)

def mult_epoch(net, optimizer, vis, ir, epoch, args):
    """Pseudo-labels from the current features, then one epoch of MULT training -> the epoch record, or None
    when DBSCAN found no cluster."""
    stage, world = stage_of(epoch, args), world_of(args)
    feats_v, feats_r = extract(net, vis, args), extract(net, ir, args)              # [N_v, D], [N_r, D]
    pseudo = distributed.on_rank_zero(world, mult_pseudo_labels, feats_v, feats_r, stage, args)
    if pseudo is None:
        return None
    record = dict(pseudo["record"], stage=stage)
    if world.main:                  # ground truth, logged beside the method: it never reaches a loss or a sampler
        record.update(diagnostics.mult_epoch(pseudo, feats_v, feats_r, vis, ir, args))
    banks = mult_memories(feats_v, feats_r, pseudo["clusters"], stage, args)
    rng = np.random.default_rng([args.seed, epoch])
    loader = make_loader(vis, ir, mult_batches(pseudo, stage, args, rng), args, epoch, stage)
    record.update(train_mult(net, optimizer, loader, banks, pseudo, epoch, args))
    return record


def mult_pseudo_labels(feats_v, feats_r, stage, args):
    """Per-modality Jaccard + DBSCAN (§4); in stage two the label transfer (§5) and its β-mixed targets (§5.5).
    -> {"clusters": DBSCAN labels per modality, "hard"/"soft": stage two's labels, "record"}, or None."""
    clusters = {"vis": cluster(feats_v, "vis", args), "ir": cluster(feats_r, "ir", args)}
    if min(labels.max() for labels, _ in clusters.values()) < 0:
        return None
    (labels_v, sim_v), (labels_r, sim_r) = clusters["vis"], clusters["ir"]
    out = {"clusters": {"vis": labels_v, "ir": labels_r},
           "record": {"clusters_vis": int(labels_v.max()) + 1, "clusters_ir": int(labels_r.max()) + 1}}
    if stage == 2:
        t = time.time()
        lt = mult.associate(args.association, feats_v, feats_r, labels_v, labels_r, sim_v, sim_r,
                            alpha=args.alpha, temp=args.temp, sinkhorn_lambda=args.sinkhorn_lambda)
        log.info(f"label transfer ({args.association}): sinkhorn iterations {lt.sinkhorn_iters}, propagation "
                 f"iterations {lt.prop_iters}, {time.time() - t:.1f} s")
        mixed = lt.mixed(args.beta)    # the CE targets β·onehot(h) + (1-β)·Y* (§5.5)
        # A label key names the samples' modality and, after "_to_", the label space it points into.
        out["hard"] = {"vis": lt.labels_v, "ir": lt.labels_r, "vis_to_ir": lt.cross_v, "ir_to_vis": lt.cross_r}
        out["soft"] = {"vis": mixed.soft_v, "ir": mixed.soft_r, "vis_to_ir": mixed.soft_cross_v,
                       "ir_to_vis": mixed.soft_cross_r}
    return out


def mult_memories(feats_v, feats_r, clusters, stage, args):
    """The cluster memories, each initialised to its label space's DBSCAN centers. Stage one: one per modality
    (§7.2). Stage two, six (§7.3): each modality's own; the other modality's features in this modality's label
    space ("ir_to_vis" M_{r→v}, "vis_to_ir" M_{v→r}); both modalities in one label space ("unified_*" M_c)."""
    center_v = clustering.cluster_centers(feats_v, torch.as_tensor(clusters["vis"], device=args.device))  # [K_v, D]
    center_r = clustering.cluster_centers(feats_r, torch.as_tensor(clusters["ir"], device=args.device))   # [K_r, D]
    in_vis_space = ("vis", "ir_to_vis", "unified_vis")
    names = ("vis", "ir") if stage == 1 else ("vis", "ir", "ir_to_vis", "vis_to_ir", "unified_vis", "unified_ir")
    return {name: memory.ClusterMemory(center_v if name in in_vis_space else center_r, args.momentum, args.temp)
            for name in names}


def mult_batches(pseudo, stage, args, rng):
    """The epoch's batches [iters, B, 2] of (visible row, infrared row): stage one pairs unrelated clusters of
    each modality; stage two pairs each cluster's images with those the label transfer gives it (§1.5)."""
    if stage == 1:
        c = pseudo["clusters"]
        return samplers.stage_one_batches(c["vis"], c["ir"], args.iters[0], args.clusters, args.instances, rng)
    h = pseudo["hard"]
    return samplers.stage_two_batches(h["vis"], h["ir_to_vis"], h["vis_to_ir"], h["ir"], args.iters[1],
                                      args.clusters, args.instances, rng)


def train_mult(net, optimizer, loader, banks, pseudo, epoch, args):
    """MULT stage one (§7.2) when `pseudo` has no stage-two labels, else stage two (AMIRL + OCLR, §7.3-7.5).
    -> {"loss", "loss_<part>" (stage two), "loss_per_iteration"}, the losses of the global batch."""
    net.train()
    world = world_of(args)
    two = "hard" in pseudo
    labels = pseudo["hard"] if two else pseudo["clusters"]
    labels = {k: torch.as_tensor(v, device=args.device) for k, v in labels.items()}
    curve, parts_sum = [], {}
    for it, batch in enumerate(progress(loader, epoch, world)):
        vi, ri = batch["vis_index"].to(args.device), batch["ir_index"].to(args.device)   # [B], [B]: this rank's
        f_v0, f_v1, f_r = forward_batch(net, batch, args)                                # each [B, D]
        if not two:
            loss, updates = memory.stage_one_loss(banks, f_v0, f_v1, f_r, labels["vis"][vi], labels["ir"][ri])
        else:                       # visible samples carry the "vis*" labels, infrared ones the "ir*" labels
            rows = {k: vi if k.startswith("vis") else ri for k in labels}
            loss, parts, updates = memory.stage_two_loss(
                banks, f_v0, f_v1, f_r, {k: labels[k][r] for k, r in rows.items()},
                {k: pseudo["soft"][k][r] for k, r in rows.items()}, epoch, oclr=args.oclr)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + distributed.mean_over_ranks(v, world)
        optimise(optimizer, loss, epoch, it)
        # Every rank updates its banks with the whole global batch, in position order: they stay equal.
        memory.apply_updates(banks, [(name, distributed.gather_rows(f, world), distributed.gather_rows(y, world))
                                     for name, f, y in updates])
        curve.append(distributed.mean_over_ranks(loss.item(), world))
    n = max(len(curve), 1)
    return dict(loss=sum(curve) / n, **{f"loss_{k}": v / n for k, v in parts_sum.items()}, loss_per_iteration=curve)


# ---------------------------------------------------------------------------------------------------
# MBMIL: one epoch (docs/mbmil.md §A.2-A.5)

def mbmil_epoch(net, optimizer, vis, ir, epoch, args):
    """Pseudo-labels from the current features, then one epoch of MBMIL training -> the epoch record, or None
    when DBSCAN found no cluster."""
    stage, world = stage_of(epoch, args), world_of(args)
    rng = np.random.default_rng([args.seed, epoch])
    feats_v, feats_r = extract(net, vis, args), extract(net, ir, args)              # [N_v, D], [N_r, D]
    intra_rows, global_rows = samplers.visible_split(len(vis), args.subset_ratio, rng)   # the subset rule
    pseudo = distributed.on_rank_zero(world, mbmil_pseudo_labels, feats_v, feats_r, intra_rows, global_rows,
                                      stage, args)
    if pseudo is None:
        return None
    record = dict(pseudo["record"], stage=stage)
    if world.main:                  # ground truth, logged beside the method: it never reaches a loss or a sampler
        record.update(diagnostics.mbmil_epoch(pseudo, feats_v, feats_r, vis, ir, args))
    mems = mbmil_memories(feats_v, feats_r, pseudo, args)
    c = pseudo["clusters"]
    loaders = [make_loader(vis, ir, samplers.stage_one_batches(c["vis"], c["ir"], args.iters[stage - 1],
                                                               args.clusters, args.instances, rng),
                           args, epoch, stage)]
    if "global" in pseudo:           # stage two: batches of the global clusters for the split-and-contrast step
        g = pseudo["global"]
        loaders.append(make_loader(vis, ir, samplers.stage_one_batches(g["vis"], g["ir"], args.iters[1],
                                                                       args.clusters, args.instances, rng),
                                   args, epoch + GLOBAL_STEP_SEED_OFFSET, stage))
    record.update(train_mbmil(net, optimizer, loaders, mems, pseudo, epoch, args))
    return record


def mbmil_pseudo_labels(feats_v, feats_r, intra_rows, global_rows, stage, args):
    """Per-modality clustering for the intra step (the visible subset only); in stage two one modality-aware
    clustering over [visible complement; all infrared] (§A.2). -> {"clusters", "global" (stage two), ...}."""
    labels_v = np.full(len(feats_v), -1, dtype=np.int64)                           # outside the subset: -1
    labels_v[intra_rows], _ = cluster(feats_v[torch.as_tensor(intra_rows)], "vis (intra subset)", args)
    labels_r, _ = cluster(feats_r, "ir", args)
    if labels_v.max() < 0 or labels_r.max() < 0:
        return None
    out = {"clusters": {"vis": labels_v, "ir": labels_r}, "intra_rows": intra_rows, "global_rows": global_rows,
           "record": {"clusters_vis": int(labels_v.max()) + 1, "clusters_ir": int(labels_r.max()) + 1}}
    if stage == 1:
        return out
    n_g = len(global_rows)
    modality = np.r_[np.full(n_g, VIS), np.full(len(feats_r), IR)]
    g_labels, _ = cluster(torch.cat([feats_v[torch.as_tensor(global_rows)], feats_r]), "global (modality-aware)",
                          args, modality=modality, step="global")                  # [N_g + N_r]
    if g_labels.max() < 0:
        return None
    labels_v = np.full(len(feats_v), -1, dtype=np.int64)                           # global label per visible row
    labels_v[global_rows] = g_labels[:n_g]
    out["global"] = {"labels": g_labels, "modality": modality, "vis": labels_v, "ir": g_labels[n_g:]}
    return out


def mbmil_memories(feats_v, feats_r, pseudo, args):
    """A hybrid memory per modality from its intra clusters; in stage two the memory of the global clusters'
    modality-specific prototypes ("split", §A.3), with each training row's prototype."""
    def hybrid(feats, labels):
        centers = clustering.cluster_centers(feats, torch.as_tensor(labels, device=args.device))   # [K, D]
        return memory.HybridMemory(centers, momentum=args.momentum, temp=args.temp)
    mems = {"vis": hybrid(feats_v, pseudo["clusters"]["vis"]), "ir": hybrid(feats_r, pseudo["clusters"]["ir"])}
    if "global" in pseudo:
        g, rows = pseudo["global"], torch.as_tensor(pseudo["global_rows"], device=args.device)
        protos, proto_labels, proto_index = memory.split_prototypes(
            torch.cat([feats_v[rows], feats_r]), torch.as_tensor(g["labels"], device=args.device),
            torch.as_tensor(g["modality"], device=args.device))                   # [P, D], [P], [N_g + N_r]
        proto_v = torch.full((len(feats_v),), -1, dtype=torch.int64, device=args.device)   # prototype per vis row
        proto_v[rows] = proto_index[:len(rows)]
        mems["global"] = memory.HybridMemory(protos, momentum=args.momentum, temp=args.temp)
        mems["prototypes"] = {"labels": proto_labels, "vis": proto_v, "ir": proto_index[len(rows):]}
    return mems


def train_mbmil(net, optimizer, loaders, mems, pseudo, epoch, args):
    """Per iteration the intra-modality step, then in stage two the global split-and-contrast step (§A.3).
    -> {"loss", "loss_intra", "loss_global" (stage two), "loss_per_iteration"}, the losses of the global batch."""
    net.train()
    world = world_of(args)
    gather = distributed.Gather(world)            # rows of every rank's share, in global position order
    intra = {m: torch.as_tensor(pseudo["clusters"][m], device=args.device) for m in ("vis", "ir")}
    glob = {m: torch.as_tensor(pseudo["global"][m], device=args.device) for m in ("vis", "ir")} \
        if "global" in pseudo else None
    sums, curve = {"loss_intra": 0.0, "loss_global": 0.0}, []
    batches = zip(*loaders) if len(loaders) == 2 else ((b, None) for b in loaders[0])
    for it, (batch, gbatch) in enumerate(progress(batches, epoch, world, total=len(loaders[0]))):
        # (1) L_intra^vis + L_intra^ir: both visible views share the pseudo-label.
        vi, ri = batch["vis_index"].to(args.device), batch["ir_index"].to(args.device)
        f_v0, f_v1, f_r = forward_batch(net, batch, args)
        y_v, y_r = intra["vis"][vi], intra["ir"][ri]
        loss = (intra_loss(mems["vis"], torch.cat([f_v0, f_v1]), y_v.repeat(2), args, world)
                + intra_loss(mems["ir"], f_r, y_r, args, world))
        optimise(optimizer, loss, epoch, it)
        mems["vis"].update(torch.cat([gather(f_v0.detach()), gather(f_v1.detach())]), gather(y_v).repeat(2))
        mems["ir"].update(gather(f_r.detach()), gather(y_r))
        curve.append(distributed.mean_over_ranks(loss.item(), world))
        sums["loss_intra"] += curve[-1]
        if gbatch is None:
            continue
        # (2) ½(L_glb^ir + L_glb^vis): multi-positive contrast over the modality-specific prototypes.
        vi, ri = gbatch["vis_index"].to(args.device), gbatch["ir_index"].to(args.device)
        g_v0, g_v1, g_r = forward_batch(net, gbatch, args)
        protos = mems["prototypes"]
        loss = 0.5 * (memory.global_loss(mems["global"], g_r, glob["ir"][ri], protos["labels"], args.hard_neg_k)
                      + memory.global_loss(mems["global"], torch.cat([g_v0, g_v1]), glob["vis"][vi].repeat(2),
                                           protos["labels"], args.hard_neg_k))
        optimise(optimizer, loss, epoch, it)
        proto_v = gather(protos["vis"][vi])      # the memory is updated by prototype rows, not global labels
        mems["global"].update(torch.cat([gather(g_v0.detach()), gather(g_v1.detach()), gather(g_r.detach())]),
                              torch.cat([proto_v, proto_v, gather(protos["ir"][ri])]))
        global_loss = distributed.mean_over_ranks(loss.item(), world)
        sums["loss_global"] += global_loss
        curve[-1] += global_loss
    n = max(len(curve), 1)
    out = {k: v / n for k, v in sums.items() if glob is not None or k == "loss_intra"}
    return dict(out, loss=sum(out.values()), loss_per_iteration=curve)


def intra_loss(mem, feats, labels, args, world):
    """L_intra (§A.3) of one modality; its clamp acts on the whole global batch's mean, across processes."""
    return memory.intra_loss(mem, feats, labels, margin=args.intra_margin, hybrid=args.intra_loss == "hybrid",
                             batch_mean=distributed.GlobalMean(world))


# ---------------------------------------------------------------------------------------------------
# Steps both methods share

def stage_of(epoch, args):
    return 1 if epoch < args.stage_one_epochs else 2


def world_of(args):
    """This process's place among the --world-size ones (one, without torchrun)."""
    return distributed.World(args.rank, args.world_size, args.device)


def extract(net, images, args):
    """Eval features of every image of one modality, no flip (the clustering input): [N, D] on the device, in
    row order. Each rank extracts a contiguous share of the rows, and every rank gets all of them."""
    model = getattr(net, "module", net)          # the network itself, outside DistributedDataParallel
    model.eval()
    world = world_of(args)
    lo, hi = distributed.share(len(images), world)
    feats = extract_features(model.modality_fn(), images.subset(np.arange(lo, hi)), args.height, args.width,
                             device=args.device, batch_size=args.extract_batch, flip=False, num_workers=args.workers,
                             interpolation=interpolation(args), desc=f"features {'vis' if images.modality == VIS else 'ir'}",
                             progress=world.main, cache=getattr(images, "cache", None))
    return distributed.gather_rows(feats.to(args.device), world)


def interpolation(args):
    """The resize of training, extraction and testing: bilinear as MULT's code, bicubic as MBMIL's."""
    return "bicubic" if args.method == "mbmil" else "bilinear"


def cluster(feats, name, args, modality=None, step="intra"):
    """Jaccard + DBSCAN (docs/mult.md §4) -> (labels int64 [N], similarity csr), with a one-line summary.
    step "intra" takes --k1, --k2, --eps; MBMIL's "global" --global-k1, --global-k2, --global-eps."""
    t = time.time()
    k1, k2, eps = (args.k1, args.k2, args.eps) if step == "intra" else (args.global_k1, args.global_k2, args.global_eps)
    sim = clustering.jaccard_similarity(feats, k1, k2, modality=modality)
    labels = clustering.dbscan(sim, eps, args.min_samples)
    log.info(f"clustering {name}: {int(labels.max()) + 1} clusters, {100 * np.mean(labels < 0):.1f}% outliers, "
             f"{time.time() - t:.1f} s")
    return labels, sim


def make_loader(vis, ir, batches, args, epoch, stage):
    """This rank's share of the epoch's batches (contiguous positions of every global batch); the augmentation
    of each position is seeded by (--seed, epoch, batch, global position), the same draws for both inputs."""
    tfm = transforms.train_transforms(args.height, args.width, 2 if args.augment == "light" else stage,
                                      method=args.method, pad=transforms.crop_pad(args.height))
    lo, hi = distributed.share(batches.shape[1], world_of(args))
    seed = int(np.random.SeedSequence([args.seed, epoch, 0]).generate_state(1)[0])
    return training_loader(vis, ir, tfm, batches[:, lo:hi], seed, lo, args.input, args.device, args.workers)


def progress(batches, epoch, world, total=None):
    return tqdm(batches, total=total, desc=f"epoch {epoch}", leave=False, disable=not world.main)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def forward_batch(net, batch, args):
    """One forward of the two visible views and the IR images: (f_v0, f_v1, f_r), each [B, D]. Mixed precision
    (--amp) covers the backbone only: the features leave it as float32, for the memories and the losses."""
    v0, v1, r = (batch[k].to(args.device, non_blocking=True) for k in ("v0", "v1", "r"))
    x_vis = torch.cat([v0, v1])
    if args.channels_last:
        x_vis, r = x_vis.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=torch.device(args.device).type, dtype=AMP_DTYPES.get(args.amp),
                        enabled=args.amp != "off"):
        f = net(x_vis, r).float()
    b = v0.shape[0]
    return f[:b], f[b:2 * b], f[2 * b:]


def optimise(optimizer, loss, epoch, it):
    """One step; with --amp fp16 through the optimizer's loss scaler (a pass-through otherwise)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, iteration {it}: stopping. The last "
                                 f"good checkpoint is last.pth of the previous epoch; try a lower --lr or --amp off.")
    optimizer.zero_grad(set_to_none=True)
    optimizer.scaler.scale(loss).backward()
    optimizer.scaler.step(optimizer)
    optimizer.scaler.update()


def make_optimizer(model, args):
    """Adam, two parameter groups (BN-neck and the rest) at the same lr (docs/mult.md §8), with its fp16 loss
    scaler attached (enabled by --amp fp16 only)."""
    neck = [p for p in model.bnneck.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("bnneck.")]
    optimizer = torch.optim.Adam([{"params": rest}, {"params": neck}], lr=args.lr, weight_decay=args.weight_decay)
    optimizer.scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.amp == "fp16")
    return optimizer


def learning_rate(epoch, args):
    """Step schedule x0.1 at each of --lr-steps: MULT keys it on the absolute epoch (§8); MBMIL restarts it in
    stage two (a fresh stage-two run in the official code)."""
    if args.method == "mbmil" and epoch >= args.stage_one_epochs:
        epoch -= args.stage_one_epochs
    return args.lr * 0.1 ** sum(epoch >= s for s in args.lr_steps)


def run_evaluation(model, args, trials):
    """The dataset's official protocol with `trials` gallery draws; run by rank 0 alone."""
    model.eval()
    return evaluate_dataset(model.modality_fn(), args.dataset, args.data_root, args.trial, range(trials),
                            height=args.height, width=args.width, device=args.device, batch_size=args.extract_batch,
                            num_workers=args.workers, interpolation=interpolation(args))


# ---------------------------------------------------------------------------------------------------
# The loop

def main(argv=None):
    use_huge_pages()                   # before the first tensor: PyTorch reads the switch at its first allocation
    args = resolve_args(get_args_parser().parse_args(argv))
    checks.check_world(args)
    world = distributed.setup(args.device, args.dist_timeout)       # a world of one without torchrun
    args.device, args.rank, args.world_size = world.device, world.rank, world.size
    setup_logging(world.main)
    if args.trial == "all":
        return run_all_splits(args, world, resolve_split, train, learning_rate)
    return train(args, world)


def train(args, world):
    """One run: its preparation (rank 0), the epochs, the report. Rank 0 alone checks, logs and writes."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with ExitStack() as hold:                   # the run folder stays held until the run ends, however it ends
        run = distributed.on_rank_zero(world, checks.prepare_run, args, hold, preset_args(args), learning_rate,
                                       interpolation(args))
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        model = TwoStreamNet(args.arch, run["weights"]).to(args.device)
        if world.size > 1 and args.sync_bn:
            distributed.global_batch_norm(model)                  # BN statistics of the whole global batch
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, args)
        state = checkpoints.restore(model, optimizer, run, args, world)
        net = distributed.parallel(model, world)
        with runs.open_run_folder(args, run["plan"], state["history"], preset_args(args)) if world.main \
                else NoRunLog() as run_log:
            runs.log_start(args, preset_args(args), run, state["start"])
            if run["caches"] is not None:          # the other ranks received them by file path
                run["vis"].cache, run["ir"].cache = run["caches"]["vis"], run["caches"]["ir"]
            if run["plan"]["mode"] == "fresh" and args.eval_untrained and world.main:
                state["untrained"] = run_evaluation(model, args, args.eval_trials)
                log.info("untrained model (reference for the learning curve):\n"
                         + reports.format_table(state["untrained"]))
            for epoch in range(state["start"], args.epochs):
                if args.method == "mbmil" and epoch == args.stage_one_epochs and epoch > 0:
                    optimizer = make_optimizer(model, args)    # MBMIL's stage two starts a fresh Adam (§A.4)
                state["history"].append(run_epoch(net, model, optimizer, run, epoch, state, args, world))
                if world.main:
                    checkpoints.save_epoch(model, optimizer, args, state, run_log)
            if not world.main:
                return None
            if state["results"] is None:   # a finished run whose checkpoint has no results: evaluate it now
                state["results"] = run_evaluation(model, args, args.eval_trials)
            reports.final_report(state["results"], state["untrained"], state["history"], args)
            return state["results"]


def run_epoch(net, model, optimizer, run, epoch, state, args, world):
    """One epoch of the method at its scheduled lr, then its evaluation when due -> the epoch record."""
    t0 = time.time()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(epoch, args)
    record = (mult_epoch if args.method == "mult" else mbmil_epoch)(net, optimizer, run["vis"], run["ir"], epoch, args)
    if record is None:
        log.info(f"epoch {epoch}: DBSCAN found no cluster (eps {args.eps}); this epoch trains nothing and the model "
                 f"is unchanged. If this persists, raise --eps or check the features.")
        record = {"stage": stage_of(epoch, args), "skipped": "no clusters"}
    last = epoch == args.epochs - 1
    if world.main and (last or (epoch + 1) % args.eval_every == 0):
        results = run_evaluation(model, args, args.eval_trials if last else 1)
        record["eval"] = {name: round(r["mean"]["mAP"], 2) for name, r in results.items()}
        state["results"] = results if last else None
    record.update(epoch=epoch, lr=learning_rate(epoch, args), time=round(time.time() - t0, 1))
    log.info(reports.epoch_line(record))
    return record


def preset(method, dataset):
    """The flags the papers (or the demo) set for this method and dataset, over DEFAULTS."""
    return {**DEFAULTS, **PRESETS[dataset], **(MBMIL_PRESETS[dataset] if method == "mbmil" else {})}


def resolve_args(args):
    """Every flag left unset from the presets, every flag checked, the run folder named."""
    return checks.resolve_args(args, get_args_parser(), preset)


def preset_args(args):
    """The result flags the presets give for this method, dataset and trial."""
    return checks.preset_args(args, get_args_parser(), preset)


def resolve_split(args):
    """One RegDB split of --trial all: its resolved flags and its presets' result flags."""
    return resolve_args(args), preset_args(args)


def cli(argv=None):
    """main() as the command line runs it: a problem with the input is one line on stderr and exit status 2."""
    return run_cli(main, "train.py", argv)


if __name__ == "__main__":
    cli()
