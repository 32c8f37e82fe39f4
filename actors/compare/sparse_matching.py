"""Exact maximum-weight 1:1 assignment on cosine similarity without the dense n x n matrix (docs/matching.md).

The dense route (actors/compare/matching.py: cosine matrix + scipy's Hungarian) costs n^2 memory and n^3 time: hours and
~270 GB at 131K latents. Here (../shared/reference/matching-notes.md):

1. One blocked pass over the cosine matrix keeps, for every row AND every column, its top-k entries (collected from
   the same blocks: a separate column pass over transposed blocks dominated the cost in the notes). Whatever a
   line did not keep is <= its threshold (its k-th kept value, or a floor set from its first block), which plus
   the pass's error bound is its bound, so after the pass every pair is either a candidate edge or
   <= min(row bound, column bound).
2. A sparse assignment solver on the candidate graph: OR-tools' LinearSumAssignment on integer-scaled weights
   (square), scipy's LAPJVsp (rectangular).
3. An optimality certificate. From the sparse optimum we compute LP duals u (rows), v (columns) by longest paths on
   the residual graph: u_i + v_j >= w_ij on every candidate edge, equality on matched edges, v >= 0 and v = 0 on
   unmatched columns. By LP duality the matching is optimal over the FULL matrix iff u_i + v_j >= cos_ij for ALL
   pairs. Non-candidate pairs are checked through their bounds (an O(n log n) dominance test); only rows (or
   columns) whose bounds cannot prove it are recomputed in float32, blockwise, and every pair the float32 value
   cannot decide is re-scored in float64. Violating pairs join the candidate graph and we re-solve, until a round
   finds no violation.

Every comparison allows for the rounding of the values it compares (cosine_error_bound per precision, the float32
duals, the integer scaling), and matched and nearly tight edges are re-scored in float64, so `certified=True` is a
proof about the EXACT cosines of the float32 rows: cos_ij <= u_i + v_j + tol for every (i, j) and the matched
pairs' weights are within tol of theirs, so no assignment beats ours by more than `gap_bound` = 2 n tol (tol ~
0.5/scale, ~5e-8 at 131K latents).

Rectangular inputs: the smaller side is matched completely (as scipy does); rows of the larger side are left
UNMATCHED. Zero-norm rows have cosine 0 with everything (as actors/compare/matching.cosine_matrix).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

UNMATCHED = -1

# Extra pairs added when a row is recomputed exactly: those within this much of violating, so that the row's
# remaining bound falls well below its dual and later rounds need not recompute it again.
RECHECK_MARGIN = 0.02
RECHECK_MAX_EXTRA = 256  # per recomputed row, at most this many near pairs are added
MAX_ROUNDS = 50
INT64_MAX = float(np.iinfo(np.int64).max)


# ----------------------------------------------------------------------------------------------------------------
# 0. Precision: how far each computed cosine can be from the exact cosine of the float32 rows (docs/matching.md)

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


@dataclass
class SparseAssignment:
    """Per row of `a`: partner column of `b` (UNMATCHED where none), its cosine (NaN when unmatched), the best
    cosine to any row of `b` (max-cosine baseline), and how the optimality proof went."""

    partner: np.ndarray  # int64 [n_a]
    cos: np.ndarray  # float32 [n_a]
    max_cos: np.ndarray  # float32 [n_a]
    certified: bool
    rounds: int
    total_weight: float
    gap_bound: float = 0.0  # when certified: no assignment has total weight above total_weight + gap_bound
    n_edges: int = 0  # candidate edges in the final sparse problem
    timings: dict = field(default_factory=dict)  # seconds per phase, for benchmarks


# ----------------------------------------------------------------------------------------------------------------
# 1. Candidate pass


def unit_rows(x: torch.Tensor, device="cpu") -> torch.Tensor:
    """float32 rows scaled to unit norm; a zero row stays zero (cosine 0 with everything)."""
    x = x.to(device=device, dtype=torch.float32)
    # A zero row divided by the clamped norm stays exactly zero, so no torch.where (and no extra n x d copies).
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


class UnitRows:
    """The rows of x scaled to unit norm in float32, computed for each slice or gather that is read instead of held:
    the unit copies of a pair's matrices would be 768 MiB at 131K latents, and dividing a block's rows by their
    norms costs ~1% of that block's matmul. Same operations as unit_rows (a row's norm, then a division), so the
    same error bound; zero rows stay zero."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.norm = x.norm(dim=1).clamp_min(1e-30)
        self.shape, self.device = x.shape, x.device

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        return self.x[idx] / self.norm[idx, None]


def _sort_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, the stable sorting permutation) of non-negative int64 keys. Where a key and its position fit
    in 63 bits together they are packed and sorted as one number: numpy's vectorised sort ran ~20x faster than its
    argsort on 16M keys on this CPU."""
    n = len(keys)
    pos_bits = max(1, (n - 1).bit_length())
    if n and int(keys.max()).bit_length() + pos_bits <= 63:
        packed = np.sort((keys.astype(np.int64) << pos_bits) | np.arange(n, dtype=np.int64))
        return packed >> pos_bits, packed & ((1 << pos_bits) - 1)
    order = np.argsort(keys, kind="stable")
    return keys[order], order


@dataclass
class Candidates:
    """Sparse edges (sorted by row, then column) and bounds on everything else: for every pair (i, j) that is not an
    edge, its exact cosine is <= min(row_bound[i], col_bound[j]). -inf means the row (column) has no non-edge pair.
    An edge's weight is its float64 cosine where `exact`, else a float32 one (off by <= cosine_error_bound(d))."""

    rows: np.ndarray  # int64
    cols: np.ndarray  # int64
    w: np.ndarray  # float64
    exact: np.ndarray  # bool: w was re-scored in float64
    row_bound: np.ndarray  # float64 [n_rows]
    col_bound: np.ndarray  # float64 [n_cols]

    def keys(self) -> np.ndarray:
        return self.rows * len(self.col_bound) + self.cols  # sorted

    def add(self, rows, cols, w, exact: bool) -> "Candidates":
        """These edges too (those already present keep their weight); insertion, not a re-sort of everything."""
        keys = self.keys()
        new, first = np.unique(rows * len(self.col_bound) + cols, return_index=True)
        at = np.searchsorted(keys, new)
        fresh = keys[np.minimum(at, len(keys) - 1)] != new if len(keys) else np.ones(len(new), dtype=bool)
        keys = np.insert(keys, at[fresh], new[fresh])
        return Candidates(keys // len(self.col_bound), keys % len(self.col_bound),
                          np.insert(self.w, at[fresh], w[first][fresh]),
                          np.insert(self.exact, at[fresh], np.full(int(fresh.sum()), exact)),
                          self.row_bound, self.col_bound)

    def transposed(self) -> "Candidates":
        order = _sort_keys(self.cols * len(self.row_bound) + self.rows)[1]
        return Candidates(self.cols[order], self.rows[order], self.w[order], self.exact[order], self.col_bound,
                          self.row_bound)


