"""The sparse exact matcher against dense scipy (actors/compare/matching.py's route) and its optimality certificate."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import actors.compare.candidate_pass as cp
from actors.compare.candidate_pass import unit_rows
from actors.compare.matching import UNMATCHED, cosine_matrix
from actors.compare.precision import cosine_error_bound
from actors.compare.sparse_matching import (
    Candidates,
    cost_scale,
    dual_violations,
    matching_duals,
    sparse_max_weight_assignment,
)


def dense(a, b):
    sim = cosine_matrix(a, b)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    partner = np.full(sim.shape[0], UNMATCHED, dtype=np.int64)
    partner[rows] = cols
    max_cos = sim.max(axis=1) if sim.shape[1] else np.full(sim.shape[0], np.nan)
    return partner, float(sim[rows, cols].astype(np.float64).sum()), max_cos, sim


def check(a, b, unique=True, **kw):
    """Same total weight as dense (and the same assignment where the optimum is unique), same row maxima,
    a valid injection, certified."""
    partner, total, max_cos, sim = dense(a, b)
    res = sparse_max_weight_assignment(a, b, **kw)
    assert res.certified, kw
    assert res.total_weight == pytest.approx(total, rel=1e-4, abs=1e-5)
    matched = res.partner != UNMATCHED
    assert matched.sum() == min(a.shape[0], b.shape[0])
    assert len(np.unique(res.partner[matched])) == matched.sum()
    assert np.all(np.isnan(res.cos[~matched]))
    np.testing.assert_allclose(res.cos[matched], sim[matched.nonzero()[0], res.partner[matched]], atol=1e-6)
    assert float(res.cos[matched].astype(np.float64).sum()) == pytest.approx(res.total_weight, abs=1e-4)
    np.testing.assert_allclose(res.max_cos, max_cos, atol=1e-6)
    if unique:
        np.testing.assert_array_equal(res.partner, partner)
    return res


def gaussian(rng, n, d):
    return torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)


def planted(rng, n_a, n_b, d, frac=0.4, noise=0.5):
    a, b = gaussian(rng, n_a, d), gaussian(rng, n_b, d)
    m = int(frac * min(n_a, n_b))
    src, dst = rng.permutation(n_a)[:m], rng.permutation(n_b)[:m]
    b[dst] = a[src] + noise * gaussian(rng, m, d)
    return a, b


SMALL = [(5, 5, 3), (40, 40, 4), (300, 300, 16), (300, 220, 16), (220, 300, 16)]


@pytest.mark.parametrize("n_a,n_b,d,k", [(*shape, k) for shape in SMALL for k in (1, 2, 16)]
                         + [(1000, 1000, 64, 1), (1000, 1000, 64, 16), (2000, 2000, 768, 2), (2000, 2000, 768, 64)])
def test_random_instances_equal_dense(n_a, n_b, d, k):
    rng = np.random.default_rng(n_a * 7 + n_b + k)
    a, b = gaussian(rng, n_a, d), gaussian(rng, n_b, d)
    # small blocks: many blocks per row and column, tails not divisible by the group sizes
    res = check(a, b, k=k, block=max(k, 96 if n_a < 1000 else 384))
    if k == 1 and min(n_a, n_b) >= 40:
        assert res.rounds >= 2  # top-1 candidates alone are not optimal: the certificate had to add edges


@pytest.mark.parametrize("n_a,n_b", [(500, 500), (400, 600), (600, 400)])
def test_planted_instances_equal_dense(n_a, n_b):
    rng = np.random.default_rng(n_a + 3 * n_b)
    for k, block in [(2, 128), (64, 8192)]:
        a, b = planted(rng, n_a, n_b, 64)
        check(a, b, k=k, block=block)


def test_low_precision_candidates_rescored():
    rng = np.random.default_rng(5)
    for n_a, n_b in [(300, 300), (250, 310)]:
        a, b = planted(rng, n_a, n_b, 32, noise=0.3)
        check(a, b, k=4, block=128, low_precision=True)


def test_ties_duplicates_and_zero_rows():
    rng = np.random.default_rng(6)
    for trial in range(6):
        n_a, n_b = [(120, 120), (90, 130), (130, 90)][trial % 3]
        a, b = gaussian(rng, n_a, 8), gaussian(rng, n_b, 8)
        b[: n_b // 3] = b[n_b // 3: 2 * (n_b // 3)]  # duplicate columns: many optimal assignments
        a[5:25] = a[30]  # duplicate rows
        a[:4] = 0  # zero rows: cosine 0 with everything
        b[-3:] = 0
        res = check(a, b, unique=False, k=[1, 3, 32][trial % 3], block=64, low_precision=trial >= 3)
        assert np.all(res.max_cos[:4] == 0)


def test_negative_cosines():
    """Low dimension and anti-aligned rows: many strongly negative cosines, and rectangular instances where the
    forced matching must take negative weights."""
    rng = np.random.default_rng(7)
    for n_a, n_b, d in [(60, 60, 2), (50, 70, 3), (70, 50, 3)]:
        a = gaussian(rng, n_a, d)
        b = -torch.cat([a, a])[:n_b] + 0.05 * gaussian(rng, n_b, d)
        check(a, b, unique=False, k=2, block=32)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [-1.0, -1.0]])
    check(a, b, k=1, block=32)


def test_empty_sides():
    res = sparse_max_weight_assignment(torch.zeros(0, 4), torch.ones(3, 4))
    assert len(res.partner) == 0 and res.certified
    res = sparse_max_weight_assignment(torch.ones(3, 4), torch.zeros(0, 4))
    assert np.all(res.partner == UNMATCHED) and np.all(np.isnan(res.cos)) and res.total_weight == 0


def _full_edges(sim):
    n_a, n_b = sim.shape
    rows, cols = np.divmod(np.arange(n_a * n_b), n_b)
    return rows, cols, sim.ravel().astype(np.float64)


def test_certificate_accepts_optimum_and_catches_a_wrong_assignment():
    rng = np.random.default_rng(8)
    n, d = 60, 16
    a, b = gaussian(rng, n, d), gaussian(rng, n, d)
    partner, total, _, sim = dense(a, b)
    ua, ub = unit_rows(a), unit_rows(b)
    scale = cost_scale(n)
    tol = 1e-6 + 1 / scale
    rows, cols, w = _full_edges(sim)
    W = np.rint(w * scale).astype(np.int64)

    # the optimum: its duals satisfy u_i + v_j >= cos_ij over the whole matrix
    U, V = matching_duals(n, n, rows, cols, W, partner)
    r, c, excess, _ = dual_violations(ua, ub, U / scale, V / scale, tol)
    assert len(r) == 0
    assert (U.sum() + V.sum()) / scale == pytest.approx(total, abs=n * tol)

    # a worse assignment (two partners swapped) cannot be proven on the full matrix...
    wrong = partner.copy()
    wrong[[0, 1]] = wrong[[1, 0]]
    assert sim[np.arange(n), wrong].sum() < total
    with pytest.raises(RuntimeError, match="not optimal"):
        matching_duals(n, n, rows, cols, W, wrong)
    # ...and the duals that prove it on a candidate graph holding only its own edges fail the full check
    only = np.argsort(np.arange(n) * n + wrong)
    U, V = matching_duals(n, n, np.arange(n)[only], wrong[only], np.rint(sim[np.arange(n), wrong] * scale)
                          .astype(np.int64)[only], wrong)
    r, c, excess, _ = dual_violations(ua, ub, U / scale, V / scale, tol)
    assert len(r) > 0
    assert np.all(sim[r, c] > U[r] / scale + V[c] / scale + tol - 1e-6)
    assert {(0, partner[0]), (1, partner[1])} & set(zip(r.tolist(), c.tolist()))


def test_rectangular_duals_are_lp_duals():
    """Rows fewer than columns: v >= 0 and v = 0 on the columns left unmatched (the LP's complementary slackness)."""
    rng = np.random.default_rng(9)
    a, b = gaussian(rng, 30, 5), gaussian(rng, 45, 5)
    partner, _, _, sim = dense(a, b)
    scale = cost_scale(75)
    rows, cols, w = _full_edges(sim)
    U, V = matching_duals(30, 45, rows, cols, np.rint(w * scale).astype(np.int64), partner)
    assert np.all(V >= 0)
    unmatched = np.setdiff1d(np.arange(45), partner)
    assert np.all(V[unmatched] == 0)
    r, _, _, _ = dual_violations(unit_rows(a), unit_rows(b), U / scale, V / scale, 1e-6 + 1 / scale)
    assert len(r) == 0


@pytest.mark.parametrize("hits_by", ["runs", "compare"])
def test_candidates_bound_everything_else(hits_by, monkeypatch):
    """After the blocked pass, every pair that is not an edge is <= min(row bound, column bound), with the rows' and
    columns' hits found through run maxima or by comparing the whole block with the thresholds."""
    import actors.compare.sparse_matching as sm

    rng = np.random.default_rng(10)
    a, b = planted(rng, 333, 257, 24)
    ua, ub = unit_rows(a), unit_rows(b)
    sim = cosine_matrix(a, b)
    for name in ("COMPARE_HITS", "ROW_COMPARE_HITS"):
        monkeypatch.setattr(cp, name, 0 if hits_by == "compare" else 10**9)
    for low_precision in (False, True):
        cand: Candidates = sm._build_candidates(ua, ub, 5, 48, low_precision)
        outside = np.ones(sim.shape, dtype=bool)
        outside[cand.rows, cand.cols] = False
        bound = np.minimum(cand.row_bound[:, None], cand.col_bound[None, :])
        assert np.all(sim[outside] <= bound[outside] + 1e-6)
        np.testing.assert_allclose(cand.w, sim[cand.rows, cand.cols], atol=1e-6)
        # each row's best value is an edge (the max-cosine baseline comes from the edges)
        best = np.full(sim.shape[0], -np.inf)
        np.maximum.at(best, cand.rows, cand.w)
        np.testing.assert_allclose(best, sim.max(1), atol=0.011 if low_precision else 1e-6)


def assert_bounds_and_best_kept(cand: Candidates, sim: np.ndarray) -> None:
    """Every pair left out of the candidates is <= min(its row's bound, its column's bound), and every row's and
    every column's best entry is a candidate edge."""
    outside = np.ones(sim.shape, dtype=bool)
    outside[cand.rows, cand.cols] = False
    bound = np.minimum(cand.row_bound[:, None], cand.col_bound[None, :])
    assert np.all(sim[outside] <= bound[outside] + 1e-6)
    best_r, best_c = np.full(sim.shape[0], -np.inf), np.full(sim.shape[1], -np.inf)
    np.maximum.at(best_r, cand.rows, cand.w)
    np.maximum.at(best_c, cand.cols, cand.w)
    np.testing.assert_allclose(best_r, sim.max(1), atol=1e-6)
    np.testing.assert_allclose(best_c, sim.max(0), atol=1e-6)


def test_candidate_lanes_bound_everything_and_do_not_depend_on_thread_timing(monkeypatch):
    """Lanes (threads that each own row blocks, their column candidates merged at the end), 1 to 4 of them: every
    bound holds against the full matrix, every row and column keeps its best entry, a repeat gives the same
    candidates however the threads interleaved (a lane's blocks arrive in a fixed order), and the matcher still
    returns dense scipy's optimum."""
    import actors.compare.sparse_matching as sm

    rng = np.random.default_rng(21)
    a, b = planted(rng, 301, 263, 24)
    sim = cosine_matrix(a, b)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for lanes in (1, 2, 3, 4):
            monkeypatch.setattr(cp, "MAX_LANES", lanes)
            assert cp.lane_count("cpu", 301, 64) == lanes
            cand = sm._build_candidates(unit_rows(a), unit_rows(b), 5, 64, False)
            assert torch.get_num_threads() == 4  # restored after the pass
            again = sm._build_candidates(unit_rows(a), unit_rows(b), 5, 64, False)
            for field in ("rows", "cols", "w", "row_bound", "col_bound"):
                np.testing.assert_array_equal(getattr(again, field), getattr(cand, field), err_msg=f"{lanes}: {field}")
            assert_bounds_and_best_kept(cand, sim)
            check(a, b, k=5, block=64)
    finally:
        torch.set_num_threads(threads)


def test_candidate_pass_under_adversarial_orders(monkeypatch):
    """Orders that defeat the first-block floors: cosines that grow along the columns for every row (each block
    beats the thresholds: the plain top-k fallback), and all-equal cosines (ties at every threshold: buffers
    overflow and merge). Bounds still hold against the full matrix, every line keeps its best entry, and the
    matcher still returns dense scipy's optimum."""
    import actors.compare.sparse_matching as sm

    calls = {"_block_top": 0, "_merge": 0}
    for owner, name in ((cp, "_block_top"), (cp.Tops, "_merge")):
        real = getattr(owner, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(owner, name, spy)
    rng = np.random.default_rng(14)
    d = 16
    e = torch.zeros(d)
    e[0] = 1.0
    rising_a = e + 0.05 * gaussian(rng, 200, d)
    rising_b = torch.linspace(0.1, 3.0, 300)[:, None] * e + 0.3 * gaussian(rng, 300, d)
    tied_a, tied_b = e.repeat(120, 1), e.repeat(150, 1)
    for a, b in ((rising_a, rising_b), (tied_a, tied_b), (rising_b[:150], rising_a[:120])):
        sim = cosine_matrix(a, b)
        cand = sm._build_candidates(unit_rows(a), unit_rows(b), 4, 32, False)
        assert_bounds_and_best_kept(cand, sim)
        check(a, b, unique=False, k=4, block=32)
    assert calls["_block_top"] > 0 and calls["_merge"] > 0  # both fallbacks were exercised


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(11)
    a, b = planted(rng, 700, 650, 64)
    check(a, b, k=4, block=256, device="cuda")


# ----------------------------------------------------------------------------------------------------------------
# Precision: the error bounds, the pinned matmul settings, near-ties a low-precision pass cannot order


def test_bf16_error_bound_covers_a_worst_case_that_2_pow_minus_9_does_not():
    """Rows whose float32-normalised components all sit just past a bfloat16 rounding midpoint (powers of two over
    sqrt(3.96875)): every component rounds by ~2^-8 relative in the same direction, so the bf16 cosine of the row
    with itself is off by ~2 * 2^-8 before the output rounding. A bound built on 2^-9 per component (with the
    output rounding and the float32 sum: ~0.0059) is exceeded; cosine_error_bound's is not."""
    from actors.compare.candidate_pass import _block_matmul
    from actors.compare.precision import FORMATS, gamma

    d = 64
    x = torch.tensor([0.5] + [0.25] * 59 + [0.125] * 2 + [0.0] * 2)
    x = torch.stack([x, -x.flip(0)])
    ux = unit_rows(x)
    exact = (x.double() @ x.double().T) / (x.double().norm(dim=1)[:, None] * x.double().norm(dim=1)[None, :])
    got = _block_matmul(ux.bfloat16(), ux.bfloat16(), None).double()
    observed = float((got - exact).abs().max())
    assert observed <= cosine_error_bound(d, "bfloat16", "bfloat16")
    half_ulp_bound = 2 * 2.0**-9 + 2.0**-9 + gamma(d, 2.0**-24)  # the derivation from 2^-9
    assert observed > half_ulp_bound
    assert FORMATS["bfloat16"][0] == 2.0**-8
    # with float32 output (CUDA's out_dtype) the output rounding drops out of the bound
    assert cosine_error_bound(d, "bfloat16", "float32") < cosine_error_bound(d, "bfloat16", "bfloat16")
    # float32 bounds hold on random rows too, against float64
    rng = np.random.default_rng(0)
    a, b = gaussian(rng, 200, 768), gaussian(rng, 200, 768)
    assert np.abs(cosine_matrix(a, b) - cosine64(a, b)).max() <= cosine_error_bound(768)


def test_matmul_precision_pinned_inside_and_restored_after(monkeypatch):
    """A caller that allows TF32 / bf16 float32 matmuls and reduced-precision reductions gets IEEE float32 inside
    the matcher (what its error bounds assume) and its own settings back afterwards."""
    import actors.compare.sparse_matching as sm

    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    knobs = lambda: (cuda.fp32_precision, mkldnn.fp32_precision, cuda.allow_fp16_reduced_precision_reduction,
                     cuda.allow_bf16_reduced_precision_reduction)
    before = knobs()
    seen = []
    real = sm.candidate_pass

    def spy(*args, **kw):
        seen.append(knobs())
        return real(*args, **kw)

    monkeypatch.setattr(sm, "candidate_pass", spy)
    try:
        torch.set_float32_matmul_precision("medium")  # TF32 on CUDA, bf16 passes in oneDNN
        cuda.allow_fp16_reduced_precision_reduction = True
        cuda.allow_bf16_reduced_precision_reduction = True
        caller = knobs()
        assert caller[:2] != ("ieee", "ieee")
        rng = np.random.default_rng(1)
        sm.sparse_max_weight_assignment(gaussian(rng, 50, 8), gaussian(rng, 50, 8), k=4, block=32)
        assert seen == [("ieee", "ieee", False, False)]
        assert knobs() == caller
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = before[:2]
        cuda.allow_fp16_reduced_precision_reduction, cuda.allow_bf16_reduced_precision_reduction = before[2:]


def near_tie_blocks(rng, n_blocks, d=32, eps=3e-3, n_noise=20):
    """2x2 blocks a1, a2 = u +- eps p and b1, b2 = u +- eps q: all four cosines are 1 - O(eps^2), equal in bf16,
    and whether the block's optimum is straight or crossed rests on the sign of p.q (weight differences ~1e-5)."""
    a, b = [], []
    for _ in range(n_blocks):
        u, p, q = (torch.tensor(rng.normal(size=d), dtype=torch.float32) for _ in range(3))
        u, p, q = u / u.norm(), p / p.norm(), q / q.norm()
        a += [u + eps * p, u - eps * p]
        b += [u + eps * q, u - eps * q]
    a, b = torch.stack(a), torch.stack(b)
    return torch.cat([a, gaussian(rng, n_noise, d)]), torch.cat([b, gaussian(rng, n_noise, d)])


def cosine64(a, b) -> np.ndarray:
    """float64 cosines of the rows (an independent reference: numpy, no float32 step)."""
    x, y = a.double().numpy(), b.double().numpy()
    return (x @ y.T) / (np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(y, axis=1)[None, :])


def float64_optimum(a, b):
    sim = cosine64(a, b)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    partner = np.full(a.shape[0], UNMATCHED, dtype=np.int64)
    partner[rows] = cols
    return partner, sim


@pytest.mark.parametrize("low_precision", [True, False])
def test_near_ties_misordered_by_bf16_certified_to_the_float64_optimum(low_precision):
    from actors.compare.sparse_matching import _build_candidates

    rng = np.random.default_rng(12)
    a, b = near_tie_blocks(rng, 16)
    partner, sim = float64_optimum(a, b)
    straight = partner[0:32:2] == np.arange(0, 32, 2)
    assert straight.any() and not straight.all()  # both kinds of block occur
    if low_precision:
        # the bf16 pass cannot tell the four cosines of a block apart: its top-1 graph misses optimal edges
        cand = _build_candidates(unit_rows(a), unit_rows(b), 1, 64, True)
        have = set(zip(cand.rows.tolist(), cand.cols.tolist()))
        assert any((i, int(partner[i])) not in have for i in range(32))
    res = sparse_max_weight_assignment(a, b, k=1, block=64, low_precision=low_precision)
    assert res.certified
    np.testing.assert_array_equal(res.partner, partner)
    np.testing.assert_allclose(res.cos, sim[np.arange(len(partner)), partner], rtol=0, atol=6e-8)  # float32 out


def test_certificate_refuses_a_wrong_assignment_off_by_a_near_tie():
    """Duals that prove a slightly worse assignment (one near-tie block crossed the wrong way, ~1e-5 lighter) on
    its own edges fail the full check: the float32 pass with its error bound flags the pairs, float64 decides."""
    from actors.compare.sparse_matching import ExactCosine

    rng = np.random.default_rng(13)
    a, b = near_tie_blocks(rng, 4, n_noise=10)
    partner, sim = float64_optimum(a, b)
    wrong = partner.copy()
    wrong[[0, 1]] = wrong[[1, 0]]
    loss = sim[np.arange(len(partner)), partner].sum() - sim[np.arange(len(partner)), wrong].sum()
    assert 0 < loss < 1e-3
    n = len(partner)
    scale = cost_scale(n)
    exact = ExactCosine(a, b)
    order = np.argsort(np.arange(n) * n + wrong)
    rows, cols = np.arange(n)[order], wrong[order]
    W = np.rint(exact(rows, cols) * scale).astype(np.int64)
    U, V = matching_duals(n, n, rows, cols, W, wrong)  # optimal on its own edges, trivially
    tol = exact.eps + 0.5 / scale
    r, c, _, _ = dual_violations(unit_rows(a), unit_rows(b), U / scale, V / scale, tol, eps=cosine_error_bound(32))
    w = exact(r, c)
    violated = w > U[r] / scale + V[c] / scale + tol
    assert violated.any()
    assert {(0, partner[0]), (1, partner[1])} & set(zip(r[violated].tolist(), c[violated].tolist()))


def test_ortools_solver_agrees_with_scipy_and_reports_infeasible_graphs():
    from actors.compare.sparse_matching import _solve_scipy, solve_sparse

    rng = np.random.default_rng(14)
    n = 400
    for density in (0.02, 0.1):
        keys = np.unique(rng.integers(0, n * n, int(density * n * n)))
        keys = np.union1d(keys, np.arange(n) * n + rng.permutation(n))  # a perfect matching exists
        rows, cols = keys // n, keys % n
        W = rng.integers(-10**7, 10**7, len(keys))
        mate = solve_sparse(n, n, rows, cols, W)
        ref = _solve_scipy(n, n, rows, cols, W)
        weight = lambda m: W[np.searchsorted(keys, np.arange(n) * n + m)].sum()
        assert len(np.unique(mate)) == n and np.all(np.isin(np.arange(n) * n + mate, keys))
        assert weight(mate) == weight(ref)
    # two rows whose only edges go to one column: no perfect matching
    assert solve_sparse(3, 3, np.array([0, 1, 2]), np.array([0, 0, 1]), np.array([1, 2, 3])) is None
