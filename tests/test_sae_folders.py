"""Damaged SAE folders and careless commands: checksums recorded at save and verified on read, bad weights refused
by name, `export --force` and `run --output` that never delete what they did not write, `match` options validated,
normal file modes, and MLflow runs of a killed attempt closed by the re-run. No Ray here (see test_repair.py)."""

import hashlib
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.store.checkpoint import SAEFolderError, load_sae_weights, save_sae_folder, training_state
from actors.store.export import ExportError, export_sae
from orchestrator.cli import main

from .conftest import TINY
from .test_export import N, build, save
from .test_training import settings


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def saved_sae(folder: Path, seed: int = 0, **tensor_edits) -> Path:
    """A TopK SAE folder as training saves it, with `tensor_edits` ({name: function of the tensor}) applied to
    the weights before the save."""
    sae = build("topk", seed)
    if tensor_edits:
        state = sae.state_dict()
        for name, edit in tensor_edits.items():
            state[name] = edit(state[name].clone())
        from actors.train.training import sae_folder_cfg

        job = {"architecture": "topk", "width": N, "params": {"k": 4}, "seed": seed}
        cfg = sae_folder_cfg(job, 16, "layers.3", settings(batch_size=64), 10, 1000)
        save_sae_folder(folder, state, cfg, metrics={"fvu": 0.5})
        return folder
    return save(sae, folder)


def test_checksums_are_recorded_for_every_file_and_verified(tmp_path):
    folder = saved_sae(tmp_path / "a")
    record = json.loads((folder / "checksums.json").read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name != "checksums.json")
    assert sorted(record["files"]) == files and "sae.safetensors" in files
    assert all(record["files"][name] == sha256(folder / name) for name in files)  # hashlib, not the code under test
    load_sae_weights(folder)  # intact: reads
    (folder / "cfg.json").write_text((folder / "cfg.json").read_text() + " ")  # any change to a listed file
    with pytest.raises(SAEFolderError, match=r"cfg\.json: does not match the sha256 recorded"):
        load_sae_weights(folder)


def _flip_tensor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for i in range(header + 10, len(data), 97):  # inside the tensors, not the header: still a readable file
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _rewrite(folder: Path, name: str, edit) -> None:
    """Edit one tensor and drop the checksums, as a folder from another tool (nothing to verify against)."""
    tensors = load_file(str(folder / "sae.safetensors"))
    tensors[name] = edit(tensors[name])
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "checksums.json").unlink()


