"""Sparse latent codes (a few nonzero latents per token) and the two products a TopK-style SAE computes with them,
whose backward passes touch only the selected entries.

A dense TopK step spends five [batch, width] x [width, d_in]-sized matmuls on codes that are almost all zero (the
decode, its two gradients, the encoder's weight and input gradients). Here only the encoder's forward matmul stays
dense (every pre-activation is needed to choose the top k); the rest is O(entries x d_in):

- `encode_selected`: the chosen entries of relu(W_enc (x - b_dec) + b_enc), differentiable in the encoder and
  b_dec. Their values come from the caller's dense no-grad matmul; the backward gives W_enc only the selected rows'
  gradients.
- `decode`: each row's sum of value x W_dec[latent].

A weight gradient is, per latent, a weighted sum of batch rows: `F.embedding_bag` over the entries sorted by latent
computes exactly that, serially per latent in entry order (deterministic, so a resumed or stacked run repeats
the same bits). The decoder's value gradient, one dot product per entry, is `torch.sparse.sampled_addmm`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SparseCodes:
    """A batch's selected latents as entries (row, latent, value), grouped by row in row order.

    `by_latent` and `latent_starts` index the same entries grouped by latent (a stable order, so equal latents keep
    their row order), which the weight gradients need."""

    values: torch.Tensor  # [nnz], no graph: the selected pre-activations (>= 0; 0 where relu clipped)
    rows: torch.Tensor  # [nnz] long, non-decreasing
    latents: torch.Tensor  # [nnz] long
    row_starts: torch.Tensor  # [batch] long: offset of each row's first entry
    by_latent: torch.Tensor  # [nnz] long: entry order sorted by latent
    latent_starts: torch.Tensor  # [num_latents] long: offset of each latent's first entry in `by_latent` order
    num_latents: int

    @classmethod
    def from_entries(cls, values: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor, batch: int,
                     num_latents: int) -> SparseCodes:
        """Entries already grouped by row (`rows` non-decreasing)."""
        # Sorted as one row of a 2-D tensor: a 1-D integer sort of >= 32768 keys takes a parallel radix sort whose
        # many thread barriers stall when other processes share the cores (250 ms against 5 ms on 2 busy cores).
        by_latent = torch.argsort(latents.unsqueeze(0), dim=1, stable=True).squeeze(0)
        return cls(values.detach(), rows, latents, _starts(rows, batch), by_latent, _starts(latents, num_latents),
                   num_latents)

    @classmethod
    def from_rows(cls, values: torch.Tensor, indices: torch.Tensor, num_latents: int) -> SparseCodes:
        """The same number of entries in every row, e.g. `topk` values and indices [batch, k]."""
        batch, k = indices.shape
        rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
        return cls.from_entries(values.flatten(), rows, indices.flatten(), batch, num_latents)

    @classmethod
    def from_mask(cls, pre: torch.Tensor, mask: torch.Tensor) -> SparseCodes:
        """The entries of `pre` [batch, num_latents] where `mask` is true."""
        rows, latents = mask.nonzero(as_tuple=True)  # row-major order: grouped by row
        return cls.from_entries(pre[rows, latents], rows, latents, pre.shape[0], pre.shape[1])

    @property
    def batch(self) -> int:
        return self.row_starts.shape[0]

    def subset(self, keep: torch.Tensor) -> SparseCodes:
        """The entries where the bool mask `keep` [nnz] is true (still grouped by row)."""
        return SparseCodes.from_entries(self.values[keep], self.rows[keep], self.latents[keep], self.batch,
                                        self.num_latents)

    def to_dense(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, num_latents] with `values` (default: the stored ones) at the entries, zeros elsewhere."""
        values = self.values if values is None else values
        dense = values.new_zeros(self.batch, self.num_latents)
        return dense.index_put((self.rows, self.latents), values)

    def sum_rows_by_latent(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[num_latents, d]: for each latent, the sum over its entries of weight x rows[entry's row]."""
        return F.embedding_bag(self.rows[self.by_latent], rows, self.latent_starts, mode="sum",
                               per_sample_weights=weights[self.by_latent])

    def sum_latents_by_row(self, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[batch, d]: for each row, the sum over its entries of weight x table[entry's latent]."""
        return F.embedding_bag(self.latents, table, self.row_starts, mode="sum", per_sample_weights=weights)

    def entry_dots(self, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[nnz]: for each entry, rows[entry's row] . table[entry's latent]."""
        crow = torch.cat([self.row_starts, self.row_starts.new_tensor([self.latents.shape[0]])])
        with warnings.catch_warnings():  # torch notes once that sparse CSR support is in beta
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(crow, self.latents, rows.new_zeros(self.latents.shape),
                                              (self.batch, self.num_latents), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, rows, table.mT, beta=0.0).values()


def _starts(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Offsets of each key's first entry when the entries are grouped by key (0..size-1)."""
    counts = torch.bincount(keys, minlength=size)
    return counts.cumsum(0) - counts


class _EncodeSelected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, x, W_enc, b_enc, b_dec):
        ctx.codes = codes
        ctx.save_for_backward(x, W_enc, b_dec)
        return codes.values.clone()  # a new tensor: the codes' own values stay outside the graph

    @staticmethod
    def backward(ctx, grad):
        codes = ctx.codes
        x, W_enc, b_dec = ctx.saved_tensors
        need_x, need_W, need_b, need_b_dec = ctx.needs_input_grad[1:]
        grad = grad * (codes.values > 0)  # relu: nothing flows where the pre-activation was clipped to 0
        grad_x = grad_W = grad_b = grad_b_dec = None
        if need_W:
            grad_W = codes.sum_rows_by_latent(grad, x - b_dec)
        if need_b or need_b_dec:
            grad_b = grad.new_zeros(codes.num_latents).index_add_(0, codes.latents, grad)
        if need_b_dec:
            # d/d b_dec = -sum over rows of d/d(x - b_dec) = -sum over entries of grad x W_enc[latent]
            grad_b_dec = -(grad_b @ W_enc)
        if need_x:
            grad_x = codes.sum_latents_by_row(grad, W_enc)
        return None, grad_x, grad_W, grad_b if need_b else None, grad_b_dec


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, values, W_dec):
        ctx.codes = codes
        ctx.save_for_backward(values, W_dec)
        return codes.sum_latents_by_row(values, W_dec)

    @staticmethod
    def backward(ctx, grad):
        codes = ctx.codes
        values, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = codes.entry_dots(grad, W_dec) if ctx.needs_input_grad[1] else None
        grad_W = codes.sum_rows_by_latent(values, grad) if ctx.needs_input_grad[2] else None
        return None, grad_values, grad_W


def encode_selected(codes: SparseCodes, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                    b_dec: torch.Tensor) -> torch.Tensor:
    """[nnz]: the entries' values relu(W_enc[latent] . (x[row] - b_dec) + b_enc[latent]), taken from
    `codes.values` (which must be those), with gradients to x, W_enc, b_enc and b_dec."""
    return _EncodeSelected.apply(codes, x, W_enc, b_enc, b_dec)


def decode(codes: SparseCodes, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """[batch, d]: each row's sum of value x W_dec[latent] over its entries (no bias), differentiable in both."""
    return _Decode.apply(codes, values, W_dec)
