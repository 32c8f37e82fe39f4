"""Faults and bad input (docs/faults.md): each case fails fast with one message naming the field or file, or is
repaired by re-running the same command.

The fast cases need no Ray (and assert that none starts); the others share one small finished run."""

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray.train import FailureConfig

from actors.store.errors import BadInputError
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config, parse_config
from orchestrator.errors import root_cause

from .conftest import TINY

BASE = yaml.safe_load(TINY.read_text())
# tiny.yaml cut down: one architecture, one width, two seeds (one pair), no intermediate checkpoints.
SMALL = ["sae.architectures=[{name: topk, k: 4}]", "sae.widths=[64]", "sae.seeds=[0,1]", "train.checkpoint_tokens=[]",
         "train.lm_eval_chunks=2"]


@pytest.fixture
def no_ray(monkeypatch):
    """Whatever other tests left running, the command must fail before it reaches Ray."""
    def refuse(*args, **kwargs):
        raise AssertionError("ray.init called for bad input")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


# ---- config syntax ----

def test_yaml_error_in_the_file_names_file_line_and_column(tmp_path, capsys, no_ray):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngenerate:\n  hookpoints: [layers.0.mlp\n  ctx_len: 64\n")
    code, err = run_cli(capsys, "run", str(bad))
    assert code == 2
    assert err.startswith(f"sae-seeds: {bad}: not valid YAML: line 4, column 10:")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("assignment,expected", [
    ("=3", "--set '=3': expected dotted.key=value"),
    ("train..batch_size=3", "--set 'train..batch_size=3': expected dotted.key=value"),
    ("train.batch_size", "--set 'train.batch_size': expected dotted.key=value"),
    ("train.batch_size=[1,2", "--set 'train.batch_size=[1,2': the value is not valid YAML: line 1, column 5"),
    ("train.batch_size.x=3", "--set 'train.batch_size.x=3': train.batch_size is not a section"),
    ("train.batch_size=abc", "train.batch_size: Input should be a valid integer, unable to parse string as an "
                             "integer (from --set 'train.batch_size=abc')"),
])
def test_bad_set_values_name_the_argument(assignment, expected, tmp_path, capsys, no_ray):
    code, err = run_cli(capsys, "run", str(TINY), "--set", assignment, "--output", str(tmp_path))
    assert code == 2 and expected in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


# ---- token budgets: each error blames its own field ----

@pytest.mark.parametrize("overrides,expected,not_blamed", [
    (["generate.num_tokens=32"], "generate.num_tokens (32) is smaller than one chunk of generate.ctx_len (64)",
     "checkpoint_tokens"),
    (["generate.num_tokens=200", "train.checkpoint_tokens=[]"],
     "train.batch_size (256) is larger than the training budget of 168 tokens", "checkpoint_tokens"),
    (["train.tokens=128", "train.checkpoint_tokens=[]"], "train.batch_size (256) is larger than the training "
     "budget of 128 tokens (train.tokens)", "num_tokens"),
    (["train.tokens=4096"], "train.checkpoint_tokens [8192] must be below the training budget of 4096", "batch_size"),
])
def test_token_budgets_blame_the_right_field(overrides, expected, not_blamed):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, overrides)
    assert expected in str(err.value) and not_blamed not in str(err.value)


# ---- preflight: what can be known before Ray starts ----

def _pickle_only_model(tmp_path: Path) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    return folder


@pytest.mark.parametrize("case", ["missing_model", "pickle_only", "hookpoint", "no_dataset_file", "no_text_column",
                                  "ctx_len"])
def test_preflight_refuses_bad_input_before_ray_starts(case, tmp_path, capsys, no_ray):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"content": "a document without the configured text column"}\n')
    overrides, expected = {
        "missing_model": (["model.build=null", f"model.name={tmp_path}/no/such/model"],
                          f"model.name: '{tmp_path}/no/such/model' is neither an existing local folder nor a "
                          "Hugging Face Hub id"),
        "pickle_only": (["model.build=null", f"model.name={_pickle_only_model(tmp_path)}"],
                        "has only pickled weights (pytorch_model.bin); sae-seeds loads safetensors only and never "
                        "unpickles"),
        "hookpoint": (["generate.hookpoints=[layers.0.mlpp]"],
                      "generate.hookpoints: hookpoint 'layers.0.mlpp' matches no module; closest module names: "
                      "['gpt_neox.layers.0.mlp'"),
        "no_dataset_file": (["dataset.kind=files", f"dataset.path={tmp_path}/missing-*.jsonl"],
                            f"dataset.path: no file matches '{tmp_path}/missing-*.jsonl'"),
        "no_text_column": (["dataset.kind=files", f"dataset.path={docs}"],
                           f"dataset.text_column: 'text' is not a column of '{docs}'; its columns: ['content']"),
        "ctx_len": (["generate.ctx_len=256", "generate.num_tokens=65536"],
                    "generate.ctx_len (256) is longer than the model's max_position_embeddings (128)"),
    }[case]
    out = tmp_path / "out"
    args = ["run", str(TINY), "--output", str(out)]
    for o in overrides:
        args += ["--set", o]
    code, err = run_cli(capsys, *args)
    assert code == 2, err
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing written: no MLflow store, no model, no activations


