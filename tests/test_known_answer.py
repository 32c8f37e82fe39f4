"""The planted-feature source and the ground-truth metrics (docs/known-answer.md)."""

import itertools
import signal
import time

import numpy as np
import pytest
import torch

from actors.compare.ground_truth import precision_by_shared_count, score_against_truth, shared_precision
from actors.compare.matching import match_pair
from actors.generate.planted import (BLOCK, PlantedParams, PlantedShardWriter, generate_rows, load_ground_truth,
                                     planted_codes, sparse_combination, true_features)
from actors.store.storage import ActivationStore
from actors.train.training import train_saes
from orchestrator.config import ConfigError, parse_config
from orchestrator.stages.generate import run_generate
from orchestrator.stages.planted import planted_plan

from .test_training import settings

PARAMS = PlantedParams(num_features=48, d=24, active_per_token=3, zipf_exponent=0.5, max_firing_probability=0.5,
                       magnitude_min=0.5, magnitude_max=1.5, noise_std=0.01, seed=0)


# ---- the generator ----

def test_rows_depend_only_on_the_parameters_and_their_index():
    whole = generate_rows(PARAMS, 0, 3 * BLOCK)
    parts = np.concatenate([generate_rows(PARAMS, a, b) for a, b in [(0, 1000), (1000, BLOCK + 7), (BLOCK + 7, 3 * BLOCK)]])
    assert np.array_equal(whole, parts)
    assert np.array_equal(whole[BLOCK:BLOCK + 10], generate_rows(PARAMS, BLOCK, BLOCK + 10))
    assert [(s["start"], s["stop"]) for s in planted_plan(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    other = PlantedParams(**{**PARAMS.__dict__, "seed": 1})
    assert not np.allclose(whole, generate_rows(other, 0, 3 * BLOCK))
    features, _, _ = true_features(PARAMS)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, rtol=1e-5)
    # Rows are the codes' combination of the features plus noise of the configured size.
    codes = planted_codes(PARAMS, 1)
    np.testing.assert_allclose(sparse_combination(codes, features), codes @ features, atol=1e-5)
    assert np.std(whole[BLOCK:2 * BLOCK] - codes @ features) == pytest.approx(0.01, rel=0.05)


def test_firing_follows_the_zipf_probabilities_scaled_to_the_active_count():
    _, prob, parent = true_features(PARAMS)
    assert prob.sum() == pytest.approx(3.0, rel=1e-4) and (parent == -1).all()
    ratio = prob[:20] / prob[1:21]
    np.testing.assert_allclose(ratio, (np.arange(1, 21) / np.arange(2, 22)) ** -0.5, rtol=1e-4)  # below the cap
    codes = np.concatenate([planted_codes(PARAMS, b) for b in range(8)])
    fired = (codes > 0).mean(0)
    assert (np.abs(fired - prob) <= 4 * np.sqrt(prob * (1 - prob) / len(codes)) + 1e-3).all()
    assert codes[codes > 0].min() >= 0.5 and codes.max() <= 1.5


def test_children_fire_only_with_their_parent():
    p = PlantedParams(**{**PARAMS.__dict__, "parents": 4, "children_per_parent": 3, "child_probability": 0.4})
    _, prob, parent = true_features(p)
    assert prob.sum() == pytest.approx(3.0, rel=1e-4)
    children = np.flatnonzero(parent >= 0)
    assert len(children) == 12 and set(parent[children]) == {0, 1, 2, 3}
    np.testing.assert_allclose(prob[children], prob[parent[children]] * 0.4, rtol=1e-5)
    codes = np.concatenate([planted_codes(p, b) for b in range(4)])
    for c in children:
        assert not (codes[:, c] > 0)[codes[:, parent[c]] == 0].any()
        given = (codes[:, c] > 0)[codes[:, parent[c]] > 0].mean()
        assert given == pytest.approx(0.4, abs=0.05)


def test_config_errors_name_the_planted_field():
    base = {"name": "x", "generate": {"hookpoints": ["h"], "num_tokens": 256}, "train": {"batch_size": 64},
            "sae": {"architectures": [{"name": "topk", "k": 4}], "widths": [8], "seeds": [0]}}
    for planted, field in [({"num_features": 0}, "planted.num_features"), ({"d": 1}, "planted.d"),
                           ({"noise_std": -1}, "planted.noise_std"),
                           ({"magnitude_min": 2, "magnitude_max": 1}, "planted.magnitude_max"),
                           ({"num_features": 4, "active_per_token": 3}, "planted.active_per_token"),
                           ({"hierarchy": {"parents": 100, "children_per_parent": 3}}, "planted.hierarchy"),
                           ({"hierarchy": {"parents": 2, "children_per_parent": 3, "child_probability": 0}},
                            "planted.hierarchy.child_probability"),
                           ({"hookpoint": "a/b"}, "planted.hookpoint"), ({"hookpoint": "h"}, "planted.hookpoint"),
                           ({"zipf": 1}, "planted.zipf")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_config(base | {"planted": planted})


# ---- the ground-truth metrics against brute force ----

def brute_force_mcc(cos: np.ndarray) -> float:
    n, f = cos.shape
    best = -np.inf
    if n >= f:
        for rows in itertools.permutations(range(n), f):
            best = max(best, cos[list(rows), np.arange(f)].mean())
    else:
        for cols in itertools.permutations(range(f), n):
            best = max(best, cos[np.arange(n), list(cols)].mean())
    return float(best)


def brute_force_cos(a, b):
    return np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])


