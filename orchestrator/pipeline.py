"""The Ray driver: config -> plan -> generate -> train -> compare -> MLflow, then a summary."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

import pandas as pd
import ray

from .config import ExperimentConfig
from .console import own_local_instance, quiet_driver, ray_init_options, stage_progress
from .output_folder import claim_output_folder
from .known_answer_tracking import log_known_answer, tag_uncertified
from .plan import describe, plan_configurations
from .preflight import preflight
from .sizing import cluster_warnings, format_plan, plan_run
from .stages.compare import run_compare
from .stages.generate import run_generate
from .stages.train import run_train
from .tracking import ExperimentTracker, summary_frame

log = logging.getLogger(__name__)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@contextmanager
def _single_machine_mode(bind_address: str | None):
    """Ray binds every service of a node to that node's address, but turns a loopback node address into the
    machine's network address unless its cluster mode is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the mode Ray
    uses on macOS and Windows). So for a loopback bind address this switches cluster mode off: in the environment,
    for the processes Ray starts, and in this process, which read the setting when ray was imported."""
    if bind_address not in LOOPBACK:
        yield
        return
    from ray._private import ray_constants

    env, flag = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = env


@contextmanager
def ray_session(cfg: ExperimentConfig, log_to_driver: bool = True):
    """Join the configured or ambient cluster (e.g. under `ray job submit`), else start a local instance whose
    services listen on `ray.bind_address` only (loopback by default)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    started = False
    with _single_machine_mode(None if address else cfg.ray.bind_address):
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=log_to_driver, **ray_init_options(local=False))
            else:
                bind = {"_node_ip_address": cfg.ray.bind_address} if cfg.ray.bind_address else {}
                with own_local_instance(ray_init_options(local=True), cfg.ray.bind_address) as options:
                    ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1),
                             object_store_memory=cfg.ray.object_store_memory_mb * 2**20,
                             dashboard_host=cfg.ray.dashboard_host, include_dashboard=True,
                             log_to_driver=log_to_driver, **bind, **options)
            started = True
        try:
            yield
        finally:
            if started:
                ray.shutdown()


def summary_table(train_manifest: dict, compare: dict) -> pd.DataFrame:
    """One row per configuration in plain words, columns named as in MLflow."""
    return summary_frame(train_manifest, compare)


def through_training_table(compare: dict) -> pd.DataFrame:
    """Shared fraction (mean over seed pairs) at each saved token count, one row per configuration."""
    rows = []
    confs = compare["manifest"]["configurations"]
    several_hookpoints = len({c["hookpoint"] for c in confs.values()}) > 1
    for c in confs.values():
        if c.get("through_training"):
            rows.append({**({"hookpoint": c["hookpoint"]} if several_hookpoints else {}),
                         "configuration": describe(c["architecture"], c["params"], c["width"]),
                         **{f"{p['tokens']} tok": p["mean"] for p in c["through_training"]}})
    return pd.DataFrame(rows)


def summary_notes(cfg: ExperimentConfig, train_manifest: dict, compare: dict) -> list[str]:
    """What the summary table needs said in words: uncertified matchings, what each source can show."""
    confs = compare["manifest"]["configurations"]
    notes = [f"WARNING: matching of {name} is NOT certified optimal (an assignment was not proven maximal); its "
             "shared fractions are lower bounds" for name, c in confs.items() if not c["certified"]]
    truths = set(train_manifest.get("ground_truths") or {})
    model_hookpoints = sorted({c["hookpoint"] for c in confs.values()} - truths)
    if model_hookpoints and (cfg.model.build is not None or cfg.model.random_init_seed is not None):
        notes.append(f"{', '.join(model_hookpoints)}: activations of a RANDOMLY INITIALISED model. This is a pipeline "
                     "check (HF model, hooks, shards, training, matching), not a finding: such activations have no "
                     "sparse feature structure, so whatever seeds share there is no evidence of features (TopK "
                     "shares about chance; compare with the chance column: init/rotation = two untrained SAEs / "
                     "trained SAEs under a random rotation).")
    for h in sorted(truths):
        notes.append(f"{h}: planted features with a known answer (docs/known-answer.md); recovered = fraction of true "
                     "features some latent matches (decoder cos > "
                     f"{cfg.compare.ground_truth_threshold}); precision shared / orphan = fraction of shared / "
                     "not-shared latents that are true features.")
    return notes


def run_experiment(cfg: ExperimentConfig, log_to_driver: bool = True, show_plan: str | None = None) -> dict:
    """Run every stage; returns the summary, stage timings and where results are. Inputs are checked first
    (`preflight`), then the plan is sized and checked against the resources the config names (`plan_run`), before
    Ray or MLflow start; `log_to_driver` shows the Ray workers' output here; `show_plan` ("compact" or "full")
    prints the plan."""
    timings: dict[str, float] = {}
    quiet_driver()
    preflight(cfg)
    plan = plan_run(cfg)
    if show_plan:
        print(format_plan(plan, compact=show_plan == "compact"), flush=True)
    claim_output_folder(cfg.output_path)  # before anything is written there
    tracker = ExperimentTracker(cfg)
    tracker.start_parent()
    ok = False
    try:
        with ray_session(cfg, log_to_driver):
            for warning in cluster_warnings(plan, ray.nodes()):
                log.warning("plan: %s", warning)
            t0 = time.perf_counter()
            manifest = run_generate(cfg)
            timings["generate"] = time.perf_counter() - t0
            tracker.log_generate(manifest)

            configurations = plan_configurations(cfg, list(manifest["hookpoints"]))
            tracker.create_child_runs(configurations)
            t0 = time.perf_counter()
            with stage_progress("train", "step") as progress:
                train_manifest = run_train(cfg, manifest, configurations, tracker.uri, progress=progress)
            timings["train"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            compare = run_compare(cfg, train_manifest)
            timings["compare"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        tracker.log_results(train_manifest, compare)
        log_known_answer(tracker.client, tracker.parent_id, train_manifest, compare)
        tag_uncertified(tracker.client, tracker.parent_id, train_manifest, compare)
        timings["track"] = time.perf_counter() - t0
        ok = True
    finally:
        tracker.finish(ok)
    tracker.log_timings(timings)
    return {"summary": summary_table(train_manifest, compare), "timings": timings,
            "through_training": through_training_table(compare),
            "notes": summary_notes(cfg, train_manifest, compare),
            "output_dir": str(cfg.output_path), "tracking_uri": tracker.uri,
            "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_id,
            "experiment_name": tracker.experiment_name, "ui_url": tracker.ui_url()}
