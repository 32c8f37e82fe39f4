"""Planted-feature activations: sparse non-negative combinations of known unit features, plus Gaussian noise.

The answer is known: F unit-norm features in d dimensions (seeded), a firing probability per feature (Zipf-like,
scaled to a mean number of active features per token, capped), uniform magnitudes, optionally parents that gate
children. Every row range is a pure function of the parameters and its first row index, so a shard is the same
bytes whatever actor computes it and however often a run is interrupted. `PlantedShardWriter` is the Ray Data
callable that writes shards in the activation shard format (actors/store/shards.py), as the model actors do.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..progress import quiet_worker
from ..store.shards import PARQUET_OPTIONS, activation_table, shard_rel, to_storage
from ..store.storage import ActivationStore

GROUND_TRUTH = "ground_truth.safetensors"
_FEATURES_STREAM, _ROWS_STREAM = 0, 1  # independent seed streams: the features never depend on the row count


@dataclass(frozen=True)
class PlantedParams:
    """The generator's parameters (the `planted` config section, as a plain dict on the actors)."""

    num_features: int
    d: int
    active_per_token: float
    zipf_exponent: float
    max_firing_probability: float
    magnitude_min: float
    magnitude_max: float
    noise_std: float
    seed: int
    parents: int = 0
    children_per_parent: int = 0
    child_probability: float = 1.0

    @classmethod
    def from_config(cls, planted: dict) -> "PlantedParams":
        h = planted.get("hierarchy") or {}
        return cls(**{k: planted[k] for k in ("num_features", "d", "active_per_token", "zipf_exponent",
                                              "max_firing_probability", "magnitude_min", "magnitude_max",
                                              "noise_std", "seed")},
                   parents=h.get("parents", 0), children_per_parent=h.get("children_per_parent", 0),
                   child_probability=h.get("child_probability", 1.0))

    @property
    def num_children(self) -> int:
        return self.parents * self.children_per_parent