def test_dictionary_containing_the_true_features_scores_perfectly():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 6))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    dictionary = np.concatenate([3.0 * features[[2, 0, 3, 1]], rng.normal(size=(2, 6))])  # scale is irrelevant
    s = score_against_truth(torch.tensor(dictionary), torch.tensor(features), 0.9)
    assert s.recovered_fraction == 1.0 and s.mcc == pytest.approx(1.0, abs=1e-6)
    cos = brute_force_cos(dictionary, features)
    np.testing.assert_allclose(s.best_cos, cos.max(1), atol=1e-6)
    assert s.true_latent.tolist() == (cos.max(1) > 0.9).tolist() and s.true_latent[:4].all()
    assert s.matched_feature[:4].tolist() == [2, 0, 3, 1]


def test_dictionary_rotated_away_from_the_true_features():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    features = q[:4]  # orthonormal: a rotation in the plane of f_i and a fifth direction moves f_i alone
    for angle, recovered in [(0.3, 1.0), (0.6, 0.0)]:  # cos 0.955 > 0.9, cos 0.825 < 0.9
        dictionary = np.cos(angle) * features + np.sin(angle) * q[4]
        dictionary = np.concatenate([dictionary, rng.normal(size=(1, 6))])
        s = score_against_truth(torch.tensor(dictionary), torch.tensor(features), 0.9)
        cos = brute_force_cos(dictionary, features)
        assert s.recovered_fraction == pytest.approx((cos.max(0) > 0.9).mean()) == recovered
        assert s.mcc == pytest.approx(brute_force_mcc(cos), abs=1e-5)
    for n in (3, 5, 7):  # fewer and more latents than features, random directions
        dictionary = rng.normal(size=(n, 6))
        cos = brute_force_cos(dictionary, features)
        s = score_against_truth(torch.tensor(dictionary), torch.tensor(features), 0.5)
        assert s.mcc == pytest.approx(brute_force_mcc(cos), abs=1e-5)
        assert s.recovered_fraction == pytest.approx((cos.max(0) > 0.5).mean())
        np.testing.assert_allclose(s.best_cos, cos.max(1), atol=1e-6)


