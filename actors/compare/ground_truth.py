"""Scoring SAEs against a known answer (a planted source's true features; docs/known-answer.md).

Definitions, all on decoder rows (the feature directions) and signed cosines (latents are non-negative, so a
latent pointing at -f does not represent f):
- a latent's *best true-feature cosine*: its largest cosine with any true feature; the latent *is a true feature*
  when that exceeds the threshold (0.9 by default);
- a true feature is *recovered* when some latent's cosine with it exceeds the threshold; recovery is the fraction
  of true features recovered;
- *MCC*: the mean cosine over the pairs of a maximum-weight 1:1 assignment of latents to true features (scipy's
  Hungarian solver), i.e. over min(latents, features) pairs;
- *true-feature precision* of a set of latents: the fraction of them that are true features; computed for the
  latents shared with another seed and for those that are not (orphans), and for "shared with exactly k others".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .matching import UNMATCHED, cosine_matrix, max_weight_assignment

DEFAULT_THRESHOLD = 0.9


@dataclass
class GroundTruthScore:
    """One SAE against the true features (arrays indexed by latent)."""

    threshold: float
    best_cos: np.ndarray  # [n] largest cosine with any true feature
    best_feature: np.ndarray  # [n] that feature
    matched_feature: np.ndarray  # [n] partner under the 1:1 assignment, UNMATCHED where none
    matched_cos: np.ndarray  # [n] NaN where unmatched
    recovered: np.ndarray  # [F] bool: some latent's cosine with the feature exceeds the threshold

    @property
    def true_latent(self) -> np.ndarray:
        return self.best_cos > self.threshold

    @property
    def recovered_fraction(self) -> float:
        return float(self.recovered.mean())

    @property
    def mcc(self) -> float:
        ok = self.matched_feature != UNMATCHED
        return float(self.matched_cos[ok].mean()) if ok.any() else float("nan")

    def summary(self) -> dict[str, float]:
        return {"recovered_fraction": self.recovered_fraction, "mcc": self.mcc,
                "true_latent_fraction": float(self.true_latent.mean()),
                "mean_best_true_cos": float(self.best_cos.mean())}

    def latent_table(self) -> pa.Table:
        """Per latent: best true-feature cosine and feature, 1:1 partner and cosine, whether it is a true feature."""
        return pa.table({
            "latent": pa.array(np.arange(len(self.best_cos)), pa.int64()),
            "best_true_cos": pa.array(self.best_cos, pa.float32()),
            "best_true_feature": pa.array(self.best_feature, pa.int64()),
            "matched_feature": pa.array(self.matched_feature, pa.int64()),
            "matched_cos": pa.array(self.matched_cos, pa.float32()),
            "true_feature": pa.array(self.true_latent),
        })


def score_against_truth(decoder: torch.Tensor | np.ndarray, features: torch.Tensor | np.ndarray,
                        threshold: float = DEFAULT_THRESHOLD) -> GroundTruthScore:
    """Score an SAE's decoder rows [n, d] against the true features [F, d] (zero-norm rows: cosine 0)."""
    cos = cosine_matrix(torch.as_tensor(decoder), torch.as_tensor(features))  # [n, F]
    partner = max_weight_assignment(cos)
    matched = np.full(cos.shape[0], np.nan, dtype=np.float32)
    ok = partner != UNMATCHED
    matched[ok] = cos[np.flatnonzero(ok), partner[ok]]
    return GroundTruthScore(threshold=threshold, best_cos=cos.max(axis=1), best_feature=cos.argmax(axis=1),
                            matched_feature=partner, matched_cos=matched, recovered=cos.max(axis=0) > threshold)


def precision(true_latent: np.ndarray, selected: np.ndarray) -> float:
    """Fraction of the selected latents that are true features; NaN when none is selected."""
    return float(true_latent[selected].mean()) if selected.any() else float("nan")


def shared_precision(true_latent: np.ndarray, shared: np.ndarray) -> dict[str, float | int]:
    """True-feature precision of one SAE's shared latents and of its orphans (shared with the other seed or not)."""
    return {"precision_shared": precision(true_latent, shared), "precision_orphan": precision(true_latent, ~shared),
            "n_shared": int(shared.sum()), "n_orphan": int((~shared).sum())}


def precision_by_shared_count(true_latent: np.ndarray, shared_with: np.ndarray, n_seeds: int) -> list[dict]:
    """For k = 0 .. n_seeds - 1: latents shared with exactly k other seeds, and their true-feature precision."""
    return [{"shared_with_k_seeds": k, "latents": int((shared_with == k).sum()),
             "precision": precision(true_latent, shared_with == k)} for k in range(n_seeds)]
