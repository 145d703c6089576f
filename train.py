"""Train MULT (He et al., IJCV 2024) or MBMIL (Wang et al., AAAI 2026) end to end, both stages, one command.

    python train.py                                   # MULT on the synthetic demo set (rendered if missing)
    python train.py --dataset regdb --trial 1         # MULT on RegDB split 1 (one model per split)
    python train.py --dataset sysu --method mbmil     # MBMIL on SYSU-MM01
    torchrun --standalone --nproc_per_node=4 train.py --dataset sysu    # the same training on 4 GPUs

Every epoch is the papers' loop: extract the features of every training image -> cluster -> associate -> build
the memories -> train, then evaluate (docs/mult.md §3, docs/mbmil.md §A.4).
MULT (`mult_epoch`): per-modality Jaccard + DBSCAN (§4), stage one on intra-modality memories (§7.2); stage two
  adds the Modality-Unified Label Transfer (§5) and trains with AMIRL and OCLR (§7.3-7.5).
MBMIL (`mbmil_epoch`): per-modality clusters for the intra step; in stage two one modality-aware global clustering
  (docs/mbmil.md §A.2) and split-and-contrast prototypes (§A.3).
Sections: presets and flags; MULT's epoch and its steps; MBMIL's; the steps both share; the loop. Every random
draw of an epoch is seeded by (--seed, epoch): a resumed run reproduces the uninterrupted one. plumbing/ holds
the run folders, checks, checkpoints, logging and several processes.
"""
import argparse
import logging
import time
from contextlib import ExitStack
from functools import partial

import numpy as np
import torch

import clustering
import memory
import mult
from data import samplers, transforms
from data.common import IR, VIS
from data.datasets import ROOTS
from data.fast import use_huge_pages
from data.fast.loader import training_loader
from evaluate import evaluate_run
from features import AMP_DTYPES, extract_features
from model import TwoStreamNet
from plumbing import checkpoints, checks, curves, diagnostics, distributed, reports, runs
from plumbing.cli import run as run_cli
from plumbing.device import configure as configure_device, fixed_algorithms
from plumbing.logs import LossReadout, setup as setup_logging
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
# MBMIL: two stages of 50 epochs, each a fresh Adam with StepLR(20, 0.1), 8 pseudo-ids x 16 instances; its subset
# rule keeps half of SYSU's visible images per step, all of RegDB's and LLCM's (their ratio to infrared is ~1:1).
MBMIL_PAPER = dict(epochs=100, stage_one_epochs=50, clusters=8, instances=16, lr_steps="20,40")
MBMIL_PRESETS = {
    "sysu": dict(MBMIL_PAPER, iters="200,200", subset_ratio=0.5),
    "regdb": dict(MBMIL_PAPER, iters="100,100", subset_ratio=1.0),
    "llcm": dict(MBMIL_PAPER, iters="200,200", subset_ratio=1.0),
    "synthetic": dict(subset_ratio=0.5, clusters=8, instances=8, iters="60,30", lr_steps="2,5"),
}
DEFAULTS = dict(k1=30, k2=6, min_samples=4, lr=3.5e-4, weight_decay=5e-4, alpha=0.2, beta=0.7, temp=0.05,
                sinkhorn_lambda=25.0, momentum=0.1, subset_ratio=1.0, hard_neg_k=50, intra_margin=0.2,
                global_k1=30, global_k2=6, eval_every=1, extract_batch=128, augment="paper")
# MBMIL's global step seeds its augmentations with epoch + this: its loader must not repeat the intra step's draws.
GLOBAL_STEP_SEED_OFFSET = 100_000


