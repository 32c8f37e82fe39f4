"""MLflow tracking: the driver creates the experiment, a parent run, and one child run per SAE up front.

Workers get the tracking URI and their child run's id and log training curves to it; after comparison the
driver logs final metrics, tables and figures. Everything goes through `MlflowClient` with explicit run ids,
so no process depends on a global "active run" (nor on the fluent API's global tracking URI, which
`mlflow.set_tracking_uri` stores in MLFLOW_TRACKING_URI and would leak into the next experiment of a process).

What a reader sees (docs/mlflow.md): an experiment `sae-seeds/<config name>` that opens on its runs table; one child
run per SAE named `topk k16 · 512 · seed 0`; per-SAE numbers on the children, per-configuration numbers on the
parent as `<quantity>/<configuration>`, run bookkeeping under `pipeline.`. The tables below are the one place
that names each quantity.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url
from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL, MLFLOW_RUN_NOTE,
                                      MLFLOW_SOURCE_NAME)

from actors.store.checkpoint import FREQUENCY, load_firing_frequency

from .config import ExperimentConfig
from .figures import all_figures, log_density, log_density_data
from .plan import SAEConfiguration, describe, file_slug, short_name

EXPERIMENT_PREFIX = "sae-seeds/"
BOOKKEEPING = "pipeline."  # prefix of everything about how the run ran rather than what it found
NOT_SET = "-"  # a parameter that is unset or does not apply (e.g. `k` of a ReLU+L1 SAE)

# Per-SAE results (metrics.json key -> MLflow metric of the child run); the parent has each one's mean over
# seeds as `<name>/<configuration>`.
PER_SAE = {"fvu": "fvu", "l0": "l0", "dead_fraction": "dead_fraction", "ce_delta": "ce_delta",
           "ce_recovered": "ce_recovered"}
# Per-configuration values (the same for every seed of a configuration): parent only, as `<name>/<configuration>`.
# Each reads the compare manifest's entry for the configuration and its seeds' metrics.json. Every mean of a
# pair statistic (`pair_means`: equal_fraction, decoder_shared_fraction, ...) is added under the pairs table's
# column name.
PER_CONFIGURATION = {
    "std_shared_fraction": lambda conf, metrics: conf["shared_std"],
    "chance_shared_fraction_init": lambda conf, metrics: conf["chance"].get("init_shared"),
    "chance_shared_fraction_rotation": lambda conf, metrics: conf["chance"].get("rotation_shared"),
    # L1-style SAEs steered to a target L0: the coefficient training started from and its probe's L0
    "initial_l1_coefficient": lambda conf, metrics: metrics[0].get("initial_l1_coefficient"),
    "calibration_probe_l0": lambda conf, metrics: metrics[0].get("calibration_probe_l0"),
}
# Config fields about how the run ran (placement, resources, logging, retries): parent params under BOOKKEEPING.
BOOKKEEPING_PARAMS = ("output_dir", "ray.", "tracking.", "plan.", "generate.output_uri", "generate.num_actors",
                      "generate.gpus_per_actor", "generate.cpus_per_actor", "generate.device_map",
                      "generate.shard_tokens", "generate.batch_size", "train.deepspeed.", "train.num_workers",
                      "train.cpus_per_worker", "train.use_gpu", "train.log_every", "train.state_every_tokens",
                      "train.max_failures", "train.stack_seeds", "train.max_stack_bytes", "compare.cpus_per_task")
# The runs table's preset columns (a shared view, see `runs_table_url`) and the default order.
VIEW_COLUMNS = ["params.`architecture`", "params.`width`", "params.`k`", "params.`target_l0`", "params.`seed`",
                "metrics.`mean_shared_fraction`", "metrics.`fvu`", "metrics.`l0`", "metrics.`dead_fraction`"]
# A shared view (the UI's "Share" state, an experiment tag the URL names): these columns, and the child runs
# grouped by configuration (each group's row shows the means over its seeds; the parent is under "Additional runs").
VIEW = {"selectedColumns": VIEW_COLUMNS,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "configuration"}]}}
VIEW_KEY = "sae_seeds_results"


def _flatten(prefix: str, data, out: dict) -> dict:
    if isinstance(data, dict):
        for k, v in data.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = data
    return out


def _param_name(path: str) -> str:
    return BOOKKEEPING + path if path.startswith(BOOKKEEPING_PARAMS) else path


def _value(v) -> str:
    return NOT_SET if v is None else str(v)[:6000]


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags as its fluent API sets them (user, source name and type), with the git
    commit, branch and remote of this project's code (the entry script may live outside the repository)."""
    tags = resolve_tags()
    code = str(Path(__file__).resolve().parent)
    git = {MLFLOW_GIT_COMMIT: get_git_commit(code), MLFLOW_GIT_BRANCH: get_git_branch(code),
           MLFLOW_GIT_REPO_URL: get_git_repo_url(code)}
    tags |= {k: v for k, v in git.items() if v}
    if tags.get(MLFLOW_SOURCE_NAME) in (None, "", "-c", "-m"):
        tags[MLFLOW_SOURCE_NAME] = "sae-seeds"
    return tags


