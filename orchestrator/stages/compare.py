"""Compare stage: every pair of seeds of each configuration matched in a Ray task; N-way statistics; baselines.

Reads the train manifest; writes one assignment Parquet per pair and tables under `overlap/` (pairs, nway,
nway_curve, consensus, sweeps) plus `overlap/manifest.json`, which tracking reads.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from scipy.stats import spearmanr

from actors.store.checkpoint import load_firing_frequency, load_sae_weights, write_json_atomic, write_parquet_atomic
from actors.compare.chance import chance_overlap as chance_baselines
from actors.compare.ground_truth import precision_by_shared_count, score_against_truth, shared_precision
from actors.compare.matching import UNMATCHED, match_pair
from actors.compare.nway import consensus_groups, no_other_seed_curve, nway_counts
from actors.sae import import_architecture_modules

from ..config import ExperimentConfig
from ..console import gather
from ..plan import slug
from ..resources import compare_task_bytes

log = logging.getLogger(__name__)


@ray.remote
def match_saes(path_a: str, path_b: str, threshold: float, assignment_path: str) -> dict:
    """Holds only its two SAEs; returns the pair statistics and what the N-way statistics need."""
    a, b = load_sae_weights(path_a), load_sae_weights(path_b)
    m = match_pair(a.encoder, a.decoder, b.encoder, b.decoder, threshold)
    write_parquet_atomic(m.assignment_table(), Path(assignment_path))
    shared_a, shared_b = m.shared, m.shared_of_b()
    # Consensus edges follow the decoder matching (the feature direction), from both sides.
    dec_inverse = np.full(m.n_b, UNMATCHED)
    matched = m.dec_partner != UNMATCHED
    dec_inverse[m.dec_partner[matched]] = np.flatnonzero(matched)
    rows_a, rows_b = np.flatnonzero(shared_a), np.flatnonzero(shared_b)
    freq = load_firing_frequency(path_a)
    return {"stats": m.extended_statistics(), "shared_a": shared_a, "shared_b": shared_b,
            "edges_ab": (rows_a, m.dec_partner[rows_a]), "edges_ba": (rows_b, dec_inverse[rows_b]),
            "enc_cos": m.enc_cos, "dec_cos": m.dec_cos, "sweep": m.threshold_sweep(), "freq_a": freq}


@ray.remote
def score_sae(path: str, truth: dict, threshold: float, latent_table_path: str) -> dict:
    """One SAE against its source's true features; writes the per-latent Parquet, returns the summary and mask."""
    from actors.generate.planted import load_ground_truth
    from actors.store.storage import ActivationStore

    store = ActivationStore(truth["root"])
    if store.sha256(truth["path"]) != truth["sha256"]:
        raise ValueError(f"{store.display(truth['path'])} does not match the manifest's checksum")
    features = load_ground_truth(store.read_bytes(truth["path"]))["features"]
    score = score_against_truth(load_sae_weights(path).decoder, features, threshold)
    write_parquet_atomic(score.latent_table(), Path(latent_table_path))
    return {"summary": score.summary(), "true_latent": score.true_latent}


@ray.remote
def chance_overlap(sae_a: dict, sae_b: dict, threshold: float, architecture_modules: list[str]) -> dict:
    """Chance levels of one configuration (actors/compare/chance.py); its untrained SAEs are built by their
    architecture, which `architecture_modules` may register."""
    import_architecture_modules(architecture_modules)
    return chance_baselines(sae_a, sae_b, threshold)


@ray.remote
def match_through_training(checkpoints: list[tuple[str, str]], threshold: float) -> list[dict]:
    """Pair statistics of two seeds' intermediate SAEs, one checkpoint (same token count) after another."""
    rows = []
    for path_a, path_b in checkpoints:
        a, b = load_sae_weights(path_a), load_sae_weights(path_b)
        m = match_pair(a.encoder, a.decoder, b.encoder, b.decoder, threshold)
        rows.append({"tokens": int(a.cfg["tokens"]), **m.statistics(),
                     "shared_fraction_b": float(m.shared_of_b().mean())})
    return rows


def _pair_task_bytes(saes: list[dict], cpus: float) -> int:
    """`memory=` of a configuration's matching tasks, from the widths and d_in its SAE folders record."""
    d_in = json.loads((Path(saes[0]["path"]) / "cfg.json").read_text())["d_in"]
    widths = sorted(s["width"] for s in saes)
    return compare_task_bytes(widths[-1], widths[-2] if len(widths) > 1 else widths[-1], d_in, cpus)


