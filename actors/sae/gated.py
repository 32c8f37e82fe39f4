"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

Two paths share the encoder weight W (`encoder.weight`, so matching sees the gate's directions):
  gate      pi_gate = W (x - b_dec) + b_gate              (`encoder.bias` is b_gate); active where pi_gate > 0
  magnitude pi_mag  = exp(r_mag) * W (x - b_dec) + b_mag  (per-latent rescaling of the same directions)
  z = [pi_gate > 0] * ReLU(pi_mag).
The gate's step has no gradient; it is trained by the sparsity penalty, an L1 on ReLU(pi_gate) weighted by decoder
row norms (Anthropic's penalty, as SAELens uses it instead of the paper's unit-norm decoder), and by the paper's
auxiliary loss: ReLU(pi_gate) must reconstruct x through a frozen copy of the decoder. The decoder is frozen in the
penalty's norms too: the paper's authors report that freezing it in one place but not the other trains worse (and
on planted data it leaves most gates open). Otherwise as relu_l1 (SAELens): inputs scaled to mean norm sqrt(d_in),
decoder rows initialised at norm 0.1 and left free, encoder = decoder transpose, zero biases, lr 2e-4. As relu_l1,
the L1 coefficient can be steered to a target L0 instead (`target_l0`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import SparseAutoencoder, unit_rows
from .l1_target import L1Params, TargetL0


class GatedParams(L1Params):
    l1_coefficient: float | None = Field(None, gt=0, description="Weight of the decoder-norm-weighted L1 penalty on "
                                         "ReLU(gate pre-activations).")


class GatedSAE(TargetL0, SparseAutoencoder):
    name = "gated"
    example_params = {"l1_coefficient": 3.0}
    Params = GatedParams
    normalize_inputs = True

    def __init__(self, d_in: int, num_latents: int, params: GatedParams):
        super().__init__(d_in, num_latents, params)
        with torch.no_grad():
            self.W_dec.copy_(0.1 * unit_rows(torch.randn(num_latents, d_in)))
            self.encoder.weight.copy_(self.W_dec)
            self.encoder.bias.zero_()
        self.r_mag = nn.Parameter(torch.zeros(num_latents))
        self.b_mag = nn.Parameter(torch.zeros(num_latents))
        self._gate: torch.Tensor | None = None  # last training batch's gate pre-activations, for the losses

    @classmethod
    def check_data_parallel(cls, params):
        # otherwise squared error, L1 and the auxiliary reconstruction, all means over tokens
        return cls.target_l0_data_parallel(params)

    @classmethod
    def recipe_lr(cls, num_latents: int) -> float:
        return 2e-4

    def gate_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x - self.b_dec)

    def activations(self, x):
        gate = self.gate_pre_activations(x)
        self._gate = gate if self.training and torch.is_grad_enabled() else None
        magnitude = self.r_mag.exp() * (gate - self.encoder.bias) + self.b_mag
        return (gate > 0) * F.relu(magnitude)

    def saelens_cfg(self):
        # SAELens' Gated SAE computes [(x - b_dec) W_enc + b_gate > 0] * ReLU((x - b_dec)(W_enc exp(r_mag)) + b_mag):
        # these latents. It has b_gate where others have b_enc (and no b_enc, which its strict load would reject).
        return {"architecture": "gated"}, {"b_enc": None, "b_gate": self.encoder.bias, "r_mag": self.r_mag,
                                           "b_mag": self.b_mag}

    def load_exported_state(self, tensors):
        tensors = dict(tensors)
        if "b_gate" in tensors:
            tensors["encoder.bias"] = tensors.pop("b_gate")
        self.load_state_dict(tensors)

    def loss(self, x, x_hat, z, fvu):
        mse = (x - x_hat).pow(2).sum(-1).mean()
        if self._gate is None:
            return mse
        gate = F.relu(self._gate)
        frozen = self.W_dec.detach()
        l1 = (gate * frozen.norm(dim=-1)).sum(-1).mean()
        via_gate = gate @ frozen + self.b_dec.detach()
        aux = (x - via_gate).pow(2).sum(-1).mean()
        return mse + self.l1_coefficient * l1 + aux

    @torch.no_grad()
    def after_optimizer_step(self):
        self._gate = None  # drop the step's graph (and let the SAE be deep-copied)
