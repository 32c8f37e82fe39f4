"""Where activations live: a local folder or an object-store URI (s3://, gs://, file://), through `pyarrow.fs`.

Every node of a cluster opens the same URI, so a shard one node wrote is readable on every other. A file is
written under a temporary name and moved into place only when complete: a rename on a local or network
filesystem; on an object store the move is a copy of a finished object, and what marks a shard as committed
is its small record file, written last in one request (see `orchestrator/stages/generate.py`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class ActivationStore:
    """A root folder on some pyarrow filesystem; every method takes a path relative to that root."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        if "://" in self.uri:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(self.uri).resolve())
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"ActivationStore({self.uri!r})"

    def __reduce__(self):  # filesystems are rebuilt from the URI on the worker that unpickles the store
        return ActivationStore, (self.uri,)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def display(self, rel: str) -> str:
        """The full location of a file, for error messages."""
        return f"{self.uri.rstrip('/')}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int | None:
        """Bytes of a file; None if it does not exist."""
        info = self.fs.get_file_info(self.path(rel))
        return None if info.type == pafs.FileType.NotFound else info.size

    def delete(self, rel: str) -> None:
        """Remove a file if it exists."""
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Base names of the files directly under `rel` (empty if it does not exist)."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector) if info.is_file)

    def _tmp(self, rel: str) -> str:
        """A fresh temporary name beside `rel`, whose folder is created if needed."""
        parent, _, name = rel.rpartition("/")
        self.fs.create_dir(self.path(parent) if parent else self.root, recursive=True)
        return self.path(f"{parent + '/' if parent else ''}.{name}.{uuid.uuid4().hex}.tmp")

    def _commit(self, tmp: str, rel: str) -> None:
        self.fs.move(tmp, self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        tmp = self._tmp(rel)
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self._commit(tmp, rel)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_buffer(self, rel: str) -> pa.Buffer:
        """A whole file as one Arrow buffer (no copy into Python bytes)."""
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read_buffer()

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table, **parquet_options) -> None:
        tmp = self._tmp(rel)
        pq.write_table(table, tmp, filesystem=self.fs, **parquet_options)
        self._commit(tmp, rel)

    def open_parquet_writer(self, rel: str, schema: pa.Schema, **parquet_options) -> "AtomicParquetWriter":
        return AtomicParquetWriter(self, rel, schema, **parquet_options)

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), columns=columns, filesystem=self.fs)

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(rel)) as f:
            while block := f.read(1 << 22):
                h.update(block)
        return h.hexdigest()


class AtomicParquetWriter:
    """A Parquet file written one row group at a time under a temporary name, moved into place on `commit`."""

    def __init__(self, store: ActivationStore, rel: str, schema: pa.Schema, **parquet_options):
        self.store, self.rel, self.tmp = store, rel, store._tmp(rel)
        self.writer = pq.ParquetWriter(self.tmp, schema, filesystem=store.fs, **parquet_options)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def commit(self) -> None:
        self.writer.close()
        self.store._commit(self.tmp, self.rel)

    def abort(self) -> None:
        self.writer.close()
        self.store.fs.delete_file(self.tmp)
