"""TopK SAE, following EleutherAI sparsify's recipe (see ../shared/reference/paper.md), with optional AuxK.

Training runs on sparse codes (sparse_codes.py): one dense encoder matmul to choose each token's latents, then
decoding and every gradient from the selected entries only. The dense `activations` remain for evaluation,
exports and tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import (ForwardOutput, SparseAutoencoder, batch_variance_total, fraction_of_variance_unexplained,
                   unit_rows, unit_rows_, without_parallel_component)
from .sparse_codes import SparseCodes, decode, encode_selected


class TopKParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(..., gt=0, description="Active latents per token.")
    auxk_alpha: float = Field(0.0, ge=0, description="Weight of the AuxK loss on dead latents; 0 turns it off.")


class TopKSAE(SparseAutoencoder):
    """The TopK family (TopK, BatchTopK, Matryoshka): a subclass changes which latents are kept (`select`) or the
    reconstruction loss (`reconstruction_loss`); `forward` is shared."""

    name = "topk"
    Params = TopKParams
    stacking = "seed_by_seed"
    normalize_decoder = True
    example_params = {"k": 3, "auxk_alpha": 1 / 32}

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

    def encoder_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """encoder(x - b_dec) [batch, n], before the relu."""
        return self.encoder(x - self.b_dec)

    def pre_activations(self, x):
        return F.relu(self.encoder_outputs(x))

    def select(self, pre: torch.Tensor) -> SparseCodes:
        """The kept latents, relu'd, of the encoder's outputs [batch, n] (no graph): each token's k largest.

        `pre` may be taken before or after the relu: the relu only zeroes values, so the kept latents differ at
        most in entries of value 0, which decode to nothing and pass no gradient. Before it saves a pass over
        [batch, n]."""
        values, indices = pre.topk(self.params.k, dim=-1, sorted=False)
        return SparseCodes.from_rows(values.relu(), indices, self.num_latents)

    def activations(self, x):
        pre = self.pre_activations(x)
        codes = self.select(pre.detach())
        return codes.to_dense(pre[codes.rows, codes.latents])

    def encode_selected(self, codes: SparseCodes, x: torch.Tensor) -> torch.Tensor:
        """The codes' values as a differentiable function of the encoder and b_dec."""
        return encode_selected(codes, x, self.encoder.weight, self.encoder.bias, self.b_dec)

    def forward(self, x: torch.Tensor, pre: torch.Tensor | None = None) -> ForwardOutput:
        """One batch on sparse codes. `pre`: this batch's `encoder_outputs` when the caller has them already (a
        stack of seeds computes every seed's in one batched matmul)."""
        if pre is None:
            with torch.no_grad():
                pre = self.encoder_outputs(x)  # no relu: see `select`
        codes = self.select(pre)
        values = self.encode_selected(codes, x)
        x_hat = decode(codes, values, self.W_dec) + self.b_dec
        fvu = fraction_of_variance_unexplained(x, x_hat, self.fvu_denominator)
        loss = self.reconstruction_loss(x, codes, values, fvu)
        if self.params.auxk_alpha > 0 and self.training and torch.is_grad_enabled():
            loss = loss + self.params.auxk_alpha * self.auxk_loss(x, x_hat, pre)
        active = codes.values > 0
        return ForwardOutput(
            x_hat=x_hat,
            loss=loss,
            fvu=fvu.detach(),
            l0=active.sum().float() / x.shape[0],
            fired=torch.zeros(self.num_latents, dtype=torch.bool, device=x.device).index_fill_(
                0, codes.latents[active], True),
        )

    def reconstruction_loss(self, x: torch.Tensor, codes: SparseCodes, values: torch.Tensor,
                            fvu: torch.Tensor) -> torch.Tensor:
        """The loss before AuxK; TopK's is the FVU of the reconstruction."""
        return fvu

    def auxk_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        """AuxK (Gao et al. 2024, as sparsify has it): the top k_aux = d_in/2 dead latents reconstruct the residual
        e = x - x_hat; the squared error of that reconstruction over the input's total variance (the main FVU's
        denominator, sum over the batch of (x - mean x)^2; not the residual's own variance), scaled by
        min(#dead / k_aux, 1). Zero when nothing is dead. `pre` is the batch's encoder outputs, before or after the
        relu as in `select` (recomputed when not given)."""
        dead = self.dead_mask
        num_dead = int(dead.sum()) if dead is not None else 0
        if num_dead == 0:
            return x.new_zeros(())
        with torch.no_grad():
            pre = self.encoder_outputs(x) if pre is None else pre
            k_aux = min(self.d_in // 2, num_dead)
            values, indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        codes = SparseCodes.from_rows(values.relu(), indices, self.num_latents)
        residual_hat = decode(codes, self.encode_selected(codes, x), self.W_dec)
        scale = min(num_dead / (self.d_in // 2), 1.0)
        total = self.fvu_denominator if self.fvu_denominator is not None else batch_variance_total(x)
        return scale * fraction_of_variance_unexplained(x - x_hat.detach(), residual_hat, total)

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
        unit_rows_(self.W_dec)
