"""GPU check, the one command for a borrowed GPU: the project's code on the device against the CPU, and its speed.

Seven sections in this order (the most telling first: a short loan may end early), one markdown table each,
printed, and written to --json as each ends (the whole file again, atomically: a cut-off run keeps what it did);
all on generated or rendered inputs (no dataset, no weight file), within 8 minutes on one H100 / H200:
  compare     (a) jaccard_similarity (standard per modality; modality-aware on both), dbscan and label_transfer
              on the device against the CPU, on the same SYSU-MM01-size features (N_v 22,258, N_r 11,909, D 2048,
              395 identities): identical labels and sparsity patterns, max |difference| of the values, times.
  train       (b) train.py itself, a few iterations per stage of a tiny rendered set, MULT and MBMIL, --input
              cached and pil, fp32 / bf16 / fp16, each against the same run on the CPU: epoch 0's clusters, every
              iteration's loss, the evaluation's mAP (bench/gpu_runs.py, with the tolerances).
  augment     (c) the cached input's batched augmentation on the device against the CPU, bit for bit.
  throughput  training steps of the SYSU preset (TwoStreamNet ResNet-50, 288x144, 12 clusters x 12 instances:
              2 x 144 visible + 144 infrared = 432 images per iteration; Adam; the stage-one memory loss of
              docs/mult.md §7.2) on fixed images, fp32 and bf16 autocast: images/s and peak device memory.
  input       (d) the same training with the real input pipeline (decode-once cache, plans in DataLoader workers,
              augmentation on the device) against synthetic input: images/s, peak memory, the ratio (the
              target: at most 5% below synthetic input; 2,500 images/s in bf16 on one H100 / H200).
  distributed (e) two ranks of train.py sharing the device against one process (NCCL may refuse two ranks on one
              GPU: then a skip with its reason).
  epoch       one MULT stage-two epoch on a generated SYSU-size set, phase by phase (docs/mult.md §3): feature
              extraction, Jaccard + DBSCAN per modality, label transfer, six memories, 200 training iterations
              (the target: the pseudo-label step, clustering + label transfer, under 5 s).
One summary line at the end: what passed, what did not.

    python bench/gpu_check.py --json gpu_check.json         # GPU machine: full sizes, every number kept
    python bench/gpu_check.py --skip-cpu-reference          # compare: device side only (the CPU side is the slow part)
    python bench/gpu_check.py --sizes 11909 6000 --sections compare train
    python bench/gpu_check.py --device cpu                  # small sizes, what CI runs (tests/test_gpu_check.py)

On --device cpu the "device" side of every comparison is a second CPU run of the same code: a check of
determinism and of the comparison itself, not a CUDA measurement. dbscan is scipy on the host on every device, so
its row compares the labels that each device's Jaccard similarity leads to. label_transfer gets the CPU's DBSCAN
labels and similarities on both sides, so its row compares label_transfer alone.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time


import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clustering  # noqa: E402
import memory  # noqa: E402
import mult  # noqa: E402
from data import samplers  # noqa: E402
from model import TwoStreamNet  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_runs  # noqa: E402
from gpu_runs import synchronize  # noqa: E402

# Sizes per device type, applied before the command line (the command line wins). "cuda": SYSU-MM01's training
# set and train.py's SYSU preset; "cpu": small enough for CI, well under a minute on 2 cores.
PRESETS = {
    "cuda": dict(sizes=[22258, 11909], dim=2048, ids=395, arch="resnet50", height=288, width=144, clusters=12,
                 instances=12, precisions=["fp32", "bf16"], warmup=5, iters=20, epoch_iters=200, extract=True,
                 extract_batch=256, train_precisions=["fp32", "bf16", "fp16"], augment_batches=2,
                 input_images=600, input_workers=min(8, os.cpu_count() or 1), input_precision="bf16"),
    # bf16 is left out on the CPU: without native bf16 kernels one ResNet-18 backward takes ~20 s on this
    # project's CPU (--precisions fp32 bf16 still runs it)
    "cpu": dict(sizes=[2000, 1000], dim=512, ids=36, arch="resnet18", height=64, width=32, clusters=4,
                instances=2, precisions=["fp32"], warmup=1, iters=2, epoch_iters=2, extract=False,
                extract_batch=64, train_precisions=["fp32"], augment_batches=1, input_images=16, input_workers=1,
                input_precision="off"),
}
STAGE_TWO_EPOCH = 40   # the SYSU preset's first stage-two epoch; even: AMIRL's visible label space (§7.4)
SECTIONS = ("compare", "train", "augment", "throughput", "input", "distributed", "epoch")
AMP = {"fp32": None, "bf16": torch.bfloat16}


def get_args_parser():
    p = argparse.ArgumentParser("gpu_check", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
      help="cuda (default when available), cuda:1, or cpu (small sizes; compare runs CPU against CPU)")
    a("--sections", type=str, nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which tables to make")
    a("--sizes", type=int, nargs=2, default=None, metavar=("N_V", "N_R"),
      help="visible and infrared samples of compare and epoch (cuda: 22258 11909, SYSU-MM01; cpu: 2000 1000)")
    a("--dim", type=int, default=None, help="feature size D of compare (cuda: 2048; cpu: 512); epoch uses the model's")
    a("--ids", type=int, default=None, help="identities of the generated features (cuda: 395, SYSU-MM01; cpu: 36)")
    a("--skip-cpu-reference", action="store_true",
      help="compare: time the device side only (on a GPU host the CPU reference takes most of the run)")
    a("--k1", type=int, default=30, help="Jaccard k1 (30)")
    a("--k2", type=int, default=6, help="Jaccard k2 (6)")
    a("--eps", type=float, default=0.6, help="DBSCAN eps (SYSU-MM01: 0.6)")
    a("--tol", type=float, default=1e-5, help="compare: largest |difference| of Jaccard similarities accepted")
    a("--tol-soft", type=float, default=1e-4, help="compare: largest |difference| of soft labels accepted")
    a("--arch", choices=("resnet50", "resnet18"), default=None, help="backbone (cuda: resnet50; cpu: resnet18)")
    a("--height", type=int, default=None, help="input height (cuda: 288; cpu: 64)")
    a("--width", type=int, default=None, help="input width (cuda: 144; cpu: 32)")
    a("--clusters", type=int, default=None, help="clusters per batch, even (cuda: 12; cpu: 4)")
    a("--instances", type=int, default=None, help="images per cluster and modality (cuda: 12; cpu: 2)")
    a("--precisions", type=str, nargs="+", choices=tuple(AMP), default=None,
      help="throughput: fp32 and/or bf16 autocast around the model forward, memories and losses in float32 "
           "(cuda: fp32 bf16; cpu: fp32)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=False,
      help="throughput: also time each precision with channels_last images and weights")
    a("--warmup", type=int, default=None, help="throughput: untimed iterations first (cuda: 5; cpu: 1)")
    a("--iters", type=int, default=None, help="throughput: timed iterations (cuda: 20; cpu: 2)")
    a("--epoch-iters", type=int, default=None, help="epoch: training iterations (cuda: 200, SYSU stage two; cpu: 2)")
    a("--epoch-precision", choices=tuple(AMP), default="fp32", help="epoch: training precision (fp32, as train.py)")
    a("--extract", action=argparse.BooleanOptionalAction, default=None,
      help="epoch: also time an eval forward of N_v + N_r generated images (cuda: on; cpu: off)")
    a("--extract-batch", type=int, default=None, help="epoch: extraction batch size (cuda: 256; cpu: 64)")
    a("--lr", type=float, default=3.5e-4, help="Adam learning rate (3.5e-4, as train.py)")
    a("--seed", type=int, default=0, help="seeds the generated features, images and the model")
    a("--train-methods", type=str, nargs="+", choices=("mult", "mbmil"), default=["mult", "mbmil"],
      help="train: methods (mult mbmil)")
    a("--train-inputs", type=str, nargs="+", choices=("cached", "pil"), default=["cached", "pil"],
      help="train: --input of the runs (cached pil)")
    a("--train-precisions", type=str, nargs="+", choices=tuple(gpu_runs.TOLERANCES), default=None,
      help="train: precisions on the device, each against the CPU's fp32 (cuda: fp32 bf16 fp16; cpu: fp32)")
    a("--augment-batches", type=int, default=None, help="augment: batches per pipeline (cuda: 2; cpu: 1)")
    a("--input-images", type=int, default=None, help="input: generated JPEGs per modality (cuda: 600; cpu: 16)")
    a("--input-workers", type=int, default=None, help="input: DataLoader workers (cuda: min(8, cores); cpu: 1)")
    a("--input-precision", choices=("off", "bf16", "fp16"), default=None,
      help="input: --amp of the timed training (cuda: bf16; cpu: off)")
    a("--distributed-timeout", type=int, default=240, help="distributed: seconds the two ranks may take (240)")
    a("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a("--json", type=str, default=None, help="also write the results to this JSON file, after every section")
    return p


def main(args):
    start = time.perf_counter()
    args = resolve_args(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(describe_setup(args, device), flush=True)
    results = {"setup": {"args": vars(args), "device_name": device_name(device), "torch": torch.__version__}}
    save(results, args.json)
    runs = {"compare": compare_stages, "throughput": training_throughput, "epoch": one_epoch}
    with tempfile.TemporaryDirectory() as work:        # the rendered sets and runs of the project's own code
        for section in SECTIONS:
            if section not in args.sections:
                continue
            t = time.perf_counter()
            try:
                if section in runs:
                    results[section] = runs[section](args, device)
                else:
                    run = getattr(gpu_runs, {"train": "train_runs", "augment": "augment_check", "input":
                                             "input_throughput", "distributed": "distributed_check"}[section])
                    results[section] = run(args, device, note, work)
            except Exception as err:                   # a section that breaks is reported, the next one runs
                results[section] = [{"ok": False, "detail": f"{type(err).__name__}: {err}"}]
            results["setup"].setdefault("section_s", {})[section] = time.perf_counter() - t
            print(format_table(section, results[section]), flush=True)
            save(results, args.json)
    results["setup"]["wall_s"] = time.perf_counter() - start
    results["summary"] = summary(results, args.sections)
    save(results, args.json)
    print(f"\ngpu_check: {results['summary']}; {', '.join(args.sections)} in {results['setup']['wall_s']:.0f} s "
          f"on {device}")
    if args.json:
        print(f"written to {args.json}")
    return results


def save(results, path):
    """The results so far to `path` (None: nowhere), replacing it atomically."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2, default=str)
        os.replace(path + ".tmp", path)