class _Tops:
    """Candidates of n lines (the matrix's rows, or its columns): up to `cap` collected entries per line in a dense
    buffer, and a threshold per line. Entries <= a line's threshold are skipped; when a line's buffer would
    overflow it keeps its top k and its threshold rises to the k-th of them.

    Invariant (what the bounds rely on): every entry seen and not held is <= the line's threshold, which never
    decreases. At the end the buffer is cut to the top k, so threshold = max(k-th kept value, floor) bounds the
    line's non-candidates, also where a floor overshot and fewer than k entries beat it.
    Appending is a scatter into the buffer (no sort, no per-block merge): most blocks bring a line a few entries.
    """

    CAP_FACTOR = 3  # buffer slots per line, in units of k

    def __init__(self, n: int, k: int, n_other: int, device):
        self.k, self.n_other = k, n_other
        self.cap = self.CAP_FACTOR * k
        self.val = torch.full((n, self.cap), -math.inf, device=device)
        self.idx = torch.full((n, self.cap), -1, dtype=torch.int32, device=device)
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.thr = torch.full((n,), -math.inf, device=device)

    def set_floor(self, lines: slice, group_max: torch.Tensor, length: int) -> None:
        """A line's first block [m, length], summarised by `group_max` [m, groups] (maxima of runs of entries):
        its final k-th value is about the (k * length / n_other)-th entry of the block; the twice-that-rank-th
        largest group max, a lower bound on that entry, keeps the floor below the final k-th for almost every
        line (and only efficiency, not validity, depends on it)."""
        rank = min(self.k, math.ceil(2 * self.k * length / self.n_other))
        if self.k < self.n_other and rank < group_max.shape[1]:
            floor = torch.topk(group_max, rank, dim=1, sorted=False).values.amin(1).float()
            # just below it: the entries equal to it are held too, so that every line holds at least one
            torch.maximum(self.thr[lines], torch.nextafter(floor, torch.tensor(-math.inf)), out=self.thr[lines])

    def add(self, lines: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Hold these entries (equal lines consecutive, each value above its line's threshold)."""
        if len(lines) == 0:
            return
        touched, counts = torch.unique_consecutive(lines, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        over = self.count[touched] + counts > self.cap
        if bool(over.any()):  # these lines merge buffer and new entries by a padded top-k; the rest are scattered
            entry_over = torch.repeat_interleave(over, counts)
            self._merge(touched[over], counts[over], lines[entry_over], vals[entry_over], idx[entry_over])
            touched, counts = touched[~over], counts[~over]
            keep = ~entry_over
            lines, vals, idx = lines[keep], vals[keep], idx[keep]
            starts = torch.cumsum(counts, 0) - counts
        if len(lines):
            slot = (torch.arange(len(lines), device=lines.device) - torch.repeat_interleave(starts, counts)
                    + torch.repeat_interleave(self.count[touched], counts))
            flat = lines * self.cap + slot
            self.val.view(-1)[flat] = vals.float()
            self.idx.view(-1)[flat] = idx.to(torch.int32)
            self.count[touched] += counts

    def _merge(self, touched, counts, lines, vals, idx) -> None:
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(lines), device=lines.device) - torch.repeat_interleave(starts, counts)
        which = torch.repeat_interleave(torch.arange(len(touched), device=lines.device), counts)
        new_val = torch.full((len(touched), width), -math.inf, device=vals.device)
        new_idx = torch.full((len(touched), width), -1, dtype=torch.int32, device=vals.device)
        new_val[which, slot] = vals
        new_idx[which, slot] = idx.to(torch.int32)
        self._keep_top(touched, torch.cat([self.val[touched], new_val], 1), torch.cat([self.idx[touched], new_idx], 1))

    def _keep_top(self, lines, val, idx) -> None:
        """Lines' buffers := top k of (val, idx); threshold := max(threshold, k-th value)."""
        k = min(self.k, val.shape[1])
        top, pos = torch.topk(val, k, dim=1)
        buf_val = torch.full((len(lines), self.cap), -math.inf, device=val.device)
        buf_idx = torch.full((len(lines), self.cap), -1, dtype=torch.int32, device=val.device)
        buf_val[:, :k], buf_idx[:, :k] = top, idx.gather(1, pos)
        self.val[lines], self.idx[lines] = buf_val, buf_idx
        self.count[lines] = (top > -math.inf).sum(1)
        if k == self.k < self.n_other:  # what was dropped is <= the k-th kept value (-inf if fewer: no change)
            self.thr[lines] = torch.maximum(self.thr[lines], top[:, -1])

    def absorb(self, other: "_Tops", chunk: int = 1 << 14) -> None:
        """Take in another collector of the same lines (a lane that saw other blocks): each line keeps the top k of
        both buffers, and its threshold is the larger of the two. What either dropped is <= its own threshold, so
        the invariant holds for the union of the entries both saw."""
        for s in range(0, len(self.count), chunk):
            lines = torch.arange(s, min(s + chunk, len(self.count)), device=self.count.device)
            torch.maximum(self.thr[lines], other.thr[lines], out=self.thr[s:s + len(lines)])
            self._keep_top(lines, torch.cat([self.val[lines], other.val[lines]], 1),
                           torch.cat([self.idx[lines], other.idx[lines]], 1))

    def finish(self, chunk: int = 1 << 14):
        """(values [n, k], indices [n, k] (-1 where a line holds fewer), bound [n]): top k of each line."""
        for s in range(0, len(self.count), chunk):
            lines = torch.arange(s, min(s + chunk, len(self.count)), device=self.count.device)
            self._keep_top(lines, self.val[lines], self.idx[lines])
        return self.val[:, :self.k], self.idx[:, :self.k], self.thr


def _run_length(tops: "_Tops") -> int:
    """Entries per run down a column: a block brings a line ~2k * L / n_other hits, so reading them costs ~that
    x g cache lines and the maxima L / g per line; g ~ sqrt(n_other / 2k) balances them (11 at 16K latents,
    rounded to 16: runs of 8 measured no faster there; 16 at 65K and beyond)."""
    return RUN_LENGTH or int(min(16, max(8, 2 ** round(math.log2(math.sqrt(tops.n_other / (2 * tops.k)))))))


RUN_LENGTH = 0  # 0: chosen by _run_length


def _group(n: int, preferred: int) -> int:
    return next(g for g in (preferred, 32, 16, 8, 4, 2, 1) if g <= preferred and n % g == 0)


# A side's hits in one block above this fraction of its entries: a plain top-k of the block is cheaper than
# gathering them (ties, tiny blocks, adversarial orders)
MOSTLY_HITS = 0.25


@contextmanager
def _one_thread(device):
    """torch ops on one CPU thread: the block's matmul uses them all, but the extraction's many small ops run
    faster on one (each multi-threaded op ends at a barrier that waits for every thread to be scheduled, which
    on shared cores costs more than the op; measured ~2x in wall time under load, and idle threads spin)."""
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) positions of the True entries. On CPU numpy's is ~6x faster than torch.nonzero."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.reshape(-1).nonzero().squeeze(1)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] along dim 0 (numpy's take on CPU: ~2x torch's index_select, ~4x advanced indexing)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.take(x.numpy(), idx.numpy(), axis=0))
    return x[idx]


def _block_rows(tops: _Tops, s: torch.Tensor, r0: int, c0: int, first: bool) -> None:
    """The rows' candidates from block s [Br, Bc] at (r0, c0). Maxima of runs of 32 consecutive entries (one
    contiguous reduction, ~3% of the block's matmul) find the few runs above a row's threshold without comparing
    every entry (a full comparison pass costs more than the reduction on CPU); only those runs are read."""
    br, bc = s.shape
    g = _group(bc, 32)
    n_runs = bc // g
    group_max = s.view(br, n_runs, g).amax(2)
    lines = slice(r0, r0 + br)
    if first:
        tops.set_floor(lines, group_max, bc)
    thr = tops.thr[lines]
    runs = _flatnonzero(group_max > thr[:, None])  # run q of row r is r * n_runs + q
    if len(runs) * g > MOSTLY_HITS * br * bc:
        _block_top(tops, s, r0, c0)
        return
    vals = _take(s.view(br * n_runs, g), runs)  # [h, g]
    hit = _flatnonzero(vals > thr[runs // n_runs, None])
    at = runs[hit // g] * g + hit % g  # flat position in the block
    tops.add(at // bc + r0, vals.view(-1)[hit], at % bc + c0)


# Expected hits per column per block (2k x rows of the block / rows of the matrix, the floors' regime) from which
# one comparison of the whole block beats gathering the hit runs down the columns (measured crossover on this CPU:
# between 8 (65K rows, block 4096) and 16 (32K))
COMPARE_HITS = 12


def _column_order(col: torch.Tensor) -> torch.Tensor:
    """The stable order that groups hits by column (numpy's sort on CPU)."""
    if col.device.type == "cpu":
        return torch.from_numpy(np.argsort(col.numpy(), kind="stable"))
    return torch.sort(col, stable=True).indices


def _block_cols(tops: _Tops, s: torch.Tensor, r0: int, c0: int, first: bool) -> None:
    """The columns' candidates from the same block: maxima of runs of g entries down each column (reduced across
    rows, vectorised along them; reducing the transposed view directly was 40x slower on CPU), hits listed in
    column order (sorted: cheaper than transposing the map of maxima). A hit run is read with stride Bc, an
    entry per cache line, so g is smaller where more hits are expected (_run_length); where many are expected
    (small matrices) the whole block is compared with the thresholds instead."""
    br, bc = s.shape
    g = _group(br, _run_length(tops))
    lines = slice(c0, c0 + bc)
    by_compare = 2 * tops.k * br >= COMPARE_HITS * tops.n_other
    if first or not by_compare:
        group_max = s.view(br // g, g, bc).amax(1)  # [runs, bc]: run q of column c covers rows q*g .. q*g + g - 1
    if first:
        tops.set_floor(lines, group_max.T.contiguous(), br)
    thr = tops.thr[lines]
    if by_compare:
        at = _flatnonzero(s > thr[None, :])  # r * bc + c
        if len(at) > MOSTLY_HITS * br * bc:
            _block_top(tops, s.T, c0, r0)
            return
        col = at % bc
        order = _column_order(col)
        at = at[order]
        tops.add(col[order] + c0, _take(s.view(-1), at), at // bc + r0)
        return
    runs = _flatnonzero(group_max > thr[None, :])  # q * bc + c
    if len(runs) * g > MOSTLY_HITS * br * bc:
        _block_top(tops, s.T, c0, r0)
        return
    col = runs % bc
    order = _column_order(col)
    runs, col = runs[order], col[order]  # hits grouped by column
    at = ((runs - col) * g + col)[:, None] + torch.arange(0, g * bc, bc, device=s.device)
    vals = _take(s.view(-1), at.view(-1)).view(-1, g)  # [h, g]
    hit = _flatnonzero(vals > thr[col, None])
    at = at.view(-1)[hit]
    tops.add(at % bc + c0, vals.view(-1)[hit], at // bc + r0)


def _block_top(tops: _Tops, side: torch.Tensor, l0: int, o0: int) -> None:
    """Mostly hits: each line of `side` [m, L] (the block or its transposed view) contributes its top k; the
    rest of the block is <= its k-th value, which the line's threshold then covers."""
    m, length = side.shape
    k = min(tops.k, length)
    top, pos = torch.topk(side, k, dim=1)
    lines = slice(l0, l0 + m)
    keep = top > tops.thr[lines, None]
    if k < length:
        torch.maximum(tops.thr[lines], top[:, -1], out=tops.thr[lines])
    li, j = keep.nonzero(as_tuple=True)
    tops.add(li + l0, top[li, j], pos[li, j] + o0)


def _float32_out(device) -> bool:
    """Whether this device multiplies bf16 matrices straight into a float32 result (torch.mm's out_dtype: CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if device not in _FLOAT32_OUT:
        try:
            x = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
            _FLOAT32_OUT[device] = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _FLOAT32_OUT[device] = False
    return _FLOAT32_OUT[device]


_FLOAT32_OUT: dict = {}


def _block_matmul(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """float32 [len(x), len(y)] = x @ y.T; low-precision inputs accumulate in float32 and, where the device can,
    are written out in float32; otherwise they come back in their own format (pass_precision says which)."""
    if x.dtype == torch.float32:
        if out is not None and out.shape == (len(x), len(y)):
            return torch.mm(x, y.T, out=out)  # a reused buffer: no fresh page-faulted allocation per block
        return x @ y.T
    if _float32_out(x.device):
        return torch.mm(x, y.T, out_dtype=torch.float32)
    return (x @ y.T).float()


def pass_precision(device, low_precision: bool) -> tuple[str, str]:
    """(input format, output format) of the candidate pass's cosines on this device."""
    if not low_precision:
        return "float32", "float32"
    return "bfloat16", ("float32" if _float32_out(device) else "bfloat16")


MAX_LANES = 4


def lane_count(device, n_rows: int, block: int) -> int:
    """Lanes of the candidate pass: Python threads that each own whole row blocks (matmul and extraction). On a CPU
    the extraction is single-threaded, so with one stream of blocks a core idles while it runs; lanes keep every
    core busy (both the matmul and the extraction release the GIL). Each lane holds its own column candidates
    (n_cols x 3k values and indices) and a [block / lanes, block] cosine buffer. One lane on a GPU."""
    if torch.device(device).type != "cpu":
        return 1
    lanes = max(1, min(torch.get_num_threads(), MAX_LANES))
    return max(1, min(lanes, math.ceil(n_rows / max(1, block // lanes))))


@contextmanager
def _threads_per_lane(device, lanes: int):
    """torch's intra-op threads shared out among the lanes for the pass (one each on a 2-core machine), restored
    after. With a single lane, the extraction's small ops still run on one thread (_one_thread)."""
    if torch.device(device).type != "cpu" or lanes == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(max(1, n // lanes))
    try:
        yield
    finally:
        torch.set_num_threads(n)


def candidate_pass(ua: "UnitRows | torch.Tensor", ub: "UnitRows | torch.Tensor", k: int, block: int, low_precision: bool):
    """One blocked pass over ua @ ub.T: top-k per row and per column, both from the same blocks.

    Returns (rows, cols, values, row_bound, col_bound) as torch tensors, and seconds spent per step (summed over
    lanes). Values are accurate to cosine_error_bound of the pass's precision; the bounds include it, so they
    bound the EXACT cosine of every pair left out. The result does not depend on how the lanes interleave. Run it
    under pinned_matmul_precision.
    """
    n_a, n_b = ua.shape[0], ub.shape[0]
    k_r, k_c = min(k, n_b), min(k, n_a)
    dev = ua.device
    lanes = lane_count(dev, n_a, block)
    row_block = block if lanes == 1 else max(1, block // lanes)
    rows = _Tops(n_a, k_r, n_b, dev)
    lane_cols = [_Tops(n_b, k_c, n_a, dev) for _ in range(lanes)]  # row tops: a lane's row blocks are its own
    cast = (lambda x: x.bfloat16()) if low_precision else (lambda x: x)
    seconds = {"candidates_matmul": 0.0, "candidates_extract": 0.0}  # (CUDA is asynchronous: CPU figures only)

    def run_lane(lane: int) -> dict:
        spent = dict.fromkeys(seconds, 0.0)
        buf = torch.empty(min(row_block, n_a), min(block, n_b), device=dev)
        for i, r0 in enumerate(range(lane * row_block, n_a, lanes * row_block)):
            xa = cast(ua[r0:r0 + row_block])
            for c0 in range(0, n_b, block):
                t = time.perf_counter()
                s = _block_matmul(xa, cast(ub[c0:c0 + block]), buf)
                t1 = time.perf_counter()
                with _one_thread(dev) if lanes == 1 else nullcontext():
                    _block_rows(rows, s, r0, c0, first=c0 == 0)
                    _block_cols(lane_cols[lane], s, r0, c0, first=i == 0)
                spent["candidates_matmul"] += t1 - t
                spent["candidates_extract"] += time.perf_counter() - t1
        return spent

    with _threads_per_lane(dev, lanes):
        if lanes == 1:
            spent = [run_lane(0)]
        else:
            with ThreadPoolExecutor(lanes, thread_name_prefix="candidate-lane") as pool:
                spent = list(pool.map(run_lane, range(lanes)))
        for s in spent:
            for key, v in s.items():
                seconds[key] += v
        cols = lane_cols[0]
        for other in lane_cols[1:]:
            cols.absorb(other)
        lane_cols.clear()  # the other lanes' buffers are free before the edges are built
    err = cosine_error_bound(ua.shape[1], *pass_precision(dev, low_precision))
    # bounds in float64: adding err in float32 could round them down; a line held whole has bound -inf
    row_val, row_idx, row_bound = rows.finish()
    col_val, col_idx, col_bound = cols.finish()
    row_bound, col_bound = row_bound.double() + err, col_bound.double() + err
    edge_rows = torch.cat([torch.arange(n_a, device=dev).repeat_interleave(k_r), col_idx.flatten().long()])
    edge_cols = torch.cat([row_idx.flatten().long(), torch.arange(n_b, device=dev).repeat_interleave(k_c)])
    vals = torch.cat([row_val.flatten(), col_val.flatten()])
    kept = torch.cat([row_idx.flatten(), col_idx.flatten()]) >= 0  # lines left short by their floor are padded
    return edge_rows[kept], edge_cols[kept], vals[kept], row_bound, col_bound, seconds


def pair_cos(ua: torch.Tensor, ub: torch.Tensor, rows: np.ndarray, cols: np.ndarray, chunk=1 << 15) -> np.ndarray:
    """float32 cosines of the given pairs (unit rows), gathered in chunks to bound memory."""
    out = np.empty(len(rows), dtype=np.float64)
    for s in range(0, len(rows), chunk):
        r = torch.from_numpy(rows[s:s + chunk]).to(ua.device)
        c = torch.from_numpy(cols[s:s + chunk]).to(ua.device)
        out[s:s + chunk] = (ua[r] * ub[c]).sum(1).cpu().double().numpy()
    return out


class ExactCosine:
    """float64 cosines of chosen pairs of float32 rows (x, y [n, d]), accurate to rescore_error_bound(d): the
    fallback wherever a low-precision value cannot decide."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.inv_x, self.inv_y = (1.0 / t.double().norm(dim=1).clamp_min(1e-300) for t in (x, y))
        self.eps = rescore_error_bound(x.shape[1])

    def __call__(self, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 13) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        cpu = self.x.device.type == "cpu"
        if cpu:  # numpy: single-threaded gathers and one fused einsum beat a chain of small torch ops
            x, y, inv_x, inv_y = self.x.numpy(), self.y.numpy(), self.inv_x.numpy(), self.inv_y.numpy()
        for s in range(0, len(rows), chunk):
            r, c = rows[s:s + chunk], cols[s:s + chunk]
            if cpu:
                dot = np.einsum("ij,ij->i", x[r].astype(np.float64), y[c].astype(np.float64))
                out[s:s + chunk] = dot * inv_x[r] * inv_y[c]  # zero rows: 0 * 1e300 = 0
            else:
                r, c = (torch.from_numpy(i).to(self.x.device) for i in (r, c))
                dot = (self.x[r].double() * self.y[c].double()).sum(1)
                out[s:s + chunk] = (dot * self.inv_x[r] * self.inv_y[c]).cpu().numpy()
        return out

    def transposed(self) -> "ExactCosine":
        t = ExactCosine.__new__(ExactCosine)
        t.x, t.y, t.inv_x, t.inv_y, t.eps = self.y, self.x, self.inv_y, self.inv_x, self.eps
        return t


def _build_candidates(ua, ub, k, block, low_precision, timings=None) -> Candidates:
    rows, cols, vals, row_bound, col_bound, seconds = candidate_pass(ua, ub, k, block, low_precision)
    if timings is not None:
        timings.update(seconds)
    keys, order = _sort_keys((rows * ub.shape[0] + cols).cpu().numpy())
    first = np.ones(len(keys), dtype=bool)  # an entry kept by its row and by its column appears twice
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    keys, first = keys[first], order[first]
    rows, cols = keys // ub.shape[0], keys % ub.shape[0]
    # low-precision values are re-scored in float32, so that every edge is good to cosine_error_bound(d)
    w = pair_cos(ua, ub, rows, cols) if low_precision else vals.cpu().double().numpy()[first]
    return Candidates(rows, cols, w, np.zeros(len(w), dtype=bool), row_bound.cpu().double().numpy(),
                      col_bound.cpu().double().numpy())


# ----------------------------------------------------------------------------------------------------------------
# 2. Sparse solve (n_rows <= n_cols)


def cost_scale(n_nodes: int) -> float:
    """Integer scale for cosines. OR-tools' cost-scaling prices reach ~n^2 * max cost, which must fit int64
    (1e9 overflows at n = 131,072, per the notes); 8x headroom, and never finer than 1e9."""
    return float(10 ** min(9, math.floor(math.log10(INT64_MAX / (6 * 8 * max(n_nodes, 2) ** 2)))))


def solve_sparse(n_rows: int, n_cols: int, rows: np.ndarray, cols: np.ndarray, W: np.ndarray) -> np.ndarray | None:
    """Maximum-weight assignment of every row on the edge list (integer weights W), or None if the edges admit no
    row-perfect matching (n_rows <= n_cols).

    Square problems go to OR-tools' cost-scaling LinearSumAssignment (15-100x faster than scipy's LAPJVsp on these
    graphs, docs/matching.md); it reports an infeasible graph or a possible cost overflow as a status (checked, not
    aborted on), and an overflow falls back to scipy. Rectangular ones (different widths) go to scipy, which
    solves them directly."""
    if n_rows == n_cols and len(W):
        from ortools.graph.python import linear_sum_assignment as ortools_lsa

        solver = ortools_lsa.SimpleLinearSumAssignment()
        # (no copies of int64 inputs: the graph is ~12M arcs at 131K latents)
        solver.add_arcs_with_cost(np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64),
                                  np.negative(W, dtype=np.int64))
        status = solver.solve()
        if status == solver.INFEASIBLE:
            return None
        if status == solver.OPTIMAL:
            return np.array([solver.right_mate(i) for i in range(n_rows)], dtype=np.int64)
    return _solve_scipy(n_rows, n_cols, rows, cols, W)


def _solve_scipy(n_rows, n_cols, rows, cols, W) -> np.ndarray | None:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    cost = (W.max() + 1 - W).astype(np.float64) if len(W) else W.astype(np.float64)  # > 0: no edge reads as absent
    graph = csr_matrix((cost, (rows, cols)), shape=(n_rows, n_cols))
    try:
        row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    except ValueError:  # no full matching on these edges
        return None
    mate = np.full(n_rows, UNMATCHED, dtype=np.int64)
    mate[row_ind] = col_ind
    return mate


def _make_feasible(ua, ub, cand: Candidates) -> Candidates:
    """Add edges until the candidate graph has a row-perfect matching: a maximum matching on the candidates,
    then leftover rows paired with leftover columns, with their true cosines (the certificate judges them)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    n_rows, n_cols = len(cand.row_bound), len(cand.col_bound)
    graph = csr_matrix((np.ones(len(cand.rows)), (cand.rows, cand.cols)), shape=(n_rows, n_cols))
    mate = maximum_bipartite_matching(graph, perm_type="column")
    free_rows = np.flatnonzero(mate < 0)
    used = np.zeros(n_cols, dtype=bool)
    used[mate[mate >= 0]] = True
    free_cols = np.flatnonzero(~used)[: len(free_rows)]
    return cand.add(free_rows, free_cols, pair_cos(ua, ub, free_rows, free_cols), exact=False)


# ----------------------------------------------------------------------------------------------------------------
# 3. Dual certificate


def matching_duals(n_rows: int, n_cols: int, rows: np.ndarray, cols: np.ndarray, W: np.ndarray,
                   partner: np.ndarray, start: np.ndarray | None = None,
                   max_passes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer LP duals (U, V) that prove `partner` a maximum-weight row-perfect matching on the edge list
    (rows, cols, W sorted by row, then column).

    With U_i = W_i,partner(i) - V_partner(i), dual feasibility on edge (i, j) reads
    V_j >= V_partner(i) + W_ij - W_i,partner(i): longest paths on the residual graph (an arc partner(i) -> j per
    edge), by Bellman-Ford that only re-relaxes the edges of rows whose column moved. They exist (no positive
    cycle) exactly when the matching is optimal on these edges. From V = 0 the result is the least solution:
    V >= 0 and V = 0 on unmatched columns (a free column with V > 0 would end an improving path). `start` (square
    problems only) warm-starts from an earlier solution: any fixpoint is a valid dual. Raises if not optimal, or
    (RuntimeError too) if `max_passes` relaxation passes do not settle it.
    """
    keys = rows * n_cols + cols
    want = np.arange(n_rows) * n_cols + partner
    at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    if np.any(keys[at] != want):
        raise ValueError("a matched pair is not an edge")
    w_matched = W[at]
    indptr = np.searchsorted(rows, np.arange(n_rows + 1))
    row_of_col = np.full(n_cols, -1, dtype=np.int64)
    row_of_col[partner] = np.arange(n_rows)
    length = W - w_matched[rows]  # gain of moving row i from its partner to column j
    V = np.zeros(n_cols, dtype=np.int64) if start is None else start.astype(np.int64)
    active = np.arange(n_rows)  # rows whose partner's V moved: their edges are relaxed next
    for _ in range(n_rows + 2 if max_passes is None else min(max_passes, n_rows + 2)):
        starts, counts = indptr[active], indptr[active + 1] - indptr[active]
        edges = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        reach = np.repeat(V[partner[active]], counts) + length[edges]
        best = torch.from_numpy(V.copy()).scatter_reduce_(
            0, torch.from_numpy(cols[edges]), torch.from_numpy(reach), "amax").numpy()
        moved = np.flatnonzero(best > V)
        if len(moved) == 0:
            break
        V[moved] = best[moved]
        active = row_of_col[moved]
        if np.any(active < 0):
            raise RuntimeError("matching not optimal: an improving path ends at an unmatched column")
    else:
        raise RuntimeError("matching not optimal: the residual graph has an improving cycle")
    return w_matched - V[partner], V


def flag_for_recheck(u, v, row_bound, col_bound, tol) -> np.ndarray:
    """Rows i for which some pair (i, j) is not proven by the bounds: u_i + v_j + tol < row_bound[i] and
    u_i + v_j + tol < col_bound[j]. Sorting columns by v and a prefix minimum of v_j - col_bound[j] answer the
    two-sided test for every row at once in O(n log n) instead of n^2."""
    if len(v) == 0:
        return np.zeros(len(u), dtype=bool)
    order = np.argsort(v)
    v_sorted = v[order]
    prefix_min = np.minimum.accumulate((v - col_bound)[order])
    n_low = np.searchsorted(v_sorted, row_bound - u - tol, side="left")  # columns with v_j < row_bound[i] - u_i - tol
    return (n_low > 0) & (prefix_min[np.maximum(n_low - 1, 0)] < -u - tol)


def dual_violations(ua: torch.Tensor, ub: torch.Tensor, u: np.ndarray, v: np.ndarray, tol: float,
                    rows: np.ndarray | None = None, block: int = 8192, margin: float = 0.0,
                    skip: Candidates | None = None, eps: float = 0.0):
    """Pairs (i, j) whose float32 cosine exceeds u_i + v_j + tol - margin - eps, blockwise over every column, for
    the given (sorted) rows of ua -- all rows by default; the threshold is lowered further by its own float32
    rounding (the duals are float64). With eps = cosine_error_bound(d), every pair whose EXACT cosine exceeds
    u_i + v_j + tol - margin is among those returned (with its float32 cosine; the caller re-scores them).
    Also returns, per checked row, the largest float32 cosine among the pairs that are neither returned nor edges
    of `skip` (plus eps, a bound on the row's remaining exact cosines)."""
    dev = ua.device
    rows = np.arange(ua.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    n_cols = ub.shape[0]
    finite_u = np.abs(u[np.isfinite(u)])
    magnitude = (finite_u.max() if len(finite_u) else 0.0) + (np.abs(v).max() if len(v) else 0.0) + abs(tol) + margin
    lower = margin + eps + 6 * U32 * (magnitude + eps + 1)  # 5 float32 roundings of the threshold, with room
    vt = torch.from_numpy(np.asarray(v, dtype=np.float32)).to(dev)
    u32 = np.asarray(u, dtype=np.float32)
    out_r, out_c, out_w = [], [], []
    bound = np.full(len(rows), -math.inf)
    step = min(block, 2048)  # rows per chunk: a few [step, block] float32 temporaries
    for s in range(0, len(rows), step):
        rr = rows[s:s + step]
        x = ua[torch.from_numpy(rr).to(dev)]
        thr_row = torch.from_numpy(u32[rr] + np.float32(tol - lower)).to(dev)
        if skip is not None:  # edges are handled elsewhere; they need no bound
            lo, hi = np.searchsorted(skip.rows, [rr[0], rr[-1] + 1])
            er, ec = skip.rows[lo:hi], skip.cols[lo:hi]
            pos = np.searchsorted(rr, er)
            ok = rr[np.minimum(pos, len(rr) - 1)] == er
            er, ec = pos[ok], ec[ok]
        row_max = torch.full((len(rr),), -math.inf, device=dev)
        for c0 in range(0, n_cols, block):
            c1 = min(c0 + block, n_cols)
            sim = x @ ub[c0:c1].T
            with _one_thread(dev):  # (see _one_thread: small ops after a big matmul)
                width = c1 - c0
                flat = _flatnonzero(sim > thr_row[:, None] + vt[None, c0:c1]).to(dev)
                li, lj = flat // width, flat % width
                out_r.append(rr[li.cpu().numpy()])
                out_c.append(lj.cpu().numpy() + c0)
                out_w.append(sim.view(-1)[flat].cpu().double().numpy())
                sim.view(-1)[flat] = -math.inf
                if skip is not None:
                    inside = (ec >= c0) & (ec < c1)
                    sim[torch.from_numpy(er[inside]).to(dev), torch.from_numpy(ec[inside] - c0).to(dev)] = -math.inf
                row_max = torch.maximum(row_max, sim.amax(1))
        bound[s:s + step] = row_max.cpu().double().numpy() + eps
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    return cat(out_r, np.int64), cat(out_c, np.int64), cat(out_w, np.float64), bound


def _recheck(ux, uy, exact: "ExactCosine", idx, pot_x, pot_y, cand: Candidates, tol, eps32, block):
    """Recompute the flagged rows idx of ux: every pair that the float32 values cannot prove is re-scored in
    float64; violations and near pairs (the closest RECHECK_MAX_EXTRA per row) become exact edges; the row's bound
    drops to the largest cosine left outside the edges."""
    r, c, _, bound = dual_violations(ux, uy, pot_x, pot_y, tol, rows=idx, block=block, margin=RECHECK_MARGIN,
                                     skip=cand, eps=eps32)
    w = exact(r, c)
    slack = pot_x[r] + pot_y[c] + tol - (w + exact.eps)  # < 0: the exact cosine may exceed u + v + tol
    n_violations = int(np.sum(slack < 0))
    order = np.lexsort((slack, r))  # per row, least slack first
    r, c, w, slack = r[order], c[order], w[order], slack[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r)
    keep = (rank < RECHECK_MAX_EXTRA) | (slack < 0)  # every violation is kept
    row_bound = cand.row_bound.copy()
    row_bound[idx] = bound
    dropped = ~keep
    if dropped.any():  # near pairs over the cap stay outside: the bound must cover them
        np.maximum.at(row_bound, r[dropped], w[dropped] + exact.eps)
    new = cand.add(r[keep], c[keep], w[keep], exact=True)
    new.row_bound = row_bound
    return new, n_violations


# ----------------------------------------------------------------------------------------------------------------
# Driver

F64_SLACK = 1e-12  # float64 rounding of the certificate's own sums and comparisons (|u|, |v| <~ 4)


def _certify(ux, uy, exact: ExactCosine, cand: Candidates, eps32: float, block: int, timings: dict):
    """Solve, prove, add violators, repeat. ux has no more rows than uy. Returns partner, cand, certified, rounds,
    tol: when certified, exact cos_ij <= u_i + v_j + tol for every pair and the matched pairs' weights are float64."""
    n_rows, n_cols = ux.shape[0], uy.shape[0]
    scale = cost_scale(n_rows if n_rows == n_cols else n_rows + n_cols)
    # integer rounding of the weights (0.5/scale per edge) and the float64 re-scoring's error
    tol = exact.eps + 0.5 / scale + F64_SLACK
    near = math.ceil(eps32 * scale) + 1  # an inexact edge with reduced cost (integer units) below this may matter
    V = None
    for rounds in range(1, MAX_ROUNDS + 1):
        t = time.perf_counter()
        W = np.rint(cand.w * scale).astype(np.int64)
        partner = solve_sparse(n_rows, n_cols, cand.rows, cand.cols, W)
        if partner is None:
            cand = _make_feasible(ux, uy, cand)
            W = np.rint(cand.w * scale).astype(np.int64)
            partner = solve_sparse(n_rows, n_cols, cand.rows, cand.cols, W)
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        # square: warm start from the last round's V (any fixpoint is a dual); rectangular needs the least one
        U, V = matching_duals(n_rows, n_cols, cand.rows, cand.cols, W, partner,
                              start=V if V is not None and n_rows == n_cols else None)
        timings["duals"] = timings.get("duals", 0.0) + time.perf_counter() - t
        # float32-valued edges that are matched, or nearly tight, are re-scored in float64 and the problem re-solved:
        # every other edge is dual feasible whatever its exact value
        t = time.perf_counter()
        unsure = np.flatnonzero(~cand.exact & (U[cand.rows] + V[cand.cols] - W < near))
        if len(unsure):
            cand.w[unsure] = exact(cand.rows[unsure], cand.cols[unsure])
            cand.exact[unsure] = True
            timings["rescored"] = timings.get("rescored", 0) + len(unsure)
        timings["rescore"] = timings.get("rescore", 0.0) + time.perf_counter() - t
        if len(unsure) and not np.array_equal(np.rint(cand.w[unsure] * scale).astype(np.int64), W[unsure]):
            # some weight moved: the matching is often still optimal (the duals, warm-started, then exist), else
            # it is re-solved on the new weights
            W = np.rint(cand.w * scale).astype(np.int64)
            t = time.perf_counter()
            try:
                U, V = matching_duals(n_rows, n_cols, cand.rows, cand.cols, W, partner,
                                      start=V if n_rows == n_cols else None, max_passes=64)
            except RuntimeError:
                continue
            finally:
                timings["duals"] = timings.get("duals", 0.0) + time.perf_counter() - t
            if np.any(~cand.exact & (U[cand.rows] + V[cand.cols] - W < near)):
                continue  # new duals leave other float32 edges nearly tight: re-score those next round
        u, v = U / scale, V / scale
        err = np.where(cand.exact, exact.eps, eps32)
        if not np.all(u[cand.rows] + v[cand.cols] + tol >= cand.w + err):  # by construction; checked anyway
            raise RuntimeError("dual infeasible on a candidate edge")
        t = time.perf_counter()
        flag_r = np.flatnonzero(flag_for_recheck(u, v, cand.row_bound, cand.col_bound, tol))
        flag_c = np.flatnonzero(flag_for_recheck(v, u, cand.col_bound, cand.row_bound, tol))
        # both sets cover the same unproven pairs (by their row, by their column): recompute the smaller
        if len(flag_r) == 0 or len(flag_c) == 0:
            n_violations = 0
        elif len(flag_r) <= len(flag_c):
            cand, n_violations = _recheck(ux, uy, exact, flag_r, u, v, cand, tol, eps32, block)
        else:
            cand_t, n_violations = _recheck(uy, ux, exact.transposed(), flag_c, v, u, cand.transposed(), tol, eps32,
                                            block)
            cand = cand_t.transposed()
        timings["recheck"] = timings.get("recheck", 0.0) + time.perf_counter() - t
        timings.setdefault("rechecked", []).append(int(min(len(flag_r), len(flag_c))))
        if n_violations == 0:
            return partner, cand, True, rounds, tol
    return partner, cand, False, MAX_ROUNDS, tol


# ----------------------------------------------------------------------------------------------------------------
# Memory model: what one matrix's matching holds at its peak (the compare stage's Ray `memory=` request and
# `sae-seeds plan`; the coefficients are fitted to measured peaks, docs/planning.md, benchmarks/match_memory.py)

EDGE_BYTES = 200  # per candidate edge at the peak: heaps, their pending merges, the edge list and its sort, the solver
BLOCK_OVERHEAD = 1.25  # the cosine block's float32 buffer plus its group maxima and hit masks


def candidate_edges(n_a: int, n_b: int, k: int = 64) -> int:
    """Edges of the first candidate graph: each row's and each column's top-k (an edge kept by both counts twice,
    an upper bound)."""
    return min(k, n_b) * n_a + min(k, n_a) * n_b


def lane_column_bytes(n_a: int, n_b: int, k: int = 64) -> int:
    """What one more candidate lane holds: its own column candidates (3k float32 values and int32 indices, a count
    and a threshold per column). Its cosine buffer is not extra: lanes split the block's rows among them."""
    return n_b * (_Tops.CAP_FACTOR * min(k, n_a) * 8 + 12)


def sparse_memory_bytes(n_a: int, n_b: int, d: int, k: int = 64, block: int = 8192, threads: int = 1) -> int:
    """Estimated peak memory of `sparse_max_weight_assignment(a, b)` on float32 inputs a [n_a, d], b [n_b, d]
    (the inputs themselves not counted) with `threads` torch threads: unit-row copies, one cosine block, the
    candidate graph, and the column candidates of every lane beyond the first. An upper bound since the candidate
    pass normalises rows block by block (`UnitRows`): calibrated (docs/planning.md) when whole unit-row copies
    were held."""
    unit_rows_bytes = 4 * d * (n_a + n_b)
    block_bytes = BLOCK_OVERHEAD * 4 * min(block, n_a) * min(block, n_b)
    extra_lanes = min(max(1, threads), MAX_LANES) - 1
    return int(unit_rows_bytes + block_bytes + EDGE_BYTES * candidate_edges(n_a, n_b, k)
               + extra_lanes * lane_column_bytes(n_a, n_b, k))


def sparse_max_weight_assignment(a: torch.Tensor, b: torch.Tensor, *, k: int = 64, block: int = 8192,
                                 device: str = "cpu", low_precision: bool = False) -> SparseAssignment:
    """Exact maximum-weight 1:1 assignment of the rows of a [n_a, d] to the rows of b [n_b, d] by cosine.

    Same result as actors/compare/matching.max_weight_assignment(cosine_matrix(a, b)) (up to exact ties), with the
    optimality certificate recorded. `low_precision`: candidate pass in bf16 (edges re-scored in float32, bounds
    widened by its error bound, ~8e-3 against float32's 1.4e-4). Off by default: on CPUs without AVX512-BF16/AMX
    (this one) a bf16 matmul runs ~7x slower than float32, and on a GPU the float32 pass over a 131K pair is
    about a second, so the wider bounds (more rows rechecked) would cost more than bf16 saves. Matmul precision is
    pinned (no TF32, no reduced-precision reductions) for the duration of the call and restored after.
    """
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows of different dimension: {a.shape[1]} vs {b.shape[1]}")
    if block < k:
        raise ValueError("block must be at least k")
    with pinned_matmul_precision():
        return _sparse_assignment(a, b, k, block, device, low_precision)


def _sparse_assignment(a, b, k, block, device, low_precision) -> SparseAssignment:
    timings: dict = {}
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a == 0 or n_b == 0:
        nan = np.full(n_a, np.nan, dtype=np.float32)
        return SparseAssignment(np.full(n_a, UNMATCHED, dtype=np.int64), nan, nan.copy(), True, 0, 0.0)
    t = time.perf_counter()
    a, b = (x.to(device=device, dtype=torch.float32) for x in (a, b))
    ua, ub = UnitRows(a), UnitRows(b)
    exact = ExactCosine(a, b)
    eps32 = cosine_error_bound(a.shape[1])
    cand = _build_candidates(ua, ub, k, block, low_precision, timings)
    timings["candidates"] = time.perf_counter() - t

    # max-cosine baseline: the best edge of a row is its max unless the row's bound could exceed it
    t = time.perf_counter()
    max_cos = np.maximum.reduceat(cand.w, np.searchsorted(cand.rows, np.arange(n_a)))  # every row has edges
    unsure = np.flatnonzero(max_cos < cand.row_bound)
    if len(unsure):
        _, _, _, row_max = dual_violations(ua, ub, np.full(n_a, np.inf), np.zeros(n_b), 0.0, rows=unsure,
                                           block=block)
        max_cos[unsure] = row_max
    timings["max_cos"] = time.perf_counter() - t

    if n_a <= n_b:
        partner, cand, certified, rounds, tol = _certify(ua, ub, exact, cand, eps32, block, timings)
    else:  # match every column of the narrower side; rows of a left over stay UNMATCHED
        col_partner, cand_t, certified, rounds, tol = _certify(ub, ua, exact.transposed(), cand.transposed(), eps32,
                                                               block, timings)
        cand = cand_t.transposed()
        partner = np.full(n_a, UNMATCHED, dtype=np.int64)
        partner[col_partner] = np.arange(n_b)

    matched = partner != UNMATCHED
    w = cand.w[np.searchsorted(cand.keys(), np.flatnonzero(matched) * n_b + partner[matched])]
    cos = np.full(n_a, np.nan, dtype=np.float32)
    cos[matched] = w
    # gap: every pair within tol of its duals, every matched weight within tol of its exact cosine
    return SparseAssignment(partner=partner, cos=cos, max_cos=max_cos.astype(np.float32), certified=certified,
                            rounds=rounds, total_weight=float(w.sum()), gap_bound=min(n_a, n_b) * 2 * tol,
                            n_edges=len(cand.rows), timings=timings)