def true_features(p: PlantedParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [F, d] unit rows, marginal firing probability [F], parent index [F], -1 for none).

    Children (indices parents .. parents + num_children) fire with probability child_probability given their
    parent; every other feature independently, with probability c * (rank + 1) ** -zipf_exponent capped at
    max_firing_probability, c solved (bisection) so the expected number of active features per token, children
    included, is active_per_token."""
    rng = np.random.default_rng([p.seed, _FEATURES_STREAM])
    features = rng.standard_normal((p.num_features, p.d))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    parent = np.full(p.num_features, -1, dtype=np.int64)
    children = np.arange(p.parents, p.parents + p.num_children)
    parent[children] = np.repeat(np.arange(p.parents), p.children_per_parent)
    independent = parent < 0
    weights = (np.arange(p.num_features, dtype=np.float64) + 1.0)[independent] ** -p.zipf_exponent

    def probabilities(c: float) -> np.ndarray:
        prob = np.zeros(p.num_features)
        prob[independent] = np.minimum(c * weights, p.max_firing_probability)
        prob[children] = prob[parent[children]] * p.child_probability
        return prob

    reachable = probabilities(np.inf).sum()
    if reachable < p.active_per_token:
        raise ValueError(f"planted.active_per_token ({p.active_per_token}) is out of reach: at most {reachable:.2f} "
                         "features per token with this cap and hierarchy")
    lo, hi = 0.0, p.active_per_token / weights.min()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if probabilities(mid).sum() < p.active_per_token else (lo, mid)
    return features.astype(np.float32), probabilities(hi).astype(np.float32), parent


def generate_rows(p: PlantedParams, start: int, stop: int, features: np.ndarray | None = None,
                  probability: np.ndarray | None = None, parent: np.ndarray | None = None) -> np.ndarray:
    """Rows [start, stop) as float32 [stop - start, d]: each a pure function of the parameters and its own index
    (rows come in blocks of BLOCK seeded by block number, so any split into shards gives the same rows)."""
    if features is None:
        features, probability, parent = true_features(p)
    out = np.empty((stop - start, p.d), dtype=np.float32)
    first_block = start // BLOCK
    for block in range(first_block, (stop - 1) // BLOCK + 1 if stop > start else first_block):
        b0 = block * BLOCK
        rows = _block(p, block, features, probability, parent)
        lo, hi = max(start, b0), min(stop, b0 + BLOCK)
        out[lo - start:hi - start] = rows[lo - b0:hi - b0]
    return out


BLOCK = 4096  # rows per independently seeded block


def planted_codes(p: PlantedParams, block: int, features: np.ndarray | None = None,
                  probability: np.ndarray | None = None, parent: np.ndarray | None = None,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """The true sparse codes [BLOCK, F] of rows block * BLOCK ... (block + 1) * BLOCK: which features fire, with
    what magnitude. Children fire with child_probability where their parent fires, never elsewhere."""
    if probability is None:
        features, probability, parent = true_features(p)
    rng = rng if rng is not None else _block_rng(p, block)
    u = rng.random((BLOCK, p.num_features), dtype=np.float32)
    conditional = probability.copy()
    children = parent >= 0
    conditional[children] = p.child_probability
    fires = u < conditional
    fires[:, children] &= fires[:, parent[children]]  # a child fires only with its parent
    magnitude = rng.uniform(p.magnitude_min, p.magnitude_max, size=(BLOCK, p.num_features)).astype(np.float32)
    return np.where(fires, magnitude, np.float32(0))


def _block_rng(p: PlantedParams, block: int) -> np.random.Generator:
    return np.random.default_rng([p.seed, _ROWS_STREAM, block])


def _block(p: PlantedParams, block: int, features: np.ndarray, probability: np.ndarray,
           parent: np.ndarray) -> np.ndarray:
    rng = _block_rng(p, block)
    codes = planted_codes(p, block, features, probability, parent, rng)
    noise = rng.standard_normal((BLOCK, p.d), dtype=np.float32) * np.float32(p.noise_std)
    return sparse_combination(codes, features) + noise


def sparse_combination(codes: np.ndarray, features: np.ndarray) -> np.ndarray:
    """codes @ features, summed feature by feature in index order with elementwise float32 operations: the same
    bits on every machine and thread count (a BLAS matmul's summation order, hence its rounding, varies)."""
    fires = codes > 0
    width = int(fires.sum(1).max(initial=0))
    order = np.argsort(~fires, axis=1, kind="stable")[:, :width]  # each row's firing features, in index order
    weights = np.take_along_axis(codes, order, axis=1)  # 0 where a row has fewer than `width`
    out = np.zeros((codes.shape[0], features.shape[1]), dtype=np.float32)
    for j in range(width):
        out += weights[:, j, None] * features[order[:, j]]
    return out


def ground_truth_bytes(p: PlantedParams) -> bytes:
    """`ground_truth.safetensors`: features [F, d] float32, firing_probability [F] float32, parent [F] int64."""
    from safetensors.torch import save

    features, probability, parent = true_features(p)
    return save({"features": torch.from_numpy(features), "firing_probability": torch.from_numpy(probability),
                 "parent": torch.from_numpy(parent)}, metadata={"params": json.dumps(p.__dict__, sort_keys=True)})


def load_ground_truth(data: bytes | io.BytesIO) -> dict[str, np.ndarray]:
    from safetensors.torch import load

    return {k: v.numpy() for k, v in load(bytes(data)).items()}


def record_rel(hookpoint: str, shard_id: int) -> str:
    """The planted source's commit records live in its own folder (the model's are in shards/)."""
    return f"{hookpoint}/records/shard-{shard_id:05d}.json"


class PlantedShardWriter:
    """Ray Data callable class: generates and writes whole planted shards; the record, written last, commits."""

    def __init__(self, planted: dict, hookpoint: str, store_uri: str, storage_dtype: str, plan_hash: str):
        quiet_worker()
        self.params = PlantedParams.from_config(planted)
        self.truth = true_features(self.params)
        self.hookpoint, self.store, self.dtype = hookpoint, ActivationStore(store_uri), storage_dtype
        self.plan_hash = plan_hash
        import ray

        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def write_shard(self, shard_id: int, start: int, stop: int) -> dict:
        t0 = time.perf_counter()
        rows = generate_rows(self.params, start, stop, *self.truth)
        stored = to_storage(torch.from_numpy(rows), self.dtype)
        rel = shard_rel(self.hookpoint, shard_id)
        index = np.arange(start, stop)
        zeros = np.zeros(stop - start)
        # Provenance: a planted row's "chunk" is its global row index (no tokens behind it).
        self.store.write_table(rel, activation_table(stored, index, zeros, zeros, self.dtype), **PARQUET_OPTIONS)
        seconds = time.perf_counter() - t0
        record = {"shard_id": shard_id, "start": start, "stop": stop, "tokens": stop - start, "seconds": seconds,
                  "tokens_per_s": (stop - start) / seconds, "node_id": self.node_id, "plan_hash": self.plan_hash,
                  "hookpoints": {self.hookpoint: {
                      "path": rel, "rows": stop - start, "d_in": self.params.d, "nonfinite_rows": 0,
                      "sum_norm": float(np.linalg.norm(rows, axis=1).sum()), "sha256": self.store.sha256(rel)}}}
        self.store.write_json(record_rel(self.hookpoint, shard_id), record)
        return record

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = [self.write_shard(int(s), int(a), int(b))
                   for s, a, b in zip(batch["shard_id"], batch["start"], batch["stop"])]
        return {"record": [json.dumps(r) for r in records]}