# ---- one message per failure ----

def test_worker_errors_are_unwrapped_to_their_cause():
    from ray.exceptions import RayActorError, RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    cause = BadInputError("activation shard x.parquet is missing")
    task = RayTaskError("fn", "Traceback ...", cause)
    assert root_cause(task) is cause
    assert root_cause(task.as_instanceof_cause()) is cause
    # A worker killed because another failed explains less than the worker whose code raised.
    group = WorkerGroupError("2 workers failed", {0: RayActorError(), 1: task})
    assert root_cause(group) is cause
    assert root_cause(ControllerError(group)) is cause
    plain = RuntimeError("x")
    assert root_cause(plain) is plain


def test_cli_prints_one_message_and_verbose_the_traceback(monkeypatch, capsys):
    from ray.train import WorkerGroupError

    import orchestrator.pipeline as pipeline

    def fails(cfg, *args, **kwargs):
        raise WorkerGroupError("Training failed due to worker errors:\n" + "frame\n" * 200,
                               {0: BadInputError("activation shard /x/s.parquet is missing; re-run the same command")})

    monkeypatch.setattr(pipeline, "run_experiment", fails)
    code, err = run_cli(capsys, "run", str(TINY))
    assert code == 2
    assert err == "sae-seeds: activation shard /x/s.parquet is missing; re-run the same command\n"
    code, err = run_cli(capsys, "run", str(TINY), "--verbose")
    assert code == 2 and "Traceback (most recent call last)" in err and "WorkerGroupError" in err

    def crashes(cfg, *args, **kwargs):
        raise WorkerGroupError("...", {0: MemoryError("no memory left")})

    monkeypatch.setattr(pipeline, "run_experiment", crashes)
    code, err = run_cli(capsys, "run", str(TINY))
    assert code == 1 and err.splitlines() == ["sae-seeds run failed: MemoryError: no memory left",
                                              "(run again with --verbose for the traceback)"]


def test_failure_policy_does_not_retry_bad_input():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from orchestrator.stages.failure_policy import NoRetryOnBadInput

    policy = NoRetryOnBadInput(FailureConfig(max_failures=3))
    bad = WorkerGroupError("x", {0: BadInputError("damaged shard")})
    assert policy.make_decision(bad) == FailureDecision.RAISE
    killed = WorkerGroupError("x", {0: RuntimeError("worker died")})
    assert [policy.make_decision(killed) for _ in range(4)] == [FailureDecision.RETRY] * 3 + [FailureDecision.RAISE]


def test_shard_verification_modes(tmp_path):
    """sha256 catches any change; size (a stat) catches a missing or truncated file, not a flipped byte."""
    from actors.store.storage import ActivationStore
    from actors.store.shards import verify_shards

    store = ActivationStore(tmp_path)
    records = {}
    for sid in range(3):
        store.write_bytes(f"h/shard-{sid}.parquet", bytes(range(256)) * 4)
        records[sid] = {"hookpoints": {"h": {"path": f"h/shard-{sid}.parquet", "bytes": 1024,
                                             "sha256": store.sha256(f"h/shard-{sid}.parquet")}}}
    flip_bytes(tmp_path / "h" / "shard-0.parquet")
    (tmp_path / "h" / "shard-1.parquet").write_bytes(b"truncated")
    assert verify_shards(store, records, "sha256") == {0: ["h/shard-0.parquet: sha256 differs from its record"],
                                                       1: ["h/shard-1.parquet: 9 bytes, recorded 1024"]}
    assert verify_shards(store, records, "size") == {1: ["h/shard-1.parquet: 9 bytes, recorded 1024"]}
    (tmp_path / "h" / "shard-2.parquet").unlink()
    assert verify_shards(store, records, "size")[2] == ["h/shard-2.parquet: missing"]


# ---- on a real local Ray instance: one small finished run, copied by each test that damages it ----