def test_precision_of_shared_and_orphan_latents_and_by_shared_count():
    true = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    shared = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    p = shared_precision(true, shared)
    assert p == {"precision_shared": pytest.approx(2 / 3), "precision_orphan": pytest.approx(1 / 3), "n_shared": 3,
                 "n_orphan": 3}
    by_k = precision_by_shared_count(true, np.array([2, 2, 1, 0, 0, 1]), 3)
    assert [r["latents"] for r in by_k] == [2, 2, 2]
    assert [r["precision"] for r in by_k] == [pytest.approx(0.5), pytest.approx(0.0), pytest.approx(1.0)]
    assert np.isnan(shared_precision(true, np.zeros(6, dtype=bool))["precision_shared"])


# ---- training on a planted source: the paper's effect with a known answer ----

def test_topk_seeds_recover_the_planted_features_and_share_the_true_ones(tmp_path):
    p = PlantedParams(num_features=64, d=32, active_per_token=3, zipf_exponent=0.0, max_firing_probability=0.5,
                      magnitude_min=0.5, magnitude_max=2.5, noise_std=0.02, seed=3)
    planted = {**{k: v for k, v in p.__dict__.items() if k not in ("parents", "children_per_parent",
                                                                    "child_probability")}, "hierarchy": None}
    writer = PlantedShardWriter(planted, "planted", str(tmp_path), "float32", "plan")
    records = [writer.write_shard(i, a, b) for i, (a, b) in enumerate([(0, 49152), (49152, 98304)])]
    shards = [r["hookpoints"]["planted"] | {"shard_id": r["shard_id"]} for r in records]
    rows = sum(s["rows"] for s in shards)
    manifest = {"root": str(tmp_path), "hookpoints": {"planted": {
        "d_in": 32, "rows": rows, "shards": shards, "source": "planted",
        "mean_norm": sum(s["sum_norm"] for s in shards) / rows}}}
    jobs = [{"configuration": "c", "architecture": "topk", "params": {"k": 3}, "width": 64, "seed": seed,
             "path": str(tmp_path / f"seed{seed}"), "run_id": None} for seed in (0, 1)]
    train_saes(jobs, manifest, "planted", settings(lr=1e-2, log_every=1000), torch.device("cpu"))

    from actors.store.checkpoint import load_sae_weights

    features = torch.from_numpy(true_features(p)[0])
    a, b = (load_sae_weights(j["path"]) for j in jobs)
    sa, sb = (score_against_truth(s.decoder, features) for s in (a, b))
    m = match_pair(a.encoder, a.decoder, b.encoder, b.decoder, 0.7)
    shared = m.shared
    precision = shared_precision(sa.true_latent, shared)
    assert sa.recovered_fraction >= 0.75 and sb.recovered_fraction >= 0.75, (sa.recovered_fraction, sb.recovered_fraction)
    assert shared.mean() >= 0.6, shared.mean()
    assert precision["precision_shared"] >= 0.9, precision
    assert precision["precision_shared"] - precision["precision_orphan"] >= 0.4, precision


# ---- the generate stage: Ray Data actors, shards, manifest, resumption ----

def planted_config(out, **planted):
    return {"name": "gen", "output_dir": str(out),
            "model": {"build": {"model_type": "gpt_neox", "hidden_size": 16, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}},
            "generate": {"hookpoints": ["layers.0.mlp"], "ctx_len": 32, "num_tokens": 256, "shard_tokens": 256,
                         "batch_size": 4, "num_actors": 1},
            "planted": {"num_features": 32, "d": 16, "num_tokens": 6000, "shard_tokens": 1000,
                        "active_per_token": 2, "seed": 5} | planted,
            "sae": {"architectures": [{"name": "topk", "k": 2}], "widths": [16], "seeds": [0]},
            "train": {"batch_size": 64}}


