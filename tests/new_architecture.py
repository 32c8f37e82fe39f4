"""A new architecture defined outside the package, as a user's own file: it registers itself when imported.
`tests/test_new_architecture.py` trains it (stacked), exports it and matches it through the whole pipeline with
nothing about it anywhere else in the code base. Not a test module, so that collecting the suite does not register
it for every other test."""

from __future__ import annotations

from actors.sae import register
from actors.sae.topk import TopKSAE


@register
class TopKMSESAE(TopKSAE):
    """TopK with the squared error as its loss instead of FVU (as SAELens trains TopK SAEs)."""

    name = "topk_mse_test"
    example_params = {"k": 3}

    def reconstruction_loss(self, x, codes, values, fvu):
        # FVU is the squared error over the batch's total variance: undo the division.
        return fvu * (x - x.mean(0)).pow(2).sum(-1).mean()
