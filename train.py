"""Train MULT (He et al., IJCV 2024) or MBMIL (Wang et al., AAAI 2026) end to end, both stages, one command.

    python train.py                                   # MULT on the synthetic demo set (rendered if missing)
    python train.py --dataset regdb --trial 1         # MULT on RegDB split 1 (one model per trial)
    python train.py --dataset sysu --method mbmil     # MBMIL on SYSU-MM01

Every epoch (docs/mult.md §3, docs/mbmil.md §A.4) reads as the papers' loop:
    extract features of every training image -> cluster -> associate -> memories -> train -> evaluate
MULT:  per-modality Jaccard + DBSCAN (§4); stage one trains on intra-modality memories (§7.2); stage two adds the
       Modality-Unified Label Transfer (§5) and trains with AMIRL and OCLR (§7.3-7.5)         -> `mult_epoch`
MBMIL: per-modality clustering for the intra step; in stage two, one modality-aware global clustering
       (docs/mbmil.md §A.2) and split-and-contrast prototypes (§A.3)                         -> `mbmil_epoch`
The run folder (naming, resume, --init-from, the checks before the first epoch) is runs.py's. Every random draw
of an epoch (sampler, augmentation) is seeded by (--seed, epoch), so a resumed run reproduces the uninterrupted one.
"""
import argparse
import json
import os
import sys
import time
import warnings

# Idle OpenMP threads that spin steal the CPU from the data loader and from each other: on a 2-core
# machine the sparse clustering steps ran 5-10x slower without this (bench/bench_clustering.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# PyTorch backs CPU tensors of 2 MB and more with transparent huge pages (Linux; THP_MEM_ALLOC_ENABLE=0 in the
# environment turns it off): a fresh batch of the cached input pipeline, or of the feature extraction, is then
# faulted in 2 MB pages instead of 4 kB ones, 1.4-2.6x faster per core at SYSU size, while a CPU
# backbone at SYSU size ran about 7% slower (bench/bench_input.py; README, Training input pipeline). Where a
# tensor lives changes none of its values.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import clustering
import diagnostics
import distributed
import evaluate
import memory
import mult
import reports
import runs
from data import samplers, transforms
from data.common import VIS, IR
from data.loader import CachedTrainBatches, TrainBatches, cached_loader
from model import TwoStreamNet, load_checkpoint, save_checkpoint

# Dataset presets (docs/mult.md §8, §13; docs/mbmil.md §A.4). Applied first; anything given on the command line wins.
# The synthetic preset is sized for the 2-core CPU demo: a ResNet-18 initialised by pretrain.py (the stand-in
# for ImageNet weights), small images, few clusters per batch. The SYSU and RegDB presets are the papers'.
# LLCM: neither paper nor its code gives values; the multi-camera SYSU-MM01 settings are used (eps 0.6, 300/200
# iterations), as the unsupervised methods that report LLCM start from theirs. Its visible-to-infrared ratio
# (1.21:1) is close to RegDB's 1:1, so MBMIL keeps every visible image in both steps (subset ratio 1.0).
PRESETS = {
    "sysu": dict(data_root=evaluate.DATASET_ROOTS["sysu"], arch="resnet50", pretrained="imagenet", height=288, width=144, epochs=90, stage_one_epochs=40,
                 iters="300,200", eps=0.6, global_eps=0.6, clusters=12, instances=12, lr_steps="20,60,80",
                 eval_trials=10, workers=4),
    "regdb": dict(data_root=evaluate.DATASET_ROOTS["regdb"], arch="resnet50", pretrained="imagenet", height=288, width=144, epochs=90, stage_one_epochs=40,
                  iters="100,100", eps=0.3, global_eps=0.3, clusters=12, instances=12, lr_steps="20,60,80",
                  eval_trials=1, workers=4),
    "llcm": dict(data_root=evaluate.DATASET_ROOTS["llcm"], arch="resnet50", pretrained="imagenet", height=288, width=144, epochs=90, stage_one_epochs=40,
                 iters="300,200", eps=0.6, global_eps=0.6, clusters=12, instances=12, lr_steps="20,60,80",
                 eval_trials=10, workers=4),
    "synthetic": dict(data_root=evaluate.DATASET_ROOTS["synthetic"], arch="resnet18", pretrained="synthetic", height=64, width=32, epochs=12, stage_one_epochs=6,
                      iters="60,60", eps=0.5, global_eps=0.5, clusters=8, instances=8, augment="light",
                      lr_steps="6,9,11", eval_trials=10, workers=1),
}
# MBMIL (docs/mbmil.md §A.4-A.5): two stages of 50 epochs, stage two with a fresh Adam and StepLR(20, 0.1) per
# stage, 8 pseudo-ids x 16 instances, SYSU visible subset ratio 0.5. The synthetic preset's steps (2 and 5
# within each 6-epoch stage) put stage two's drops at epochs 8 and 11.
MBMIL_PRESETS = {
    "sysu": dict(epochs=100, stage_one_epochs=50, iters="200,200", clusters=8, instances=16,
                 subset_ratio=0.5, lr_steps="20,40"),
    "regdb": dict(epochs=100, stage_one_epochs=50, iters="100,100", clusters=8, instances=16,
                  subset_ratio=1.0, lr_steps="20,40"),
    "llcm": dict(epochs=100, stage_one_epochs=50, iters="200,200", clusters=8, instances=16,
                 subset_ratio=1.0, lr_steps="20,40"),
    "synthetic": dict(subset_ratio=0.5, clusters=8, instances=8, iters="60,30", lr_steps="2,5"),
}
DEFAULTS = dict(k1=30, k2=6, min_samples=4, lr=3.5e-4, weight_decay=5e-4, alpha=0.2, beta=0.7, temp=0.05,
                sinkhorn_lambda=25.0, momentum=0.1, subset_ratio=1.0, hard_neg_k=50, intra_margin=0.2,
                global_k1=30, global_k2=6, eval_every=1, extract_batch=128, augment="paper")
REGDB_SPLITS = range(1, 11)
# MBMIL's global step draws its batches' augmentations from the seed of epoch + this offset, apart from
# the intra step's (which uses the epoch's own).
GLOBAL_STEP_SEED_OFFSET = 100_000


