"""Exports to EleutherAI sparsify's and SAELens' layouts: loaded by the real libraries (when installed, e.g. with
the `interop` extra), they compute this project's latents and reconstructions; loaded back here, the same tensors."""

import json

import pytest
import torch

from actors.store.checkpoint import load_sae, load_sae_weights, save_sae_folder
from actors.store.export import ExportError, export_sae
from actors.sae import ARCHITECTURES
from actors.train.training import sae_folder_cfg

from .test_training import settings

D, N = 16, 32
# (architecture, params, input scale folded into the saved weights or None)
CASES = {
    "topk": ("topk", {"k": 4}, None),
    "relu_l1": ("relu_l1", {"l1_coefficient": 1e-3}, None),
    "relu_l1-folded": ("relu_l1", {"target_l0": 8, "l1_coefficient": 1e-3}, 3.7),
    "batchtopk": ("batchtopk", {"k": 4}, None),
    "matryoshka": ("matryoshka", {"k": 4, "group_sizes": [8, 8, 16]}, None),
    "jumprelu": ("jumprelu", {"l0_coefficient": 1e-3}, 3.7),
    "gated": ("gated", {"l1_coefficient": 1e-3}, 3.7),
}
# Which layout holds which architecture: sparsify keeps the top k of ReLU(W (x - b_dec) + b) per token, so it cannot
# threshold (BatchTopK, Matryoshka and JumpReLU at inference), skip centring (JumpReLU) or gate (Gated).
HOLDS = {"sparsify": {"topk", "relu_l1"},
         "saelens": {"topk", "relu_l1", "batchtopk", "matryoshka", "jumprelu", "gated"}}
THRESHOLDED = {"batchtopk", "matryoshka"}  # one learned threshold for every latent at inference
# Folding the input scale into the weights reorders float32 arithmetic: errors of ~1e-5 on values of ~10.
CLOSE = {"rtol": 1e-5, "atol": 1e-4}


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(256, D, generator=g) + torch.randn(D, generator=g)


def build(case, seed=0):
    """An SAE with every tensor random (nonzero biases, decoder rows not unit-norm), as training leaves it before
    the save: trained on inputs scaled by `scale` when it has one."""
    name, params, scale = CASES[case]
    arch = ARCHITECTURES[name]
    g = torch.Generator().manual_seed(seed)
    sae = arch(D, N, arch.Params.model_validate(params))
    with torch.no_grad():
        for p in (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 1.0))
        if name in THRESHOLDED:  # a threshold that keeps about half of the positive pre-activations
            pre = sae.pre_activations(inputs() * (scale or 1.0))
            sae.threshold.copy_(pre[pre > 0].median())
            sae.threshold_steps.fill_(100)
        if name == "jumprelu":  # per-latent thresholds around that median, so that they differ
            pre = sae.pre_activations(inputs() * (scale or 1.0))
            spread = 0.5 + torch.rand(N, generator=g)
            sae.log_threshold.copy_((pre[pre > 0].median() * spread).log())
        if name == "gated":
            for p in (sae.r_mag, sae.b_mag):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae.eval()


def save(sae, folder, scale=None):
    """Saved as training saves a final SAE: input scale folded in, the training cfg beside the weights."""
    import copy

    raw = copy.deepcopy(sae)
    if scale is not None:
        raw.fold_input_scale(scale)
    job = {"architecture": sae.name, "width": N, "params": sae.params.model_dump(), "seed": 0}
    cfg = sae_folder_cfg(job, D, "layers.3", settings(batch_size=64), 10, 1000)
    save_sae_folder(folder, raw.state_dict(), cfg)
    return folder


def reference(sae, scale, x):
    """Latents and reconstruction of raw activations `x`, computed by the SAE as trained (before any folding)."""
    s = scale or 1.0
    with torch.no_grad():
        z = sae.activations(x * s)
        return z, sae.decode(z) / s


