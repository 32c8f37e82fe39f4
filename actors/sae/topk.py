"""TopK SAE, following EleutherAI sparsify's recipe (see ../shared/reference/paper.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import SparseAutoencoder, remove_parallel_gradient, unit_rows


class TopKParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(..., gt=0, description="Active latents per token.")


class TopKSAE(SparseAutoencoder):
    name = "topk"
    Params = TopKParams

    def __init__(self, d_in: int, num_latents: int, params: TopKParams):
        super().__init__(d_in, num_latents, params)
        with torch.no_grad():
            # nn.Linear's default init for the encoder, zero bias, decoder = encoder copy with unit rows.
            self.encoder.bias.zero_()
            self.W_dec.copy_(unit_rows(self.encoder.weight))

    @classmethod
    def check_width(cls, params, width):
        if params["k"] > width:
            return f"k={params['k']} must be at most the width ({width})"
        return None

    @classmethod
    def recipe_lr(cls, num_latents: int) -> float:
        return 2e-4 / math.sqrt(num_latents / 2**14)

    @torch.no_grad()
    def init_from_batch(self, x):
        self.b_dec.copy_(x.mean(0))

    def activations(self, x):
        pre = F.relu(self.encoder(x - self.b_dec))
        values, indices = pre.topk(self.params.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def loss(self, x, x_hat, z, fvu):
        return fvu

    def before_optimizer_step(self):
        remove_parallel_gradient(self.W_dec)

    @torch.no_grad()
    def after_optimizer_step(self):
        self.W_dec.copy_(unit_rows(self.W_dec))
