"""Activation actors: one model per actor, every hookpoint captured in one forward pass, Parquet shards.

The Ray Data pipeline hands each actor one planned shard at a time (`shard_id`, chunk range). The actor reads
only that range's token chunks (the row groups of the token files holding it) and runs the model over them
batch by batch; a background thread appends each batch to one Parquet
file per hookpoint (a row group per batch) while the next batch computes. Files are written under temporary
names and moved into place when complete; the shard's record (`shards/shard-NNNNN.json`, rows, checksums,
norms, non-finite counts, timing) is written last and is what marks the shard committed.
"""

from __future__ import annotations

import json
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..progress import quiet_worker
from ..store.shards import (PARQUET_OPTIONS, activation_schema, activation_table, from_storage, record_rel, shard_rel,
                            to_storage)
from ..store.storage import ActivationStore
from ..store.tokens import read_chunks
from .models import load_model, resolve_hookpoints

class _StopForward(Exception):
    """Raised by the last hookpoint's hook: nothing after it is needed."""


class HookpointCapture:
    """Forward hooks on the resolved hookpoints; a forward pass stops as soon as every one has fired."""

    def __init__(self, model: torch.nn.Module, patterns: list[str]):
        self.model = model
        self.hookpoints = resolve_hookpoints(model, patterns)
        modules = dict(model.named_modules())
        self.captured: dict[str, torch.Tensor] = {}
        for name in self.hookpoints:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def fn(_module, _inputs, output):
            if name in self.captured:  # a module run twice in one forward: the first call is the hookpoint
                return
            self.captured[name] = output[0] if isinstance(output, tuple) else output
            if len(self.captured) == len(self.hookpoints):
                raise _StopForward
        return fn

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        self.captured = {}
        try:
            self.model(input_ids)
        except _StopForward:
            pass
        missing = [h for h in self.hookpoints if h not in self.captured]
        if missing:
            raise RuntimeError(f"hookpoints {missing} did not run in the model's forward pass")
        return {h: self.captured[h] for h in self.hookpoints}


def screen_nonfinite(values: np.ndarray, policy: str, where: str) -> np.ndarray | None:
    """Rows of `values` (float32) to keep (None: all). Counts rows with any NaN/inf; 'fail' raises naming the
    shard, 'drop' drops."""
    bad = ~np.isfinite(values).all(axis=-1)
    if not bad.any():
        return None
    if policy == "fail":
        raise ValueError(f"{where}: {int(bad.sum())} activation rows contain NaN or inf; set "
                         "generate.nonfinite: drop to skip such rows (they are counted in the manifest)")
    return ~bad


