"""Benchmark of `mult.label_transfer` (MULT, He et al. IJCV 2024; docs/mult.md §5, §11) at
SYSU-MM01 size: 22,258 visible + 11,909 infrared samples, D = 2048, a few hundred clusters.

Synthetic data: 395 identities (unit means), a modality offset and Gaussian noise, L2-normalised;
DBSCAN-like labels (some identities split or merged, ~5% outliers); sparse symmetric similarities
built from identity blocks plus random links (~100-150 stored pairs a row, diagonal 1).

Reports, in one run: the wall time of label_transfer, its iteration counts and peak memory
(VmHWM, reset before the call where the kernel allows it), then the time of the dense products it
cannot avoid, timed once each and scaled by the iteration counts it reported: the N_v x N_r
distance GEMM, the kernel exp, the Sinkhorn matvecs, the propagation GEMMs, the feature-center
GEMMs. Target: peak under 4 GB and time at most 1.5 x those products.

Usage: python bench/bench_mult.py [--n-vis 22258 --n-ir 11909 --dim 2048 --ids 395 --device cpu]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mult  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("bench_mult", description=__doc__.split("\n\n")[0])
    p.add_argument("--n-vis", type=int, default=22258, help="visible samples (SYSU: 22258)")
    p.add_argument("--n-ir", type=int, default=11909, help="infrared samples (SYSU: 11909)")
    p.add_argument("--dim", type=int, default=2048, help="feature size D (2048)")
    p.add_argument("--ids", type=int, default=395, help="identities (SYSU train+val: 395)")
    p.add_argument("--links", type=int, default=50, help="random extra similarity links per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). 1 makes CPU times comparable "
                        "on a shared machine")
    return p


def make_modality(n, ids, means, offset, noise, rng, gen, split=0, merge=0, links=50):
    """Features [n, D] (torch), DBSCAN-like labels [n] (numpy int64), similarity (csr [n, n])."""
    pid = rng.integers(0, ids, n)
    feats = means[torch.from_numpy(pid)] + offset
    feats += torch.randn(feats.shape, generator=gen) * (noise / feats.shape[1] ** 0.5)
    feats = torch.nn.functional.normalize(feats, dim=1)
    labels = pid.copy()
    halves = (pid < split) & (rng.random(n) < 0.5)                 # split the first `split` ids
    labels[halves] = ids + pid[halves]
    for i in range(merge):                                         # merge pairs of ids
        labels[labels == split + 2 * i + 1] = split + 2 * i
    labels[rng.random(n) < 0.05] = -1
    _, labels[labels >= 0] = np.unique(labels[labels >= 0], return_inverse=True)
    # similarity: full blocks per identity plus random links, symmetric, diagonal 1
    order = np.argsort(pid, kind="stable")
    starts = np.searchsorted(pid[order], np.arange(ids + 1))
    rows, cols = [], []
    for k in range(ids):
        members = order[starts[k]:starts[k + 1]]
        rows.append(np.repeat(members, len(members)))
        cols.append(np.tile(members, len(members)))
    rows.append(np.repeat(np.arange(n), links))
    cols.append(rng.integers(0, n, n * links))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    vals = rng.uniform(0.05, 0.95, len(rows)).astype(np.float32)
    sim = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    sim.sum_duplicates()
    sim.data = np.minimum(sim.data, 0.95)
    sim = sim.maximum(sim.T).tolil()
    sim.setdiag(1.0)
    return feats, labels.astype(np.int64), sim.tocsr()


def peak_rss_gb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn, device, repeat=1):
    """(wall, CPU) seconds per call of fn(), averaged over `repeat` calls."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return np.array([time.perf_counter() - t0, time.process_time() - c0]) / repeat