def get_args_parser():
    p = argparse.ArgumentParser("vireid training (MULT / MBMIL)")
    a = p.add_argument   # a flag left unset (None) takes its dataset and method preset's value, then DEFAULTS'
    a("--method", choices=("mult", "mbmil"), default="mult", help="mult (IJCV'24, default) or mbmil (AAAI'26)")
    a("--dataset", choices=tuple(PRESETS), default="synthetic", help="synthetic (default demo), sysu, regdb, llcm")
    a("--data-root", help="dataset folder (layouts: docs/datasets.md)")
    a("--trial", default="1", help="RegDB split 1..10, or all: one model per split, then the ten-split table")
    a("--arch", choices=("resnet50", "resnet18"), help="backbone (papers: resnet50)")
    a("--pretrained", help="imagenet (torchvision V1, papers), a .pth path, none, or synthetic (the demo's)")
    a("--height", type=int, help="input height (papers: 288)")
    a("--width", type=int, help="input width (papers: 144)")
    a("--epochs", type=int, help="total epochs, both stages (MULT: 90; MBMIL: 100)")
    a("--stage-one-epochs", type=int, help="epochs of stage one (MULT: 40; MBMIL: 50)")
    a("--iters", help="iterations per epoch, 'N' or 'stage1,stage2' (MULT on SYSU: 300,200)")
    a("--augment", choices=("paper", "light"),
      help="paper: each stage's augmentations (docs/mult.md §1.4); light: stage two's throughout (the demo)")
    a("--clusters", type=int, help="clusters per batch (MULT: 12; MBMIL: 8)")
    a("--instances", type=int, help="images per cluster and modality (MULT: 12; MBMIL: 16)")
    a("--lr", type=float, help="Adam learning rate (3.5e-4)")
    a("--weight-decay", type=float, help="Adam weight decay (5e-4)")
    a("--lr-steps", help="epochs where the lr drops x0.1 (MULT: 20,60,80 absolute; MBMIL: 20,40 in each stage)")
    a("--eps", type=float, help="DBSCAN eps (SYSU 0.6, RegDB 0.3)")
    a("--k1", type=int, help="Jaccard k1 (30)")
    a("--k2", type=int, help="Jaccard k2 (6)")
    a("--min-samples", type=int, help="DBSCAN min_samples (4)")
    a("--association", choices=mult.ASSOCIATIONS, default="mult", help="MULT stage-two label association (mult)")
    a("--oclr", action=argparse.BooleanOptionalAction, default=True, help="OCLR loss (on; ablation: --no-oclr)")
    a("--alpha", type=float, help="label-transfer anchor weight α (0.2)")
    a("--beta", type=float, help="hard/soft label mix β (0.7)")
    a("--temp", type=float, help="memory temperature τ (0.05)")
    a("--sinkhorn-lambda", type=float, help="Sinkhorn λ (25)")
    a("--momentum", type=float, help="memory momentum, the weight of the old entry (0.1)")
    a("--subset-ratio", type=float, help="MBMIL: visible share of the intra step (SYSU 0.5, RegDB 1)")
    a("--hard-neg-k", type=int, help="MBMIL: candidates of the multi-positive loss (50)")
    a("--intra-margin", type=float, help="MBMIL: margin of the centroid term (0.2)")
    a("--intra-loss", choices=("hybrid", "infonce"), default="hybrid", help="MBMIL intra-modality loss (hybrid)")
    a("--global-k1", type=int, help="MBMIL: k1 of the modality-aware global clustering (30, even)")
    a("--global-k2", type=int, help="MBMIL: k2 of the global clustering (6)")
    a("--global-eps", type=float, help="MBMIL: DBSCAN eps of the global clustering (as --eps)")
    a("--seed", type=int, default=1, help="seeds everything (1)")
    runs.add_run_flags(p)   # its folder, evaluation, device and input: --out, --resume, --eval-every, --amp, ...
    return p


def preset(method, dataset):
    """The flags the papers (or the demo) set for this method and dataset, over DEFAULTS."""
    return {**DEFAULTS, **PRESETS[dataset], **(MBMIL_PRESETS[dataset] if method == "mbmil" else {})}


def resolve_args(args):
    """Every flag left unset from the presets, every flag checked, the run folder named."""
    return checks.resolve_args(args, get_args_parser(), preset)


def preset_args(args):
    """The result flags the presets give for this method, dataset and trial (what a run folder is compared with)."""
    return checks.preset_args(args, get_args_parser(), preset)


# ---------------------------------------------------------------------------------------------------
# MULT: one epoch (docs/mult.md §3)