def runs_table_url(base: str, experiment) -> str:
    """The experiment's runs table in MLflow's model-training mode, with the preset columns of its shared view."""
    key = f"&viewStateShareKey={VIEW_KEY}" if f"mlflow.sharedViewState.{VIEW_KEY}" in experiment.tags else ""
    return f"{base.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning{key}"


class ExperimentTracker:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        # Config first, then the environment (how a cluster hands workers a tracking server), then local.
        configured = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        local = configured is None
        cfg.output_path.mkdir(parents=True, exist_ok=True)
        self.uri = configured or f"sqlite:///{cfg.output_path / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.experiment_name = cfg.tracking.experiment_name or EXPERIMENT_PREFIX + cfg.name
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            artifacts = (cfg.output_path / "mlartifacts").as_uri() if local else None
            self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id
        # The UI opens a "custom model development" experiment on its runs table, not the GenAI overview.
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        self.client.set_experiment_tag(self.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(VIEW))
        if local:
            self._hide_empty_default_experiment()
        self.parent_id: str | None = None
        self.child_ids: list[str] = []
        self.tags = source_tags()

    def _hide_empty_default_experiment(self) -> None:
        """MLflow creates an empty "Default" experiment in every new store; in the store this run owns it would
        sit next to ours on the home page. Deleted (restorable) only while it holds no run."""
        default = self.client.get_experiment("0")
        if default and default.lifecycle_stage == "active" and not self.client.search_runs(["0"], max_results=1):
            self.client.delete_experiment("0")

    @property
    def experiment(self):
        return self.client.get_experiment(self.experiment_id)

    def ui_url(self, base: str = "http://127.0.0.1:5000") -> str:
        return runs_table_url(self.uri if self.uri.startswith("http") else base, self.experiment)

    def start_parent(self) -> str:
        self.supersede_dead_attempts()
        run = self.client.create_run(self.experiment_id, run_name=f"{self.cfg.name} (running)",
                                     tags=self.tags | {"sae_seeds.config_hash": self.cfg.content_hash(),
                                                       "sae_seeds.output_dir": str(self.cfg.output_path.resolve())})
        self.parent_id = run.info.run_id
        # Set values now; unset ones once generate has resolved them (`log_generate`).
        params = _flatten("", self.cfg.model_dump(mode="json"), {})
        self.client.log_batch(self.parent_id, params=[Param(_param_name(k), _value(v))
                                                      for k, v in sorted(params.items()) if v is not None])
        self.client.log_dict(self.parent_id, self.cfg.model_dump(mode="json"), "config.json")
        return self.parent_id

    def _resolved_params(self, manifest: dict) -> dict:
        """The parent's unset config fields at the values the run used (or what decides them)."""
        t = self.cfg.train
        tokens = t.tokens or manifest["num_tokens"]
        from actors.train.trainer import dead_window_tokens

        resolved = {"train.tokens": tokens, "train.lr": "architecture recipe (see each child's lr)",
                    "train.dead_window_tokens": dead_window_tokens(None, tokens),
                    "train.state_every_tokens": tokens // 10, "generate.output_uri": manifest["root"],
                    "output_dir": str(self.cfg.output_path), "tracking.tracking_uri": self.uri,
                    "tracking.experiment_name": self.experiment_name,
                    "ray.address": "a new local instance", "train.use_gpu": "when the cluster has a GPU"}
        params = _flatten("", self.cfg.model_dump(mode="json"), {})
        return {_param_name(k): _value(resolved.get(k)) for k, v in params.items() if v is None}

    def supersede_dead_attempts(self) -> list[str]:
        """Mark KILLED the runs an earlier attempt at this experiment (same config hash, same output folder) left
        RUNNING: a driver that is killed never closes them, and this attempt replaces it. Returns their ids."""
        status = RunStatus.to_string(RunStatus.KILLED)
        output = str(self.cfg.output_path.resolve())
        # A parent left RUNNING marks a dead attempt (a finished or failed one closed its children too).
        parents = self.client.search_runs(
            [self.experiment_id], f"tags.sae_seeds.config_hash = '{self.cfg.content_hash()}' and "
                                  "attributes.status = 'RUNNING'", max_results=50000)
        killed = []
        for parent in parents:
            if parent.data.tags.get("sae_seeds.output_dir", output) != output:
                continue  # the same experiment run into another folder (a shared tracking server)
            children = self.client.search_runs(
                [self.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                      "attributes.status = 'RUNNING'", max_results=50000)
            for run in [*children, parent]:
                self.client.set_terminated(run.info.run_id, status)
                killed.append(run.info.run_id)
        return killed

    def create_child_runs(self, configurations: list[SAEConfiguration]) -> None:
        # Identical param keys on every child so MLflow's compare view can plot across architectures.
        # `lr` (an architecture's own, or the recipe's) is logged once trained, as the rate the SAE trained with.
        param_names = sorted({k for c in configurations for k, _ in c.point.params} - {"lr"})
        several_hookpoints = len({c.hookpoint for c in configurations}) > 1
        n_seeds = len(self.cfg.sae.seeds)
        self.client.update_run(self.parent_id, name=f"{self.cfg.name}: {len(configurations) * n_seeds} SAEs "
                               f"({len(configurations)} configurations × {n_seeds} seeds)")
        for c in configurations:
            for seed in c.seeds:
                run = self.client.create_run(
                    self.experiment_id, run_name=c.run_name(seed, several_hookpoints),
                    tags=self.tags | {"mlflow.parentRunId": self.parent_id, "hookpoint": c.hookpoint,
                                      "configuration": f"{c.hookpoint}: {c.title}" if several_hookpoints else c.title,
                                      "sae_seeds.configuration": c.name})
                values = dict(c.point.params)
                # Hyper-parameters still open (a coefficient steered to a target L0) are logged after training,
                # at the value the SAE was trained with.
                params = {"hookpoint": c.hookpoint, "architecture": c.point.architecture, "width": c.point.width,
                          "seed": seed, "data_seed": self.cfg.train.data_seed,
                          **{p: values.get(p, NOT_SET) for p in param_names if values.get(p, NOT_SET) is not None}}
                self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
                c.run_ids[seed] = run.info.run_id
                self.child_ids.append(run.info.run_id)

    def log_generate(self, manifest: dict) -> None:
        """Generate-stage throughput and data counts on the parent run; per-shard tokens/s with step = shard id."""
        now = int(time.time() * 1000)
        g = BOOKKEEPING + "generate."
        t = manifest.get("throughput", {})
        metrics = [Metric(f"{g}{k}", float(v), now, 0) for k, v in t.items() if v is not None]
        metrics += [Metric(f"{g}corpus_{k}", float(v), now, 0) for k, v in manifest.get("corpus", {}).items()]
        metrics.append(Metric(f"{g}num_tokens", float(manifest["num_tokens"]), now, 0))
        for h, entry in manifest["hookpoints"].items():
            key = h.replace("/", ".")
            metrics += [Metric(f"{g}mean_norm.{key}", float(entry["mean_norm"]), now, 0),
                        Metric(f"{g}nonfinite_rows.{key}", float(entry["nonfinite_rows"]), now, 0)]
        # Shards are recorded under every hookpoint with the same timing; one hookpoint's list has them all.
        first = next(iter(manifest["hookpoints"].values()))
        metrics += [Metric(f"{g}shard_tokens_per_s", float(s["tokens_per_s"]), now, s["shard_id"])
                    for s in first["shards"]]
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.parent_id, metrics=metrics[i:i + 1000])
        params = [Param(k, v) for k, v in sorted(self._resolved_params(manifest).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.parent_id, params=params[i:i + 100])
        self.client.log_dict(self.parent_id, manifest, "activations/manifest.json")

    def log_timings(self, timings: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[Metric(f"{BOOKKEEPING}seconds.{stage}", float(s), now, 0)
                                                       for stage, s in timings.items()])

    def log_results(self, train_manifest: dict, compare: dict) -> None:
        now = int(time.time() * 1000)
        confs = compare["manifest"]["configurations"]
        for sae in train_manifest["saes"]:
            m = sae["metrics"]
            conf = confs[sae["configuration"]]
            metrics = {name: m[key] for key, name in PER_SAE.items() if key in m}
            metrics["mean_shared_fraction"] = conf["mean_shared_per_seed"][sae["seed"]]
            # Through training: step = training tokens, as for the training curves.
            curve = [Metric("shared_fraction_vs_tokens", p["shared"], now, p["tokens"])
                     for p in conf.get("through_training_per_seed", {}).get(sae["seed"], [])]
            self.client.log_batch(sae["run_id"], metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
                                  + curve, params=self._trained_params(sae))
            frequency = load_firing_frequency(sae["path"])
            if frequency is not None:  # per-latent firing frequency: the file and its log-density histogram
                self.client.log_artifact(sae["run_id"], str(Path(sae["path"]) / FREQUENCY))
                title = f"{describe(sae['architecture'], sae['params'], sae['width'])}, seed {sae['seed']}"
                fig = log_density(frequency, title)
                self.client.log_figure(sae["run_id"], fig, "log_density.png")
                plt.close(fig)
                self.client.log_dict(sae["run_id"], log_density_data(frequency), "log_density.json")
            self.client.set_terminated(sae["run_id"], RunStatus.to_string(RunStatus.FINISHED))

        self.client.log_batch(self.parent_id, metrics=self._per_configuration(train_manifest, confs, now))
        for name, frame in compare["tables"].items():
            if name != "sweeps":  # the sweeps are long; they stay in overlap/sweeps.parquet
                self.client.log_table(self.parent_id, frame, artifact_file=f"tables/{name}.json")
        summary = summary_frame(train_manifest, compare)
        self.client.log_table(self.parent_id, summary, artifact_file="tables/summary.json")
        figures = all_figures(confs, compare["manifest"]["threshold"])
        for path, fig in figures.items():
            self.client.log_figure(self.parent_id, fig, path)
            plt.close(fig)
        self.client.log_artifacts(self.parent_id, str(self.cfg.output_path / "overlap"), "overlap")
        self.client.set_tag(self.parent_id, MLFLOW_RUN_NOTE, self._note(summary, list(figures)))

    def _trained_params(self, sae: dict) -> list[Param]:
        """What training settled: the effective learning rate, the tokens trained on, and hyper-parameters that
        were open before (the L1 coefficient steered to a target L0, at its final value)."""
        saved = json.loads((Path(sae["path"]) / "cfg.json").read_text())
        params = {"lr": saved["lr"], "tokens": sae["metrics"]["train_tokens"]}
        params |= {k: _value(saved["params"].get(k)) for k, v in sae["params"].items() if v is None and k != "lr"}
        return [Param(k, str(v)) for k, v in params.items()]

    def _per_configuration(self, train_manifest: dict, confs: dict, now: int) -> list[Metric]:
        several_hookpoints = len({c["hookpoint"] for c in confs.values()}) > 1
        out = []
        for name, conf in confs.items():
            key = configuration_key(conf, several_hookpoints)
            metrics = [s["metrics"] for s in train_manifest["saes"] if s["configuration"] == name]
            values = {"mean_shared_fraction": conf["shared_mean"]}
            values |= {q: np.mean([m[k] for m in metrics]) for k, q in PER_SAE.items() if all(k in m for m in metrics)}
            values |= {q: read(conf, metrics) for q, read in PER_CONFIGURATION.items()}
            values |= conf["pair_means"]
            out += [Metric(f"{q}/{key}", float(v), now, 0) for q, v in values.items() if v is not None]
        return out

    def _note(self, summary, figures: list[str]) -> str:
        """The parent run's description (MLflow shows it on the run page): what it holds and how to read it."""
        main = [f for f in ("figures/shared_vs_width.png", "figures/shared_vs_tokens.png",
                            "figures/exactly_k_seeds.png", "figures/no_other_seed.png",
                            "figures/frequency_vs_stability.png") if f in figures]
        seeds = ", ".join(map(str, self.cfg.sae.seeds))
        return "\n".join([
            f"**{self.cfg.name}**: SAEs that differ only in their init seed ({seeds}), trained on the same "
            "activations in the same order. A latent is *shared* with another seed's SAE when both its matched "
            f"encoder and decoder cosines exceed {self.cfg.compare.threshold}.",
            "",
            markdown_table(summary),
            "",
            "**Figures** (Artifacts tab of this run): " + ", ".join(f"`{f}`" for f in main) + ".",
            "",
            "**Compare**: the experiment's runs table (the URL the run printed) lists one child run per SAE, "
            "grouped by configuration; tick runs and press *Compare*, or open the chart view (e.g. a scatter of "
            "`width` against `mean_shared_fraction`). Per-configuration values are this run's metrics "
            "`<quantity>/<configuration>`; "
            "how the run ran is under `pipeline.`. See docs/mlflow.md.",
        ])

    def finish(self, ok: bool) -> None:
        """Close the parent; on failure also every child still open, so none is left RUNNING."""
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        if not ok:
            for run_id in self.child_ids:
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, status)
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status)


