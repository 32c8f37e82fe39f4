"""Matching benchmark: a whole SAE pair (encoder and decoder matrices) through our certified sparse matcher, against
dense scipy and against the floor of two float32 matmul passes, each measured in the same run.

    python benchmarks/match.py                          # n = 16384 (both matchers, statistics compared)
    python benchmarks/match.py --repeats 3              # ours and dense alternate; median of the runs' ratios
    python benchmarks/match.py --sizes 4096 16384 --repeats 3
    nice -n 5 python benchmarks/match.py --sizes 131072 --pair     # ours only beyond 16384 (dense: hours, 270 GB)
    python benchmarks/match.py --device cuda --sizes 131072 --pair # on a GPU machine (goal: a pair in <= 30 s)

Synthetic SAE-like pair at d_in 768: B's encoder and decoder rows are random except 40% that are noisy copies of a
random permutation of A's (the same latents in both matrices; noise per row chosen so that the copies have cosine
~0.75-0.95). Every measurement runs in a fresh spawned process, so its peak RSS (ru_maxrss) is its own; the inputs
(4 x n x 768 float32) are part of it and are printed separately. Time is wall time of `match_pair` (both matrices:
unit rows, candidates, assignment, certificate, max cosines), data generation excluded.

`floor` is what no exact matcher that looks at every cosine can avoid: one blocked float32 matmul pass over each
n x n matrix (2 n^2 d FLOPs each), timed in the same process on the same inputs (block-sized matmuls into a reused
buffer, a sample of blocks before and after the matching, median block time x number of blocks), so that load
from other processes affects ours and the floor alike. "ours / floor" is the goal ratio (<= 1.25 for the pair).
The same ratio in CPU seconds (all threads of the process) is printed too: on shared cores wall time depends on
when other processes ran, CPU seconds much less. A second reading of the floor comes from the run itself: the
seconds our candidate pass spent in its matmuls (summed over its lanes, divided by their number), the same work
as the floor's. `--k` sets the candidates per row and column (default: the
matcher's).
On CUDA the peak is torch.cuda.max_memory_allocated, inputs included.
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
FLOOR_SAMPLES = 8  # blocks timed before and again after the matching


def planted_pair(n: int, d: int = 768, overlap: float = 0.4, seed: int = 0):
    """(enc_a, dec_a, enc_b, dec_b): B's planted latents are noisy copies of a permutation of A's, in both
    matrices."""
    import torch

    g = torch.Generator().manual_seed(seed)
    m = int(overlap * n)
    src, dst = torch.randperm(n, generator=g)[:m], torch.randperm(n, generator=g)[:m]
    out = []
    for _ in ("encoder", "decoder"):
        a = torch.randn(n, d, generator=g)
        b = torch.randn(n, d, generator=g)
        # |a| ~ |noise| / sigma ~ sqrt(d): cosine(a, a + sigma * noise) ~ 1 / sqrt(1 + sigma^2); sigma in
        # [0.33, 0.88] gives cosines in ~[0.75, 0.95]
        sigma = 0.33 + 0.55 * torch.rand(m, 1, generator=g)
        for s in range(0, m, 8192):  # in chunks: no second n x d temporary
            b[dst[s:s + 8192]] = a[src[s:s + 8192]] + sigma[s:s + 8192] * torch.randn(len(src[s:s + 8192]), d,
                                                                                       generator=g)
        out.append((a, b))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def block_seconds(a, b, block: int, device: str, samples: int, seed: int, cpu_times: list) -> list[float]:
    """Seconds of `samples` float32 [block, d] @ [d, block] matmuls on random blocks of the unit rows of a and b,
    into a reused output buffer (the fastest way this device computes a block of cosines); their CPU seconds (all
    threads) are appended to cpu_times."""
    import torch

    from actors.compare.candidate_pass import unit_rows
    from actors.compare.precision import pinned_matmul_precision

    g = torch.Generator().manual_seed(seed)
    times = []
    with pinned_matmul_precision():
        ua, ub = unit_rows(a, device), unit_rows(b, device)
        bl = min(block, len(ua), len(ub))
        buf = torch.empty(bl, bl, device=device)
        torch.mm(ua[:bl], ub[:bl].T, out=buf)  # warm-up
        for _ in range(samples):
            r0 = int(torch.randint(0, len(ua) - bl + 1, (1,), generator=g))
            c0 = int(torch.randint(0, len(ub) - bl + 1, (1,), generator=g))
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            torch.mm(ua[r0:r0 + bl], ub[c0:c0 + bl].T, out=buf)
            _sync(device)
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    return times


def _run(method: str, n: int, seed: int, block: int, device: str = "cpu", k: int | None = None) -> dict:
    """In a fresh process: generate a planted SAE pair, match it, report time, memory, statistics, floor."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from actors.compare import matching

    enc_a, dec_a, enc_b, dec_b = planted_pair(n, seed=seed)
    if device.startswith("cuda"):
        enc_a, dec_a, enc_b, dec_b = (x.to(device) for x in (enc_a, dec_a, enc_b, dec_b))
        torch.cuda.reset_peak_memory_stats()
    peak = (lambda: torch.cuda.max_memory_allocated()) if device.startswith("cuda") else _peak_rss
    out = {"method": method, "n": n, "rss_inputs": peak()}
    floor_samples, floor_cpu = [], []
    if method == "sparse":
        floor_samples += block_seconds(enc_a, enc_b, block, device, FLOOR_SAMPLES, seed, floor_cpu)
    phases = []
    if method == "sparse":  # record each matrix's phase timings
        from actors.compare import sparse_matching

        real = sparse_matching.sparse_max_weight_assignment

        def recorded(*args, **kw):
            res = real(*args, **kw, **({"k": k} if k else {}))
            phases.append({k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.timings.items()}
                          | {"rounds": res.rounds, "edges": res.n_edges, "gap_bound": f"{res.gap_bound:.1e}"})
            return res

        sparse_matching.sparse_max_weight_assignment = recorded
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    m = matching.match_pair(enc_a, dec_a, enc_b, dec_b, 0.7, method=method, device=device)
    _sync(device)
    out["seconds"] = time.perf_counter() - t
    out["cpu_seconds"] = time.process_time() - c
    out["rss_peak"] = peak()
    if method == "sparse":
        floor_samples += block_seconds(dec_a, dec_b, block, device, FLOOR_SAMPLES, seed + 1, floor_cpu)
        bl = min(block, n)
        blocks = (-(-n // bl)) ** 2
        out["floor"] = 2 * blocks * statistics.median(floor_samples)  # two matrices
        out["floor_cpu"] = 2 * blocks * statistics.median(floor_cpu)
        out["floor_samples"] = floor_samples
    out["stats"] = m.statistics()
    out["certified"] = m.certified
    out["rounds"] = m.rounds
    out["phases"] = phases
    return out


def measure(method: str, n: int, seed: int, block: int = 8192, device: str = "cpu", k: int | None = None) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_run, method, n, seed, block, device, k).result()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16384])
    p.add_argument("--repeats", type=int, default=1, help="runs per size and method; medians are printed")
    p.add_argument("--pair", action="store_true", help="accepted for compatibility: every run is a whole pair")
    p.add_argument("--block", type=int, default=8192)
    p.add_argument("--k", type=int, default=None, help="candidates per row and column (default: the matcher's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]; dense scipy always runs on the CPU")
    p.add_argument("--no-dense", action="store_true", help="skip dense scipy even where it fits")
    args = p.parse_args(argv)

    print(f"# {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f} (other processes share the "
          f"cores; ratios are measured within one run)")
    print(f"# SAE pair (encoder + decoder), d_in 768, 40% planted overlap; block={args.block}; median of "
          f"{args.repeats} run(s); peak = peak RSS of a fresh process, inputs included (inputs alone: 'in')")
    for n in args.sizes:
        # ours and dense alternate, so that each ratio compares runs made under the same load
        with_dense = n <= DENSE_MAX_N and not args.no_dense
        runs = {"sparse": []} | ({"dense": []} if with_dense else {})
        for seed in range(args.repeats):
            runs["sparse"].append(measure("sparse", n, seed, args.block, args.device, args.k))
            if with_dense:
                runs["dense"].append(measure("dense", n, seed))
        med = {m: (statistics.median(r["seconds"] for r in rs), statistics.median(r["rss_peak"] for r in rs))
               for m, rs in runs.items()}
        s = runs["sparse"][-1]
        floor = statistics.median(r["floor"] for r in runs["sparse"])
        print(f"n={n:>6} ours : {med['sparse'][0]:7.1f} s  peak {med['sparse'][1] / GIB:5.2f} GiB "
              f"(in {s['rss_inputs'] / GIB:.2f})  certified={all(r['certified'] for r in runs['sparse'])} "
              f"rounds={[r['rounds'] for r in runs['sparse']]}  shared={s['stats']['shared_fraction']:.4f}  "
              f"pw_mcc={s['stats']['pw_mcc']:.4f}")
        for name, ph in zip(("encoder", "decoder"), s["phases"]):
            print(f"         {name} phases (last run): {ph}")
        print(f"         floor: {floor:7.1f} s  (two float32 matmul passes over n x n, timed here: "
              f"{len(s['floor_samples'])} blocks, median {statistics.median(s['floor_samples']):.3f} s/block)  "
              f"ours / floor: {med['sparse'][0] / floor:.2f}  (goal <= 1.25)", flush=True)
        # the same matmul work timed inside our candidate pass (each lane's matmuls, over the lanes): a second
        # reading of the floor, from the run itself
        inside = statistics.median(sum(ph["candidates_matmul"] / ph["candidate_lanes"] for ph in r["phases"])
                                   for r in runs["sparse"])
        print(f"         matmuls inside ours: {inside:7.1f} s (lane-seconds / lanes); ours / that: "
              f"{med['sparse'][0] / inside:.2f}", flush=True)
        cpu = statistics.median(r["cpu_seconds"] for r in runs["sparse"])
        floor_cpu = statistics.median(r["floor_cpu"] for r in runs["sparse"])
        # CPU seconds (all threads) are far less sensitive than wall time to other processes on shared cores
        print(f"         cpu seconds: ours {cpu:7.1f}, floor {floor_cpu:7.1f}, ours / floor: {cpu / floor_cpu:.2f}",
              flush=True)
        if "dense" in runs:
            d = runs["dense"][-1]
            # counts and fractions must be equal; means of float32 cosines may differ in the last bits (ours are
            # float64 re-scored, dense's come from its float32 matrix)
            def differ(x, y):
                return {k: (v, y[k]) for k, v in x.items()
                        if (abs(v - y[k]) > 1e-6 if k.startswith(("mean", "pw_mcc")) else v != y[k])}

            same = not any(differ(x["stats"], y["stats"]) for x, y in zip(runs["sparse"], runs["dense"]))
            diff = differ(s["stats"], d["stats"])
            print(f"         dense: {med['dense'][0]:7.1f} s  peak {med['dense'][1] / GIB:5.2f} GiB "
                  f"(in {d['rss_inputs'] / GIB:.2f})  identical statistics: {same}{'' if same else f' {diff}'}"
                  f" (means to 1e-6)")
            ratios = sorted(d["seconds"] / s["seconds"] for s, d in zip(runs["sparse"], runs["dense"]))
            print(f"         ratio dense/ours: time {statistics.median(ratios):.1f}x (median of the runs' ratios "
                  f"{[round(r, 1) for r in ratios]}; goal >= 10), "
                  f"peak memory {med['dense'][1] / med['sparse'][1]:.1f}x",
                  flush=True)


if __name__ == "__main__":
    main()
