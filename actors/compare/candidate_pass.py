"""The candidate pass of the certified matcher (sparse_matching.py, step 1): one blocked pass over the cosine
matrix of two sets of rows that keeps, for every row AND every column, its top-k entries, and bounds what each
line left out. On a CPU the pass runs in lanes (threads that each own whole row blocks), so that no core idles
while a block's candidates are extracted; the result does not depend on how the lanes interleave."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from .precision import cosine_error_bound

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

    def rows(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start:stop written into the front of `out` (flat float32 scratch, reused block after block)."""
        x = self.x[start:stop]
        return torch.div(x, self.norm[start:stop, None], out=scratch(out, x.shape))


def scratch(flat: torch.Tensor, shape) -> torch.Tensor:
    """The front of a flat buffer viewed as `shape` (contiguous). Blocks write into buffers reused from block to
    block: a fresh array of tens of MB is new pages every time, and the first touch of a page (a page fault) is
    costly on VMs (docs/matching.md)."""
    return flat[:math.prod(shape)].view(shape)


def unit_block(u: "UnitRows | torch.Tensor", start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Rows start:stop of unit rows, held (a view) or computed into `out`."""
    return u.rows(start, stop, out) if isinstance(u, UnitRows) else u[start:stop]


class Tops:
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

    def absorb(self, other: "Tops", chunk: int = 1 << 14) -> None:
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


def _run_length(tops: "Tops") -> int:
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
def one_thread(device):
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


def flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) positions of the True entries. On CPU numpy's is ~6x faster than torch.nonzero."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.reshape(-1).nonzero().squeeze(1)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] along dim 0 (numpy's take on CPU: ~2x torch's index_select, ~4x advanced indexing)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.take(x.numpy(), idx.numpy(), axis=0))
    return x[idx]


# Expected hits per line per block (2k x the block's length along the line / the line's length: the floors'
# regime) from which one comparison of the whole block with the thresholds beats finding and reading the hit runs.
# Measured crossovers on this CPU (4096 x 8192 blocks): columns, whose runs are read with a stride, between 8 and 16
# hits; rows, whose runs are contiguous, between 32 and 64.
COMPARE_HITS = 12
ROW_COMPARE_HITS = 48


def _block_rows(tops: Tops, s: torch.Tensor, r0: int, c0: int, first: bool, mask: torch.Tensor) -> None:
    """The rows' candidates from block s [Br, Bc] at (r0, c0). Maxima of runs of 32 consecutive entries (one
    contiguous reduction, ~3% of the block's matmul) find the few runs above a row's threshold without comparing
    every entry (a full comparison pass costs more than the reduction on CPU where few hits are expected); only
    those runs are read. Where many are expected (small matrices), the block is compared with the thresholds."""
    br, bc = s.shape
    g = _group(bc, 32)
    n_runs = bc // g
    by_compare = 2 * tops.k * bc >= ROW_COMPARE_HITS * tops.n_other
    lines = slice(r0, r0 + br)
    if first or not by_compare:
        group_max = s.view(br, n_runs, g).amax(2)
    if first:
        tops.set_floor(lines, group_max, bc)
    thr = tops.thr[lines]
    if by_compare:
        above = torch.gt(s, thr[:, None], out=scratch(mask, s.shape))
        at = flatnonzero(above)  # r * bc + c: grouped by row already
        if len(at) > MOSTLY_HITS * br * bc:
            _block_top(tops, s, r0, c0)
            return
        tops.add(at // bc + r0, _take(s.view(-1), at), at % bc + c0)
        return
    runs = flatnonzero(group_max > thr[:, None])  # run q of row r is r * n_runs + q
    if len(runs) * g > MOSTLY_HITS * br * bc:
        _block_top(tops, s, r0, c0)
        return
    vals = _take(s.view(br * n_runs, g), runs)  # [h, g]
    hit = flatnonzero(vals > thr[runs // n_runs, None])
    at = runs[hit // g] * g + hit % g  # flat position in the block
    tops.add(at // bc + r0, vals.view(-1)[hit], at % bc + c0)




def _column_order(col: torch.Tensor) -> torch.Tensor:
    """The stable order that groups hits by column (numpy's sort on CPU)."""
    if col.device.type == "cpu":
        return torch.from_numpy(np.argsort(col.numpy(), kind="stable"))
    return torch.sort(col, stable=True).indices


def _block_cols(tops: Tops, s: torch.Tensor, r0: int, c0: int, first: bool, mask: torch.Tensor) -> None:
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
        above = torch.gt(s, thr[None, :], out=scratch(mask, s.shape))
        at = flatnonzero(above)  # r * bc + c
        if len(at) > MOSTLY_HITS * br * bc:
            _block_top(tops, s.T, c0, r0)
            return
        col = at % bc
        order = _column_order(col)
        at = at[order]
        tops.add(col[order] + c0, _take(s.view(-1), at), at // bc + r0)
        return
    runs = flatnonzero(group_max > thr[None, :])  # q * bc + c
    if len(runs) * g > MOSTLY_HITS * br * bc:
        _block_top(tops, s.T, c0, r0)
        return
    col = runs % bc
    order = _column_order(col)
    runs, col = runs[order], col[order]  # hits grouped by column
    at = ((runs - col) * g + col)[:, None] + torch.arange(0, g * bc, bc, device=s.device)
    vals = _take(s.view(-1), at.view(-1)).view(-1, g)  # [h, g]
    hit = flatnonzero(vals > thr[col, None])
    at = at.view(-1)[hit]
    tops.add(at % bc + c0, vals.view(-1)[hit], at // bc + r0)


def _block_top(tops: Tops, side: torch.Tensor, l0: int, o0: int) -> None:
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
    (n_cols x 3k values and indices) and [block / lanes, block] buffers. One lane on a GPU."""
    if torch.device(device).type != "cpu":
        return 1
    lanes = max(1, min(torch.get_num_threads(), MAX_LANES))
    return max(1, min(lanes, math.ceil(n_rows / max(1, block // lanes))))


@contextmanager
def _threads_per_lane(device, lanes: int):
    """torch's intra-op threads shared out among the lanes for the pass (one each on a 2-core machine), restored
    after. With a single lane, the extraction's small ops still run on one thread (one_thread)."""
    if torch.device(device).type != "cpu" or lanes == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(max(1, n // lanes))
    try:
        yield
    finally:
        torch.set_num_threads(n)


def candidate_pass(ua: "UnitRows | torch.Tensor", ub: "UnitRows | torch.Tensor", k: int, block: int,
                   low_precision: bool):
    """One blocked pass over ua @ ub.T: top-k per row and per column, both from the same blocks.

    Returns (rows, cols, values, row_bound, col_bound) as torch tensors, and timings: seconds spent per step
    (summed over lanes) and the number of lanes. Values are accurate to cosine_error_bound of the pass's
    precision; the bounds include it, so they bound the EXACT cosine of every pair left out. The result does not
    depend on how the lanes interleave. Run it under pinned_matmul_precision.
    """
    n_a, n_b = ua.shape[0], ub.shape[0]
    k_r, k_c = min(k, n_b), min(k, n_a)
    dev = ua.device
    lanes = lane_count(dev, n_a, block)
    row_block = block if lanes == 1 else max(1, block // lanes)
    rows = Tops(n_a, k_r, n_b, dev)
    lane_cols = [Tops(n_b, k_c, n_a, dev) for _ in range(lanes)]  # row tops: a lane's row blocks are its own
    cast = (lambda x: x.bfloat16()) if low_precision else (lambda x: x)
    seconds = {"candidates_matmul": 0.0, "candidates_extract": 0.0}  # (CUDA is asynchronous: CPU figures only)

    def run_lane(lane: int) -> dict:
        spent = dict.fromkeys(seconds, 0.0)
        br, bc, d = min(row_block, n_a), min(block, n_b), ua.shape[1]
        cosines, above = torch.empty(br * bc, device=dev), torch.empty(br * bc, dtype=torch.bool, device=dev)
        unit_a, unit_b = torch.empty(br * d, device=dev), torch.empty(bc * d, device=dev)
        for i, r0 in enumerate(range(lane * row_block, n_a, lanes * row_block)):
            xa = cast(unit_block(ua, r0, r0 + row_block, unit_a))
            for c0 in range(0, n_b, block):
                t = time.perf_counter()
                xb = cast(unit_block(ub, c0, c0 + block, unit_b))
                s = _block_matmul(xa, xb, scratch(cosines, (len(xa), len(xb))))
                t1 = time.perf_counter()
                with one_thread(dev) if lanes == 1 else nullcontext():
                    _block_rows(rows, s, r0, c0, first=c0 == 0, mask=above)
                    _block_cols(lane_cols[lane], s, r0, c0, first=i == 0, mask=above)
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
        seconds["candidate_lanes"] = lanes
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