@pytest.mark.slow  # multi-minute: run by CI's slow set (scripts/test.sh -m slow)
def test_planted_source_resumes_after_killed_actor_and_killed_driver_with_identical_checksums(ray_local, tmp_path):
    from .test_generate import _driver

    reference = run_generate(parse_config(planted_config(tmp_path / "ref")))
    entry = reference["hookpoints"]["planted"]
    sums = [s["sha256"] for s in entry["shards"]]
    assert len(sums) == 6 and entry["rows"] == 6000 and entry["d_in"] == 16 and entry["source"] == "planted"
    store = ActivationStore(reference["root"])
    truth = load_ground_truth(store.read_bytes(entry["ground_truth"]["path"]))
    assert truth["features"].shape == (32, 16) and truth["features"].dtype == np.float32
    assert truth["firing_probability"].shape == (32,)
    assert entry["ground_truth"]["sha256"] == store.sha256("planted/ground_truth.safetensors")
    assert entry["ground_truth"]["params"]["num_features"] == 32
    # The shards hold exactly the generator's rows.
    from actors.store.shards import read_activations

    rows = np.concatenate([read_activations(store, s["path"], s["sha256"]) for s in entry["shards"]])
    params = PlantedParams.from_config(entry["ground_truth"]["params"])
    np.testing.assert_array_equal(rows, generate_rows(params, 0, 6000))
    address = ray_local.get_runtime_context().gcs_address

    # An actor dies after writing shard 2's file, before its record: the pool restarts it and redoes the shard.
    data = planted_config(tmp_path / "actor")
    proc = _driver(data, address, {"point": "planted_files_written", "shard": 2, "action": "exit",
                                   "marker": str(tmp_path / "actor-fault")})
    assert proc.wait(timeout=300) == 0, proc.log_tail()
    assert (tmp_path / "actor-fault").exists()
    again = ActivationStore(tmp_path / "actor" / "activations").read_json("manifest.json")
    assert [s["sha256"] for s in again["hookpoints"]["planted"]["shards"]] == sums

    # The driver is killed after shard 3 committed: a re-run computes only the missing shards.
    data = planted_config(tmp_path / "driver")
    marker = tmp_path / "driver-fault"
    proc = _driver(data, address, {"point": "planted_committed", "shard": 3, "action": "hang", "marker": str(marker)})
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert marker.exists(), proc.log_tail() if proc.poll() is not None else "fault never fired"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ActivationStore(tmp_path / "driver" / "activations")
    committed = store.listdir("planted/records")
    assert "shard-00003.json" in committed and not store.exists("manifest.json")
    before = {name: store.read_bytes(f"planted/records/{name}") for name in committed}
    manifest = run_generate(parse_config(data))
    assert [s["sha256"] for s in manifest["hookpoints"]["planted"]["shards"]] == sums
    assert manifest["planted_throughput"]["shards_reused"] == len(committed)
    assert all(store.read_bytes(f"planted/records/{n}") == b for n, b in before.items())  # not redone
    # Another planted seed is another manifest, and the model's shards are reused, not recomputed.
    other = run_generate(parse_config(planted_config(tmp_path / "driver", seed=6)))
    assert other["config_hash"] != manifest["config_hash"] and other["throughput"]["shards_computed"] == 0
    assert [s["sha256"] for s in other["hookpoints"]["planted"]["shards"]] != sums
    lm = "gpt_neox.layers.0.mlp"
    assert other["hookpoints"][lm]["shards"] == manifest["hookpoints"][lm]["shards"]


# ---- end to end: a planted source beside a model hookpoint ----

