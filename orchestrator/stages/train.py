"""Train stage: one Ray Train `TorchTrainer` per hookpoint trains every configuration and seed.

With `train.backend: deepspeed` the same trainer runs actors/train/deepspeed_backend.py's loop instead, which trains
the SAEs one at a time, each data-parallel over all the workers.

Reads the generate manifest; writes SAE folders and `saes/manifest.json`, the one thing compare reads.
An SAE whose folder is complete (weights, cfg, metrics) is not trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from actors.train.calibration import is_steered
from actors.store.checkpoint import METRICS, checkpoint_folder, write_json_atomic
from actors.store.checkpoint import is_trained
from actors.train.deepspeed_backend import train_loop_per_worker as deepspeed_train_loop
from actors.train.data import held_out_rows
from actors.train.stacked import split_seeds
from actors.train.worker import train_loop_per_worker

from ..config import ExperimentConfig
from ..plan import SAEConfiguration, slug

log = logging.getLogger(__name__)


def train_manifest_path(cfg: ExperimentConfig) -> Path:
    return cfg.output_path / "saes" / "manifest.json"


def train_hash(cfg: ExperimentConfig, manifest: dict) -> str:
    """What decides an SAE's weights besides its own job: the activations and the training settings."""
    # Settings that only decide where training runs or what is measured do not retrain an SAE. Nor do
    # checkpoints of the training state (a resumed run ends with the weights of an uninterrupted one), nor
    # stacking seeds and how a configuration's seeds are split into stacks (each seed's weights are bitwise
    # unchanged on CPU). The DeepSpeed backend does retrain (its data-parallel sums round differently), but not
    # its ZeRO settings, and a torch-backend hash is the one from before the setting existed.
    settings = cfg.train.model_dump(exclude={"num_workers", "cpus_per_worker", "use_gpu", "log_every", "lm_eval_chunks",
                                             "state_every_tokens", "max_failures", "stack_seeds", "max_stack_bytes",
                                             "deepspeed"})
    if settings["backend"] == "torch":
        del settings["backend"]
    # The training code's own version too: an SAE trained by other code is retrained, never silently reused.
    data = json.dumps({"activations": manifest["config_hash"], "train": settings,
                       "code": training_code_version()}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


TRAINING_CODE = ("actors/sae", "actors/train", "actors/store/shards.py")  # what decides a trained SAE's weights


def training_code_version(root: Path | None = None) -> str:
    """SHA-256 of the source of the modules that train SAEs (`TRAINING_CODE`, every .py file, by relative path):
    part of the reuse key, so that any edit to them retrains. Comments count too: a spurious retrain is cheap next
    to silently reusing SAEs trained by other code."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for entry in TRAINING_CODE:
        path = root / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def train_hparams(cfg: ExperimentConfig, manifest: dict) -> dict:
    """The settings `actors.train.training.train_saes` gets."""
    return cfg.train.model_dump() | {"train_hash": train_hash(cfg, manifest),
                                     "trust_remote_code": cfg.model.trust_remote_code}


def source_checkpoints(cfg: ExperimentConfig, entry: dict) -> list[int]:
    """The checkpoints (train.checkpoint_tokens) a source's SAEs reach: those below its own training budget."""
    train_rows = entry["rows"] - held_out_rows(entry["rows"], cfg.train.eval_tokens)
    budget = (cfg.train.tokens or train_rows) // cfg.train.batch_size * cfg.train.batch_size
    return [n for n in cfg.train.checkpoint_tokens if n <= budget]


def _split_groups(groups: list[list[dict]], d_in: int, batch_size: int, max_stack_bytes: int) -> list[list[dict]]:
    """Each configuration's seeds in stacks that fit the memory budget (actors/train/stacked.py), as separate groups,
    which the workers deal round-robin. Every worker reads the same stream, so split seeds still see the same
    batches; the L1 calibration still probes with the configuration's smallest seed, and a part without that seed
    whose coefficient is steered to a target L0 also trains it as a pilot (steering only, never saved), so that
    every part follows the same coefficients."""
    out = []
    for group in groups:
        first = min(group, key=lambda j: j["seed"])
        probe = {"calibration_seed": first["seed"]}
        for part in split_seeds(group, d_in, batch_size, max_stack_bytes):
            part = [j | probe for j in part]
            if is_steered(first) and first["seed"] not in {j["seed"] for j in part}:
                # its own path (the state of a training-state checkpoint is keyed by path); no MLflow run
                part.append(first | probe | {"l0_pilot": True, "path": part[0]["path"] + ".l0-pilot", "run_id": None})
            out.append(part)
    return out


def run_train(cfg: ExperimentConfig, manifest: dict, configurations: list[SAEConfiguration],
              tracking_uri: str | None, fault: dict | None = None) -> dict:
    """`fault` is a test hook: {"after_steps": n, "marker": path} kills a training worker once (see train_worker)."""
    t = cfg.train
    use_gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    expected = train_hash(cfg, manifest)
    hp = train_hparams(cfg, manifest)
    for hookpoint in manifest["hookpoints"]:
        checkpoints = source_checkpoints(cfg, manifest["hookpoints"][hookpoint])
        groups = [c.jobs() for c in configurations if c.hookpoint == hookpoint]
        # A configuration is retrained whole if any seed is missing: seeds must share one stream.
        groups = [g for g in groups if not all(is_trained(j["path"], expected, checkpoints) for j in g)]
        if not groups:
            log.info("train: every SAE of %s is already trained", hookpoint)
            continue
        if t.stack_seeds:  # seeds of a configuration that do not fit one stack go to different workers
            groups = _split_groups(groups, manifest["hookpoints"][hookpoint]["d_in"], t.batch_size, t.max_stack_bytes)
        # torch: configurations dealt over at most as many workers; deepspeed: every SAE across all the workers.
        num_workers = t.num_workers if t.backend == "deepspeed" else min(t.num_workers, len(groups))
        trainer = TorchTrainer(
            deepspeed_train_loop if t.backend == "deepspeed" else train_loop_per_worker,
            train_loop_config={
                "groups": groups, "hookpoint": hookpoint, "hp": hp | {"checkpoint_tokens": checkpoints},
                "tracking_uri": tracking_uri,
                "activations_uri": manifest["root"],
                "torch_threads": t.cpus_per_worker, "fault": fault,
            },
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": t.cpus_per_worker}),
            # A worker failure restarts the workers from the last training state they reported; re-running the
            # experiment after the driver died resumes from it too (same run name and storage).
            run_config=RunConfig(name=f"train-{cfg.content_hash()}-{slug(hookpoint)}",
                                 storage_path=str(cfg.output_path / "ray_train"),
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        trainer.fit()

    saes = []
    for c in configurations:
        for job in c.jobs():
            folder = Path(job["path"])
            reached = source_checkpoints(cfg, manifest["hookpoints"][job["hookpoint"]])
            if not is_trained(job["path"], expected, reached):
                raise RuntimeError(f"training finished but {folder} is incomplete or from other settings")
            cfg_json = json.loads((folder / "cfg.json").read_text())
            checkpoints = [{"tokens": n, "path": str(checkpoint_folder(folder, n))} for n in reached]
            saes.append(job | {"metrics": json.loads((folder / METRICS).read_text()),
                               "data_digest": cfg_json["data_digest"], "checkpoints": checkpoints})
    # Sources with a known answer (the planted one): compare scores every SAE of them against it.
    ground_truths = {h: {"root": manifest["root"], **e["ground_truth"]} for h, e in manifest["hookpoints"].items()
                     if e.get("ground_truth")}
    train_manifest = {"config_hash": cfg.content_hash(), "threshold": cfg.compare.threshold,
                      "ground_truths": ground_truths,
                      "configurations": [c.name for c in configurations], "saes": saes}
    write_json_atomic(train_manifest_path(cfg), train_manifest)
    return train_manifest
