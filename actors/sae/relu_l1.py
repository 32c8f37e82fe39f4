"""ReLU SAE with an L1 penalty weighted by decoder row norms (SAELens' standard training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import SparseAutoencoder, unit_rows


class ReluL1Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l1_coefficient: float = Field(..., gt=0, description="Weight of the decoder-norm-weighted L1 penalty.")


class ReluL1SAE(SparseAutoencoder):
    name = "relu_l1"
    Params = ReluL1Params
    normalize_inputs = True

    def __init__(self, d_in: int, num_latents: int, params: ReluL1Params):
        super().__init__(d_in, num_latents, params)
        with torch.no_grad():
            # Random decoder rows of norm 0.1, encoder initialised as its transpose, zero biases.
            self.W_dec.copy_(0.1 * unit_rows(torch.randn(num_latents, d_in)))
            self.encoder.weight.copy_(self.W_dec)
            self.encoder.bias.zero_()

    @classmethod
    def recipe_lr(cls, num_latents: int) -> float:
        return 2e-4

    def activations(self, x):
        return F.relu(self.encoder(x - self.b_dec))

    def loss(self, x, x_hat, z, fvu):
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = (z * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return mse + self.params.l1_coefficient * l1
