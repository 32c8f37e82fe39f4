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
    saes = {(s["configuration"], s["seed"]): s for s in json.loads((out / "saes" / "manifest.json").read_text())["saes"]}
    [topk, relu] = sorted({c for c, _ in saes if c.startswith("topk")})[:1] + \
        sorted({c for c, _ in saes if c.startswith("relu")})[-1:]
    truncated = out / saes[(topk, 1)]["path"] / "sae.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:200])
    flipped = checkpoint_folder(out / saes[(relu, 2)]["path"], cfg.train.checkpoint_tokens[0]) / "sae.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-40] ^= 0xFF  # one byte of one weight: the file still reads, only its checksum tells
    flipped.write_bytes(bytes(data))
    damaged = {(topk, 1), (relu, 2)}
    untouched = {p: p.stat().st_mtime_ns for key, s in saes.items() if key not in damaged
                 for p in (out / s["path"]).parent.rglob("sae.safetensors")}
    assert untouched and len(untouched) == 3 * (len(saes) - 2)  # final + 2 checkpoints of every other SAE

    # A killed attempt (the driver died after creating its MLflow runs) before the re-run.
    killed = ExperimentTracker(cfg)
    killed.start_parent()
    killed.create_child_runs(plan_configurations(cfg, ["gpt_neox.layers.0.mlp"]))

    with caplog.at_level("WARNING", logger="orchestrator.stages.train"):
        result = run_experiment(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.stages.train"]
    assert len(lines) == 2, lines
    [line_final] = [m for m in lines if str(truncated) in m]
    [line_checkpoint] = [m for m in lines if str(flipped) in m]
    assert "does not match the sha256" in line_final and line_final.endswith(f"retraining {topk} seed 1")
    assert line_checkpoint.endswith(f"retraining {relu} seed 2")

    assert weight_digests(out) == digests  # every SAE, final and intermediate, as the undamaged run wrote it
    again = statistics(out)
    for name, frame in stats.items():
        pd.testing.assert_frame_equal(again[name], frame, check_exact=True)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the intact SAEs were not retrained

    client = MlflowClient(result["tracking_uri"])
    assert {client.get_run(i).info.status for i in [killed.parent_id, *killed.child_ids]} == {"KILLED"}
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    live = client.search_runs([result["experiment_id"]], "attributes.status = 'RUNNING'")
    assert live == []


def test_rerun_retrains_a_missing_checkpoint_folder(finished, caplog):
    from actors.store.checkpoint import checkpoint_folder

    cfg, out = finished, finished.output_path
    digests = weight_digests(out)
    sae = json.loads((out / "saes" / "manifest.json").read_text())["saes"][0]
    missing = checkpoint_folder(out / sae["path"], cfg.train.checkpoint_tokens[-1])
    shutil.rmtree(missing)
    with caplog.at_level("WARNING", logger="orchestrator.stages.train"):
        run_experiment(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.stages.train"]
    assert lines == [f"train: {missing}: missing (an intermediate checkpoint of a trained SAE): retraining "
                     f"{sae['configuration']} seed {sae['seed']}"]
    assert weight_digests(out) == digests
