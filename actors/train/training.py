"""The torch backend: one Ray Train worker trains several SAEs on one shared batch stream.

All seeds of a configuration (and all configurations of a hookpoint dealt to this worker) see the same batches in
the same order. Each SAE keeps its own optimizer and schedule; the seeds of a configuration step together as one
stack of parameters (actors/train/stacked.py) with the same per-seed results. `TorchRun` sets the SAEs up (calibrated,
or resumed from a training state) and steps them; the loop itself is actors/train/loop.py's, shared with DeepSpeed.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..sae import ARCHITECTURES, SparseAutoencoder
from ..store.checkpoint import checkpoint_folder, dead_latents, save_sae_folder
from ..store.shards import held_out_rows
from ..store.storage import ActivationStore
from ..store.tokens import read_chunks
from .calibration import SparsityTargets, calibrate_l1_coefficient, is_steered, steering_seed
from .data import ActivationStream, read_rows, split_held_out
from .lm_eval import spliced_lm_metrics
from .loop import Report, SaveState, train
from .settings import TrainSettings
from .stacked import group_trainers
from .train_state import SAEState, state_key
from .trainer import SAETrainer, build_trainer, effective_lr

log = logging.getLogger(__name__)


def train_saes(jobs: list[dict], manifest: dict, hookpoint: str, settings: TrainSettings, device: torch.device,
               report: Report | None = None, progress=None, node_id: str | None = None,
               resume: dict[str, SAEState] | None = None, save_state: SaveState | None = None) -> list[dict]:
    """Train `jobs` (SAEs of one hookpoint) on one shared stream; save each; return their results.

    `report`, `progress`, `save_state`: see `loop.train`. `node_id` (the Ray node training them), when given, is
    saved with the metrics. With `settings.checkpoint_tokens`, an intermediate SAE folder (weights, cfg, metrics)
    is saved at each of those token counts too. `resume` (from `read_training_state`) continues a training state:
    the result is identical to an uninterrupted run's.
    """
    return train(TorchRun(jobs, manifest, hookpoint, settings, device, node_id, resume), settings,
                 report=report, progress=progress, save_state=save_state)


class TorchRun:
    """The `TrainingRun` of the torch backend (actors/train/loop.py).

    Jobs with a `target_l0` have their L1 coefficient steered during training (actors/train/calibration.py); a job
    marked `l0_pilot` is trained only to steer its configuration (the orchestrator adds one where a configuration's
    seeds are split over workers): it is neither saved, reported nor returned."""

    def __init__(self, jobs: list[dict], manifest: dict, hookpoint: str, settings: TrainSettings,
                 device: torch.device, node_id: str | None = None, resume: dict[str, SAEState] | None = None):
        self.manifest, self.hookpoint, self.settings, self.device, self.node_id = (
            manifest, hookpoint, settings, device, node_id)
        entry = manifest["hookpoints"][hookpoint]
        self.d_in = entry["d_in"]
        # Architectures that train on normalised inputs see x * sqrt(d_in) / mean-norm; folded back on save.
        self.scale = float(np.sqrt(self.d_in) / entry["mean_norm"])
        # The tail rows are held out (never trained on) and evaluate every SAE; the rest is the training stream.
        train_shards, held_out = split_held_out(entry["shards"], held_out_rows(entry["rows"], settings.eval_tokens))
        self.streams = self._streams(jobs, train_shards)
        self.num_steps = next(iter(self.streams.values())).num_steps
        resume = _usable_state(resume, jobs, settings, self.num_steps)
        # The calibrated coefficients come back with a resumed state: calibrating again would only repeat it.
        jobs = (_restore_calibration(jobs, resume) if resume
                else _calibrate_sparsity(jobs, self.streams, self.d_in, settings, device))
        # Configurations with a target L0: their coefficient is steered during training.
        self.targets = SparsityTargets(jobs, self.num_steps, settings, resume)
        trainers = {norm: [build_trainer(j, self.d_in, self.num_steps, settings, device) for j in jobs
                           if ARCHITECTURES[j["architecture"]].normalize_inputs == norm] for norm in self.streams}
        self.trainers = [t for group in trainers.values() for t in group]  # the per-seed view
        self.start_step, elapsed = self._resume(resume) if resume else (0, 0.0)
        # Seeds of a configuration step as one stack (actors/train/stacked.py), each with its own (possibly
        # resumed) optimizer.
        self.groups = {norm: group_trainers(ts, settings, self.d_in) for norm, ts in trainers.items()}
        self.targets.apply(self.trainers)
        self.saved = [t for t in self.trainers if not t.job.get("l0_pilot")]  # a pilot only steers its configuration
        # Evaluation set: the held-out rows, unshuffled, identical for every SAE.
        self.eval_sets = {norm: held_out_set(manifest["root"], held_out, self.scale if norm else 1.0, device)
                          for norm in self.streams}
        self.logs: list[tuple[dict, dict]] = []  # the last step's (job, metrics)
        self.started = time.perf_counter() - elapsed  # a resumed run counts the seconds trained before the failure

    def _streams(self, jobs: list[dict], train_shards: list[dict]) -> dict[bool, ActivationStream]:
        """One stream per input normalisation the jobs need (raw, scaled), in the same order."""
        s = self.settings
        tokens = s.tokens or sum(shard["rows"] for shard in train_shards)
        return {norm: ActivationStream(self.manifest["root"], train_shards, s.batch_size, s.data_seed, tokens,
                                       self.scale if norm else 1.0, s.shuffle_buffer_tokens)
                for norm in {ARCHITECTURES[j["architecture"]].normalize_inputs for j in jobs}}

    def _resume(self, resume: dict[str, SAEState]) -> tuple[int, float]:
        """Load every SAE's state; (the step to continue from, the seconds trained before)."""
        for t in self.trainers:
            t.load_state(resume[t.job["path"]])
        tensors, meta = next(iter(resume.values()))  # the worker-wide entries are alike in every SAE's state
        _set_rng_state(tensors, self.device)
        log.info("resuming %d SAEs of %s at step %d of %d", len(self.trainers), self.hookpoint, meta["step"],
                 self.num_steps)
        return meta["step"], meta["train_seconds"]

    def batches(self):
        # The streams (raw and scaled inputs) advance together, one batch each per step, so that every Ray Train
        # worker reaches its state checkpoints (a barrier across workers) at the same steps, whatever it trains.
        # A resumed run re-reads the stream and skips the batches it has trained on: the order depends only on
        # the manifest and the data seed.
        return zip(*(itertools.islice(stream, self.start_step, None) for stream in self.streams.values()))

    def step(self, step: int, batch: tuple[np.ndarray, ...]) -> None:
        self.logs = []
        for norm, rows in zip(self.streams, batch):
            x = torch.from_numpy(rows).to(self.device)
            self.logs += [(t.job, m) for g in self.groups[norm] for t, m in zip(g.trainers, g.step(x))]
        self.targets.after_step(step, self.logs)
        self.targets.apply(self.trainers)

    def metrics(self) -> list[tuple[dict, dict]]:
        return [(job, m) for job, m in self.logs if not job.get("l0_pilot")]

    def save_checkpoint(self, tokens: int) -> None:
        for t in self.saved:
            self._save(t, checkpoint_folder(t.job["path"], tokens))

    def state(self, step: int) -> dict[str, SAEState]:
        seconds = time.perf_counter() - self.started
        return {state_key(t.job): _sae_state(t, step, self.settings, seconds, self.device, self.targets)
                for t in self.trainers}

    def close(self) -> None:
        pass

    def finish(self) -> list[dict]:
        raws = [raw_sae(t.sae, self.scale) for t in self.saved]  # folded once, for the LM loss and the saved weights
        lm = [{}] * len(self.saved)
        if wants_lm_eval(self.settings, self.manifest["hookpoints"][self.hookpoint]):
            model, input_ids = lm_eval_inputs(self.manifest, self.settings, self.device)
            lm = spliced_lm_metrics(model, self.hookpoint, raws, input_ids)
        results = [self._save(t, Path(t.job["path"]), extra, raw) for t, extra, raw in zip(self.saved, lm, raws)]
        _warn_missed_targets(results, self.num_steps)
        return results

    def _save(self, t: SAETrainer, folder: Path, extra: dict | None = None,
              raw: SparseAutoencoder | None = None) -> dict:
        return save_trained(t, folder, raw if raw is not None else raw_sae(t.sae, self.scale),
                            self.eval_sets[t.sae.normalize_inputs], d_in=self.d_in, hookpoint=self.hookpoint,
                            settings=self.settings, num_steps=self.num_steps,
                            seconds=time.perf_counter() - self.started,
                            resumed_from_tokens=self.start_step * self.settings.batch_size, node_id=self.node_id,
                            extra=extra, steered_params=self.targets.params(t.job),
                            target_metrics=self.targets.metrics(t.job))


