"""Stacked multi-seed training equals single-seed training (bitwise on CPU), falls back per seed for architectures
without a stacked forward, and splits a configuration's seeds into several stacks without changing results."""

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from actors.sae import ARCHITECTURES
from actors.sae.relu_l1 import ReluL1SAE
from actors.sae.topk import TopKSAE
from actors.train.stacked import SingleTrainer, StackedTrainer, group_trainers, stack_bytes_per_seed, stackable
from actors.train.training import build_trainer, train_saes

from .test_training import TEST_TRAIN, planted_data, settings, write_manifest

CASES = [
    ("topk", {"k": 3, "auxk_alpha": 1 / 32}),
    ("batchtopk", {"k": 3, "auxk_alpha": 1 / 32}),
    ("matryoshka", {"k": 3, "auxk_alpha": 1 / 32, "group_fractions": [0.25, 0.75]}),
    ("relu_l1", {"l1_coefficient": 0.05}),
]


def _state(t):
    return {k: v.detach().clone() for k, v in t.sae.state_dict().items()}


# d_in 37 and width 45 leave every tensor's size off the SIMD width, so a seed's slice of the stack starts
# mid-vector: elementwise kernels (Adam) must still round each element as they do on the seed's own tensor.
@pytest.mark.parametrize("d,width", [(32, 64), (37, 45)])
@pytest.mark.parametrize("name,params,batch_encoder", [c + (False,) for c in CASES] + [
    c + (True,) for c in CASES if c[0] != "relu_l1"])  # the TopK family's batched encoder, as on a GPU
def test_stacked_steps_equal_single_seed_steps(name, params, batch_encoder, d, width):
    x, _ = planted_data(4096, d=d)
    steps, seeds = 40, [0, 1, 2]
    # A short dead window so that latents die and AuxK acts within the test.
    hp = settings(lr=2e-3, warmup_steps=5, dead_window_tokens=512)
    jobs = [{"architecture": name, "params": params, "width": width, "seed": s} for s in seeds]
    cpu = torch.device("cpu")
    singles = [build_trainer(j, d, steps, hp, cpu) for j in jobs]
    stacked = [build_trainer(j, d, steps, hp, cpu) for j in jobs]
    [group] = group_trainers(stacked, hp, d)
    assert isinstance(group, StackedTrainer)
    group.batch_encoder = batch_encoder
    batched_calls = []
    encoder_outputs = group.encoder_outputs
    group.encoder_outputs = lambda x: batched_calls.append(1) or encoder_outputs(x)
    batches = [torch.from_numpy(x[i:i + 256]) for i in range(0, len(x), 256)]
    dead = 0  # the most latents dead before a step: AuxK acts on them
    for step in range(steps):
        dead = max(dead, sum(int(((t.tokens_seen - t.last_fired) >= t.dead_window).sum()) for t in singles))
        b = batches[step % len(batches)]
        alone = [t.step(b) for t in singles]
        together = group.step(b)
        assert together == alone, step  # loss, FVU and L0 to the last bit, every step
    for a, b in zip(singles, stacked):
        sa, sb = _state(a), _state(b)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key)
        assert torch.equal(a.last_fired, b.last_fired)
        assert a.tokens_seen == b.tokens_seen and a.digest.hexdigest() == b.digest.hexdigest()
    assert not torch.equal(_state(stacked[0])["W_dec"], _state(stacked[1])["W_dec"])  # seeds stayed distinct
    assert len(batched_calls) == (steps if batch_encoder else 0)
    if params.get("auxk_alpha") and width > 48:  # more latents than planted features: some die
        assert dead > 0  # the AuxK path was exercised


class _UnstackedTopK(TopKSAE):
    """A new architecture (here a TopK subclass) that declares no stacking."""
    name = "unstacked_topk"
    stacking = None


class _ReluL1WithOwnLoss(ReluL1SAE):
    """Inherits relu_l1's batched stacking but not its stacked forward, which would apply relu_l1's loss."""
    name = "relu_l1_own_loss"


def test_a_batched_stacked_forward_serves_only_the_class_that_defines_it():
    for cls, expected in [(ReluL1SAE, True), (_ReluL1WithOwnLoss, False), (TopKSAE, True), (_UnstackedTopK, False)]:
        trainer = SimpleNamespace(sae=cls(8, 16, cls.Params.model_validate(ReluL1SAE.example_params
                                                                          if issubclass(cls, ReluL1SAE) else {"k": 2})))
        assert stackable(trainer) is expected, cls.name


def _train(tmp_path, manifest, out, hp, archs, seeds=(0, 1, 2), width=32):
    jobs = [{"configuration": arch, "architecture": arch, "params": params, "width": width, "seed": s,
             "path": str(tmp_path / out / f"{arch}-seed{s}"), "run_id": None}
            for arch, params in archs for s in seeds]
    logs = []
    results = train_saes(jobs, manifest, "layers.0.mlp", settings(**hp), torch.device("cpu"),
                         report=lambda step, per_sae: logs.append((step, per_sae)))
    return results, logs


