"""Text sources and sparsify-style packing: documents joined with EOS, cut into fixed `ctx_len` chunks.

Sources are Hugging Face `datasets` streams: a Hub dataset, local text/JSONL/Parquet files, or the built-in
synthetic corpus (generated from a seed, so the default experiment needs no network and no data files).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

BATCH_DOCS = 256  # documents packed together; a batch's leftover tokens (under one chunk) are dropped

_SUBJECTS = ["the model", "a neuron", "the river", "my cat", "the old library", "a student", "the committee",
             "every planet", "the compiler", "our team", "the market", "a small bird", "the spectrum"]
_VERBS = ["reads", "predicts", "crosses", "ignores", "computes", "describes", "follows", "builds", "measures",
          "remembers", "sorts", "rejects", "copies"]
_OBJECTS = ["the signal", "a long sentence", "three apples", "the north bridge", "every token", "the report",
            "a quiet song", "the matrix", "two hundred letters", "the last page", "a blue square"]
_TAILS = ["", " today", " at night", " in 1987", " without a sound", " twice", " for the third time",
          " because it rained", " with care"]


def synthetic_documents(seed: int) -> Iterator[dict]:
    """An endless stream of small English-like documents, with numbers and code lines for variety."""
    rng = random.Random(seed)
    doc_id = 0
    while True:
        parts = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            if r < 0.75:
                s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
                parts.append(s[0].upper() + s[1:])
            elif r < 0.9:
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                parts.append(f"{a} + {b} = {a + b}.")
            else:
                var = rng.choice(["x", "total", "count", "idx"])
                parts.append(f"\n    {var} = {var} + {rng.randint(1, 9)}\n")
        yield {"text": " ".join(parts), "doc_id": doc_id}
        doc_id += 1


def load_documents(dataset_cfg):
    """A streaming `datasets.IterableDataset` of documents for the configured source."""
    import datasets

    if dataset_cfg.kind == "synthetic":
        return datasets.IterableDataset.from_generator(synthetic_documents, gen_kwargs={"seed": dataset_cfg.seed})
    if dataset_cfg.kind == "hub":
        return datasets.load_dataset(dataset_cfg.path, dataset_cfg.name, split=dataset_cfg.split,
                                     revision=dataset_cfg.revision, streaming=True)
    suffix = dataset_cfg.path.rsplit(".", 1)[-1]
    builder = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ValueError(f"dataset.path {dataset_cfg.path!r}: unsupported file type; allowed: .txt .jsonl .json .parquet")
    return datasets.load_dataset(builder, data_files=dataset_cfg.path, split=dataset_cfg.split, streaming=True)


def packed_batches(documents, tokenizer, text_column: str, ctx_len: int,
                   batch_docs: int = BATCH_DOCS) -> Iterator[tuple[list[list[int]], int, int]]:
    """(chunks, documents, empty documents) for each batch of `batch_docs` documents of a stream, in order.

    A batch's non-empty documents are tokenised without special tokens, each followed by EOS, concatenated and
    cut into `ctx_len` chunks; the remainder shorter than `ctx_len` is dropped (as sparsify drops each batch's
    last partial chunk), so a batch's chunks depend on its documents alone.
    """
    eos = tokenizer.eos_token_id
    for batch in documents.iter(batch_size=batch_docs):
        texts = batch[text_column]
        kept = [t for t in texts if t and not t.isspace()]
        ids: list[int] = []
        if kept:
            for doc in tokenizer(kept, add_special_tokens=False)["input_ids"]:
                ids += doc
                ids.append(eos)
        n = len(ids) // ctx_len
        yield [ids[i * ctx_len:(i + 1) * ctx_len] for i in range(n)], len(texts), len(texts) - len(kept)


def check_text_column(documents, text_column: str) -> None:
    first = next(iter(documents.take(1)), None)
    if first is not None and text_column not in first:
        raise KeyError(f"text column {text_column!r} not in the dataset; columns: {sorted(first)}")


def pack_chunks(documents, tokenizer, text_column: str, ctx_len: int, num_chunks: int,
                batch_docs: int = BATCH_DOCS, counts: dict | None = None) -> list[list[int]]:
    """The first `num_chunks` chunks of one document stream, in memory (`packed_batches`' rule; a reference for
    tests and small inputs: the generate stage tokenises per source shard with `tokenize_source_shard`).
    `counts`, when given, receives the documents read and the empty ones skipped."""
    counts = {} if counts is None else counts
    counts.update(documents=0, empty_documents=0)
    check_text_column(documents, text_column)
    chunks: list[list[int]] = []
    for batch, docs, empty in packed_batches(documents, tokenizer, text_column, ctx_len, batch_docs):
        chunks += batch[:num_chunks - len(chunks)]
        counts["documents"] += docs
        counts["empty_documents"] += empty
        if len(chunks) == num_chunks:
            return chunks
    raise ValueError(f"the corpus yields only {len(chunks) * ctx_len} tokens in {ctx_len}-token chunks; "
                     f"generate.num_tokens asks for {num_chunks * ctx_len}")


def source_shard_documents(dataset_cfg, source_shard: int):
    """The documents of one source shard (a file of a Hub or file dataset; the synthetic corpus has one)."""
    documents = load_documents(dataset_cfg)
    n = documents.num_shards
    if not 0 <= source_shard < n:
        raise IndexError(f"source shard {source_shard} of a dataset with {n}")
    return documents if n == 1 else documents.shard(num_shards=n, index=source_shard)


def tokenize_source_shard(dataset_cfg, tokenizer_path: str, revision: str | None, trust_remote_code: bool,
                          ctx_len: int, max_chunks: int, source_shard: int, store_uri: str,
                          row_group_chunks: int, batch_docs: int = BATCH_DOCS) -> dict:
    """Tokenise and pack one source shard into `tokens/source-NNNNN.parquet`, stopping after `max_chunks`.

    Memory is one batch of documents plus one row group, whatever the shard's size. Returns the file's entry
    (path, chunks, sha256, bytes) and `batches`: cumulative (chunks, documents, empty documents) after each
    batch of documents, from which the planner counts the documents behind the chunks it uses.
    """
    from ..store.storage import ActivationStore
    from ..store.tokens import token_file_rel, token_schema, token_table
    from .models import load_tokenizer

    store = ActivationStore(store_uri)
    tokenizer = load_tokenizer(tokenizer_path, revision, trust_remote_code)
    documents = source_shard_documents(dataset_cfg, source_shard)
    rel = token_file_rel(source_shard)
    writer = store.open_parquet_writer(rel, token_schema(ctx_len), compression="zstd")
    buffer: list[list[int]] = []
    chunks = docs = empty = 0
    batches: list[tuple[int, int, int]] = []
    try:
        for batch, n_docs, n_empty in packed_batches(documents, tokenizer, dataset_cfg.text_column, ctx_len,
                                                     batch_docs):
            batch = batch[:max_chunks - chunks]
            buffer += batch
            chunks, docs, empty = chunks + len(batch), docs + n_docs, empty + n_empty
            batches.append((chunks, docs, empty))
            while len(buffer) >= row_group_chunks:
                writer.write(token_table(buffer[:row_group_chunks], ctx_len))
                del buffer[:row_group_chunks]
            if chunks >= max_chunks:
                break
        if buffer:
            writer.write(token_table(buffer, ctx_len))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {"source_shard": source_shard, "path": rel, "chunks": chunks, "sha256": store.sha256(rel),
            "bytes": store.size(rel), "batches": batches}
