"""ReLU SAE with an L1 penalty weighted by decoder row norms (SAELens' standard training).

The L1 coefficient is given directly, or found for a target L0 (`target_l0`) by actors/calibration.py before
training, so that ReLU+L1 can be compared with TopK at the same sparsity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import SparseAutoencoder, unit_rows


class ReluL1Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l1_coefficient: float | None = Field(None, gt=0, description="Weight of the decoder-norm-weighted L1 penalty.")
    target_l0: float | None = Field(None, gt=0, description="Calibrate the L1 coefficient to reach this L0 instead.")

    @model_validator(mode="after")
    def _a_sparsity_setting(self):
        # Both are present once calibration has filled in the coefficient for a target.
        if self.l1_coefficient is None and self.target_l0 is None:
            raise ValueError("give l1_coefficient or target_l0")
        return self


class ReluL1SAE(SparseAutoencoder):
    name = "relu_l1"
    Params = ReluL1Params
    normalize_inputs = True
    target_l0_controls = "l1_coefficient"

    def __init__(self, d_in: int, num_latents: int, params: ReluL1Params):
        super().__init__(d_in, num_latents, params)
        with torch.no_grad():
            # Random decoder rows of norm 0.1, encoder initialised as its transpose, zero biases.
            self.W_dec.copy_(0.1 * unit_rows(torch.randn(num_latents, d_in)))
            self.encoder.weight.copy_(self.W_dec)
            self.encoder.bias.zero_()

    @classmethod
    def validate_sweep(cls, spec, where):
        if "l1_coefficient" in spec and "target_l0" in spec:
            raise ValueError(f"{where}: give exactly one of l1_coefficient and target_l0")
        super().validate_sweep(spec, where)

    @classmethod
    def check_width(cls, params, width):
        if params.get("target_l0") is not None and params["target_l0"] >= width:
            return f"target_l0={params['target_l0']} must be below the width ({width})"
        return None

    @classmethod
    def recipe_lr(cls, num_latents: int) -> float:
        return 2e-4

    def activations(self, x):
        return F.relu(self.encoder(x - self.b_dec))

    def sparsify_cfg(self):
        # sparsify always keeps the top k of ReLU(pre-activations): with k = every latent it drops nothing, which is
        # this SAE exactly (slower than a plain ReLU there). The decoder is not unit-norm, hence the flag.
        return {"activation": "topk", "k": self.num_latents, "normalize_decoder": False}

    def saelens_cfg(self):
        return {"architecture": "standard"}, {}

    def loss(self, x, x_hat, z, fvu):
        if self.params.l1_coefficient is None:
            raise RuntimeError("relu_l1 with target_l0: calibrate the L1 coefficient before training")
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = (z * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return mse + self.params.l1_coefficient * l1
