"""Train stage: one Ray Train `TorchTrainer` per hookpoint trains every configuration and seed.

With `train.backend: deepspeed` the same trainer runs actors/train/deepspeed_backend.py's loop instead, which trains
the SAEs one at a time, each data-parallel over all the workers.

Reads the generate manifest; writes SAE folders and `saes/manifest.json`, the one thing compare reads.
An SAE whose folders (final and intermediate) are complete and match their checksums is not trained again; one
whose folders are damaged is retrained, alone (each seed's weights do not depend on which seeds train beside it),
with one line saying what was damaged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from actors.store.checkpoint import METRICS, checkpoint_folder, is_trained, training_state, write_json_atomic
from actors.store.shards import held_out_rows
from actors.train.calibration import is_steered
from actors.train.deepspeed_backend import train_loop_per_worker as deepspeed_train_loop
from actors.train.settings import DeepSpeedSettings, TrainSettings
from actors.train.stacked import split_seeds
from actors.train.worker import train_loop_per_worker

from ..config import ExperimentConfig, TrainConfig
from ..console import train_logging_config
from ..plan import SAEConfiguration, slug
from ..resources import train_request_bytes
from .failure_policy import SAETrainer

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


def train_settings(cfg: ExperimentConfig, manifest: dict) -> TrainSettings:
    """What the training workers get: the validated `train` settings, with the reuse key and the model's trust."""
    return worker_settings(cfg.train, train_hash=train_hash(cfg, manifest),
                           trust_remote_code=cfg.model.trust_remote_code)


def worker_settings(train: TrainConfig, *, train_hash: str | None, trust_remote_code: bool) -> TrainSettings:
    """`train` as `actors.train.settings.TrainSettings`: every field the workers read, taken from the config (where
    its default is), and what the stage derives: `train_hash` (None outside the pipeline), `trust_remote_code`."""
    derived = {"deepspeed": DeepSpeedSettings(**train.deepspeed.model_dump()),
               "checkpoint_tokens": tuple(train.checkpoint_tokens),  # frozen, as the whole
               "train_hash": train_hash, "trust_remote_code": trust_remote_code}
    return TrainSettings(**{f.name: derived[f.name] if f.name in derived else getattr(train, f.name)
                            for f in dataclasses.fields(TrainSettings)})


def source_checkpoints(cfg: ExperimentConfig, entry: dict) -> list[int]:
    """The checkpoints (train.checkpoint_tokens) a source's SAEs reach: those below its own training budget."""
    train_rows = entry["rows"] - held_out_rows(entry["rows"], cfg.train.eval_tokens)
    budget = (cfg.train.tokens or train_rows) // cfg.train.batch_size * cfg.train.batch_size
    return [n for n in cfg.train.checkpoint_tokens if n <= budget]


def _split_groups(groups: list[list[dict]], d_in: int, batch_size: int, max_stack_bytes: int,
                  todo: Iterable[str] | None = None) -> list[list[dict]]:
    """Each configuration's seeds in stacks that fit the memory budget (actors/train/stacked.py), as separate groups,
    which the workers deal round-robin. Every worker reads the same stream, so split seeds still see the same
    batches; the L1 calibration still probes with the configuration's smallest seed, and a part without that seed
    whose coefficient is steered to a target L0 also trains it as a pilot (steering only, never saved), so that
    every part follows the same coefficients. `todo`: the paths of the seeds to train (default: all)."""
    todo = None if todo is None else set(todo)
    out = []
    for group in groups:
        first = min(group, key=lambda j: j["seed"])
        probe = {"calibration_seed": first["seed"]}
        train = [j for j in group if todo is None or j["path"] in todo]
        for part in split_seeds(train, d_in, batch_size, max_stack_bytes) if train else []:
            part = [j | probe for j in part]
            if is_steered(first) and first["seed"] not in {j["seed"] for j in part}:
                # its own path (the state of a training-state checkpoint is keyed by path); no MLflow run
                part.append(first | probe | {"l0_pilot": True, "path": part[0]["path"] + ".l0-pilot", "run_id": None})
            out.append(part)
    return out


def _untrained(groups: list[list[dict]], expected: str, checkpoint_tokens: list[int]) -> tuple[set[str], list[str]]:
    """The paths of the SAEs to train, and the intermediate checkpoint folders among them that are damaged. One
    line per damaged folder says so."""
    todo, repair_checkpoints = set(), []
    for job in (j for g in groups for j in g):
        reusable, damage = training_state(job["path"], expected, checkpoint_tokens)
        for folder, problem in damage:
            log.warning("train: %s: retraining %s seed %s", problem, job["configuration"], job["seed"])
            if folder != Path(job["path"]):
                repair_checkpoints.append(str(folder))
        if not reusable:
            todo.add(job["path"])
    return todo, repair_checkpoints


