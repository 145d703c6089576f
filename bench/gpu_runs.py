"""The sections of bench/gpu_check.py that run the project's own code on the device, each against the CPU.

  train        train.py itself (train.main, in this process) for a few iterations per stage on a tiny rendered set:
               both methods, --input cached and pil, each precision, against the same run on the CPU in float32:
               epoch 0's clusters, the per-iteration losses, the evaluation's mAP
  augment      the cached input's batched augmentation (data/fast) on the device against the CPU, bit for bit, for
               MULT's two stages and MBMIL's pipelines, at the preset's size; the device's images/s
  input        training throughput of the preset (train.py's forward_batch, stage-one loss, optimise, bank update)
               with the real input pipeline (decode-once cache, plans in DataLoader workers, augmentation on the
               device) against synthetic input (fixed batches on the device): images/s, peak memory, the ratio
  distributed  two ranks of train.py sharing the device (gloo on the CPU; NCCL on one GPU, which NCCL may refuse:
               then a skip with its reason), against one process
Every row has "ok": True, False, or None (not judged: skipped, or a figure without a bound).
Tolerances of the device against the CPU (uncalibrated: no GPU has run this yet): float32 trains with TF32
convolutions on CUDA, bf16 and fp16 with the backbone in that type, so their clusters may move at the margin.
"""
import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.device import configure as configure_device  # noqa: E402

# What each precision's run must meet against the CPU's float32 run: the share of epoch 0's cluster labels that
# agree, the largest relative difference of a per-iteration loss, the largest |difference| of an mAP (points).
TOLERANCES = {"fp32": (1.0, 1e-3, 1.0), "bf16": (0.9, 5e-2, 10.0), "fp16": (0.9, 2e-2, 5.0)}
AMP_FLAG = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
# The tiny run: 10 identities at 32x16, ResNet-18 from random weights, 2 iterations per stage, evaluation at the
# end. The lr is small so that rounding-level differences do not grow through Adam's first steps (as in
# tests/test_distributed.py): the runs stay comparable iteration by iteration.
TINY = ["--arch", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16", "--k1", "6", "--k2", "2",
        "--clusters", "2", "--instances", "2", "--iters", "2", "--eval-trials", "1", "--extract-batch", "64",
        "--eval-every", "100", "--no-eval-untrained", "--no-diagnostics", "--workers", "0", "--eps", "0.6",
        "--global-k1", "6", "--global-k2", "2", "--global-eps", "0.6", "--no-check-images", "--epochs", "2",
        "--stage-one-epochs", "1", "--lr", "1e-6", "--resume", "none"]


def tiny_set(folder):
    """The rendered synthetic set of the train and distributed sections (once per folder)."""
    from demo.synthetic import render_sysu
    root = os.path.join(folder, "data")
    if not os.path.isdir(root):
        render_sysu(root, num_ids=10, images_per_cam=2, height=32, width=16, seed=0)
    return root


# ---------------------------------------------------------------------------------------------------
# train: train.py on the device against the CPU

def train_runs(args, device, note, work):
    """Rows of the train section: one per (method, input, precision)."""
    import train
    root, rows = tiny_set(work), []
    for method in args.train_methods:
        for inp in args.train_inputs:
            ref = run_train(train, root, work, method, inp, "fp32", torch.device("cpu"))
            for precision in args.train_precisions:
                got = run_train(train, root, work, method, inp, precision, device)
                rows.append(compare_runs(method, inp, precision, ref, got))
                note(f"train: {method} --input {inp} {precision}: ok {rows[-1]['ok']}, {rows[-1]['detail']}")
    return rows


_REFERENCES = {}


