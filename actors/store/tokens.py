"""The packed-token format: one Parquet file per source shard of the corpus, one row per `ctx_len`-token chunk.

Global chunk ids follow the files in source-shard order: file 0's rows are chunks 0.., file 1's continue where
file 0's end. A file holds no chunk ids of its own, so its bytes depend only on its source shard and the config.
Files are written in row groups of about one activation shard, so a reader of one chunk range reads only the row
groups that hold it, never a whole file.
"""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import ActivationStore

TOKENS_DIR = "tokens"
TOKEN_COLUMN = "input_ids"


def token_file_rel(source_shard: int) -> str:
    return f"{TOKENS_DIR}/source-{source_shard:05d}.parquet"


def token_schema(ctx_len: int) -> pa.Schema:
    return pa.schema([pa.field(TOKEN_COLUMN, pa.list_(pa.int32(), ctx_len))])


def token_table(chunks: list[list[int]], ctx_len: int) -> pa.Table:
    flat = np.asarray(chunks, dtype=np.int32).reshape(-1)
    return pa.Table.from_arrays([pa.FixedSizeListArray.from_arrays(pa.array(flat), ctx_len)],
                                schema=token_schema(ctx_len))


def _offsets(token_files: list[dict]) -> list[int]:
    """Global id of each file's first chunk, then the total."""
    out = [0]
    for f in token_files:
        out.append(out[-1] + f["chunks"])
    return out


def read_chunks(store: ActivationStore, token_files: list[dict], start: int, stop: int) -> np.ndarray:
    """Chunks [start, stop) as an int64 [stop - start, ctx_len] array, reading only the row groups holding them.

    `token_files` lists the plan's files in order, each with its `path` and the number of `chunks` it holds.
    """
    offsets = _offsets(token_files)
    if not 0 <= start <= stop <= offsets[-1]:
        raise ValueError(f"chunks [{start}, {stop}) are outside the {offsets[-1]} planned chunks")
    parts = []
    i = bisect.bisect_right(offsets, start) - 1
    while start < stop:
        lo, hi = start - offsets[i], min(stop, offsets[i + 1]) - offsets[i]
        if hi > lo:
            parts.append(_read_rows(store, token_files[i]["path"], lo, hi))
        start = offsets[i] + hi
        i += 1
    if not parts:
        return np.zeros((0, 0), dtype=np.int64)
    return np.concatenate(parts).astype(np.int64)


def _read_rows(store: ActivationStore, rel: str, lo: int, hi: int) -> np.ndarray:
    with store.fs.open_input_file(store.path(rel)) as f:
        pf = pq.ParquetFile(f)
        ctx_len = pf.schema_arrow.field(TOKEN_COLUMN).type.list_size
        first_row, groups, group_start = 0, [], None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first_row < hi and first_row + n > lo:
                groups.append(g)
                group_start = first_row if group_start is None else group_start
            first_row += n
        table = pf.read_row_groups(groups, columns=[TOKEN_COLUMN])
    col = table.column(TOKEN_COLUMN).combine_chunks().slice(lo - group_start, hi - lo)
    return col.flatten().to_numpy().reshape(-1, ctx_len)
