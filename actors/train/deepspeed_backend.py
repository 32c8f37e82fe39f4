"""DeepSpeed backend (`train.backend: deepspeed`): one SAE at a time, data-parallel over all Ray Train workers.

For an SAE too wide for one device: every worker holds the SAE, steps on its own slice of each batch, and
DeepSpeed averages the gradients; ZeRO stage 1 partitions Adam's moments (and the fp32 master weights) over the
workers, stage 2 the gradients too. The result is the SAE the torch backend trains on the same batches, to float
rounding, because

- every worker reads the whole shared stream (same order as the torch backend) and keeps rows
  [rank * b, (rank + 1) * b) of each batch (b = batch_size / workers);
- each slice's loss averages to the whole batch's: means over tokens do as they are, and FVU divides by the whole
  batch's variance over the number of slices (`SparseAutoencoder.fvu_denominator`); architectures whose loss or
  activations need the whole batch are refused by the config (`check_data_parallel`);
- the architecture's gradient surgery (`gradient_transforms`, linear) acts on each worker's gradient as a tensor
  hook, before DeepSpeed averages; DeepSpeed then clips the global gradient norm and steps Adam and the schedule;
- the architecture's projection after the step (unit-norm decoder rows) runs on the module's weights, which are
  then copied into ZeRO's fp32 master partition so the next step starts from the projected weights;
- a latent counts as fired when it fired in any worker's slice (max all-reduce), so dead-latent counters agree.

The batch loop is the torch backend's (actors/train/loop.py), stepping a `DataParallelRun`. Rank 0 evaluates and
saves each SAE (and its intermediate checkpoints) in the normal folder layout. No mid-SAE training state is
written: after a worker failure Ray Train restarts the group, which skips the SAEs already saved and retrains the
one it was on. deepspeed is imported only inside the worker (an optional extra).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..sae import ARCHITECTURES, SparseAutoencoder, import_architecture_modules
from ..sae.base import batch_variance_total
from ..store.checkpoint import checkpoint_folder, is_trained
from ..store.shards import held_out_rows
from .data import ActivationStream, split_held_out
from .lm_eval import spliced_lm_metrics
from .loop import train
from .settings import TrainSettings
from .training import SAETrainer, build_trainer, held_out_set, lm_eval_inputs, save_trained, wants_lm_eval

log = logging.getLogger(__name__)


def deepspeed_config(settings: TrainSettings, world_size: int) -> dict:
    """The DeepSpeed config for one SAE: fp32 as the torch backend trains, one micro-batch (a worker's slice) per
    step, DeepSpeed's global gradient-norm clip, ZeRO as configured."""
    ds = settings.deepspeed
    zero = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        zero |= {"reduce_bucket_size": ds.reduce_bucket_size, "overlap_comm": ds.overlap_comm,
                 "contiguous_gradients": True}
    return {
        "train_batch_size": settings.batch_size,
        "train_micro_batch_size_per_gpu": settings.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # metrics go to MLflow; DeepSpeed's own step log would only repeat them
    }


def worker_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of every batch that worker `rank` trains on: equal, disjoint, contiguous, together the batch."""
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {world_size} workers")
    rows = batch_size // world_size
    return slice(rank * rows, (rank + 1) * rows)


class DataParallelSAE:
    """One SAE (its `SAETrainer`: module, optimizer, schedule, dead counters, digest) stepped by a DeepSpeed engine
    on this worker's slice of each batch. The trainer stays the SAE's view for evaluation and saving."""

    def __init__(self, trainer: SAETrainer, first_batch: torch.Tensor, ds_config: dict, rank: int, world_size: int):
        import deepspeed

        self.trainer, self.rank, self.world_size = trainer, rank, world_size
        self.rows = worker_rows(first_batch.shape[0], rank, world_size)
        sae = trainer.sae
        sae.init_from_batch(first_batch)  # from the whole batch, as the torch backend; before ZeRO copies the weights
        trainer.initialised = True
        self._hooks = [sae.get_parameter(name).register_hook(transform)
                       for name, transform in sae.gradient_transforms().items()]
        _skip_cpu_inference_kernel()
        # The schedule was built on the client Adam, whose param_groups ZeRO keeps using, so its lr still applies.
        self.engine, _, _, _ = deepspeed.initialize(model=sae, optimizer=trainer.optimizer,
                                                    lr_scheduler=trainer.scheduler, config=ds_config)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One step on the whole batch `x` (this worker trains on its rows); returns this worker's [loss, fvu, l0],
        whose average over the workers is the whole batch's."""
        import deepspeed
        import torch.distributed as dist

        t, sae = self.trainer, self.trainer.sae
        t.digest.update(x.detach().cpu().numpy().tobytes())  # of the whole batch, as the torch backend's digest
        sae.dead_mask = (t.tokens_seen - t.last_fired) >= t.dead_window
        sae.fvu_denominator = batch_variance_total(x) / self.world_size
        try:
            out = self.engine(x[self.rows])
            self.engine.backward(out.loss)
            self.engine.step()  # gradient-norm clip, Adam, learning-rate schedule
        finally:
            sae.fvu_denominator = None
        sae.after_optimizer_step()
        for param in sae.parameters():  # the projected weights into ZeRO's fp32 master partition (no-op at stage 0)
            deepspeed.utils.safe_set_full_fp32_param(param, param.data)
        fired = out.fired.to(torch.uint8)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        t.tokens_seen += x.shape[0]
        t.last_fired[fired.bool()] = t.tokens_seen
        return torch.stack([out.loss.detach(), out.fvu, out.l0])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.engine.destroy()


def _skip_cpu_inference_kernel() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory all-reduce kernel when it first wraps the process group, for
    `inference_all_reduce` only (training's collectives go through torch.distributed, gloo here); the build takes
    minutes. Its op table is a module-level dict meant to be edited; marking the kernel unavailable skips it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _averaged(values: torch.Tensor, world_size: int) -> dict[str, float]:
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    loss, fvu, l0 = (values / world_size).tolist()
    return {"loss": loss, "fvu": fvu, "l0": l0}


def _standalone_copy(sae: SparseAutoencoder) -> SparseAutoencoder:
    """A plain module with `sae`'s weights and buffers, free of DeepSpeed's attributes (which a deepcopy would
    drag along, optimizer partitions included)."""
    with torch.random.fork_rng(devices=[]):  # the constructor's random init must not move the training RNG
        copy = type(sae)(sae.d_in, sae.num_latents, sae.params)
    copy.load_state_dict({k: v.detach().clone() for k, v in sae.state_dict().items()})
    return copy.to(next(sae.parameters()).device)


class DataParallelRun:
    """The `TrainingRun` of the DeepSpeed backend (actors/train/loop.py): one SAE, every worker building the same
    (same job), each stepping its slice of every batch; rank 0 evaluates and saves. `lm_eval()` gives
    (model, input_ids) for the LM-loss metrics, on rank 0 (None: not measured)."""

    start_step = 0  # no mid-SAE training state: a restarted group retrains the SAE from its first step

    def __init__(self, job: dict, manifest: dict, hookpoint: str, settings: TrainSettings, device: torch.device,
                 rank: int, world_size: int, node_id: str | None = None, lm_eval=None):
        self.job, self.hookpoint, self.settings, self.rank, self.world_size = (
            job, hookpoint, settings, rank, world_size)
        self.node_id, self.lm_eval = node_id, lm_eval
        entry = manifest["hookpoints"][hookpoint]
        self.d_in = entry["d_in"]
        # Inputs scaled as the torch backend scales them (folded back into the saved weights).
        self.scale = float(np.sqrt(self.d_in) / entry["mean_norm"])
        input_scale = self.scale if ARCHITECTURES[job["architecture"]].normalize_inputs else 1.0
        train_shards, held_out = split_held_out(entry["shards"], held_out_rows(entry["rows"], settings.eval_tokens))
        stream = ActivationStream(manifest["root"], train_shards, settings.batch_size, settings.data_seed,
                                  settings.tokens or sum(s["rows"] for s in train_shards), input_scale,
                                  settings.shuffle_buffer_tokens)
        self.num_steps = stream.num_steps
        self.trainer = build_trainer(job, self.d_in, self.num_steps, settings, device)
        self._batches = (torch.from_numpy(b).to(device) for b in stream)
        self._first = next(self._batches)  # initialises the SAE (every worker from the whole batch)
        self.model = DataParallelSAE(self.trainer, self._first, deepspeed_config(settings, world_size), rank,
                                     world_size)
        self.eval_set = held_out_set(manifest["root"], held_out, input_scale, device) if rank == 0 else None
        self.values: torch.Tensor | None = None  # this worker's [loss, fvu, l0] of the last step
        self.started = time.perf_counter()

    def batches(self):
        return itertools.chain([self._first], self._batches)

    def step(self, step: int, batch: torch.Tensor) -> None:
        self.values = self.model.step(batch)

    def metrics(self) -> list[tuple[dict, dict]]:
        return [(self.job, _averaged(self.values, self.world_size))]  # a collective: every worker takes part

    def save_checkpoint(self, tokens: int) -> None:
        if self.rank == 0:  # the others go on and wait for rank 0 at the next step's reduction
            self._save(checkpoint_folder(self.job["path"], tokens))

    def state(self, step: int) -> dict:
        raise NotImplementedError("the DeepSpeed backend writes no mid-SAE training state")

    def close(self) -> None:
        self.model.close()

    def finish(self) -> list[dict]:
        """Rank 0: the SAE saved, [its result]; the others: []."""
        if self.rank != 0:
            return []
        raw = self._raw()
        extra = {}
        if self.lm_eval is not None:
            lm_model, input_ids = self.lm_eval()
            extra = spliced_lm_metrics(lm_model, self.hookpoint, [raw], input_ids)[0]
        return [self._save(Path(self.job["path"]), extra, raw)]

    def _raw(self) -> SparseAutoencoder:
        raw = _standalone_copy(self.trainer.sae)
        if raw.normalize_inputs:
            raw.fold_input_scale(self.scale)
        return raw

    def _save(self, folder: Path, extra: dict | None = None, raw: SparseAutoencoder | None = None) -> dict:
        return save_trained(self.trainer, folder, raw if raw is not None else self._raw(), self.eval_set,
                            d_in=self.d_in, hookpoint=self.hookpoint, settings=self.settings,
                            num_steps=self.num_steps, seconds=time.perf_counter() - self.started,
                            node_id=self.node_id, extra=extra)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point for `train.backend: deepspeed` (same `train_loop_config` as actors.train.worker's)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from deepspeed.utils import logger as deepspeed_logger

    from ..progress import quiet_worker
    from ..store.shards import read_manifest
    from .worker import mlflow_reporter, remote_progress

    deepspeed_logger.setLevel(logging.WARNING)  # it logs its whole config for every SAE at INFO
    quiet_worker()
    import_architecture_modules(config.get("architecture_modules", []))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["torch_threads"])
    settings, hookpoint = config["settings"], config["hookpoint"]
    jobs = [job for group in config["groups"] for job in group]
    # After a restart (worker failure) the SAEs already saved are skipped; rank 0 decides so all agree.
    todo = [[not is_trained(j["path"], settings.train_hash, list(settings.checkpoint_tokens)) for j in jobs]]
    dist.broadcast_object_list(todo, src=0)
    manifest = read_manifest(config["activations_uri"], config.get("model_path"))
    device = ray.train.torch.get_device()
    report = mlflow_reporter(config.get("tracking_uri"), settings.batch_size) if rank == 0 else None
    progress = remote_progress(config.get("progress")) if rank == 0 else None
    lm = {}

    def lm_eval():
        if "inputs" not in lm:  # loaded once per worker, for all its SAEs
            lm["inputs"] = lm_eval_inputs(manifest, settings, device)
        return lm["inputs"]

    measure_lm = rank == 0 and wants_lm_eval(settings, manifest["hookpoints"][hookpoint])
    done = 0
    for job, needed in zip(jobs, todo[0]):
        if not needed:
            continue
        run = DataParallelRun(job, manifest, hookpoint, settings, device, rank, world,
                              node_id=ray.get_runtime_context().get_node_id(), lm_eval=lm_eval if measure_lm else None)
        train(run, settings, report=report, progress=progress)
        done += 1
    ray.train.report({"done": done})
