"""Chance levels of the shared fraction: what two SAEs share where nothing was learned in common."""

from __future__ import annotations

import torch

from ..sae import architecture
from ..store.checkpoint import load_sae_weights
from .matching import match_pair


def chance_overlap(sae_a: dict, sae_b: dict, threshold: float) -> dict:
    """Shared fraction of the two SAEs at initialisation (same seeds, untrained) and of trained A against trained B
    under a random rotation of activation space. `sae_a` and `sae_b` are train-manifest entries."""
    a, b = load_sae_weights(sae_a["path"]), load_sae_weights(sae_b["path"])
    d_in = a.encoder.shape[1]
    arch = architecture(sae_a["architecture"])
    inits = []
    for sae in (sae_a, sae_b):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sae["seed"])
            model = arch(d_in, sae["width"], arch.Params.model_validate(sae["params"]))
        inits.append((model.encoder.weight.detach(), model.W_dec.detach()))
    init = match_pair(*inits[0], *inits[1], threshold).statistics()["shared_fraction"]
    gen = torch.Generator().manual_seed(sae_a["seed"] * 1000 + sae_b["seed"])
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
    rotated = match_pair(a.encoder, a.decoder, b.encoder @ q, b.decoder @ q, threshold).statistics()
    return {"init_shared": init, "rotation_shared": rotated["shared_fraction"]}