def _frequency_stability(results: list[dict]) -> dict | None:
    """Spearman correlation of a latent's firing frequency with being shared, and shared fraction per
    log-frequency bin, pooled over the pairs of a configuration (A's side of each pair)."""
    pairs = [(r["freq_a"], r["shared_a"]) for r in results if r["freq_a"] is not None]
    if not pairs:
        return None
    rhos = [spearmanr(f, s).statistic for f, s in pairs if s.any() and not s.all()]
    freq = np.concatenate([f for f, _ in pairs])
    shared = np.concatenate([s for _, s in pairs])
    edges = np.linspace(-7, 0, 15)
    log_f = np.log10(np.clip(freq, 1e-7, 1))
    bins = np.clip(np.digitize(log_f, edges) - 1, 0, len(edges) - 2)
    per_bin = [float(shared[bins == i].mean()) if (bins == i).any() else float("nan") for i in range(len(edges) - 1)]
    return {"spearman": float(np.mean(rhos)) if rhos else float("nan"),
            "log10_freq_bins": edges.tolist(), "shared_per_bin": per_bin,
            "latents_per_bin": np.bincount(bins, minlength=len(edges) - 1).tolist()}


def run_compare(cfg: ExperimentConfig, train_manifest: dict) -> dict:
    out = cfg.output_path / "overlap"
    threshold = cfg.compare.threshold
    by_conf: dict[str, list[dict]] = defaultdict(list)
    for sae in train_manifest["saes"]:
        by_conf[sae["configuration"]].append(sae)

    opts = {"num_cpus": cfg.compare.cpus_per_task}
    futures, chance, through = {}, {}, {}
    for conf, saes in by_conf.items():
        saes.sort(key=lambda s: s["seed"])
        # Each task holds one pair at a time: Ray co-schedules tasks only where their estimated memory fits.
        opts = {**opts, "memory": _pair_task_bytes(saes, cfg.compare.cpus_per_task)}
        for i, j in itertools.combinations(range(len(saes)), 2):
            a, b = saes[i], saes[j]
            path = out / "assignments" / slug(conf) / f"seed{a['seed']}-seed{b['seed']}.parquet"
            futures[(conf, i, j)] = match_saes.options(**opts).remote(a["path"], b["path"], threshold, str(path))
            pairs = [(ca["path"], cb["path"]) for ca, cb in zip(a.get("checkpoints", []), b.get("checkpoints", []))]
            if pairs:
                through[(conf, i, j)] = match_through_training.options(**opts).remote(pairs, threshold)
        if len(saes) > 1:
            chance[conf] = chance_overlap.options(**opts).remote(saes[0], saes[1], threshold,
                                                                  cfg.sae.architecture_modules)
    opts = {"num_cpus": cfg.compare.cpus_per_task}
    truths = train_manifest.get("ground_truths") or {}
    scored = {}
    for conf, saes in by_conf.items():
        for sae in saes:
            if sae["hookpoint"] in truths:
                path = out / "ground_truth" / slug(conf) / f"seed{sae['seed']}.parquet"
                scored[(conf, sae["seed"])] = score_sae.options(**opts).remote(
                    sae["path"], truths[sae["hookpoint"]], cfg.compare.ground_truth_threshold, str(path))
    keys = ([("pair", k) for k in futures] + [("chance", k) for k in chance] + [("through", k) for k in through]
            + [("truth", k) for k in scored])
    refs = list(futures.values()) + list(chance.values()) + list(through.values()) + list(scored.values())
    done = dict(zip(keys, gather(refs, "compare", "task")))
    results = {k: done[("pair", k)] for k in futures}
    chance = {k: done[("chance", k)] for k in chance}
    through = {k: done[("through", k)] for k in through}
    scored = {k: done[("truth", k)] for k in scored}

    tables: dict[str, list[dict]] = defaultdict(list)
    configurations = {}
    for conf, saes in by_conf.items():
        n = len(saes)
        seeds = [s["seed"] for s in saes]
        matrix = np.eye(n)
        masks: dict[tuple[int, int], np.ndarray] = {}
        edges: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        cosines = {"encoder": [], "decoder": []}
        conf_results = []
        for (c, i, j), r in results.items():
            if c != conf:
                continue
            conf_results.append(r)
            stats = r["stats"]
            tables["pairs"].append({"configuration": conf, "seed_a": seeds[i], "seed_b": seeds[j], **stats})
            for t, *values in zip(*(r["sweep"][k] for k in ("threshold", "shared", "decoder_shared", "maxcos_shared"))):
                tables["sweeps"].append({"configuration": conf, "seed_a": seeds[i], "seed_b": seeds[j],
                                         "threshold": float(t), "shared": float(values[0]),
                                         "decoder_shared": float(values[1]), "maxcos_shared": float(values[2])})
            matrix_b = float(r["shared_b"].mean())
            # Overlap through training: the intermediate checkpoints, then the final SAEs.
            points = through.get((conf, i, j), [])
            if points:
                final = {"tokens": int(saes[i]["metrics"]["train_tokens"])}
                final |= {k: stats[k] for k in points[0] if k in stats} | {"shared_fraction_b": matrix_b}
                points = points + [final]
            tables["through_training"] += [{"configuration": conf, "seed_a": seeds[i], "seed_b": seeds[j], **p}
                                           for p in points]
            matrix[i, j] = stats["shared_fraction"]
            matrix[j, i] = matrix_b
            masks[(i, j)], masks[(j, i)] = r["shared_a"], r["shared_b"]
            edges[(i, j)], edges[(j, i)] = r["edges_ab"], r["edges_ba"]
            cosines["encoder"].append(r["enc_cos"])
            cosines["decoder"].append(r["dec_cos"])
        counts = nway_counts(masks, n, [s["width"] for s in saes])
        for base in range(n):
            for k in range(n):
                tables["nway"].append({"configuration": conf, "base_seed": seeds[base], "shared_with_k_seeds": k,
                                       "latents": int(counts[base, k]),
                                       "fraction": float(counts[base, k] / max(1, counts[base].sum()))})
        curve = no_other_seed_curve(masks, n) if n > 1 else []
        tables["nway_curve"] += [{"configuration": conf, **p} for p in curve]
        groups = consensus_groups(edges, [s["width"] for s in saes])
        tables["consensus"] += [{"configuration": conf, "seeds_spanned": s, "groups": int(g)}
                                for s, g in enumerate(groups) if s > 0]
        truth = _ground_truth(conf, seeds, scored, masks, tables) if (conf, seeds[0]) in scored else None
        off = matrix[~np.eye(n, dtype=bool)]
        first = saes[0]
        configurations[conf] = {
            "hookpoint": first["hookpoint"], "architecture": first["architecture"], "params": first["params"],
            "width": first["width"], "seeds": seeds, "shared_matrix": matrix.tolist(),
            "mean_shared_per_seed": {seeds[i]: float(np.mean([matrix[i, j] for j in range(n) if j != i]))
                                     if n > 1 else float("nan") for i in range(n)},
            "shared_mean": float(off.mean()) if off.size else float("nan"),
            "shared_std": float(off.std()) if off.size else float("nan"),
            "pair_means": {k: float(np.mean([r["stats"][k] for r in conf_results])) if conf_results else float("nan")
                           for k in ("equal_fraction", "decoder_shared_fraction", "maxcos_shared_fraction",
                                     "pw_mcc")},
            "certified": all(r["stats"]["certified"] for r in conf_results),
            "ground_truth": truth,
            "chance": chance.get(conf, {}),
            "nway_counts": counts.tolist(),
            "no_other_seed_curve": curve,
            "consensus_groups": groups.tolist(),
            "frequency_stability": _frequency_stability(conf_results),
            "matched_cos": {k: np.concatenate(v).tolist() if v else [] for k, v in cosines.items()},
            "sweep_mean": _mean_sweep(tables["sweeps"], conf),
            "through_training": _through_training(tables["through_training"], conf),
            "through_training_per_seed": _through_training_per_seed(tables["through_training"], conf, seeds),
        }

    for conf, c in configurations.items():
        if not c["certified"]:
            log.warning("compare: the matching of %s is NOT certified optimal; its shared fractions are lower bounds",
                        conf)
    frames = {name: pd.DataFrame(rows) for name, rows in tables.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), out / f"{name}.parquet")
    manifest = {"threshold": threshold, "configurations": configurations}
    write_json_atomic(out / "manifest.json", {"threshold": threshold, "configurations": {
        k: {kk: vv for kk, vv in v.items() if kk not in ("matched_cos", "sweep_mean")}
        for k, v in configurations.items()}})
    return {"manifest": manifest, "pairs": frames.get("pairs", pd.DataFrame()),
            "nway": frames.get("nway", pd.DataFrame()), "tables": frames}