def product_times(fv, fr, k_v, k_r, out, device):
    """(wall, CPU) seconds of the products label_transfer cannot avoid, each timed once (or a few
    times) and scaled by the iteration counts it reported."""
    n_v, n_r = len(fv), len(fr)
    G = torch.empty(n_v, n_r, device=device)
    t = {"distance GEMM [N_v, N_r, D]": timed(lambda: torch.mm(fv, fr.t(), out=G), device)}
    G.mul_(2.0).sub_(2.0).mul_(25.0)                     # -lambda * (2 - 2 cos): the real exponents
    t["kernel exp [N_v, N_r]"] = timed(lambda: torch.exp(G, out=G), device)
    b, a = torch.rand(n_r, device=device), torch.rand(n_v, device=device)
    pair = timed(lambda: (torch.mv(G, b), torch.mv(G.t(), a)), device, 10)
    it = out.sinkhorn_iters[2] + 1                       # + the final G b, G^T a normalisers
    t[f"Sinkhorn matvecs ({it} x G b, G^T a)"] = pair * it
    for k, it, run in ((k_v, out.prop_iters[0], "vis"), (k_r, out.prop_iters[1], "ir")):
        zr, yv = torch.rand(n_r, k, device=device), torch.rand(n_v, k, device=device)
        gemm = timed(lambda: torch.mm(G, zr), device) + timed(lambda: torch.mm(G.t(), yv), device)
        t[f"propagation GEMMs, {run} run ({it} x G Z, G^T Y; K={k})"] = gemm * it
    del G
    small = np.zeros(2)
    for f, g, k, it in ((fv, fr, k_r, out.sinkhorn_iters[0]), (fr, fv, k_v, out.sinkhorn_iters[1])):
        c = torch.rand(k, f.shape[1], device=device)
        small += timed(lambda: torch.mm(f, c.t()), device) + timed(lambda: torch.mm(g, c.t()), device)
        gc, x = torch.rand(len(f), k, device=device), torch.rand(len(f), device=device)
        small += it * timed(lambda: (torch.mv(gc, c[:, 0]), torch.mv(gc.t(), x)), device, 20)
    t["feature-center GEMMs (4) and center Sinkhorn matvecs"] = small
    return t


def main(args):
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    means = torch.nn.functional.normalize(torch.randn(args.ids, args.dim, generator=gen), dim=1)
    offsets = 0.5 * torch.nn.functional.normalize(torch.randn(2, args.dim, generator=gen), dim=1)
    fv, lv, sv = make_modality(args.n_vis, args.ids, means, offsets[0], 1.0, rng, gen,
                               split=40, links=args.links)
    fr, lr, sr = make_modality(args.n_ir, args.ids, means, offsets[1], 1.0, rng, gen,
                               merge=20, links=args.links)
    fv, fr = fv.to(device), fr.to(device)
    print(f"data: N_v={len(fv)} N_r={len(fr)} D={args.dim} K_v={lv.max() + 1} K_r={lr.max() + 1} "
          f"outliers {np.mean(lv < 0):.1%}/{np.mean(lr < 0):.1%}, nnz per row "
          f"{sv.nnz / len(fv):.0f}/{sr.nnz / len(fr):.0f}, {time.perf_counter() - t0:.1f} s; "
          f"threads {torch.get_num_threads()}", flush=True)

    rss_before = peak_rss_gb()
    reset_ok = reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = []
    elapsed = timed(lambda: results.append(mult.label_transfer(fv, fr, lv, lr, sv, sr)), device)
    out = results[0]
    peak = peak_rss_gb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    print(f"label_transfer: {elapsed[0]:.1f} s wall, {elapsed[1]:.1f} s CPU; Sinkhorn iterations "
          f"(vis->IR centers, IR->vis centers, instances) {out.sinkhorn_iters}; propagation "
          f"iterations {out.prop_iters}", flush=True)
    scope = "reset before the call" if reset_ok else "of the whole process"
    gpu = f"; peak GPU memory {gpu_peak:.2f} GB" if gpu_peak is not None else ""
    print(f"peak host RSS {peak:.2f} GB (VmHWM {scope}; {rss_before:.2f} GB before it){gpu}",
          flush=True)

    # the products, timed twice (right after the call and once more) to expose machine noise
    runs = [product_times(fv, fr, out.K_v, out.K_r, out, device) for _ in range(2)]
    print("unavoidable products (wall / CPU seconds; two measurements):")
    for name in runs[0]:
        print("  " + "   ".join(f"{r[name][0]:7.2f} /{r[name][1]:7.2f}" for r in runs) + f"  {name}")
    totals = [sum(r.values()) for r in runs]
    print("  " + "   ".join(f"{t[0]:7.2f} /{t[1]:7.2f}" for t in totals) + "  total")
    mean = sum(totals) / 2
    ratio = elapsed / mean
    print(f"label_transfer / products: {ratio[0]:.2f} (wall), {ratio[1]:.2f} (CPU)")
    print(json.dumps({"n_vis": len(fv), "n_ir": len(fr), "dim": args.dim, "K_v": out.K_v,
                      "K_r": out.K_r, "device": str(device), "threads": torch.get_num_threads(),
                      "wall_s": round(elapsed[0], 2), "cpu_s": round(elapsed[1], 2),
                      "sinkhorn_iters": out.sinkhorn_iters, "prop_iters": out.prop_iters,
                      "peak_rss_gb": round(peak, 3), "peak_gpu_gb": gpu_peak,
                      "products_wall_s": round(mean[0], 2), "products_cpu_s": round(mean[1], 2),
                      "ratio_wall": round(ratio[0], 3), "ratio_cpu": round(ratio[1], 3)}))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