class ActivationShardWriter:
    """Ray Data callable class: `__init__` loads the model once per actor, `__call__` writes whole shards."""

    def __init__(self, model_path: str, revision: str | None, model_dtype: str, trust_remote_code: bool,
                 device_map: str | None, hookpoints: list[str], store_uri: str, storage_dtype: str, batch_size: int,
                 nonfinite: str, plan_hash: str, torch_threads: int = 0, random_init_seed: int | None = None,
                 token_files: list[dict] | None = None):
        quiet_worker()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_path, revision, model_dtype, trust_remote_code, self.device, device_map,
                                random_init_seed)
        self.input_device = self.model.get_input_embeddings().weight.device
        self.capture = HookpointCapture(self.model, hookpoints)
        self.store = ActivationStore(store_uri)
        # The plan's token files (path and chunk count each; one per source shard, not per token): given by the
        # stage, or read from the store's plan when called on its own (tests, benchmarks).
        self.token_files = token_files if token_files is not None else self.store.read_json("plan.json")["token_files"]
        self.storage_dtype, self.batch_size, self.nonfinite = storage_dtype, batch_size, nonfinite
        self.plan_hash = plan_hash
        # One writer thread: Parquet encoding and upload of batch i overlap the forward pass of batch i + 1,
        # and row groups are appended in order.
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        import ray

        # The node that wrote each shard goes into the manifest, so where a multi-node run worked is checkable.
        # Outside Ray (tests, benchmarks) there is none; asking would start a Ray instance.
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def _to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Device -> host copy into pinned memory without blocking the next forward; CPU tensors pass through."""
        if t.device.type != "cuda":
            return t, None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def write_shard(self, shard_id: int, start: int, stop: int) -> dict:
        t0 = time.perf_counter()
        chunk_ids = np.arange(start, stop, dtype=np.int64)
        token_ids = read_chunks(self.store, self.token_files, start, stop)
        ctx_len = token_ids.shape[1]
        stats = {h: {"path": shard_rel(h, shard_id), "rows": 0, "sum_norm": 0.0, "nonfinite_rows": 0}
                 for h in self.capture.hookpoints}
        writers: dict = {}
        pending: list[Future] = []

        def write_batch(h, acts, event, ids, cids):
            if event is not None:
                event.synchronize()
            stored = to_storage(acts.reshape(-1, acts.shape[-1]), self.storage_dtype)
            chunk_col, pos_col, tok_col = (np.repeat(cids, ctx_len), np.tile(np.arange(ctx_len), len(cids)),
                                           ids.reshape(-1))
            if h not in writers:
                writers[h] = self.store.open_parquet_writer(
                    stats[h]["path"], activation_schema(stored.shape[-1], self.storage_dtype), **PARQUET_OPTIONS)
                stats[h]["d_in"] = int(stored.shape[-1])
            values = from_storage(stored, self.storage_dtype)  # decoded once: for the NaN check and the norms
            keep = screen_nonfinite(values, self.nonfinite, f"shard {shard_id}, hookpoint {h}")
            if keep is not None:
                stats[h]["nonfinite_rows"] += int((~keep).sum())
                stored, values = stored[keep], values[keep]
                chunk_col, pos_col, tok_col = chunk_col[keep], pos_col[keep], tok_col[keep]
            writers[h].write(activation_table(stored, chunk_col, pos_col, tok_col, self.storage_dtype))
            stats[h]["rows"] += len(stored)
            stats[h]["sum_norm"] += float(np.linalg.norm(values, axis=-1).sum())

        try:
            for i in range(0, len(token_ids), self.batch_size):
                ids = token_ids[i:i + self.batch_size]
                captured = self.capture(torch.from_numpy(ids).to(self.input_device))
                for h, acts in captured.items():
                    host, event = self._to_host(acts)
                    pending.append(self.io.submit(write_batch, h, host, event, ids, chunk_ids[i:i + self.batch_size]))
                # Keep at most one batch in flight, so host memory stays bounded by two batches.
                while len(pending) > len(captured):
                    pending.pop(0).result()
            for f in pending:
                f.result()
            for w in writers.values():
                w.commit()
        except BaseException:
            for f in pending:
                f.cancel()
            for f in pending:  # let a write already running finish before its file is removed
                if not f.cancelled():
                    f.exception()
            for w in writers.values():
                w.abort()
            raise
        for h, s in stats.items():
            s["sha256"], s["bytes"] = self.store.sha256(s["path"]), self.store.size(s["path"])
        seconds = time.perf_counter() - t0
        record = {"shard_id": shard_id, "start": start, "stop": stop, "tokens": int(token_ids.size),
                  "seconds": seconds, "tokens_per_s": token_ids.size / seconds, "node_id": self.node_id,
                  "plan_hash": self.plan_hash, "hookpoints": stats,
                  # peak resident memory of this actor so far (KiB on Linux): sizing actors needs it
                  "actor_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        self.store.write_json(record_rel(shard_id), record)  # the commit marker: written last
        return record

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = [self.write_shard(int(s), int(a), int(b))
                   for s, a, b in zip(batch["shard_id"], batch["start"], batch["stop"])]
        return {"record": [json.dumps(r) for r in records]}
