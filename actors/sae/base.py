"""What every SAE architecture shares: parameter layout, sweep validation, decoding, metrics.

Parameters are named as EleutherAI sparsify names them (`encoder.weight` [n, d], `encoder.bias` [n],
`W_dec` [n, d], `b_dec` [d]) so that a state dict is already a sparsify-compatible `sae.safetensors`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from torch import nn


@dataclass
class ForwardOutput:
    """One batch through an SAE: reconstruction, the loss to minimise, and what metrics need."""

    x_hat: torch.Tensor
    loss: torch.Tensor
    fvu: torch.Tensor
    l0: torch.Tensor
    fired: torch.Tensor  # bool [n_latents]: latents that fired at least once in the batch


class SparseAutoencoder(nn.Module):
    """Base class; a subclass sets `name`, `Params`, `normalize_inputs`, and implements `activations`, `loss`."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    # SAELens-style architectures train on inputs scaled to mean norm sqrt(d_in); the scale is folded into the
    # saved weights, so a saved SAE always acts on raw activations.
    normalize_inputs: ClassVar[bool] = False
    default_lr: ClassVar[float] = 2e-4
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    # Hyper-parameters whose single value is a list (e.g. Matryoshka group sizes): a sweep of them is a list of lists.
    list_params: ClassVar[frozenset[str]] = frozenset()
    # The hyper-parameter a `target_l0` steers during training (an L1-style coefficient; actors/train/calibration.py);
    # None: the architecture takes no target L0.
    target_l0_controls: ClassVar[str | None] = None
    # How the seeds of a configuration train as one stack (actors/train/stacked.py): "batched" (the class defines
    # `stacked_forward`, every seed in one batched forward), "seed_by_seed" (each seed's own forward in turn; its
    # `forward` takes the precomputed encoder outputs `pre`), or None (seeds train separately).
    stacking: ClassVar[str | None] = None
    # Written to cfg.json as sparsify's `normalize_decoder`: the recipe keeps decoder rows at unit norm.
    normalize_decoder: ClassVar[bool] = False
    # A small valid hyper-parameter setting, for tests that exercise every registered architecture.
    example_params: ClassVar[dict[str, Any]] = {}

    def __init__(self, d_in: int, num_latents: int, params: BaseModel):
        super().__init__()
        self.d_in, self.num_latents, self.params = d_in, num_latents, params
        self.encoder = nn.Linear(d_in, num_latents)
        self.W_dec = nn.Parameter(torch.empty(num_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # bool [n_latents]: latents that have not fired within the dead window, kept up to date by the trainer
        # (AuxK-style losses revive them); None outside training.
        self.dead_mask: torch.Tensor | None = None
        # Data-parallel training (actors/train/deepspeed_backend.py) steps each worker on a slice of the batch: this is then
        # FVU's denominator over the whole batch divided by the number of slices, so the slices' FVUs average to the
        # whole batch's. None: the batch given is the whole batch.
        self.fvu_denominator: torch.Tensor | None = None

    # ---- sweeps and validation (class-level; used by the config before any compute) ----
    @classmethod
    def expand_sweep(cls, spec: dict[str, Any]) -> list[dict[str, Any]]:
        """{'k': [8, 16]} -> [{'k': 8}, {'k': 16}]; scalars are one-element sweeps."""
        keys = sorted(spec)
        values = [spec[k] if cls._is_sweep(k, spec[k]) else [spec[k]] for k in keys]
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
        return [cls.Params.model_validate(c).model_dump() for c in combos]

    @classmethod
    def _is_sweep(cls, key: str, value: Any) -> bool:
        if key in cls.list_params:
            return isinstance(value, list) and bool(value) and all(v is None or isinstance(v, (list, tuple))
                                                                   for v in value)
        return isinstance(value, list)

    @classmethod
    def validate_sweep(cls, spec: dict[str, Any], where: str) -> None:
        for key, value in spec.items():
            if key not in cls.Params.model_fields:
                raise ValueError(
                    f"{where}: unknown hyper-parameter {key!r} for {cls.name}; allowed: {sorted(cls.Params.model_fields)}"
                )
            if isinstance(value, list) and not value and key not in cls.list_params:
                raise ValueError(f"{where}.{key}: empty sweep list")
        try:
            cls.expand_sweep(spec)
        except ValidationError as err:
            e = err.errors()[0]
            raise ValueError(f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}") from None

    @classmethod
    def stacked_forward(cls, saes: list["SparseAutoencoder"], params: dict[str, torch.Tensor], x: torch.Tensor,
                        dead: torch.Tensor):
        """All S seeds' forward on their stacked parameters (`actors/sae/stacked_ops.py`), for `stacking =
        "batched"`: a `StackedOutput` whose summed loss gives each seed exactly its own loss's gradient."""
        raise NotImplementedError(f"{cls.name} declares no batched stacked forward")

    @classmethod
    def check_width(cls, params: dict[str, Any], width: int) -> str | None:
        """A reason this hyper-parameter setting cannot work at this width, or None."""
        return None

    @classmethod
    def check_data_parallel(cls, params: dict[str, Any]) -> str | None:
        """A reason this setting cannot be trained data-parallel, each worker on a slice of every batch with the
        gradients averaged (actors/train/deepspeed_backend.py), or None. That needs a loss whose slice values average to the
        whole batch's (means over tokens; FVU through `fvu_denominator`), activations chosen token by token, and
        gradient surgery given as `gradient_transforms`. An architecture opts in by overriding this."""
        return f"{cls.name} has not been checked for data-parallel training"

    @classmethod
    def label(cls, params: dict[str, Any]) -> str:
        """Folder and run name: the architecture and the hyper-parameters that differ from their defaults."""
        fields = cls.Params.model_fields
        shown = {k: v for k, v in params.items() if fields[k].is_required() or v != fields[k].default}
        # A list value reads 0.25_0.75: no brackets, commas or spaces in folder names.
        text = {k: "_".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in shown.items()}
        return cls.name + "".join(f"-{k}{v}" for k, v in sorted(text.items()))

    # ---- training hooks ----
    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [batch, n_latents]."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, fvu: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """Called once with the first training batch (already scaled)."""

    def gradient_transforms(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Gradient surgery, e.g. removing the decoder-norm direction: {parameter name: map of its gradient}. Each map
        must be linear in the gradient, so that data-parallel training may apply it to every worker's gradient
        before the average (the same as after it, the weights being the same on every worker)."""
        return {}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Applies `gradient_transforms` to the gradients in place."""
        for name, transform in self.gradient_transforms().items():
            param = self.get_parameter(name)
            if param.grad is not None:
                param.grad.copy_(transform(param.grad))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Projection back onto constraints, e.g. unit-norm decoder rows."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        z = self.activations(x)
        x_hat = self.decode(z)
        fvu = fraction_of_variance_unexplained(x, x_hat, self.fvu_denominator)
        nonzero = z > 0
        return ForwardOutput(
            x_hat=x_hat,
            loss=self.loss(x, x_hat, z, fvu),
            fvu=fvu.detach(),
            l0=nonzero.sum(-1).float().mean(),
            fired=nonzero.any(0),
        )

    # ---- export to other libraries' layouts (actors/store/export.py) ----
    # An architecture declares how each library can compute exactly its latents; None means it cannot, and the
    # export refuses rather than writing an SAE that loads but encodes differently.
    def sparsify_cfg(self) -> dict[str, Any] | None:
        """sparsify `SparseCoderConfig` keys (besides d_in, num_latents) under which its SparseCoder computes this
        SAE's latents from encoder.weight, encoder.bias, W_dec, b_dec; or None."""
        return None

    def saelens_cfg(self) -> tuple[dict[str, Any], dict[str, torch.Tensor | None]] | None:
        """SAELens cfg keys (`architecture` and its options) and the tensors beyond W_enc, b_enc, W_dec, b_dec
        (e.g. a JumpReLU `threshold`; a tensor mapped to None is left out) under which its inference SAE computes
        this SAE's latents; or None."""
        return None

    def load_exported_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of the exports: load weights named as this project names them (after renaming SAELens'
        W_enc/b_enc), where an export may have dropped or reshaped training-only state."""
        self.load_state_dict(tensors)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Rewrite the weights so the SAE trained on scale*x acts on raw x with identical latents."""
        self.encoder.weight.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)


def fraction_of_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor,
                                     total: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error over x's squared deviations from its mean; `total` replaces that denominator when given."""
    if total is None:
        total = batch_variance_total(x)
    return (x - x_hat).pow(2).sum() / total.clamp_min(torch.finfo(x.dtype).tiny)


def batch_variance_total(x: torch.Tensor) -> torch.Tensor:
    """FVU's denominator for the batch x: its squared deviations from its mean, summed."""
    return (x - x.mean(0)).pow(2).sum()


def without_parallel_component(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each row's gradient less its component along the (unit-norm) row, so the step only rotates the row."""
    parallel = (grad * weight).sum(-1, keepdim=True)
    return grad.addcmul(parallel, weight, value=-1)  # one [n, d] result, no second temporary


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1, eps=torch.finfo(t.dtype).eps)


@torch.no_grad()
def unit_rows_(t: torch.Tensor) -> None:
    """`t.copy_(unit_rows(t))` with the same bits, without the [n, d] temporary."""
    t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(torch.finfo(t.dtype).eps))
