"""The review's science fixes (issue 13), each pinned by a test that failed before its fix."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.compare.matching import PairMatch, match_pair
from actors.compare.nway import nway_counts
from actors.sae import ARCHITECTURES
from actors.train.data import ActivationStream, split_held_out
from actors.train.trainer import lr_schedule
from actors.train.training import evaluate, train_saes
from orchestrator.config import TrainConfig

from .test_training import settings, planted_data, write_manifest


def test_threshold_sweep_counts_a_latent_unmatched_on_one_side_as_not_shared():
    # A (3 latents) wider than B (2): latent 0 lost the encoder matching but won a decoder partner, latent 2 the
    # reverse. Neither is shared, whatever the threshold; only latent 1 is.
    m = PairMatch(n_a=3, n_b=2, threshold=0.5, enc_partner=np.array([-1, 0, 1]),
                  enc_cos=np.array([np.nan, 0.9, 0.95], dtype=np.float32), dec_partner=np.array([0, 1, -1]),
                  dec_cos=np.array([0.95, 0.9, np.nan], dtype=np.float32),
                  enc_max_cos=np.array([0.9, 0.9, 0.95], dtype=np.float32),
                  dec_max_cos=np.array([0.95, 0.9, 0.9], dtype=np.float32))
    sweep = m.threshold_sweep(np.array([0.0, 0.5, 0.85]))
    np.testing.assert_allclose(sweep["shared"], [1 / 3, 1 / 3, 1 / 3])
    assert sweep["shared"][1] == m.statistics()["shared_fraction"]


def test_threshold_sweep_agrees_with_the_shared_fraction_on_rectangular_matchings():
    rng = np.random.default_rng(0)
    for n_a, n_b in [(12, 7), (7, 12), (9, 9)]:
        shared_dirs = rng.normal(size=(min(n_a, n_b), 6))
        a = np.concatenate([shared_dirs, rng.normal(size=(n_a - len(shared_dirs), 6))])
        b = np.concatenate([shared_dirs + 0.1 * rng.normal(size=shared_dirs.shape), rng.normal(size=(n_b - len(shared_dirs), 6))])
        m = match_pair(torch.tensor(a), torch.tensor(a[rng.permutation(n_a)]), torch.tensor(b),
                       torch.tensor(b[rng.permutation(n_b)]), 0.3)
        t = np.linspace(0, 0.95, 20)
        sweep = m.threshold_sweep(t)
        for threshold, value in zip(t, sweep["shared"]):
            m.threshold = float(threshold)
            assert value == pytest.approx(m.statistics()["shared_fraction"]), (n_a, n_b, threshold)


def test_auxk_loss_is_sparsifys():
    """AuxK on dead latents, against EleutherAI sparsify's own SparseCoder with the same weights and dead mask."""
    from sparsify import SparseCoder, SparseCoderConfig

    d, n, k = 16, 48, 4
    torch.manual_seed(0)
    arch = ARCHITECTURES["topk"]
    ours = arch(d, n, arch.Params(k=k, auxk_alpha=1.0))
    theirs = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    theirs.load_state_dict({"encoder.weight": ours.encoder.weight.detach(), "encoder.bias": ours.encoder.bias.detach(),
                            "W_dec": ours.W_dec.detach(), "b_dec": ours.b_dec.detach()})
    x = torch.randn(64, d) * torch.linspace(0.2, 3, d) + 5.0  # large mean: the two denominators differ a lot
    for dead in (torch.arange(n) % 3 == 0, torch.arange(n) < 40):  # fewer and more dead latents than d/2
        ours.dead_mask = dead
        with torch.no_grad():
            x_hat = ours(x).x_hat
            expected = theirs(x, dead_mask=dead).auxk_loss
            assert ours.auxk_loss(x, x_hat).item() == pytest.approx(expected.item(), rel=1e-4)


