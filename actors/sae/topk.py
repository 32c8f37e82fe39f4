"""TopK SAE, following EleutherAI sparsify's recipe (see ../shared/reference/paper.md), with optional AuxK."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import SparseAutoencoder, fraction_of_variance_unexplained, unit_rows, without_parallel_component


class TopKParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(..., gt=0, description="Active latents per token.")
    auxk_alpha: float = Field(0.0, ge=0, description="Weight of the AuxK loss on dead latents; 0 turns it off.")


class TopKSAE(SparseAutoencoder):
    name = "topk"
    Params = TopKParams

    def __init__(self, d_in: int, num_latents: int, params: TopKParams):
        super().__init__(d_in, num_latents, params)
        with torch.no_grad():
            # nn.Linear's default init for the encoder, zero bias, decoder = encoder copy with unit rows.
            self.encoder.bias.zero_()
            self.W_dec.copy_(unit_rows(self.encoder.weight))
        self._pre: torch.Tensor | None = None  # last training batch's pre-activations, for AuxK

    @classmethod
    def check_width(cls, params, width):
        if params["k"] > width:
            return f"k={params['k']} must be at most the width ({width})"
        return None

    @classmethod
    def check_data_parallel(cls, params):
        if params.get("auxk_alpha", 0) > 0:
            return "AuxK (auxk_alpha > 0) normalises by the whole batch's residual, which a slice does not see"
        return None

    @classmethod
    def recipe_lr(cls, num_latents: int) -> float:
        return 2e-4 / math.sqrt(num_latents / 2**14)

    @torch.no_grad()
    def init_from_batch(self, x):
        self.b_dec.copy_(x.mean(0))

    def pre_activations(self, x):
        pre = F.relu(self.encoder(x - self.b_dec))
        self._pre = pre if self.training and torch.is_grad_enabled() else None
        return pre

    def activations(self, x):
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.params.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def loss(self, x, x_hat, z, fvu):
        if self.params.auxk_alpha > 0 and self._pre is not None:
            return fvu + self.params.auxk_alpha * self.auxk_loss(x, x_hat)
        return fvu

    def auxk_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024, as sparsify has it): the top k_aux = d_in/2 dead latents reconstruct the residual;
        FVU of that reconstruction, scaled by min(#dead / k_aux, 1). Zero when nothing is dead."""
        dead = self.dead_mask
        num_dead = int(dead.sum()) if dead is not None else 0
        if num_dead == 0:
            return x.new_zeros(())
        k_aux = min(self.d_in // 2, num_dead)
        pre_dead = self._pre.masked_fill(~dead, float("-inf"))
        values, indices = pre_dead.topk(k_aux, dim=-1, sorted=False)
        residual_hat = torch.zeros_like(self._pre).scatter_(-1, indices, values) @ self.W_dec
        scale = min(num_dead / (self.d_in // 2), 1.0)
        return scale * fraction_of_variance_unexplained(x - x_hat.detach(), residual_hat)

    def sparsify_cfg(self):
        return {"activation": "topk", "k": self.params.k, "normalize_decoder": True}

    def saelens_cfg(self):
        # SAELens' TopK keeps the k largest pre-activations and then applies ReLU; this one applies ReLU first.
        # Either way the latents are the positive part of the k largest, so they agree.
        return {"architecture": "topk", "k": self.params.k, "rescale_acts_by_decoder_norm": False}, {}

    def gradient_transforms(self):
        return {"W_dec": lambda grad: without_parallel_component(grad, self.W_dec.detach())}

    @torch.no_grad()
    def after_optimizer_step(self):
        self.W_dec.copy_(unit_rows(self.W_dec))
