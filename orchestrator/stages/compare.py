"""Compare stage: every pair of seeds of each configuration matched in a Ray task; N-way statistics.

Reads the train manifest; writes one assignment Parquet per pair, `overlap/pairs.parquet`,
`overlap/nway.parquet` and `overlap/manifest.json`, which tracking reads.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from actors.activations import write_parquet_atomic
from actors.checkpoint import load_sae_weights, write_json_atomic
from actors.matching import match_pair, nway_counts

from ..config import ExperimentConfig
from ..plan import slug


@ray.remote
def match_saes(path_a: str, path_b: str, threshold: float, assignment_path: str) -> dict:
    """Holds only its two SAEs; returns the pair statistics and both sides' per-latent shared masks."""
    a, b = load_sae_weights(path_a), load_sae_weights(path_b)
    m = match_pair(a.encoder, a.decoder, b.encoder, b.decoder, threshold)
    write_parquet_atomic(m.assignment_table(), Path(assignment_path))
    return {"stats": m.statistics(), "shared_a": m.shared, "shared_b": m.shared_of_b(),
            "enc_cos": m.enc_cos, "dec_cos": m.dec_cos}


def run_compare(cfg: ExperimentConfig, train_manifest: dict) -> dict:
    out = cfg.output_path / "overlap"
    threshold = cfg.compare.threshold
    by_conf: dict[str, list[dict]] = defaultdict(list)
    for sae in train_manifest["saes"]:
        by_conf[sae["configuration"]].append(sae)

    futures = {}
    for conf, saes in by_conf.items():
        saes.sort(key=lambda s: s["seed"])
        for i, j in itertools.combinations(range(len(saes)), 2):
            a, b = saes[i], saes[j]
            path = out / "assignments" / slug(conf) / f"seed{a['seed']}-seed{b['seed']}.parquet"
            futures[(conf, i, j)] = match_saes.options(num_cpus=cfg.compare.cpus_per_task).remote(
                a["path"], b["path"], threshold, str(path))
    results = dict(zip(futures, ray.get(list(futures.values()))))

    pair_rows, nway_rows, configurations = [], [], {}
    for conf, saes in by_conf.items():
        n = len(saes)
        seeds = [s["seed"] for s in saes]
        matrix = np.eye(n)
        masks: dict[tuple[int, int], np.ndarray] = {}
        cosines = {"encoder": [], "decoder": []}
        for (c, i, j), r in results.items():
            if c != conf:
                continue
            stats = r["stats"]
            pair_rows.append({"configuration": conf, "seed_a": seeds[i], "seed_b": seeds[j], **stats})
            matrix[i, j] = stats["shared_fraction"]
            matrix[j, i] = float(r["shared_b"].mean())
            masks[(i, j)], masks[(j, i)] = r["shared_a"], r["shared_b"]
            cosines["encoder"].append(r["enc_cos"])
            cosines["decoder"].append(r["dec_cos"])
        counts = nway_counts(masks, n)
        for base in range(n):
            for k in range(n):
                nway_rows.append({"configuration": conf, "base_seed": seeds[base], "shared_with_k_seeds": k,
                                  "latents": int(counts[base, k]),
                                  "fraction": float(counts[base, k] / max(1, counts[base].sum()))})
        per_seed = {seeds[i]: float(np.mean([matrix[i, j] for j in range(n) if j != i])) if n > 1 else float("nan")
                    for i in range(n)}
        off = matrix[~np.eye(n, dtype=bool)]
        first = saes[0]
        configurations[conf] = {
            "hookpoint": first["hookpoint"], "architecture": first["architecture"], "params": first["params"],
            "width": first["width"], "seeds": seeds, "shared_matrix": matrix.tolist(),
            "mean_shared_per_seed": per_seed,
            "shared_mean": float(off.mean()) if off.size else float("nan"),
            "shared_std": float(off.std()) if off.size else float("nan"),
            "matched_cos": {k: np.concatenate(v).tolist() if v else [] for k, v in cosines.items()},
        }

    pairs = pd.DataFrame(pair_rows)
    nway = pd.DataFrame(nway_rows)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pa.Table.from_pandas(pairs, preserve_index=False), out / "pairs.parquet")
    write_parquet_atomic(pa.Table.from_pandas(nway, preserve_index=False), out / "nway.parquet")
    manifest = {"threshold": threshold, "configurations": configurations}
    write_json_atomic(out / "manifest.json", {"threshold": threshold, "configurations": {
        k: {kk: vv for kk, vv in v.items() if kk != "matched_cos"} for k, v in configurations.items()}})
    return {"manifest": manifest, "pairs": pairs, "nway": nway}
