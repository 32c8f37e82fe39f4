"""Architecture semantics beyond the shared training tests: AuxK, BatchTopK's batch budget and threshold."""

import math

import numpy as np
import pytest
import torch

from actors.sae import ARCHITECTURES
from actors.training import build_trainer, evaluate

from .test_training import HP, planted_data


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
    trainer = build_trainer(job, x.shape[1], 300, HP | {"lr": 1e-3}, torch.device("cpu"))
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
    trainer = build_trainer(job, x.shape[1], steps, HP | {"lr": 2e-3}, torch.device("cpu"))
    scale = math.sqrt(x.shape[1]) / np.linalg.norm(x, axis=1).mean() if trainer.sae.normalize_inputs else 1.0
    rng = np.random.default_rng(1)
    for _ in range(steps):
        trainer.step(torch.from_numpy(x[rng.integers(0, len(x), 256)] * scale))
    dec = torch.nn.functional.normalize(trainer.sae.W_dec.detach(), dim=1).numpy()
    best = (dirs @ dec.T).max(axis=1)
    assert (best > 0.9).mean() >= 0.8, f"{name}: recovered {(best > 0.9).mean():.2f} of planted directions"
    metrics, _ = evaluate(trainer.sae, [torch.from_numpy(x[:2048] * scale)])
    assert metrics["fvu"] < 0.25 and metrics["l0"] < 10, metrics