def mult_epoch(net, optimizer, vis, ir, epoch, args):
    """Pseudo-labels from the current features, then one epoch of MULT training -> the epoch record, or None
    when DBSCAN found no cluster."""
    stage, world = 1 if epoch < args.stage_one_epochs else 2, distributed.World.of(args)
    feats_v, feats_r = extract(net, vis, args), extract(net, ir, args)              # [N_v, D], [N_r, D]
    pseudo = distributed.on_rank_zero(world, mult_pseudo_labels, feats_v, feats_r, stage, args)
    if pseudo is None:
        return None
    record = dict(pseudo["record"], stage=stage)
    if world.main:                  # ground truth, logged beside the method: it never reaches a loss or a sampler
        record.update(diagnostics.mult_epoch(pseudo, feats_v, feats_r, vis, ir, args))
    c = pseudo["clusters"]                      # the memories start from the DBSCAN centers (§7.2-7.3)
    banks = memory.mult_banks(clustering.cluster_centers(feats_v, c["vis"]), clustering.cluster_centers(
        feats_r, c["ir"]), stage == 2, args.momentum, args.temp)
    rng = np.random.default_rng([args.seed, epoch])
    if stage == 1:                  # unrelated clusters of each modality (§1.5)
        batches = samplers.stage_one_batches(c["vis"], c["ir"], args.iters[0], args.clusters, args.instances, rng)
    else:                           # each cluster's images beside those the label transfer gives it (§1.5)
        h = pseudo["hard"]
        batches = samplers.stage_two_batches(h["vis"], h["ir_to_vis"], h["vis_to_ir"], h["ir"], args.iters[1],
                                             args.clusters, args.instances, rng)         # [iters, B, 2]
    loader = make_loader(vis, ir, batches, args, epoch, stage)
    record.update(train_mult(net, optimizer, loader, banks, pseudo, epoch, args, batches))
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


def train_mult(net, optimizer, loader, banks, pseudo, epoch, args, batches):
    """MULT stage one (§7.2) when `pseudo` has no stage-two labels, else stage two (AMIRL + OCLR, §7.3-7.5).
    batches: the epoch's global batches [iters, B, 2], every rank's; their rows index the labels, kept on the host
    so that no step waits for the device. -> {"loss", "loss_<part>", "loss_per_iteration"} of the global batch."""
    net.train()
    world, two = distributed.World.of(args), "hard" in pseudo
    labels = {k: np.asarray(v, dtype=np.int64) for k, v in (pseudo["hard"] if two else pseudo["clusters"]).items()}
    side = {k: 0 if k.startswith("vis") else 1 for k in labels}         # visible samples carry the "vis*" labels
    lo, hi = distributed.share(batches.shape[1], world)
    losses = LossReadout(epoch, world)
    for it, batch in enumerate(losses.progress(loader)):
        every = {k: y[batches[it, :, side[k]]] for k, y in labels.items()}    # [B] each: the global batch's
        mine = {k: y[lo:hi] for k, y in every.items()}                        # this rank's positions
        f_v0, f_v1, f_r = forward_batch(net, batch, args)                     # each [B / world, D]
        if not two:
            loss, updates = memory.stage_one_loss(banks, f_v0, f_v1, f_r, mine["vis"], mine["ir"])
            parts = {}
        else:
            rows = [batch[k].to(args.device, non_blocking=True) for k in ("vis_index", "ir_index")]
            soft = {k: pseudo["soft"][k][rows[side[k]]] for k in labels}
            loss, parts, updates = memory.stage_two_loss(banks, f_v0, f_v1, f_r, mine, soft, epoch, oclr=args.oclr)
        optimise(optimizer, loss, epoch, it)
        # Every rank updates its banks with the whole global batch, in position order: they stay equal.
        memory.apply_updates(banks, distributed.global_updates(updates, mine, every, world), check=False)
        losses.add(loss, *parts.values())
    rows, n = losses.read(), max(len(losses.rows), 1)                  # [[loss, ms, ma, oclr], ...] floats
    curve = [row[0] for row in rows]
    parts = {f"loss_{k}": sum(row[i] for row in rows) / n for i, k in enumerate(("ms", "ma", "oclr"), 1)} \
        if two and rows else {}
    return dict(loss=sum(curve) / n, **parts, loss_per_iteration=curve)


# ---------------------------------------------------------------------------------------------------
# MBMIL: one epoch (docs/mbmil.md §A.2-A.5)

