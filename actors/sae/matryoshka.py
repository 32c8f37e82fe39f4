"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

The latents are split into groups; each prefix of groups (the first group, the first two, ..., all) must
reconstruct the input on its own. The loss is the mean over prefixes of their FVU (dictionary_learning averages
the prefix losses with equal weights), so early latents learn general features and later ones refine them.
Activations, threshold, decoder constraint and AuxK are BatchTopK's, and so are its exports: at inference the
nesting is gone and it thresholds every latent exactly as BatchTopK does (SAELens `jumprelu`; sparsify refused).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from .base import fraction_of_variance_unexplained
from .batchtopk import BatchTopKSAE
from .sparse_codes import decode
from .topk import TopKParams

# Default nesting: prefixes of 1/16, 1/8, 1/4, 1/2 and all of the width, each twice the previous.
DEFAULT_FRACTIONS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


class MatryoshkaParams(TopKParams):
    group_fractions: tuple[float, ...] | None = Field(
        None, min_length=1, description="Group sizes as fractions of the width, summing to 1; the last group takes "
        "the rounding remainder. None (and no group_sizes): prefixes of 1/16, 1/8, 1/4, 1/2 and all latents.")
    group_sizes: tuple[int, ...] | None = Field(
        None, min_length=1, description="Group sizes in latents, summing to the width; instead of group_fractions.")

    @model_validator(mode="after")
    def _valid_groups(self):
        if self.group_fractions is not None and self.group_sizes is not None:
            raise ValueError("give group_fractions or group_sizes, not both")
        if self.group_fractions is not None:
            if any(f <= 0 for f in self.group_fractions):
                raise ValueError(f"group_fractions must be positive, got {list(self.group_fractions)}")
            if not math.isclose(sum(self.group_fractions), 1.0, abs_tol=1e-6):
                raise ValueError(f"group_fractions must sum to 1, got {sum(self.group_fractions)}")
        if self.group_sizes is not None and any(s <= 0 for s in self.group_sizes):
            raise ValueError(f"group_sizes must be positive, got {list(self.group_sizes)}")
        return self

    def sizes(self, width: int) -> list[int]:
        """Latents per group at this width."""
        if self.group_sizes is not None:
            return list(self.group_sizes)
        fractions = self.group_fractions or DEFAULT_FRACTIONS
        sizes = [int(f * width) for f in fractions[:-1]]
        return sizes + [width - sum(sizes)]


class MatryoshkaSAE(BatchTopKSAE):
    name = "matryoshka"
    example_params = {"k": 3, "group_sizes": (8, 8, 16)}
    Params = MatryoshkaParams
    list_params = frozenset({"group_fractions", "group_sizes"})

    def __init__(self, d_in, num_latents, params):
        problem = self.check_width(params.model_dump(), num_latents)
        if problem:
            raise ValueError(problem)
        super().__init__(d_in, num_latents, params)
        self.group_sizes = params.sizes(num_latents)

    @classmethod
    def check_width(cls, params, width):
        problem = super().check_width(params, width)
        if problem:
            return problem
        sizes = cls.Params.model_validate(params).sizes(width)
        if sum(sizes) != width:
            return f"group_sizes {sizes} sum to {sum(sizes)}, not the width ({width})"
        if min(sizes) < 1:
            return f"group_fractions give an empty group at width {width}: {sizes}"
        # As SAELens: the smallest prefix must be able to hold k latents per token.
        if sizes[0] < params["k"]:
            return f"the first group ({sizes[0]} latents) must hold at least k={params['k']} latents"
        return None

    def reconstruction_loss(self, x, codes, values, fvu):
        # Reconstruction of each prefix: b_dec plus the cumulative contributions of its groups, each group decoded
        # from its own entries. (AuxK, added by the shared forward, acts on the full reconstruction's residual.)
        bounds = torch.tensor(self.group_sizes, device=codes.latents.device).cumsum(0)
        group = torch.bucketize(codes.latents, bounds, right=True)  # group index of each entry
        parts = [decode(codes.subset(group == g), values[group == g], self.W_dec)
                 for g in range(len(self.group_sizes))]
        prefixes = torch.stack(parts).cumsum(0) + self.b_dec
        return torch.stack([fraction_of_variance_unexplained(x, p) for p in prefixes]).mean()