def get_args_parser():
    p = argparse.ArgumentParser("vireid training (MULT / MBMIL)", add_help=True)
    a = p.add_argument
    a("--method", choices=("mult", "mbmil"), default="mult", help="mult (IJCV'24, default) or mbmil (AAAI'26)")
    a("--dataset", choices=tuple(PRESETS), default="synthetic", help="synthetic (default demo), sysu, regdb, llcm")
    a("--data-root", type=str, default=None, help="dataset folder (see README for the layouts)")
    a("--trial", type=str, default="1",
      help="RegDB split 1..10, or all: the protocol trains one model per split, then averages the ten")
    a("--allow-count-mismatch", action="store_true", help="accept a SYSU-MM01 or LLCM with non-official counts")
    a("--arch", choices=("resnet50", "resnet18"), default=None, help="backbone (paper: resnet50)")
    a("--pretrained", type=str, default=None,
      help="imagenet (torchvision V1 from the torch cache), a .pth path, none, or synthetic (pretrain.py; demo)")
    a("--height", type=int, default=None, help="input height (paper: 288)")
    a("--width", type=int, default=None, help="input width (paper: 144)")
    a("--epochs", type=int, default=None, help="total epochs, both stages (MULT: 90)")
    a("--stage-one-epochs", type=int, default=None, help="epochs of stage one (MULT: 40)")
    a("--iters", type=str, default=None, help="iterations per epoch, 'N' or 'stage1,stage2' (SYSU: 300,200)")
    a("--augment", choices=("paper", "light"), default=None,
      help="paper: the augmentations of each stage (docs/mult.md §1.4); light: the stage-two ones throughout (synthetic preset)")
    a("--clusters", type=int, default=None, help="clusters per batch (MULT: 12)")
    a("--instances", type=int, default=None, help="images per cluster and modality (MULT: 12)")
    a("--lr", type=float, default=None, help="Adam learning rate (3.5e-4)")
    a("--weight-decay", type=float, default=None, help="Adam weight decay (5e-4)")
    a("--lr-steps", type=str, default=None, help="epochs where the lr drops x0.1 (MULT: 20,60,80 absolute; MBMIL: per stage)")
    a("--eps", type=float, default=None, help="DBSCAN eps (SYSU 0.6, RegDB 0.3)")
    a("--k1", type=int, default=None, help="Jaccard k1 (30)")
    a("--k2", type=int, default=None, help="Jaccard k2 (6)")
    a("--min-samples", type=int, default=None, help="DBSCAN min_samples (4)")
    a("--association", choices=("mult", "ot", "pgm"), default="mult", help="MULT stage-two label association")
    a("--oclr", action=argparse.BooleanOptionalAction, default=True, help="OCLR loss (ablation: --no-oclr)")
    a("--alpha", type=float, default=None, help="label-transfer anchor weight α (0.2)")
    a("--beta", type=float, default=None, help="hard/soft label mix β (0.7)")
    a("--temp", type=float, default=None, help="memory temperature τ (0.05)")
    a("--sinkhorn-lambda", type=float, default=None, help="Sinkhorn λ (25)")
    a("--momentum", type=float, default=None, help="memory momentum, the weight of the old entry (0.1)")
    a("--subset-ratio", type=float, default=None, help="MBMIL: visible share used by the intra step (SYSU 0.5, RegDB 1.0)")
    a("--hard-neg-k", type=int, default=None, help="MBMIL: candidates of the multi-positive loss (50)")
    a("--intra-margin", type=float, default=None, help="MBMIL: margin of the centroid term (0.2)")
    a("--intra-loss", choices=("hybrid", "infonce"), default="hybrid", help="MBMIL intra-modality loss")
    a("--global-k1", type=int, default=None, help="MBMIL: k1 of the modality-aware global clustering (30, even)")
    a("--global-k2", type=int, default=None, help="MBMIL: k2 of the global clustering (6)")
    a("--global-eps", type=float, default=None, help="MBMIL: DBSCAN eps of the global clustering (as --eps's preset)")
    a("--diagnostics", action=argparse.BooleanOptionalAction, default=None,
      help="also run the baselines on the same features each stage-two epoch (MULT: OT's labels; MBMIL: the plain "
           "Jaccard's clusters) and log their quality; changes no result (default: synthetic only)")
    a("--eval-every", type=int, default=None, help="evaluate every N epochs (the last epoch always)")
    a("--eval-trials", type=int, default=None, help="SYSU gallery draws in the final evaluation (10)")
    a("--eval-untrained", action=argparse.BooleanOptionalAction, default=None,
      help="evaluate the untrained model first, as the reference for the learning curve (default: synthetic only)")
    a("--select-on-test", action="store_true", help="ALSO report the best epoch by test mAP (model selection on the test set; labelled as such)")
    a("--seed", type=int, default=1, help="seeds everything")
    a("--out", type=str, default=None, help="run folder (default runs/<method>_<dataset>[_trial<t>] + the flags off the preset)")
    a("--resume", type=str, default="auto", help="auto (continue --out if it has last.pth), a checkpoint path, or none")
    a("--overwrite", action="store_true", help="with --resume none: replace the run already in --out")
    a("--init-from", type=str, default=None,
      help="a stage1.pth: start this run's stage two from that shared stage one (its stage-one flags must agree)")
    a("--check-images", action=argparse.BooleanOptionalAction, default=True,
      help="decode every training and test image once before training (default on; with --input cached the "
           "cache build decodes the training images)")
    a("--device", type=str, default=None, help="cpu, cuda, cuda:1 (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    a("--amp", choices=("off", "bf16", "fp16"), default="off",
      help="mixed precision of the backbone (off); memories, losses and clustering stay float32; fp16 scales the loss")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=False, help="channels-last memory format")
    a("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
      help="under torchrun, BatchNorm statistics of the whole global batch (default; --no-sync-bn: each rank's share)")
    a("--dist-timeout", type=int, default=1800, help="seconds a rank waits for the others before it stops (1800)")
    a("--input", choices=("cached", "pil"), default="cached",
      help="training input pipeline: cached (default: each image decoded and resized once into a uint8 cache, "
           "augmented in batches on --device) or pil (per image, the reference); see README")
    a("--cache-dir", type=str, default=None,
      help="folder of the --input cached image caches (default: <out>/cache); runs of one dataset may share one: "
           "each file is named by its image list, size and interpolation, and changes no result")
    a("--workers", type=int, default=None, help="data-loading processes")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--extract-batch", type=int, default=None, help="batch size of feature extraction")
    return p


# ---------------------------------------------------------------------------------------------------
# MULT: one epoch (docs/mult.md §3)

