"""Text sources and sparsify-style packing: documents joined with EOS, cut into fixed `ctx_len` chunks.

Sources are Hugging Face `datasets` streams: a Hub dataset, local text/JSONL/Parquet files, or the built-in
synthetic corpus (generated from a seed, so the default experiment needs no network and no data files).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

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


def pack_chunks(documents, tokenizer, text_column: str, ctx_len: int, num_chunks: int,
                batch_docs: int = 256, counts: dict | None = None) -> list[list[int]]:
    """The first `num_chunks` chunks of `ctx_len` tokens; empty documents are skipped.

    As in sparsify, each batch of documents is joined with EOS and the remainder shorter than `ctx_len` is
    dropped, so a chunk never depends on how later documents tokenise. `counts`, when given, receives the
    documents read and the empty ones skipped.
    """
    counts = {} if counts is None else counts
    counts.update(documents=0, empty_documents=0)
    first = next(iter(documents.take(1)), None)
    if first is not None and text_column not in first:
        raise KeyError(f"text column {text_column!r} not in the dataset; columns: {sorted(first)}")
    eos = tokenizer.eos_token_id

    def pack(batch):
        ids: list[int] = []
        for text in batch[text_column]:
            counts["documents"] += 1
            if text and not text.isspace():
                ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            else:
                counts["empty_documents"] += 1
        n = len(ids) // ctx_len
        return {"input_ids": [ids[i * ctx_len:(i + 1) * ctx_len] for i in range(n)]}

    packed = documents.map(pack, batched=True, batch_size=batch_docs, remove_columns=list(first or {}))
    chunks = [row["input_ids"] for row in packed.take(num_chunks)]
    if len(chunks) < num_chunks:
        raise ValueError(
            f"the corpus yields only {len(chunks) * ctx_len} tokens in {ctx_len}-token chunks; "
            f"generate.num_tokens asks for {num_chunks * ctx_len}"
        )
    return chunks
