"""N-way statistics against brute-force computations on small cases; threshold sweeps; dense vs sparse."""

import itertools

import numpy as np
import pytest
import torch

from actors.compare.matching import match_pair
from actors.compare.nway import consensus_groups, no_other_seed_curve


def random_masks(n_seeds, n, rng):
    return {(i, j): rng.random(n) < 0.4 for i, j in itertools.permutations(range(n_seeds), 2)}


def test_no_other_seed_curve_brute_force():
    rng = np.random.default_rng(0)
    n_seeds, n = 4, 50
    shared = random_masks(n_seeds, n, rng)
    curve = no_other_seed_curve(shared, n_seeds)
    assert [c["n_seeds"] for c in curve] == [2, 3, 4]
    for point in curve:
        m = point["n_seeds"]
        values = []
        for subset in itertools.combinations(range(n_seeds), m):
            for base in subset:
                alone = [not any(shared[(base, o)][lat] for o in subset if o != base) for lat in range(n)]
                values.append(np.mean(alone))
        assert point["mean"] == pytest.approx(np.mean(values))
        assert point["std"] == pytest.approx(np.std(values))
    assert curve[0]["mean"] >= curve[-1]["mean"]  # more seeds: fewer latents found in none of them


def test_consensus_groups_brute_force():
    # Seeds 0,1,2 with 3 latents each. Chain 0:0 - 1:2 - 2:1 spans three seeds; 0:1 - 1:0 spans two; rest alone.
    edges = {(0, 1): (np.array([0, 1]), np.array([2, 0])), (1, 0): (np.array([2, 0]), np.array([0, 1])),
             (1, 2): (np.array([2]), np.array([1])), (2, 1): (np.array([1]), np.array([2]))}
    sizes = consensus_groups(edges, [3, 3, 3])
    # groups: {0:0,1:2,2:1} (3 seeds), {0:1,1:0} (2 seeds), singletons 0:2, 1:1, 2:0, 2:2 (1 seed each)
    assert sizes.tolist() == [0, 4, 1, 1]
    assert sizes[1] * 1 + 2 + 3 == 9


def test_threshold_sweep_matches_statistics():
    rng = np.random.default_rng(3)
    a = [torch.tensor(rng.normal(size=(40, 4))) for _ in range(4)]
    m = match_pair(*a, threshold=0.5)
    sweep = m.threshold_sweep(np.array([0.0, 0.5, 0.9]))
    assert sweep["shared"][1] == pytest.approx(m.statistics()["shared_fraction"])
    assert sweep["decoder_shared"][1] == pytest.approx(m.statistics()["decoder_shared_fraction"])
    assert sweep["maxcos_shared"][1] == pytest.approx(m.statistics()["maxcos_shared_fraction"])
    assert np.all(np.diff(sweep["shared"]) <= 0)


@pytest.mark.parametrize("n_a,n_b", [(300, 300), (200, 260), (260, 200)])
def test_sparse_method_gives_the_dense_statistics(n_a, n_b):
    rng = np.random.default_rng(n_a + n_b)
    d = 16
    enc_a, dec_a = rng.normal(size=(n_a, d)), rng.normal(size=(n_a, d))
    enc_b, dec_b = rng.normal(size=(n_b, d)), rng.normal(size=(n_b, d))
    k = min(n_a, n_b) // 2
    enc_b[:k] = enc_a[:k] + 0.2 * rng.normal(size=(k, d))
    dec_b[:k] = dec_a[:k] + 0.2 * rng.normal(size=(k, d))
    t = [torch.tensor(x, dtype=torch.float32) for x in (enc_a, dec_a, enc_b, dec_b)]
    dense = match_pair(*t, method="dense")
    sparse = match_pair(*t, method="sparse")
    assert sparse.certified and dense.certified
    np.testing.assert_array_equal(sparse.enc_partner, dense.enc_partner)
    np.testing.assert_array_equal(sparse.dec_partner, dense.dec_partner)
    for key, value in dense.statistics().items():
        assert sparse.statistics()[key] == pytest.approx(value, abs=1e-5), key


def test_match_cli_reads_saelens_layout_and_reports_certificate(tmp_path, capsys):
    """SAELens stores W_enc as [d_in, n] in sae_weights.safetensors; sparse and dense agree through the CLI."""
    import json

    from safetensors.torch import save_file

    from orchestrator.cli import main

    rng = np.random.default_rng(5)
    w = {name: torch.tensor(rng.normal(size=(50, 8)), dtype=torch.float32) for name in ("ea", "da", "eb", "db")}
    w["eb"][:25], w["db"][:25] = w["ea"][:25] + 0.05, w["da"][:25] + 0.05
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file({"encoder.weight": w["ea"], "W_dec": w["da"]}, str(tmp_path / "a" / "sae.safetensors"))
    save_file({"W_enc": w["eb"].T.contiguous(), "W_dec": w["db"]}, str(tmp_path / "b" / "sae_weights.safetensors"))
    outputs = []
    for method in ("dense", "sparse"):
        assert main(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--json", "--method", method]) == 0
        captured = capsys.readouterr()
        outputs.append(json.loads(captured.out))
        assert "optimal (proven)" in captured.err
    assert outputs[0] == pytest.approx(outputs[1])
    assert outputs[0]["shared_fraction"] >= 0.5
