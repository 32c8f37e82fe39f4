"""Matching statistics against brute force (n <= 7) and against planted ground truth."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from actors.compare.matching import UNMATCHED, cosine_matrix, match_pair
from actors.compare.nway import nway_counts


def brute_force_partner(sim: np.ndarray) -> np.ndarray:
    """Enumerate every injective map of the smaller side; the best total weight wins."""
    n_a, n_b = sim.shape
    best, best_map = -np.inf, None
    if n_a <= n_b:
        for cols in itertools.permutations(range(n_b), n_a):
            w = sim[np.arange(n_a), list(cols)].sum()
            if w > best:
                best, best_map = w, np.array(cols)
        return best_map
    partner = np.full(n_a, UNMATCHED)
    for rows in itertools.permutations(range(n_a), n_b):
        w = sim[list(rows), np.arange(n_b)].sum()
        if w > best:
            best, best_rows = w, rows
    partner[list(best_rows)] = np.arange(n_b)
    return partner


def brute_force_stats(ea, da, eb, db, t):
    se, sd = cosine_matrix(ea, eb).astype(np.float64), cosine_matrix(da, db).astype(np.float64)
    pe, pd_ = brute_force_partner(se), brute_force_partner(sd)
    n = len(pe)
    ce = np.array([se[i, pe[i]] if pe[i] >= 0 else np.nan for i in range(n)])
    cd = np.array([sd[i, pd_[i]] if pd_[i] >= 0 else np.nan for i in range(n)])
    shared = [(pe[i] >= 0 and pd_[i] >= 0 and ce[i] > t and cd[i] > t) for i in range(n)]
    return {
        "shared_fraction": np.mean(shared),
        "equal_fraction": np.mean([pe[i] == pd_[i] and pe[i] >= 0 for i in range(n)]),
        "decoder_shared_fraction": np.mean([pd_[i] >= 0 and cd[i] > t for i in range(n)]),
        "maxcos_shared_fraction": np.mean((se.max(1) > t) & (sd.max(1) > t)),
        "mean_matched_cos_encoder": np.nanmean(ce),
        "mean_matched_cos_decoder": np.nanmean(cd),
        "pw_mcc": np.nanmean(cd),  # Song et al.: mean signed decoder cosine of the best 1:1 assignment
    }


@pytest.mark.parametrize("n_a,n_b", [(5, 5), (7, 7), (4, 6), (6, 4), (3, 7)])
def test_statistics_equal_brute_force(n_a, n_b):
    rng = np.random.default_rng(n_a * 10 + n_b)
    for trial in range(20):
        d = 3  # low dimension makes high cosines, and so both shared and unshared latents, common
        ea, da = torch.tensor(rng.normal(size=(n_a, d))), torch.tensor(rng.normal(size=(n_a, d)))
        eb, db = torch.tensor(rng.normal(size=(n_b, d))), torch.tensor(rng.normal(size=(n_b, d)))
        if trial % 5 == 0:
            ea[0] = 0  # zero-norm row: cosine 0 with everything
        t = 0.5
        got = match_pair(ea, da, eb, db, t).statistics()
        want = brute_force_stats(ea, da, eb, db, t)
        assert got["n_latents_a"] == n_a and got["n_latents_b"] == n_b and got["threshold"] == t
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (key, trial)


def test_zero_rows_have_zero_cosine():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(cosine_matrix(a, b), np.array([[0, 0], [1, 0]], dtype=np.float32))


def test_planted_permutation_recovered_like_scipy():
    rng = np.random.default_rng(0)
    n, d, n_planted = 300, 64, 120
    enc_a = rng.normal(size=(n, d))
    dec_a = rng.normal(size=(n, d))
    perm = rng.permutation(n)
    enc_b, dec_b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    planted = rng.choice(n, n_planted, replace=False)
    # B's latent perm[i] is a noisy copy of A's latent i for the planted i.
    enc_b[perm[planted]] = enc_a[planted] + 0.1 * rng.normal(size=(n_planted, d))
    dec_b[perm[planted]] = dec_a[planted] + 0.1 * rng.normal(size=(n_planted, d))
    m = match_pair(*(torch.tensor(x) for x in (enc_a, dec_a, enc_b, dec_b)), threshold=0.7)
    assert set(np.flatnonzero(m.shared)) == set(planted)
    assert np.all(m.enc_partner[planted] == perm[planted])
    rows, cols = linear_sum_assignment(cosine_matrix(torch.tensor(enc_a), torch.tensor(enc_b)), maximize=True)
    np.testing.assert_array_equal(m.enc_partner[rows], cols)
    assert m.statistics()["shared_fraction"] == pytest.approx(n_planted / n)
    table = m.assignment_table()
    assert table.num_rows == n and table.column("shared").to_pylist() == list(m.shared)


def test_shared_of_b_equals_matching_from_b_side():
    rng = np.random.default_rng(1)
    for _ in range(10):
        ea, da, eb, db = (torch.tensor(rng.normal(size=(6, 3))) for _ in range(4))
        ab = match_pair(ea, da, eb, db, 0.5)
        ba = match_pair(eb, db, ea, da, 0.5)
        np.testing.assert_array_equal(ab.shared_of_b(), ba.shared)


def test_nway_counts_against_brute_force():
    rng = np.random.default_rng(2)
    n_seeds, n, d = 4, 6, 3
    enc = [torch.tensor(rng.normal(size=(n, d))) for _ in range(n_seeds)]
    dec = [torch.tensor(rng.normal(size=(n, d))) for _ in range(n_seeds)]
    masks = {}
    for i, j in itertools.permutations(range(n_seeds), 2):
        masks[(i, j)] = match_pair(enc[i], dec[i], enc[j], dec[j], 0.5).shared
    counts = nway_counts(masks, n_seeds)
    for base in range(n_seeds):
        per_latent = [sum(masks[(base, o)][latent] for o in range(n_seeds) if o != base) for latent in range(n)]
        for k in range(n_seeds):
            assert counts[base, k] == sum(1 for c in per_latent if c == k)
        assert counts[base].sum() == n


def test_cli_match_reads_sparsify_and_saelens_layouts(tmp_path, capsys):
    """The same SAE written as sparsify does (`encoder.weight` [n, d]) and as SAELens does (`W_enc` [d, n] in
    sae_weights.safetensors) gives the same statistics, dense or through the certified sparse matcher."""
    import json

    from safetensors.torch import save_file

    from orchestrator.cli import main

    g = torch.Generator().manual_seed(0)
    n, d = 40, 16
    enc_a, dec_a = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    # B: half of A's latents, permuted and slightly perturbed, the rest random.
    enc_b, dec_b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    perm = torch.randperm(n, generator=g)[: n // 2]
    enc_b[: n // 2] = enc_a[perm] + 0.2 * torch.randn(n // 2, d, generator=g)
    dec_b[: n // 2] = dec_a[perm] + 0.2 * torch.randn(n // 2, d, generator=g)

    sparsify, saelens = tmp_path / "sparsify", tmp_path / "saelens"
    sparsify.mkdir()
    save_file({"encoder.weight": enc_a, "encoder.bias": torch.zeros(n), "W_dec": dec_a, "b_dec": torch.zeros(d)},
              str(sparsify / "sae.safetensors"))
    (sparsify / "cfg.json").write_text(json.dumps({"d_in": d, "num_latents": n, "k": 4}))
    saelens.mkdir()
    save_file({"W_enc": enc_b.T.contiguous(), "b_enc": torch.zeros(n), "W_dec": dec_b, "b_dec": torch.zeros(d)},
              str(saelens / "sae_weights.safetensors"))
    (saelens / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": n, "architecture": "standard"}))

    expected = match_pair(enc_a, dec_a, enc_b, dec_b).statistics()
    assert expected["shared_fraction"] >= 0.4  # the planted half (up to chance misses) is found
    for method in ("dense", "sparse"):
        capsys.readouterr()
        assert main(["match", str(sparsify), str(saelens), "--json", "--method", method, "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        got = json.loads(captured.out)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (method, key)
        assert "certificate: optimal (proven)" in captured.err

    capsys.readouterr()
    assert main(["match", str(sparsify), str(tmp_path / "missing")]) == 2
    assert "not an SAE folder" in capsys.readouterr().err
