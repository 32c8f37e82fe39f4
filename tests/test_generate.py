"""The generate stage: shard plan, one-pass multi-hookpoint capture, exact storage, resumption, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actors.generate.activations import ActivationShardWriter, HookpointCapture, screen_nonfinite
from actors.store.shards import from_storage, read_activations, to_storage
from actors.train.data import ActivationStream
from actors.generate.models import build_local_model, load_model
from actors.store.storage import ActivationStore
from actors.store.tokens import read_chunks
from orchestrator.config import parse_config
from orchestrator.stages.generate import _load_plan, activation_uri, run_generate

from .conftest import REPO
from .fault_hooks import runtime_env

TWO_LAYERS = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64}


def config(out, **generate):
    return parse_config({
        "name": "gen", "output_dir": str(out),
        "model": {"build": TWO_LAYERS},
        "generate": {"hookpoints": ["layers.0.mlp"], "ctx_len": 32, "num_tokens": 4096, "shard_tokens": 512,
                     "batch_size": 4, "num_actors": 1} | generate,
        "sae": {"architectures": [{"name": "topk", "k": 2}], "widths": [32], "seeds": [0]},
        "train": {"batch_size": 64},  # at most the smallest num_tokens here
    })


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_local_model(TWO_LAYERS, 0, tmp_path_factory.mktemp("model") / "model")


def write_shards(model_folder, store_uri, hookpoints, plan, dtype="float32", model_dtype="float32", nonfinite="fail",
                 folder=None):
    writer = ActivationShardWriter(str(folder or model_folder), None, model_dtype, False, None, hookpoints, store_uri,
                                   dtype, 4, nonfinite, plan["generate_hash"])
    return [writer.write_shard(s["shard_id"], s["start"], s["stop"]) for s in plan["shards"]]


def test_shard_plan_depends_only_on_the_config(tmp_path, model_folder):
    cfg = config(tmp_path / "a")
    store = ActivationStore(activation_uri(cfg))
    plan = _load_plan(cfg, store, str(model_folder), None)
    again = _load_plan(config(tmp_path / "b"), ActivationStore(tmp_path / "b" / "acts"), str(model_folder), None)
    assert plan == again  # same chunks (checksum of the token table) in the same shards
    covered = [c for s in plan["shards"] for c in range(s["start"], s["stop"])]
    assert covered == list(range(plan["num_chunks"])) and plan["num_chunks"] == 4096 // 32
    assert len(plan["shards"]) == 4096 // 512
    other = _load_plan(config(tmp_path / "c", num_tokens=2048).model_copy(
        update={"dataset": cfg.dataset.model_copy(update={"seed": 1})}), ActivationStore(tmp_path / "c"),
        str(model_folder), None)
    assert other["tokens_sha256"] != plan["tokens_sha256"]
    assert store.exists("plan.json") and all(store.exists(f["path"]) for f in plan["token_files"])


def copy_tokens(src, dst, plan):
    """Another store with the same plan and token files (the actors read the plan's token files)."""
    a, b = ActivationStore(src), ActivationStore(dst)
    for rel in ["plan.json"] + [f["path"] for f in plan["token_files"]]:
        b.write_bytes(rel, a.read_bytes(rel))


def all_chunks(store, plan):
    return read_chunks(store, plan["token_files"], 0, plan["num_chunks"])


def test_one_pass_over_several_hookpoints_equals_separate_runs_and_stops_early(tmp_path, model_folder):
    cfg = config(tmp_path, num_tokens=1024)
    plan = _load_plan(cfg, ActivationStore(tmp_path / "both"), str(model_folder), None)
    for name in ("one", "two"):
        copy_tokens(tmp_path / "both", tmp_path / name, plan)
    both = write_shards(model_folder, str(tmp_path / "both"), ["layers.0.mlp", "gpt_neox.layers.1"], plan)
    one = write_shards(model_folder, str(tmp_path / "one"), ["layers.0.mlp"], plan)
    two = write_shards(model_folder, str(tmp_path / "two"), ["gpt_neox.layers.1"], plan)
    for b, o, t in zip(both, one, two):
        assert b["hookpoints"]["gpt_neox.layers.0.mlp"]["sha256"] == o["hookpoints"]["gpt_neox.layers.0.mlp"]["sha256"]
        assert b["hookpoints"]["gpt_neox.layers.1"]["sha256"] == t["hookpoints"]["gpt_neox.layers.1"]["sha256"]

    # Early stop: nothing after the deepest hookpoint runs (the final norm and the LM head never fire).
    model = load_model(str(model_folder), None, "float32", False, "cpu")
    calls = []
    model.gpt_neox.final_layer_norm.register_forward_hook(lambda *a: calls.append("norm"))
    capture = HookpointCapture(model, ["layers.*.mlp"])
    assert capture.hookpoints == ["gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp"]
    ids = torch.randint(0, 256, (2, 16))
    got = capture(ids)
    assert calls == []
    with torch.inference_mode():  # the captured values are those of a full forward pass
        full = {}
        hooks = [model.get_submodule(h).register_forward_hook(lambda m, i, o, h=h: full.setdefault(h, o))
                 for h in capture.hookpoints]
        model(ids)
    assert all(torch.equal(got[h], full[h]) for h in capture.hookpoints) and calls == ["norm"]
    for hook in hooks:
        hook.remove()

    # Provenance: every row names its chunk, position and token, in order.
    table = pq.read_table(tmp_path / "both" / "gpt_neox.layers.0.mlp" / "shard-00001.parquet")
    tokens = all_chunks(ActivationStore(tmp_path / "both"), plan)
    s = plan["shards"][1]
    assert table.column("chunk_id").to_pylist() == np.repeat(np.arange(s["start"], s["stop"]), 32).tolist()
    assert table.column("position").to_pylist() == np.tile(np.arange(32), s["stop"] - s["start"]).tolist()
    expected_tokens = tokens[s["start"]:s["stop"]].reshape(-1)
    assert table.column("token_id").to_pylist() == expected_tokens.tolist()


def test_device_map_loading_gives_the_same_shards(tmp_path, model_folder):
    """generate.device_map goes through transformers + accelerate; on CPU ("cpu") it must change nothing."""
    cfg = config(tmp_path, num_tokens=256)
    plan = _load_plan(cfg, ActivationStore(tmp_path / "a"), str(model_folder), None)
    copy_tokens(tmp_path / "a", tmp_path / "b", plan)
    records = []
    for name, device_map in (("a", None), ("b", "cpu")):
        writer = ActivationShardWriter(str(model_folder), None, "float32", False, device_map, ["layers.1"],
                                       str(tmp_path / name), "float32", 4, "fail", plan["generate_hash"])
        records.append(writer.write_shard(0, 0, plan["num_chunks"]))
    assert records[0]["hookpoints"] == records[1]["hookpoints"]


def test_unknown_hookpoint_fails_before_any_compute_and_names_close_modules(tmp_path):
    cfg = config(tmp_path, hookpoints=["layers.0.mlpp"])
    with pytest.raises(ValueError, match=r"'layers.0.mlpp' matches no module; closest module names: .*layers.0.mlp"):
        run_generate(cfg)  # no Ray needed: it fails before the plan and the actor pool
    store = ActivationStore(activation_uri(cfg))
    assert not store.exists("plan.json") and store.listdir("tokens") == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_is_exact(tmp_path, model_folder, dtype):
    torch_dtype = getattr(torch, dtype)
    x = (torch.randn(64, 24) * 10).to(torch_dtype)
    x[0, :3] = torch.tensor([65504.0, -0.0, 1e-7]).to(torch_dtype)
    assert torch.equal(torch.from_numpy(from_storage(to_storage(x, dtype), dtype)), x.float())

    # End to end: a model run in that dtype, stored in it, reads back equal to its hookpoint output.
    cfg = config(tmp_path, num_tokens=256)
    store = ActivationStore(tmp_path / "acts")
    plan = _load_plan(cfg, store, str(model_folder), None)
    [record] = write_shards(model_folder, str(tmp_path / "acts"), ["layers.1"], plan, dtype=dtype, model_dtype=dtype)
    got = read_activations(store, record["hookpoints"]["gpt_neox.layers.1"]["path"],
                           record["hookpoints"]["gpt_neox.layers.1"]["sha256"])
    model = load_model(str(model_folder), None, dtype, False, "cpu")
    ids = torch.from_numpy(all_chunks(store, plan))
    want = torch.cat([HookpointCapture(model, ["layers.1"])(ids[i:i + 4])["gpt_neox.layers.1"]
                      for i in range(0, len(ids), 4)])
    assert got.dtype == np.float32 and torch.equal(torch.from_numpy(got), want.float().reshape(-1, 32))


def test_nonfinite_rows_are_counted_and_fail_or_drop(tmp_path, model_folder):
    stored = np.ones((5, 3), dtype=np.float32)
    stored[1, 2], stored[3, 0] = np.nan, np.inf
    assert screen_nonfinite(stored, "drop", "x").tolist() == [True, False, True, False, True]
    assert screen_nonfinite(np.ones((2, 3), np.float32), "fail", "x") is None
    with pytest.raises(ValueError, match="shard 7, hookpoint h: 2 activation rows contain NaN or inf"):
        screen_nonfinite(stored, "fail", "shard 7, hookpoint h")

    # A model whose embedding of one byte is NaN: every row from that token on (attention spreads it) is bad.
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    cfg = config(tmp_path, num_tokens=512)
    store = ActivationStore(tmp_path / "acts")
    plan = _load_plan(cfg, store, str(broken), None)
    ids = all_chunks(store, plan)
    poisoned = int(ids[0, 5])
    weights = load_file(broken / "model.safetensors")
    weights["gpt_neox.embed_in.weight"][poisoned] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    model = load_model(str(broken), None, "float32", False, "cpu")
    direct = HookpointCapture(model, ["layers.0.mlp"])(torch.from_numpy(ids))["gpt_neox.layers.0.mlp"]
    seen = ~torch.isfinite(direct).all(-1).numpy()  # the rows a direct forward pass makes non-finite
    assert 0 < seen.sum() < seen.size
    with pytest.raises(ValueError, match="shard 0, hookpoint gpt_neox.layers.0.mlp: .* NaN or inf"):
        write_shards(model_folder, str(tmp_path / "acts"), ["layers.0.mlp"], plan, folder=broken)
    assert store.listdir("shards") == []  # nothing committed: a failed shard leaves no record
    records = write_shards(model_folder, str(tmp_path / "acts"), ["layers.0.mlp"], plan, nonfinite="drop",
                           folder=broken)
    stats = [r["hookpoints"]["gpt_neox.layers.0.mlp"] for r in records]
    assert sum(s["nonfinite_rows"] for s in stats) == seen.sum()
    assert sum(s["rows"] for s in stats) == seen.size - seen.sum()
    acts = read_activations(store, stats[0]["path"])
    assert np.isfinite(acts).all() and len(acts) == stats[0]["rows"]


def test_a_checked_shard_is_read_from_its_store_once(tmp_path):
    """The checksum and the decoding use one read of the shard: on an object store every read is a download, and
    the checked bytes are the decoded bytes. Counted through a pyarrow filesystem that records every file opened."""
    import fsspec.implementations.local
    import pyarrow.fs as pafs

    from actors.store.shards import activation_table

    class Counting(fsspec.implementations.local.LocalFileSystem):
        opened: list[str] = []

        def _open(self, path, mode="rb", **kwargs):
            if "r" in mode:
                self.opened.append(path)
            return super()._open(path, mode=mode, **kwargs)

    store = ActivationStore(tmp_path)
    rows = torch.randn(64, 16)
    zeros = np.zeros(64)
    store.write_table("h/shard.parquet", activation_table(to_storage(rows, "bfloat16"), zeros, zeros, zeros, "bfloat16"))
    sha = store.sha256("h/shard.parquet")
    store.fs = pafs.PyFileSystem(pafs.FSSpecHandler(Counting(skip_instance_cache=True)))
    got = read_activations(store, "h/shard.parquet", sha)
    np.testing.assert_array_equal(got, rows.to(torch.bfloat16).float().numpy())
    assert [Path(p).name for p in Counting.opened] == ["shard.parquet"]
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        read_activations(store, "h/shard.parquet", "0" * 64)


def test_corrupt_shard_is_named_on_read(tmp_path, model_folder):
    cfg = config(tmp_path, num_tokens=256)
    store = ActivationStore(tmp_path / "acts")
    plan = _load_plan(cfg, store, str(model_folder), None)
    [record] = write_shards(model_folder, str(tmp_path / "acts"), ["layers.0.mlp"], plan)
    shard = record["hookpoints"]["gpt_neox.layers.0.mlp"]
    path = tmp_path / "acts" / shard["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}.*does not match its manifest checksum"):
        list(ActivationStream(str(tmp_path / "acts"), [shard], 64, 0, 256))


def test_shuffle_buffer_order_is_seeded_and_mixes_shards(tmp_path):
    store = ActivationStore(tmp_path)
    shards = []
    for sid in range(4):  # row r of shard s holds the value 100 s + r, so a batch's shards are visible
        rows = (100 * sid + np.arange(64, dtype=np.float32))[:, None].repeat(2, axis=1)
        from actors.store.shards import activation_table
        store.write_table(f"h/{sid}.parquet", activation_table(to_storage(torch.from_numpy(rows), "float32"),
                                                               np.zeros(64), np.zeros(64), np.zeros(64), "float32"))
        shards.append({"path": f"h/{sid}.parquet", "rows": 64, "sha256": store.sha256(f"h/{sid}.parquet")})

    def batches(seed, buffer, steps=6):
        return [b[:, 0] for b in ActivationStream(str(tmp_path), shards, 32, seed, 32 * steps, shuffle_buffer=buffer)]

    a, b, c = batches(3, 48), batches(3, 48), batches(4, 48)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 6
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    emitted = np.concatenate(a)
    assert len(np.unique(emitted)) == len(emitted)  # no row twice within an epoch
    assert max(len(np.unique(x // 100)) for x in a) >= 2  # the buffer mixes rows of different shards
    assert all(len(np.unique(x // 100)) == 1 for x in batches(3, 0))  # without it, a batch is one shard's


# ---- on a real local Ray instance ----

class DriverProcess(subprocess.Popen):
    """A driver subprocess whose stderr goes to a file: a pipe that nobody reads until the process ends fills up
    (64 KiB of progress bars and Ray's actor-death reports) and blocks the driver in its next write."""

    def __init__(self, args, log_path: Path, **kwargs):
        self.log_path = log_path
        with open(log_path, "w") as log:
            super().__init__(args, stderr=log, **kwargs)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _driver(cfg_data: dict, address: str, fault: dict | None = None) -> DriverProcess:
    """run_generate in a separate driver process joined to the test's Ray instance; `fault` is installed in its
    workers by tests/fault_hooks.py. Its stderr is kept in <output folder>-driver.log."""
    code = ("import json, sys, ray\n"
            "from orchestrator.config import parse_config\n"
            "from orchestrator.stages.generate import run_generate\n"
            "ray.init(address=sys.argv[1], runtime_env=json.loads(sys.argv[2]), log_to_driver=False)\n"
            "run_generate(parse_config(json.loads(sys.stdin.read())))\n")
    log_path = Path(cfg_data["output_dir"]).with_name(Path(cfg_data["output_dir"]).name + "-driver.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = DriverProcess([sys.executable, "-c", code, address, json.dumps(runtime_env(fault, str(REPO)))], log_path,
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    proc.stdin.write(json.dumps(cfg_data))
    proc.stdin.close()
    return proc


def _all_rows(store: ActivationStore, manifest: dict) -> np.ndarray:
    return np.concatenate([store.read_table(s["path"], columns=["chunk_id", "position"]).to_pandas().to_numpy()
                           for e in manifest["hookpoints"].values() for s in e["shards"]])


@pytest.mark.slow  # kill-and-resume (~1 min): run by CI's slow set (scripts/test.sh -m slow)
def test_resume_after_killed_actor_and_killed_driver_gives_identical_shards(ray_local, tmp_path):
    base = config(tmp_path / "ref").model_dump(mode="json")
    base["generate"]["hookpoints"] = ["layers.0.mlp", "layers.1.mlp"]

    def with_uri(name):  # object-store code path, exercised through a file:// URI
        data = json.loads(json.dumps(base))
        data["output_dir"] = str(tmp_path / name)
        data["generate"]["output_uri"] = (tmp_path / name / "acts").as_uri()
        return data

    reference = run_generate(parse_config(with_uri("ref")))
    sums = {h: [s["sha256"] for s in e["shards"]] for h, e in reference["hookpoints"].items()}
    address = ray_local.get_runtime_context().gcs_address

    # 1. An actor dies after writing a shard's files but before its record: Ray Data restarts it and redoes it.
    killed_actor = with_uri("actor")
    marker = tmp_path / "actor-fault"
    proc = _driver(killed_actor, address, {"point": "files_written", "shard": 2, "action": "exit",
                                           "marker": str(marker)})
    assert proc.wait(timeout=300) == 0, proc.log_tail()
    assert marker.exists()  # the fault fired
    store = ActivationStore(killed_actor["generate"]["output_uri"])
    manifest = store.read_json("manifest.json")
    assert {h: [s["sha256"] for s in e["shards"]] for h, e in manifest["hookpoints"].items()} == sums

    # 2. The driver is killed while shard 3 is committed and shard 4 not: a re-run redoes only what is missing.
    killed_driver = with_uri("driver")
    marker = tmp_path / "driver-fault"
    proc = _driver(killed_driver, address, {"point": "committed", "shard": 3, "action": "hang",
                                            "marker": str(marker)})
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert marker.exists(), proc.log_tail() if proc.poll() is not None else "fault never fired"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ActivationStore(killed_driver["generate"]["output_uri"])
    assert not store.exists("manifest.json")
    committed = store.listdir("shards")
    assert "shard-00003.json" in committed and len(committed) < len(reference["hookpoints"]["gpt_neox.layers.0.mlp"]["shards"])
    before = {name: store.read_bytes(f"shards/{name}") for name in committed}
    manifest = run_generate(parse_config(killed_driver))
    assert manifest["throughput"]["shards_reused"] == len(committed)
    assert {h: [s["sha256"] for s in e["shards"]] for h, e in manifest["hookpoints"].items()} == sums
    assert all(store.read_bytes(f"shards/{name}") == data for name, data in before.items())  # not redone
    rows = _all_rows(store, manifest)
    per_hookpoint = len(rows) // 2
    assert per_hookpoint == manifest["num_tokens"]
    for part in (rows[:per_hookpoint], rows[per_hookpoint:]):  # every (chunk, position) exactly once
        assert len(np.unique(part, axis=0)) == len(part)

    # A finished stage is reused whole; the manifest carries what provenance needs.
    assert run_generate(parse_config(killed_driver))["throughput"] == manifest["throughput"]
    assert manifest["tokenizer"]["eos_token_id"] == 256 and manifest["corpus"]["empty_documents"] == 0
    assert manifest["hookpoints"]["gpt_neox.layers.1.mlp"]["d_in"] == 32
