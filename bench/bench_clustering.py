"""Benchmark of clustering.py: time of each step, peak memory, and the dense-GEMM floor.

For each N it generates clustered L2-normalised features (a mixture of identities; for the modality-aware
variant a visible/infrared split with a modality offset), times `clustering.jaccard_similarity` (per phase,
through its `timings` argument: kNN, reciprocal sets and expansion, V and query expansion, Jaccard pairs) and
`clustering.dbscan`, and finally one dense `features @ features.T` of the same size in the same run: the
arithmetic floor on this machine.

    python bench/bench_clustering.py                           # N = 5000 11909 22258 34167, D = 2048, CPU
    python bench/bench_clustering.py --sizes 22258 --variants standard
    python bench/bench_clustering.py --device cuda

Timings on a shared machine are noisy: the floor is measured in the same run for that reason.
"""
import argparse
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor


import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clustering  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 11909, 22258, 34167], help="values of N")
    p.add_argument("--dim", type=int, default=2048, help="feature size D (2048 for ResNet-50)")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--variants", type=str, nargs="+", default=["standard", "modality"],
                   choices=["standard", "modality"], help="standard and/or modality-aware Jaccard")
    p.add_argument("--k1", type=int, default=30, help="recommended: 30")
    p.add_argument("--k2", type=int, default=6, help="recommended: 6")
    p.add_argument("--eps", type=float, default=0.6, help="DBSCAN eps (0.6 for SYSU-MM01)")
    p.add_argument("--per-id", type=float, default=22258 / 395,
                   help="visible images per identity (SYSU-MM01: 22,258 / 395); infrared rows share the ids")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--sigma", type=float, default=1.1,
                   help="spread of an identity in the latent space (1.2: a few %% DBSCAN outliers)")
    p.add_argument("--vis-fraction", type=float, default=22258 / 34167,
                   help="visible share in the modality-aware variant (SYSU-MM01: 22,258 of 34,167)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one dense features @ features.T (needs N^2 floats of memory)")
    p.add_argument("--seed", type=int, default=0)
    return p


def make_features(n, dim, per_id, sigma, vis_fraction, modality, seed, device, latent=64):
    """Identities of about `per_id` visible images each, drawn in a `latent`-dimensional subspace with
    per-image spread `sigma` (so that nearby identities get confused), plus isotropic noise in all D
    dimensions. Infrared rows (modality-aware variant) share the identities and get a modality offset."""
    g = torch.Generator().manual_seed(seed)
    ids = max(1, round(n * (vis_fraction if modality else 1) / per_id))
    z = torch.randn(ids, latent, generator=g)                        # identity codes
    proj = torch.randn(latent, dim, generator=g) / latent ** 0.5
    pid = torch.randint(ids, (n,), generator=g)
    x = torch.nn.functional.normalize((z[pid] + sigma * torch.randn(n, latent, generator=g)) @ proj, dim=1)
    x += 0.5 * torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    mod = None
    if modality:
        mod = (torch.rand(n, generator=g) >= vis_fraction).long()
        offset = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
        x += 0.8 * mod[:, None] * offset
    x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device), (None if mod is None else mod.to(device))


class PeakMemory:
    """Peak resident memory above a baseline, sampled from /proc/self/statm (torch CPU memory included)."""

    def __init__(self, device):
        self.device, self.page = device, os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base, self.peak, self.stop = self.rss(), 0, False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.cuda_base = torch.cuda.memory_allocated()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.rss() - self.base)
        if self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated() - self.cuda_base


def timed(fn, device, *args):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def run_one(args, n, variant):
    """One configuration (run in a fresh process, so that peak memory is not hidden by earlier frees)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, mod = make_features(n, args.dim, args.per_id, args.sigma, args.vis_fraction, variant == "modality",
                           args.seed, device)
    t = {}
    with PeakMemory(device) as mem:
        s, t_jaccard = timed(clustering.jaccard_similarity, device, x, args.k1, args.k2, mod, t)   # t by phase
        labels, t["dbscan"] = timed(clustering.dbscan, device, s, args.eps)
    total = t_jaccard + t["dbscan"]                                  # the phases plus the input checks
    floor = float("nan")
    if args.floor:
        timed(torch.mm, device, x[:256], x.T)                        # warm-up
        _, floor = timed(torch.mm, device, x, x.T)
    mem_gb = (mem.cuda_peak if device.type == "cuda" else mem.peak) / 2**30
    return t, total, floor, mem_gb, s.nnz / n, int(labels.max()) + 1, float((labels < 0).mean())


def main(args):
    print(f"# D = {args.dim}, k1 = {args.k1}, k2 = {args.k2}, eps = {args.eps}, device = {args.device}, "
          f"torch threads = {args.threads or torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY = {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    cols = ["knn", "recip+exp", "V+QE", "jaccard", "dbscan"]
    head = f"| {'N':>6} | {'variant':8} | " + " | ".join(f"{c:>9}" for c in cols) + \
        " | total s | floor s | total/floor | peak GB | nnz/row | clusters | outliers |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for n in args.sizes:
        for variant in args.variants:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                t, total, floor, mem, nnz, k, out = pool.submit(run_one, args, n, variant).result()
            print(f"| {n:>6} | {variant:8} | " + " | ".join(f"{t[c]:>9.2f}" for c in cols) +
                  f" | {total:>7.2f} | {floor:>7.2f} | {total / floor:>11.2f} | {mem:>7.2f} | {nnz:>7.0f} | "
                  f"{k:>8} | {out:>8.1%} |", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
