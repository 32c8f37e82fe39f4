"""The Ray driver: config -> plan -> generate -> train -> compare -> MLflow, then a summary."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd
import ray

from .config import ExperimentConfig
from .known_answer_tracking import log_known_answer, tag_uncertified
from .plan import plan_configurations
from .stages.compare import run_compare
from .stages.generate import run_generate
from .stages.train import run_train
from .tracking import ExperimentTracker

log = logging.getLogger(__name__)


@contextmanager
def ray_session(cfg: ExperimentConfig):
    """Join the configured or ambient cluster (e.g. under `ray job submit`), else start a local instance."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1),
                     object_store_memory=cfg.ray.object_store_memory_mb * 2**20,
                     dashboard_host=cfg.ray.dashboard_host, include_dashboard=True)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def summary_table(train_manifest: dict, compare: dict) -> pd.DataFrame:
    """One row per configuration: shared fraction (mean ± std over seed pairs) beside its chance levels, held-out
    FVU / L0 / dead fraction and, for a source with a ground truth, recovery and true-feature precision of shared
    and orphan latents."""
    rows = []
    confs = compare["manifest"]["configurations"]
    for name, c in confs.items():
        saes = [s for s in train_manifest["saes"] if s["configuration"] == name]
        truth = c.get("ground_truth") or {}
        rows.append({
            "configuration": name, "seeds": len(saes),
            "shared": f"{c['shared_mean']:.3f} ± {c['shared_std']:.3f}",
            "chance": "{:.3f}/{:.3f}".format(c["chance"].get("init_shared", float("nan")),
                                             c["chance"].get("rotation_shared", float("nan"))),
            "fvu": np.mean([s["metrics"]["fvu"] for s in saes]),
            "l0": np.mean([s["metrics"]["l0"] for s in saes]),
            "dead": np.mean([s["metrics"]["dead_fraction"] for s in saes]),
            "recovered": truth.get("recovered_mean", float("nan")),
            "prec_shared": truth.get("precision_shared", float("nan")),
            "prec_orphan": truth.get("precision_orphan", float("nan")),
            "certified": "yes" if c["certified"] else "NO",
        })
    return pd.DataFrame(rows)


def through_training_table(compare: dict) -> pd.DataFrame:
    """Shared fraction (mean over seed pairs) at each saved token count, one row per configuration."""
    rows = []
    for name, c in compare["manifest"]["configurations"].items():
        if c.get("through_training"):
            rows.append({"configuration": name, **{f"{p['tokens']} tok": p["mean"] for p in c["through_training"]}})
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
                     "sparse structure, so the shared fraction is expected near chance (the chance column: "
                     "init/rotation = two untrained SAEs / trained SAEs under a random rotation).")
    for h in sorted(truths):
        notes.append(f"{h}: planted features with a known answer (docs/known-answer.md); recovered = fraction of true "
                     "features some latent matches (decoder cos > "
                     f"{cfg.compare.ground_truth_threshold}); prec_shared / prec_orphan = fraction of shared / "
                     "not-shared latents that are true features.")
    return notes


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Run every stage; returns the summary, stage timings and where results are."""
    timings: dict[str, float] = {}
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
            train_manifest = run_train(cfg, manifest, configurations, tracker.uri)
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
    for stage, seconds in timings.items():
        tracker.client.log_metric(tracker.parent_id, f"seconds.{stage}", seconds)
    return {"summary": summary_table(train_manifest, compare), "timings": timings,
            "through_training": through_training_table(compare),
            "notes": summary_notes(cfg, train_manifest, compare),
            "output_dir": str(cfg.output_path), "tracking_uri": tracker.uri,
            "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_id}
