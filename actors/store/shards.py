"""The activation shard format shared by the generate stage (which writes it) and training (which reads it).

One Parquet file per hookpoint and shard: provenance columns (chunk, position, token) and a fixed-size activation
vector; bfloat16 is kept as its raw bits. A shard's JSON record, written last, commits it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import BadInputError
from .storage import ActivationStore

REMEDY = "re-run the same command: the generate stage verifies every shard and rewrites missing or damaged ones"

ACTIVATION_COLUMN = "activation"
_DTYPE_KEY = b"sae_seeds.dtype"  # field metadata: how to read the activation column back
_ARROW_VALUE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


# Activations are noise-like floats: dictionary encoding, compression and statistics cost time on both ends
# and save almost nothing (measured: reading a 100 MB shard 2.5 s with pyarrow's defaults, 0.5 s without).
_PROVENANCE = ["chunk_id", "position", "token_id"]
PARQUET_OPTIONS = {"use_dictionary": _PROVENANCE, "write_statistics": _PROVENANCE,
                   "compression": {**{c: "snappy" for c in _PROVENANCE}, f"{ACTIVATION_COLUMN}.list.item": "none"}}


def shard_rel(hookpoint: str, shard_id: int) -> str:
    return f"{hookpoint}/shard-{shard_id:05d}.parquet"


def record_rel(shard_id: int) -> str:
    return f"shards/shard-{shard_id:05d}.json"


def activation_schema(d_in: int, dtype: str) -> pa.Schema:
    """Rows are tokens: provenance (chunk, position, token) plus a fixed-size activation vector.

    bfloat16 has no Arrow type; its bit patterns are stored as uint16, which keeps them exactly.
    """
    value = pa.field("item", _ARROW_VALUE[dtype])
    return pa.schema([
        pa.field("chunk_id", pa.int64()),
        pa.field("position", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field(ACTIVATION_COLUMN, pa.list_(value, d_in), metadata={_DTYPE_KEY: dtype.encode()}),
    ])


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """[rows, d] tensor on the CPU -> numpy in the storage layout (bfloat16 as its raw bits)."""
    if dtype == "bfloat16":
        return acts.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return acts.to(getattr(torch, dtype)).numpy()


def from_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> float32 (exact: every float16 and bfloat16 value is a float32 value)."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def activation_table(stored: np.ndarray, chunk_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray,
                     dtype: str) -> pa.Table:
    d = stored.shape[-1]
    return pa.Table.from_arrays([
        pa.array(chunk_ids.astype(np.int64)),
        pa.array(positions.astype(np.int32)),
        pa.array(token_ids.astype(np.int32)),
        pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), d),
    ], schema=activation_schema(d, dtype))


def decode_activation_column(table: pa.Table) -> np.ndarray:
    field = table.schema.field(ACTIVATION_COLUMN)
    dtype = (field.metadata or {}).get(_DTYPE_KEY, b"float32").decode()
    col = table.column(ACTIVATION_COLUMN).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    return from_storage(values, dtype).reshape(-1, col.type.list_size)


def read_activations(store: ActivationStore, rel: str, expected_sha256: str | None = None) -> np.ndarray:
    """[rows, d_in] float32; checks the file against the manifest's checksum when given. A missing or damaged
    shard is a `BadInputError` (a retry would read the same bytes) naming the file and the remedy."""
    if not store.exists(rel):
        raise BadInputError(f"activation shard {store.display(rel)} is missing; {REMEDY}")
    if expected_sha256 is None:
        return decode_activation_column(store.read_table(rel, columns=[ACTIVATION_COLUMN]))
    # One read: the bytes checked are the bytes decoded, and an object store sends the shard once, not twice.
    data = store.read_buffer(rel)
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise BadInputError(f"activation shard {store.display(rel)} does not match its manifest checksum "
                            f"(expected sha256 {expected_sha256[:12]}...): damaged or replaced; {REMEDY}")
    return decode_activation_column(pq.read_table(pa.BufferReader(data), columns=[ACTIVATION_COLUMN]))


MANIFEST = "manifest.json"


def locate_manifest(manifest: dict, root: str, model_path: str | None = None) -> dict:
    """The generate manifest with this run's locations filled in: on disk its paths are relative to the store
    holding it (so a moved or copied output folder reads its own files); `model_path` is where this run's model
    is, when the caller knows it."""
    located = manifest | {"root": root}
    if model_path is not None:
        located["model"] = manifest["model"] | {"path": model_path}
    return located


def read_manifest(root: str, model_path: str | None = None) -> dict:
    return locate_manifest(ActivationStore(root).read_json(MANIFEST), root, model_path)


HELD_OUT_MAX_FRACTION = 1 / 8  # of a source's rows: small data keeps most of its rows for training


def held_out_rows(total_rows: int, eval_tokens: int) -> int:
    """Rows at the tail of a source held out from training, for evaluation: `eval_tokens`, at most an eighth."""
    return max(1, min(eval_tokens, int(total_rows * HELD_OUT_MAX_FRACTION)))


def shard_files(records: dict[int, dict]) -> list[tuple[int, dict]]:
    """(shard id, the record's entry for one hookpoint file: path, sha256, bytes) for every file of every shard."""
    return [(sid, entry) for sid, r in sorted(records.items()) for entry in r["hookpoints"].values()]


def file_problem(store: ActivationStore, entry: dict, mode: str) -> str | None:
    size = store.size(entry["path"])
    if size is None:
        return "missing"
    if entry.get("bytes") is not None and size != entry["bytes"]:
        return f"{size} bytes, recorded {entry['bytes']}"
    if mode == "sha256" and store.sha256(entry["path"]) != entry["sha256"]:
        return "sha256 differs from its record"
    return None


def verify_shards(store: ActivationStore, records: dict[int, dict], mode: str) -> dict[int, list[str]]:
    """Shards whose files are missing or differ from their records: {shard id: ['path: problem', ...]}."""
    files = shard_files(records)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="verify") as pool:
        problems = list(pool.map(lambda f: file_problem(store, f[1], mode), files))
    damaged: dict[int, list[str]] = {}
    for (sid, entry), problem in zip(files, problems):
        if problem:
            damaged.setdefault(sid, []).append(f"{entry['path']}: {problem}")
    return damaged
