"""N-way statistics over the seeds of one configuration, from the pairwise shared masks.

`shared[(i, j)]` is the bool mask over seed i's latents of being shared with seed j (both orders present);
`edges[(i, j)]` are the (latent of i, latent of j) pairs behind it (decoder partners).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def nway_counts(shared: dict[tuple[int, int], np.ndarray], n_seeds: int,
                widths: list[int] | None = None) -> np.ndarray:
    """counts[base, k] = latents of seed `base` shared with exactly k other seeds. `widths` (latents per seed) is
    needed when a seed has no pair (a single seed: all its latents are shared with 0 others)."""
    counts = np.zeros((n_seeds, n_seeds), dtype=np.int64)
    for base in range(n_seeds):
        masks = [shared[(base, other)] for other in range(n_seeds) if other != base]
        if not masks and widths is None:
            raise ValueError(f"seed {base} has no pairs: pass widths to count its latents")
        per_latent = np.sum(masks, axis=0) if masks else np.zeros(widths[base], dtype=np.int64)
        counts[base] = np.bincount(per_latent, minlength=n_seeds)[:n_seeds]
    return counts


def no_other_seed_curve(shared: dict[tuple[int, int], np.ndarray], n_seeds: int, max_subsets: int = 64,
                        seed: int = 0) -> list[dict]:
    """For m = 2..N seeds: the fraction of a seed's latents shared with no other seed of a size-m subset.

    Mean and std over subsets (all of them when few, else `max_subsets` random ones) and over the base seed.
    """
    rng = np.random.default_rng(seed)
    curve = []
    for m in range(2, n_seeds + 1):
        subsets = list(itertools.combinations(range(n_seeds), m))
        if len(subsets) > max_subsets:
            subsets = [subsets[i] for i in rng.choice(len(subsets), max_subsets, replace=False)]
        values = []
        for subset in subsets:
            for base in subset:
                shared_any = np.any([shared[(base, o)] for o in subset if o != base], axis=0)
                values.append(float((~shared_any).mean()))
        curve.append({"n_seeds": m, "mean": float(np.mean(values)), "std": float(np.std(values))})
    return curve


def consensus_groups(edges: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
                     widths: list[int]) -> np.ndarray:
    """Connected groups of latents linked by "shared" across seeds.

    Returns `sizes[s]` = number of groups spanning exactly s distinct seeds (s = 1: a latent shared with nobody).
    """
    offsets = np.concatenate([[0], np.cumsum(widths)])
    seed_of = np.repeat(np.arange(len(widths)), widths)
    rows = [offsets[i] + a for (i, j), (a, b) in edges.items()]
    cols = [offsets[j] + b for (i, j), (a, b) in edges.items()]
    n = int(offsets[-1])
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    seeds_per_group = np.zeros(labels.max() + 1 if n else 0, dtype=np.int64)
    pairs = np.unique(np.stack([labels, seed_of]), axis=1)  # (group, seed) once each
    np.add.at(seeds_per_group, pairs[0], 1)
    return np.bincount(seeds_per_group, minlength=len(widths) + 1)
