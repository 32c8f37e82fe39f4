"""Sparsity calibration: L1-style SAEs trained to a target L0, so that they can be compared with TopK at the same
sparsity (the paper compares architectures "even when controlling for the level of sparsity").

Two parts. Before training, a bisection in log space over the coefficient (short probes: a fresh SAE trained for a
few steps on the first batches of the same stream) finds where training starts. Probes alone miss: the L1 penalty
keeps shrinking activations as training goes on, so a coefficient that reaches the target in 100 steps ends a full
run far sparser (default config: probes at 16.8 for a target of 16, full runs at 7.9 to 9.4). So during training a
controller (`L0Controller`) steers the coefficient toward the target and holds it fixed for the final stretch;
the trained SAE's L0 is recorded next to its target and its final coefficient.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..sae import ARCHITECTURES
from .data import ActivationStream
from .settings import TrainSettings
from .trainer import build_trainer


def calibrate_l1_coefficient(job: dict, stream: ActivationStream, d_in: int, settings: TrainSettings,
                             device: torch.device,
                             steps: int = 100, rounds: int = 8, bounds: tuple[float, float] = (1e-4, 1e2)
                             ) -> tuple[float, float]:
    """(coefficient, probe L0) whose probe L0 came closest to `job["params"]["target_l0"]`."""

    target = job["params"]["target_l0"]
    steps = max(1, min(steps, len(stream)))
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    best: tuple[float, float] | None = None
    for _ in range(rounds):
        coefficient = math.exp((lo + hi) / 2)
        probe = job | {"params": job["params"] | {"l1_coefficient": coefficient}}
        trainer = build_trainer(probe, d_in, steps, settings, device)
        l0s = [trainer.step(torch.from_numpy(batch).to(device))["l0"]
               for batch in itertools.islice(stream, steps)]
        l0 = float(np.mean(l0s[-max(1, steps // 10):]))  # the end of the probe, past its warm-up
        if best is None or abs(math.log(max(l0, 1e-9) / target)) < abs(math.log(max(best[1], 1e-9) / target)):
            best = (coefficient, l0)
        if l0 > target:
            lo = (lo + hi) / 2  # too dense: a stronger penalty
        else:
            hi = (lo + hi) / 2
    return best


def is_steered(job: dict) -> bool:
    """A job whose coefficient is steered to its `target_l0` (rather than given)."""
    name = ARCHITECTURES[job["architecture"]].target_l0_controls
    return name is not None and job["params"].get("target_l0") is not None and job["params"].get(name) is None


def steering_seed(job: dict, jobs: list[dict]) -> int:
    """The seed that calibrates and steers `job`'s configuration: `calibration_seed` where the train stage split the
    configuration's seeds over workers, else the smallest of its seeds among `jobs`."""
    conf = job.get("configuration", "")
    return job.get("calibration_seed", min(j["seed"] for j in jobs if j.get("configuration", "") == conf))


# Controller settings. On the default config (target 16) and on planted data they end within a few percent of the
# target (docs/architectures.md); a pure integral controller (PROPORTIONAL = 0) oscillated on planted data at gains that track the
# default config's drifting L0, and a proportional term damps it.
GAIN = 0.05  # integral gain: log-coefficient change per step per unit of log(L0 / target)
PROPORTIONAL = 1.0  # proportional gain on the same error
SMOOTHING = 0.8  # weight of the previous smoothed L0 (about 5 steps of memory)


