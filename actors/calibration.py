"""Sparsity calibration: the L1 coefficient that gives a target L0, so that L1-style SAEs can be compared with
TopK at the same sparsity (the paper compares architectures "even when controlling for the level of sparsity").

A bisection in log space: each probe trains a fresh SAE for a few steps on the first batches of the same stream
the real training reads, and moves the bracket by the L0 it reaches. L0 falls as the coefficient grows, so the
bracket closes on the target. Probes are short, so the L0 of the full run can differ somewhat; the trained SAE's
own L0 is recorded next to the coefficient found.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from .data import ActivationStream


def calibrate_l1_coefficient(job: dict, stream: ActivationStream, d_in: int, hp: dict, device: torch.device,
                             steps: int = 100, rounds: int = 8, bounds: tuple[float, float] = (1e-4, 1e2)
                             ) -> tuple[float, float]:
    """(coefficient, probe L0) whose probe L0 came closest to `job["params"]["target_l0"]`."""
    from .training import build_trainer  # training imports this module

    target = job["params"]["target_l0"]
    steps = max(1, min(steps, len(stream)))
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    best: tuple[float, float] | None = None
    for _ in range(rounds):
        coefficient = math.exp((lo + hi) / 2)
        probe = job | {"params": job["params"] | {"l1_coefficient": coefficient}}
        trainer = build_trainer(probe, d_in, steps, hp, device)
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
