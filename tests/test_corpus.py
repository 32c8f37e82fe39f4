"""Corpus loading and sparsify-style packing, on local files and the synthetic corpus (no network)."""

import pytest

from actors.generate.corpus import load_documents, pack_chunks
from actors.generate.models import EOS, byte_level_tokenizer
from orchestrator.config import DatasetConfig


def test_packing_joins_documents_with_eos_and_skips_empty(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "abc"}\n{"text": ""}\n{"text": "defgh"}\n{"text": "ij"}\n')
    tok = byte_level_tokenizer()
    docs = load_documents(DatasetConfig(kind="files", path=str(path)))
    chunks = pack_chunks(docs, tok, "text", ctx_len=4, num_chunks=3)
    eos = tok.eos_token_id
    stream = [c for doc in ("abc", "defgh", "ij") for c in tok(doc)["input_ids"] + [eos]]
    assert chunks == [stream[0:4], stream[4:8], stream[8:12]]
    assert tok.decode(chunks[0]) == "abc" + EOS


def test_not_enough_text_and_missing_column_are_clear_errors(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("one line\nanother line\n")
    tok = byte_level_tokenizer()
    docs = load_documents(DatasetConfig(kind="files", path=str(path)))
    with pytest.raises(ValueError, match="yields only"):
        pack_chunks(docs, tok, "text", ctx_len=8, num_chunks=100)
    with pytest.raises(KeyError, match="'body' not in the dataset; columns: \\['text'\\]"):
        pack_chunks(docs, tok, "body", ctx_len=8, num_chunks=1)


def test_synthetic_corpus_is_deterministic():
    tok = byte_level_tokenizer()
    a = pack_chunks(load_documents(DatasetConfig(seed=3)), tok, "text", 32, 20)
    b = pack_chunks(load_documents(DatasetConfig(seed=3)), tok, "text", 32, 20)
    c = pack_chunks(load_documents(DatasetConfig(seed=4)), tok, "text", 32, 20)
    assert a == b and a != c