def _folder(path):
    weights = load_file(str(path / "sae.safetensors"))
    metrics = json.loads((path / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return weights, json.loads((path / "cfg.json").read_text()), metrics


def test_saved_folders_do_not_depend_on_stacking_or_splitting(tmp_path, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, _UnstackedTopK.name, _UnstackedTopK)
    x, _ = planted_data(4096)
    manifest = write_manifest(tmp_path / "acts", x)
    archs = [("topk", {"k": 4, "auxk_alpha": 1 / 32}), ("relu_l1", {"l1_coefficient": 0.1}),
             (_UnstackedTopK.name, {"k": 4})]
    hp = {"checkpoint_tokens": [1024], "dead_window_tokens": 512}
    per_seed = stack_bytes_per_seed(32, 32, TEST_TRAIN["batch_size"])
    runs = {
        "alone": _train(tmp_path, manifest, "alone", hp | {"stack_seeds": False}, archs),
        "stacked": _train(tmp_path, manifest, "stacked", hp, archs),
        # a budget of two seeds: each configuration's three seeds go in stacks of 2 and 1
        "split": _train(tmp_path, manifest, "split", hp | {"max_stack_bytes": 2 * per_seed}, archs),
    }
    for arch, _ in archs:
        for s in (0, 1, 2):
            ref = _folder(tmp_path / "alone" / f"{arch}-seed{s}")
            ref_ckpt = _folder(tmp_path / "alone" / "checkpoints" / "tokens1024" / f"{arch}-seed{s}")
            for run in ("stacked", "split"):
                for got, want in [(_folder(tmp_path / run / f"{arch}-seed{s}"), ref),
                                  (_folder(tmp_path / run / "checkpoints" / "tokens1024" / f"{arch}-seed{s}"),
                                   ref_ckpt)]:
                    assert got[0].keys() == want[0].keys()
                    for key in want[0]:
                        assert torch.equal(got[0][key], want[0][key]), (run, arch, s, key)
                    assert got[1] == want[1] and got[2] == want[2], (run, arch, s)
    # The training curves reported to MLflow are the same numbers too.
    def curves(logs):
        return sorted((step, j["architecture"], j["seed"], tuple(sorted(m.items()))) for step, per in logs
                      for j, m in per)
    assert curves(runs["stacked"][1]) == curves(runs["alone"][1]) == curves(runs["split"][1])


def test_a_target_l0_steers_every_seed_alike_however_the_seeds_are_grouped(tmp_path):
    """A configuration with a target L0 trained seed by seed, as one stack, and split over two workers (the part
    without seed 0 trains it as an unsaved pilot to steer by): the same coefficients, so the same folders, bitwise."""
    from orchestrator.stages.train import _split_groups

    x, _ = planted_data(4096)
    manifest = write_manifest(tmp_path / "acts", x)
    per_seed = stack_bytes_per_seed(32, 32, TEST_TRAIN["batch_size"])

    def jobs(out):
        return [{"configuration": "c", "architecture": "relu_l1", "params": {"l1_coefficient": None, "target_l0": 6.0},
                 "width": 32, "seed": s, "path": str(tmp_path / out / f"seed{s}"), "run_id": None} for s in (0, 1, 2)]

    def train(js, hp):
        return train_saes(js, manifest, "layers.0.mlp", settings(checkpoint_tokens=[1024], **hp), torch.device("cpu"))

    train(jobs("alone"), {"stack_seeds": False})
    train(jobs("stacked"), {})
    parts = _split_groups([jobs("workers")], 32, TEST_TRAIN["batch_size"], 2 * per_seed)
    assert [[j["seed"] for j in p] for p in parts] == [[0, 1], [2, 0]] and parts[1][1]["l0_pilot"]
    results = [r for part in parts for r in train(part, {"max_stack_bytes": 2 * per_seed})]  # one call per worker
    assert sorted(r["job"]["seed"] for r in results) == [0, 1, 2]  # the pilot is neither returned nor saved
    assert not any(p.name.endswith("l0-pilot") for p in (tmp_path / "workers").rglob("*"))
    steered = _folder(tmp_path / "alone" / "seed0")[2]
    assert steered["calibrated_l1_coefficient"] != steered["initial_l1_coefficient"]  # it moved during the run
    for s in (0, 1, 2):
        for sub in (Path(), Path("checkpoints") / "tokens1024"):
            want = _folder(tmp_path / "alone" / sub / f"seed{s}")
            for run in ("stacked", "workers"):
                got = _folder(tmp_path / run / sub / f"seed{s}")
                assert got[0].keys() == want[0].keys()
                for key in want[0]:
                    assert torch.equal(got[0][key], want[0][key]), (run, s, sub, key)
                assert got[1] == want[1] and got[2] == want[2], (run, s, sub)


def test_grouping_stacks_supported_seeds_and_falls_back_for_the_rest(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, _UnstackedTopK.name, _UnstackedTopK)
    cpu = torch.device("cpu")
    hp = settings(lr=1e-3)
    jobs = [{"architecture": a, "params": {"k": 4}, "width": w, "seed": s}
            for a, w in [("topk", 32), ("topk", 64), (_UnstackedTopK.name, 32)] for s in (0, 1, 2)]
    jobs.append({"architecture": "topk", "params": {"k": 5}, "width": 32, "seed": 0})  # a configuration of one
    trainers = [build_trainer(j, 32, 10, hp, cpu) for j in jobs]

    def shape(groups):
        return sorted((type(g).__name__, g.trainers[0].job["architecture"], g.trainers[0].job["width"],
                       tuple(t.job["seed"] for t in g.trainers)) for g in groups)

    assert shape(group_trainers(trainers, hp, 32)) == sorted([
        ("StackedTrainer", "topk", 32, (0, 1, 2)), ("StackedTrainer", "topk", 64, (0, 1, 2)),
        ("SingleTrainer", "topk", 32, (0,)),
        *[("SingleTrainer", _UnstackedTopK.name, 32, (s,)) for s in (0, 1, 2)]])
    trainers = [build_trainer(j, 32, 10, hp, cpu) for j in jobs]
    groups = group_trainers(trainers, replace(hp, stack_seeds=False), 32)
    assert all(isinstance(g, SingleTrainer) for g in groups) and len(groups) == len(jobs)
    # The memory budget: width 64 seeds cost more than width 32 ones, so a budget of two width-32 seeds
    # stacks those in 2 + 1 and the width-64 ones alone.
    budget = 2 * stack_bytes_per_seed(32, 32, hp.batch_size)
    assert budget < 2 * stack_bytes_per_seed(32, 64, hp.batch_size)
    trainers = [build_trainer(j, 32, 10, hp, cpu) for j in jobs]
    assert shape(group_trainers(trainers, replace(hp, max_stack_bytes=budget), 32)) == sorted([
        ("StackedTrainer", "topk", 32, (0, 1)), ("SingleTrainer", "topk", 32, (2,)),
        *[("SingleTrainer", "topk", 64, (s,)) for s in (0, 1, 2)], ("SingleTrainer", "topk", 32, (0,)),
        *[("SingleTrainer", _UnstackedTopK.name, 32, (s,)) for s in (0, 1, 2)]])


def test_train_stage_deals_split_stacks_as_groups_and_keeps_the_hash():
    from orchestrator.config import load_config
    from orchestrator.stages.train import _split_groups, train_hash

    from .conftest import TINY

    group = [{"configuration": "c", "architecture": "relu_l1", "params": {"target_l0": 4, "l1_coefficient": None},
              "width": 64, "seed": s, "path": f"out/seed{s}", "run_id": f"run{s}"} for s in (3, 1, 2)]
    budget = 2 * stack_bytes_per_seed(16, 64, 256)
    parts = _split_groups([group], 16, 256, budget)
    assert [[j["seed"] for j in p] for p in parts] == [[3, 1], [2, 1]]
    # Wherever its seeds train, the configuration's L1 coefficient is calibrated with its smallest seed; a part
    # without that seed trains it too, as a pilot that steers the coefficient and is never saved.
    assert {j["calibration_seed"] for p in parts for j in p} == {1}
    pilot = parts[1][1]
    assert pilot["l0_pilot"] and pilot["path"] == "out/seed2.l0-pilot" and pilot["run_id"] is None
    assert not any(j.get("l0_pilot") for j in parts[0] + parts[1][:1])
    assert _split_groups([group], 16, 256, 10 * budget) == [[j | {"calibration_seed": 1} for j in group]]
    # A given coefficient needs no steering, hence no pilot.
    given = [j | {"params": {"l1_coefficient": 0.1, "target_l0": None}} for j in group]
    assert [[j["seed"] for j in p] for p in _split_groups([given], 16, 256, budget)] == [[3, 1], [2]]
    manifest = {"config_hash": "x"}
    hashes = {train_hash(load_config(TINY, over), manifest)
              for over in ([], ["train.stack_seeds=false"], ["train.max_stack_bytes=1000"])}
    assert len(hashes) == 1  # results are the same bits, so stacking settings do not retrain


def test_split_seeds_keeps_every_stack_within_the_budget():
    """Seeds are whole: 9 seeds at 1.4 seeds' worth of budget each go alone (dividing the group's total by the
    budget gave 7 stacks, two of them of 2 seeds, over the budget)."""
    from actors.train.stacked import split_seeds

    per_seed = stack_bytes_per_seed(16, 64, 256)
    jobs = [{"architecture": "topk", "params": {"k": 4}, "width": 64, "seed": s} for s in range(9)]
    for budget, sizes in ((1.4, [1] * 9), (2.5, [2, 2, 2, 2, 1]), (4.0, [3, 3, 3]), (100, [9])):
        parts = split_seeds(jobs, 16, 256, int(budget * per_seed))
        assert sorted(map(len, parts), reverse=True) == sizes, budget
        assert all(len(p) * per_seed <= max(budget * per_seed, per_seed) for p in parts)
        assert [j["seed"] for p in parts for j in p] == list(range(9))
