"""The planted-feature source inside the generate stage: plan, ground truth, Ray Data actor pool, manifest entry.

Writes, under `<activation store>/<planted.hookpoint>/`:
  plan.json                  the shard plan (row ranges), a function of the `planted` config alone
  ground_truth.safetensors   features [F, d], firing_probability [F], parent [F]
  shard-NNNNN.parquet        the activation shards, in the model shards' format
  records/shard-NNNNN.json   one commit record per shard, written after its file
A re-run skips every shard with a record, so a run killed anywhere resumes with identical checksums. The result
is one more entry of the manifest's `hookpoints`, so training and comparison read it like a model's hookpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time

import ray
from tqdm.auto import tqdm

from actors.generate.planted import GROUND_TRUTH, PlantedParams, PlantedShardWriter, ground_truth_bytes
from actors.generate.planted import record_rel as planted_record_rel
from actors.store.shards import verify_shards
from actors.store.storage import ActivationStore

from ..config import ExperimentConfig

log = logging.getLogger(__name__)


def planted_hash(cfg: ExperimentConfig) -> str:
    """Everything that decides the planted source's bytes (its config and the storage dtype)."""
    data = json.dumps({"planted": cfg.planted.model_dump(), "dtype": cfg.generate.dtype}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def planted_plan(num_tokens: int, shard_tokens: int) -> list[dict]:
    return [{"shard_id": i, "start": i * shard_tokens, "stop": min(num_tokens, (i + 1) * shard_tokens)}
            for i in range(math.ceil(num_tokens / shard_tokens))]


def _committed(store: ActivationStore, hookpoint: str, plan_hash: str, planned: set[int]) -> dict[int, dict]:
    records = {}
    for name in store.listdir(f"{hookpoint}/records"):
        if name.startswith("shard-") and name.endswith(".json"):
            record = store.read_json(f"{hookpoint}/records/{name}")
            if record.get("plan_hash") == plan_hash and record["shard_id"] in planned:
                records[record["shard_id"]] = record
    return records


def run_planted(cfg: ExperimentConfig, store: ActivationStore) -> dict:
    """Generate (or finish) the planted source; returns its manifest entry (a `hookpoints` entry plus the
    ground truth's path, checksum and the generator's parameters)."""
    p, h = cfg.planted, cfg.planted.hookpoint
    plan_hash = planted_hash(cfg)
    plan = {"plan_hash": plan_hash, "shards": planted_plan(p.num_tokens, p.shard_tokens)}
    store.write_json(f"{h}/plan.json", plan)
    truth_rel = f"{h}/{GROUND_TRUTH}"
    truth = ground_truth_bytes(PlantedParams.from_config(p.model_dump()))  # cheap, and deterministic
    if not store.exists(truth_rel) or store.read_bytes(truth_rel) != truth:
        store.write_bytes(truth_rel, truth)
    records = _committed(store, h, plan_hash, {s["shard_id"] for s in plan["shards"]})
    # Committed shards are checked before they are reused; a missing or damaged one is computed again.
    for shard_id, problems in sorted(verify_shards(store, records, cfg.generate.verify).items()):
        log.warning("generate %s: shard %d is damaged (%s); recomputing it", h, shard_id, "; ".join(problems))
        store.delete(planted_record_rel(h, shard_id))
        del records[shard_id]
    todo = [s for s in plan["shards"] if s["shard_id"] not in records]
    if records:
        log.info("generate %s: %d of %d shards already committed; computing %d", h, len(records),
                 len(plan["shards"]), len(todo))
    t0 = time.perf_counter()
    if todo:
        results = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            PlantedShardWriter,
            fn_constructor_kwargs=dict(planted=p.model_dump(), hookpoint=h, store_uri=store.uri,
                                       storage_dtype=cfg.generate.dtype, plan_hash=plan_hash),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.generate.num_actors or 1, len(todo)))),
            num_cpus=cfg.generate.cpus_per_actor,
        )
        with tqdm(total=sum(s["stop"] - s["start"] for s in todo), unit="tok", unit_scale=True,
                  desc=f"generate {h}") as bar:
            for row in results.iter_rows():
                record = json.loads(row["record"])
                records[record["shard_id"]] = record
                bar.update(record["tokens"])
    seconds = time.perf_counter() - t0
    missing = [s["shard_id"] for s in plan["shards"] if s["shard_id"] not in records]
    if missing:
        raise RuntimeError(f"generate {h}: shards {missing[:10]} were planned but not committed")
    shards = []
    for shard_id in sorted(records):
        r = records[shard_id]
        s = r["hookpoints"][h]
        shards.append({"shard_id": shard_id, "path": s["path"], "rows": s["rows"], "sha256": s["sha256"],
                       "nonfinite_rows": 0, "node_id": r["node_id"], "seconds": r["seconds"],
                       "tokens_per_s": r["tokens_per_s"]})
    rows = sum(s["rows"] for s in shards)
    computed = [records[s["shard_id"]] for s in todo]
    return {"d_in": p.d, "rows": rows, "nonfinite_rows": 0, "shards": shards,
            "mean_norm": sum(records[i]["hookpoints"][h]["sum_norm"] for i in records) / max(1, rows),
            "source": "planted", "config_hash": plan_hash,
            "ground_truth": {"path": truth_rel, "sha256": store.sha256(truth_rel),
                             "tensors": {"features": [p.num_features, p.d], "firing_probability": [p.num_features],
                                         "parent": [p.num_features]},
                             "params": p.model_dump()},
            "throughput": {"shards_computed": len(computed), "shards_reused": len(shards) - len(computed),
                           "seconds": seconds,
                           "tokens_per_s": sum(r["tokens"] for r in computed) / seconds if computed else None}}