def wants_lm_eval(settings: TrainSettings, entry: dict) -> bool:
    """Whether the LM loss with each SAE spliced in is measured: asked for, and the source has a model (a planted
    one has none)."""
    return bool(settings.lm_eval_chunks) and entry.get("source", "model") == "model"


def _warn_missed_targets(results: list[dict], num_steps: int) -> None:
    for r in results:
        target, reached = r["metrics"].get("target_l0"), r["metrics"]["l0"]
        if target is not None and abs(math.log(max(reached, 1e-9) / target)) > math.log(1 + L0_TOLERANCE):
            log.warning("%s seed %s: L0 %.1f, target %s: the L1 coefficient could not be steered there in %d steps "
                        "(more training tokens let the penalty act)", r["job"].get("configuration"),
                        r["job"]["seed"], reached, target, num_steps)


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, batches: list[torch.Tensor]) -> tuple[dict[str, float], torch.Tensor]:
    """FVU and L0 over a fixed evaluation set (the same rows for every SAE), and each latent's firing frequency.

    Runs in eval mode (inference-time behaviour, e.g. BatchTopK's threshold) and restores the mode after."""
    was_training = sae.training
    sae.eval()
    try:
        sq_err = total = l0 = n = 0.0
        mean = torch.cat(batches).mean(0)
        fires = torch.zeros(sae.num_latents, dtype=torch.float64, device=mean.device)
        for x in batches:
            out = sae(x)
            sq_err += (x - out.x_hat).pow(2).sum().item()
            total += (x - mean).pow(2).sum().item()
            l0 += out.l0.item() * x.shape[0]
            n += x.shape[0]
            fires += (sae.activations(x) > 0).sum(0)
        return {"fvu": sq_err / total, "l0": l0 / n}, (fires / n).float()
    finally:
        sae.train(was_training)


