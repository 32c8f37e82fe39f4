"""Language-model loss with an SAE's reconstruction spliced in at its hookpoint: the standard check that an SAE's
latents carry what the model uses, not only what reconstructs well.

    delta CE       = CE(with SAE) - CE(clean)
    CE recovered   = (CE(zero-ablated) - CE(with SAE)) / (CE(zero-ablated) - CE(clean))

1 means the model is as good with the reconstruction as with its own activation; 0, no better than with the
hookpoint's output set to zero (SAELens' definition).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def replaced_output(module: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, `module`'s output (or the first element of a tuple output) is `replace(output)`."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return replace(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def _mean_ce(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> float:
    losses = [model(chunk, labels=chunk).loss.float() for chunk in input_ids.split(batch_size)]
    return float(torch.stack(losses).mean())


def spliced_lm_metrics(model: nn.Module, hookpoint: str, saes: list[nn.Module], input_ids: torch.Tensor,
                       batch_size: int = 8) -> list[dict[str, float]]:
    """Per SAE (each acting on raw activations): clean, spliced and zero-ablated CE, delta CE, CE recovered."""
    module = dict(model.named_modules())[hookpoint]
    clean = _mean_ce(model, input_ids, batch_size)
    with replaced_output(module, torch.zeros_like):
        zero = _mean_ce(model, input_ids, batch_size)
    results = []
    for sae in saes:
        def reconstruct(out, sae=sae):
            flat = out.reshape(-1, out.shape[-1]).to(sae.W_dec.dtype)
            return sae.decode(sae.activations(flat)).reshape(out.shape).to(out.dtype)

        was_training = sae.training
        sae.eval()  # inference-time behaviour (BatchTopK's threshold)
        try:
            with replaced_output(module, reconstruct):
                spliced = _mean_ce(model, input_ids, batch_size)
        finally:
            sae.train(was_training)
        gap = zero - clean
        results.append({"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablated": zero,
                        "ce_delta": spliced - clean,
                        "ce_recovered": (zero - spliced) / gap if abs(gap) > 1e-12 else float("nan")})
    return results
