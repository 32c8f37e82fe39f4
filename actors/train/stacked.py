"""Many seeds per data pass: the seeds of one configuration trained as one stack.

The S seeds' parameters are stacked along a leading dimension (encoder [S, n, d], bias [S, n], decoder [S, n, d],
b_dec [S, d]) and each batch is hashed once for all of them. How a stack steps depends on the architecture:

- an architecture with `stacking = "batched"` (relu_l1) encodes and decodes all seeds with one batched matmul
  each in its `stacked_forward`, with one backward;
- one with `stacking = "seed_by_seed"` (the TopK family) steps seed after seed, each through its own `SAETrainer.train_on`: its
  sparse codes leave only the (no-grad) encoder matmul that chooses the latents to batch. On a GPU one batched
  matmul computes every seed's encoder outputs [S, batch, width] first (one seed's matmul leaves much of a GPU
  idle); on a CPU each seed computes its own, which keeps its forward, backward and Adam on weights still in
  cache (one matmul already fills the cores, and an [S, batch, width] tensor costs more in cache misses and page
  faults than it saves). `batch_encoder` overrides the choice.

Each seed's result is the one it gets trained alone (`SAETrainer`): bitwise on CPU (tests/test_stacked.py), because

- every seed is first built by `build_trainer` (same torch seed, same init), then its tensors are copied into the
  stack and its own parameters become views of its slice, so saving, evaluation and the architecture's hooks
  (`init_from_batch`, `before_optimizer_step`, `after_optimizer_step`) run on the seed's own module, unchanged;
- a batched forward acts on each seed's slice exactly as the single-seed ops act on its tensors (matmuls per
  batch element); whatever reduces over a seed's whole tensor (the loss, the gradient-norm clip) is computed per
  seed on that seed's contiguous slice, with the single-seed code;
- each seed keeps its own Adam and schedule, which step its slice (torch's fused Adam rounds an element
  differently when it sits at another offset of a larger tensor, so one Adam over the stack could not match).

An architecture declares its stacking in its own file (`SparseAutoencoder.stacking`); a batched forward is used
only by the class that defines it (a subclass with another loss is not covered by its parent's forward), and an
architecture that declares none trains each seed separately, as with stacking off.
"""

from __future__ import annotations

import json
import math

import torch

from ..sae.stacked_ops import encoder_outputs
from .settings import TrainSettings

# Parameter names as the single-seed modules have them; the stack keeps one tensor per name.
PARAM_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def stackable(trainer) -> bool:
    """Whether the architecture declares how its seeds step as a stack (`SparseAutoencoder.stacking`); a batched
    forward counts only for the class that defines it."""
    arch = type(trainer.sae)
    return arch.stacking == "seed_by_seed" or (arch.stacking == "batched" and "stacked_forward" in vars(arch))


class SingleTrainer:
    """One SAETrainer behind the group interface (architectures without a stacked forward, or stacking off)."""

    def __init__(self, trainer):
        self.trainers = [trainer]

    def step(self, x: torch.Tensor) -> list[dict[str, float]]:
        return [self.trainers[0].step(x)]


