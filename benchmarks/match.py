"""Matching benchmark: our sparse exact matcher against dense scipy, time and peak memory per cosine matrix.

    python benchmarks/match.py                      # n = 8192, 16384 (both matchers), 65536, 131072 (ours only)
    python benchmarks/match.py --sizes 8192 --repeats 3
    python benchmarks/match.py --sizes 131072 --pair   # also measure a whole pair (encoder + decoder) in one process
    python benchmarks/match.py --device cuda --sizes 131072 --pair   # on a GPU machine (goal: a pair in <= 30 s)

Synthetic SAE-like pair at d_in 768: B's rows are random except 40% that are noisy copies of a random permutation
of A's rows (noise per row chosen so that the copies have cosine ~0.75-0.95). Every measurement runs in a fresh
spawned process, so its peak RSS (ru_maxrss) is its own; the inputs (2 x n x 768 float32) are part of it and are
printed separately. Time is wall time of the matching alone (unit rows, cosines, assignment, max cosines), data
generation excluded. One matrix = one matching; the pipeline matches two per pair (encoder and decoder).

The `floor` row is the arithmetic floor of any exact matcher that looks at every cosine once: the time of the
blocked float32 matmul over the whole n x n matrix (2 n^2 d FLOPs), from this device's matmul rate measured in the
same run on one block. "ours / floor" says how much of our time goes beyond computing each cosine once. On CUDA the
peak is the device's peak allocated memory (torch.cuda.max_memory_allocated), inputs included.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

DENSE_MAX_N = 16384  # beyond this dense scipy needs > 5 GB and minutes-to-hours (matching-notes.md)
GIB = 2**30


def planted_pair(n: int, d: int = 768, overlap: float = 0.4, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    b = torch.randn(n, d, generator=g)
    m = int(overlap * n)
    src, dst = torch.randperm(n, generator=g)[:m], torch.randperm(n, generator=g)[:m]
    # |a| ~ |noise| / sigma ~ sqrt(d): cosine(a, a + sigma * noise) ~ 1 / sqrt(1 + sigma^2); sigma in [0.33, 0.88]
    # gives cosines in ~[0.75, 0.95]
    sigma = 0.33 + 0.55 * torch.rand(m, 1, generator=g)
    for s in range(0, m, 8192):  # in chunks: no second n x d temporary
        b[dst[s:s + 8192]] = a[src[s:s + 8192]] + sigma[s:s + 8192] * torch.randn(len(src[s:s + 8192]), d, generator=g)
    return a, b


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, block: int, d: int = 768, repeats: int = 5) -> float:
    """FLOP/s of one float32 [block, d] @ [d, block] matmul on `device` (median of `repeats`, after a warm-up)."""
    import torch

    x = torch.randn(block, d, device=device)
    y = torch.randn(block, d, device=device)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        x @ y.T
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return 2 * block * block * d / statistics.median(times)


def _run(method: str, n: int, seed: int, pair: bool, k: int, block: int, device: str = "cpu") -> dict:
    """In a fresh process: generate the instance(s), match, report time, peak memory and the result's summary."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np
    import torch

    matrices = [planted_pair(n, seed=seed)] + ([planted_pair(n, seed=seed + 1000)] if pair else [])
    if device.startswith("cuda"):
        matrices = [(a.to(device), b.to(device)) for a, b in matrices]
        torch.cuda.reset_peak_memory_stats()
    rss_inputs = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss()
    out = {"method": method, "n": n, "rss_inputs": rss_inputs, "matrices": len(matrices)}
    t = time.perf_counter()
    for a, b in matrices:
        if method == "dense":
            from actors.compare.matching import cosine_matrix, max_weight_assignment

            sim = cosine_matrix(a, b)
            partner = max_weight_assignment(sim)
            cos = sim[np.arange(n), partner]
            sim.max(axis=1)  # the max-cosine baseline, as match_pair computes it
            del sim
            out.setdefault("total", []).append(float(cos.astype(np.float64).sum()))
        else:
            from actors.compare.sparse_matching import sparse_max_weight_assignment

            res = sparse_max_weight_assignment(a, b, k=k, block=block, device=device)
            cos = res.cos
            out.setdefault("total", []).append(res.total_weight)
            out.setdefault("certified", []).append(res.certified)
            out.setdefault("rounds", []).append(res.rounds)
            out.setdefault("timings", []).append({key: (round(v, 1) if isinstance(v, float) else v)
                                                  for key, v in res.timings.items()})
        out.setdefault("shared", []).append(float(np.mean(cos > 0.7)))
    _sync(device)
    out["seconds"] = time.perf_counter() - t
    out["rss_peak"] = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss()
    return out


