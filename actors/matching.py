"""Cross-seed latent matching, the paper's method (../shared/reference/paper.md, matching-notes.md).

For SAEs A and B: cosine between every encoder row of A and of B, and separately between decoder rows; a
maximum-weight 1:1 assignment on each (scipy's Hungarian solver, exact); a latent of A is *shared* when both its
encoder-matched and decoder-matched cosines exceed the threshold, *equal* when both matchings pick the same
partner. All fractions are over A's latents; a latent of A left unmatched (A wider than B) is neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from scipy.optimize import linear_sum_assignment

UNMATCHED = -1


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """[n_a, n_b] float32 cosines of the rows; a zero-norm row has cosine 0 with everything."""
    def unit(t):
        t = t.float()
        norm = t.norm(dim=-1, keepdim=True)
        return torch.where(norm > 0, t / norm.clamp_min(1e-30), torch.zeros_like(t))

    return (unit(a) @ unit(b).T).numpy()


def max_weight_assignment(similarity: np.ndarray) -> np.ndarray:
    """Partner column of each row under an exact maximum-weight 1:1 assignment; UNMATCHED where none."""
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    partner = np.full(similarity.shape[0], UNMATCHED, dtype=np.int64)
    partner[rows] = cols
    return partner


def _matched_cos(similarity: np.ndarray, partner: np.ndarray) -> np.ndarray:
    rows = np.arange(similarity.shape[0])
    cos = np.full(similarity.shape[0], np.nan, dtype=np.float32)
    ok = partner != UNMATCHED
    cos[ok] = similarity[rows[ok], partner[ok]]
    return cos


@dataclass
class PairMatch:
    """Per-latent result of matching A's latents to B's (arrays indexed by A's latent)."""

    n_a: int
    n_b: int
    threshold: float
    enc_partner: np.ndarray
    enc_cos: np.ndarray  # NaN where unmatched
    dec_partner: np.ndarray
    dec_cos: np.ndarray
    enc_max_cos: np.ndarray  # best cosine to any latent of B (many-to-one baseline)
    dec_max_cos: np.ndarray

    @property
    def shared(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return (self.enc_cos > self.threshold) & (self.dec_cos > self.threshold)

    @property
    def decoder_shared(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.dec_cos > self.threshold

    @property
    def equal(self) -> np.ndarray:
        return (self.enc_partner == self.dec_partner) & (self.enc_partner != UNMATCHED)

    @property
    def maxcos_shared(self) -> np.ndarray:
        return (self.enc_max_cos > self.threshold) & (self.dec_max_cos > self.threshold)

    def shared_of_b(self) -> np.ndarray:
        """B's latents seen from the same assignment: shared when its encoder and decoder partners' cosines pass."""
        enc = np.zeros(self.n_b, dtype=bool)
        dec = np.zeros(self.n_b, dtype=bool)
        ok = self.enc_partner != UNMATCHED
        enc[self.enc_partner[ok]] = self.enc_cos[ok] > self.threshold
        ok = self.dec_partner != UNMATCHED
        dec[self.dec_partner[ok]] = self.dec_cos[ok] > self.threshold
        return enc & dec

    def statistics(self) -> dict[str, float | int]:
        matched = self.enc_partner != UNMATCHED
        return {
            "n_latents_a": self.n_a,
            "n_latents_b": self.n_b,
            "threshold": self.threshold,
            "shared_fraction": float(self.shared.mean()),
            "equal_fraction": float(self.equal.mean()),
            "decoder_shared_fraction": float(self.decoder_shared.mean()),
            "maxcos_shared_fraction": float(self.maxcos_shared.mean()),
            "mean_matched_cos_encoder": float(self.enc_cos[matched].mean()),
            "mean_matched_cos_decoder": float(self.dec_cos[self.dec_partner != UNMATCHED].mean()),
        }

    def assignment_table(self) -> pa.Table:
        """The raw assignment, one row per latent of A, so anyone can recompute every statistic."""
        return pa.table({
            "row": pa.array(np.arange(self.n_a), pa.int64()),
            "col_enc": pa.array(self.enc_partner, pa.int64()),
            "cos_enc": pa.array(self.enc_cos, pa.float32()),
            "col_dec": pa.array(self.dec_partner, pa.int64()),
            "cos_dec": pa.array(self.dec_cos, pa.float32()),
            "max_cos_enc": pa.array(self.enc_max_cos, pa.float32()),
            "max_cos_dec": pa.array(self.dec_max_cos, pa.float32()),
            "shared": pa.array(self.shared),
        })


def match_pair(enc_a: torch.Tensor, dec_a: torch.Tensor, enc_b: torch.Tensor, dec_b: torch.Tensor,
               threshold: float = 0.7) -> PairMatch:
    if enc_a.shape[1] != enc_b.shape[1]:
        raise ValueError(f"SAEs read different spaces: d_in {enc_a.shape[1]} vs {enc_b.shape[1]}")
    s_enc = cosine_matrix(enc_a, enc_b)
    enc_partner = max_weight_assignment(s_enc)
    enc_cos, enc_max = _matched_cos(s_enc, enc_partner), s_enc.max(axis=1)
    del s_enc  # one n_a x n_b matrix at a time
    s_dec = cosine_matrix(dec_a, dec_b)
    dec_partner = max_weight_assignment(s_dec)
    return PairMatch(
        n_a=enc_a.shape[0], n_b=enc_b.shape[0], threshold=threshold,
        enc_partner=enc_partner, enc_cos=enc_cos, dec_partner=dec_partner,
        dec_cos=_matched_cos(s_dec, dec_partner), enc_max_cos=enc_max, dec_max_cos=s_dec.max(axis=1),
    )


def nway_counts(shared: dict[tuple[int, int], np.ndarray], n_seeds: int) -> np.ndarray:
    """counts[base, k] = latents of seed `base` shared with exactly k other seeds.

    `shared[(i, j)]` is the bool mask over seed i's latents of being shared with seed j (both orders present).
    """
    counts = np.zeros((n_seeds, n_seeds), dtype=np.int64)
    for base in range(n_seeds):
        masks = [shared[(base, other)] for other in range(n_seeds) if other != base]
        per_latent = np.sum(masks, axis=0) if masks else np.zeros(0, dtype=np.int64)
        counts[base] = np.bincount(per_latent, minlength=n_seeds)[:n_seeds]
    return counts