def mult_epoch(net, optimizer, vis, ir, epoch, args, log):
    """Pseudo-labels, then one epoch of MULT training. The epoch record, or None when DBSCAN found no cluster."""
    stage, world = stage_of(epoch, args), world_of(args)
    feats_v, feats_r = extract(net, vis, args), extract(net, ir, args)              # [N_v, D], [N_r, D]
    pseudo = distributed.from_rank_zero(                                            # the same on every rank
        lambda: mult_pseudo_labels(feats_v, feats_r, vis, ir, stage, args, log), world)
    if pseudo is None:
        return None
    record, labels_v, labels_r = pseudo["record"], pseudo["labels_v"], pseudo["labels_r"]
    rng = np.random.default_rng([args.seed, epoch])
    bank_v, bank_r = centers(feats_v, labels_v, args), centers(feats_r, labels_r, args)   # [K_v, D], [K_r, D]
    if stage == 1:                     # intra-modality memories only (§7.2)
        banks = {"v": cluster_memory(bank_v, args), "r": cluster_memory(bank_r, args)}
        hard, soft = {"v": labels_v, "r": labels_r}, None
        batches = samplers.stage_one_batches(labels_v, labels_r, args.iters[0], args.clusters, args.instances, rng)
    else:                              # six memories for AMIRL and OCLR (§7.3-7.5)
        banks = {name: cluster_memory(bank_v if name in ("v", "rv", "cv") else bank_r, args)
                 for name in ("v", "r", "rv", "vr", "cv", "cr")}
        hard, soft = pseudo["hard"], pseudo["soft"]
        batches = samplers.stage_two_batches(hard["vv"], hard["rv"], hard["vr"], hard["rr"], args.iters[1],
                                             args.clusters, args.instances, rng)
    loader = make_loader(vis, ir, batches, args, epoch, stage)
    hard = {k: torch.as_tensor(v, device=args.device) for k, v in hard.items()}
    loss, parts, curve = train_mult(net, optimizer, loader, banks, epoch, args, hard, soft)
    record.update(stage=stage, loss=loss, **{f"loss_{k}": v for k, v in parts.items()}, loss_per_iteration=curve)
    return record


def mult_pseudo_labels(feats_v, feats_r, vis, ir, stage, args, log):
    """Per-modality Jaccard + DBSCAN (§4); in stage two the label transfer (§5) with its β-mixed targets
    (§5.5). A dict of labels, or None when DBSCAN found no cluster."""
    labels_v, sim_v = cluster(feats_v, args, log, "vis", vis.pids)                  # [N_v], csr [N_v, N_v]
    labels_r, sim_r = cluster(feats_r, args, log, "ir", ir.pids)
    if labels_v.max() < 0 or labels_r.max() < 0:
        return None
    record = {"clusters_vis": int(labels_v.max()) + 1, "clusters_ir": int(labels_r.max()) + 1}
    out = {"record": record, "labels_v": labels_v, "labels_r": labels_r}
    if stage == 2:
        lt = associate(args.association, feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, args, log)
        record["cross_accuracy"] = diagnostics.cross_accuracies(lt, vis, ir, labels_v, labels_r)
        if args.diagnostics and args.association == "mult":
            ot = associate("ot", feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, args)
            record["cross_accuracy_ot"] = diagnostics.cross_accuracies(ot, vis, ir, labels_v, labels_r)
        log(diagnostics.describe_association(args.association, record))
        mixed = lt.mixed(args.beta)    # CE targets β·onehot(h) + (1-β)·Y* (§5.5)
        out["hard"] = {"vv": lt.labels_v, "rr": lt.labels_r, "vr": lt.cross_v, "rv": lt.cross_r}
        out["soft"] = {"vv": mixed.soft_v, "rr": mixed.soft_r, "vr": mixed.soft_cross_v, "rv": mixed.soft_cross_r}
    return out


def train_mult(net, optimizer, loader, banks, epoch, args, hard, soft=None):
    """MULT stage one (§7.2) when `soft` is None, else stage two (AMIRL + OCLR, §7.3-7.5).
    Returns the mean loss, the mean of each part, and the loss of every iteration (global batch)."""
    net.train()
    world = world_of(args)
    curve, parts_sum = [], {}
    for it, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, file=sys.stderr,
                                    disable=not world.main)):
        vi, ri = batch["vis_index"].to(args.device), batch["ir_index"].to(args.device)    # [B], [B] this rank's
        f_v0, f_v1, f_r = forward_batch(net, batch, args)                                  # each [B, D]
        if soft is None:
            loss, updates = memory.stage_one_loss(banks, f_v0, f_v1, f_r, hard["v"][vi], hard["r"][ri])
        else:
            rows = {k: vi if k[0] == "v" else ri for k in ("vv", "vr", "rr", "rv")}
            loss, parts, updates = memory.stage_two_loss(
                banks, f_v0, f_v1, f_r, {k: hard[k][r] for k, r in rows.items()},
                {k: soft[k][r] for k, r in rows.items()}, epoch, oclr=args.oclr)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + distributed.mean_over_ranks(v, world)
        optimise(optimizer, loss, epoch, it)
        memory.apply_updates(banks, [(name, distributed.gather_rows(f, world), distributed.gather_rows(y, world))
                                     for name, f, y in updates])          # the global batch, in position order
        curve.append(distributed.mean_over_ranks(loss.item(), world))
    n = max(len(loader), 1)
    return sum(curve) / n, {k: v / n for k, v in parts_sum.items()}, curve


def associate(method, feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, args, log=None):
    """Cross-modality labels: MULT's label transfer (§5) or a baseline (§6), with a one-line summary."""
    t = time.time()
    lt = mult.associate(method, feats_v, feats_r, labels_v, labels_r, sim_v, sim_r, alpha=args.alpha,
                        temp=args.temp, sinkhorn_lambda=args.sinkhorn_lambda)
    if log is not None:
        log(f"label transfer ({method}): sinkhorn iterations {lt.sinkhorn_iters}, propagation iterations "
            f"{lt.prop_iters}, {time.time() - t:.1f} s")
    return lt


# ---------------------------------------------------------------------------------------------------
# MBMIL: one epoch (docs/mbmil.md §A.2-A.5)