def _ground_truth(conf: str, seeds: list[int], scored: dict, masks: dict, tables: dict) -> dict:
    """Ground-truth scores of a configuration: per SAE (recovery, MCC), per ordered seed pair (true-feature
    precision of the shared latents and of the orphans), per base seed by "shared with exactly k other seeds".
    Rows go to `tables`; returns the means (and stds over seeds) for the summary and MLflow."""
    n = len(seeds)
    per_sae = [scored[(conf, s)] for s in seeds]
    for seed, r in zip(seeds, per_sae):
        tables["ground_truth_saes"].append({"configuration": conf, "seed": seed, **r["summary"]})
    pairs = []
    for (i, j), shared in masks.items():
        row = shared_precision(per_sae[i]["true_latent"], shared)
        pairs.append(row)
        tables["ground_truth_pairs"].append({"configuration": conf, "seed": seeds[i], "other_seed": seeds[j], **row})
    by_k = np.zeros((n, 2))  # latents, true latents per k, pooled over base seeds
    for base in range(n):
        shared_with = sum((masks[(base, o)].astype(int) for o in range(n) if o != base),
                          np.zeros(len(per_sae[base]["true_latent"]), dtype=int))
        for row in precision_by_shared_count(per_sae[base]["true_latent"], shared_with, n):
            tables["ground_truth_nway"].append({"configuration": conf, "base_seed": seeds[base], **row})
            by_k[row["shared_with_k_seeds"]] += [row["latents"], row["latents"] * np.nan_to_num(row["precision"])]

    def mean_std(key):
        v = np.array([r["summary"][key] for r in per_sae])
        return float(v.mean()), float(v.std())

    def pooled(key_n, key_p):  # over pairs, weighted by the latents in each set
        total = sum(p[key_n] for p in pairs)
        return float(sum(p[key_n] * np.nan_to_num(p[key_p]) for p in pairs) / total) if total else float("nan")

    (rec, rec_sd), (mcc, mcc_sd) = mean_std("recovered_fraction"), mean_std("mcc")
    return {"recovered_mean": rec, "recovered_std": rec_sd, "mcc_mean": mcc, "mcc_std": mcc_sd,
            "true_latent_fraction": mean_std("true_latent_fraction")[0],
            "precision_shared": pooled("n_shared", "precision_shared"),
            "precision_orphan": pooled("n_orphan", "precision_orphan"),
            "precision_by_k": [float(t / c) if c else float("nan") for c, t in by_k]}


