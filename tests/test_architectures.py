"""Architecture semantics beyond the shared training tests: AuxK, BatchTopK's batch budget and threshold."""

import json
import math

import numpy as np
import pytest
import torch

from actors.sae import ARCHITECTURES
from actors.train.training import build_trainer, evaluate

from .test_training import settings, planted_data


def make(name, d=16, n=32, seed=0, **params):
    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    return arch(d, n, arch.Params.model_validate(params))


def test_auxk_sends_gradient_to_dead_latents_only_when_enabled():
    x = torch.randn(64, 16)
    grads = {}
    for alpha in (0.0, 1 / 32):
        sae = make("topk", k=2, auxk_alpha=alpha)
        with torch.no_grad():
            sae.encoder.bias[8:] = 10.0  # latents 0..7 never reach the top k (dead) but keep positive pre-activations
        sae.dead_mask = torch.zeros(32, dtype=torch.bool)
        sae.dead_mask[:8] = True
        out = sae(x)
        assert (sae.activations(x)[:, :8] == 0).all()
        out.loss.backward()
        grads[alpha] = sae.W_dec.grad[:8].abs().sum().item()
    assert grads[0.0] == 0.0  # only the main loss: dead latents learn nothing
    assert grads[1 / 32] > 0.0  # AuxK: they are trained to explain the residual

    # k_aux = d_in / 2 = 8 dead latents: full weight; nothing dead: no AuxK term at all.
    sae = make("topk", k=2, auxk_alpha=1.0)
    sae.dead_mask = torch.zeros(32, dtype=torch.bool)
    sae(x)
    assert sae.auxk_loss(x, x).item() == 0.0


def test_batchtopk_keeps_k_per_token_on_average_and_learns_a_threshold():
    x, _ = planted_data(8192)
    job = {"architecture": "batchtopk", "params": {"k": 3}, "width": 64, "seed": 0}
    trainer = build_trainer(job, x.shape[1], 300, settings(lr=1e-3), torch.device("cpu"))
    batches = [torch.from_numpy(x[i:i + 256]) for i in range(0, 8192, 256)]
    for step in range(300):
        trainer.step(batches[step % len(batches)])
    sae = trainer.sae
    z = sae.activations(batches[0])  # training mode: the batch-level budget, exactly k x batch
    active = (z > 0).sum(-1)
    assert active.sum().item() == 3 * 256
    assert active.max().item() > 3 or active.min().item() < 3  # spread unevenly over tokens, unlike TopK
    assert sae.threshold.item() > 0
    metrics, _ = evaluate(sae, batches[:4])  # eval mode: the threshold decides
    assert 1.5 <= metrics["l0"] <= 6, metrics
    assert sae.training  # evaluate restores the training mode
    pre = sae.pre_activations(batches[0])
    sae.eval()
    assert torch.equal(sae.activations(batches[0]) > 0, pre > sae.threshold)


@pytest.mark.parametrize("name,params", [("batchtopk", {"k": 3}), ("topk", {"k": 3, "auxk_alpha": 1 / 32})])
def test_new_architectures_recover_planted_directions(name, params):
    x, dirs = planted_data(64 * 256)
    job = {"architecture": name, "params": params, "width": 96, "seed": 0}
    steps = 1000
    trainer = build_trainer(job, x.shape[1], steps, settings(lr=2e-3), torch.device("cpu"))
    scale = math.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1).mean() if trainer.sae.normalize_inputs else 1.0
    rng = np.random.default_rng(1)
    for _ in range(steps):
        trainer.step(torch.from_numpy(x[rng.integers(0, len(x), 256)] * scale))
    dec = torch.nn.functional.normalize(trainer.sae.W_dec.detach(), dim=1).numpy()
    best = (dirs @ dec.T).max(axis=1)
    assert (best > 0.9).mean() >= 0.8, f"{name}: recovered {(best > 0.9).mean():.2f} of planted directions"
    metrics, _ = evaluate(trainer.sae, [torch.from_numpy(x[:2048] * scale)])
    assert metrics["fvu"] < 0.25 and metrics["l0"] < 10, metrics


def test_relu_l1_ends_at_its_target_l0(tmp_path):
    """A target L0: short probes give the coefficient training starts from, the controller steers it (one for all
    seeds of the configuration) and holds it for the last tenth; every seed's final L0 lands within 15% of the
    target, where the probes' coefficient held fixed for the whole run misses it."""
    from actors.train.calibration import calibrate_l1_coefficient
    from actors.train.data import ActivationStream
    from actors.train.training import train_saes

    from .test_training import write_manifest

    x, _ = planted_data(8192)
    manifest = write_manifest(tmp_path / "acts", x)
    entry = manifest["hookpoints"]["layers.0.mlp"]
    hp = settings(lr=1e-3, tokens=4 * 8192)  # 128 steps
    target = 6.0
    jobs = [{"configuration": "c", "architecture": "relu_l1", "params": {"l1_coefficient": None, "target_l0": target},
             "width": 64, "seed": s, "path": str(tmp_path / "out" / f"seed{s}"), "run_id": None} for s in (0, 1)]
    results = train_saes(jobs, manifest, "layers.0.mlp", hp, torch.device("cpu"))

    found = {r["metrics"]["calibrated_l1_coefficient"] for r in results}
    assert len(found) == 1  # one coefficient for all seeds of the configuration: they differ only in init
    (coefficient,) = found
    initial = results[0]["metrics"]["initial_l1_coefficient"]
    assert coefficient != initial  # steered during training
    for r in results:
        m = r["metrics"]
        assert m["target_l0"] == target and m["initial_l1_coefficient"] == initial
        assert abs(math.log(m["l0"] / target)) < math.log(1.15), m
        cfg = json.loads((tmp_path / "out" / f"seed{r['job']['seed']}" / "cfg.json").read_text())
        assert cfg["params"] == {"l1_coefficient": coefficient, "target_l0": target}  # what it ended trained with

    # Without steering: the probes' coefficient, fixed, lands far from the target in the full run.
    fixed = [jobs[0] | {"params": {"l1_coefficient": initial, "target_l0": None}, "path": str(tmp_path / "fixed")}]
    [reference] = train_saes(fixed, manifest, "layers.0.mlp", hp, torch.device("cpu"))
    assert abs(math.log(reference["metrics"]["l0"] / target)) > math.log(1.2), reference["metrics"]

    # The probes' bisection: a sparser target needs a stronger penalty (shorter probes than training's, to be quick).
    scale = math.sqrt(x.shape[1]) / entry["mean_norm"]
    stream = ActivationStream(tmp_path / "acts", entry["shards"], 256, 0, 4 * 8192, scale)
    probe = {"steps": 40, "rounds": 6}
    sparser, _ = calibrate_l1_coefficient(jobs[0], stream, x.shape[1], hp, torch.device("cpu"), **probe)
    denser, _ = calibrate_l1_coefficient(jobs[0] | {"params": {"l1_coefficient": None, "target_l0": 20.0}}, stream,
                                         x.shape[1], hp, torch.device("cpu"), **probe)
    assert denser < sparser