@pytest.mark.parametrize("case", sorted(CASES))
def test_folders_load_back_and_exports_round_trip(tmp_path, case):
    sae = build(case)
    folder = save(sae, tmp_path / "sae", CASES[case][2])
    saved = load_sae(folder).state_dict()
    x = inputs()
    z, x_hat = reference(sae, CASES[case][2], x)
    with torch.no_grad():
        loaded = load_sae(folder)
        torch.testing.assert_close(loaded.activations(x), z, **CLOSE)
        torch.testing.assert_close(loaded.decode(loaded.activations(x)), x_hat, **CLOSE)
    for layout in sorted(l for l, names in HOLDS.items() if sae.name in names):
        out = export_sae(folder, layout, tmp_path / layout)
        back = load_sae(out).state_dict()
        assert set(back) == set(saved), layout
        for key in saved:
            if key == "log_threshold":  # float32 exp is many-to-one: the threshold, all the SAE uses, is identical
                assert torch.equal(back[key].exp(), saved[key].exp()), (layout, key)
            elif key != "threshold_steps":  # a training counter, not part of any export
                assert torch.equal(back[key], saved[key]), (layout, key)
        # The loader the matching stage uses reads the exports' directions identically too.
        weights, original = load_sae_weights(out), load_sae_weights(folder)
        assert torch.equal(weights.encoder, original.encoder) and torch.equal(weights.decoder, original.decoder)


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][0] in HOLDS["sparsify"]))
def test_sparsify_loads_the_export_and_reconstructs_the_same(tmp_path, case):
    sparsify = pytest.importorskip("sparsify")
    sae, scale = build(case), CASES[case][2]
    out = export_sae(save(sae, tmp_path / "sae", scale), "sparsify", tmp_path / "export")
    coder = sparsify.SparseCoder.load_from_disk(out)
    x = inputs()
    z, x_hat = reference(sae, scale, x)
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        dense = torch.zeros_like(z).scatter_(-1, top_indices, top_acts)
        torch.testing.assert_close(dense, z, **CLOSE)
        torch.testing.assert_close(coder.decode(top_acts, top_indices), x_hat, **CLOSE)
    assert (z > 0).any() and ((z > 0).sum(-1) < N).all()  # the comparison is not trivially all-zero or all-on


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][0] in HOLDS["saelens"]))
def test_saelens_loads_the_export_and_reconstructs_the_same(tmp_path, case):
    sae_lens = pytest.importorskip("sae_lens")
    sae, scale = build(case), CASES[case][2]
    out = export_sae(save(sae, tmp_path / "sae", scale), "saelens", tmp_path / "export")
    lens = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    expected = {"topk": "topk", "relu_l1": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
                "jumprelu": "jumprelu", "gated": "gated"}[sae.name]
    assert lens.cfg.architecture() == expected
    x = inputs()
    z, x_hat = reference(sae, scale, x)
    with torch.no_grad():
        got = lens.encode(x)
        torch.testing.assert_close(got, z, **CLOSE)
        torch.testing.assert_close(lens.decode(got), x_hat, **CLOSE)
        torch.testing.assert_close(lens(x), x_hat, **CLOSE)
    assert (z > 0).any() and ((z > 0).sum(-1) < N).all()


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][0] not in HOLDS["sparsify"]))
def test_sparsify_refuses_what_it_cannot_compute(tmp_path, case):
    folder = save(build(case), tmp_path / "sae", CASES[case][2])
    with pytest.raises(ExportError, match=rf"{CASES[case][0]} SAEs cannot be written faithfully in the sparsify "
                                          r"layout.*layouts that can hold them: saelens$"):
        export_sae(folder, "sparsify", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_a_layout_cannot_hold_and_bad_targets(tmp_path):
    folder = save(build("batchtopk"), tmp_path / "sae")
    with pytest.raises(ExportError, match=r"batchtopk SAEs cannot be written faithfully in the sparsify layout.*"
                                          r"layouts that can hold them: saelens"):
        export_sae(folder, "sparsify", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="unknown layout 'onnx'"):
        export_sae(folder, "onnx", tmp_path / "out")
    with pytest.raises(ExportError, match="is the SAE folder being exported"):
        export_sae(folder, "saelens", folder, overwrite=True)
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        export_sae(tmp_path / "missing", "saelens", tmp_path / "out")

    out = export_sae(folder, "saelens", tmp_path / "out")
    with pytest.raises(FileExistsError):
        export_sae(folder, "saelens", out)
    (out / "stale").write_text("")  # a file the export did not write: --force keeps its hands off
    with pytest.raises(ExportError, match="also holds stale"):
        export_sae(folder, "saelens", out, overwrite=True)
    (out / "stale").unlink()
    (out / "sae_weights.safetensors").write_bytes(b"")  # an earlier export, damaged: replaced whole
    export_sae(folder, "saelens", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "checksums.json", "sae_weights.safetensors"]
    assert load_sae(out).num_latents == N
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_cli_export(tmp_path, capsys):
    from orchestrator.cli import main

    folder = save(build("topk"), tmp_path / "sae")
    assert main(["export", str(folder), "--layout", "saelens", "--out", str(tmp_path / "lens")]) == 0
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_sae"], cfg["metadata"]["hf_hook_name"]) == ("topk", 4, N, "layers.3")
    assert main(["export", str(folder), "--layout", "sparsify", "--out", str(tmp_path / "eai")]) == 0
    cfg = json.loads((tmp_path / "eai" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (D, N, 4, "topk")
    capsys.readouterr()

    assert main(["export", str(folder), "--layout", "saelens", "--out", str(tmp_path / "lens")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(folder), "--layout", "saelens", "--out", str(tmp_path / "lens"), "--force"]) == 0
    assert main(["export", str(tmp_path / "missing"), "--layout", "saelens", "--out", str(tmp_path / "x")]) == 2
    assert "sae-seeds export:" in capsys.readouterr().err
    batchtopk = save(build("batchtopk"), tmp_path / "btk")
    assert main(["export", str(batchtopk), "--layout", "sparsify", "--out", str(tmp_path / "x")]) == 2
    assert "layouts that can hold them: saelens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(folder), "--layout", "onnx", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2


def test_a_folder_saved_by_sparsify_loads_as_topk(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(expansion_factor=N // D, k=4))  # width implied
    with torch.no_grad():
        coder.encoder.bias.normal_()
        coder.b_dec.normal_()
    coder.save_to_disk(tmp_path / "sparsify")
    sae = load_sae(tmp_path / "sparsify")
    assert (sae.name, sae.params.k) == ("topk", 4)
    x = inputs()
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        z = sae.activations(x)
        torch.testing.assert_close(z, torch.zeros_like(z).scatter_(-1, top_indices, top_acts), **CLOSE)
        torch.testing.assert_close(sae.decode(z), coder.decode(top_acts, top_indices), **CLOSE)
