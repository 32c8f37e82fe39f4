"""Tokenising and packing the corpus for the generate stage: one Ray task per source shard, a small plan.

The corpus's source shards are the files of a Hub or file dataset, in the dataset's order (the synthetic corpus
is one endless shard). Each task packs its shard (`actors.generate.corpus.tokenize_source_shard`, sparsify-style
batches of documents) into its own token file and stops after `num_chunks` chunks, so a file's bytes depend on the
config alone, never on how many tasks, actors or nodes run. The run's chunks are the first `num_chunks` of the
files taken in order. Tasks are started in source order, a few at a time, until the finished ones hold enough
chunks; the files past what the run needs are deleted. The driver holds only each file's counts: its memory does
not grow with `generate.num_tokens`, and neither does a task's (one batch of documents and one row group).
"""

from __future__ import annotations

import logging

import ray

from actors.generate.corpus import check_text_column, load_documents, tokenize_source_shard
from actors.store.storage import ActivationStore

log = logging.getLogger(__name__)


def tokenize_corpus(cfg, store: ActivationStore, tokenizer_path: str, revision: str | None,
                    num_chunks: int, row_group_chunks: int) -> tuple[list[dict], dict]:
    """(token files the run uses, in order, each with path, chunks, sha256, bytes; corpus counts: documents read
    and empty ones skipped, up to the batch that completes the last chunk)."""
    documents = load_documents(cfg.dataset)
    check_text_column(documents, cfg.dataset.text_column)  # a clear error on the driver, before any task
    sources = documents.num_shards
    args = dict(dataset_cfg=cfg.dataset, tokenizer_path=tokenizer_path, revision=revision,
                trust_remote_code=cfg.model.trust_remote_code, ctx_len=cfg.generate.ctx_len, max_chunks=num_chunks,
                store_uri=store.uri, row_group_chunks=row_group_chunks)
    results = _run_in_source_order(args, sources, num_chunks)
    used, corpus, total = [], {"documents": 0, "empty_documents": 0}, 0
    for source in range(len(results)):
        r = results[source]
        if total >= num_chunks:
            store.delete(r["path"])  # tokenised by a task already in flight, not needed
            continue
        need = num_chunks - total
        # Documents behind the chunks used: every batch up to the one holding this file's last used chunk.
        if r["chunks"] >= need:
            _, docs, empty = next(b for b in r["batches"] if b[0] >= need)
        else:
            _, docs, empty = r["batches"][-1] if r["batches"] else (0, 0, 0)
        corpus["documents"] += docs
        corpus["empty_documents"] += empty
        total += r["chunks"]
        used.append({k: r[k] for k in ("path", "chunks", "sha256", "bytes")})
    if total < num_chunks:
        g = cfg.generate
        raise ValueError(f"the corpus yields only {total * g.ctx_len} tokens in {g.ctx_len}-token chunks; "
                         f"generate.num_tokens asks for {num_chunks * g.ctx_len}")
    return used, corpus


def _run_in_source_order(args: dict, sources: int, num_chunks: int) -> dict[int, dict]:
    """Results of the tasks for source shards 0, 1, ... started in order until the finished ones hold
    `num_chunks` (every shard started before that point finishes too). Under Ray, as many at a time as the cluster
    has CPUs; without it (tests, benchmarks), one after another in this process: the same files either way."""
    results: dict[int, dict] = {}

    def enough() -> bool:
        return sum(r["chunks"] for r in results.values()) >= num_chunks

    if not ray.is_initialized():
        for source in range(sources):
            if enough():
                break
            results[source] = tokenize_source_shard(source_shard=source, **args)
        return results
    task = ray.remote(num_cpus=1, max_retries=3)(tokenize_source_shard)
    width = max(1, int(ray.cluster_resources().get("CPU", 1)))
    in_flight, started = {}, 0
    while True:
        while len(in_flight) < width and started < sources and not enough():
            in_flight[task.remote(source_shard=started, **args)] = started
            started += 1
        if not in_flight:
            return results
        [done], _ = ray.wait(list(in_flight), num_returns=1)
        source = in_flight.pop(done)
        results[source] = ray.get(done)
        log.info("generate: tokenised source shard %d of %d (%d chunks)", source + 1, sources,
                 results[source]["chunks"])