def summary(results, sections):
    """One line: PASS or FAIL, then each section's judged rows that passed, what failed, what was skipped."""
    parts, failed = [], []
    for section in sections:
        rows = results.get(section) or []
        judged = [r for r in rows if r.get("ok") is not None]
        passed = sum(bool(r["ok"]) for r in judged)
        skipped = len(rows) - len(judged)
        parts.append(f"{section} {passed}/{len(judged)}" + (f" ({skipped} not judged)" if skipped else ""))
        failed += [f"{section}: {r.get('detail', '')[:80]}" for r in judged if not r["ok"]]
    return ("PASS" if not failed else "FAIL") + " (" + ", ".join(parts) + ")" + \
        ("" if not failed else "; failed: " + " | ".join(failed))


# ---------------------------------------------------------------------------------------------------
# compare: the same call on the CPU and on the device

def compare_stages(args, device):
    """Rows of the compare table: the three Jaccard calls, their DBSCANs, label_transfer."""
    cpu = torch.device("cpu")
    reference = not args.skip_cpu_reference
    warm_up(args, device)
    feat_v, feat_r, _, _ = make_features(args.sizes[0], args.sizes[1], args.dim, args.ids, args.seed)
    n_v, n_r = len(feat_v), len(feat_r)
    feat_all = torch.cat([feat_v, feat_r])                                    # [N_v + N_r, D]
    modality = np.r_[np.zeros(n_v, np.int64), np.ones(n_r, np.int64)]
    calls = (("standard", f"vis {n_v:,}", feat_v, None), ("standard", f"ir {n_r:,}", feat_r, None),
             ("modality-aware", f"vis+ir {n_v + n_r:,}", feat_all, modality))
    rows, labels, sims = [], {}, {}
    for variant, name, x, mod in calls:
        ref = timed(cpu, clustering.jaccard_similarity, x, args.k1, args.k2, mod) if reference else None
        dev = timed(device, clustering.jaccard_similarity, x.to(device), args.k1, args.k2, mod)
        row = {"step": f"jaccard_similarity ({variant})", "input": name, "compared": "similarities"}
        if ref:
            same, only, diff = compare_csr(ref[0], dev[0])
            row.update(identical=same, max_abs_diff=diff, ok=same and diff <= args.tol,
                       detail=f"nnz {dev[0].nnz:,}" + ("" if same else f", {only:,} in one pattern only"))
        else:
            row.update(detail=f"nnz {dev[0].nnz:,}")
        rows.append(with_times(row, ref, dev))
        for side, out in (("cpu", ref), ("dev", dev)):
            if out:
                sims[side, name] = out[0]
    for variant, name, _, _ in calls:
        ref = timed(cpu, clustering.dbscan, sims["cpu", name], args.eps) if reference else None
        dev = timed(cpu, clustering.dbscan, sims["dev", name], args.eps)     # scipy: host, on the device's S
        lab = dev[0]
        row = {"step": f"dbscan ({variant} Jaccard)", "input": name, "compared": "labels",
               "detail": f"scipy on the host; K {lab.max() + 1}, {np.mean(lab < 0):.1%} outliers"}
        if ref:
            same = bool(np.array_equal(ref[0], lab))
            row.update(identical=same, ok=same, detail=row["detail"] + ("" if same else
                       f", {int((ref[0] != lab).sum()):,} labels differ"))
        rows.append(with_times(row, ref, dev))
        labels[name] = (ref or dev)[0]
    side = "cpu" if reference else "dev"                                      # the same inputs on both sides
    lab_v, lab_r = labels[calls[0][1]], labels[calls[1][1]]
    sim_v, sim_r = sims[side, calls[0][1]], sims[side, calls[1][1]]
    ref = timed(cpu, mult.label_transfer, feat_v, feat_r, lab_v, lab_r, sim_v, sim_r) if reference else None
    dev = timed(device, mult.label_transfer, feat_v.to(device), feat_r.to(device), lab_v, lab_r, sim_v, sim_r)
    lt = dev[0]
    row = {"step": "label_transfer", "input": f"vis {n_v:,} + ir {n_r:,}", "compared": "hard; soft labels",
           "detail": f"K_v {lt.K_v}, K_r {lt.K_r}, iterations {lt.sinkhorn_iters} {lt.prop_iters}"}
    if ref:
        same, differ, diff = compare_transfer(ref[0], lt)
        iters = (ref[0].sinkhorn_iters, ref[0].prop_iters) == (lt.sinkhorn_iters, lt.prop_iters)
        row.update(identical=same, max_abs_diff=diff, ok=same and diff <= args.tol_soft,
                   detail=row["detail"] + ("" if iters else f" (CPU {ref[0].sinkhorn_iters} {ref[0].prop_iters})")
                   + ("" if same else f", {differ:,} hard labels differ"))
    rows.append(with_times(row, ref, dev))
    return rows


