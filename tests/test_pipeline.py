"""The whole pipeline on a real local Ray instance, checked through MLflow and `sae-seeds match`."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from actors.store.checkpoint import load_sae_weights
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.pipeline import run_experiment

from .conftest import TINY


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cfg = load_config(TINY, output_dir=str(out))
    return cfg, run_experiment(cfg)


def test_mlflow_has_parent_and_child_runs(tiny_run):
    cfg, result = tiny_run
    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([result["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    n_configs = 2 * len(cfg.sae.widths)
    assert len(children) == n_configs * len(cfg.sae.seeds)
    keys = None
    for run in children:
        assert run.info.status == "FINISHED"
        for metric in ("fvu", "l0", "dead_fraction", "mean_shared_fraction"):
            assert metric in run.data.metrics, (metric, run.info.run_name)
        assert 0 < run.data.metrics["fvu"] < 1.5
        assert set(run.data.params) >= {"hookpoint", "architecture", "width", "seed", "k", "l1_coefficient"}
        keys = keys or set(run.data.params)
        assert set(run.data.params) == keys  # identical keys: MLflow's compare view needs them
        # Training curves were logged from the Ray Train worker during training.
        assert len(client.get_metric_history(run.info.run_id, "train/fvu")) >= 2
    # Per-configuration values on the parent, `<quantity>/<configuration>`.
    for quantity in ("chance_shared_fraction_init", "chance_shared_fraction_rotation", "equal_fraction",
                     "maxcos_shared_fraction"):
        assert sum(k.startswith(quantity + "/") for k in parent.data.metrics) == n_configs, quantity
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {f"figures/{n}.png" for n in ("shared_vs_width", "exactly_k_seeds", "no_other_seed", "threshold_sweep",
                                         "frequency_vs_stability")} <= artifacts
    tables = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert {f"tables/{n}.json" for n in ("pairs", "nway", "nway_curve", "consensus")} <= tables
    assert sum(p.startswith("figures/heatmap_") for p in artifacts) == n_configs


def test_parent_overlap_equals_cli_match(tiny_run, capsys):
    cfg, result = tiny_run
    client = MlflowClient(result["tracking_uri"])
    local = client.download_artifacts(result["parent_run_id"], "tables/pairs.json")
    table = json.loads(open(local).read())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == 4 * 3  # 4 configurations x 3 seed pairs
    saes = json.loads((cfg.output_path / "saes" / "manifest.json").read_text())["saes"]
    path = {(s["configuration"], s["seed"]): str(cfg.output_path / s["path"]) for s in saes}
    for row in rows:
        capsys.readouterr()
        assert main(["match", path[(row["configuration"], row["seed_a"])],
                     path[(row["configuration"], row["seed_b"])], "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)
        assert set(cli) == {"n_latents_a", "n_latents_b", "threshold", "shared_fraction", "equal_fraction",
                            "decoder_shared_fraction", "maxcos_shared_fraction", "mean_matched_cos_encoder",
                            "mean_matched_cos_decoder", "pw_mcc"}
        for key, value in cli.items():
            assert row[key] == pytest.approx(value, abs=1e-9), key


def test_child_runs_have_lm_loss_and_firing_frequencies(tiny_run):
    cfg, result = tiny_run
    saes = json.loads((cfg.output_path / "saes" / "manifest.json").read_text())["saes"]
    metrics = [s["metrics"] for s in saes]
    # One model, the same chunks: the clean and zero-ablated losses are shared by every SAE.
    assert len({m["ce_clean"] for m in metrics}) == 1 and len({m["ce_zero_ablated"] for m in metrics}) == 1
    for m in metrics:
        assert m["ce_delta"] == pytest.approx(m["ce_spliced"] - m["ce_clean"])
        assert m["ce_recovered"] == pytest.approx(
            (m["ce_zero_ablated"] - m["ce_spliced"]) / (m["ce_zero_ablated"] - m["ce_clean"]))
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(saes[0]["run_id"])
    assert run.data.metrics["ce_recovered"] == pytest.approx(metrics[0]["ce_recovered"])
    # The per-latent firing frequencies and their log-density histogram are artifacts of each child run.
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"firing_frequency.safetensors",
                                                                         "log_density.png"}


def test_seeds_share_batches_and_differ_in_weights(tiny_run):
    cfg, _ = tiny_run
    saes = json.loads((cfg.output_path / "saes" / "manifest.json").read_text())["saes"]
    by_conf = {}
    for s in saes:
        by_conf.setdefault(s["configuration"], []).append(s)
    for conf, group in by_conf.items():
        assert len({s["data_digest"] for s in group}) == 1, conf
        w = [load_sae_weights(cfg.output_path / s["path"]).encoder.numpy() for s in group]
        assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])


def test_outputs_are_complete_and_rerun_reuses_them(tiny_run):
    cfg, result = tiny_run
    manifest = json.loads((cfg.output_path / "activations" / "manifest.json").read_text())
    [(hookpoint, entry)] = manifest["hookpoints"].items()
    assert hookpoint == "gpt_neox.layers.0.mlp" and entry["d_in"] == 32
    assert entry["rows"] == manifest["num_tokens"] == 16384
    assert sum(s["rows"] for s in entry["shards"]) == 16384 and len(entry["shards"]) == 4
    # Generate throughput on the parent run: the total, and one point per shard (step = shard id).
    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"]).data.metrics
    assert parent["pipeline.generate.tokens_per_s"] == pytest.approx(manifest["throughput"]["tokens_per_s"])
    assert parent["pipeline.generate.num_tokens"] == 16384 and parent["pipeline.generate.corpus_empty_documents"] == 0
    shards = client.get_metric_history(result["parent_run_id"], "pipeline.generate.shard_tokens_per_s")
    assert sorted(m.step for m in shards) == [0, 1, 2, 3] and all(m.value > 0 for m in shards)
    nway = pq.read_table(cfg.output_path / "overlap" / "nway.parquet").to_pandas()
    per_base = nway.groupby(["configuration", "base_seed"])["latents"].sum()
    widths = {c: int(c.rsplit("-w", 1)[1]) for c in nway["configuration"]}
    for (conf, _), total in per_base.items():
        assert total == widths[conf]
    assignment = pq.read_table(next((cfg.output_path / "overlap" / "assignments").rglob("*.parquet")))
    assert {"row", "col_enc", "cos_enc", "col_dec", "cos_dec"} <= set(assignment.column_names)

    mtimes = {p: p.stat().st_mtime_ns for p in (cfg.output_path / "saes").rglob("sae.safetensors")}
    again = run_experiment(cfg)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing retrained
    assert again["timings"]["train"] < result["timings"]["train"]


def test_failed_run_is_marked_failed_in_mlflow(ray_local, tmp_path):
    # A corpus too short for generate.num_tokens passes the preflight checks (it reads the first record only)
    # and fails once the generate stage packs it, with the MLflow runs already started.
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "a single short document"}\n')
    cfg = load_config(TINY, ["dataset.kind=files", f"dataset.path={data}"], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="the corpus yields only"):
        run_experiment(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "sae-seeds/tiny"]
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["FAILED"]
    assert not (tmp_path / "out" / "activations" / "manifest.json").exists()


def test_nway_views_are_consistent(tiny_run):
    cfg, _ = tiny_run
    overlap = json.loads((cfg.output_path / "overlap" / "manifest.json").read_text())
    for name, c in overlap["configurations"].items():
        counts = np.array(c["nway_counts"])
        groups = np.array(c["consensus_groups"])
        n_latents = c["width"] * len(c["seeds"])
        # Every latent is in exactly one consensus group; groups spanning one seed are the unshared latents.
        assert groups[1] == pytest.approx(counts[:, 0].sum(), abs=0.02 * n_latents)
        assert (groups[1:] * np.arange(1, len(groups))).sum() <= n_latents
        curve = c["no_other_seed_curve"]
        assert [p["n_seeds"] for p in curve] == list(range(2, len(c["seeds"]) + 1))
        # With all seeds, "in no other seed" is the k = 0 column of the N-way counts.
        assert curve[-1]["mean"] == pytest.approx(counts[:, 0].mean() / c["width"])
        assert c["certified"] is True
        fs = c["frequency_stability"]
        n = len(c["seeds"])
        assert fs is not None and sum(fs["latents_per_bin"]) == c["width"] * n * (n - 1) // 2
        assert 0 <= c["chance"]["rotation_shared"] <= 1 and 0 <= c["chance"]["init_shared"] <= 1


def test_overlap_through_training(tiny_run):
    cfg, result = tiny_run
    overlap = cfg.output_path / "overlap"
    through = pq.read_table(overlap / "through_training.parquet").to_pandas()
    pairs = pq.read_table(overlap / "pairs.parquet").to_pandas()
    # tiny.yaml: checkpoints at 2,048 and 8,192 tokens, then the final SAEs at 14,336 (16,384 less the held-out
    # eighth), for every seed pair.
    assert sorted(through["tokens"].unique()) == [2048, 8192, 14336]
    assert len(through) == 3 * len(pairs)
    final = through[through["tokens"] == 14336].merge(pairs, on=["configuration", "seed_a", "seed_b"])
    np.testing.assert_allclose(final["shared_fraction_x"], final["shared_fraction_y"])
    # An intermediate point equals `sae-seeds match` on the two checkpoint folders.
    saes = json.loads((cfg.output_path / "saes" / "manifest.json").read_text())["saes"]
    row = through[through["tokens"] == 2048].iloc[0]
    ckpt = {(s["configuration"], s["seed"]): cfg.output_path / s["checkpoints"][0]["path"] for s in saes}
    a = load_sae_weights(ckpt[(row["configuration"], row["seed_a"])])
    b = load_sae_weights(ckpt[(row["configuration"], row["seed_b"])])
    from actors.compare.matching import match_pair

    assert match_pair(a.encoder, a.decoder, b.encoder, b.decoder).statistics()["shared_fraction"] == \
        pytest.approx(row["shared_fraction"])
    # Each child run has the curve, one point per token count, as MLflow steps.
    client = MlflowClient(result["tracking_uri"])
    child = client.search_runs([result["experiment_id"]],
                               filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")[0]
    history = client.get_metric_history(child.info.run_id, "shared_fraction_vs_tokens")
    assert sorted(m.step for m in history) == [2048, 8192, 14336]
    assert all(0 <= m.value <= 1 for m in history)
    figures = {a.path for a in client.list_artifacts(result["parent_run_id"], "figures")}
    assert "figures/shared_vs_tokens.png" in figures


def test_trained_folders_are_reused_only_with_the_same_settings(tiny_run):
    from actors.store.checkpoint import is_trained
    from orchestrator.stages.train import train_hash

    cfg, _ = tiny_run
    manifest = json.loads((cfg.output_path / "activations" / "manifest.json").read_text())
    saes = json.loads((cfg.output_path / "saes" / "manifest.json").read_text())["saes"]
    same = train_hash(cfg, manifest)
    other_order = train_hash(load_config(TINY, ["train.data_seed=1"], str(cfg.output_path)), manifest)
    more_workers = train_hash(load_config(TINY, ["train.num_workers=2"], str(cfg.output_path)), manifest)
    assert same != other_order and same == more_workers
    assert all(is_trained(cfg.output_path / s["path"], same, cfg.train.checkpoint_tokens) for s in saes)
    assert not any(is_trained(cfg.output_path / s["path"], other_order, cfg.train.checkpoint_tokens) for s in saes)
    # A missing intermediate checkpoint makes the folder untrained.
    assert not is_trained(cfg.output_path / saes[0]["path"], same, cfg.train.checkpoint_tokens + [12000])
