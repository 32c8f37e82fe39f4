"""ReLU SAE with an L1 penalty weighted by decoder row norms (SAELens' standard training).

The L1 coefficient is given directly, or steered during training to a target L0 (`target_l0`; actors/train/calibration.py),
so that ReLU+L1 can be compared with TopK at the same sparsity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SparseAutoencoder, fraction_of_variance_unexplained, unit_rows
from .l1_target import L1Params, TargetL0
from .stacked_ops import decode, relu_pre_activations, stacked_output


class ReluL1Params(L1Params):
    pass


class ReluL1SAE(TargetL0, SparseAutoencoder):
    name = "relu_l1"
    Params = ReluL1Params
    normalize_inputs = True
    stacking = "batched"
    example_params = {"l1_coefficient": 1.0}

    def __init__(self, d_in: int, num_latents: int, params: ReluL1Params):
        super().__init__(d_in, num_latents, params)
        with torch.no_grad():
            # Random decoder rows of norm 0.1, encoder initialised as its transpose, zero biases.
            self.W_dec.copy_(0.1 * unit_rows(torch.randn(num_latents, d_in)))
            self.encoder.weight.copy_(self.W_dec)
            self.encoder.bias.zero_()

    @classmethod
    def check_data_parallel(cls, params):
        return cls.target_l0_data_parallel(params)  # otherwise squared error and L1, both means over tokens

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
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = (z * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return mse + self.l1_coefficient * l1

    @classmethod
    def stacked_forward(cls, saes, params, x, dead):
        z = relu_pre_activations(params, x)
        x_hat = decode(params, z)
        losses, fvus = [], []
        # The loss of `loss`, on the stack's own decoder slices: their norms must carry the gradient to the stack.
        for sae, x_hat_s, z_s, W_dec in zip(saes, x_hat.unbind(0), z.unbind(0), params["W_dec"].unbind(0)):
            mse = (x - x_hat_s).pow(2).sum(-1).mean()
            l1 = (z_s * W_dec.norm(dim=-1)).sum(-1).mean()
            losses.append(mse + sae.l1_coefficient * l1)
            fvus.append(fraction_of_variance_unexplained(x, x_hat_s).detach())
        return stacked_output(losses, fvus, z)