def mbmil_epoch(net, optimizer, vis, ir, epoch, args, log):
    """Pseudo-labels, then one epoch of MBMIL training. The epoch record, or None when DBSCAN found no cluster."""
    stage, world = stage_of(epoch, args), world_of(args)
    rng = np.random.default_rng([args.seed, epoch])
    feats_v, feats_r = extract(net, vis, args), extract(net, ir, args)              # [N_v, D], [N_r, D]
    intra_idx, glob_idx = visible_split(len(vis), args.subset_ratio, rng)
    pseudo = distributed.from_rank_zero(                                            # the same on every rank
        lambda: mbmil_pseudo_labels(feats_v, feats_r, vis, ir, intra_idx, glob_idx, stage, args, log), world)
    if pseudo is None:
        return None
    record, labels_v, labels_r = pseudo["record"], pseudo["labels_v"], pseudo["labels_r"]
    intra = {"v": torch.as_tensor(labels_v, device=args.device), "r": torch.as_tensor(labels_r, device=args.device)}
    mems = (hybrid_memory(centers(feats_v, labels_v, args), args), hybrid_memory(centers(feats_r, labels_r, args), args))
    batches = samplers.stage_one_batches(labels_v, labels_r, args.iters[stage - 1], args.clusters,
                                         args.instances, rng)
    loaders, glob = [make_loader(vis, ir, batches, args, epoch, stage)], pseudo.get("global")
    if glob is not None:
        glob["memory"] = hybrid_memory(glob["protos_init"], args)
        gbatches = samplers.stage_one_batches(glob["labels_v"], glob["labels_r"], args.iters[1], args.clusters,
                                              args.instances, rng)
        loaders.append(make_loader(vis, ir, gbatches, args, epoch + GLOBAL_STEP_SEED_OFFSET, stage))
    record.update(train_mbmil(net, optimizer, loaders, mems, intra, glob, epoch, args))
    return record


def mbmil_pseudo_labels(feats_v, feats_r, vis, ir, intra_idx, glob_idx, stage, args, log):
    """Per-modality clustering for the intra step (the visible subset only); in stage two the global one
    (§A.2-A.3). A dict of labels, or None when DBSCAN found no cluster."""
    labels_v = np.full(len(vis), -1, dtype=np.int64)                               # outside the subset: -1
    labels_v[intra_idx], _ = cluster(feats_v[intra_idx], args, log, "vis (intra subset)", vis.pids[intra_idx])
    labels_r, _ = cluster(feats_r, args, log, "ir", ir.pids)
    if labels_v.max() < 0 or labels_r.max() < 0:
        return None
    record = {"clusters_vis": int(labels_v.max()) + 1, "clusters_ir": int(labels_r.max()) + 1, "stage": stage}
    out = {"record": record, "labels_v": labels_v, "labels_r": labels_r}
    if stage == 2:
        out["global"] = global_pseudo_labels(feats_v, feats_r, vis, ir, glob_idx, args, log, record)
        if out["global"] is None:
            return None
    return out


def visible_split(n_v, ratio, rng):
    """The subset rule (§A.2): the visible set split at random each epoch, one part for the intra step, the
    complement for the global step; ratio 1.0 gives every visible image to both. -> (intra rows, global rows)."""
    if ratio >= 1.0:
        return np.arange(n_v), np.arange(n_v)
    perm = rng.permutation(n_v)
    cut = int(round(ratio * n_v))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def global_pseudo_labels(feats_v, feats_r, vis, ir, glob_idx, args, log, record):
    """One modality-aware clustering over [visible subset; all infrared] (§A.2), each cluster split into a
    visible and an infrared prototype (§A.3). A dict of labels and prototypes, or None without a cluster."""
    n_g = len(glob_idx)
    feats_g = torch.cat([feats_v[glob_idx], feats_r])                               # [N_g + N_r, D]
    modality = np.r_[np.full(n_g, VIS), np.full(len(ir), IR)]
    gt = np.r_[vis.pids[glob_idx], ir.pids]
    g_labels, _ = cluster(feats_g, args, log, "global (modality-aware)", gt, modality=modality, step="global")
    record["global"] = diagnostics.global_cluster_stats(g_labels, modality, gt)
    if args.diagnostics:               # the plain Jaccard distance on the same features, for comparison
        plain = clustering.dbscan(clustering.jaccard_similarity(feats_g, args.global_k1, args.global_k2),
                                  args.global_eps, args.min_samples)
        record["global_plain"] = diagnostics.global_cluster_stats(plain, modality, gt)
    log("global clusters: " + diagnostics.describe_global(record))
    if g_labels.max() < 0:
        return None
    to_dev = lambda a: torch.as_tensor(a, device=args.device)                       # noqa: E731
    protos, proto_labels, proto_index = memory.split_prototypes(feats_g, to_dev(g_labels), to_dev(modality))
    labels_v = np.full(len(vis), -1, dtype=np.int64)                               # global label per visible row
    labels_v[glob_idx] = g_labels[:n_g]
    proto_v = torch.full((len(vis),), -1, dtype=torch.int64, device=args.device)   # prototype row per visible row
    proto_v[to_dev(glob_idx)] = proto_index[:n_g]
    return {"labels_v": labels_v, "labels_r": g_labels[n_g:], "v": to_dev(labels_v), "r": to_dev(g_labels[n_g:]),
            "pv": proto_v, "pr": proto_index[n_g:], "protos": proto_labels, "protos_init": protos}