def test_warmup_default_is_the_recipes_1000_steps_and_halves_for_short_runs():
    warmup_steps = TrainConfig().warmup_steps

    def peak_step(num_steps):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = lr_schedule(opt, warmup_steps, num_steps)
        lrs = []
        for _ in range(num_steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return int(np.argmax(lrs))

    assert peak_step(5000) == 1000
    assert peak_step(600) == 300


def test_fvu_l0_and_dead_fraction_are_measured_on_held_out_rows(tmp_path):
    x, _ = planted_data(4096)
    x[-512:] *= 3.0  # the tail (held out) differs from the rows trained on, so the two FVUs differ
    manifest = write_manifest(tmp_path / "acts", x, rows_per_shard=1000)
    entry = manifest["hookpoints"]["layers.0.mlp"]
    train, held = split_held_out(entry["shards"], 512)
    assert sum(s["rows"] for s in held) == 512 and sum(s["rows"] for s in train) == 4096 - 512
    # No training batch contains a held-out row.
    seen = np.concatenate(list(ActivationStream(str(tmp_path / "acts"), train, 256, 0, 4096 - 512)))
    tail = {r.tobytes() for r in x[-512:]}
    assert not any(r.tobytes() in tail for r in seen) and len(seen) == 14 * 256
    job = {"configuration": "c", "architecture": "topk", "params": {"k": 3}, "width": 32, "seed": 0,
           "path": str(tmp_path / "sae"), "run_id": None}
    [res] = train_saes([job], manifest, "layers.0.mlp", settings(eval_tokens=512), torch.device("cpu"))
    sae = ARCHITECTURES["topk"](32, 32, ARCHITECTURES["topk"].Params(k=3))
    sae.load_state_dict(load_file(str(tmp_path / "sae" / "sae.safetensors")))
    metrics, frequency = evaluate(sae, [torch.from_numpy(x[-512:])])
    assert res["metrics"]["fvu"] == pytest.approx(metrics["fvu"], rel=1e-5)
    assert res["metrics"]["l0"] == pytest.approx(metrics["l0"], rel=1e-5)
    assert res["metrics"]["dead_fraction"] == pytest.approx(float((frequency <= 0).float().mean()))
    assert res["metrics"]["train_tokens"] == 14 * 256  # one pass over the rows not held out
    assert evaluate(sae, [torch.from_numpy(x[:512])])[0]["fvu"] != pytest.approx(metrics["fvu"], rel=1e-2)


def test_nway_counts_with_a_single_seed_report_the_width():
    assert nway_counts({}, 1, widths=[64]).tolist() == [[64]]


def test_uncertified_matching_is_warned_in_the_summary_and_tagged_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.config import parse_config
    from orchestrator.known_answer_tracking import UNCERTIFIED_TAG, tag_uncertified
    from orchestrator.pipeline import summary_notes, summary_table

    conf = {"shared_mean": 0.5, "shared_std": 0.0, "chance": {}, "certified": False, "hookpoint": "h",
            "architecture": "topk", "params": {"k": 4}, "width": 8}
    compare = {"manifest": {"configurations": {"h/topk-k4-w8": conf,
                                               "h/topk-k4-w16": conf | {"certified": True, "width": 16}}}}
    metrics = {"fvu": 0.1, "l0": 4.0, "dead_fraction": 0.0}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp).info.run_id
    children = [client.create_run(exp).info.run_id for _ in range(2)]
    saes = [{"configuration": "h/topk-k4-w8", "run_id": children[0], "metrics": metrics},
            {"configuration": "h/topk-k4-w16", "run_id": children[1], "metrics": metrics}]
    table = summary_table({"saes": saes}, compare)
    assert table["certified"].tolist() == ["NO", "yes"]  # rows in the order of the configurations
    cfg = parse_config({"name": "x", "generate": {"hookpoints": ["h"], "num_tokens": 256}, "train": {"batch_size": 64},
                        "sae": {"architectures": [{"name": "topk", "k": 4}], "widths": [8], "seeds": [0]}})
    notes = summary_notes(cfg, {"saes": saes}, compare)
    assert any("WARNING" in n and "h/topk-k4-w8" in n and "w16" not in n for n in notes)
    tag_uncertified(client, parent, {"saes": saes}, compare)
    assert client.get_run(parent).data.tags[UNCERTIFIED_TAG] == "h/topk-k4-w8"
    assert client.get_run(children[0]).data.tags[UNCERTIFIED_TAG] == "true"
    assert UNCERTIFIED_TAG not in client.get_run(children[1]).data.tags


def test_reuse_key_changes_with_the_training_code(tmp_path, monkeypatch):
    from orchestrator.stages import train as train_stage

    from .conftest import REPO

    for part in ("actors/sae", "actors/train", "actors/store", "actors/compare"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    before = train_stage.training_code_version(tmp_path)
    assert before == train_stage.training_code_version(REPO)
    (tmp_path / "actors/compare/matching.py").write_text("# not training code\n")
    assert train_stage.training_code_version(tmp_path) == before
    trainer = tmp_path / "actors/train/trainer.py"
    trainer.write_text(trainer.read_text() + "\n# a comment\n")
    assert train_stage.training_code_version(tmp_path) != before

    # The train stage's reuse key (train_hash, checked by is_trained) follows the code version.
    from orchestrator.config import parse_config

    cfg = parse_config({"name": "x", "generate": {"hookpoints": ["h"], "num_tokens": 256}, "train": {"batch_size": 64},
                        "sae": {"architectures": [{"name": "topk", "k": 4}], "widths": [8], "seeds": [0]}})
    key = train_stage.train_hash(cfg, {"config_hash": "abc"})
    monkeypatch.setattr(train_stage, "training_code_version", lambda root=None: "other code")
    assert train_stage.train_hash(cfg, {"config_hash": "abc"}) != key