def warm_up(args, device):
    """Every stage once on a small generated set, so that the timed calls do not pay for CUDA's lazy start
    (context, cuBLAS and cuSPARSE handles, kernel loading)."""
    feat_v, feat_r, _, _ = make_features(400, 300, args.dim, 12, args.seed + 1)
    feat_v, feat_r = feat_v.to(device), feat_r.to(device)
    both = torch.cat([feat_v, feat_r])
    clustering.jaccard_similarity(both, args.k1, args.k2, np.r_[np.zeros(400, np.int64), np.ones(300, np.int64)])
    sim_v, sim_r = (clustering.jaccard_similarity(f, args.k1, args.k2) for f in (feat_v, feat_r))
    lab_v, lab_r = clustering.dbscan(sim_v, args.eps), clustering.dbscan(sim_r, args.eps)
    if lab_v.max() >= 0 and lab_r.max() >= 0:
        mult.label_transfer(feat_v, feat_r, lab_v, lab_r, sim_v, sim_r)
    synchronize(device)


def compare_csr(a, b):
    """Two scipy sparse matrices -> (same sparsity pattern, entries stored in one of them only,
    max |a - b| over the entries stored in both)."""
    a, b = a.tocsr(), b.tocsr()
    a.sort_indices()
    b.sort_indices()
    if a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices):
        return True, 0, float(np.abs(a.data.astype(np.float64) - b.data).max(initial=0.0))
    pa, pb = a.copy(), b.copy()
    pa.data[:], pb.data[:] = 1, 1                                             # the two patterns, as 0/1
    common = pa.multiply(pb)
    diff = abs(a.astype(np.float64) - b).multiply(common)
    return False, int((pa != pb).nnz), float(diff.max()) if diff.nnz else 0.0