def train_mbmil(net, optimizer, loaders, mems, intra, glob, epoch, args):
    """Per iteration: the intra-modality step, then (stage two) the global split-and-contrast step (§A.3)."""
    net.train()
    world = world_of(args)
    gather = lambda x: distributed.gather_rows(x, world)                            # noqa: E731
    mean = lambda x: distributed.global_mean(x, world)                              # noqa: E731
    mem_v, mem_r = mems
    sums, curve = {"loss_intra": 0.0, "loss_global": 0.0}, []
    batches = zip(*loaders) if len(loaders) == 2 else ((b, None) for b in loaders[0])
    for it, (batch, gbatch) in enumerate(tqdm(batches, total=len(loaders[0]), desc=f"epoch {epoch}",
                                              leave=False, file=sys.stderr, disable=not world.main)):
        # (1) L_intra^vis + L_intra^ir: both visible views share the pseudo-label.
        vi, ri = batch["vis_index"].to(args.device), batch["ir_index"].to(args.device)
        f_v0, f_v1, f_r = forward_batch(net, batch, args)
        f_v, y_v, y_r = torch.cat([f_v0, f_v1]), intra["v"][vi].repeat(2), intra["r"][ri]
        hybrid = args.intra_loss == "hybrid"
        loss = (memory.intra_loss(mem_v, f_v, y_v, margin=args.intra_margin, hybrid=hybrid, batch_mean=mean)
                + memory.intra_loss(mem_r, f_r, y_r, margin=args.intra_margin, hybrid=hybrid, batch_mean=mean))
        optimise(optimizer, loss, epoch, it)
        mem_v.update(torch.cat([gather(f_v0.detach()), gather(f_v1.detach())]), gather(intra["v"][vi]).repeat(2))
        mem_r.update(gather(f_r.detach()), gather(y_r))
        curve.append(distributed.mean_over_ranks(loss.item(), world))
        sums["loss_intra"] += curve[-1]
        if gbatch is None:
            continue
        # (2) ½(L_glb^ir + L_glb^vis): multi-positive contrast over modality-specific prototypes.
        vi, ri = gbatch["vis_index"].to(args.device), gbatch["ir_index"].to(args.device)
        g_v0, g_v1, g_r = forward_batch(net, gbatch, args)
        g_v = torch.cat([g_v0, g_v1])
        mem_g = glob["memory"]
        loss = 0.5 * (memory.global_loss(mem_g, g_r, glob["r"][ri], glob["protos"], args.hard_neg_k)
                      + memory.global_loss(mem_g, g_v, glob["v"][vi].repeat(2), glob["protos"], args.hard_neg_k))
        optimise(optimizer, loss, epoch, it)
        proto_v = gather(glob["pv"][vi])
        mem_g.update(torch.cat([gather(g_v0.detach()), gather(g_v1.detach()), gather(g_r.detach())]),
                     torch.cat([proto_v, proto_v, gather(glob["pr"][ri])]))
        global_loss = distributed.mean_over_ranks(loss.item(), world)
        sums["loss_global"] += global_loss
        curve[-1] += global_loss
    n = max(len(loaders[0]), 1)
    out = {k: v / n for k, v in sums.items() if glob is not None or k == "loss_intra"}
    return dict(out, loss=sum(out.values()), loss_per_iteration=curve)


# ---------------------------------------------------------------------------------------------------
# Steps both methods share

def stage_of(epoch, args):
    return 1 if epoch < args.stage_one_epochs else 2


def world_of(args):
    """This process's place among the --world-size ones (one, without torchrun)."""
    return distributed.World(args.rank, args.world_size, args.device)


def extract(net, images, args):
    """Eval features of every image of one modality, no flip (the clustering input): [N, D] on the device,
    in row order. Each rank extracts a contiguous share of the rows; every rank gets all of them. With
    --input cached the images come from the decode-once cache (the same pixels as decoding them again)."""
    model = getattr(net, "module", net)          # the network itself, outside DistributedDataParallel
    model.eval()
    world = world_of(args)
    lo, hi = distributed.share(len(images), world)
    feats = evaluate.extract_features(model.modality_fn(), images.subset(np.arange(lo, hi)), args.height, args.width,
                                      device=args.device, batch_size=args.extract_batch, flip=False,
                                      num_workers=args.workers, interpolation=interpolation(args),
                                      desc=f"features {'vis' if images.modality == VIS else 'ir'}",
                                      progress=world.main, cache=getattr(images, "cache", None))
    return distributed.gather_rows(feats.to(args.device), world)


def interpolation(args):
    """The resize of training, extraction and testing: bilinear as MULT's code, bicubic as MBMIL's."""
    return "bicubic" if args.method == "mbmil" else "bilinear"


def cluster(feats, args, log, name, gt=None, modality=None, step="intra"):
    """Jaccard + DBSCAN (docs/mult.md §4) -> (labels int64 [N], similarity csr) with a one-line summary.
    step "intra" takes --k1, --k2, --eps; "global" (MBMIL's) --global-k1, --global-k2, --global-eps."""
    t = time.time()
    k1, k2, eps = (args.k1, args.k2, args.eps) if step == "intra" else (args.global_k1, args.global_k2, args.global_eps)
    sim = clustering.jaccard_similarity(feats, k1, k2, modality=modality)
    labels = clustering.dbscan(sim, eps, args.min_samples)
    log(diagnostics.describe_clusters(name, labels, gt) + f", {time.time() - t:.1f} s")
    return labels, sim


def centers(feats, labels, args):
    """Cluster means [K, D] of the features (outliers left out), the memories' initial entries."""
    return clustering.cluster_centers(feats, torch.as_tensor(labels, device=args.device))


def cluster_memory(entries, args):
    return memory.ClusterMemory(entries, momentum=args.momentum, temp=args.temp)


def hybrid_memory(entries, args):
    return memory.HybridMemory(entries, momentum=args.momentum, temp=args.temp)


def training_transforms(args, stage):
    """The three training views' pipelines of a stage ({"v0", "v1", "r"}: data.transforms.Compose)."""
    return transforms.train_transforms(args.height, args.width, 2 if args.augment == "light" else stage,
                                       method=args.method, pad=transforms.crop_pad(args.height))


def jitters(epoch, args):
    """True when a training view of this epoch runs ColorJitter."""
    views = training_transforms(args, stage_of(epoch, args)).values()
    return any(isinstance(step, transforms.ColorJitter) for view in views for step in view.steps)


def make_loader(vis, ir, batches, args, epoch, stage):
    """This rank's share of the epoch's batches as a DataLoader (contiguous positions of every global batch);
    the augmentation of each position is seeded by (--seed, epoch, batch, global position), the same draws
    for --input pil and cached."""
    tfm = training_transforms(args, stage)
    lo, hi = distributed.share(batches.shape[1], world_of(args))
    if args.input == "cached":
        data = CachedTrainBatches(vis.cache, ir.cache, tfm, batches[:, lo:hi],
                                  seed=epoch_seed(args, epoch), device=args.device, first_position=lo)
        return cached_loader(data, num_workers=args.workers)
    data = TrainBatches(vis, ir, tfm, batches[:, lo:hi], seed=epoch_seed(args, epoch), first_position=lo)
    return DataLoader(data, batch_size=None, shuffle=False, num_workers=args.workers,
                      persistent_workers=False)


