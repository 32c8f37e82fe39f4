"""Generate stage: corpus -> token chunks -> Ray Data actor pool -> Parquet shards + manifest.

Reads only the config; writes `activations/manifest.json`, the one thing the train stage reads.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from actors.activations import ActivationShardWriter, write_parquet_atomic
from actors.checkpoint import write_json_atomic
from actors.corpus import load_documents, pack_chunks
from actors.models import build_local_model, load_tokenizer

from ..config import ExperimentConfig

log = logging.getLogger(__name__)


def manifest_path(cfg: ExperimentConfig) -> Path:
    return cfg.output_path / "activations" / "manifest.json"


def _model_source(cfg: ExperimentConfig) -> tuple[str, str | None]:
    if cfg.model.build is not None:
        folder = build_local_model(cfg.model.build, cfg.model.init_seed, cfg.output_path / "model")
        return str(folder), None
    return cfg.model.name, cfg.model.revision


def _gpus_per_actor(cfg: ExperimentConfig) -> float:
    if cfg.generate.gpus_per_actor is not None:
        return cfg.generate.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_generate(cfg: ExperimentConfig) -> dict:
    path = manifest_path(cfg)
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("config_hash") == _generate_hash(cfg):
            log.info("generate: reusing %s", path)
            return manifest
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    model_path, revision = _model_source(cfg)
    g = cfg.generate

    # Tokenise and pack on the driver (cheap next to the forward passes); the chunk table is the shard plan.
    tokenizer = load_tokenizer(model_path, revision, cfg.model.trust_remote_code)
    num_chunks = g.num_tokens // g.ctx_len
    if num_chunks == 0:
        raise ValueError(f"generate.num_tokens ({g.num_tokens}) is smaller than one chunk (ctx_len {g.ctx_len})")
    chunks = pack_chunks(load_documents(cfg.dataset), tokenizer, cfg.dataset.text_column, g.ctx_len, num_chunks)
    tokens_path = root / "tokens.parquet"
    write_parquet_atomic(pa.table({
        "chunk_id": pa.array(np.arange(num_chunks, dtype=np.int64)),
        "input_ids": pa.array(chunks, pa.list_(pa.int32())),
    }), tokens_path)
    per_shard = max(1, g.shard_tokens // g.ctx_len)
    plan = [{"shard_id": i, "start": i * per_shard, "stop": min(num_chunks, (i + 1) * per_shard)}
            for i in range(math.ceil(num_chunks / per_shard))]

    gpus = _gpus_per_actor(cfg)
    results = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
        ActivationShardWriter,
        fn_constructor_kwargs=dict(
            model_path=model_path, revision=revision, model_dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code, hookpoints=g.hookpoints, tokens_path=str(tokens_path),
            out_dir=str(root), storage_dtype=g.dtype, batch_size=g.batch_size),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=g.num_actors),
        num_gpus=gpus,
        num_cpus=0.5 if gpus == 0 else 1,
    ).take_all()

    hookpoints: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: (r["hookpoint"], r["shard_id"])):
        entry = hookpoints.setdefault(r["hookpoint"], {"d_in": int(r["d_in"]), "rows": 0, "sum_norm": 0.0,
                                                       "shards": []})
        entry["rows"] += int(r["rows"])
        entry["sum_norm"] += float(r["sum_norm"])
        entry["shards"].append({"shard_id": int(r["shard_id"]), "path": r["path"], "rows": int(r["rows"]),
                                "sha256": r["sha256"], "node_id": r["node_id"]})
    for entry in hookpoints.values():
        entry["mean_norm"] = entry.pop("sum_norm") / entry["rows"]
    manifest = {
        "config_hash": _generate_hash(cfg),
        "root": str(root),
        "model": {"name": cfg.model.name, "path": model_path, "revision": revision, "dtype": cfg.model.dtype},
        "dataset": cfg.dataset.model_dump(),
        "ctx_len": g.ctx_len,
        "num_tokens": num_chunks * g.ctx_len,
        "dtype": g.dtype,
        "hookpoints": hookpoints,
    }
    write_json_atomic(path, manifest)
    return manifest


def _generate_hash(cfg: ExperimentConfig) -> str:
    import hashlib

    data = json.dumps({"model": cfg.model.model_dump(), "dataset": cfg.dataset.model_dump(),
                       "generate": cfg.generate.model_dump(exclude={"num_actors", "gpus_per_actor", "batch_size"})},
                      sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]
