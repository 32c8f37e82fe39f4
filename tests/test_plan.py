"""`sae-seeds plan`: every shipped config plans offline in seconds; the plan's numbers are what a real run then does;
a config that cannot fit the resources it names is refused, naming the field."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actors.compare.matching import pair_memory_bytes
from actors.train.stacked import stack_bytes_per_seed
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.sizing import PlanError, build_plan, plan_run

from .conftest import REPO, TINY

CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "paper").glob("*.yaml"))
PAPER = REPO / "configs" / "paper"


def test_there_are_paper_configs():
    assert {p.name for p in CONFIGS if p.parent == PAPER} >= {
        "pythia-160m-topk.yaml", "pythia-160m-k-sweep.yaml", "pythia-160m-architectures.yaml", "llama-3-8b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_plan_runs_on_every_shipped_config(path, capsys, monkeypatch):
    """Offline: Hub models are planned from their vendored config.json (plan.transformers_config)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(path)
    for line in ("activation sources", "train (stacks", "compare (one Ray task", "resources requested", "compute"):
        assert line in out
    assert re.search(r"total\s+[\d.e+]+ FLOPs", out)
    for width in cfg.sae.widths:
        assert f"{width} latents" in out
    if path.parent == PAPER:
        assert "WARNING" not in out  # revisions pinned to commits
    assert main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    n_seeds = len(cfg.sae.seeds)
    assert plan["tasks"]["pairs"] == len(plan["compare"]) * n_seeds * (n_seeds - 1) // 2


def test_paper_configs_are_the_papers_experiments():
    from orchestrator.stages.generate import lm_generate_hash

    head = load_config(PAPER / "pythia-160m-topk.yaml")
    assert head.model.name == "EleutherAI/pythia-160m" and head.generate.hookpoints == ["layers.6.mlp"]
    assert head.sae.widths == [768, 4096, 32768, 131072] and len(head.sae.seeds) == 9
    assert head.sae.architectures == [{"name": "topk", "k": 32}] and head.generate.num_tokens == 8_000_000_000
    sweep = load_config(PAPER / "pythia-160m-k-sweep.yaml")
    assert sweep.sae.architectures[0]["k"] == [32, 64, 128, 256] and sweep.sae.widths == [32768]
    archs = load_config(PAPER / "pythia-160m-architectures.yaml")
    assert {a["name"] for a in archs.sae.architectures} == {"topk", "relu_l1", "gated"}
    assert archs.sae.widths == [27648]
    llama = load_config(PAPER / "llama-3-8b.yaml")
    assert llama.sae.widths == [131072] and llama.generate.hookpoints == ["layers.16.mlp"]
    for cfg in (head, sweep, archs, llama):
        assert re.fullmatch(r"[0-9a-f]{40}", cfg.model.revision) and re.fullmatch(r"[0-9a-f]{40}", cfg.dataset.revision)
        assert cfg.generate.output_uri.startswith("s3://") and cfg.train.use_gpu
        assert Path(cfg.plan.transformers_config).is_file()
    # The sweep and the architecture comparison reuse the headline run's activations: same store, same hash.
    assert {lm_generate_hash(c) for c in (head, sweep, archs)} == {lm_generate_hash(head)}
    assert {c.generate.output_uri for c in (head, sweep, archs)} == {head.generate.output_uri}


