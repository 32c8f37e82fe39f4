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


def test_pw_mcc_is_the_mean_signed_decoder_cosine_of_scipys_assignment():
    """PW-MCC (Song et al. 2025) against scipy directly, unequal widths included (mean over matched pairs), with
    anti-aligned decoder rows so that signed and absolute cosines would disagree."""
    rng = np.random.default_rng(3)
    for n_a, n_b in [(30, 30), (20, 35), (35, 20)]:
        ea, da = torch.tensor(rng.normal(size=(n_a, 8))), torch.tensor(rng.normal(size=(n_a, 8)))
        eb, db = torch.tensor(rng.normal(size=(n_b, 8))), torch.tensor(rng.normal(size=(n_b, 8)))
        m = min(n_a, n_b) // 2
        db[:m] = -da[:m] + 0.05 * torch.tensor(rng.normal(size=(m, 8)))  # cosine ~ -1: never a good match
        x, y = da.numpy(), db.numpy()
        sim = (x @ y.T) / (np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(y, axis=1)[None, :])
        rows, cols = linear_sum_assignment(sim, maximize=True)
        got = match_pair(ea, da, eb, db).statistics()["pw_mcc"]
        assert got == pytest.approx(sim[rows, cols].mean(), abs=1e-6)
        assert got > np.abs(sim).max(1).mean() - 1  # sanity: a mean of cosines
    # identical dictionaries up to a permutation: PW-MCC 1
    perm = torch.randperm(30)
    assert match_pair(ea[:30], da[:30], ea[:30][perm], da[:30][perm]).statistics()["pw_mcc"] == pytest.approx(1.0)


def _hub_cache(root, repo_id: str, commit: str, files: dict, ref: str | None = "main") -> None:
    """A repository in huggingface_hub's cache layout: content-addressed blobs, snapshots/<commit>/ of symlinks
    to them, refs/<branch> holding the commit."""
    import hashlib
    import os

    repo = root / f"models--{repo_id.replace('/', '--')}"
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_cli_match_from_the_hub_cache_offline(tmp_path):
    """`sae-seeds match hf://...` for a sparsify-layout and a SAELens-layout repository, resolved offline from a
    Hub cache (HF_HUB_OFFLINE=1, HF_HUB_CACHE): same statistics as matching the tensors directly; a pinned older
    revision gives that revision's SAE; a missing subfolder or a malformed source exits 2."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import save

    g = torch.Generator().manual_seed(4)
    n, d = 48, 16
    enc_old, dec_old, enc_a, dec_a = (torch.randn(n, d, generator=g) for _ in range(4))
    enc_b, dec_b = enc_a + 0.2 * torch.randn(n, d, generator=g), dec_a + 0.2 * torch.randn(n, d, generator=g)
    enc_b[n // 2:], dec_b[n // 2:] = torch.randn(n // 2, d, generator=g), torch.randn(n // 2, d, generator=g)

    def sparsify(enc, dec):
        return {"layers.6/sae.safetensors": save({"encoder.weight": enc, "encoder.bias": torch.zeros(n),
                                                  "W_dec": dec, "b_dec": torch.zeros(d)}),
                "layers.6/cfg.json": json.dumps({"d_in": d, "num_latents": n, "k": 4}).encode()}

    old, new = "a" * 40, "b" * 40
    cache = tmp_path / "hub"
    _hub_cache(cache, "org/sparsify-suite", old, sparsify(enc_old, dec_old), ref=None)
    _hub_cache(cache, "org/sparsify-suite", new, sparsify(enc_a, dec_a))
    _hub_cache(cache, "org/saelens-suite", "c" * 40, {
        "blocks.6.hook_resid_post/sae_weights.safetensors": save({
            "W_enc": enc_b.T.contiguous(), "b_enc": torch.zeros(n), "W_dec": dec_b, "b_dec": torch.zeros(d)}),
        "blocks.6.hook_resid_post/cfg.json": json.dumps({"d_in": d, "d_sae": n}).encode(),
        "blocks.6.hook_resid_post/weights.pt": b"not to be read"})

    b = "hf://org/saelens-suite/blocks.6.hook_resid_post"
    calls = [["hf://org/sparsify-suite/layers.6", b], [f"hf://org/sparsify-suite@{old}/layers.6", b],
             ["hf://org/sparsify-suite/layers.7", b], ["hf://org", b]]
    script = ("import contextlib, io, json, sys\nfrom orchestrator.cli import main\n"
              "for a, b in json.loads(sys.argv[1]):\n"
              "    out, err = io.StringIO(), io.StringIO()\n"
              "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
              "        rc = main(['match', a, b, '--json'])\n"
              "    print(json.dumps([rc, out.getvalue(), err.getvalue()]))\n")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
                        "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(calls)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [r[0] for r in results] == [0, 0, 2, 2], results
    for (rc, out, _), (enc, dec) in zip(results[:2], [(enc_a, dec_a), (enc_old, dec_old)]):
        expected = match_pair(enc, dec, enc_b, dec_b).statistics()
        got = json.loads(out)
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), key
    assert json.loads(results[0][1])["shared_fraction"] > json.loads(results[1][1])["shared_fraction"]
    assert "layers.7" in results[2][2]
    assert "hf://owner/name" in results[3][2]
