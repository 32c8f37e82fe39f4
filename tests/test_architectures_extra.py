"""Matryoshka BatchTopK, JumpReLU and Gated SAEs: shapes, sparsity semantics, planted recovery, input-scale
folding, save/load round trip and config validation (every architecture where the check is generic)."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from actors.store.checkpoint import load_sae, save_sae_folder
from actors.sae import ARCHITECTURES
from actors.train.training import build_trainer, evaluate, sae_folder_cfg, train_saes

from .test_training import settings, held_out, planted_data, write_manifest

PARAMS = {name: arch.example_params for name, arch in ARCHITECTURES.items()}  # each declared by its own class


def make(name, d=16, n=32, seed=0, **params):
    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    return arch(d, n, arch.Params.model_validate(params or PARAMS[name]))


def train_planted(name, params, steps=1000, lr=2e-3, seed=0):
    """`steps` Adam steps on planted data (scaled as training scales it); the SAE, its inputs and the directions."""
    x, dirs = planted_data(64 * 256)
    trainer = build_trainer({"architecture": name, "params": params, "width": 96, "seed": seed}, x.shape[1], steps,
                            settings(lr=lr), torch.device("cpu"))
    scale = math.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1).mean() if trainer.sae.normalize_inputs else 1.0
    rng = np.random.default_rng(1)
    for _ in range(steps):
        trainer.step(torch.from_numpy(x[rng.integers(0, len(x), 256)] * scale))
    return trainer.sae, torch.from_numpy(x * scale), dirs


def recovered(sae, dirs, cos=0.9):
    dec = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).numpy()
    return float(((dirs @ dec.T).max(axis=1) > cos).mean())


def test_every_architecture_declares_valid_example_params():
    for name, arch in ARCHITECTURES.items():
        assert arch.example_params, f"{name} declares no example_params"
        arch.Params.model_validate(arch.example_params)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_shapes_backward_and_label(name):
    sae = make(name)
    x = torch.randn(64, 16)
    sae.init_from_batch(x)
    sae.dead_mask = torch.zeros(32, dtype=torch.bool)
    z = sae.activations(x)
    out = sae(x)
    assert z.shape == (64, 32) and out.x_hat.shape == (64, 16) and out.loss.shape == ()
    assert torch.isfinite(out.loss) and out.fired.shape == (32,) and (z >= 0).all()
    out.loss.backward()
    for key, p in sae.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all(), key
    label = ARCHITECTURES[name].label(ARCHITECTURES[name].Params.model_validate(PARAMS[name]).model_dump())
    assert label.startswith(name) and not set(label) & set("[]() ,'")


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_folding_the_input_scale_gives_identical_latents_on_raw_inputs(name):
    """A saved SAE acts on raw activations: folded weights on x = unfolded weights on scale * x."""
    scale = 3.7
    sae = make(name)
    x = torch.randn(128, 16) + 0.5
    sae.init_from_batch(x * scale)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.3)  # non-trivial biases, thresholds, gates
        for key, p in sae.named_parameters():
            if key in ("log_threshold", "r_mag", "b_mag"):
                p.normal_(-1.0 if key == "log_threshold" else 0.0, 0.3)
    if hasattr(sae, "threshold") and sae.threshold.numel() == 1:
        sae(x * scale)  # BatchTopK: learn a threshold
    folded = make(name)
    folded.load_state_dict(sae.state_dict())
    folded.fold_input_scale(scale)
    for mode in (True, False):  # training (batch-level choices) and inference (thresholds)
        sae.train(mode), folded.train(mode)
        with torch.no_grad():
            z, z_folded = sae.activations(x * scale), folded.activations(x)
            torch.testing.assert_close(z_folded, z, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(folded.decode(z_folded) * scale, sae.decode(z), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_saved_folder_rebuilds_the_architecture(tmp_path, name):
    """cfg.json as training writes it, plus the state dict, rebuild the same module (thresholds, r_mag, ...)."""
    sae = make(name)
    x = torch.randn(128, 16)
    sae.init_from_batch(x)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))  # nothing left at its init value
    sae(x)
    job = {"architecture": name, "params": sae.params.model_dump(), "width": 32, "seed": 0}
    cfg = sae_folder_cfg(job, 16, "layers.0.mlp", settings(), 10, 100)
    save_sae_folder(tmp_path / name, sae.state_dict(), json.loads(json.dumps(cfg)))
    loaded = load_sae(tmp_path / name)
    assert type(loaded) is type(sae) and not loaded.training
    assert loaded.params == sae.params
    sae.eval()
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded.activations(x), sae.activations(x))
        assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


def test_trained_folders_reload_and_act_on_raw_activations(tmp_path):
    """train_saes end to end for the new architectures: the reloaded SAE on raw activations reproduces the
    evaluation FVU measured during training (on scaled inputs for JumpReLU and Gated)."""
    x, _ = planted_data(2048)
    manifest = write_manifest(tmp_path / "acts", x * 5.0)
    names = ["matryoshka", "jumprelu", "gated"]
    jobs = [{"configuration": n, "architecture": n, "params": PARAMS[n], "width": 32, "seed": 0,
             "path": str(tmp_path / n), "run_id": None} for n in names]
    results = train_saes(jobs, manifest, "layers.0.mlp", settings(lr=1e-3), torch.device("cpu"))
    raw = [torch.from_numpy(held_out(x) * 5.0)]
    for name, res in zip(names, results):
        sae = load_sae(tmp_path / name)
        assert sae.name == name
        assert evaluate(sae, raw)[0]["fvu"] == pytest.approx(res["metrics"]["fvu"], rel=1e-3, abs=1e-6), name


# ---- Matryoshka ----

def test_matryoshka_groups_from_fractions_or_sizes():
    p = ARCHITECTURES["matryoshka"].Params
    assert p(k=4).sizes(64) == [4, 4, 8, 16, 32]  # default: prefixes of 1/16, 1/8, 1/4, 1/2, all
    assert p(k=4, group_fractions=[0.3, 0.7]).sizes(100) == [30, 70]
    assert p(k=4, group_fractions=[1 / 3, 1 / 3, 1 / 3]).sizes(100) == [33, 33, 34]  # remainder in the last
    assert p(k=4, group_sizes=[10, 54]).sizes(64) == [10, 54]
    check = ARCHITECTURES["matryoshka"].check_width
    assert check(p(k=4, group_sizes=[10, 54]).model_dump(), 64) is None
    assert "sum to 70, not the width (64)" in check(p(k=4, group_sizes=[10, 60]).model_dump(), 64)
    assert "first group (2 latents) must hold at least k=4" in check(p(k=4).model_dump(), 32)
    with pytest.raises(ValueError, match="sum to 70"):
        make("matryoshka", n=64, k=4, group_sizes=[10, 60])


def test_matryoshka_loss_is_the_mean_of_nested_prefix_losses_with_a_batch_budget():
    sae = make("matryoshka", k=3, group_sizes=[8, 8, 16])
    x = torch.randn(64, 16)
    sae.init_from_batch(x)
    z = sae.activations(x)
    assert (z > 0).sum().item() == 3 * 64  # BatchTopK's batch-level budget
    out = sae(x)

    def fvu(x_hat):
        return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()

    expected = torch.stack([fvu(z[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in (8, 16, 32)]).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.fvu, fvu(out.x_hat))  # the reported FVU is the full dictionary's
    # The first group is in every prefix: its decoder gets gradient from all three losses, the last from one.
    out.loss.backward()
    assert sae.W_dec.grad[:8].abs().sum() > 0 and sae.W_dec.grad[16:].abs().sum() > 0


def test_matryoshka_recovers_planted_directions_and_its_first_group_stands_alone():
    sae, x, dirs = train_planted("matryoshka", {"k": 3, "group_sizes": [48, 48]})
    assert recovered(sae, dirs) >= 0.8, recovered(sae, dirs)
    metrics, _ = evaluate(sae, [x[:2048]])
    assert metrics["fvu"] < 0.25 and 2 <= metrics["l0"] <= 4, metrics
    sae.eval()
    with torch.no_grad():
        z = sae.activations(x[:2048])
        prefix = z[:, :48] @ sae.W_dec[:48] + sae.b_dec  # 48 latents: room for the 48 planted features
        fvu_prefix = ((x[:2048] - prefix).pow(2).sum() / (x[:2048] - x[:2048].mean(0)).pow(2).sum()).item()
    assert fvu_prefix < 0.35, fvu_prefix


# ---- JumpReLU ----

def test_jumprelu_is_zero_below_the_threshold_and_the_pre_activation_above():
    sae = make("jumprelu")
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-3, 0.5, 32))
    x = torch.randn(256, 16) * 2
    pre, z = sae.pre_activations(x), sae.activations(x)
    above = pre > sae.threshold
    assert above.any() and (~above).any()
    assert torch.equal(z[above], pre[above]) and (z[~above] == 0).all()
    # Latents with a high threshold fire less often.
    assert above[:, :8].float().mean() > above[:, -8:].float().mean()


def test_jumprelu_threshold_gradients_are_the_rectangle_kernel_pseudo_derivatives():
    """d/dtheta of z = pre [pre > theta] ~ -(theta/eps) K, of the L0 step ~ -(1/eps) K, K = 1 within eps/2 of
    theta; theta = exp(log_threshold) adds a factor theta. The encoder gets no gradient from the L0 term."""
    lam, eps, theta = 2.0, 0.1, 1.0
    sae = make("jumprelu", l0_coefficient=lam, bandwidth=eps, init_threshold=theta)
    pre = torch.zeros(1, 32)
    pre[0, :4] = torch.tensor([0.5, 0.97, 1.03, 2.0])
    planted = pre.clone().requires_grad_(True)
    sae.pre_activations = lambda x: planted  # planted pre-activations
    x = torch.randn(1, 16)
    out = sae(x)
    z = sae.activations(x)
    assert z[0, :4].tolist() == [0.0, 0.0, pytest.approx(1.03), 2.0]
    out.loss.backward()
    d_loss_dz = 2 * (out.x_hat - x).detach() @ sae.W_dec.detach().T  # squared error summed over d, batch of 1
    near = torch.zeros(32)
    near[1:3] = 1.0  # only 0.97 and 1.03 lie within eps/2 of theta
    expected = theta * near * (-(theta / eps) * d_loss_dz[0] - lam / eps)
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    # The pre-activations get the plain gradient where active and nothing else (no L0 gradient on the encoder).
    torch.testing.assert_close(planted.grad[0], d_loss_dz[0] * (pre[0] > theta))


def test_jumprelu_l0_coefficient_warms_up():
    sae = make("jumprelu", l0_coefficient=2.0, l0_warmup_steps=4)
    x = torch.randn(32, 16)
    sae.train()
    losses = []
    for _ in range(6):
        out = sae(x)
        mse = (x - out.x_hat).pow(2).sum(-1).mean()
        losses.append(((out.loss - mse) / (2.0 * out.l0)).item())
        sae.after_optimizer_step()
    assert losses == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-5)


def test_jumprelu_recovers_planted_directions_and_learns_its_thresholds():
    params = PARAMS["jumprelu"]
    sae, x, dirs = train_planted("jumprelu", params)
    assert recovered(sae, dirs) >= 0.8, recovered(sae, dirs)
    metrics, _ = evaluate(sae, [x[:2048]])
    assert metrics["fvu"] < 0.15 and metrics["l0"] < 5, metrics
    assert sae.threshold.median() > 1.5 * params["init_threshold"]  # the L0 penalty raised them
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=1).numpy(), 1.0, atol=1e-5)


# ---- Gated ----

def test_gated_gate_decides_which_and_magnitude_how_much():
    sae = make("gated")
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 1)
        sae.r_mag.normal_(0, 0.5)
        sae.b_mag.normal_(0, 1)
    x = torch.randn(128, 16)
    gate = sae.gate_pre_activations(x)
    magnitude = torch.relu(sae.r_mag.exp() * ((x - sae.b_dec) @ sae.encoder.weight.T) + sae.b_mag)
    z = sae.activations(x)
    torch.testing.assert_close(z, (gate > 0) * magnitude)
    assert ((gate > 0) & (magnitude > 0)).any() and (gate <= 0).any()


def test_gated_sparsity_and_auxiliary_losses_do_not_train_the_decoder():
    sae = make("gated")
    x = torch.randn(64, 16)
    out = sae(x)
    out.loss.backward()
    with_aux = (sae.W_dec.grad.clone(), sae.encoder.weight.grad.clone())
    sae.zero_grad()
    mse = (x - sae(x).x_hat).pow(2).sum(-1).mean()
    mse.backward()
    # (b_dec is also the encoder's input centring, which the gate's losses do train.)
    torch.testing.assert_close(with_aux[0], sae.W_dec.grad)
    assert not torch.allclose(with_aux[1], sae.encoder.weight.grad)  # the gate learns from L1 and aux


def test_gated_recovers_planted_directions():
    sae, x, dirs = train_planted("gated", PARAMS["gated"])
    assert recovered(sae, dirs) >= 0.8, recovered(sae, dirs)
    metrics, _ = evaluate(sae, [x[:2048]])
    assert metrics["fvu"] < 0.15 and metrics["l0"] < 6, metrics


# ---- configuration ----

@pytest.mark.parametrize("arch,expected", [
    ({"name": "matryoshka", "k": 4, "group_fractions": [0.5, 0.6]}, "group_fractions must sum to 1"),
    ({"name": "matryoshka", "k": 4, "group_fractions": [1.5, -0.5]}, "group_fractions must be positive"),
    ({"name": "matryoshka", "k": 4, "group_sizes": [32, 32], "group_fractions": [0.5, 0.5]}, "not both"),
    ({"name": "matryoshka", "k": 4, "group_sizes": [16, 48]}, "group_sizes [16, 48] sum to 64, not the width (128)"),
    ({"name": "matryoshka", "k": 4, "group_sizes": [0, 64]}, "group_sizes must be positive"),
    ({"name": "matryoshka", "k": 8}, "first group (4 latents) must hold at least k=8"),
    ({"name": "matryoshka", "k": 4, "group_fractions": "half"}, "architectures[0].group_fractions"),
    ({"name": "jumprelu"}, "architectures[0].l0_coefficient: Field required"),
    ({"name": "jumprelu", "l0_coefficient": 1, "bandwidth": 0}, "architectures[0].bandwidth"),
    ({"name": "jumprelu", "l0_coefficient": 1, "init_threshold": -1}, "architectures[0].init_threshold"),
    ({"name": "jumprelu", "l0_coefficient": 1, "l0_warmup_steps": -5}, "architectures[0].l0_warmup_steps"),
    ({"name": "jumprelu", "l0_coefficient": [1, -1]}, "architectures[0].l0_coefficient"),
    ({"name": "gated", "l1_coefficient": 0}, "architectures[0].l1_coefficient"),
    ({"name": "gated", "l1_coefficient": 1, "k": 4}, "unknown hyper-parameter 'k' for gated"),
    ({"name": "gated", "l1_coefficient": 1, "target_l0": 8}, "give exactly one of l1_coefficient and target_l0"),
    ({"name": "gated"}, "give l1_coefficient or target_l0"),
    ({"name": "gated", "target_l0": 0}, "architectures[0].target_l0"),
    ({"name": "jumprelu", "l0_coefficient": 1, "target_l0": 8}, "jumprelu has no L1 coefficient to calibrate"),
])
def test_invalid_hyper_parameters_fail_before_training(arch, expected):
    from orchestrator.config import ConfigError, parse_config

    from .conftest import TINY

    base = yaml.safe_load(TINY.read_text())
    base["sae"]["architectures"] = [arch]
    with pytest.raises(ConfigError) as err:
        parse_config(base)
    assert expected in str(err.value)


def test_gated_takes_a_target_l0_as_relu_l1_does(tmp_path):
    """Gated SAEs share relu_l1's target L0: the L1 coefficient is steered (one for both seeds), held at the end
    and recorded; the stacked-free path (gated trains seed by seed) gives each seed the same coefficients."""
    x, _ = planted_data(4096)
    manifest = write_manifest(tmp_path / "acts", x)
    jobs = [{"configuration": "g", "architecture": "gated", "params": {"l1_coefficient": None, "target_l0": 6.0},
             "width": 32, "seed": s, "path": str(tmp_path / f"seed{s}"), "run_id": None} for s in (0, 1)]
    results = train_saes(jobs, manifest, "layers.0.mlp", settings(lr=1e-3), torch.device("cpu"))
    metrics = [r["metrics"] for r in results]
    assert metrics[0]["calibrated_l1_coefficient"] == metrics[1]["calibrated_l1_coefficient"]
    assert metrics[0]["calibrated_l1_coefficient"] != metrics[0]["initial_l1_coefficient"]
    assert all(m["target_l0"] == 6.0 for m in metrics)
    cfg = json.loads((tmp_path / "seed1" / "cfg.json").read_text())
    assert cfg["params"] == {"l1_coefficient": metrics[0]["calibrated_l1_coefficient"], "target_l0": 6.0}
    assert load_sae(tmp_path / "seed1").params.l1_coefficient == metrics[0]["calibrated_l1_coefficient"]


def test_list_hyper_parameters_sweep_as_lists_of_lists():
    from orchestrator.config import parse_config
    from orchestrator.plan import grid_points

    from .conftest import TINY

    base = yaml.safe_load(TINY.read_text())
    base["sae"]["architectures"] = [
        {"name": "matryoshka", "k": 4, "group_fractions": [[0.25, 0.75], [0.5, 0.5]]},
        {"name": "matryoshka", "k": 4, "group_sizes": [16, 48]},
        {"name": "jumprelu", "l0_coefficient": [0.5, 1.0]},
        {"name": "gated", "l1_coefficient": 2.0},
    ]
    base["sae"]["widths"] = [64]
    cfg = parse_config(base)
    labels = sorted(p.label for p in grid_points(cfg))
    assert labels == ["gated-l1_coefficient2.0-w64",
                      "jumprelu-l0_coefficient0.5-w64", "jumprelu-l0_coefficient1.0-w64",
                      "matryoshka-group_fractions0.25_0.75-k4-w64", "matryoshka-group_fractions0.5_0.5-k4-w64",
                      "matryoshka-group_sizes16_48-k4-w64"]
    assert len({hash(p) for p in grid_points(cfg)}) == 6  # grid points stay hashable
