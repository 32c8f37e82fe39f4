"""What a researcher sees in MLflow: the pipeline's store queried with `MlflowClient` (names, parameters, one name
per quantity, numbers that agree with the artifacts they come from).

The run: tiny.yaml with one width, two seeds, TopK and ReLU+L1 steered to a target L0 (the case whose L1
coefficient is only known after training)."""

import json
import math
import re
import subprocess

import pytest
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file

from orchestrator.config import load_config
from orchestrator.pipeline import run_experiment
from orchestrator.tracking import PER_CONFIGURATION, runs_table_url

from .conftest import REPO, TINY

ARCHITECTURES = "sae.architectures=[{name: topk, k: 4}, {name: relu_l1, target_l0: 8}]"

# tiny.yaml generates 16,384 tokens; an eighth of them (at most train.eval_tokens) is held out for evaluation.
TRAIN_TOKENS = 16384 - 16384 // 8


@pytest.fixture(scope="module")
def views_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("views")
    cfg = load_config(TINY, ["sae.widths=[64]", "sae.seeds=[0,1]", ARCHITECTURES], str(out))
    result = run_experiment(cfg)
    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([result["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    return cfg, result, client, parent, children


def test_experiment_and_runs_are_named_for_what_they_hold(views_run):
    cfg, result, client, parent, children = views_run
    exp = client.get_experiment(result["experiment_id"])
    assert exp.name == "sae-seeds/tiny"  # never mistaken for MLflow's own "Default"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    assert sorted(r.info.run_name for r in children) == sorted([
        "topk k4 · 64 · seed 0", "topk k4 · 64 · seed 1", "relu_l1 L0 8 · 64 · seed 0", "relu_l1 L0 8 · 64 · seed 1"])
    assert parent.info.run_name == "tiny: 4 SAEs (2 configurations × 2 seeds)"
    note = parent.data.tags["mlflow.note.content"]
    assert "| TopK, k 4, 64 latents |" in note and "| ReLU+L1, L0 target 8, 64 latents |" in note
    assert "figures/shared_vs_width.png" in note
    for run in children:  # the hookpoint is a param and a tag, not part of the name
        assert run.data.params["hookpoint"] == run.data.tags["hookpoint"] == "gpt_neox.layers.0.mlp"
    # MLflow's standard source tags, as the fluent API would set them.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    for run in [parent, *children]:
        assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.source.type"] == "LOCAL"
        if head.returncode == 0:
            assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()


def test_no_parameter_is_left_unresolved(views_run):
    _, _, _, parent, children = views_run
    for run in [parent, *children]:
        unresolved = {k: v for k, v in run.data.params.items() if v.strip().lower() in ("none", "null", "")}
        assert not unresolved, (run.info.run_name, unresolved)
    # The effective learning rate and training tokens are on every child.
    for run in children:
        assert float(run.data.params["lr"]) > 0 and int(run.data.params["tokens"]) == TRAIN_TOKENS


def test_one_name_per_quantity(views_run):
    _, _, _, parent, children = views_run
    params = {frozenset(r.data.params) for r in children}
    metrics = {frozenset(r.data.metrics) for r in children}
    assert len(params) == 1 and len(metrics) == 1  # the compare view wants identical keys
    [params], [metrics] = params, metrics
    for run in [parent, *children]:
        assert not set(run.data.params) & set(run.data.metrics), run.info.run_name  # e.g. target_l0
    # Per-configuration values live on the parent only, keyed `<quantity>/<configuration>`.
    for name in PER_CONFIGURATION:
        assert name not in metrics
    per_conf = {k.split("/")[0] for k in parent.data.metrics if "/" in k and not k.startswith("pipeline")}
    assert {"mean_shared_fraction", "equal_fraction", "chance_shared_fraction_rotation"} <= per_conf
    assert not {"config_mean_equal_fraction", "calibrated_l1_coefficient"} & (metrics | per_conf)
    # The same quantity has the same name on both: the parent's per-configuration mean of the children's values.
    for slug, runs in (("topk-k4-64", [r for r in children if r.data.params["architecture"] == "topk"]),
                       ("relu_l1-L0-8-64", [r for r in children if r.data.params["architecture"] == "relu_l1"])):
        mean = sum(r.data.metrics["mean_shared_fraction"] for r in runs) / len(runs)
        assert parent.data.metrics[f"mean_shared_fraction/{slug}"] == pytest.approx(mean)
    # Bookkeeping under one prefix.
    assert {"pipeline.seconds.train", "pipeline.generate.tokens_per_s"} <= set(parent.data.metrics)
    assert not [k for k in parent.data.metrics if re.match(r"(generate|seconds|ray)\.", k)]
    assert not [k for k in parent.data.params if re.match(r"(ray|tracking)\.|train\.deepspeed", k)]


def test_l1_coefficient_param_is_the_coefficient_used(views_run):
    cfg, _, _, _, children = views_run
    saes = {s["run_id"]: s for s in json.loads((cfg.output_path / "saes" / "manifest.json").read_text())["saes"]}
    relu = [r for r in children if r.data.params["architecture"] == "relu_l1"]
    assert relu
    for run in relu:
        saved = json.loads((cfg.output_path / saes[run.info.run_id]["path"] / "cfg.json").read_text())
        assert float(run.data.params["l1_coefficient"]) == pytest.approx(saved["params"]["l1_coefficient"])
        assert float(run.data.params["target_l0"]) == 8
    for run in children:
        if run.data.params["architecture"] == "topk":
            assert run.data.params["l1_coefficient"] == "-" and run.data.params["k"] == "4"


def test_dead_fraction_agrees_with_the_log_density_data(views_run, tmp_path):
    _, _, client, _, children = views_run
    for run in children:
        folder = tmp_path / run.info.run_id
        folder.mkdir()
        frequency = load_file(client.download_artifacts(run.info.run_id, "firing_frequency.safetensors",
                                                        str(folder)))["firing_frequency"]
        never_fired = int((frequency == 0).sum())
        assert run.data.metrics["dead_fraction"] * frequency.size == pytest.approx(never_fired)
        data = json.loads(open(client.download_artifacts(run.info.run_id, "log_density.json", str(folder))).read())
        assert data["never_fired"] == never_fired and data["latents"] == frequency.size
        assert sum(data["counts"]) + never_fired == frequency.size


def test_training_curves_are_stepped_by_tokens(views_run):
    cfg, _, client, _, children = views_run
    for run in children:
        for key in ("train/fvu", "train/l0"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps[-1] == int(run.data.params["tokens"]) == TRAIN_TOKENS
            assert all(s % cfg.train.batch_size == 0 for s in steps) and len(steps) >= 2
        assert "train/loss" not in run.data.metrics  # not comparable across architectures: `train/objective`
        through = [m.step for m in client.get_metric_history(run.info.run_id, "shared_fraction_vs_tokens")]
        assert max(through) == TRAIN_TOKENS  # the same unit as the training curves


def test_preset_view_names_existing_columns(views_run):
    _, result, client, _, children = views_run
    exp = client.get_experiment(result["experiment_id"])
    url = runs_table_url("http://127.0.0.1:5000", exp)
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?")
    key = re.search(r"viewStateShareKey=(\w+)", url).group(1)
    state = json.loads(exp.tags[f"mlflow.sharedViewState.{key}"])
    columns = state["selectedColumns"]
    run = children[0]
    for column in columns:
        kind, name = re.fullmatch(r"(\w+)\.`(.+)`", column).groups()
        assert name in {"params": run.data.params, "metrics": run.data.metrics,
                        "tags": run.data.tags, "attributes": {"Source": 1, "Models": 1, "Dataset": 1}}[kind], column
    assert {"metrics.`mean_shared_fraction`", "metrics.`fvu`", "metrics.`l0`", "metrics.`dead_fraction`",
            "params.`architecture`", "params.`width`", "params.`seed`"} <= set(columns)
    assert not math.isnan(run.data.metrics["mean_shared_fraction"])


# ---- labels and figures, without a pipeline run ----

def _configuration(arch: str, params: dict, width: int, hookpoint: str = "gpt_neox.layers.0.mlp") -> dict:
    return {"hookpoint": hookpoint, "architecture": arch, "params": params, "width": width, "seeds": [0, 1, 2],
            "shared_matrix": [[1, 0.5, 0.4], [0.5, 1, 0.3], [0.4, 0.3, 1]], "shared_mean": 0.4, "shared_std": 0.1,
            "chance": {"init_shared": 0.0, "rotation_shared": 0.0}, "matched_cos": {"encoder": [0.1, 0.8],
                                                                                    "decoder": [0.2, 0.9]},
            "nway_counts": [[10, 20, 34], [12, 20, 32], [11, 21, 32]],
            "no_other_seed_curve": [{"n_seeds": 2, "mean": 0.3, "std": 0.0}, {"n_seeds": 3, "mean": 0.2, "std": 0.0}],
            "sweep_mean": {"threshold": [0.5, 0.7], "shared": [0.6, 0.4]}, "frequency_stability": None,
            "through_training": [{"tokens": 2048, "mean": 0.0, "std": 0.0}, {"tokens": 16384, "mean": 0.0, "std": 0.0}]}


def test_labels_are_plain_words_and_run_names_lead_with_what_differs():
    from orchestrator.plan import GridPoint, SAEConfiguration, describe

    assert describe("relu_l1", {"l1_coefficient": None, "target_l0": 16.0}, 512) == "ReLU+L1, L0 target 16, 512 latents"
    assert describe("topk", {"k": 16, "auxk_alpha": 0.0}, 512) == "TopK, k 16, 512 latents"
    c = SAEConfiguration("gpt_neox.layers.1.mlp", GridPoint("topk", (("auxk_alpha", 0.0), ("k", 16)), 512), [0], REPO)
    assert c.run_name(0) == "topk k16 · 512 · seed 0"
    assert c.run_name(3, with_hookpoint=True) == "topk k16 · 512 · seed 3 · gpt_neox.layers.1.mlp"


def test_figures_read_without_help():
    from matplotlib.lines import Line2D

    from orchestrator.figures import all_figures, log_density

    confs = {"a": _configuration("topk", {"k": 4, "auxk_alpha": 0.0}, 64),
             "b": _configuration("relu_l1", {"l1_coefficient": None, "target_l0": 8.0}, 64),
             "c": _configuration("topk", {"k": 4, "auxk_alpha": 0.0}, 128)}
    figs = all_figures(confs, 0.7)
    for fig in figs.values():
        fig.canvas.draw()
    width = figs["figures/shared_vs_width.png"]
    assert width._suptitle.get_text() and [ax.get_title() for ax in width.axes] == ["ReLU+L1", "TopK"]
    legend = [t.get_text() for ax in width.axes for t in ax.get_legend().get_texts()]
    assert "TopK, k 4" in legend and "ReLU+L1, L0 target 8" in legend
    assert any("chance" in t for t in legend)
    for name in ("exactly_k_seeds", "no_other_seed"):  # counts: integer ticks only
        ax = figs[f"figures/{name}.png"].axes[0]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
        handles = ax.get_legend_handles_labels()[0]
        markers = {(h if isinstance(h, Line2D) else h[0]).get_marker() for h in handles}
        assert len(markers) == len(handles) == 3  # coinciding lines stay visible
    tokens = figs["figures/shared_vs_tokens.png"].axes[0]
    assert [t.get_text() for t in tokens.get_xticklabels()] == ["2,048", "16,384"]
    hist = next(f for p, f in figs.items() if p.startswith("figures/matched_cos_"))
    assert any(isinstance(h, Line2D) and "threshold 0.7" in h.get_label()
               for h in hist.axes[0].get_legend().legend_handles)
    assert {p for p in figs if p.startswith("figures/heatmap_")} == {
        "figures/heatmap_topk-k4-64.png", "figures/heatmap_relu_l1-L0-8-64.png", "figures/heatmap_topk-k4-128.png"}
    import numpy as np

    fig = log_density(np.array([0, 0, 0.5, 0.01], dtype=np.float32), "TopK, k 4, 4 latents, seed 0")
    assert "2 of 4 latents never fired" in fig.axes[0].get_title()


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="needs Debian's chromium")
def test_printed_url_opens_the_runs_table_with_the_child_runs(views_run, tmp_path):
    """Headless Chromium on the URL `sae-seeds run` prints (scripts/check_mlflow_ui.py, served by `mlflow server`):
    the rendered page lists every child run by name, grouped by configuration, and the preset columns."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from check_mlflow_ui import check, mlflow_server, render

    _, result, client, _, children = views_run
    exp = client.get_experiment(result["experiment_id"])
    with mlflow_server(result["tracking_uri"], tmp_path) as base:
        dom = render(runs_table_url(base, exp), tmp_path)
    assert check(dom, [r.info.run_name for r in children]) == []
    assert "Group: TopK, k 4, 64 latents" in dom or "TopK, k 4, 64 latents" in dom
    for column in ("mean_shared_fraction", "dead_fraction", "architecture"):
        assert column in dom
