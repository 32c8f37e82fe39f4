"""A re-run repairs damaged SAE folders: on a real local Ray instance, a finished tiny run has one final SAE and one
intermediate checkpoint damaged; the re-run says so in one line each, retrains exactly those SAEs, and ends with
the weights and pair statistics of the undamaged run. It also closes the MLflow runs a killed attempt left open."""

import hashlib
import json
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.pipeline import run_experiment

# Two tiny runs: outside the default suite, run by CI's slow set (scripts/test.sh -m slow).
pytestmark = pytest.mark.slow

from .conftest import TINY


def weight_digests(out):
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "saes").rglob("sae.safetensors"))}


def statistics(out):
    """Pair statistics (final and through training), rows in a fixed order."""
    frames = {}
    for name in ("pairs", "through_training"):
        frame = pq.read_table(out / "overlap" / f"{name}.parquet").to_pandas()
        keys = [c for c in ("configuration", "tokens", "seed_a", "seed_b") if c in frame]
        frames[name] = frame.sort_values(keys).reset_index(drop=True).select_dtypes("number")
    return frames


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("repair")
    cfg = load_config(TINY, output_dir=str(out))
    run_experiment(cfg)
    return cfg


def test_rerun_retrains_exactly_the_damaged_saes_to_the_same_results(finished, caplog):
    from actors.store.checkpoint import checkpoint_folder
    from orchestrator.plan import plan_configurations
    from orchestrator.tracking import ExperimentTracker

    cfg, out = finished, finished.output_path
    digests, stats = weight_digests(out), statistics(out)
    saes = {(s["architecture"], s["width"], s["seed"]): s
            for s in json.loads((out / "saes" / "manifest.json").read_text())["saes"]}
    first, last = cfg.train.checkpoint_tokens[0], cfg.train.checkpoint_tokens[-1]
    # Three kinds of damage, in three SAEs of three configurations:
    truncated = out / saes[("topk", 64, 1)]["path"] / "sae.safetensors"  # a final SAE's weights cut short
    truncated.write_bytes(truncated.read_bytes()[:200])
    flipped = checkpoint_folder(out / saes[("relu_l1", 128, 2)]["path"], first) / "sae.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-40] ^= 0xFF  # one byte of one weight of an intermediate SAE: the file still reads, its checksum tells
    flipped.write_bytes(bytes(data))
    missing = checkpoint_folder(out / saes[("topk", 128, 0)]["path"], last)  # an intermediate SAE deleted
    shutil.rmtree(missing)
    damaged = {("topk", 64, 1), ("relu_l1", 128, 2), ("topk", 128, 0)}
    untouched = {p: p.stat().st_mtime_ns for key, s in saes.items() if key not in damaged
                 for p in (out / s["path"]).parent.rglob("sae.safetensors")}
    assert len(untouched) == 3 * (len(saes) - len(damaged))  # final + 2 checkpoints of every other SAE

    # A killed attempt before the re-run: its driver died after creating its MLflow runs.
    killed = ExperimentTracker(cfg)
    killed.start_parent()
    killed.create_child_runs(plan_configurations(cfg, ["gpt_neox.layers.0.mlp"]))

    with caplog.at_level("WARNING", logger="orchestrator.stages.train"):
        result = run_experiment(cfg)
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "orchestrator.stages.train")
    expected = {truncated: "does not match the sha256 recorded when it was written",
                flipped: "does not match the sha256 recorded when it was written",
                missing: "missing (an intermediate checkpoint of a trained SAE)"}
    conf = {k: saes[k]["configuration"] for k in damaged}
    retraining = {truncated: f"retraining {conf['topk', 64, 1]} seed 1",
                  flipped: f"retraining {conf['relu_l1', 128, 2]} seed 2",
                  missing: f"retraining {conf['topk', 128, 0]} seed 0"}
    assert lines == sorted(f"train: {path}: {problem} (corrupt or replaced): {retraining[path]}"
                           if "sha256" in problem else f"train: {path}: {problem}: {retraining[path]}"
                           for path, problem in expected.items())

    assert weight_digests(out) == digests  # every SAE, final and intermediate, as the undamaged run wrote it
    again = statistics(out)
    for name, frame in stats.items():
        pd.testing.assert_frame_equal(again[name], frame, check_exact=True)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the intact SAEs were not retrained

    client = MlflowClient(result["tracking_uri"])
    assert {client.get_run(i).info.status for i in [killed.parent_id, *killed.child_ids]} == {"KILLED"}
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    assert client.search_runs([result["experiment_id"]], "attributes.status = 'RUNNING'") == []