# Each case: how the folder is damaged, and what the one-line message must say (the file is always named).
DAMAGE = {
    "flipped-bytes": (lambda f: _flip_tensor_bytes(f / "sae.safetensors"),
                      "sae.safetensors: does not match the sha256 recorded"),
    "truncated": (lambda f: (f / "sae.safetensors").write_bytes((f / "sae.safetensors").read_bytes()[:300]),
                  "sae.safetensors: does not match the sha256"),
    "truncated-unchecked": (lambda f: ((f / "sae.safetensors").write_bytes((f / "sae.safetensors").read_bytes()[:300]),
                                       (f / "checksums.json").unlink()),
                            "sae.safetensors: not a readable safetensors file"),
    "empty-unchecked": (lambda f: ((f / "sae.safetensors").write_bytes(b""), (f / "checksums.json").unlink()),
                        "sae.safetensors: not a readable safetensors file"),
    "corrupt-header-unchecked": (lambda f: ((f / "sae.safetensors").write_bytes(
        (f / "sae.safetensors").read_bytes()[:8] + b"{not json" + (f / "sae.safetensors").read_bytes()[17:]),
        (f / "checksums.json").unlink()), "sae.safetensors: not a readable safetensors file"),
    "invalid-cfg-unchecked": (lambda f: ((f / "cfg.json").write_text('{"d_in": 16,'), (f / "checksums.json").unlink()),
                              r"cfg.json: not valid JSON \(Expecting"),
    "missing-weights-listed": (lambda f: (f / "sae.safetensors").unlink(), "not an SAE folder|sae.safetensors: missing"),
    "nan-unchecked": (lambda f: _rewrite(f, "W_dec", lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
                      "tensor 'W_dec' has 16 non-finite"),
    "all-zero-encoder-unchecked": (lambda f: _rewrite(f, "encoder.weight", torch.zeros_like),
                                   "tensor 'encoder.weight' is all zeros"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["match", "export"])
def test_damaged_folders_are_refused_by_name(tmp_path, capsys, case, command):
    damage, message = DAMAGE[case]
    good, bad = saved_sae(tmp_path / "good", seed=1), saved_sae(tmp_path / "bad")
    damage(bad)
    capsys.readouterr()
    argv = (["match", str(good), str(bad), "--json"] if command == "match" else
            ["export", str(bad), "--layout", "saelens", "--out", str(tmp_path / "out")])
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert str(bad) in captured.err
    import re

    assert re.search(message, captured.err), captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit", ["nan", "all-nan", "inf"])
def test_nonfinite_weights_saved_with_checksums_are_refused(tmp_path, capsys, edit):
    """Weights that were non-finite when written (a diverged training) pass their checksums and are still refused."""
    value = float("inf") if edit == "inf" else float("nan")
    bad = saved_sae(tmp_path / "bad", **{"encoder.weight": (lambda t: t.fill_(value)) if edit == "all-nan" else
                                         (lambda t: t.index_fill(1, torch.tensor([0]), value))})
    good = saved_sae(tmp_path / "good", seed=1)
    capsys.readouterr()
    assert main(["match", str(bad), str(good)]) == 2
    assert "tensor 'encoder.weight' has" in capsys.readouterr().err
    assert main(["export", str(bad), "--layout", "sparsify", "--out", str(tmp_path / "out")]) == 2
    assert f"{bad / 'sae.safetensors'}: tensor 'encoder.weight'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["1.5", "-5", "nan", "inf", "-0.1", "x"])
def test_match_threshold_is_validated_like_the_config(tmp_path, capsys, value):
    a, b = saved_sae(tmp_path / "a"), saved_sae(tmp_path / "b", seed=1)
    with pytest.raises(SystemExit) as exit_:
        main(["match", str(a), str(b), "--threshold", value, "--json"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--threshold: must be a finite number in [0, 1]" in captured.err


def test_match_json_is_strict_json(tmp_path, capsys):
    a, b = saved_sae(tmp_path / "a"), saved_sae(tmp_path / "b", seed=1)
    for threshold in ("0", "1", "0.7"):
        capsys.readouterr()
        assert main(["match", str(a), str(b), "--threshold", threshold, "--json"]) == 0
        out = capsys.readouterr().out

        def refuse(constant):
            raise AssertionError(f"{constant} is not JSON")
        stats = json.loads(out, parse_constant=refuse)
        assert stats["threshold"] == float(threshold) and all(v is None or math.isfinite(v) for v in stats.values())


def test_export_force_replaces_only_an_earlier_export(tmp_path, capsys):
    runs = tmp_path / "run"
    source = saved_sae(runs / "seed0")
    sibling = saved_sae(runs / "seed1", seed=1)
    before = {p: sha256(p) for p in runs.rglob("*") if p.is_file()}

    # Into the source's parent, the source itself, or a folder inside it: refused, with or without --force.
    for out, says in ((runs, "contains the SAE folder being exported"), (source, "is the SAE folder being exported"),
                      (source / "export", "inside the SAE folder being exported")):
        capsys.readouterr()
        assert main(["export", str(source), "--layout", "sparsify", "--out", str(out), "--force"]) == 2
        assert says in capsys.readouterr().err
    # A folder of the user's: refused with --force; its files stay.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(source), "--layout", "sparsify", "--out", str(mine), "--force"]) == 2
    assert "not an earlier export" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    # Another SAE folder (this project's, not an export): refused too.
    assert main(["export", str(source), "--layout", "sparsify", "--out", str(sibling), "--force"]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert {p: sha256(p) for p in runs.rglob("*") if p.is_file()} == before  # nothing of the run touched

    # An earlier export is replaced, in the other layout too; an empty folder is fine without --force.
    out = tmp_path / "export"
    assert main(["export", str(source), "--layout", "sparsify", "--out", str(out)]) == 0
    assert main(["export", str(source), "--layout", "saelens", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "checksums.json", "sae_weights.safetensors"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(source), "--layout", "saelens", "--out", str(empty)]) == 0
    with pytest.raises(ExportError, match="also holds notes.txt"):
        (out / "notes.txt").write_text("added by the user")
        export_sae(source, "saelens", out, overwrite=True)
    assert (out / "notes.txt").exists()


@pytest.fixture
def umask():
    def set_(mask):
        old.append(os.umask(mask))
    old = []
    yield set_
    os.umask(old[0])


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_get_the_mode_a_plain_open_would(tmp_path, umask, mask):
    """Files written under a temporary name and renamed get 0o666 less the umask, as `open()` would give them."""
    import pyarrow as pa

    from actors.store.shards import PARQUET_OPTIONS, activation_table, shard_rel, to_storage
    from actors.store.storage import ActivationStore

    umask(mask)
    folder = saved_sae(tmp_path / "sae", **{"W_dec": lambda t: t})  # with metrics.json, as training saves
    export = export_sae(folder, "sparsify", tmp_path / "export")
    store = ActivationStore(tmp_path / "activations")
    acts = torch.randn(8, 4)
    table = activation_table(to_storage(acts, "float32"), np.zeros(8), np.arange(8), np.arange(8), "float32")
    writer = store.open_parquet_writer(shard_rel("layers.0", 0), table.schema, **PARQUET_OPTIONS)
    writer.write(table)
    writer.commit()
    store.write_json("shards/shard-00000.json", {"rows": 8})
    from actors.train.train_state import write_training_state

    write_training_state(tmp_path / "state", {"sae0": ({"w": torch.ones(2)}, {"step": 1})})
    files = [*folder.iterdir(), *export.iterdir(), *(tmp_path / "activations").rglob("*.*"),
             *(tmp_path / "state").rglob("*.*")]
    assert {p.name for p in files} >= {"sae.safetensors", "cfg.json", "checksums.json", "metrics.json",
                                       "shard-00000.parquet", "shard-00000.json", "state.safetensors"}
    expected = 0o666 & ~mask
    assert {p.relative_to(tmp_path): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if p.is_file()} == \
        {p.relative_to(tmp_path): oct(expected) for p in files if p.is_file()}
    assert pa is not None


def test_run_refuses_an_output_folder_that_is_not_a_sae_seeds_output(tmp_path, capsys, monkeypatch):
    import orchestrator.pipeline as pipeline

    def no_ray(cfg):
        raise AssertionError("Ray started for an output folder that is refused")
    monkeypatch.setattr(pipeline, "ray_session", no_ray)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    (mine / ".git").mkdir()
    before = sorted(p.name for p in mine.rglob("*"))
    assert main(["run", str(TINY), "--output", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"output folder {mine}: not empty and not a sae-seeds output" in err and ".git, thesis.tex" in err
    assert sorted(p.name for p in mine.rglob("*")) == before  # nothing written, not even MLflow's database

    # An earlier run's folder (marked, or from before the marker existed) is accepted.
    from orchestrator.output_folder import MARKER, claim_output_folder

    old = tmp_path / "old-run"
    (old / "saes").mkdir(parents=True)
    (old / "mlflow.db").write_text("")
    claim_output_folder(old)
    assert (old / MARKER).exists()
    (old / "my-notes.txt").write_text("a note next to the results")  # marked: the user's extra files are fine
    claim_output_folder(old)


def test_rerun_marks_the_runs_of_a_killed_attempt_killed(tmp_path):
    """A real SQLite store: a driver killed after creating its runs leaves them RUNNING; the next attempt at the
    same experiment in the same folder marks them KILLED, so one attempt is live. Other attempts are left alone."""
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.plan import plan_configurations
    from orchestrator.tracking import ExperimentTracker

    def attempt(out, *overrides):
        cfg = load_config(TINY, list(overrides), str(out))
        tracker = ExperimentTracker(cfg)
        tracker.start_parent()
        configurations = plan_configurations(cfg, ["gpt_neox.layers.0.mlp"])
        tracker.create_child_runs(configurations)
        return tracker

    killed = attempt(tmp_path / "out")  # then the driver dies: nothing closes its runs
    store = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    other_config = attempt(tmp_path / "out", "train.data_seed=5")  # another experiment, still running
    other_config_runs = [other_config.parent_id, *other_config.child_ids]
    done = attempt(tmp_path / "out")
    client = MlflowClient(store)
    state = lambda ids: {client.get_run(i).info.status for i in ids}  # noqa: E731
    assert state([killed.parent_id, *killed.child_ids]) == {"KILLED"}
    assert len(killed.child_ids) == 12
    assert state([done.parent_id, *done.child_ids]) == {"RUNNING"}  # the live attempt
    assert state(other_config_runs) == {"RUNNING"}
    done.finish(ok=False)
    again = attempt(tmp_path / "out")
    assert state([done.parent_id]) == {"FAILED"}  # a closed attempt keeps its state
    runs = client.search_runs([again.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    assert {r.info.run_id for r in runs} == {again.parent_id, *again.child_ids, *other_config_runs}


def test_training_state_reports_damage_per_folder(tmp_path):
    from actors.store.checkpoint import checkpoint_folder

    final = saved_sae(tmp_path / "run" / "layers.3", **{"W_dec": lambda t: t})
    for tokens in (100, 200):
        saved_sae(checkpoint_folder(final, tokens), **{"W_dec": lambda t: t})
    train_hash = json.loads((final / "cfg.json").read_text()).get("train_hash")
    assert training_state(final, train_hash, [100, 200]) == (True, [])
    _flip_tensor_bytes(checkpoint_folder(final, 200) / "sae.safetensors")
    reusable, damage = training_state(final, train_hash, [100, 200])
    assert not reusable and [f for f, _ in damage] == [checkpoint_folder(final, 200)]
    assert "does not match the sha256" in damage[0][1]
    import shutil

    shutil.rmtree(checkpoint_folder(final, 100))
    reusable, damage = training_state(final, train_hash, [100, 200])
    assert [f for f, _ in damage] == [checkpoint_folder(final, 100), checkpoint_folder(final, 200)]
    # A folder that never finished (no metrics.json) is untrained, not damaged.
    (final / "metrics.json").unlink()
    assert training_state(final, train_hash, []) == (False, [])