def test_the_headline_plan_in_numbers():
    """The 8B-token Pythia plan against arithmetic done here from the config: rows, shards, storage, stacks."""
    cfg = load_config(PAPER / "pythia-160m-topk.yaml")
    plan = build_plan(cfg)
    (src,) = plan.sources
    assert src.name == "gpt_neox.layers.6.mlp" and src.d_in == 768
    assert src.rows == 8_000_000_000 and src.shards == -(-8_000_000_000 // 262144)
    assert src.storage_bytes == 8_000_000_000 * (768 * 2 + 16)  # bfloat16 values + provenance
    stacks = {}
    for s in plan.train[0].stacks:
        stacks.setdefault(s["width"], []).append(len(s["seeds"]))
        assert len(s["seeds"]) * stack_bytes_per_seed(768, s["width"], 16384) <= cfg.train.max_stack_bytes
    per_seed = {w: stack_bytes_per_seed(768, w, 16384) for w in cfg.sae.widths}
    for w, sizes in stacks.items():  # as few stacks as whole seeds allow
        fit = min(9, cfg.train.max_stack_bytes // per_seed[w])
        assert len(sizes) == -(-9 // fit) and sum(sizes) == 9
    assert plan.tasks["pairs"] == 4 * 36
    assert max(c.task_bytes for c in plan.compare) >= pair_memory_bytes(131072, 131072, 768)


def test_the_plan_shows_passes_over_fewer_cached_tokens():
    """The headline run on a quarter of the activations, four passes over them (docs/storage.md): the plan counts
    the passes over the training rows and stores a quarter of the bytes; one pass shows no passes line."""
    from orchestrator.sizing import format_plan

    full = build_plan(load_config(PAPER / "pythia-160m-topk.yaml"))
    cfg = load_config(PAPER / "pythia-160m-topk.yaml", ["generate.num_tokens=2_000_000_000",
                                                       "train.tokens=8_000_000_000"])
    plan = build_plan(cfg, full.model)
    (src,), (one,) = plan.sources, full.sources
    assert src.steps == 8_000_000_000 // 16384 and src.train_tokens == src.steps * 16384
    assert src.passes == pytest.approx(src.train_tokens / (src.rows - src.held_out_rows)) and 3.9 < src.passes < 4.1
    assert src.rows == 2_000_000_000 // 2048 * 2048 and src.storage_bytes == src.rows * (768 * 2 + 16)
    assert one.passes <= 1 and src.storage_bytes < one.storage_bytes / 3.9
    text = format_plan(plan)
    assert f"{src.passes:.2f} passes over" in text and "passes over" not in format_plan(full)


def _tiny(*overrides, output_dir=None):
    return load_config(TINY, ["sae.architectures=[{name: topk, k: 4}]", *overrides], output_dir)


def test_a_seed_over_max_stack_bytes_is_refused_naming_the_field(capsys):
    one = stack_bytes_per_seed(32, 128, 256)
    with pytest.raises(PlanError, match=r"^train\.max_stack_bytes: one seed of TopK, k 4, 128 latents"):
        plan_run(_tiny(f"train.max_stack_bytes={one - 1}"))
    plan_run(_tiny(f"train.max_stack_bytes={one}"))  # exactly one seed fits
    assert main(["plan", str(TINY), "--set", f"train.max_stack_bytes={one - 1}"]) == 2
    assert "train.max_stack_bytes" in capsys.readouterr().err


def test_a_pair_over_node_memory_and_a_worker_over_gpu_memory_are_refused():
    from orchestrator.resources import compare_task_bytes

    node = (compare_task_bytes(128, 128, 32) + compare_task_bytes(64, 64, 32)) / 2 / 2**30
    with pytest.raises(PlanError, match=r"^plan\.node_memory_gib: matching a seed pair of TopK, k 4, 128 latents"):
        plan_run(_tiny(f"plan.node_memory_gib={node}"))
    plan_run(_tiny(f"plan.node_memory_gib={compare_task_bytes(128, 128, 32) / 2**30}"))
    # Both stacks dealt to one worker hold every SAE at once: too much for the GPU named; four workers fit.
    seeds = 3 * (stack_bytes_per_seed(32, 64, 256) + stack_bytes_per_seed(32, 128, 256))
    gpu = seeds / 2**30 * 0.9
    with pytest.raises(PlanError, match=r"^plan\.gpu_memory_gib: training worker 0 .* holds 6 SAEs"):
        plan_run(_tiny(f"plan.gpu_memory_gib={gpu}", "train.lm_eval_chunks=0"))
    plan_run(_tiny(f"plan.gpu_memory_gib={gpu}", "train.lm_eval_chunks=0", "train.num_workers=2"))


def test_a_relative_transformers_config_is_read_beside_the_yaml(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "c.json").write_text((PAPER / "models" / "pythia-160m.json").read_text())
    text = (PAPER / "pythia-160m-k-sweep.yaml").read_text().replace("models/pythia-160m.json", "m/c.json")
    (tmp_path / "x.yaml").write_text(text)
    cfg = load_config(tmp_path / "x.yaml")
    assert cfg.plan.transformers_config == str(tmp_path / "m" / "c.json")
    missing = load_config(tmp_path / "x.yaml", ["plan.transformers_config=/nonexistent/config.json"])
    with pytest.raises(PlanError, match=r"^plan\.transformers_config: "):
        plan_run(missing)


@pytest.mark.slow  # a whole pipeline (~1.5 min): run by CI's slow set (scripts/test.sh -m slow)
def test_the_plan_is_what_the_run_does(ray_local, tmp_path):
    """One real run whose width-128 seeds split into stacks of 2 + 1 over two workers: the plan's rows, shards,
    widths, stacks, SAEs and pair tasks against the run's manifests and tables."""
    from orchestrator.pipeline import run_experiment

    budget = 2 * stack_bytes_per_seed(32, 128, 256)
    cfg = _tiny(f"train.max_stack_bytes={budget}", "train.num_workers=2", "generate.num_tokens=8192",
                "train.checkpoint_tokens=[]", "train.lm_eval_chunks=0", output_dir=str(tmp_path / "out"))
    plan = plan_run(cfg)
    run_experiment(cfg)
    activations = json.loads((tmp_path / "out" / "activations" / "manifest.json").read_text())
    for src in plan.sources:
        entry = activations["hookpoints"][src.name]
        assert (entry["rows"], len(entry["shards"]), entry["d_in"]) == (src.rows, src.shards, src.d_in)
        assert max(s["rows"] for s in entry["shards"]) == src.shard_rows
    trained = json.loads((tmp_path / "out" / "saes" / "manifest.json").read_text())
    assert len(trained["saes"]) == plan.sae_count == 6
    for ts in plan.train:
        ran = trained["stacks"][ts.source]
        assert ran["workers"] == len(ts.workers) == 2
        assert [(s["configuration"], s["seeds"]) for s in ran["stacks"]] == \
            [(s["configuration"], s["seeds"]) for s in ts.stacks]
    assert sorted(len(s["seeds"]) for s in plan.train[0].stacks) == [1, 2, 3]
    pairs = pq.read_table(tmp_path / "out" / "overlap" / "pairs.parquet")
    assert pairs.num_rows == plan.tasks["pairs"] == 6
    metrics = [s["metrics"] for s in trained["saes"]]
    assert all(m["train_tokens"] == plan.sources[0].train_tokens for m in metrics)


def test_requests_no_node_can_hold_are_named():
    from orchestrator.sizing import cluster_warnings

    plan = build_plan(_tiny())
    pair = {c.width: c.task_bytes for c in plan.compare}
    worker = plan.train[0].request_bytes
    assert cluster_warnings(plan, [{"Alive": True, "Resources": {"memory": max(worker, *pair.values())}}]) == []
    nodes = [{"Alive": True, "Resources": {"memory": pair[128] - 1}}, {"Alive": False, "Resources": {"memory": 2**40}}]
    warnings = cluster_warnings(plan, nodes)  # a dead node counts for nothing
    assert [w for w in warnings if w.startswith("matching")] == [
        w for w in warnings if w.startswith("matching a seed pair of TopK, k 4, 128 latents")] != []
    assert any(w.startswith("training workers of gpt_neox.layers.0.mlp") for w in warnings) == (worker > pair[128] - 1)
