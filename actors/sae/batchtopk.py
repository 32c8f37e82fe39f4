"""BatchTopK SAE (Bussmann et al. 2024): the k x batch largest activations of the whole batch are kept, so tokens
share a budget of k on average; at inference a single learned threshold replaces the batch-level choice."""

from __future__ import annotations

import torch

from .sparse_codes import SparseCodes
from .topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """TopK's recipe (decoder init and unit norm, b_dec, FVU loss, optional AuxK) with a batch-level budget."""

    name = "batchtopk"
    example_params = {"k": 3}
    # Weight of the newest batch in the threshold's running mean (the paper averages over training batches).
    threshold_momentum = 0.01

    def __init__(self, d_in, num_latents, params):
        super().__init__(d_in, num_latents, params)
        # Inference threshold: running mean of the smallest activation kept in each training batch.
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_data_parallel(cls, params):
        return (f"{cls.name} keeps the k x batch largest activations of the whole batch, which no worker's slice "
                "can choose")

    def select(self, pre):
        if not self.training:  # clamped: relu'd or not, `pre` then gives the same latents and values
            return SparseCodes.from_mask(pre, pre > self.threshold.clamp_min(0))
        flat = pre.flatten()
        values, indices = flat.topk(min(self.params.k * pre.shape[0], flat.numel()), sorted=False)
        if torch.is_grad_enabled():  # a training step, not an evaluation in train mode
            with torch.no_grad():
                kept = values[values > 0]
                if kept.numel():
                    smallest = kept.min()
                    w = 1.0 if self.threshold_steps == 0 else self.threshold_momentum
                    self.threshold.lerp_(smallest, w)
                    self.threshold_steps += 1
        indices, order = indices.sort()  # row-major positions: sorted, the entries are grouped by row
        n = pre.shape[1]
        return SparseCodes.from_entries(values[order].relu(), indices // n, indices % n, pre.shape[0], n)

    def sparsify_cfg(self):
        return None  # sparsify keeps k latents per token; at inference this SAE thresholds instead

    def saelens_cfg(self):
        # As SAELens itself saves a trained BatchTopK SAE for inference: JumpReLU, the one threshold on every latent.
        return {"architecture": "jumprelu"}, {"threshold": self.threshold.expand(self.num_latents).clone()}

    def load_exported_state(self, tensors):
        tensors = dict(tensors)
        threshold = tensors.get("threshold")
        if threshold is not None and threshold.ndim == 1:
            if not torch.equal(threshold, threshold[:1].expand_as(threshold)):
                raise ValueError("per-latent thresholds differ: a JumpReLU SAE, not a BatchTopK one")
            tensors["threshold"] = threshold[0]
        # Exports drop the step count; any nonzero count keeps a learned threshold from being overwritten by the
        # next training batch (see activations).
        tensors.setdefault("threshold_steps", torch.ones((), dtype=torch.long))
        self.load_state_dict(tensors)