def mbmil_epoch(net, optimizer, vis, ir, epoch, args):
    """Pseudo-labels from the current features, then one epoch of MBMIL training -> the epoch record, or None
    when DBSCAN found no cluster."""
    stage, world = 1 if epoch < args.stage_one_epochs else 2, distributed.World.of(args)
    rng = np.random.default_rng([args.seed, epoch])
    feats_v, feats_r = extract(net, vis, args), extract(net, ir, args)              # [N_v, D], [N_r, D]
    intra, glob = samplers.visible_split(len(vis), args.subset_ratio, rng)         # the subset rule: visible rows
    pseudo = distributed.on_rank_zero(world, mbmil_pseudo_labels, feats_v, feats_r, intra, glob, stage, args)
    if pseudo is None:
        return None
    record = dict(pseudo["record"], stage=stage)
    if world.main:                  # ground truth, logged beside the method: it never reaches a loss or a sampler
        record.update(diagnostics.mbmil_epoch(pseudo, feats_v, feats_r, vis, ir, args))
    # The intra step's batches of each modality's clusters; in stage two the global step's, of the global clusters.
    batches = [samplers.stage_one_batches(labels["vis"], labels["ir"], iters, args.clusters, args.instances, rng)
               for labels, iters in ((pseudo["clusters"], args.iters[stage - 1]), (pseudo.get("global"), args.iters[1]))
               if labels is not None]                                                  # [iters, B, 2] each
    mems = mbmil_memories(feats_v, feats_r, pseudo, batches, args)
    loaders = [make_loader(vis, ir, b, args, epoch + step * GLOBAL_STEP_SEED_OFFSET, stage)
               for step, b in enumerate(batches)]
    record.update(train_mbmil(net, optimizer, loaders, mems, pseudo, epoch, args, batches))
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


def mbmil_memories(feats_v, feats_r, pseudo, batches, args):
    """A hybrid memory per modality from its intra clusters; in stage two the memory of the global clusters'
    modality-specific prototypes ("split", §A.3), with each training row's prototype."""
    mems = {m: memory.HybridMemory(clustering.cluster_centers(f, pseudo["clusters"][m]), args.momentum, args.temp)
            for m, f in (("vis", feats_v), ("ir", feats_r))}
    if "global" in pseudo:
        g, rows = pseudo["global"], torch.as_tensor(pseudo["global_rows"], device=args.device)
        protos, proto_labels, proto_index = memory.split_prototypes(
            torch.cat([feats_v[rows], feats_r]), torch.as_tensor(g["labels"], device=args.device),
            torch.as_tensor(g["modality"], device=args.device))                   # [P, D], [P], [N_g + N_r]
        proto_index = proto_index.cpu().numpy()       # host labels of the updates: read back once an epoch
        proto_v = np.full(len(feats_v), -1, dtype=np.int64)                       # prototype per vis row
        proto_v[pseudo["global_rows"]] = proto_index[:len(rows)]
        mems["global"] = memory.HybridMemory(protos, momentum=args.momentum, temp=args.temp)
        mems["prototypes"] = {"labels": proto_labels, "vis": proto_v, "ir": proto_index[len(rows):]}
        labels = np.r_[g["vis"][batches[1][..., 0]].ravel(), g["ir"][batches[1][..., 1]].ravel()]   # the batches'
        memory.check_positives(labels, proto_labels, args.hard_neg_k)   # once, what global_loss(check=False) skips
    return mems


