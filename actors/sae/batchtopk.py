"""BatchTopK SAE (Bussmann et al. 2024): the k x batch largest activations of the whole batch are kept, so tokens
share a budget of k on average; at inference a single learned threshold replaces the batch-level choice."""

from __future__ import annotations

import torch

from .topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """TopK's recipe (decoder init and unit norm, b_dec, FVU loss, optional AuxK) with a batch-level budget."""

    name = "batchtopk"
    # Weight of the newest batch in the threshold's running mean (the paper averages over training batches).
    threshold_momentum = 0.01

    def __init__(self, d_in, num_latents, params):
        super().__init__(d_in, num_latents, params)
        # Inference threshold: running mean of the smallest activation kept in each training batch.
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.long))

    def activations(self, x):
        pre = self.pre_activations(x)
        if not self.training:
            return pre * (pre > self.threshold)
        flat = pre.flatten()
        values, indices = flat.topk(min(self.params.k * x.shape[0], flat.numel()), sorted=False)
        z = torch.zeros_like(flat).scatter_(-1, indices, values).view_as(pre)
        if torch.is_grad_enabled():  # a training step, not an evaluation in train mode
            with torch.no_grad():
                kept = values[values > 0]
                if kept.numel():
                    smallest = kept.min()
                    w = 1.0 if self.threshold_steps == 0 else self.threshold_momentum
                    self.threshold.lerp_(smallest, w)
                    self.threshold_steps += 1
        return z
