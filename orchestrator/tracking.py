"""MLflow tracking: the driver creates the experiment, a parent run, and one child run per SAE up front.

Workers get the tracking URI and their child run's id and log training curves to it; after comparison the
driver logs final metrics, tables and figures. Everything goes through `MlflowClient` with explicit run ids,
so no process depends on a global "active run" (nor on the fluent API's global tracking URI, which
`mlflow.set_tracking_uri` stores in MLFLOW_TRACKING_URI and would leak into the next experiment of a process).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from actors.store.checkpoint import FREQUENCY, load_firing_frequency

from .config import ExperimentConfig
from .figures import all_figures, log_density
from .plan import SAEConfiguration


def _flatten(prefix: str, data, out: dict) -> dict:
    if isinstance(data, dict):
        for k, v in data.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = data
    return out


class ExperimentTracker:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        # Config first, then the environment (how a cluster hands workers a tracking server), then local.
        configured = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        local = configured is None
        cfg.output_path.mkdir(parents=True, exist_ok=True)
        self.uri = configured or f"sqlite:///{cfg.output_path / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        name = cfg.tracking.experiment_name or cfg.name
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            artifacts = (cfg.output_path / "mlartifacts").as_uri() if local else None
            self.experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None
        self.child_ids: list[str] = []

    def start_parent(self) -> str:
        self.supersede_dead_attempts()
        run = self.client.create_run(self.experiment_id, run_name=self.cfg.name,
                                     tags={"sae_seeds.config_hash": self.cfg.content_hash(),
                                           "sae_seeds.output_dir": str(self.cfg.output_path.resolve())})
        self.parent_id = run.info.run_id
        params = _flatten("", self.cfg.model_dump(mode="json"), {})
        self.client.log_batch(self.parent_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        self.client.log_dict(self.parent_id, self.cfg.model_dump(mode="json"), "config.json")
        return self.parent_id

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
        param_names = sorted({k for c in configurations for k, _ in c.point.params})
        for c in configurations:
            for seed in c.seeds:
                run = self.client.create_run(
                    self.experiment_id, run_name=f"{c.name}/seed{seed}",
                    tags={"mlflow.parentRunId": self.parent_id, "sae_seeds.configuration": c.name})
                values = dict(c.point.params)
                params = {"hookpoint": c.hookpoint, "architecture": c.point.architecture, "width": c.point.width,
                          "seed": seed, "data_seed": self.cfg.train.data_seed,
                          **{p: values.get(p, "-") for p in param_names}}
                self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
                c.run_ids[seed] = run.info.run_id
                self.child_ids.append(run.info.run_id)

    def log_generate(self, manifest: dict) -> None:
        """Generate-stage throughput and data counts on the parent run; per-shard tokens/s with step = shard id."""
        now = int(time.time() * 1000)
        t = manifest.get("throughput", {})
        metrics = [Metric(f"generate.{k}", float(v), now, 0) for k, v in t.items() if v is not None]
        metrics += [Metric(f"generate.corpus_{k}", float(v), now, 0) for k, v in manifest.get("corpus", {}).items()]
        metrics.append(Metric("generate.num_tokens", float(manifest["num_tokens"]), now, 0))
        for h, entry in manifest["hookpoints"].items():
            key = h.replace("/", ".")
            metrics += [Metric(f"generate.mean_norm.{key}", float(entry["mean_norm"]), now, 0),
                        Metric(f"generate.nonfinite_rows.{key}", float(entry["nonfinite_rows"]), now, 0)]
        # Shards are recorded under every hookpoint with the same timing; one hookpoint's list has them all.
        first = next(iter(manifest["hookpoints"].values()))
        metrics += [Metric("generate.shard_tokens_per_s", float(s["tokens_per_s"]), now, s["shard_id"])
                    for s in first["shards"]]
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            self.client.log_batch(self.parent_id, metrics=metrics[i:i + 1000])
        self.client.log_dict(self.parent_id, manifest, "activations/manifest.json")

    def log_results(self, train_manifest: dict, compare: dict) -> None:
        now = int(time.time() * 1000)
        confs = compare["manifest"]["configurations"]
        for sae in train_manifest["saes"]:
            m = sae["metrics"]
            conf = confs[sae["configuration"]]
            metrics = {"fvu": m["fvu"], "l0": m["l0"], "dead_fraction": m["dead_fraction"],
                       "mean_shared_fraction": conf["mean_shared_per_seed"][sae["seed"]],
                       **{f"config_mean_{k}": v for k, v in conf["pair_means"].items()},
                       "chance_shared_init": conf["chance"].get("init_shared", float("nan")),
                       "chance_shared_rotation": conf["chance"].get("rotation_shared", float("nan")),
                       "train_tokens": m["train_tokens"],
                       # L1-style SAEs trained for a target L0: the target, the coefficient training started
                       # from (and its probe's L0) and the one it ended with; `l0` is the L0 reached
                       **{k: m[k] for k in ("target_l0", "initial_l1_coefficient", "calibration_probe_l0",
                                            "calibrated_l1_coefficient", "ce_delta", "ce_recovered") if k in m}}
            # Through training: step = training tokens, so the run's chart plots shared fraction against tokens.
            curve = [Metric("shared_fraction_vs_tokens", p["shared"], now, p["tokens"])
                     for p in conf.get("through_training_per_seed", {}).get(sae["seed"], [])]
            self.client.log_batch(sae["run_id"], metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
                                  + curve)
            frequency = load_firing_frequency(sae["path"])
            if frequency is not None:  # per-latent firing frequency: the file and its log-density histogram
                self.client.log_artifact(sae["run_id"], str(Path(sae["path"]) / FREQUENCY))
                fig = log_density(frequency, f"{sae['configuration']}/seed{sae['seed']}")
                self.client.log_figure(sae["run_id"], fig, "log_density.png")
                plt.close(fig)
            self.client.set_terminated(sae["run_id"], RunStatus.to_string(RunStatus.FINISHED))

        for name, frame in compare["tables"].items():
            if name != "sweeps":  # the sweeps are long; they stay in overlap/sweeps.parquet
                self.client.log_table(self.parent_id, frame, artifact_file=f"tables/{name}.json")
        for name, c in confs.items():
            self.client.log_metric(self.parent_id, f"shared_mean.{name.replace('/', '.')}", c["shared_mean"], now)
        for path, fig in all_figures(confs, compare["manifest"]["threshold"]).items():
            self.client.log_figure(self.parent_id, fig, path)
            plt.close(fig)
        self.client.log_artifacts(self.parent_id, str(self.cfg.output_path / "overlap"), "overlap")

    def finish(self, ok: bool) -> None:
        """Close the parent; on failure also every child still open, so none is left RUNNING."""
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        if not ok:
            for run_id in self.child_ids:
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, status)
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status)
