"""Generate stage: corpus -> token chunks -> shard plan -> Ray Data actor pool -> Parquet shards + manifest.

Reads only the config; writes, in the activation store (a folder or object-store URI):
  tokens/*.parquet the packed token chunks, one file per source shard of the corpus (`stages/tokenize.py`);
                   each actor reads only the row groups holding the shard it computes
  plan.json        the token files (checksums) and which chunks go in which shard; written before any activation
  shards/*.json    one record per committed shard (rows, checksums, norms, timing), written after its files
  manifest.json    the one thing the train stage reads, assembled from the records
A re-run with the same config skips every shard that has a record and computes only the rest, so a run killed
anywhere (actor, node or driver) resumes with each row written exactly once and identical checksums.

Nothing is reused unchecked: before a re-run reuses shards (all of them, when the manifest exists, or the committed
ones of an interrupted run) it checks each file against its record (`generate.verify`: sha256, one read of every
file, threads in parallel; or size, a stat) and recomputes exactly the missing or damaged shards, one log line each.
Paths in the manifest are relative to the activation store, so a moved or copied output folder reads its own files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time

import ray
from tqdm.auto import tqdm

from actors.generate.activations import ActivationShardWriter
from actors.generate.models import build_local_model, load_tokenizer, resolve_hookpoints, skeleton_model
from actors.store.shards import file_problem, locate_manifest, record_rel, verify_shards
from actors.store.storage import ActivationStore

from ..config import ExperimentConfig
from .tokenize import tokenize_corpus

log = logging.getLogger(__name__)

MANIFEST, PLAN = "manifest.json", "plan.json"


def activation_uri(cfg: ExperimentConfig) -> str:
    return cfg.generate.output_uri or str(cfg.output_path / "activations")


def generate_hash(cfg: ExperimentConfig) -> str:
    """The manifest's hash: the model's activations and, when configured, the planted source's."""
    if cfg.planted is None:
        return lm_generate_hash(cfg)
    from .planted import planted_hash

    return hashlib.sha256(f"{lm_generate_hash(cfg)}:{planted_hash(cfg)}".encode()).hexdigest()[:16]