def compare_transfer(a, b):
    """Two LabelTransfer results -> (all four hard labels identical, hard labels that differ,
    max |difference| of the four soft-label tensors)."""
    hard = [(a.labels_v, b.labels_v), (a.labels_r, b.labels_r), (a.cross_v, b.cross_v), (a.cross_r, b.cross_r)]
    same = all(x.shape == y.shape and np.array_equal(x, y) for x, y in hard)
    differ = sum(int((x != y).sum()) if x.shape == y.shape else len(x) for x, y in hard)
    soft = [(a.soft_v, b.soft_v), (a.soft_r, b.soft_r), (a.soft_cross_v, b.soft_cross_v),
            (a.soft_cross_r, b.soft_cross_r)]
    diff = max(float((x.cpu().double() - y.cpu().double()).abs().max()) if x.shape == y.shape else float("inf")
               for x, y in soft)
    return same, differ, diff


def with_times(row, ref, dev):
    """A compare row with the CPU and device seconds and the device's peak memory (None where not run)."""
    row = dict({"identical": None, "max_abs_diff": None, "ok": None}, **row, cpu_s=ref[1] if ref else None,
               device_s=dev[1], peak_gb=dev[2])
    note(f"compare: {row['step']}, {row['input']}: identical {row['identical']}, CPU "
         f"{num(row['cpu_s'], '.2f')} s, device {row['device_s']:.2f} s")
    return row


