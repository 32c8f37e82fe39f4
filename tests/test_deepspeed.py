"""DeepSpeed backend (`train.backend: deepspeed`): config validation and the data-parallel algebra run in the default
suite, without deepspeed; the end-to-end run (two Ray Train workers, ZeRO 2, against the torch backend) only where
deepspeed is installed (docs/deepspeed.md)."""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import orchestrator.config as config_module
from actors.store.checkpoint import WEIGHTS, checkpoint_folder
from actors.train.deepspeed_backend import deepspeed_config, worker_rows
from actors.sae import ARCHITECTURES
from actors.sae.base import SparseAutoencoder, batch_variance_total, fraction_of_variance_unexplained, unit_rows
from actors.train.training import train_saes
from orchestrator.config import ConfigError, load_config, parse_config
from orchestrator.plan import plan_configurations
from orchestrator.stages import train as train_stage

from .conftest import TINY
from .test_training import planted_data, settings, write_manifest

BASE = yaml.safe_load(TINY.read_text())
DEEPSPEED = ["train.backend=deepspeed", "train.stack_seeds=false", "train.num_workers=2"]
HOOKPOINT = "layers.0.mlp"


@pytest.fixture
def deepspeed_present(monkeypatch):
    """Validation as where deepspeed is installed (whether or not it is here)."""
    monkeypatch.setattr(config_module, "deepspeed_installed", lambda: True)


def test_missing_deepspeed_names_the_field_and_the_install(monkeypatch):
    monkeypatch.setattr(config_module, "deepspeed_installed", lambda: False)
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, DEEPSPEED)
    assert "train.backend=deepspeed needs the deepspeed package" in str(err.value)
    assert "DS_BUILD_OPS=0 pip install --no-build-isolation" in str(err.value)
    parse_config(BASE, [])  # the torch backend never looks for it


@pytest.mark.parametrize("override,expected", [
    ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
    ("train.deepspeed.zero_stage=3", "zero_stage 3 is not supported; allowed: 0, 1, 2"),
    ("train.deepspeed.stage=2", "train.deepspeed.stage: Extra inputs are not permitted"),
    ("train.stack_seeds=true", "train.stack_seeds must be false with train.backend=deepspeed"),
    ("train.batch_size=255", "train.batch_size (255) must be a multiple of train.num_workers (2)"),
    ("train.state_every_tokens=4096", "train.state_every_tokens is not supported with train.backend=deepspeed"),
    ("sae.architectures=[{name: batchtopk, k: 4}]", "batchtopk keeps the k x batch largest activations"),
    ("sae.architectures=[{name: matryoshka, k: 4}]", "matryoshka keeps the k x batch largest activations"),
    ("sae.architectures=[{name: topk, k: 4, auxk_alpha: [0, 0.03]}]", "AuxK (auxk_alpha > 0)"),
    ("sae.architectures=[{name: relu_l1, target_l0: 8}]", "target_l0 steers the L1 coefficient"),
    ("sae.architectures=[{name: gated, target_l0: 8}]", "target_l0 steers the L1 coefficient"),
])
def test_incompatible_settings_are_refused(deepspeed_present, override, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, DEEPSPEED + [override])
    assert expected in str(err.value)


def test_compatible_settings_pass_and_hash(deepspeed_present, tmp_path):
    archs = ("sae.architectures=[{name: topk, k: 4}, {name: relu_l1, l1_coefficient: 0.5}, "
             "{name: jumprelu, l0_coefficient: 0.1}, {name: gated, l1_coefficient: 0.5}]")
    cfg = parse_config(BASE, DEEPSPEED + [archs, "train.deepspeed.zero_stage=1"])
    assert cfg.train.deepspeed.zero_stage == 1
    manifest = {"config_hash": "acts"}
    torch_cfg = parse_config(BASE, [archs])
    # Switching backends retrains; ZeRO settings and worker counts do not. A torch-backend config hashes as before
    # the setting existed (no backend keys).
    assert train_stage.train_hash(cfg, manifest) != train_stage.train_hash(torch_cfg, manifest)
    other_zero = parse_config(BASE, DEEPSPEED + [archs, "train.deepspeed.zero_stage=2", "train.num_workers=4"])
    assert train_stage.train_hash(cfg, manifest) == train_stage.train_hash(other_zero, manifest)
    assert torch_cfg.content_hash() != cfg.content_hash()
    assert torch_cfg.content_hash() == parse_config(BASE, [archs, "train.deepspeed.zero_stage=1"]).content_hash()


def test_every_data_parallel_architecture_keeps_its_surgery_in_gradient_transforms():
    """The backend applies `gradient_transforms` as hooks; an architecture allowed there must not do other surgery
    in an override of before_optimizer_step, which the backend never calls."""
    params = {"topk": {"k": 3}, "relu_l1": {"l1_coefficient": 0.5}, "batchtopk": {"k": 3},
              "matryoshka": {"k": 3, "group_sizes": [8, 8]}, "jumprelu": {"l0_coefficient": 1.0},
              "gated": {"l1_coefficient": 1.0}}
    allowed = {name for name, arch in ARCHITECTURES.items()
               if arch.check_data_parallel(arch.Params.model_validate(params[name]).model_dump()) is None}
    assert allowed == {"topk", "relu_l1", "jumprelu", "gated"}
    for name in allowed:
        assert ARCHITECTURES[name].before_optimizer_step is SparseAutoencoder.before_optimizer_step, name


