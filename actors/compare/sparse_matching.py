"""Exact maximum-weight 1:1 assignment on cosine similarity without the dense n x n matrix (docs/matching.md).

The dense route (actors/compare/matching.py: cosine matrix + scipy's Hungarian) costs n^2 memory and n^3 time: hours and
~270 GB at 131K latents. Here (../shared/reference/matching-notes.md):

1. One blocked pass over the cosine matrix (candidate_pass.py) keeps, for every row AND every column, its top-k
   entries (collected from the same blocks: a separate column pass over transposed blocks dominated the cost in the
   notes). Whatever a line did not keep is <= its threshold (its k-th kept value, or a floor set from its first
   block), which plus the pass's error bound is its bound, so after the pass every pair is either a candidate
   edge or <= min(row bound, column bound).
2. A sparse assignment solver on the candidate graph: OR-tools' LinearSumAssignment on integer-scaled weights
   (square), scipy's LAPJVsp (rectangular).
3. An optimality certificate. From the sparse optimum we compute LP duals u (rows), v (columns) by longest paths on
   the residual graph: u_i + v_j >= w_ij on every candidate edge, equality on matched edges, v >= 0 and v = 0 on
   unmatched columns. By LP duality the matching is optimal over the FULL matrix iff u_i + v_j >= cos_ij for ALL
   pairs. Non-candidate pairs are checked through their bounds (an O(n log n) dominance test); only rows (or
   columns) whose bounds cannot prove it are recomputed in float32, blockwise, and every pair the float32 value
   cannot decide is re-scored in float64. Violating pairs join the candidate graph and we re-solve, until a round
   finds no violation.

Every comparison allows for the rounding of the values it compares (precision.py's cosine_error_bound per
format, the float32 duals, the integer scaling), and matched and nearly tight edges are re-scored in float64, so
`certified=True` is a proof about the EXACT cosines of the float32 rows: cos_ij <= u_i + v_j + tol for every
(i, j) and the matched pairs' weights are within tol of theirs, so no assignment beats ours by more than
`gap_bound` = 2 n tol (tol ~ 0.5/scale, ~5e-8 at 131K latents).

Rectangular inputs: the smaller side is matched completely (as scipy does); rows of the larger side are left
UNMATCHED. Zero-norm rows have cosine 0 with everything (as actors/compare/matching.cosine_matrix).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .candidate_pass import (MAX_LANES, Tops, UnitRows, candidate_pass, flatnonzero, one_thread, scratch,
                             unit_block)
from .precision import U32, cosine_error_bound, pinned_matmul_precision, rescore_error_bound

UNMATCHED = -1

# Extra pairs added when a row is recomputed exactly: those within this much of violating, so that the row's
# remaining bound falls well below its dual and later rounds need not recompute it again.
RECHECK_MARGIN = 0.02
RECHECK_MAX_EXTRA = 256  # per recomputed row, at most this many near pairs are added
MAX_ROUNDS = 50
INT64_MAX = float(np.iinfo(np.int64).max)


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
# 1. Candidate graph (the blocked pass itself: candidate_pass.py)


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
        self.buffers = None  # the CPU path's gather buffers, made on first use

    # pairs re-scored at a time: on the CPU through buffers this instance holds (candidate_pass.scratch says why)
    CPU_CHUNK, GPU_CHUNK = 1 << 11, 1 << 13

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        cpu = self.x.device.type == "cpu"
        chunk = self.CPU_CHUNK if cpu else self.GPU_CHUNK
        if cpu:  # numpy: single-threaded gathers and one fused einsum beat a chain of small torch ops
            x, y, inv_x, inv_y = self.x.numpy(), self.y.numpy(), self.inv_x.numpy(), self.inv_y.numpy()
            if self.buffers is None:
                d = x.shape[1]
                self.buffers = (np.empty((chunk, d), np.float32), np.empty((chunk, d)), np.empty((chunk, d)))
            gathered, x64, y64 = self.buffers
        for s in range(0, len(rows), chunk):
            r, c = rows[s:s + chunk], cols[s:s + chunk]
            if cpu:
                m = len(r)
                x64[:m] = np.take(x, r, axis=0, out=gathered[:m])  # float32 -> float64: exact
                y64[:m] = np.take(y, c, axis=0, out=gathered[:m])
                dot = np.einsum("ij,ij->i", x64[:m], y64[:m])
                out[s:s + chunk] = dot * inv_x[r] * inv_y[c]  # zero rows: 0 * 1e300 = 0
            else:
                r, c = (torch.from_numpy(i).to(self.x.device) for i in (r, c))
                dot = (self.x[r].double() * self.y[c].double()).sum(1)
                out[s:s + chunk] = (dot * self.inv_x[r] * self.inv_y[c]).cpu().numpy()
        return out

    def transposed(self) -> "ExactCosine":
        t = ExactCosine.__new__(ExactCosine)
        t.x, t.y, t.inv_x, t.inv_y, t.eps = self.y, self.x, self.inv_y, self.inv_x, self.eps
        t.buffers = None
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
    step = min(block, 2048)  # rows per chunk: a few [step, block] float32 buffers
    width = min(block, n_cols)
    cosines, limits = torch.empty(step * width, device=dev), torch.empty(step * width, device=dev)
    above = torch.empty(step * width, dtype=torch.bool, device=dev)
    unit_b = torch.empty(width * ua.shape[1], device=dev)
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
            sim = torch.mm(x, unit_block(ub, c0, c1, unit_b).T, out=scratch(cosines, (len(x), c1 - c0)))
            with one_thread(dev):  # (see one_thread: small ops after a big matmul)
                limit = torch.add(thr_row[:, None], vt[None, c0:c1], out=scratch(limits, sim.shape))
                flat = flatnonzero(torch.gt(sim, limit, out=scratch(above, sim.shape))).to(dev)
                li, lj = flat // (c1 - c0), flat % (c1 - c0)
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
    return n_b * (Tops.CAP_FACTOR * min(k, n_a) * 8 + 12)


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