@dataclass
class L0Controller:
    """Steers one configuration's L1 coefficient toward a target L0 during training, then holds it fixed.

    A proportional-integral controller on the error e = log(smoothed L0 / target), clipped to [-1, 1]: after each
    step, I += gain x e and log(coefficient) = I + proportional x e. The smoothed L0 is an exponential moving average
    of the driving seed's batch L0. It engages once the smoothed L0 has first come down to the target (at init most
    latents fire, and raising the coefficient against that transient overshoots into an SAE with nothing left
    active), or at the latest half-way to `hold_step`. From `hold_step` on the coefficient is held, so the SAE ends
    trained at one fixed coefficient, the one recorded. Plain float arithmetic on the logged L0: the same seed gives
    the same coefficients, bit for bit, stacked or not, resumed or not (the state goes into the training state)."""

    target: float
    coefficient: float  # what the next step trains with
    hold_step: int  # from this step on the coefficient is held
    gain: float
    proportional: float
    smoothing: float  # weight of the previous smoothed L0
    log_integral: float | None = None  # I, from the coefficient at engagement
    smoothed_l0: float | None = None
    engaged: bool = False

    def update(self, step: int, l0: float) -> float:
        """The coefficient for the step after `step` (0-based), given the driving seed's L0 at `step`."""
        if step + 1 >= self.hold_step:
            return self.coefficient
        self.smoothed_l0 = l0 if self.smoothed_l0 is None else (
            self.smoothing * self.smoothed_l0 + (1 - self.smoothing) * l0)
        self.engaged = self.engaged or self.smoothed_l0 <= self.target or step + 1 >= self.hold_step // 2
        if not self.engaged:
            return self.coefficient
        error = max(-1.0, min(1.0, math.log(max(self.smoothed_l0, 1e-3) / self.target)))
        if self.log_integral is None:
            self.log_integral = math.log(self.coefficient)
        self.log_integral += self.gain * error
        self.coefficient = math.exp(self.log_integral + self.proportional * error)
        return self.coefficient

    def state(self) -> dict:
        return asdict(self)


class SparsityTargets:
    """The L0 controllers of one worker's jobs: one per configuration with a target L0, shared by all its seeds.

    Every seed of a configuration trains with the same coefficient at every step, steered by the L0 of one seed
    (`calibration_seed`, else the configuration's smallest; a seed a worker trains only to steer, see `l0_pilot` in
    the train stage). The paper compares seeds at identical hyper-parameters, and this keeps them identical: the
    seeds still differ only in their init. Steering by the mean L0 of the seeds instead would make every seed's
    weights depend on which other seeds are trained (and on how a configuration's seeds are split over workers)."""

    def __init__(self, jobs: list[dict], num_steps: int, settings: TrainSettings, resume: dict | None = None):
        self.controllers: dict[str, L0Controller] = {}
        self.driver: dict[str, int] = {}  # configuration -> the seed whose L0 steers it
        self.coefficient_name: dict[str, str] = {}
        for job in jobs:
            conf = job.get("configuration", "")
            if "calibration" not in job or conf in self.controllers:
                continue
            if resume is not None:
                state = resume[job["path"]][1]["l0_control"]
                self.controllers[conf] = L0Controller(**state)
            else:
                self.controllers[conf] = L0Controller(
                    target=job["params"]["target_l0"], coefficient=job["calibration"]["initial_l1_coefficient"],
                    hold_step=num_steps - round(settings.target_l0_hold_fraction * num_steps),
                    gain=GAIN, proportional=PROPORTIONAL, smoothing=SMOOTHING)
            self.coefficient_name[conf] = ARCHITECTURES[job["architecture"]].target_l0_controls
            self.driver[conf] = steering_seed(job, jobs)
            if self.driver[conf] not in {j["seed"] for j in jobs if j.get("configuration", "") == conf}:
                raise ValueError(f"{conf}: seed {self.driver[conf]} steers the L1 coefficient but is not trained here")

    def apply(self, trainers) -> None:
        """Give each controlled SAE its configuration's current coefficient (in its params, which its loss reads)."""
        for t in trainers:
            conf = t.job.get("configuration", "")
            if conf in self.controllers:
                name = self.coefficient_name[conf]
                t.sae.params = t.sae.params.model_copy(update={name: self.controllers[conf].coefficient})

    def after_step(self, step: int, logs: list[tuple[dict, dict]]) -> None:
        """Update each controller with its driving seed's L0 in this step's `logs` ((job, metrics) per SAE)."""
        for conf, controller in self.controllers.items():
            l0 = next(m["l0"] for job, m in logs
                      if job.get("configuration", "") == conf and job["seed"] == self.driver[conf])
            controller.update(step, l0)

    def state(self, job: dict) -> dict | None:
        controller = self.controllers.get(job.get("configuration", ""))
        return controller.state() if controller else None

    def params(self, job: dict) -> dict:
        """The steered hyper-parameter at its current value, as the SAE's saved cfg records it; {} if none."""
        conf = job.get("configuration", "")
        return {self.coefficient_name[conf]: self.controllers[conf].coefficient} if conf in self.controllers else {}

    def metrics(self, job: dict) -> dict:
        """What a saved SAE records: the target, and the coefficient it trained with last."""
        controller = self.controllers.get(job.get("configuration", ""))
        if controller is None:
            return {}
        return {"target_l0": controller.target, "calibrated_l1_coefficient": controller.coefficient}
