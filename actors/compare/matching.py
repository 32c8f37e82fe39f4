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
    certified: bool = True  # both assignments proven optimal over the full matrices
    rounds: tuple[int, int] = (0, 0)  # certificate rounds (encoder, decoder); 0 for the dense solver

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
            # Song et al. 2025's PW-MCC: mean signed decoder cosine under the max-weight 1:1 decoder assignment,
            # over the matched pairs (docs/matching.md); the decoder matching above is exactly that assignment
            "pw_mcc": float(self.dec_cos[self.dec_partner != UNMATCHED].mean()),
        }

    def extended_statistics(self) -> dict[str, float | int | bool]:
        """`statistics()` plus mean best (many-to-one) cosines and the optimality certificate."""
        return self.statistics() | {
            "mean_max_cos_encoder": float(self.enc_max_cos.mean()),
            "mean_max_cos_decoder": float(self.dec_max_cos.mean()),
            "certified": bool(self.certified),
            "certificate_rounds_encoder": int(self.rounds[0]),
            "certificate_rounds_decoder": int(self.rounds[1]),
        }

    def threshold_sweep(self, thresholds: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Shared, decoder-shared and max-cosine fractions as the threshold runs over [0, 1]."""
        t = np.linspace(0, 1, 41) if thresholds is None else np.asarray(thresholds)
        with np.errstate(invalid="ignore"):
            both = np.minimum(self.enc_cos, self.dec_cos)  # NaN (unmatched on either side) propagates, never passes
            best = np.minimum(self.enc_max_cos, self.dec_max_cos)
            return {
                "threshold": t,
                "shared": (both[None, :] > t[:, None]).mean(1),
                "decoder_shared": (self.dec_cos[None, :] > t[:, None]).mean(1),
                "maxcos_shared": (best[None, :] > t[:, None]).mean(1),
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


@dataclass
class Assignment:
    """One matrix's matching: partner, matched cosine and best cosine per row, and how it was proven."""

    partner: np.ndarray
    cos: np.ndarray
    max_cos: np.ndarray
    certified: bool
    rounds: int


# Below this many matrix entries the dense Hungarian solver is quick (~2 s at 4096^2) and exact by construction.
DENSE_MAX_ENTRIES = 4096 * 4096
METHODS = ("auto", "dense", "sparse")


def assign(a: torch.Tensor, b: torch.Tensor, method: str = "auto", device: str = "cpu") -> Assignment:
    """Exact maximum-weight 1:1 assignment of a's rows to b's rows by cosine, dense or candidate-graph."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {METHODS}")
    if uses_dense(a.shape[0], b.shape[0], method):
        s = cosine_matrix(a, b)
        partner = max_weight_assignment(s)
        return Assignment(partner, _matched_cos(s, partner), s.max(axis=1), certified=True, rounds=0)
    from .sparse_matching import sparse_max_weight_assignment

    r = sparse_max_weight_assignment(a, b, device=device)
    return Assignment(r.partner, r.cos, r.max_cos, certified=r.certified, rounds=r.rounds)


# Bytes per entry of the dense route: the float32 cosine matrix, its negated copy (maximize), scipy's float64 copy
# of that and its own work arrays; and what the libraries a matching imports first add. Fitted to measured peaks
# (docs/planning.md, benchmarks/match_memory.py).
DENSE_ENTRY_BYTES = 20
MATCH_IMPORTS_BYTES = 64 * 2**20


def uses_dense(n_a: int, n_b: int, method: str = "auto") -> bool:
    return method == "dense" or (method == "auto" and n_a * n_b <= DENSE_MAX_ENTRIES)


def pair_memory_bytes(n_a: int, n_b: int, d: int, method: str = "auto", threads: int = 1) -> int:
    """Estimated peak memory of matching two SAEs of n_a and n_b latents in d dimensions (`match_pair` after
    loading them, with `threads` torch threads): both SAEs' float32 encoders and decoders, held throughout, plus
    one matrix's matching at a time (the dense cosine matrix and Hungarian, or the sparse matcher's working set)."""
    from .sparse_matching import sparse_memory_bytes

    inputs = 2 * 4 * d * (n_a + n_b)
    if uses_dense(n_a, n_b, method):
        work = DENSE_ENTRY_BYTES * n_a * n_b + 4 * d * (n_a + n_b)
    else:
        work = sparse_memory_bytes(n_a, n_b, d, threads=threads)
    return int(inputs + work + MATCH_IMPORTS_BYTES)


def match_pair(enc_a: torch.Tensor, dec_a: torch.Tensor, enc_b: torch.Tensor, dec_b: torch.Tensor,
               threshold: float = 0.7, method: str = "auto", device: str = "cpu") -> PairMatch:
    if enc_a.shape[1] != enc_b.shape[1]:
        raise ValueError(f"SAEs read different spaces: d_in {enc_a.shape[1]} vs {enc_b.shape[1]}")
    enc = assign(enc_a, enc_b, method, device)  # one matrix (or its candidates) in memory at a time
    dec = assign(dec_a, dec_b, method, device)
    return PairMatch(
        n_a=enc_a.shape[0], n_b=enc_b.shape[0], threshold=threshold,
        enc_partner=enc.partner, enc_cos=enc.cos, dec_partner=dec.partner, dec_cos=dec.cos,
        enc_max_cos=enc.max_cos, dec_max_cos=dec.max_cos,
        certified=enc.certified and dec.certified, rounds=(enc.rounds, dec.rounds),
    )