def _mean_sweep(rows: list[dict], conf: str) -> dict[str, list[float]]:
    sel = pd.DataFrame([r for r in rows if r["configuration"] == conf])
    if sel.empty:
        return {}
    mean = sel.groupby("threshold")[["shared", "decoder_shared", "maxcos_shared"]].mean()
    return {"threshold": mean.index.tolist(), **{k: mean[k].tolist() for k in mean.columns}}


def _through_training(rows: list[dict], conf: str) -> list[dict]:
    """Shared fraction (mean and std over seed pairs) at each checkpoint's token count; empty without checkpoints."""
    sel = pd.DataFrame([r for r in rows if r["configuration"] == conf])
    if sel.empty:
        return []
    g = sel.groupby("tokens")["shared_fraction"]
    return [{"tokens": int(t), "mean": float(m), "std": float(sd)}
            for t, m, sd in zip(g.mean().index, g.mean(), g.std(ddof=0))]


def _through_training_per_seed(rows: list[dict], conf: str, seeds: list[int]) -> dict[int, list[dict]]:
    """Per seed: its shared fraction against the other seeds (mean over them) at each checkpoint's token count."""
    sel = pd.DataFrame([r for r in rows if r["configuration"] == conf])
    if sel.empty:
        return {}
    # A seed's own side of each pair: shared_fraction when it is seed_a, shared_fraction_b when it is seed_b.
    sides = pd.concat([
        sel[["seed_a", "tokens", "shared_fraction"]].set_axis(["seed", "tokens", "shared"], axis=1),
        sel[["seed_b", "tokens", "shared_fraction_b"]].set_axis(["seed", "tokens", "shared"], axis=1)])
    mean = sides.groupby(["seed", "tokens"])["shared"].mean()
    return {s: [{"tokens": int(t), "shared": float(v)} for t, v in mean.loc[s].items()]
            for s in seeds if s in mean.index.get_level_values(0)}