class StackedTrainer:
    """S seeds of one configuration (SAETrainers from `build_trainer`) trained as one stack.

    The SAETrainers stay the seeds' public face: their modules' parameters, optimizers, schedules, `last_fired`,
    `tokens_seen` and digest always show the current state, so saving, evaluating and checkpointing them needs
    nothing from this class."""

    def __init__(self, trainers, batch_encoder: bool | None = None):
        self.trainers = trainers
        # TopK family: every seed's encoder outputs from one batched matmul (default: on GPUs; see the module doc).
        self.batch_encoder = batch_encoder
        self.saes = [t.sae for t in trainers]
        arch = type(self.saes[0])
        self.forward = arch.stacked_forward if arch.stacking == "batched" else None  # None: seed by seed
        names = {name for name, _ in self.saes[0].named_parameters()}
        assert names == set(PARAM_NAMES), f"a stacked forward expects parameters {PARAM_NAMES}, got {names}"
        self.params = {name: torch.nn.Parameter(torch.stack([dict(s.named_parameters())[name].detach()
                                                             for s in self.saes]))
                       for name in PARAM_NAMES}
        self._own = []  # (seed's parameter, stacked name, seed index)
        for s, sae in enumerate(self.saes):
            for name, param in sae.named_parameters():
                param.data = self.params[name].data[s]  # the seed's module now shows its slice of the stack
                self._own.append((param, name, s))
        self.last_fired = torch.stack([t.last_fired for t in trainers])
        self.digest = trainers[0].digest  # every seed sees the same batches: one digest serves them all
        for s, t in enumerate(trainers):
            t.last_fired = self.last_fired[s]
            t.digest = self.digest
        self.grad_clip = trainers[0].grad_clip
        self.dead_window = trainers[0].dead_window
        self.tokens_seen = trainers[0].tokens_seen

    @torch.no_grad()
    def encoder_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every seed's `TopKSAE.encoder_outputs` (before the relu), [S, batch, width], in one batched matmul."""
        return encoder_outputs(self.params, x)

    def step(self, x: torch.Tensor) -> list[dict[str, float]]:
        if not self.trainers[0].initialised:
            for t in self.trainers:
                t.sae.init_from_batch(x)  # writes into the seed's slice
                t.initialised = True
        self.digest.update(x.detach().cpu().numpy().tobytes())
        if self.forward is None:
            # Each seed's whole step before the next one's, while its weights are still in cache. The batched
            # encoder outputs are taken before any seed steps, from the weights each seed's own forward would see.
            batched = x.is_cuda if self.batch_encoder is None else self.batch_encoder
            if batched:
                pres = self.encoder_outputs(x).unbind(0)
                metrics = [t.train_on(x, pre=pre) for t, pre in zip(self.trainers, pres)]
            else:
                metrics = [t.train_on(x) for t in self.trainers]
            self.tokens_seen += x.shape[0]
            return metrics
        dead = (self.tokens_seen - self.last_fired) >= self.dead_window
        out = self.forward(self.saes, self.params, x, dead)  # a StackedOutput
        for p in self.params.values():
            p.grad = None
        out.loss.backward()
        # Per seed, on its own module whose gradients are views of its slice: the architecture's gradient hook, the
        # gradient-norm clip (each seed's norm its own), the seed's own Adam and schedule, the constraint.
        for param, name, s in self._own:
            param.grad = self.params[name].grad[s]
        for t in self.trainers:
            t.sae.before_optimizer_step()
            torch.nn.utils.clip_grad_norm_(t.sae.parameters(), self.grad_clip)
            t.optimizer.step()
            t.scheduler.step()
            t.sae.after_optimizer_step()
        for param, _, _ in self._own:
            param.grad = None  # the views would keep this step's gradients alive into the next
        self.tokens_seen += x.shape[0]
        self.last_fired[out.fired] = self.tokens_seen
        for t in self.trainers:
            t.tokens_seen = self.tokens_seen
        return [{"loss": loss, "fvu": fvu, "l0": l0}
                for loss, fvu, l0 in zip(out.losses.tolist(), out.fvu.tolist(), out.l0.tolist())]


# ---- grouping seeds into stacks ----

def stack_bytes_per_seed(d_in: int, width: int, batch_size: int) -> int:
    """Estimated float32 memory one seed adds to a stack: weights, gradients and Adam's two moments (4 copies of
    the parameters), plus about six [batch, width] tensors alive in a step (pre-activations, codes, their
    gradients, top-k scratch) and a few [batch, d_in] ones."""
    params = 2 * width * d_in + width + d_in
    return 4 * (4 * params + 6 * batch_size * width + 4 * batch_size * d_in)


def _configuration_key(job: dict) -> tuple:
    # Seeds stack when everything but the seed is the same (same loss, learning rate and schedule).
    return job["architecture"], job["width"], json.dumps(job["params"], sort_keys=True)


def split_seeds(jobs: list[dict], d_in: int, batch_size: int, max_stack_bytes: int) -> list[list[dict]]:
    """The jobs grouped by configuration (in order of first appearance), each group split into as few stacks of
    near-equal size as keep every stack's estimated memory under `max_stack_bytes` (a seed alone may exceed it)."""
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        groups.setdefault(_configuration_key(job), []).append(job)
    out = []
    for group in groups.values():
        per_seed = stack_bytes_per_seed(d_in, group[0]["width"], batch_size)
        # whole seeds per stack: dividing the group's total by the budget could put two seeds where one fits
        fits = int(max(1, min(len(group), max_stack_bytes // per_seed)))
        parts = math.ceil(len(group) / fits)
        size, extra = divmod(len(group), parts)
        start = 0
        for i in range(parts):
            end = start + size + (i < extra)
            out.append(group[start:end])
            start = end
    return out


def group_trainers(trainers: list, settings: TrainSettings, d_in: int) -> list:
    """The trainers as step groups: stacks of seeds where the architecture has a stacked forward and
    `settings.stack_seeds`, split to fit `settings.max_stack_bytes`; single trainers otherwise."""
    if not settings.stack_seeds:
        return [SingleTrainer(t) for t in trainers]
    by_job = {id(t.job): t for t in trainers}
    stackable_jobs = [t.job for t in trainers if stackable(t)]
    groups = [SingleTrainer(t) for t in trainers if not stackable(t)]
    for jobs in split_seeds(stackable_jobs, d_in, settings.batch_size, settings.max_stack_bytes):
        members = [by_job[id(j)] for j in jobs]
        if len(members) == 1:
            groups.append(SingleTrainer(members[0]))
        else:
            groups.append(StackedTrainer(members))
    return groups
