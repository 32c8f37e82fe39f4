"""Tensor operations on a stack of S seeds' parameters (encoder [S, n, d], bias [S, n], decoder [S, n, d],
b_dec [S, d]), for architectures that declare a batched `stacked_forward` (actors/train/stacked.py runs it).

Each op acts on every seed's slice exactly as the single-seed op acts on that seed's tensors (a batched matmul
is a matmul per batch element), so a seed in a stack gets the bits it gets trained alone on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class StackedOutput:
    loss: torch.Tensor  # sum of the seeds' losses: each seed's parameters get exactly their own loss's gradient
    losses: torch.Tensor  # [S], detached
    fvu: torch.Tensor  # [S]
    l0: torch.Tensor  # [S]
    fired: torch.Tensor  # bool [S, n]


def encoder_outputs(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """encoder(x - b_dec) for every seed: [S, B, n]. baddbmm on CPU gives, per seed, F.linear's bits."""
    centred = x.unsqueeze(0) - p["b_dec"].unsqueeze(1)
    return torch.baddbmm(p["encoder.bias"].unsqueeze(1), centred, p["encoder.weight"].mT)


def relu_pre_activations(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.relu(encoder_outputs(p, x))


def decode(p: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    # bmm then add, as `z @ W_dec + b_dec` (a fused baddbmm rounds differently at large sizes).
    return torch.bmm(z, p["W_dec"]) + p["b_dec"].unsqueeze(1)


def stacked_output(losses: list[torch.Tensor], fvus: list[torch.Tensor], z: torch.Tensor) -> StackedOutput:
    nonzero = z > 0
    losses = torch.stack(losses)
    return StackedOutput(loss=losses.sum(), losses=losses.detach(), fvu=torch.stack(fvus),
                         l0=nonzero.sum(-1).float().mean(-1), fired=nonzero.any(1))
