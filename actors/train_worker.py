"""Ray Train entry point: `TorchTrainer(train_loop_per_worker, train_loop_config=...)`.

Configurations are dealt round-robin over the workers; every worker reads the same activation stream, so all
seeds of a configuration (always on one worker) see identical batches in identical order.
"""

from __future__ import annotations

import time

import ray
import ray.train
import ray.train.torch
import torch
from ray.experimental.tqdm_ray import tqdm

from .storage import ActivationStore
from .training import train_saes


def _mlflow_reporter(tracking_uri: str | None):
    if not tracking_uri:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)

    def log(step: int, per_sae: list[tuple[dict, dict]]):
        now = int(time.time() * 1000)
        for job, metrics in per_sae:
            if job.get("run_id"):
                client.log_batch(job["run_id"], metrics=[
                    Metric(f"train/{k}", float(v), now, step) for k, v in metrics.items()])
    return log


def train_loop_per_worker(config: dict) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    groups = config["groups"]  # list of lists: the seeds of one configuration stay together
    jobs = [job for i, group in enumerate(groups) if i % world == rank for job in group]
    if not jobs:
        return
    manifest = ActivationStore(config["activations_uri"]).read_json("manifest.json")
    device = ray.train.torch.get_device()
    results = train_saes(jobs, manifest, config["hookpoint"], config["hp"], device,
                         report=_mlflow_reporter(config.get("tracking_uri")),
                         progress=lambda total: tqdm(desc=f"train {config['hookpoint']} (worker {rank})",
                                                     total=total, unit="step"),
                         node_id=ray.get_runtime_context().get_node_id())
    ray.train.report({"done": len(results)})