# ---------------------------------------------------------------------------------------------------
# throughput: training iterations of the preset's shape

def training_throughput(args, device):
    """Rows of the throughput table: one per precision (and memory format), images/s and peak memory."""
    rows = []
    formats = [False, True] if args.channels_last else [False]
    for precision in args.precisions:
        for channels_last in formats:
            row = {"precision": precision, "memory_format": "channels_last" if channels_last else "contiguous",
                   "images_per_iter": 3 * args.clusters * args.instances, "iters": args.iters}
            try:
                row.update(time_training(args, device, AMP[precision], channels_last))
            except torch.cuda.OutOfMemoryError:
                row.update(s_per_iter=None, images_per_s=None, peak_gb=None, detail="out of memory")
            release(device)
            rows.append(row)
            note(f"throughput: {precision} {row['memory_format']}: {num(row['images_per_s'], ',.0f')} images/s")
    return rows


def time_training(args, device, amp, channels_last):
    """`warmup` then `iters` timed steps of the stage-one loss on fixed generated images (no data loading)."""
    torch.manual_seed(args.seed)
    model = TwoStreamNet(args.arch).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=5e-4)
    b, d, k = args.clusters * args.instances, model.feature_dim, args.ids
    g = torch.Generator().manual_seed(args.seed)
    images = [torch.randn(b, 3, args.height, args.width, generator=g).to(device, memory_format=fmt)
              for _ in range(3)]                                              # v0, v1, r: [B, 3, H, W] each
    banks = {m: memory.ClusterMemory(torch.randn(k, d, generator=g).to(device)) for m in ("vis", "ir")}
    y_v, y_r = (torch.randperm(k, generator=g)[:args.clusters].repeat_interleave(args.instances).numpy()
                for _ in range(2))                      # [B] each, clusters x instances, on the host as train.py's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        stage_one_step(model, optimizer, banks, images, y_v, y_r, amp, device)
    synchronize(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        loss = stage_one_step(model, optimizer, banks, images, y_v, y_r, amp, device)
    synchronize(device)
    dt = (time.perf_counter() - t) / max(args.iters, 1)
    loss = finite(loss)                                                       # read once, after the timing
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"s_per_iter": dt, "images_per_s": 3 * b / dt, "peak_gb": peak,
            "detail": f"last loss {loss:.3f} (same images each step)"}


def stage_one_step(model, optimizer, banks, images, y_v, y_r, amp, device):
    """One training iteration as train.py's, without a wait for the device: forward, stage-one loss in float32,
    Adam step, memory update (host labels, unchecked). Returns the loss, a device tensor."""
    loss, updates = memory.stage_one_loss(banks, *forward(model, images, amp, device), y_v, y_r)
    optimise(optimizer, loss)
    memory.apply_updates(banks, updates, check=False)
    return loss.detach()


def forward(model, images, amp, device):
    """(v0, v1, r) [B, 3, H, W] each -> (f_v0, f_v1, f_r) [B, D] each, float32; autocast (amp: a dtype or None)
    around the model only, as train.py's forward_batch."""
    v0, v1, r = images
    with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        f = model(torch.cat([v0, v1]), r)                                     # [3B, D]
    return f.float().split(v0.shape[0])


