"""A new architecture is one file plus one registry line (`tests/new_architecture.py`, registered by
importing it): trained as a stack of seeds, exported and matched through the whole pipeline."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import ray
import torch

from actors.sae import ARCHITECTURES

MODULE = "tests.new_architecture"


@pytest.fixture
def new_architecture():
    """Imported (so registered) for one test, then removed from the registry and from sys.modules."""
    module = importlib.import_module(MODULE)
    yield module.TopKMSESAE
    ARCHITECTURES.pop(module.TopKMSESAE.name, None)
    sys.modules.pop(MODULE, None)


def test_the_new_architecture_trains_as_a_stack_of_seeds(new_architecture):
    TopKMSESAE = new_architecture
    from actors.train.stacked import StackedTrainer, group_trainers
    from actors.train.trainer import build_trainer

    from .test_training import settings

    jobs = [{"architecture": TopKMSESAE.name, "params": {"k": 3}, "width": 32, "seed": s} for s in (0, 1)]
    trainers = [build_trainer(j, 16, 10, settings(), torch.device("cpu")) for j in jobs]
    [group] = group_trainers(trainers, settings(), 16)
    assert isinstance(group, StackedTrainer)
    x = torch.randn(64, 16)
    losses = [m["loss"] for m in group.step(x)]
    x_hat = [trainer.sae(x).x_hat for trainer in trainers]  # after the step: the squared error it now has
    assert all(np.isfinite(losses)) and all(torch.isfinite(h).all() for h in x_hat)


@pytest.mark.slow  # multi-minute: run by CI's slow set (scripts/test.sh -m slow)
def test_the_new_architecture_runs_through_the_pipeline(ray_local, tmp_path, new_architecture):
    TopKMSESAE = new_architecture
    from actors.store.checkpoint import load_sae
    from actors.store.export import export_sae
    from orchestrator.config import load_config
    from orchestrator.pipeline import run_experiment

    from .conftest import TINY

    cfg = load_config(TINY, [f"sae.architecture_modules=[{MODULE}]",
                             f"sae.architectures=[{{name: {TopKMSESAE.name}, k: 4}}]", "sae.widths=[64]",
                             "sae.seeds=[0,1]", "train.checkpoint_tokens=[]", "generate.num_tokens=8192"],
                      output_dir=str(tmp_path / "out"))
    assert ARCHITECTURES[TopKMSESAE.name] is TopKMSESAE
    result = run_experiment(cfg)
    saes = json.loads((tmp_path / "out" / "saes" / "manifest.json").read_text())["saes"]
    assert sorted((s["architecture"], s["seed"]) for s in saes) == [(TopKMSESAE.name, 0), (TopKMSESAE.name, 1)]
    [row] = result["summary"].to_dict("records")
    assert row["seeds"] == 2 and row["l0"] == 4.0
    # Saved with its own name, loaded back as itself, and exported in sparsify's layout (TopK at inference).
    folder = tmp_path / "out" / saes[0]["path"]  # the manifest records paths relative to the output folder
    sae = load_sae(folder)
    assert type(sae) is TopKMSESAE
    exported = load_sae(export_sae(folder, "sparsify", tmp_path / "exported"))
    x = torch.randn(32, sae.d_in)
    torch.testing.assert_close(exported.activations(x), sae.activations(x))


def test_compare_tasks_see_architectures_registered_after_the_task_was_first_sent(ray_local, tmp_path):
    """A `@ray.remote` function travels by value with the globals it names: the chance baseline once read the
    driver's registry as it was when the task was first sent, so an architecture registered later (by an
    experiment's sae.architecture_modules) was missing in the worker (KeyError in CI's slow set)."""
    from actors.sae.topk import TopKSAE
    from actors.store.checkpoint import save_sae_folder
    from orchestrator.stages.compare import chance_overlap

    def folders(arch, name, params):
        entries = []
        for seed in (0, 1):
            torch.manual_seed(seed + 10)
            sae = arch(8, 16, arch.Params.model_validate(params))
            save_sae_folder(tmp_path / f"{name}-{seed}", sae.state_dict(), {})
            entries.append({"path": str(tmp_path / f"{name}-{seed}"), "architecture": name, "width": 16,
                            "seed": seed, "params": params})
        return entries

    assert MODULE not in sys.modules and "topk_mse_test" not in ARCHITECTURES
    before = ray.get(chance_overlap.remote(*folders(TopKSAE, "topk", {"k": 3}), 0.7, []))  # the task is sent
    module = importlib.import_module(MODULE)
    try:
        after = ray.get(chance_overlap.remote(*folders(module.TopKMSESAE, module.TopKMSESAE.name, {"k": 3}), 0.7,
                                              [MODULE]))
    finally:
        ARCHITECTURES.pop(module.TopKMSESAE.name, None)
        sys.modules.pop(MODULE, None)
    # TopK and its squared-error variant build identical SAEs from one seed: the same chance levels.
    assert after == before