def measure(method: str, n: int, seed: int, pair: bool = False, k: int = 64, block: int = 8192,
            device: str = "cpu") -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_run, method, n, seed, pair, k, block, device).result()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 65536, 131072])
    p.add_argument("--repeats", type=int, default=1, help="runs per size and method; medians are printed")
    p.add_argument("--pair", action="store_true", help="also time a whole pair (2 matrices) in one process")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--block", type=int, default=8192)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]; dense scipy always runs on the CPU")
    args = p.parse_args(argv)

    print(f"# {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f} (other processes share the cores)")
    print(f"# d_in 768, 40% planted overlap; k={args.k} block={args.block}; median of {args.repeats} run(s); "
          f"peak = peak RSS of a fresh process, inputs included (inputs alone: 'in')")
    for n in args.sizes:
        runs = {"sparse": [measure("sparse", n, seed, False, args.k, args.block, args.device)
                           for seed in range(args.repeats)]}
        if n <= DENSE_MAX_N:
            runs["dense"] = [measure("dense", n, seed) for seed in range(args.repeats)]
        med = {m: (statistics.median(r["seconds"] for r in rs), statistics.median(r["rss_peak"] for r in rs))
               for m, rs in runs.items()}
        s = runs["sparse"][-1]
        print(f"n={n:>6} ours : {med['sparse'][0]:7.1f} s  peak {med['sparse'][1] / GIB:5.2f} GiB "
              f"(in {s['rss_inputs'] / GIB:.2f})  certified={all(c for r in runs['sparse'] for c in r['certified'])} "
              f"rounds={[r['rounds'][0] for r in runs['sparse']]}  shared={s['shared'][0]:.4f}")
        print(f"         phases (last run): {s['timings'][0]}")
        rate = matmul_rate(args.device, min(args.block, n))
        floor = 2 * n * n * 768 / rate
        print(f"         floor: {floor:7.1f} s  (float32 matmul at {rate / 1e9:.0f} GFLOP/s on {args.device}, "
              f"one pass over n x n)  ours / floor: {med['sparse'][0] / floor:.2f}  pair floor {2 * floor:.1f} s")
        if "dense" in runs:
            d = runs["dense"][-1]
            agree = all(abs(x["total"][0] - y["total"][0]) <= 1e-4 * abs(y["total"][0])
                        for x, y in zip(runs["sparse"], runs["dense"]))
            print(f"         dense: {med['dense'][0]:7.1f} s  peak {med['dense'][1] / GIB:5.2f} GiB "
                  f"(in {d['rss_inputs'] / GIB:.2f})  same total weight: {agree}")
            print(f"         ratio dense/ours: time {med['dense'][0] / med['sparse'][0]:.1f}x, "
                  f"peak memory {med['dense'][1] / med['sparse'][1]:.1f}x")
        print(f"         pair (encoder + decoder) = 2 x one matrix: {2 * med['sparse'][0]:.1f} s", flush=True)
        if args.pair:
            r = measure("sparse", n, 0, True, args.k, args.block, args.device)
            print(f"         pair measured in one process: {r['seconds']:.1f} s, peak {r['rss_peak'] / GIB:.2f} GiB "
                  f"(in {r['rss_inputs'] / GIB:.2f}), certified={all(r['certified'])}, rounds={r['rounds']}",
                  flush=True)


if __name__ == "__main__":
    main()