def configuration_key(conf: dict, with_hookpoint: bool = False) -> str:
    """A configuration in a metric key: `topk-k16-512` (the hookpoint first when the experiment has several)."""
    key = file_slug(short_name(conf["architecture"], conf["params"], conf["width"]))
    return f"{file_slug(conf['hookpoint'])}-{key}" if with_hookpoint else key


def summary_frame(train_manifest: dict, compare: dict):
    """One row per configuration, in plain words, under the names MLflow uses for the same quantities."""
    import pandas as pd

    rows = []
    confs = compare["manifest"]["configurations"]
    several_hookpoints = len({c["hookpoint"] for c in confs.values()}) > 1
    for name, c in confs.items():
        saes = [s for s in train_manifest["saes"] if s["configuration"] == name]
        rows.append({
            **({"hookpoint": c["hookpoint"]} if several_hookpoints else {}),
            "configuration": describe(c["architecture"], c["params"], c["width"]), "seeds": len(saes),
            "mean_shared_fraction": f"{c['shared_mean']:.3f} ± {c['shared_std']:.3f}",
            "chance (init/rotation)": "{:.3f}/{:.3f}".format(c["chance"].get("init_shared", float("nan")),
                                                               c["chance"].get("rotation_shared", float("nan"))),
            **{q: float(np.mean([s["metrics"][k] for s in saes])) for k, q in PER_SAE.items()
               if k in ("fvu", "l0", "dead_fraction")},
            "certified": "yes" if c.get("certified", True) else "NO",
        })
        truth = c.get("ground_truth")
        if truth:  # a source with planted features: are the shared latents the true ones?
            rows[-1] |= {"recovered": truth.get("recovered_mean", float("nan")),
                         "precision shared": truth.get("precision_shared", float("nan")),
                         "precision orphan": truth.get("precision_orphan", float("nan"))}
    return pd.DataFrame(rows)


def markdown_table(frame) -> str:
    """A DataFrame as a Markdown table (pandas' `to_markdown` needs the optional `tabulate`)."""
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