def finite(loss):
    """A loss read back as a float; FloatingPointError if it is not finite."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"gpu_check: the loss is {value}")
    return value


def optimise(optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------------------
# epoch: one MULT stage-two epoch, phase by phase (docs/mult.md §3)

def one_epoch(args, device):
    """Rows of the epoch table: seconds per phase of a stage-two epoch on generated features and images."""
    rows = []

    def phase(name, fn, *a, detail=""):
        out, seconds, peak = timed(device, fn, *a)
        rows.append({"phase": name, "seconds": seconds, "peak_gb": peak, "detail": detail})
        note(f"epoch: {name} {seconds:.2f} s")
        return out

    n_v, n_r = args.sizes
    torch.manual_seed(args.seed)
    model = TwoStreamNet(args.arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=5e-4)
    if args.extract:   # the cost of extraction; its features (of an untrained network) are not used
        phase("extraction", extract_generated, model, n_v + n_r, args, device,
              detail=f"eval forward of {n_v + n_r:,} generated images, batch {args.extract_batch}")
    feat_v, feat_r, _, _ = make_features(n_v, n_r, model.feature_dim, args.ids, args.seed)
    feat_v, feat_r = feat_v.to(device), feat_r.to(device)                     # [N_v, D], [N_r, D]
    sim_v, lab_v = phase("clustering vis", cluster, feat_v, args)
    rows[-1]["detail"] = f"Jaccard + DBSCAN: K_v {lab_v.max() + 1}, {np.mean(lab_v < 0):.1%} outliers"
    sim_r, lab_r = phase("clustering ir", cluster, feat_r, args)
    rows[-1]["detail"] = f"Jaccard + DBSCAN: K_r {lab_r.max() + 1}, {np.mean(lab_r < 0):.1%} outliers"
    lt = phase("label transfer", mult.label_transfer, feat_v, feat_r, lab_v, lab_r, sim_v, sim_r)
    rows[-1]["detail"] = f"iterations {lt.sinkhorn_iters} {lt.prop_iters}"
    banks = phase("memories", stage_two_banks, feat_v, feat_r, lab_v, lab_r, detail="six ClusterMemory banks")
    mixed = lt.mixed(0.7)
    hard = {k: np.asarray(v, dtype=np.int64) for k, v in          # on the host, as train.py keeps them
            (("vis", lt.labels_v), ("ir", lt.labels_r), ("vis_to_ir", lt.cross_v), ("ir_to_vis", lt.cross_r))}
    soft = {"vis": mixed.soft_v, "ir": mixed.soft_r, "vis_to_ir": mixed.soft_cross_v, "ir_to_vis": mixed.soft_cross_r}
    rng = np.random.default_rng(args.seed)
    batches = samplers.stage_two_batches(lt.labels_v, lt.cross_r, lt.cross_v, lt.labels_r, args.epoch_iters,
                                         args.clusters, args.instances, rng)  # [iters, B, 2]
    images = 3 * batches.shape[1] * args.epoch_iters
    losses = phase("training", train_stage_two, model, optimizer, banks, batches, hard, soft, args, device)
    rows[-1]["detail"] = (f"{args.epoch_iters} stage-two iterations, {images / rows[-1]['seconds']:,.0f} images/s, "
                          f"{args.epoch_precision}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    rows.append({"phase": "total", "seconds": sum(r["seconds"] for r in rows),
                 "peak_gb": max((r["peak_gb"] for r in rows), default=None) if device.type == "cuda" else None,
                 "detail": "sum of the phases"})
    return rows


def extract_generated(model, n, args, device):
    """Eval forward of n generated images in batches, half through each stem (the features are discarded)."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for i, start in enumerate(range(0, n, args.extract_batch)):
            x = torch.randn(min(args.extract_batch, n - start), 3, args.height, args.width, generator=g,
                            device=device)
            model(x_vis=x) if i % 2 == 0 else model(x_ir=x)
    model.train()


def cluster(feats, args):
    """Jaccard + DBSCAN of one modality (docs/mult.md §4) -> (similarity csr, labels int64 [N])."""
    sim = clustering.jaccard_similarity(feats, args.k1, args.k2)
    return sim, clustering.dbscan(sim, args.eps)


def stage_two_banks(feat_v, feat_r, lab_v, lab_r):
    """The six memories of docs/mult.md §7.3, from the DBSCAN centers: M_v, M_rv, M_cv over visible clusters,
    M_r, M_vr, M_cr over infrared ones."""
    c_v = clustering.cluster_centers(feat_v, lab_v)                           # [K_v, D]
    c_r = clustering.cluster_centers(feat_r, lab_r)                           # [K_r, D]
    return {name: memory.ClusterMemory(c_v if name in ("vis", "ir_to_vis", "unified_vis") else c_r)
            for name in ("vis", "ir", "ir_to_vis", "vis_to_ir", "unified_vis", "unified_ir")}


def train_stage_two(model, optimizer, banks, batches, hard, soft, args, device):
    """The stage-two iterations of train.py's train_mult on fixed generated images, the rows of each batch
    indexing the pseudo-labels (hard ones on the host, soft ones on the device), without a wait for the device
    until the end. Returns the losses."""
    model.train()
    amp, b = AMP[args.epoch_precision], batches.shape[1]
    g = torch.Generator().manual_seed(args.seed)
    images = [torch.randn(b, 3, args.height, args.width, generator=g).to(device) for _ in range(3)]   # v0, v1, r
    idx = torch.as_tensor(batches, device=device)                             # [iters, B, 2]
    losses, side = [], {k: 0 if k.startswith("vis") else 1 for k in hard}     # visible rows carry "vis*" labels
    for it in range(len(batches)):
        loss, _, updates = memory.stage_two_loss(banks, *forward(model, images, amp, device),
                                                 {k: y[batches[it, :, side[k]]] for k, y in hard.items()},
                                                 {k: soft[k][idx[it, :, side[k]]] for k in hard}, STAGE_TWO_EPOCH)
        optimise(optimizer, loss)
        memory.apply_updates(banks, updates, check=False)
        losses.append(loss.detach())
    return [finite(x) for x in torch.stack(losses).tolist()] if losses else []