def test_projection_is_linear_and_drops_the_row_direction():
    """TopK's decoder-gradient projection, averaged over workers' gradients, is the projection of the average (why
    the backend may apply it before DeepSpeed reduces), and leaves no component along the rows."""
    arch = ARCHITECTURES["topk"]
    torch.manual_seed(0)
    sae = arch(8, 16, arch.Params(k=2))
    project = sae.gradient_transforms()["W_dec"]
    g1, g2 = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    sae = sae.double()
    with torch.no_grad():
        sae.W_dec.copy_(unit_rows(sae.W_dec))  # unit in float64 too
    torch.testing.assert_close((project(g1) + project(g2)) / 2, project((g1 + g2) / 2))
    w = sae.W_dec.detach()
    assert (project(g1) * w).sum(-1).abs().max() < 1e-12
    sae.W_dec.grad = g1.clone()
    sae.before_optimizer_step()
    torch.testing.assert_close(sae.W_dec.grad, g1 - (g1 * w).sum(-1, keepdim=True) * w)


def test_slices_fvu_average_to_the_whole_batch():
    torch.manual_seed(0)
    x, x_hat = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    world = 3
    total = batch_variance_total(x) / world
    slices = [fraction_of_variance_unexplained(x[worker_rows(12, r, world)], x_hat[worker_rows(12, r, world)], total)
              for r in range(world)]
    torch.testing.assert_close(torch.stack(slices).mean(), fraction_of_variance_unexplained(x, x_hat))


def test_worker_rows_and_deepspeed_config():
    rows = [worker_rows(12, r, 3) for r in range(3)]
    assert [(s.start, s.stop) for s in rows] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="not a multiple"):
        worker_rows(10, 0, 3)
    hp = settings(batch_size=1024, grad_clip=1.0,
                  deepspeed={"zero_stage": 2, "reduce_bucket_size": 1000, "overlap_comm": False})
    ds = deepspeed_config(hp, 4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        1024, 256, 1)
    assert ds["gradient_clipping"] == 1.0 and "fp16" not in ds and "bf16" not in ds  # fp32, as the torch backend
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": False,
                                       "contiguous_gradients": True}
    assert deepspeed_config(replace(hp, deepspeed=replace(hp.deepspeed, zero_stage=0)), 4)["zero_optimization"] == {
        "stage": 0}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (optional)")
def test_two_workers_zero2_match_the_torch_backend(ray_local, tmp_path):
    """Two Ray Train workers, each on half of every batch, ZeRO stage 2 on CPU (gloo): the same SAEs as the torch
    backend trains on the whole batches in one process, to float rounding; same batches (digest); unit decoder
    rows; intermediate checkpoints written."""
    x, _ = planted_data(3072, seed=4)
    overrides = ["sae.architectures=[{name: topk, k: 4}, {name: relu_l1, l1_coefficient: 0.5}]", "sae.widths=[64]",
                 "sae.seeds=[0]", "train.tokens=3072", "train.checkpoint_tokens=[1024]", "train.lm_eval_chunks=0",
                 "train.deepspeed.zero_stage=2"]

    def experiment(name, extra):
        cfg = load_config(TINY, overrides + extra, str(tmp_path / name))
        manifest = write_manifest(cfg.output_path / "activations", x, rows_per_shard=1024, hookpoint=HOOKPOINT)
        manifest["config_hash"] = "planted"
        (cfg.output_path / "activations" / "manifest.json").write_text(json.dumps(manifest))
        return cfg, manifest, plan_configurations(cfg, [HOOKPOINT])

    cfg, manifest, configurations = experiment("torch", ["train.stack_seeds=false"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        reference = train_saes([j for c in configurations for j in c.jobs()], manifest, HOOKPOINT,
                               train_stage.train_settings(cfg, manifest), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)

    cfg, manifest, configurations = experiment("deepspeed", DEEPSPEED)
    result = train_stage.run_train(cfg, manifest, configurations, None)
    assert len(result["saes"]) == len(reference) == 2
    for ref, sae in zip(reference, result["saes"]):
        assert sae["data_digest"] == ref["data_digest"]
        for ref_folder, folder in [(Path(ref["job"]["path"]), Path(sae["path"])),
                                   (checkpoint_folder(ref["job"]["path"], 1024), checkpoint_folder(sae["path"], 1024))]:
            want, got = load_file(str(ref_folder / WEIGHTS)), load_file(str(folder / WEIGHTS))
            assert want.keys() == got.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=f"{folder} {key}")
        assert sae["metrics"]["fvu"] == pytest.approx(ref["metrics"]["fvu"], rel=1e-4)
        assert sae["metrics"]["dead_fraction"] == ref["metrics"]["dead_fraction"]
        if sae["architecture"] == "topk":
            norms = load_file(str(Path(sae["path"]) / WEIGHTS))["W_dec"].norm(dim=1)
            torch.testing.assert_close(norms, torch.ones_like(norms))
