"""Ray Train entry point: `TorchTrainer(train_loop_per_worker, train_loop_config=...)`.

Configurations are dealt round-robin over the workers; every worker reads the same activation stream, so all
seeds of a configuration (always on one worker) see identical batches in identical order.

Fault tolerance: each worker reports its training state as a Ray Train checkpoint every `train.state_every_tokens`;
when a worker dies, Ray Train restarts the worker group (`FailureConfig(max_failures)`) and `get_checkpoint()`
hands the last complete state back, from which training continues exactly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from ..progress import RemoteProgress, quiet_worker
from ..sae import import_architecture_modules
from ..store.shards import read_manifest
from .train_state import read_training_state
from .training import train_saes

log = logging.getLogger(__name__)


# A training step's metrics -> their MLflow names. `loss` is each architecture's own objective (FVU for TopK, squared
# error plus the L1 penalty on scaled inputs for ReLU+L1): not comparable across architectures, hence not `loss`.
TRAINING_CURVES = {"fvu": "train/fvu", "l0": "train/l0", "loss": "train/objective"}


def mlflow_reporter(tracking_uri: str | None, tokens_per_step: int):
    """`report(step, [(job, metrics), ...])` for `train_saes`: logs each job's curves to its MLflow run, with the
    MLflow step = training tokens seen (step x batch size), the unit of every other curve of the experiment."""
    if not tracking_uri:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)

    def log(step: int, per_sae: list[tuple[dict, dict]]):
        now = int(time.time() * 1000)
        tokens = step * tokens_per_step
        for job, metrics in per_sae:
            if job.get("run_id"):
                client.log_batch(job["run_id"], metrics=[
                    Metric(TRAINING_CURVES.get(k, f"train/{k}"), float(v), now, tokens) for k, v in metrics.items()])
    return log


def train_loop_per_worker(config: dict) -> None:
    quiet_worker()
    import_architecture_modules(config.get("architecture_modules", []))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    groups = config["groups"]  # list of lists: the seeds of one configuration stay together
    jobs = [job for i, group in enumerate(groups) if i % world == rank for job in group]
    if not jobs:
        return
    manifest = read_manifest(config["activations_uri"], config.get("model_path"))
    device = ray.train.torch.get_device()
    resume = None
    checkpoint = ray.train.get_checkpoint()  # the last state every worker reported, after a restart
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = read_training_state(Path(folder), jobs)
        if resume is None:
            log.warning("checkpoint %s lacks the state of some of this worker's SAEs: training from the start",
                        checkpoint.path)
    settings = config["settings"]
    results = train_saes(jobs, manifest, config["hookpoint"], settings, device,
                         report=mlflow_reporter(config.get("tracking_uri"), settings.batch_size),
                         progress=remote_progress(config.get("progress")),
                         node_id=ray.get_runtime_context().get_node_id(), resume=resume, save_state=_report_state)
    ray.train.report({"done": len(results)})


def remote_progress(counter):
    """`progress(total)` for the training loop: steps go to the driver's bar (None: no bar)."""
    if counter is None:
        return None
    return lambda total: RemoteProgress(counter, total)


def _report_state(folder: Path, step: int) -> None:
    # Every worker reports at the same steps (report is a barrier); Ray Train merges their folders into one
    # checkpoint and registers it only once all have been persisted.
    ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