# ---------------------------------------------------------------------------------------------------
# Generated features, timing, tables

def make_features(n_v, n_r, dim, ids, seed, latent=64, spread=1.1, noise=0.6, distortion=0.5, gap=0.8):
    """Clustered L2-normalised features, a pure function of the seed: (feat_v [N_v, D], feat_r [N_r, D],
    pid_v [N_v], pid_r [N_r]) on the CPU.

    `ids` identity codes z in a `latent`-dimensional subspace; each modality sees its own distortion of them
    (z + distortion * noise) and adds a constant offset of norm `gap` along its own direction (the modality
    gap); a sample is its identity's code plus `spread` latent noise, projected to D, plus isotropic noise of
    norm `noise`. Identities are drawn uniformly per sample.
    """
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(latent, dim, generator=g) / latent ** 0.5                 # [latent, D]
    z = torch.randn(ids, latent, generator=g)                                    # identity codes
    offset = F.normalize(torch.randn(2, dim, generator=g), dim=1)                # one direction per modality
    out = []
    for m, n in enumerate((n_v, n_r)):
        z_m = z + distortion * torch.randn(ids, latent, generator=g)             # this modality's view
        pid = torch.randint(ids, (n,), generator=g)
        x = F.normalize((z_m[pid] + spread * torch.randn(n, latent, generator=g)) @ proj, dim=1)
        x = x + noise * F.normalize(torch.randn(n, dim, generator=g), dim=1) + gap * offset[m]
        out.append((F.normalize(x, dim=1), pid.numpy()))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def note(text):
    """Progress on stderr, one line per step (the tables go to stdout)."""
    print(text, file=sys.stderr, flush=True)