def run_train(train, root, work, method, inp, precision, device):
    """train.main on `device` -> {"labels": epoch 0's clusters, "curve", "mAP", "seconds", "error"}, each run once
    (the distributed section reuses the one-process run)."""
    key = (method, inp, precision, str(device))
    if key in _REFERENCES:
        return _REFERENCES[key]
    out, labels = tempfile.mkdtemp(dir=work), []
    real = {n: getattr(train, n) for n in ("mult_pseudo_labels", "mbmil_pseudo_labels")}

    def recorded(name):
        def fn(*a, **k):
            got = real[name](*a, **k)
            if got is not None:
                labels.append({m: np.array(got["clusters"][m]) for m in ("vis", "ir")})
            return got
        return fn
    run = {"labels": labels, "curve": [], "mAP": {}, "seconds": None, "error": None}
    try:
        for name in real:
            setattr(train, name, recorded(name))
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):          # its log beside the progress: stdout has the tables
            results = train.main(["--method", method, "--data-root", root, "--out", out, "--input", inp, "--amp",
                                  AMP_FLAG[precision], "--device", str(device), *TINY])
        synchronize(device)
        run["seconds"] = time.perf_counter() - t
        run["mAP"] = {name: r["mean"]["mAP"] for name, r in results.items()}
        with open(os.path.join(out, "metrics.jsonl")) as f:
            run["curve"] = [x for line in f for x in json.loads(line).get("loss_per_iteration", [])]
    except Exception as err:                      # a failure is a row, not the end of the check
        run["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        for name, fn in real.items():
            setattr(train, name, fn)
    _REFERENCES[key] = run
    return run


def compare_runs(method, inp, precision, ref, got):
    """One train row: the device's run against the CPU's."""
    row = {"method": method, "input": inp, "precision": precision, "labels_agree": None, "max_loss_rel_diff": None,
           "max_map_diff": None, "cpu_s": ref["seconds"], "device_s": got["seconds"], "ok": False}
    if ref["error"] or got["error"]:
        return dict(row, detail=f"CPU: {ref['error']}" if ref["error"] else f"device: {got['error']}")
    agree_min, loss_tol, map_tol = TOLERANCES[precision]
    if not ref["labels"] or not got["labels"]:
        return dict(row, detail="no clusters at epoch 0")
    a, b = ref["labels"][0], got["labels"][0]
    agree = float(np.mean(np.r_[a["vis"] == b["vis"], a["ir"] == b["ir"]]))
    curves = np.array(ref["curve"]), np.array(got["curve"])
    diff = float(np.max(np.abs(curves[0] - curves[1]) / np.abs(curves[0]))) if curves[0].shape == curves[1].shape \
        and len(curves[0]) else float("inf")
    maps = max((abs(ref["mAP"][k] - got["mAP"].get(k, float("inf"))) for k in ref["mAP"]), default=float("inf"))
    ok = agree >= agree_min and diff <= loss_tol and maps <= map_tol
    return dict(row, labels_agree=agree, max_loss_rel_diff=diff, max_map_diff=maps, ok=ok,
                detail=f"{len(curves[1])} iterations, labels {agree:.1%} equal (need {agree_min:.0%}), losses "
                       f"within {diff:.1e} (need {loss_tol:.0e}), mAP within {maps:.2f} (need {map_tol})")


# ---------------------------------------------------------------------------------------------------
# augment: the cached augmentation on the device against the CPU

PIPELINES = (("mult", 1), ("mult", 2), ("mbmil", 1))


def augment_check(args, device, note, work):
    """Rows of the augment section: each pipeline's batches on the device against the CPU, bit for bit."""
    from bench_input import index_batches, make_sources
    from data import transforms as T
    from data.fast.cache import build_cache
    from data.fast.loader import CachedTrainBatches
    h, w, pairs = args.height, args.width, args.clusters * args.instances
    vis, ir = make_sources(os.path.join(work, "augment"), 2 * pairs, (w, h), args.seed)
    rows = []
    for method, stage in PIPELINES:
        way = T.RESIZE[method]
        caches = [build_cache(images, h, w, way, progress=False) for images in (vis, ir)]
        tfm = T.train_transforms(h, w, stage, method=method, pad=T.crop_pad(h))
        batches = index_batches(len(vis), len(ir), pairs, args.augment_batches, np.random.default_rng(args.seed))
        on_cpu = CachedTrainBatches(*caches, tfm, batches, seed=args.seed)
        on_dev = CachedTrainBatches(*caches, tfm, batches, seed=args.seed, device=device)
        differ, worst, seconds = 0, 0.0, 0.0
        for b in range(len(batches)):
            plan = on_cpu.plan(b)
            want = on_cpu.augment(plan)
            synchronize(device)
            t = time.perf_counter()
            got = on_dev.augment(plan)
            synchronize(device)
            seconds += time.perf_counter() - t
            for k in ("v0", "v1", "r"):
                g = got[k].cpu()
                differ += int((g != want[k]).sum())
                worst = max(worst, float((g - want[k]).abs().max()))
        rows.append({"pipeline": f"{method} stage {stage}", "batches": len(batches), "pairs": pairs,
                     "values_differing": differ, "max_abs_diff": worst, "ok": differ == 0,
                     "images_per_s": 3 * pairs * len(batches) / seconds,
                     "detail": f"{h}x{w}, {way}, device images/s {3 * pairs * len(batches) / seconds:,.0f}"})
        note(f"augment: {method} stage {stage}: {differ} values differ")
    return rows


# ---------------------------------------------------------------------------------------------------
# input: training throughput with the real input pipeline against synthetic input

def input_throughput(args, device, note, work):
    """Rows of the input section: synthetic input, then the cached pipeline of MULT's stage one and two."""
    import memory
    import train
    from bench_input import index_batches, make_sources
    from data import transforms as T
    from data.fast.cache import build_cache
    from data.fast.loader import CachedTrainBatches, cached_loader
    from model import TwoStreamNet
    h, w, pairs = args.height, args.width, args.clusters * args.instances
    vis, ir = make_sources(os.path.join(work, "input"), args.input_images, (w, h), args.seed)
    caches = [build_cache(images, h, w, "bilinear", progress=False, workers=args.input_workers)
              for images in (vis, ir)]
    step_args = argparse.Namespace(device=str(device), channels_last=False, amp=args.input_precision)
    total = args.warmup + args.iters
    batches = index_batches(len(vis), len(ir), pairs, total, np.random.default_rng(args.seed))
    k = args.clusters                                        # labels: the batch's clusters x instances
    y = np.repeat(np.arange(k), args.instances)
    rows = []
    for name, stage in (("synthetic", None), ("cached, MULT stage 1", 1), ("cached, MULT stage 2", 2)):
        torch.manual_seed(args.seed)
        model = TwoStreamNet(args.arch).to(device).train()
        optimizer = train.make_optimizer(model, argparse.Namespace(lr=3.5e-4, weight_decay=5e-4, device=str(device),
                                                                   amp=args.input_precision))
        banks = {m: memory.ClusterMemory(torch.randn(k, model.feature_dim).to(device)) for m in ("vis", "ir")}
        if stage is None:
            g = torch.Generator().manual_seed(args.seed)
            fixed = {v: torch.randn(pairs, 3, h, w, generator=g).to(device) for v in ("v0", "v1", "r")}
            source = (fixed for _ in range(total))
        else:
            tfm = T.train_transforms(h, w, stage, pad=T.crop_pad(h))
            source = iter(cached_loader(CachedTrainBatches(*caches, tfm, batches, seed=args.seed, device=device),
                                        num_workers=args.input_workers))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        configure_device(str(device), autotune=True)      # as train.py trains: cuDNN's autotuner on
        for i, batch in enumerate(source):
            if i == args.warmup:
                synchronize(device)
                t = time.perf_counter()
            f_v0, f_v1, f_r = train.forward_batch(model, batch, step_args)
            loss, updates = memory.stage_one_loss(banks, f_v0, f_v1, f_r, y, y)
            train.optimise(optimizer, loss, 0, i)
            memory.apply_updates(banks, updates, check=False)
        loss = loss.item()
        synchronize(device)
        seconds = (time.perf_counter() - t) / args.iters
        rows.append({"input": name, "precision": args.input_precision, "images_per_iter": 3 * pairs,
                     "s_per_iter": seconds, "images_per_s": 3 * pairs / seconds,
                     "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                     "vs_synthetic": None, "ok": None, "detail": f"loss {loss:.3f}, {args.input_workers} workers"})
        note(f"input: {name}: {rows[-1]['images_per_s']:,.0f} images/s")
    for row in rows[1:]:          # the target: the real pipeline at most 5% below synthetic input
        row["vs_synthetic"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["ok"] = row["vs_synthetic"] >= 0.95 if device.type == "cuda" else None
    return rows


# ---------------------------------------------------------------------------------------------------
# distributed: two ranks sharing the device

def distributed_check(args, device, note, work):
    """One row: train.py under two ranks (WORLD_SIZE=2, both on this device) against one process."""
    import train
    root = tiny_set(work)
    ref = run_train(train, root, work, "mult", "cached", "fp32", device)
    out = os.path.join(work, "two_ranks")
    argv = ["--data-root", root, "--out", out, "--device", str(device), *TINY, "--dist-timeout", "60"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    ctx = mp.start_processes(rank_main, args=(port, argv, work), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + args.distributed_timeout
    while any(p.is_alive() for p in ctx.processes) and time.time() < deadline:
        time.sleep(0.2)
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    seconds = time.perf_counter() - t
    errors = []
    for rank in (0, 1):
        path = os.path.join(work, f"rank{rank}.txt")
        errors.append(open(path).read().strip() if os.path.isfile(path) else "did not finish")
    row = {"world": 2, "device": str(device), "seconds": seconds, "max_loss_rel_diff": None, "ok": False}
    if any(errors):
        message = next(e for e in errors if e)
        one_gpu = device.type == "cuda" and "uplicate GPU" in message     # NCCL: one process per GPU
        return [dict(row, ok=None if one_gpu else False,
                     detail=("skipped: NCCL refuses two ranks on one GPU; " if one_gpu else "") + message[:200])]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        curve = np.array([x for line in f for x in json.loads(line).get("loss_per_iteration", [])])
    want = np.array(ref["curve"])
    diff = float(np.max(np.abs(curve - want) / np.abs(want))) if curve.shape == want.shape and len(want) \
        else float("inf")
    note(f"distributed: two ranks, losses within {diff:.1e} of one process")
    return [dict(row, max_loss_rel_diff=diff, ok=diff <= 1e-3,
                 detail=f"{len(curve)} iterations, losses within {diff:.1e} of one process (need 1e-03)")]


def rank_main(rank, port, argv, work):
    """One rank of distributed_check, with the environment torchrun gives (both ranks on local device 0); its
    error, if any, goes to work/rank<r>.txt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    log = os.open(os.path.join(work, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)                                           # its log to a file: stdout has the tables
    os.dup2(log, 2)
    import train
    message = ""
    try:
        train.main(argv)
    except BaseException as err:
        message = f"{type(err).__name__}: {err}"
    with open(os.path.join(work, f"rank{rank}.txt"), "w") as f:
        f.write(message)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