def raw_sae(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """The SAE as saved: acting on raw activations (training goes on with the scaled original)."""
    if not sae.normalize_inputs:
        return sae
    sae = copy.deepcopy(sae)
    sae.fold_input_scale(scale)
    return sae


def save_trained(t: SAETrainer, folder: Path, raw: SparseAutoencoder, eval_set: list[torch.Tensor], *, d_in: int,
                 hookpoint: str, settings: TrainSettings, num_steps: int, seconds: float, resumed_from_tokens: int = 0,
                 node_id: str | None = None, extra: dict | None = None, steered_params: dict | None = None,
                 target_metrics: dict | None = None) -> dict:
    """Evaluate `t.sae` on `eval_set` and save `raw` (its weights on raw activations) with cfg and metrics.
    `steered_params`: hyper-parameters a target steered during training, at their final values (`SparsityTargets`);
    `target_metrics`: what the target and its steering record."""
    cfg = sae_folder_cfg(t.job, d_in, hookpoint, settings, num_steps, t.dead_window)
    cfg["params"] = t.job["params"] | (steered_params or {})
    cfg |= {"data_digest": t.digest.hexdigest(), "tokens": t.tokens_seen}
    metrics, frequency = evaluate(t.sae, eval_set)
    # Dead: never fires on the held-out rows; the training-time criterion (no firing in the dead window) apart.
    metrics["dead_fraction"] = float(dead_latents(frequency).float().mean())
    metrics["dead_fraction_train"] = float(((t.tokens_seen - t.last_fired) >= t.dead_window).float().mean())
    metrics |= {"train_tokens": t.tokens_seen, "train_seconds": seconds, "resumed_from_tokens": resumed_from_tokens}
    if node_id is not None:
        metrics["node_id"] = node_id
    if "calibration" in t.job:
        metrics |= t.job["calibration"] | (target_metrics or {})
    metrics |= extra or {}
    save_sae_folder(folder, raw.state_dict(), cfg, metrics, firing_frequency=frequency)
    return {"job": t.job, "metrics": metrics, "data_digest": cfg["data_digest"]}


L0_TOLERANCE = 0.15  # relative miss of a target L0 that is worth a warning


def _sae_state(t: SAETrainer, step: int, settings: TrainSettings, seconds: float, device: torch.device,
               targets: SparsityTargets) -> SAEState:
    """One SAE's training state plus what the whole worker resumes from: the step (the data position), the RNG
    state (no step draws random numbers today; an architecture that does must still continue identically),
    the job as calibrated, its configuration's L0 controller, and the settings the state is valid for."""
    tensors, meta = t.state()
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    meta |= {"step": step, "train_seconds": seconds,
             "train_hash": settings.train_hash, "batch_size": settings.batch_size,
             "data_seed": settings.data_seed,
             "job": {k: t.job.get(k) for k in _JOB_IDENTITY}, "params": t.job["params"],
             "calibration": t.job.get("calibration"), "l0_control": targets.state(t.job)}
    return tensors, meta


# What identifies an SAE across restarts; besides these its given `params` must match (calibration may have filled
# in a coefficient the job leaves open).
_JOB_IDENTITY = ("path", "configuration", "architecture", "width", "seed")


def _usable_state(resume: dict[str, SAEState] | None, jobs: list[dict], settings: TrainSettings,
                  num_steps: int) -> dict[str, SAEState] | None:
    """`resume` if it continues exactly these jobs with these settings, else None (train from the start)."""
    if not resume:
        return None
    problems = []
    steps = {meta["step"] for _, meta in resume.values()}
    if len(steps) != 1 or not 0 < next(iter(steps)) <= num_steps:
        problems.append(f"steps {sorted(steps)} (of {num_steps})")
    for job in jobs:
        meta = resume[job["path"]][1] if job["path"] in resume else None
        if meta is None:
            problems.append(f"no state for {job['path']}")
            continue
        if meta["job"] != {k: job.get(k) for k in _JOB_IDENTITY}:
            problems.append(f"{job['path']}: another job")
        if any(meta["params"].get(k) != v for k, v in job["params"].items() if v is not None):
            problems.append(f"{job['path']}: other parameters")
        if is_steered(job) and not meta.get("l0_control"):
            problems.append(f"{job['path']}: no L0 controller state")
        if (meta["train_hash"], meta["batch_size"], meta["data_seed"]) != (
                settings.train_hash, settings.batch_size, settings.data_seed):
            problems.append(f"{job['path']}: other training settings")
    if problems:
        log.warning("training state not resumed, training from the start: %s", "; ".join(problems))
        return None
    return resume


def _restore_calibration(jobs: list[dict], resume: dict[str, SAEState]) -> list[dict]:
    out = []
    for job in jobs:
        meta = resume[job["path"]][1]
        calibrated = {"params": meta["params"]} | ({"calibration": meta["calibration"]} if meta["calibration"] else {})
        out.append(job | calibrated)
    return out


def _set_rng_state(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def lm_eval_inputs(manifest: dict, settings: TrainSettings,
                   device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The generate stage's model and its first `lm_eval_chunks` token chunks (seen in training too: the
    activations cover the whole corpus sample)."""
    from ..generate.models import load_model

    m = manifest["model"]
    model = load_model(m["path"], m.get("revision"), m["dtype"], settings.trust_remote_code, str(device),
                       random_init_seed=m.get("random_init_seed"))
    store = ActivationStore(manifest["root"])
    token_files = manifest["plan"].get("token_files")
    if token_files is None:  # a manifest written before token files were per source shard
        chunks = store.read_table("tokens.parquet", columns=["input_ids"]).slice(
            0, settings.lm_eval_chunks).column("input_ids").to_pylist()
        return model, torch.tensor(chunks, dtype=torch.long, device=device)
    n = min(settings.lm_eval_chunks, sum(f["chunks"] for f in token_files))
    return model, torch.from_numpy(read_chunks(store, token_files, 0, n)).to(device)


def _calibrate_sparsity(jobs: list[dict], streams: dict, d_in: int, settings: TrainSettings,
                        device: torch.device) -> list[dict]:
    """Jobs with a `target_l0` get the L1 coefficient their training starts from (`calibration`), found once per
    configuration by short probes with its smallest seed; the controller (`SparsityTargets`) takes it from there."""
    found: dict[str, tuple[float, float]] = {}
    out = []
    for job in jobs:
        if not is_steered(job):
            out.append(job)
            continue
        conf = job.get("configuration", "")
        if conf not in found:
            stream = streams[ARCHITECTURES[job["architecture"]].normalize_inputs]
            found[conf] = calibrate_l1_coefficient(job | {"seed": steering_seed(job, jobs)}, stream, d_in, settings,
                                                   device)
        coefficient, probe_l0 = found[conf]
        out.append(job | {"calibration": {"initial_l1_coefficient": coefficient, "calibration_probe_l0": probe_l0}})
    return out


def held_out_set(root: str, held_out: list[dict], scale: float, device: torch.device,
                 batch_size: int = 4096) -> list[torch.Tensor]:
    """The held-out rows (`split_held_out`), scaled, in batches on `device`."""
    store = ActivationStore(root)
    rows = torch.from_numpy(np.concatenate([read_rows(store, s) for s in held_out]) * scale).to(device)
    return list(rows.split(batch_size))


def sae_folder_cfg(job: dict, d_in: int, hookpoint: str, settings: TrainSettings, num_steps: int,
                   dead_window: int) -> dict:
    """cfg.json: sparsify's keys (so its loader reads the folder) plus what reproduces this SAE."""
    return {
        "d_in": d_in,
        "num_latents": job["width"],
        "expansion_factor": job["width"] / d_in,
        "k": job["params"].get("k", 0),
        # sparsify's flag: decoder rows kept at unit norm (the TopK family; the others train freely or on scaled inputs).
        "normalize_decoder": ARCHITECTURES[job["architecture"]].normalize_decoder,
        "multi_topk": False,
        "skip_connection": False,
        "architecture": job["architecture"],
        "params": job["params"],
        "seed": job["seed"],
        "data_seed": settings.data_seed,
        "hookpoint": hookpoint,
        "batch_size": settings.batch_size,
        "num_steps": num_steps,
        "dead_window_tokens": dead_window,
        "lr": effective_lr(job, settings),
        "train_hash": settings.train_hash,  # the train stage retrains a folder whose settings differ
    }