def train_mbmil(net, optimizer, loaders, mems, pseudo, epoch, args, batches):
    """Per iteration the intra-modality step, then in stage two the global split-and-contrast step (§A.3).
    batches: each loader's global batches [iters, B, 2], every rank's; their rows index the host labels.
    -> {"loss", "loss_intra", "loss_global" (stage two), "loss_per_iteration"} of the global batch."""
    net.train()
    world = distributed.World.of(args)
    gather = partial(distributed.gather_rows, world=world)   # rows of every rank's share, in global position order
    (lo, hi), (g_lo, g_hi) = (distributed.share(b.shape[1], world) for b in batches[:1] + batches[-1:])
    intra, glob, protos = pseudo["clusters"], pseudo.get("global"), mems.get("prototypes")   # host labels
    intra_loss = partial(memory.intra_loss, margin=args.intra_margin, hybrid=args.intra_loss == "hybrid",
                         batch_mean=partial(distributed.global_mean, world=world))   # clamped on the global mean
    pairs = zip(*loaders) if len(loaders) == 2 else ((b, None) for b in loaders[0])
    losses = LossReadout(epoch, world)
    for it, (batch, gbatch) in enumerate(losses.progress(pairs, total=len(loaders[0]))):
        # (1) L_intra^vis + L_intra^ir: both visible views share the pseudo-label.
        rows = batches[0][it]                                               # [B, 2]: the global batch
        y_v, y_r = intra["vis"][rows[:, 0]], intra["ir"][rows[:, 1]]        # [B] each
        f_v0, f_v1, f_r = forward_batch(net, batch, args)                   # [B / world, D] each
        loss = intra_loss(mems["vis"], torch.cat([f_v0, f_v1]), np.tile(y_v[lo:hi], 2)) + intra_loss(
            mems["ir"], f_r, y_r[lo:hi])
        optimise(optimizer, loss, epoch, it)
        mems["vis"].update(torch.cat([gather(f_v0.detach()), gather(f_v1.detach())]), np.tile(y_v, 2), check=False)
        mems["ir"].update(gather(f_r.detach()), y_r, check=False)
        if gbatch is None:
            losses.add(loss)
            continue
        # (2) ½(L_glb^ir + L_glb^vis): multi-positive contrast over the modality-specific prototypes.
        rows = batches[1][it]                                               # [B_g, 2]: its own size
        z_v, z_r = glob["vis"][rows[g_lo:g_hi, 0]], glob["ir"][rows[g_lo:g_hi, 1]]   # this rank's global labels
        g_v0, g_v1, g_r = forward_batch(net, gbatch, args)
        global_loss = 0.5 * (
            memory.global_loss(mems["global"], g_r, z_r, protos["labels"], args.hard_neg_k, check=False)
            + memory.global_loss(mems["global"], torch.cat([g_v0, g_v1]), np.tile(z_v, 2), protos["labels"],
                                 args.hard_neg_k, check=False))
        optimise(optimizer, global_loss, epoch, it)
        proto_v = protos["vis"][rows[:, 0]]       # the memory is updated by prototype rows, not global labels
        mems["global"].update(torch.cat([gather(g_v0.detach()), gather(g_v1.detach()), gather(g_r.detach())]),
                              np.r_[proto_v, proto_v, protos["ir"][rows[:, 1]]], check=False)
        losses.add(loss, global_loss)
    rows, n = losses.read(), max(len(losses.rows), 1)                  # [[intra, global], ...] floats
    curve = [row[0] + row[1] if len(row) > 1 else row[0] for row in rows]   # in iteration order, as read
    out = {"loss_intra": sum(row[0] for row in rows) / n}
    if glob is not None:
        out["loss_global"] = sum(row[1] for row in rows) / n
    return dict(out, loss=sum(out.values()), loss_per_iteration=curve)


# ---------------------------------------------------------------------------------------------------
# Steps both methods share

def extract(net, images, args):
    """Eval features of every image of one modality, no flip (the clustering input): float32 [N, D] on the device,
    in row order, whatever --amp. Each rank extracts a contiguous share of the rows; every rank gets all of them."""
    model = getattr(net, "module", net)          # the network itself, outside DistributedDataParallel
    model.eval()
    world = distributed.World.of(args)
    distributed.same_buffers(model, world)       # one model for all shares (--no-sync-bn: rank 0's BN statistics)
    lo, hi = distributed.share(len(images), world)
    with fixed_algorithms(args.device):          # the same convolution algorithms every epoch
        feats = extract_features(model.modality_fn(), images.subset(np.arange(lo, hi)), args.height, args.width,
                                 device=args.device, batch_size=args.extract_batch, flip=False, amp=args.amp,
                                 num_workers=args.workers, interpolation=transforms.RESIZE[args.method],
                                 desc=f"features {'vis' if images.modality == VIS else 'ir'}", progress=world.main,
                                 cache=getattr(images, "cache", None), out_device=args.device)   # [N / world, D]
    return distributed.gather_rows(feats, world, total=len(images))


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
    lo, hi = distributed.share(batches.shape[1], distributed.World.of(args))
    seed = int(np.random.SeedSequence([args.seed, epoch, 0]).generate_state(1)[0])
    return training_loader(vis, ir, tfm, batches[:, lo:hi], seed, lo, args.input, args.device, args.workers)


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
    """One step; with --amp fp16 through the optimizer's loss scaler (a pass-through otherwise). The loss is not
    read here, which would wait for the device: LossReadout checks it. epoch, it: the step, for test wrappers."""
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