def release(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(device, fn, *args):
    """(fn(*args), wall seconds, peak device GB above the memory allocated at the start; None on the CPU).
    The device is synchronised before and after, so the seconds include every kernel the call launched."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    return out, seconds, peak


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} torch threads)"


def describe_setup(args, device):
    lines = [f"# gpu_check on {device} ({device_name(device)}), torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")
             + f", {torch.get_num_threads()} CPU threads, float32 matmul precision "
             f"{torch.get_float32_matmul_precision()}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
             "# arguments: " + json.dumps(vars(args))]
    if device.type == "cpu":
        lines.append("# device cpu: the 'device' side of compare is a second CPU run (determinism), not CUDA")
    if args.skip_cpu_reference:
        lines.append("# --skip-cpu-reference: compare times the device side only; nothing is compared")
    return "\n".join(lines)


def format_table(section, rows):
    """A markdown table of one section's rows."""
    dev = "device"
    if rows and set(rows[0]) == {"ok", "detail"}:                  # the section itself broke
        head, body, tail = ["ok", "detail"], [[yes_no(r["ok"]), r["detail"]] for r in rows], f"{section}: broke"
    elif section == "compare":
        head = ["step", "input", "compared", "identical", "max abs diff", "within tolerance", "CPU s", f"{dev} s",
                "speed-up", "peak GB", "detail"]
        body = [[r["step"], r["input"], r["compared"], yes_no(r["identical"]), num(r["max_abs_diff"], ".1e"),
                 yes_no(r["ok"]), num(r["cpu_s"], ".2f"), num(r["device_s"], ".2f"),
                 num(r["cpu_s"] / r["device_s"] if r["cpu_s"] and r["device_s"] else None, ".1f"),
                 num(r["peak_gb"], ".2f"), r["detail"]] for r in rows]
        judged = [r["ok"] for r in rows if r["ok"] is not None]
        tail = (f"compare: {sum(judged)} of {len(judged)} identical within tolerance" if judged else
                "compare: no CPU reference run (--skip-cpu-reference), nothing compared")
    elif section == "throughput":
        head = ["precision", "memory format", "images / iter", "timed iters", "s / iter", "images / s",
                "peak GB", "detail"]
        body = [[r["precision"], r["memory_format"], str(r["images_per_iter"]), str(r["iters"]),
                 num(r["s_per_iter"], ".3f"), num(r["images_per_s"], ",.0f"), num(r["peak_gb"], ".2f"),
                 r["detail"]] for r in rows]
        tail = "throughput: peak GB = torch.cuda.max_memory_allocated over warm-up and timed iterations"
    elif section == "train":
        head = ["method", "input", "precision", "labels equal", "max loss rel diff", "max mAP diff", "CPU s",
                f"{dev} s", "ok", "detail"]
        body = [[r["method"], r["input"], r["precision"], num(r["labels_agree"], ".1%"),
                 num(r["max_loss_rel_diff"], ".1e"), num(r["max_map_diff"], ".2f"), num(r["cpu_s"], ".1f"),
                 num(r["device_s"], ".1f"), yes_no(r["ok"]), r["detail"]] for r in rows]
        tail = "train: train.py on the device against the same run on the CPU in float32 (bench/gpu_runs.py)"
    elif section == "augment":
        head = ["pipeline", "batches", "pairs", "values differing", "max abs diff", f"{dev} images / s", "ok",
                "detail"]
        body = [[r["pipeline"], str(r["batches"]), str(r["pairs"]), str(r["values_differing"]),
                 num(r["max_abs_diff"], ".1e"), num(r["images_per_s"], ",.0f"), yes_no(r["ok"]), r["detail"]]
                for r in rows]
        tail = "augment: the cached augmentation on the device against the CPU, bit for bit"
    elif section == "input":
        head = ["input", "precision", "images / iter", "s / iter", "images / s", "vs synthetic", "peak GB", "ok",
                "detail"]
        body = [[r["input"], r["precision"], str(r["images_per_iter"]), num(r["s_per_iter"], ".3f"),
                 num(r["images_per_s"], ",.0f"), num(r["vs_synthetic"], ".2f"), num(r["peak_gb"], ".2f"),
                 yes_no(r["ok"]), r["detail"]] for r in rows]
        tail = "input: ok = the real pipeline at most 5% below synthetic input (judged on a GPU only)"
    elif section == "distributed":
        head = ["world", "device", "seconds", "max loss rel diff", "ok", "detail"]
        body = [[str(r["world"]), r["device"], num(r["seconds"], ".1f"), num(r["max_loss_rel_diff"], ".1e"),
                 yes_no(r["ok"]), r["detail"]] for r in rows]
        tail = "distributed: two ranks of train.py on this device against one process"
    else:
        head = ["phase", "seconds", "peak GB", "detail"]
        body = [[r["phase"], num(r["seconds"], ".2f"), num(r["peak_gb"], ".2f"), r["detail"]] for r in rows]
        tail = "epoch: peak GB above the memory allocated when each phase starts"
    width = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, width)) + " |"   # noqa: E731
    return "\n".join([f"\n## {section}", line(head), "|" + "|".join("-" * (w + 2) for w in width) + "|",
                      *map(line, body), tail])


def num(x, spec):
    return "-" if x is None else format(x, spec)


def yes_no(x):
    return "-" if x is None else ("yes" if x else "NO")


# ---------------------------------------------------------------------------------------------------
# Flags

def resolve_args(args):
    """Every size left unset takes the preset of the device type; then each flag is checked."""
    preset = PRESETS["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: --device {args.device}: CUDA is not available here (use --device cpu)")
    n_v, n_r = args.sizes
    if min(n_v, n_r) < max(args.k1, args.k2) or args.dim < 1 or args.ids < 1:
        raise SystemExit(f"gpu_check: --sizes {n_v} {n_r} must each be >= --k1 ({args.k1}); --dim and --ids >= 1")
    if args.clusters < 2 or args.clusters % 2 or args.instances < 1:
        raise SystemExit(f"gpu_check: --clusters must be even and >= 2 (stage two: half per modality), "
                         f"--instances >= 1; got {args.clusters}, {args.instances}")
    if args.ids < args.clusters:
        raise SystemExit(f"gpu_check: --ids ({args.ids}) must be >= --clusters ({args.clusters})")
    if min(args.warmup, args.iters - 1, args.epoch_iters - 1, args.extract_batch - 1) < 0:
        raise SystemExit("gpu_check: --warmup >= 0, --iters, --epoch-iters and --extract-batch >= 1")
    if args.augment_batches < 1 or args.input_images < args.clusters * args.instances or args.input_workers < 0:
        raise SystemExit(f"gpu_check: --augment-batches >= 1, --input-images >= --clusters x --instances "
                         f"({args.clusters * args.instances}), --input-workers >= 0")
    return args


if __name__ == "__main__":
    main(get_args_parser().parse_args())