def _run_name(cfg: ExperimentConfig, hookpoint: str, repair_checkpoints: list[str]) -> str:
    """The Ray Train run: the same name on every re-run, so that a re-run resumes from the training state the
    last one reported. Except to rewrite a damaged intermediate checkpoint folder: a state from after that
    checkpoint would never pass it again, so that repair trains from the start under a name of its own."""
    name = f"train-{cfg.content_hash()}-{slug(hookpoint)}"
    if repair_checkpoints:
        name += "-repair-" + hashlib.sha256("\n".join(sorted(repair_checkpoints)).encode()).hexdigest()[:8]
    return name


def run_train(cfg: ExperimentConfig, manifest: dict, configurations: list[SAEConfiguration],
              tracking_uri: str | None, progress=None) -> dict:
    """`progress`: a `ProgressCounter` actor the workers add their steps to (the driver's bar)."""
    t = cfg.train
    use_gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    expected = train_hash(cfg, manifest)
    settings = train_settings(cfg, manifest)
    stacks = {}  # how this run dealt the seeds it trained: recorded in the manifest (sae-seeds plan predicts it)
    for hookpoint in manifest["hookpoints"]:
        checkpoints = source_checkpoints(cfg, manifest["hookpoints"][hookpoint])
        groups = [c.jobs() for c in configurations if c.hookpoint == hookpoint]
        todo, repair_checkpoints = _untrained(groups, expected, checkpoints)
        groups = [g for g in groups if any(j["path"] in todo for j in g)]
        if not groups:
            log.info("train: every SAE of %s is already trained", hookpoint)
            continue
        partial = any(j["path"] not in todo for g in groups for j in g)
        if t.stack_seeds or partial:
            # Seeds of a configuration that do not fit one stack go to different workers; a configuration some of
            # whose seeds are intact trains only the others (on the same stream, steered by the same seed).
            groups = _split_groups(groups, manifest["hookpoints"][hookpoint]["d_in"], t.batch_size,
                                   t.max_stack_bytes if t.stack_seeds else float("inf"), todo)
        # torch: configurations dealt over at most as many workers; deepspeed: every SAE across all the workers.
        num_workers = t.num_workers if t.backend == "deepspeed" else min(t.num_workers, len(groups))
        stacks[hookpoint] = {"workers": num_workers, "stacks": [
            {"configuration": g[0]["configuration"], "seeds": [j["seed"] for j in g if not j.get("l0_pilot")]}
            for g in groups]}
        trainer = SAETrainer(  # a TorchTrainer that does not retry a worker's BadInputError
            deepspeed_train_loop if t.backend == "deepspeed" else train_loop_per_worker,
            train_loop_config={
                "groups": groups, "hookpoint": hookpoint,
                "settings": dataclasses.replace(settings, checkpoint_tokens=tuple(checkpoints)),
                "tracking_uri": tracking_uri,
                "activations_uri": manifest["root"], "model_path": manifest.get("model", {}).get("path"),
                "torch_threads": t.cpus_per_worker, "progress": progress,
                "architecture_modules": cfg.sae.architecture_modules,
            },
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={
                "CPU": t.cpus_per_worker,  # and the memory its SAEs and stream are estimated to need
                "memory": train_request_bytes(groups, num_workers, manifest["hookpoints"][hookpoint], t,
                                              cfg.generate.dtype, use_gpu)}),
            # A worker failure restarts the workers from the last training state they reported; re-running the
            # experiment after the driver died resumes from it too (same run name and storage).
            run_config=RunConfig(name=_run_name(cfg, hookpoint, repair_checkpoints),
                                 storage_path=str(cfg.output_path / "ray_train"),
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 logging_config=train_logging_config()),
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
                      "ground_truths": ground_truths, "stacks": stacks,
                      "configurations": [c.name for c in configurations], "saes": saes}
    write_json_atomic(train_manifest_path(cfg), _relative_to(cfg.output_path, train_manifest))
    return train_manifest


def _relative_to(root: Path, train_manifest: dict) -> dict:
    """The manifest as written: SAE folders relative to the output folder, so a moved or copied output folder
    names its own SAEs (`<output>/<path>`)."""
    def rel(path: str) -> str:
        return Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else path

    return train_manifest | {"saes": [s | {"path": rel(s["path"]),
                                           "checkpoints": [c | {"path": rel(c["path"])} for c in s["checkpoints"]]}
                                       for s in train_manifest["saes"]]}
