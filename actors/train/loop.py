"""The training loop of both backends, readable top to bottom.

A backend sets its SAEs up (resumed where a training state says so) as a `TrainingRun`: the torch backend's
`TorchRun` (actors/train/training.py: a worker's SAEs on one shared stream, seeds stacked) or the DeepSpeed backend's
`DataParallelRun` (actors/train/deepspeed_backend.py: one SAE, data-parallel over the workers). `train` steps it
through its batches and decides when metrics are reported, intermediate SAEs saved and the training state
checkpointed; the run decides how.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from .settings import TrainSettings
from .train_state import SAEState, write_training_state

# report(step, [(job, metrics), ...]): a step's metrics of each SAE (actors/train/worker.py logs them to MLflow).
Report = Callable[[int, list[tuple[dict, dict]]], None]
# save_state(folder, step): keep a training-state folder (copy it: it is removed afterwards).
SaveState = Callable[[Path, int], None]


class TrainingRun(Protocol):
    """What `train` steps: a backend's SAEs, set up and ready for step `start_step`."""

    num_steps: int  # steps of the whole run
    start_step: int  # steps trained before (from a resumed training state); 0 on a fresh start

    def batches(self) -> Iterable[Any]:
        """The batches from `start_step` on, one per step."""

    def step(self, step: int, batch: Any) -> None:
        """Train every SAE on `batch`, the 0-based `step`-th."""

    def metrics(self) -> list[tuple[dict, dict]]:
        """(job, metrics) of the last step for each reported SAE. Called on every worker: it may be a collective."""

    def save_checkpoint(self, tokens: int) -> None:
        """Save the intermediate SAEs at `tokens` training tokens."""

    def state(self, step: int) -> dict[str, SAEState]:
        """Everything a restarted worker continues from after `step` steps, by state key."""

    def close(self) -> None:
        """Free what only training needs (after the last step, or a failure)."""

    def finish(self) -> list[dict]:
        """Evaluate and save the trained SAEs; their results ({"job", "metrics", "data_digest"})."""


def train(run: TrainingRun, settings: TrainSettings, *, report: Report | None = None, progress=None,
          save_state: SaveState | None = None) -> list[dict]:
    """Train `run` to its last step and return its results. `report` gets the metrics every `log_every` steps,
    `progress(total)` makes a bar, `save_state` gets the training state every `state_every_tokens` (and after
    the last step); without it no state is written."""
    num_steps, batch_size = run.num_steps, settings.batch_size
    # Intermediate SAEs before a resumed step are on disk already; the first step reaching each other one saves it.
    pending = [n for n in settings.checkpoint_tokens if n > run.start_step * batch_size]
    state_every = settings.state_every_steps(num_steps)
    bar = progress(num_steps) if progress else None
    if bar is not None and run.start_step:
        bar.update(run.start_step)
    try:
        for step, batch in enumerate(run.batches(), start=run.start_step):
            run.step(step, batch)
            done = step + 1
            if done % settings.log_every == 0 or done == num_steps:
                metrics = run.metrics()  # on every worker: DeepSpeed's is an all-reduce
                if report is not None:
                    report(done, metrics)
            while pending and done * batch_size >= pending[0]:
                run.save_checkpoint(pending.pop(0))
            if save_state is not None and (done % state_every == 0 or done == num_steps):
                hand_over_state(run.state(done), done, save_state)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        run.close()
    return run.finish()


def hand_over_state(states: dict[str, SAEState], step: int, save_state: SaveState) -> None:
    """Write `states` to a fresh folder, hand it to `save_state`, then remove it."""
    with tempfile.TemporaryDirectory(prefix="sae-train-state-") as tmp:
        folder = Path(tmp) / f"step{step:09d}"
        write_training_state(folder, states)
        save_state(folder, step)