@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    from orchestrator.pipeline import run_experiment

    out = tmp_path_factory.mktemp("finished") / "out"
    run_experiment(load_config(TINY, SMALL, str(out)))
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_rerun_rewrites_exactly_the_missing_and_damaged_shards(finished, tmp_path, caplog):
    from orchestrator.stages.generate import run_generate

    out = shutil.copytree(finished, tmp_path / "out")
    acts = out / "activations"
    [entry] = json.loads((acts / "manifest.json").read_text())["hookpoints"].values()
    files = [acts / s["path"] for s in entry["shards"]]
    original = [sha256(f) for f in files]
    assert original == [s["sha256"] for s in entry["shards"]]
    files[1].unlink()
    flip_bytes(files[2])
    untouched = {f: f.stat().st_mtime_ns for f in (files[0], files[3])}

    with caplog.at_level(logging.WARNING, logger="orchestrator.stages.generate"):
        manifest = run_generate(load_config(TINY, SMALL, str(out)))
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines  # one line per damaged shard
    assert lines[0].startswith("generate: shard 1 is damaged (") and "shard-00001.parquet: missing" in lines[0]
    assert lines[1].startswith("generate: shard 2 is damaged (") and "sha256 differs from its record" in lines[1]
    assert manifest["throughput"]["shards_computed"] == 2 and manifest["throughput"]["shards_reused"] == 2
    assert [sha256(f) for f in files] == original  # byte for byte what the undamaged run wrote
    assert [s["sha256"] for s in manifest["hookpoints"][next(iter(manifest["hookpoints"]))]["shards"]] == original
    assert {f: f.stat().st_mtime_ns for f in untouched} == untouched  # the sound shards were not rewritten


def _retries_logged(since: float) -> int:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "train"
    return sum(path.read_text(errors="replace").count("[FailurePolicy] RETRY")
               for path in logs.glob("ray-train-*controller*.log") if path.stat().st_mtime >= since)


def test_damaged_shard_mid_training_fails_once_naming_the_file_and_the_remedy(finished, tmp_path):
    from orchestrator.plan import plan_configurations
    from orchestrator.stages.generate import run_generate
    from orchestrator.stages.train import run_train

    out = shutil.copytree(finished, tmp_path / "out")
    # Another batch order retrains every SAE; up to three retries are allowed for worker failures.
    cfg = load_config(TINY, SMALL + ["train.data_seed=1", "train.max_failures=3"], str(out))
    manifest = run_generate(cfg)  # verified and reused
    [entry] = manifest["hookpoints"].values()
    for shard in entry["shards"]:  # damaged after the generate stage checked it, before training reads it
        flip_bytes(out / "activations" / shard["path"])
    t0 = time.time()
    with pytest.raises(Exception) as info:
        run_train(cfg, manifest, plan_configurations(cfg, list(manifest["hookpoints"])), None)
    cause = root_cause(info.value)
    assert isinstance(cause, BadInputError), repr(info.value)[:2000]
    assert str(out / "activations") in str(cause) and "does not match its manifest checksum" in str(cause)
    assert "re-run the same command: the generate stage verifies every shard and rewrites" in str(cause)
    assert _retries_logged(t0) == 0  # raised at once, not after max_failures retries

    # The advice works: the same command rewrites the shards as they were recorded (training reads them next).
    repaired = run_generate(cfg)
    assert repaired["throughput"]["shards_computed"] == len(entry["shards"])
    assert [sha256(out / "activations" / s["path"]) for s in entry["shards"]] == [s["sha256"] for s in entry["shards"]]


@pytest.mark.slow  # multi-minute: run by CI's slow set (scripts/test.sh -m slow)
def test_a_moved_output_folder_reads_its_own_files(finished, tmp_path):
    """Last in this module: it moves the shared run away, so a run that still read the original would fail."""
    from orchestrator.pipeline import run_experiment

    moved = tmp_path / "moved"
    shutil.move(finished, moved)
    for manifest in ("activations/manifest.json", "saes/manifest.json"):
        assert str(finished) not in (moved / manifest).read_text()
    # Another batch order retrains every SAE from the moved activations, and the LM-loss metrics load the model
    # built into the moved folder; compare then matches the new SAEs.
    result = run_experiment(load_config(TINY, SMALL + ["train.data_seed=1"], str(moved)))
    assert result["output_dir"] == str(moved)
    saes = json.loads((moved / "saes" / "manifest.json").read_text())["saes"]
    assert len(saes) == 2 and all((moved / s["path"] / "sae.safetensors").is_file() for s in saes)
    assert all(s["metrics"]["ce_delta"] == s["metrics"]["ce_delta"] for s in saes)  # measured, not NaN
    assert not (finished / "activations").exists() and not (finished / "saes").exists()