# ---------------------------------------------------------------------------------------------------
# The loop

def main(argv=None):
    use_huge_pages()                   # before the first tensor: PyTorch reads the switch at its first allocation
    args = resolve_args(get_args_parser().parse_args(argv))
    world = distributed.setup(args.device, args.dist_timeout)       # a world of one without torchrun
    args.device, args.rank, args.world_size = world.device, world.rank, world.size
    configure_device(args.device, autotune=True)   # TF32 convolutions, float32 matrix products, cuDNN autotuner
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(world.main)
    if args.trial == "all":
        return run_all_splits(args, world, resolve_args, train, learning_rate)
    return train(args, world)


def train(args, world):
    """One run: its preparation (rank 0), the epochs, the report. Rank 0 alone checks, logs and writes."""
    with ExitStack() as hold:                   # the run folder stays held until the run ends, however it ends
        run = distributed.on_rank_zero(world, checks.prepare_run, args, hold, learning_rate,
                                       transforms.RESIZE[args.method])
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        model = TwoStreamNet(args.arch, run["weights"]).to(
            args.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        if world.size > 1 and args.sync_bn:
            distributed.global_batch_norm(model)                  # BN statistics of the whole global batch
        optimizer = make_optimizer(model, args)
        state = checkpoints.restore(model, optimizer, run, args)
        net = distributed.parallel(model, world)
        with runs.run_log(args, run, state, preset_args(args), world.main) as run_log:
            if run["plan"]["mode"] == "fresh" and args.eval_untrained and world.main:   # the curve's reference
                state["untrained"] = evaluate_run(model, args, args.eval_trials)
                log.info("untrained model:\n" + reports.format_table(state["untrained"]))
            for epoch in range(state["start"], args.epochs):
                if args.method == "mbmil" and epoch == args.stage_one_epochs and epoch > 0:
                    optimizer = make_optimizer(model, args)    # MBMIL's stage two starts a fresh Adam (§A.4)
                state["history"].append(run_epoch(net, model, optimizer, run, epoch, state, args, world))
                if world.main:
                    checkpoints.save_epoch(model, optimizer, args, state, run_log)
                    if epoch < args.epochs - 1:                     # the final report draws the last one
                        curves.refresh_run_curves(args.out, state["history"][-1], state["untrained"])
            if not world.main:
                return None
            if state["results"] is None:   # a finished run whose checkpoint has no results: evaluate it now
                state["results"] = evaluate_run(model, args, args.eval_trials)
            reports.final_report(state["results"], state["untrained"], state["history"], args)
            return state["results"]


def run_epoch(net, model, optimizer, run, epoch, state, args, world):
    """One epoch of the method at its scheduled lr, then its evaluation when due -> the epoch record."""
    t0 = time.time()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(epoch, args)
    record = (mult_epoch if args.method == "mult" else mbmil_epoch)(net, optimizer, run["vis"], run["ir"], epoch, args)
    if record is None:                      # DBSCAN found no cluster: the model stays as it is
        record = reports.skipped_epoch(epoch, args)
    last = epoch == args.epochs - 1
    if world.main and (last or (epoch + 1) % args.eval_every == 0):
        results = evaluate_run(model, args, args.eval_trials if last else 1)
        record["eval"] = {name: {m: round(r["mean"][m], 2) for m in ("R1", "mAP")} for name, r in results.items()}
        state["results"] = results if last else None
    record.update(epoch=epoch, lr=learning_rate(epoch, args), time=round(time.time() - t0, 1))
    log.info(reports.epoch_line(record))
    return record


def cli(argv=None):
    """main() as the command line runs it: a problem with the input is one line on stderr and exit status 2."""
    return run_cli(main, "train.py", argv)


if __name__ == "__main__":
    cli()