def lm_generate_hash(cfg: ExperimentConfig) -> str:
    """Everything that decides the model activations' bytes; not where or on how many actors they are computed."""
    model = cfg.model.model_dump(exclude={"random_init_seed"} if cfg.model.random_init_seed is None else None)
    data = json.dumps({"model": model, "dataset": cfg.dataset.model_dump(),
                       "generate": cfg.generate.model_dump(exclude={"num_actors", "gpus_per_actor", "cpus_per_actor",
                                                                    "device_map", "output_uri", "verify"})},
                      sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def shard_plan(num_chunks: int, ctx_len: int, shard_tokens: int) -> list[dict]:
    """Consecutive chunk ranges of about `shard_tokens` tokens; a function of the config alone."""
    per_shard = max(1, shard_tokens // ctx_len)
    return [{"shard_id": i, "start": i * per_shard, "stop": min(num_chunks, (i + 1) * per_shard)}
            for i in range(math.ceil(num_chunks / per_shard))]


def _model_source(cfg: ExperimentConfig) -> tuple[str, str | None]:
    if cfg.model.build is not None:
        folder = build_local_model(cfg.model.build, cfg.model.init_seed, cfg.output_path / "model")
        return str(folder), None
    return cfg.model.name, cfg.model.revision


def tokens_digest(token_files: list[dict]) -> str:
    """One checksum for all the run's chunks: over the token files' names, chunk counts and sha256s."""
    return hashlib.sha256(json.dumps([[f["path"], f["chunks"], f["sha256"]] for f in token_files]).encode()
                          ).hexdigest()


def _make_plan(cfg: ExperimentConfig, store: ActivationStore, model_path: str, revision: str | None) -> dict:
    """Tokenise and pack (Ray tasks over the corpus's source shards) and write the token files + plan."""
    g = cfg.generate
    num_chunks = g.num_tokens // g.ctx_len
    if num_chunks == 0:
        raise ValueError(f"generate.num_tokens ({g.num_tokens}) is smaller than one chunk (ctx_len {g.ctx_len})")
    tokenizer = load_tokenizer(model_path, revision, cfg.model.trust_remote_code)
    per_shard = max(1, g.shard_tokens // g.ctx_len)
    token_files, counts = tokenize_corpus(cfg, store, model_path, revision, num_chunks, row_group_chunks=per_shard)
    digest = tokens_digest(token_files)
    plan = {
        "generate_hash": lm_generate_hash(cfg),
        # What a committed shard's record names: the config's hash and the exact chunks it was computed from.
        "plan_hash": hashlib.sha256(f"{lm_generate_hash(cfg)}:{digest}".encode()).hexdigest()[:16],
        "tokens_sha256": digest,
        "token_files": token_files,
        "num_chunks": num_chunks,
        "ctx_len": g.ctx_len,
        "corpus": counts,
        "tokenizer": {"name_or_path": _portable(tokenizer.name_or_path, cfg), "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id},
        "shards": shard_plan(num_chunks, g.ctx_len, g.shard_tokens),
    }
    store.write_json(PLAN, plan)
    return plan


def _load_plan(cfg: ExperimentConfig, store: ActivationStore, model_path: str, revision: str | None) -> dict:
    """The stored plan when it is this config's and its token files check out (`generate.verify`); else a new one
    (the same, when only token files were lost: tokenising is deterministic)."""
    if store.exists(PLAN):
        plan = store.read_json(PLAN)
        if (plan.get("generate_hash") == lm_generate_hash(cfg) and "token_files" in plan
                and not any(file_problem(store, f, cfg.generate.verify) for f in plan["token_files"])):
            return plan
    return _make_plan(cfg, store, model_path, revision)


def committed_records(store: ActivationStore, plan: dict) -> dict[int, dict]:
    """Records of shards already committed under this plan (a record from another plan is stale)."""
    planned = {s["shard_id"] for s in plan["shards"]}
    records = {}
    for name in store.listdir("shards"):
        if name.startswith("shard-") and name.endswith(".json"):
            record = store.read_json(f"shards/{name}")
            if record.get("plan_hash") == plan["plan_hash"] and record["shard_id"] in planned:
                records[record["shard_id"]] = record
    return records


def _actor_count(cfg: ExperimentConfig, gpus_per_actor: float, todo: int) -> int:
    if cfg.generate.num_actors is not None:
        n = cfg.generate.num_actors
    elif gpus_per_actor > 0:
        n = int(ray.cluster_resources().get("GPU", 0) // gpus_per_actor)
    else:
        n = 1
    return max(1, min(n, todo))


def _model_revision(model_path: str, revision: str | None, trust_remote_code: bool) -> str | None:
    """The commit a Hub model resolved to (provenance); None for a local folder."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code),
                   "_commit_hash", None)


def _manifest_records(manifest: dict) -> dict[int, dict]:
    """The manifest's model shards regrouped per shard, in the records' layout (a planted source keeps its own
    records and verifies them in `run_planted`)."""
    records: dict[int, dict] = {}
    for h, entry in manifest["hookpoints"].items():
        if entry.get("source") == "planted":
            continue
        for shard in entry["shards"]:
            records.setdefault(shard["shard_id"], {"hookpoints": {}})["hookpoints"][h] = shard
    return records


def _uncommit(store: ActivationStore, damaged: dict[int, list[str]]) -> None:
    """Say what is wrong with each damaged shard and remove its record, so that it is computed again."""
    for sid, problems in sorted(damaged.items()):
        log.warning("generate: shard %d is damaged (%s); recomputing it", sid, "; ".join(problems))
        store.delete(record_rel(sid))


def _located(manifest: dict, store: ActivationStore, model_path: str) -> dict:
    """The manifest with the locations of this run filled in (on disk it holds only relative paths)."""
    return locate_manifest(manifest, store.uri, model_path)


def run_generate(cfg: ExperimentConfig) -> dict:
    store = ActivationStore(activation_uri(cfg))
    g = cfg.generate
    manifest = store.read_json(MANIFEST) if store.exists(MANIFEST) else None
    if manifest is not None and manifest.get("config_hash") != generate_hash(cfg):
        manifest = None
    damaged: dict[int, list[str]] = {}
    if manifest is not None:
        damaged = verify_shards(store, _manifest_records(manifest), g.verify)
        if not damaged:
            log.info("generate: reusing %s (%d shards verified by %s)", store.display(MANIFEST),
                     manifest["plan"]["shards"], g.verify)
            if cfg.planted is not None:  # verified (and repaired) on its own
                _add_planted(cfg, store, manifest)
                store.write_json(MANIFEST, manifest)
            return _located(manifest, store, _model_source(cfg)[0])
        _uncommit(store, damaged)
    model_path, revision = _model_source(cfg)
    # A hookpoint pattern that matches nothing fails here, before tokenising or starting any actor.
    hookpoints = resolve_hookpoints(skeleton_model(model_path, revision, cfg.model.trust_remote_code), g.hookpoints)
    log.info("generate: hookpoints %s", hookpoints)
    if cfg.planted is not None and cfg.planted.hookpoint in hookpoints:
        raise ValueError(f"planted.hookpoint {cfg.planted.hookpoint!r} is also a module of the model; give the "
                         "planted source another name")
    plan = _load_plan(cfg, store, model_path, revision)
    records = committed_records(store, plan)
    if manifest is None:  # shards committed by an interrupted run: checked before they are reused
        damaged = verify_shards(store, records, g.verify)
        _uncommit(store, damaged)
    records = {sid: r for sid, r in records.items() if sid not in damaged}
    todo = [s for s in plan["shards"] if s["shard_id"] not in records]
    if records:
        log.info("generate: %d of %d shards already committed; computing %d", len(records), len(plan["shards"]),
                 len(todo))

    t0 = time.perf_counter()
    if todo:
        gpus = g.gpus_per_actor if g.gpus_per_actor is not None else (
            1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)
        results = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            ActivationShardWriter,
            fn_constructor_kwargs=dict(
                model_path=model_path, revision=revision, model_dtype=cfg.model.dtype,
                trust_remote_code=cfg.model.trust_remote_code, device_map=g.device_map, hookpoints=g.hookpoints,
                store_uri=store.uri, storage_dtype=g.dtype, batch_size=g.batch_size, nonfinite=g.nonfinite,
                plan_hash=plan["plan_hash"], token_files=plan["token_files"], torch_threads=max(1, int(g.cpus_per_actor)) if gpus == 0 else 0,
                random_init_seed=cfg.model.random_init_seed),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=_actor_count(cfg, gpus, len(todo))),
            num_gpus=gpus,
            num_cpus=g.cpus_per_actor,
        )
        # Records stream back as shards commit: the bar counts tokens, so it shows tokens/s and an ETA.
        total = sum(s["stop"] - s["start"] for s in todo) * plan["ctx_len"]
        with tqdm(total=total, unit="tok", unit_scale=True, desc="generate activations") as bar:
            for row in results.iter_rows():
                record = json.loads(row["record"])
                records[record["shard_id"]] = record
                bar.update(record["tokens"])
    seconds = time.perf_counter() - t0

    manifest = assemble_manifest(cfg, store, plan, records, model_path, revision)
    computed = [records[s["shard_id"]] for s in todo]
    manifest["throughput"] = {
        "shards_computed": len(computed), "shards_reused": len(plan["shards"]) - len(computed),
        "seconds": seconds, "tokens_per_s": sum(r["tokens"] for r in computed) / seconds if computed else None,
    }
    if cfg.planted is not None:  # one more activation source, read by training like a hookpoint
        _add_planted(cfg, store, manifest)
    store.write_json(MANIFEST, manifest)
    return _located(manifest, store, model_path)


def _add_planted(cfg: ExperimentConfig, store: ActivationStore, manifest: dict) -> None:
    from .planted import run_planted

    entry = run_planted(cfg, store)
    manifest["planted_throughput"] = entry.pop("throughput")
    manifest["hookpoints"][cfg.planted.hookpoint] = entry


def _portable(model_path: str, cfg: ExperimentConfig) -> str:
    """A model built into the output folder is recorded relative to it (provenance; the run uses its own)."""
    try:
        return os.path.relpath(model_path, cfg.output_path) if cfg.model.build is not None else model_path
    except ValueError:
        return model_path


def assemble_manifest(cfg: ExperimentConfig, store: ActivationStore, plan: dict, records: dict[int, dict],
                      model_path: str, revision: str | None) -> dict:
    missing = [s["shard_id"] for s in plan["shards"] if s["shard_id"] not in records]
    if missing:
        raise RuntimeError(f"generate: shards {missing[:10]} were planned but not committed")
    hookpoints: dict[str, dict] = {}
    for shard_id in sorted(records):
        r = records[shard_id]
        for h, s in r["hookpoints"].items():
            entry = hookpoints.setdefault(h, {"d_in": s["d_in"], "rows": 0, "sum_norm": 0.0, "nonfinite_rows": 0,
                                              "shards": []})
            entry["rows"] += s["rows"]
            entry["sum_norm"] += s["sum_norm"]
            entry["nonfinite_rows"] += s["nonfinite_rows"]
            entry["shards"].append({"shard_id": shard_id, "path": s["path"], "rows": s["rows"], "sha256": s["sha256"],
                                    "bytes": s.get("bytes"), "nonfinite_rows": s["nonfinite_rows"],
                                    "node_id": r["node_id"],
                                    "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"]})
    for h, entry in hookpoints.items():
        entry["mean_norm"] = entry.pop("sum_norm") / max(1, entry["rows"])
        if entry["nonfinite_rows"]:
            log.warning("generate: %d rows of %s had NaN/inf activations and were dropped", entry["nonfinite_rows"], h)
    return {
        "config_hash": generate_hash(cfg),
        "root": ".",  # every path here is relative to the store holding this manifest; run_generate fills it in
        "model": {"name": cfg.model.name, "path": _portable(model_path, cfg), "revision": revision,
                  "dtype": cfg.model.dtype, "random_init_seed": cfg.model.random_init_seed,
                  "resolved_revision": _model_revision(model_path, revision, cfg.model.trust_remote_code)},
        "tokenizer": plan["tokenizer"],
        "dataset": cfg.dataset.model_dump(),
        "corpus": plan["corpus"],
        "ctx_len": plan["ctx_len"],
        "num_tokens": plan["num_chunks"] * plan["ctx_len"],
        "dtype": cfg.generate.dtype,
        "hookpoint_patterns": cfg.generate.hookpoints,
        "plan": {"shards": len(plan["shards"]), "tokens_sha256": plan["tokens_sha256"],
                 "token_files": [{"path": f["path"], "chunks": f["chunks"]} for f in plan["token_files"]]},
        "hookpoints": hookpoints,
    }