def image_caches(vis, ir, args):
    """The decode-once caches of the training images at the training size (memory-mapped files in the run
    folder or --cache-dir, reused by every epoch, rank, resume and run of the same images; a changed image is
    decoded again, a missing one named)."""
    from data.cache import build_cache, cache_name
    resize, folder = interpolation(args), args.cache_dir or os.path.join(args.out, "cache")
    caches = {name: build_cache(images, args.height, args.width, resize, workers=args.workers,
                                path=os.path.join(folder, cache_name(name, images, args.height, args.width, resize)),
                                progress=world_of(args).main)
              for name, images in (("vis", vis), ("ir", ir))}
    caches["summary"] = "; ".join(caches[n].summary for n in ("vis", "ir"))
    # The names the release before --cache-dir gave its caches: such files are left alone, and said.
    old_names = (os.path.join(folder, f"{n}_{args.height}x{args.width}_{resize}.u8") for n in ("vis", "ir"))
    stale = [path for path in old_names if os.path.exists(path)]
    if stale:
        gb = sum(os.path.getsize(path) for path in stale) / 2**30
        caches["summary"] += (f"; {' and '.join(stale)} ({gb:.1f} GB), from an earlier release (named without the "
                              "image list's hash), are not read by this run: delete them and their .json to free "
                              "the space")
    return caches


def epoch_seed(args, epoch):
    return int(np.random.SeedSequence([args.seed, epoch, 0]).generate_state(1)[0])


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
    """Step schedule x0.1 at each of --lr-steps: MULT keys it on the absolute epoch (§8); MBMIL restarts it
    in stage two (a fresh stage-two run in the official code)."""
    if args.method == "mbmil" and epoch >= args.stage_one_epochs:
        epoch -= args.stage_one_epochs
    return args.lr * 0.1 ** sum(epoch >= s for s in args.lr_steps)


def run_evaluation(model, args, trials):
    """The official protocol of the dataset: SYSU all + indoor single-shot, RegDB V->T and T->V, or LLCM
    IR->VIS and VIS->IR. Run by rank 0 alone."""
    fn = model.modality_fn()
    common = dict(height=args.height, width=args.width, device=args.device, batch_size=args.extract_batch,
                  num_workers=args.workers, interpolation=interpolation(args))
    model.eval()
    if args.dataset == "regdb":
        return evaluate.evaluate_regdb(fn, args.data_root, args.trial, **common)
    if args.dataset == "llcm":
        return evaluate.evaluate_llcm(fn, args.data_root, trials=range(trials), **common)
    return evaluate.evaluate_sysu(fn, args.data_root, trials=range(trials), **common)


# ---------------------------------------------------------------------------------------------------
# The loop

def main(args):
    args = resolve_args(args)
    size, batch = int(os.environ.get("WORLD_SIZE", "1")), args.clusters * args.instances
    if batch % size:
        raise SystemExit(f"train.py: error: a batch of --clusters {args.clusters} x --instances {args.instances} = "
                         f"{batch} positions cannot be shared equally by {size} processes; give a batch "
                         f"divisible by the number of processes (--clusters and --instances mean the whole batch)")
    world = distributed.setup(args.device, args.dist_timeout)       # a world of one without torchrun
    args.device, args.rank, args.world_size = world.device, world.rank, world.size
    if args.trial == "all":
        return run_all_splits(args)
    return train(args, world)


def train(args, world):
    """One run: checks, then the epochs, then the report. Rank 0 alone checks, logs and writes."""
    preset = preset_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = {}

    def prepare():   # every refusal, rendering and pretraining happens here, on rank 0, before any training
        plan = runs.plan_run(args, preset, learning_rate, jitters)    # nothing is written yet
        kept["ckpt"] = plan.pop("ckpt", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vis, ir = load_training_set(args)
            test_sets = runs.check_test_set(args)
        if args.check_images:         # with --input cached, building the caches decodes the training images
            runs.check_images(([] if args.input == "cached" else [vis, ir]) + test_sets, args)
        weights = initial_weights(args)
        caches = image_caches(vis, ir, args) if args.input == "cached" else None   # once, on rank 0
        return {"plan": plan, "vis": vis, "ir": ir, "warnings": [str(w.message) for w in caught],
                "caches": caches, "weights": weights}
    prepared = distributed.from_rank_zero(prepare, world)
    plan, vis, ir = prepared["plan"], prepared["vis"], prepared["ir"]
    ckpt = kept.get("ckpt") if world.main else load_checkpoint(plan["path"]) if plan["mode"] != "fresh" else None

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = TwoStreamNet(args.arch, prepared["weights"]).to(args.device)
    if world.size > 1 and args.sync_bn:
        distributed.global_batch_norm(model)                  # BN statistics of the whole global batch
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    start, history, untrained, results = 0, [], None, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            optimizer.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        start, history, untrained = ckpt["epoch"], ckpt["history"], ckpt.get("untrained")
        results = ckpt.get("results") if start == args.epochs else None   # a finished run: its own results
    net = model if world.size == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.device(args.device).index] if args.device.startswith("cuda") else None,
        broadcast_buffers=False)                              # buffers agree by construction (global BN)

    with runs.run_folder(args, plan, history, preset, world.main) as log:  # only now is the folder written
        log_start(log, args, preset, plan, prepared["warnings"], vis, ir, prepared["weights"], start)
        caches = prepared["caches"]   # the other ranks received them by file path
        if caches is not None:
            log(caches["summary"])
            vis.cache, ir.cache = caches["vis"], caches["ir"]     # make_loader reads them from there
        if plan["mode"] == "fresh" and args.eval_untrained and world.main:
            untrained = run_evaluation(model, args, args.eval_trials)
            log("untrained model (reference for the learning curve):\n" + reports.format_table(untrained))
        for epoch in range(start, args.epochs):
            t0 = time.time()
            if args.method == "mbmil" and epoch == args.stage_one_epochs and epoch > 0:
                optimizer = make_optimizer(model, args)  # stage two starts a fresh optimiser (§A.4)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch, args)
            step = mult_epoch if args.method == "mult" else mbmil_epoch
            record = step(net, optimizer, vis, ir, epoch, args, log)
            if record is None:
                log(f"epoch {epoch}: DBSCAN found no cluster (eps {args.eps}); this epoch trains nothing and the model "
                    f"is unchanged. If this persists, raise --eps or check the features.")
                record = {"stage": stage_of(epoch, args), "skipped": "no clusters"}
            last = epoch == args.epochs - 1
            if world.main and (last or (epoch + 1) % args.eval_every == 0):
                results = run_evaluation(model, args, args.eval_trials if last else 1)
                record["eval"] = {name: round(r["mean"]["mAP"], 2) for name, r in results.items()}
            record.update(epoch=epoch, lr=learning_rate(epoch, args), time=round(time.time() - t0, 1))
            history.append(record)
            log(f"epoch {epoch} (stage {record['stage']}): " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                if k not in ("epoch", "stage", "cross_accuracy_ot", "global", "global_plain", "loss_per_iteration")))
            if world.main:   # the checkpoint first, then the metrics line: a crash between the two leaves a line
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),   # missing, which the
                         "scaler": optimizer.scaler.state_dict(), "epoch": epoch + 1,        # resume rewrites from
                         "args": vars(args), "history": history, "untrained": untrained,    # the checkpoint's history,
                         "torch_rng": torch.get_rng_state(), "results": results if last else None,   # never one twice
                         "log_bytes": log.size(), "jitter": runs.CACHED_JITTER}
                save_checkpoint(state, os.path.join(args.out, "last.pth"))
                if epoch + 1 == args.stage_one_epochs:   # the branching point of stage-two ablations (--init-from)
                    save_checkpoint(dict(state, stage_one_end=True), os.path.join(args.out, "stage1.pth"))
                log.metrics(record)
        if not world.main:
            return None
        if results is None:  # a finished run whose checkpoint predates saved results: evaluate its final model
            results = run_evaluation(model, args, args.eval_trials)
        report(results, untrained, history, args, log)
        return results


