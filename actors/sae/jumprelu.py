"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; SAELens' JumpReLU training).

z = pre * [pre > theta] with a learned per-latent threshold theta = exp(log_threshold). The loss is the squared
error plus lambda * L0. Neither the step nor the jump has a useful gradient, so theta is trained through
straight-through estimators whose pseudo-derivatives use a rectangle kernel of width `bandwidth` around theta;
the encoder gets the ordinary gradient of the active pre-activations. Inputs are scaled to mean norm sqrt(d_in)
(the scale the paper's bandwidth 0.001 and threshold 0.001 refer to); decoder rows are kept at unit norm.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import SparseAutoencoder, unit_rows, unit_rows_, without_parallel_component


def _near(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Rectangle kernel K((pre - theta) / bandwidth) / bandwidth: where the pseudo-derivative is non-zero."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """pre * [pre > theta]; d/dpre = [pre > theta], d/dtheta ~ -theta * K / bandwidth (the jump's size is theta)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        d_theta = -(threshold * _near(pre, threshold, ctx.bandwidth) * grad).flatten(0, -2).sum(0)
        return grad * (pre > threshold), d_theta, None


class _Step(torch.autograd.Function):
    """[pre > theta] (the L0 count); d/dpre = 0, d/dtheta ~ -K / bandwidth."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        return None, -(_near(pre, threshold, ctx.bandwidth) * grad).flatten(0, -2).sum(0), None


def _log_exactly(threshold: torch.Tensor) -> torch.Tensor:
    """A log_threshold whose exp() is exactly `threshold`, so an export loads back thresholding identically.

    float32 exp maps several neighbouring logs to one value and log(exp(l)) can land an ulp off; step towards the
    exact value. The log itself may come back as another of those neighbours: the SAE only ever uses its exp."""
    log = threshold.double().log().to(threshold.dtype)
    for _ in range(8):
        e = log.exp()
        if torch.equal(e, threshold):
            break
        log = torch.where(e < threshold, log.nextafter(torch.tensor(math.inf, dtype=log.dtype)),
                          torch.where(e > threshold, log.nextafter(torch.tensor(-math.inf, dtype=log.dtype)), log))
    return log


class JumpReLUParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    l0_coefficient: float = Field(..., gt=0, description="Weight lambda of the L0 penalty (per token, on inputs "
                                  "scaled to mean norm sqrt(d_in)).")
    bandwidth: float = Field(0.001, gt=0, description="Width of the rectangle kernel of the threshold's "
                             "pseudo-derivatives (the paper: 0.001).")
    init_threshold: float = Field(0.001, gt=0, description="Initial threshold of every latent (the paper: 0.001).")
    l0_warmup_steps: int = Field(0, ge=0, description="Steps over which lambda rises linearly from 0 (the paper: "
                                 "10,000; SAELens' default: 0).")


class JumpReLUSAE(SparseAutoencoder):
    name = "jumprelu"
    example_params = {"l0_coefficient": 1.0, "bandwidth": 0.1, "init_threshold": 0.5}
    Params = JumpReLUParams
    normalize_inputs = True
    adam_betas = (0.0, 0.999)  # the paper's Adam: no first-moment momentum

    def __init__(self, d_in: int, num_latents: int, params: JumpReLUParams):
        super().__init__(d_in, num_latents, params)
        with torch.no_grad():
            # The paper: unit-norm random decoder rows, encoder = its transpose, zero biases.
            self.W_dec.copy_(unit_rows(torch.randn(num_latents, d_in)))
            self.encoder.weight.copy_(self.W_dec)
            self.encoder.bias.zero_()
        self.log_threshold = torch.nn.Parameter(torch.full((num_latents,), math.log(params.init_threshold)))
        self._pre: torch.Tensor | None = None  # last training batch's pre-activations, for the L0 term
        self.steps_done = 0  # for the L0 coefficient's warm-up; not saved (training state, not the SAE)

    @classmethod
    def check_data_parallel(cls, params):
        return None  # squared error and L0, both means over tokens

    @classmethod
    def recipe_lr(cls, num_latents: int) -> float:
        return 7e-5

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def pre_activations(self, x):
        return self.encoder(x)  # W_enc x + b_enc: the paper does not centre x on b_dec

    def activations(self, x):
        pre = self.pre_activations(x)
        self._pre = pre if self.training and torch.is_grad_enabled() else None
        return _JumpReLU.apply(pre, self.threshold, self.params.bandwidth)

    def loss(self, x, x_hat, z, fvu):
        mse = (x - x_hat).pow(2).sum(-1).mean()
        if self._pre is None:
            return mse
        l0 = _Step.apply(self._pre, self.threshold, self.params.bandwidth).sum(-1).mean()
        warm = self.params.l0_warmup_steps
        ramp = min(1.0, (self.steps_done + 1) / warm) if warm else 1.0
        return mse + ramp * self.params.l0_coefficient * l0

    def saelens_cfg(self):
        # SAELens' JumpReLU: ReLU(pre) * [pre > threshold], which is pre * [pre > threshold] as threshold > 0. It
        # must not centre the input on b_dec, as pre_activations does not.
        return {"architecture": "jumprelu", "apply_b_dec_to_input": False}, {"threshold": self.threshold.detach()}

    def load_exported_state(self, tensors):
        tensors = dict(tensors)
        if "threshold" in tensors:
            tensors["log_threshold"] = _log_exactly(tensors.pop("threshold"))
        self.load_state_dict(tensors)

    def gradient_transforms(self):
        return {"W_dec": lambda grad: without_parallel_component(grad, self.W_dec.detach())}

    @torch.no_grad()
    def after_optimizer_step(self):
        unit_rows_(self.W_dec)
        self.steps_done += 1
        self._pre = None  # drop the step's graph (and let the SAE be deep-copied)
