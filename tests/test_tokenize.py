"""Tokenising and packing per source shard: the chunks, their determinism, bounded memory, ranged reads."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from actors.generate.models import EOS, build_local_model, byte_level_tokenizer
from actors.store.storage import ActivationStore
from actors.store.tokens import read_chunks
from orchestrator.config import parse_config
from orchestrator.stages.generate import _load_plan, run_generate

from .conftest import REPO
from .test_generate import TWO_LAYERS

FILES = [  # three source shards; file 1 has an empty and a blank document
    [f"file zero, document {i}: " + "abc " * (i % 7) for i in range(40)],
    ["", "   ", "x" * 301] + [f"second file {i}" for i in range(30)],
    [f"third {i} " * 5 for i in range(50)],
]


def write_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for n, docs in enumerate(FILES):
        (folder / f"part-{n}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(folder / "part-*.jsonl")


def config(out, data, num_tokens, num_actors=1, ctx_len=16, shard_tokens=128):
    return parse_config({
        "name": "tok", "output_dir": str(out), "model": {"build": TWO_LAYERS},
        "dataset": {"kind": "files", "path": data},
        "generate": {"hookpoints": ["layers.0.mlp"], "ctx_len": ctx_len, "num_tokens": num_tokens,
                     "shard_tokens": shard_tokens, "batch_size": 4, "num_actors": num_actors},
        "sae": {"architectures": [{"name": "topk", "k": 2}], "widths": [32], "seeds": [0]},
        "train": {"batch_size": 64},
    })


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return str(build_local_model(TWO_LAYERS, 0, tmp_path_factory.mktemp("model") / "model"))


def reference_chunks(tok, ctx_len):
    """The documented rule, written out: per file (each under one batch of documents), non-empty documents each
    followed by EOS, cut into ctx_len chunks, the remainder dropped; files in order."""
    chunks = []
    for docs in FILES:
        ids = [t for d in docs if d.strip() for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
        chunks += [ids[i:i + ctx_len] for i in range(0, len(ids) - ctx_len + 1, ctx_len)]
    return chunks


def test_byte_level_tokens_are_the_bytes():
    tok = byte_level_tokenizer()
    text = "Two words, ünïcode and\n    code = 1\t€"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text and tok.convert_ids_to_tokens(256) == EOS


def test_chunks_follow_the_sources_in_order_and_only_needed_files_are_tokenised(tmp_path, model_folder):
    data = write_files(tmp_path / "data")
    tok = byte_level_tokenizer()
    want = reference_chunks(tok, 16)
    per_file = [len(reference_chunks_of(tok, docs, 16)) for docs in FILES]
    needed = per_file[0] + per_file[1] // 2  # ends inside the second file: the third is never read
    store = ActivationStore(tmp_path / "acts")
    plan = _load_plan(config(tmp_path, data, needed * 16), store, model_folder, None)
    assert [f["path"] for f in plan["token_files"]] == ["tokens/source-00000.parquet", "tokens/source-00001.parquet"]
    assert store.listdir("tokens") == ["source-00000.parquet", "source-00001.parquet"]
    assert read_chunks(store, plan["token_files"], 0, needed).tolist() == want[:needed]
    # Documents behind the used chunks: all of file 0, and file 1's (one batch: all, the two empty ones counted).
    assert plan["corpus"] == {"documents": len(FILES[0]) + len(FILES[1]), "empty_documents": 2}
    # Every planned shard reads back its own chunks, across the file boundary too.
    for s in plan["shards"]:
        assert read_chunks(store, plan["token_files"], s["start"], s["stop"]).tolist() == want[s["start"]:s["stop"]]

    # A lost token file: the plan is made again, identical (so committed shards stay valid).
    store.delete(plan["token_files"][1]["path"])
    assert _load_plan(config(tmp_path, data, needed * 16), store, model_folder, None) == plan
    # Not enough text: a clear error naming the field.
    with pytest.raises(ValueError, match="yields only .* generate.num_tokens asks for"):
        _load_plan(config(tmp_path, data, (len(want) + 1) * 16), ActivationStore(tmp_path / "b"), model_folder, None)


def reference_chunks_of(tok, docs, ctx_len):
    ids = [t for d in docs if d.strip() for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    return [ids[i:i + ctx_len] for i in range(0, len(ids) - ctx_len + 1, ctx_len)]


def test_a_range_read_touches_only_its_row_groups(tmp_path, model_folder, monkeypatch):
    data = write_files(tmp_path / "data")
    store = ActivationStore(tmp_path / "acts")
    plan = _load_plan(config(tmp_path, data, 80 * 16, shard_tokens=8 * 16), store, model_folder, None)
    f0 = plan["token_files"][0]
    groups = pq.ParquetFile(tmp_path / "acts" / f0["path"]).metadata.num_row_groups
    assert groups == -(-f0["chunks"] // 8)  # row groups of one activation shard's chunks
    requested = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, gs, **kw: requested.append(list(gs)) or real(self, gs, **kw))
    everything = read_chunks(store, plan["token_files"], 0, plan["num_chunks"])
    requested.clear()
    got = read_chunks(store, plan["token_files"], 10, 20)  # chunks 10..19 of file 0: row groups 1 and 2
    assert requested == [[1, 2]] and got.tolist() == everything[10:20].tolist()


def test_one_and_two_actors_and_tasks_give_byte_identical_tokens_and_shards(ray_local, tmp_path, model_folder):
    data = write_files(tmp_path / "data")
    tokens = len(reference_chunks(byte_level_tokenizer(), 16)) * 16 - 64
    inline = _load_plan(config(tmp_path / "inline", data, tokens), ActivationStore(tmp_path / "inline"),
                        model_folder, None)  # no Ray: one source shard after another in this process
    manifests = {n: run_generate(config(tmp_path / f"a{n}", data, tokens, num_actors=n)) for n in (1, 2)}
    plans = {n: ActivationStore(m["root"]).read_json("plan.json") for n, m in manifests.items()}
    assert plans[1] == plans[2] and [f["sha256"] for f in plans[1]["token_files"]] == \
        [f["sha256"] for f in inline["token_files"]]  # Ray tasks (4 at a time here) or none: the same files
    sums = {n: [(s["shard_id"], s["sha256"]) for s in m["hookpoints"]["gpt_neox.layers.0.mlp"]["shards"]]
            for n, m in manifests.items()}
    assert sums[1] == sums[2] and len(sums[1]) == len(plans[1]["shards"]) > 2
    assert {s["node_id"] for s in manifests[2]["hookpoints"]["gpt_neox.layers.0.mlp"]["shards"]}  # ran on Ray


def probe(mode, folder, tokens):
    out = subprocess.run([sys.executable, "-m", "tests.memory_probe", mode, str(folder), str(tokens)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("budgets", [(500_000, 4_000_000),
                                     pytest.param((4_000_000, 32_000_000), marks=pytest.mark.slow)])
def test_driver_and_actor_memory_do_not_grow_with_num_tokens(tmp_path, budgets):
    """Peak memory of planning (tokenising tasks run in the driver's process here) and of a model actor at two
    token budgets, each in a fresh process: the peaks, and the memory the work adds above the process's
    baseline, differ by less than 20% (the whole-corpus packing this replaced grew by 100% from 0.5M to 4M)."""
    small, large = budgets
    for mode in ("plan", "actor"):
        a, b = (probe(mode, tmp_path / str(n), n) for n in (small, large))
        assert abs(b["work_peak_rss"] - a["work_peak_rss"]) < 0.2 * a["work_peak_rss"], (a, b)
        grew_a, grew_b = (p["work_peak_rss"] - p["baseline_rss"] for p in (a, b))
        assert grew_b < 1.2 * max(grew_a, 16 * 2**20), (mode, a, b)
