"""Calibration of the pair-matching memory model (actors/compare/matching.pair_memory_bytes), which sizes the compare
stage's Ray `memory=` requests and `sae-seeds plan`'s per-pair figure: the measured peak of `match_pair` on a whole
synthetic SAE pair against the model's estimate, in the same run.

    nice -n 5 python benchmarks/match_memory.py                       # dense 2048 and 4096, sparse 8192 and 16384
    nice -n 5 python benchmarks/match_memory.py --sizes 16384 --d 2048

Each size runs in a fresh spawned process: its RSS after the imports a compare task makes is the baseline; the
peak (ru_maxrss) minus that baseline is what the pair used, inputs (4 x n x d float32, generated in the process)
included, as in the model. The pair is benchmarks/match.py's planted pair (40% of B's latents noisy copies of A's).
The ratio estimate / measured should stay >= 1 (the request must cover the peak) and not far above it.
"""

from __future__ import annotations

import argparse
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _measure(n: int, d: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    torch.set_num_threads(1)
    import pyarrow  # noqa: F401  (what a compare task has loaded)
    from actors.compare.matching import match_pair, pair_memory_bytes, uses_dense
    from match import planted_pair

    baseline = _rss_bytes()
    enc_a, dec_a, enc_b, dec_b = planted_pair(n, d)
    m = match_pair(enc_a, dec_a, enc_b, dec_b)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"n": n, "d": d, "route": "dense" if uses_dense(n, n) else "sparse", "baseline": baseline,
            "measured": peak - baseline, "estimate": pair_memory_bytes(n, n, d), "certified": m.certified}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--d", type=int, default=768)
    args = parser.parse_args()
    print(f"{'n':>7} {'d':>5} {'route':>6} {'baseline MiB':>12} {'measured MiB':>12} {'estimate MiB':>12} "
          f"{'est/meas':>8}")
    for n in args.sizes:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            r = pool.submit(_measure, n, args.d).result()
        print(f"{r['n']:>7} {r['d']:>5} {r['route']:>6} {r['baseline'] / MIB:>12.0f} {r['measured'] / MIB:>12.0f} "
              f"{r['estimate'] / MIB:>12.0f} {r['estimate'] / r['measured']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
