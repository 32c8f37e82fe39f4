"""Activation actors: one model per actor, forward hooks at the hookpoints, one Parquet file per shard.

The Ray Data pipeline hands each actor one shard descriptor at a time (`shard_id`, chunk range); the actor
reads those token chunks, runs the model, and commits one Parquet file per hookpoint with an atomic rename.
Every file is committed whole (temp file, then rename), so an interrupted run never leaves a partial shard
that looks valid; the stage is reused as a whole once its manifest is written.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .models import load_model, resolve_hookpoints

ACTIVATION_COLUMN = "activation"
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def shard_path(root: Path, hookpoint: str, shard_id: int) -> Path:
    return Path(root) / hookpoint / f"shard-{shard_id:05d}.parquet"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def activation_table(acts: np.ndarray, chunk_ids: np.ndarray, token_ids: np.ndarray) -> pa.Table:
    """Rows are tokens: provenance (chunk, position, token) plus a fixed-size activation vector."""
    n_chunks, ctx_len = token_ids.shape
    d = acts.shape[-1]
    flat = pa.array(acts.reshape(-1))
    return pa.table({
        "chunk_id": pa.array(np.repeat(chunk_ids, ctx_len).astype(np.int64)),
        "position": pa.array(np.tile(np.arange(ctx_len, dtype=np.int32), n_chunks)),
        "token_id": pa.array(token_ids.reshape(-1).astype(np.int32)),
        ACTIVATION_COLUMN: pa.FixedSizeListArray.from_arrays(flat, d),
    })


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_activations(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """[rows, d_in] float32; checks the file against the manifest's checksum when given."""
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise ValueError(f"activation shard {path} does not match its manifest checksum: corrupt or replaced")
    col = pq.read_table(path, columns=[ACTIVATION_COLUMN]).column(ACTIVATION_COLUMN).combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, d)


class ActivationShardWriter:
    """Ray Data callable class: `__init__` loads the model once per actor, `__call__` writes shards."""

    def __init__(self, model_path: str, revision: str | None, model_dtype: str, trust_remote_code: bool,
                 hookpoints: list[str], tokens_path: str, out_dir: str, storage_dtype: str, batch_size: int):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_path, revision, model_dtype, trust_remote_code, self.device)
        self.hookpoints = resolve_hookpoints(self.model, hookpoints)
        self.modules = dict(self.model.named_modules())
        self.tokens = pq.read_table(tokens_path)
        self.out_dir = Path(out_dir)
        self.storage_dtype = STORAGE_DTYPES[storage_dtype]
        self.batch_size = batch_size
        import ray

        # The node that wrote each shard goes into the manifest, so where a multi-node run worked is checkable.
        self.node_id = ray.get_runtime_context().get_node_id()

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
        captured: dict[str, torch.Tensor] = {}

        def hook(name):
            def fn(_module, _inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                captured[name] = out.detach()
            return fn

        handles = [self.modules[h].register_forward_hook(hook(h)) for h in self.hookpoints]
        try:
            self.model(input_ids.to(self.device))
        finally:
            for handle in handles:
                handle.remove()
        return {h: captured[h].float().cpu().numpy().astype(self.storage_dtype) for h in self.hookpoints}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("shard_id", "hookpoint", "path", "rows", "sha256", "sum_norm", "d_in",
                                                "node_id")}
        from ray.experimental.tqdm_ray import tqdm  # renders on the driver's terminal

        for shard_id, start, stop in zip(batch["shard_id"], batch["start"], batch["stop"]):
            rows = self.tokens.slice(int(start), int(stop) - int(start))
            chunk_ids = rows.column("chunk_id").to_numpy()
            token_ids = np.stack(rows.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
            # One bar per shard, closed once the shard is committed: an open bar would be redrawn on the driver's
            # terminal for as long as the actor lives (through the later stages).
            progress = tqdm(desc=f"generate shard {int(shard_id)}", unit="tok", total=int(token_ids.size))
            pieces: dict[str, list[np.ndarray]] = {h: [] for h in self.hookpoints}
            for i in range(0, len(token_ids), self.batch_size):
                for h, a in self._forward(torch.from_numpy(token_ids[i:i + self.batch_size])).items():
                    pieces[h].append(a)
                progress.update(int(token_ids[i:i + self.batch_size].size))
            for h in self.hookpoints:
                acts = np.concatenate(pieces[h])
                path = shard_path(self.out_dir, h, int(shard_id))
                write_parquet_atomic(activation_table(acts, chunk_ids, token_ids), path)
                out["shard_id"].append(int(shard_id))
                out["hookpoint"].append(h)
                out["path"].append(str(path.relative_to(self.out_dir)))
                out["rows"].append(int(token_ids.size))
                out["sha256"].append(file_sha256(path))
                out["sum_norm"].append(float(np.linalg.norm(acts.reshape(-1, acts.shape[-1]).astype(np.float32), axis=-1).sum()))
                out["d_in"].append(int(acts.shape[-1]))
                out["node_id"].append(self.node_id)
            progress.close()
        return out
