"""How far each computed cosine can be from the exact cosine of two float32 rows, per precision, and the switch
that pins the matmuls to the precision those bounds assume (docs/matching.md, Precision). The certified matcher
(sparse_matching.py) allows for these in every comparison it makes."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

U32, U64 = 2.0**-24, 2.0**-53
# Per format: unit roundoff of round-to-nearest (2^-p for p significand bits, the implicit one included: bfloat16
# has 8, so 2^-8) and the largest absolute error of a component that lands among the subnormals. TF32 is given
# 2^-10, not 2^-11: some tensor-core paths truncate float32 inputs to TF32 rather than round them.
FORMATS = {
    "float32": (U32, 2.0**-150),
    "tf32": (2.0**-10, 2.0**-150),
    "bfloat16": (2.0**-8, 2.0**-134),
    "float16": (2.0**-11, 2.0**-25),
}


def gamma(m: int, u: float) -> float:
    """Higham's gamma_m = m u / (1 - m u): the relative error bound of m successive roundings."""
    return m * u / (1 - m * u)


def cosine_error_bound(d: int, inputs: str = "float32", output: str = "float32") -> float:
    """Largest |computed - exact| for the cosine of two float32 rows of dimension d, computed as the matcher does:
    each row scaled to unit norm in float32, rounded to `inputs`, products summed with float32 accumulation in any
    order (reduced-precision reductions off), the result stored in `output`. Derivation in docs/matching.md."""
    if inputs not in FORMATS or output not in FORMATS:
        raise ValueError(f"precision must be one of {sorted(FORMATS)}")
    u_in, tiny = FORMATS[inputs]
    eta = gamma(d + 2, U32)  # each component of a float32-normalised row, relative to the exact unit row
    e = (1 + eta) * (1 + (u_in if inputs != "float32" else 0.0)) - 1 + math.sqrt(d) * tiny  # ||x' - x|| for unit x
    total = e * (2 + e) + gamma(d, U32) * (1 + e) ** 2  # the rounded rows' dot, then its float32 summation
    if output != "float32":
        u_out, tiny_out = FORMATS[output]
        total += u_out * (1 + total) + tiny_out  # one more rounding of a number of magnitude <= 1 + total
    return total


def rescore_error_bound(d: int) -> float:
    """|float64 cosine - exact| of two float32 rows: products exact in float64, sums and the two norms rounded."""
    return gamma(2 * d + 8, U64)


def _precision_knobs() -> list[tuple[object, str, object]]:
    """(owner, attribute, value that pins full precision) for every switch that may lower the matmuls' precision.
    torch >= 2.9 keeps the float32 precision per backend (`fp32_precision`; the legacy allow_tf32 and
    set_float32_matmul_precision map onto it, and reading the legacy ones fails once backends disagree);
    reduced-precision reductions of fp16/bf16 matmuls are separate flags."""
    cuda = torch.backends.cuda.matmul
    knobs: list[tuple[object, str, object]] = []
    if hasattr(cuda, "fp32_precision"):
        knobs += [(cuda, "fp32_precision", "ieee"), (torch.backends.mkldnn.matmul, "fp32_precision", "ieee")]
    else:
        knobs += [(cuda, "allow_tf32", False)]
    return knobs + [(cuda, "allow_fp16_reduced_precision_reduction", False),
                    (cuda, "allow_bf16_reduced_precision_reduction", False)]


@contextmanager
def pinned_matmul_precision():
    """IEEE float32 matmuls (no TF32, no bf16 passes on CPUs that have them) and full-precision reductions of fp16/
    bf16 matmuls inside the block: the error bounds above assume them. The caller's settings are restored after."""
    knobs = _precision_knobs()
    saved = [getattr(owner, name) for owner, name, _ in knobs]
    try:
        for owner, name, value in knobs:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(knobs, saved):
            setattr(owner, name, value)