def run_all_splits(args):
    """RegDB's protocol: one model per split, 1..10 in turn, each in its own run folder (finished splits are
    read back, an interrupted one resumes), then the ten-split table. Every split's lists and images are
    checked before the first one trains."""
    world = world_of(args)
    splits = [resolve_args(argparse.Namespace(**dict(vars(args), trial=t, out=os.path.join(args.out, f"trial{t}")
                                                     if args.out else None))) for t in REGDB_SPLITS]

    def check_all():   # refusals of any split, and every image of every split, before training
        lists = []
        for split in splits:
            runs.plan_run(split, preset_args(split), learning_rate, jitters)
            lists += [*load_training_set(split), *runs.check_test_set(split)]
        if args.check_images:
            runs.check_images(lists, args)
    distributed.from_rank_zero(check_all, world)
    for split in splits:
        if world.main:
            tqdm.write(f"RegDB split {split.trial} of 10: {split.out}")
        train(argparse.Namespace(**dict(vars(split), check_images=False)), world)
    if not world.main:
        return None
    text, summary = reports.summarize_runs([split.out for split in splits])
    folder = args.out or os.path.join(os.path.dirname(splits[0].out),
                                      os.path.basename(splits[0].out).replace("_trial1", "_ten-splits", 1))
    os.makedirs(folder, exist_ok=True)
    runs.write_atomic(os.path.join(folder, "summary.txt"), text + "\n")
    runs.write_atomic(os.path.join(folder, "summary.json"), json.dumps(summary, indent=2))
    tqdm.write(f"RegDB, ten splits (one model each):\n{text}\nwritten to {folder}/summary.txt and summary.json")
    return summary


def initial_weights(args):
    """The file (or "none") of the initial backbone weights: --pretrained, the ImageNet V1 file of the torch cache,
    or for the CPU demo the stand-in that pretrain.py trains once and caches. Rank 0 only: the others read it."""
    if args.pretrained == "imagenet":   # downloaded into the torch cache first if missing and online
        from model import imagenet_weights_path
        return imagenet_weights_path(args.arch)
    if args.pretrained != "synthetic":
        return args.pretrained
    from pretrain import ensure_pretrained
    return ensure_pretrained(os.path.join(os.path.dirname(os.path.normpath(args.data_root)), "synthetic-pretrain"),
                             arch=args.arch, height=args.height, width=args.width, device=args.device)


def log_start(log, args, preset, plan, warned, vis, ir, weights, start):
    """The first lines of a run's log: its flags, how it differs from the preset, its data, how it starts."""
    log("arguments: " + json.dumps(vars(args)))
    changed = runs.changed_flags(args, preset)
    log(f"run folder {args.out}: " + ("the preset configuration" if not changed else "off the preset in " + ", ".join(
        f"--{k.replace('_', '-')} {runs.describe(v)}" for k, (_, v) in changed.items())))
    for message in warned:
        log(f"warning: {message}")
    log(f"data: {args.dataset} at {args.data_root}: {len(vis)} vis and {len(ir)} ir training images")
    if args.pretrained == "synthetic":
        log(f"initial weights: {weights} (supervised on a disjoint synthetic population, "
            "one class per identity and modality)")
    if plan["mode"] == "resume":
        log(f"resumed from {plan['path']}: epochs 0..{start - 1} done, continuing at epoch {start}")
    elif plan["mode"] == "init":
        log(f"initialised from {plan['path']}: stage one (epochs 0..{start - 1}) shared, stage two starts here")


def report(results, untrained, history, args, log):
    """The full per-trial tables go to log.txt and results.json; the screen gets one compact table."""
    if untrained is not None:
        log.file_only("untrained model:\n" + reports.format_table(untrained))
    log.file_only(f"final model (last epoch, {history[-1]['epoch']}):\n" + reports.format_table(results))
    log(f"final model (last epoch, {history[-1]['epoch']})" + (", against the untrained one" if untrained else "")
        + ", means over the gallery trials:\n" + reports.format_summary(results, untrained)
        + f"\nper-trial tables: {os.path.join(args.out, 'log.txt')}, {os.path.join(args.out, 'results.json')}")
    if args.select_on_test:
        scored = [r for r in history if "eval" in r]
        best = max(scored, key=lambda r: next(iter(r["eval"].values())))
        log(f"[model selection on the TEST set, not a valid protocol] best epoch {best['epoch']}: {best['eval']}")
    runs.write_atomic(os.path.join(args.out, "results.json"),
                      json.dumps({"final": results, "untrained": untrained}, indent=2))


def load_training_set(args):
    """(vis, ir) ImageLists of the training split; renders the synthetic demo set if needed. A folder holding a
    set rendered by data.synthetic (its synthetic.json) is checked against the counts it recorded."""
    if args.dataset == "regdb":
        from data.regdb import regdb_train
        return regdb_train(args.data_root, args.trial)
    from data.synthetic import META, ensure_synthetic
    layout = "llcm" if args.dataset == "llcm" else "sysu"
    meta_path = os.path.join(args.data_root, META)
    meta = None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("layout") != layout:   # never overwrite another layout's set
            raise SystemExit(f"train.py: error: {meta_path}: a synthetic set in the {meta.get('layout')!r} layout; "
                             f"--dataset {args.dataset} reads the {layout} layout")
    if args.dataset == "synthetic":   # the demo set: rendered if missing, again if of an older format, same sizes
        meta = ensure_synthetic(args.data_root, progress=True, **(meta["args"] if meta else {}))
    if layout == "llcm":
        from data.llcm import LLCM_TRAIN_COUNTS as official, llcm_train as read
    else:
        from data.sysu import SYSU_TRAIN_COUNTS as official, sysu_train as read
    expected = meta["train_counts"] if meta else official
    return read(args.data_root, expected=None if args.allow_count_mismatch else expected)