@pytest.mark.slow  # a whole pipeline with two sources (~2 min): run by CI's slow set (scripts/test.sh -m slow)
def test_pipeline_scores_a_planted_source_beside_the_model_hookpoint(ray_local, tmp_path):
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.pipeline import run_experiment

    from .conftest import TINY

    cfg = load_config(TINY, ["sae.architectures=[{name: topk, k: 2}]", "sae.widths=[16,32]", "sae.seeds=[0,1]",
                             "train.lm_eval_chunks=0", "train.checkpoint_tokens=[2048]", "train.batch_size=128",
                             "planted={num_features: 16, d: 8, num_tokens: 16384, shard_tokens: 8192, "
                             "active_per_token: 1.5, noise_std: 0.01, zipf_exponent: 0}", "train.lr=0.01"],
                      str(tmp_path / "out"))
    result = run_experiment(cfg)
    summary = result["summary"]
    planted = summary[summary["hookpoint"] == "planted"]
    model = summary[summary["hookpoint"] != "planted"]
    assert len(planted) == 2 and len(model) == 2
    assert planted["recovered"].notna().all() and model["recovered"].isna().all()
    assert (planted["precision shared"] > planted["precision orphan"]).any()
    assert any("RANDOMLY INITIALISED" in n and "pipeline check" in n for n in result["notes"])
    overlap = cfg.output_path / "overlap"
    latents = pq.read_table(overlap / "ground_truth" / "planted_topk-k2-w16" / "seed0.parquet").to_pandas()
    assert len(latents) == 16 and set(latents.columns) >= {"best_true_cos", "matched_feature", "true_feature"}
    nway = pq.read_table(overlap / "ground_truth_nway.parquet").to_pandas()
    assert set(nway["shared_with_k_seeds"]) == {0, 1}
    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    assert "figures/ground_truth.png" in {a.path for a in client.list_artifacts(result["parent_run_id"], "figures")}
    assert any(k.startswith("gt_recovered_mean/planted-") for k in parent.data.metrics)
    children = client.search_runs([result["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    scored = [c for c in children if c.data.params["hookpoint"] == "planted"]
    assert len(scored) == 4 and all("gt_recovered_fraction" in c.data.metrics for c in scored)
    assert through_planted_checkpoints(result) == [2048]


def through_planted_checkpoints(result):
    import json
    from pathlib import Path

    saes = json.loads((Path(result["output_dir"]) / "saes" / "manifest.json").read_text())["saes"]
    return sorted({c["tokens"] for s in saes if s["hookpoint"] == "planted" for c in s["checkpoints"]})


# ---- random-model control ----

def test_random_init_seed_reinitialises_a_loaded_model_deterministically(tmp_path):
    from actors.generate.models import build_local_model, load_model

    folder = build_local_model({"model_type": "gpt_neox", "hidden_size": 16, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32},
                               0, tmp_path / "model")
    # A "pretrained" model: every weight moved away from any init, so a re-init must change all matrices.
    trained = load_model(str(folder), None, "float32", False, "cpu")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    trained.save_pretrained(tmp_path / "trained")
    loaded = load_model(str(tmp_path / "trained"), None, "float32", False, "cpu").state_dict()
    a = load_model(str(tmp_path / "trained"), None, "float32", False, "cpu", random_init_seed=1).state_dict()
    b = load_model(str(tmp_path / "trained"), None, "float32", False, "cpu", random_init_seed=1).state_dict()
    c = load_model(str(tmp_path / "trained"), None, "float32", False, "cpu", random_init_seed=2).state_dict()
    assert a.keys() == loaded.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic across loads
    assert all(not torch.equal(a[k], loaded[k]) for k in a)  # every tensor re-drawn (norms to 1, biases to 0 too)
    matrices = [k for k in a if a[k].dim() == 2]
    assert matrices and all(not torch.equal(a[k], c[k]) for k in matrices)  # the seed decides the draw
    assert all(a[k].std() < 0.1 for k in matrices)  # transformers' init (normal, std = initializer_range 0.02)
    assert parse_config({"name": "x", "model": {"random_init_seed": 3}, "generate": {"hookpoints": ["h"],
                         "num_tokens": 256}, "train": {"batch_size": 64}, "sae": {"architectures": [{"name": "topk", "k": 2}], "widths": [8],
                                                     "seeds": [0]}}).model.random_init_seed == 3
