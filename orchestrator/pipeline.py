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
from .plan import plan_configurations
from .stages.compare import run_compare
from .stages.generate import run_generate
from .stages.train import run_train
from .tracking import ExperimentTracker, summary_frame

log = logging.getLogger(__name__)


@contextmanager
def ray_session(cfg: ExperimentConfig):
    """Join the configured or ambient cluster (e.g. under `ray job submit`), else start a local instance."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True, **ray_init_options(local=False))
        else:
            with own_local_instance(ray_init_options(local=True)) as options:
                ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1),
                         object_store_memory=cfg.ray.object_store_memory_mb * 2**20,
                         dashboard_host=cfg.ray.dashboard_host, include_dashboard=True, **options)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def summary_table(train_manifest: dict, compare: dict) -> pd.DataFrame:
    """One row per configuration in plain words, columns named as in MLflow."""
    return summary_frame(train_manifest, compare)


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Run every stage; returns the summary, stage timings and where results are."""
    timings: dict[str, float] = {}
    quiet_driver()
    claim_output_folder(cfg.output_path)  # before anything is written there
    tracker = ExperimentTracker(cfg)
    tracker.start_parent()
    ok = False
    try:
        with ray_session(cfg):
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
        timings["track"] = time.perf_counter() - t0
        ok = True
    finally:
        tracker.finish(ok)
    tracker.log_timings(timings)
    return {"summary": summary_table(train_manifest, compare), "timings": timings,
            "output_dir": str(cfg.output_path), "tracking_uri": tracker.uri,
            "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_id,
            "experiment_name": tracker.experiment_name, "ui_url": tracker.ui_url()}