# ---------------------------------------------------------------------------------------------------
# Flags: presets, then checks (before anything is read or written)

def resolve_args(args):
    """Fill every flag left unset from the presets, check every flag, name the run folder."""
    args = fill_presets(args)
    check_flags(args)
    if args.out is None:
        args.out = runs.default_out(args, preset_args(args))
    return args


def fill_presets(args):
    """Every flag left unset takes the dataset (and method) preset's value, then the default."""
    preset = dict(DEFAULTS, **PRESETS[args.dataset])
    if args.method == "mbmil":
        preset.update(MBMIL_PRESETS[args.dataset])
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.iters = parse_ints(args.iters, "--iters", minimum=1)
    args.iters = args.iters * 2 if len(args.iters) == 1 else args.iters
    args.lr_steps = parse_ints(args.lr_steps, "--lr-steps", minimum=0)
    if args.dataset != "regdb":
        args.trial = None
    elif str(args.trial).isdigit():
        args.trial = int(args.trial)
    for flag in ("eval_untrained", "diagnostics"):   # the demo's extras
        if getattr(args, flag) is None:
            setattr(args, flag, args.dataset == "synthetic")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def preset_args(args):
    """The result flags the presets give for this method, dataset and trial."""
    argv = ["--method", args.method, "--dataset", args.dataset] + (["--trial", str(args.trial)] if args.trial else [])
    return runs.result_args(fill_presets(get_args_parser().parse_args(argv)))


def parse_ints(text, flag, minimum):
    """'300,200' -> [300, 200]; a clear error naming the flag otherwise."""
    if isinstance(text, list):
        return text
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    if not all(x.isdigit() and int(x) >= minimum for x in parts):
        raise SystemExit(f"train.py: error: {flag} expects comma-separated integers >= {minimum}, got {text!r}")
    return [int(x) for x in parts]


MIN_HEIGHT, MIN_WIDTH = 16, 8   # the backbone downsamples 16x (last stride 1); smaller leaves no feature map


def check_flags(args):
    """Every flag in its range, before anything is read or written: SystemExit naming the flag."""
    def need(ok, flag, expected):
        if not ok:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            raise SystemExit(f"train.py: error: {flag} must be {expected}, got {value!r}")
    if args.dataset == "regdb":
        need(args.trial in REGDB_SPLITS or args.trial == "all", "--trial", "in 1..10 or all for RegDB (one model per split)")
    need(args.epochs >= 1, "--epochs", ">= 1")
    need(0 <= args.stage_one_epochs <= args.epochs, "--stage-one-epochs", f"in 0..--epochs ({args.epochs})")
    need(len(args.iters) == 2, "--iters", "'N' or 'stage1,stage2'")
    need(args.height >= MIN_HEIGHT, "--height", f">= {MIN_HEIGHT} (the backbone downsamples 16x)")
    need(args.width >= MIN_WIDTH, "--width", f">= {MIN_WIDTH} (the backbone downsamples 16x)")
    for flag in ("--clusters", "--instances", "--k2", "--min-samples", "--hard-neg-k", "--eval-every",
                 "--eval-trials", "--extract-batch"):
        need(getattr(args, flag[2:].replace("-", "_")) >= 1, flag, "an integer >= 1")
    need(args.k1 >= 2 and args.k1 >= args.k2, "--k1", f">= 2 and >= --k2 ({args.k2})")
    need(args.global_k1 >= 2 and args.global_k1 % 2 == 0 and args.global_k1 >= args.global_k2, "--global-k1",
         f"even (k1/2 neighbours per modality), >= 2 and >= --global-k2 ({args.global_k2})")
    need(args.global_k2 >= 1, "--global-k2", "an integer >= 1")
    need(0 < args.global_eps <= 1, "--global-eps", "in (0, 1] (a Jaccard distance)")
    need(args.lr > 0, "--lr", "> 0")
    need(args.weight_decay >= 0, "--weight-decay", ">= 0")
    need(0 < args.eps <= 1, "--eps", "in (0, 1] (a Jaccard distance)")
    for flag in ("--alpha", "--beta", "--momentum"):
        need(0 <= getattr(args, flag[2:]) <= 1, flag, "in [0, 1]")
    need(args.temp > 0, "--temp", "> 0")
    need(args.sinkhorn_lambda > 0, "--sinkhorn-lambda", "> 0")
    need(0 < args.subset_ratio <= 1, "--subset-ratio", "in (0, 1]")
    need(args.intra_margin >= 0, "--intra-margin", ">= 0")
    need(args.seed >= 0, "--seed", ">= 0")
    need(args.workers >= 0, "--workers", ">= 0")
    need(args.threads is None or args.threads >= 1, "--threads", ">= 1")
    need(args.resume in ("auto", "none") or os.path.isfile(args.resume), "--resume",
         "auto, none or an existing checkpoint file")
    need(args.init_from is None or os.path.isfile(args.init_from), "--init-from", "an existing stage1.pth")
    need(not args.overwrite or args.resume == "none", "--overwrite", "used with --resume none")
    need(args.dist_timeout >= 1, "--dist-timeout", ">= 1 second")
    need(args.cache_dir is None or not os.path.exists(args.cache_dir) or os.path.isdir(args.cache_dir),
         "--cache-dir", "a folder (it is created if missing)")


def cli(argv=None):
    """main() for the command line: a problem with the input is one line on stderr and exit status 2, not a
    traceback (VIREID_TRACEBACK=1 shows the traceback)."""
    try:
        return main(get_args_parser().parse_args(argv))
    except (ValueError, OSError, FloatingPointError) as err:
        if os.environ.get("VIREID_TRACEBACK"):
            raise
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:           # a refused flag or run folder: its message, exit status 2
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        print("train.py: interrupted; the same command resumes from the last finished epoch", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as err:            # under torchrun: another rank stopped, or a collective timed out
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 or os.environ.get("VIREID_TRACEBACK"):
            raise
        print(f"train.py (rank {os.environ.get('RANK')}): error: {str(err).splitlines()[0][:500]}; every rank "
              f"stops; the same command resumes from the last finished epoch", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        distributed.close()


if __name__ == "__main__":
    cli()
