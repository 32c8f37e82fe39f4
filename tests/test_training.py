"""SAE architectures and the training loop, without Ray: planted-feature recovery, determinism, batches."""

import json
import pickle
from dataclasses import MISSING, FrozenInstanceError, asdict, fields

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.store.shards import activation_table, shard_rel, to_storage
from actors.store.storage import ActivationStore
from actors.store.checkpoint import checkpoint_folder, load_sae_weights
from actors.train.data import ActivationStream
from actors.sae import ARCHITECTURES
from actors.train.settings import DeepSpeedSettings, TrainSettings
from actors.train.training import build_trainer, evaluate, train_saes
from orchestrator.config import TrainConfig
from orchestrator.stages.train import worker_settings

# The unit tests' training settings: the config's defaults (orchestrator/config.py) except these, a small batch,
# quick reports and a short warm-up; the synthetic manifests here have no model, hence no LM-loss evaluation.
TEST_TRAIN = {"batch_size": 256, "warmup_steps": 20, "log_every": 10, "eval_tokens": 4096, "lm_eval_chunks": 0}


def settings(train_hash: str | None = None, **train) -> TrainSettings:
    """The workers' settings as the train stage builds them from a validated `train` config: `TEST_TRAIN`, then
    `train` over the config's defaults."""
    return worker_settings(TrainConfig(**TEST_TRAIN | train), train_hash=train_hash, trust_remote_code=False)


def planted_data(n_rows, d=32, n_features=48, active=3, seed=0):
    """Each row is a sparse non-negative combination of known unit directions plus small noise."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_features, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_features, active, replace=False) for _ in range(n_rows)])
    coef = rng.uniform(0.5, 1.5, size=(n_rows, active))
    x = np.einsum("na,nad->nd", coef, dirs[idx]) + 0.01 * rng.normal(size=(n_rows, d))
    return x.astype(np.float32), dirs


def held_out(x, eval_tokens=TEST_TRAIN["eval_tokens"]):
    """The rows train_saes evaluates on: the tail it holds out (actors/train/data.py)."""
    from actors.store.shards import held_out_rows

    return x[len(x) - held_out_rows(len(x), eval_tokens):]


def write_manifest(root, acts, rows_per_shard=2048, hookpoint="layers.0.mlp"):
    store = ActivationStore(root)
    shards = []
    for sid, start in enumerate(range(0, len(acts), rows_per_shard)):
        part = acts[start:start + rows_per_shard]
        rel = shard_rel(hookpoint, sid)
        # One "chunk" per row keeps provenance columns valid for this synthetic data.
        store.write_table(rel, activation_table(to_storage(torch.from_numpy(part), "float32"),
                                                np.arange(start, start + len(part)), np.zeros(len(part)),
                                                np.zeros(len(part)), "float32"))
        shards.append({"shard_id": sid, "path": rel, "rows": len(part), "sha256": store.sha256(rel)})
    mean_norm = float(np.linalg.norm(acts, axis=1).mean())
    return {"root": str(root), "hookpoints": {hookpoint: {"d_in": acts.shape[1], "rows": len(acts),
                                                          "mean_norm": mean_norm, "shards": shards}}}


def test_worker_settings_are_the_validated_config_with_no_defaults_of_their_own():
    """One place defines each default, the config: the worker-side dataclasses declare none, and the train stage
    copies every field from the validated config (so unit tests train with the production shuffle buffer unless
    they set another). Frozen, and they survive the pickling that ships them to Ray workers."""
    for cls in (TrainSettings, DeepSpeedSettings):
        assert [f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING] == []
    train = TrainConfig(shuffle_buffer_tokens=1000, checkpoint_tokens=[512, 2048], lr=3e-4,
                        deepspeed={"zero_stage": 1, "overlap_comm": False})
    got = worker_settings(train, train_hash="h", trust_remote_code=True)
    config = train.model_dump()
    for f in fields(TrainSettings):
        value = getattr(got, f.name)
        if f.name == "deepspeed":
            assert asdict(value) == config["deepspeed"]
        elif f.name == "checkpoint_tokens":
            assert value == (512, 2048)
        elif f.name not in ("train_hash", "trust_remote_code"):
            assert value == config[f.name], f.name
    assert (got.train_hash, got.trust_remote_code) == ("h", True)
    assert settings().shuffle_buffer_tokens == TrainConfig().shuffle_buffer_tokens == 65536
    assert pickle.loads(pickle.dumps(got)) == got
    with pytest.raises(FrozenInstanceError):
        got.batch_size = 1


def test_topk_recovers_planted_directions():
    x, dirs = planted_data(64 * 256)
    job = {"architecture": "topk", "params": {"k": 3}, "width": 96, "seed": 0}
    steps = 1500
    hp = settings(lr=2e-3)
    trainer = build_trainer(job, x.shape[1], steps, hp, torch.device("cpu"))
    rng = np.random.default_rng(1)
    for _ in range(steps):
        trainer.step(torch.from_numpy(x[rng.integers(0, len(x), 256)]))
    dec = torch.nn.functional.normalize(trainer.sae.W_dec.detach(), dim=1).numpy()
    best = (dirs @ dec.T).max(axis=1)
    assert (best > 0.9).mean() >= 0.8, f"recovered {(best > 0.9).mean():.2f} of planted directions"
    out = trainer.sae(torch.from_numpy(x[:512]))
    assert out.fvu.item() < 0.2
    # TopK: at most k active per token; decoder rows stay unit norm.
    assert (trainer.sae.activations(torch.from_numpy(x[:64])) > 0).sum(-1).max().item() <= 3
    np.testing.assert_allclose(trainer.sae.W_dec.detach().norm(dim=1).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_loss_decreases(name):
    x, _ = planted_data(8192)
    params = {"topk": {"k": 3}, "relu_l1": {"l1_coefficient": 0.05}, "batchtopk": {"k": 3},
              "matryoshka": {"k": 3, "group_sizes": [32, 32]}, "jumprelu": {"l0_coefficient": 1.0},
              "gated": {"l1_coefficient": 1.0}}[name]
    job = {"architecture": name, "params": params, "width": 64, "seed": 0}
    trainer = build_trainer(job, x.shape[1], 300, settings(lr=1e-3), torch.device("cpu"))
    batches = [torch.from_numpy(x[i:i + 256]) for i in range(0, 8192, 256)]
    first = trainer.step(batches[0])["fvu"]
    for step in range(299):
        last = trainer.step(batches[(step + 1) % len(batches)])
    assert last["fvu"] < 0.75 * first


def test_stream_order_depends_only_on_data_seed(tmp_path):
    x, _ = planted_data(5000)
    manifest = write_manifest(tmp_path, x, rows_per_shard=1024)
    entry = manifest["hookpoints"]["layers.0.mlp"]
    a = list(ActivationStream(tmp_path, entry["shards"], 300, 7, 12000))
    b = list(ActivationStream(tmp_path, entry["shards"], 300, 7, 12000))
    c = list(ActivationStream(tmp_path, entry["shards"], 300, 8, 12000))
    assert len(a) == 40  # 12,000 tokens over 5,000 rows: the stream runs into a third epoch
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    # One epoch visits every row exactly once.
    first_epoch = np.concatenate(a)[:4800]
    assert len({r.tobytes() for r in first_epoch}) == 4800


def test_more_passes_over_fewer_cached_rows_give_every_reader_the_same_batches(tmp_path):
    """`train.tokens` above one pass (fewer tokens cached, more passes over them; docs/storage.md): streams built
    independently, as two workers would, on the store's folder and on its file:// URI, give the same batches in
    the same order on every pass. With no shuffle buffer each pass is a permutation of every row, a different
    one on each pass, fixed by the data seed."""
    x, _ = planted_data(4096)
    shards = write_manifest(tmp_path, x, rows_per_shard=1024)["hookpoints"]["layers.0.mlp"]["shards"]
    passes, per_pass = 3, 4096 // 256

    def stream(root, data_seed=5, buffer=0):
        return list(ActivationStream(str(root), shards, 256, data_seed, passes * 4096, shuffle_buffer=buffer))

    a, b = stream(tmp_path), stream(tmp_path.as_uri())
    assert len(a) == passes * per_pass
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    index = {row.tobytes(): i for i, row in enumerate(x)}
    assert len(index) == len(x)

    def pass_orders(batches):
        return [[index[r.tobytes()] for r in np.concatenate(batches[k * per_pass:(k + 1) * per_pass])]
                for k in range(passes)]

    orders = pass_orders(a)
    assert all(sorted(o) == list(range(len(x))) for o in orders)  # every row once per pass
    assert len({tuple(o) for o in orders}) == passes  # reshuffled on every pass
    assert pass_orders(stream(tmp_path, data_seed=6))[1] != orders[1]  # the reshuffle is the data seed's
    # With the shuffle buffer (rows carried across shard and pass boundaries) the order is still the readers' own.
    c, d = stream(tmp_path, buffer=2048), stream(tmp_path.as_uri(), buffer=2048)
    assert len(c) == passes * per_pass and all(np.array_equal(p, q) for p, q in zip(c, d, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_seeds_trained_apart_see_the_same_batches_over_several_passes(tmp_path):
    """Seeds on different workers (separate train_saes calls) and seeds stacked on one, over 2.5 passes of the
    training rows, hash the same batches (the digest covers every batch of every pass)."""
    x, _ = planted_data(4096)
    manifest = write_manifest(tmp_path / "acts", x)
    train_rows = len(x) - len(held_out(x))
    tokens = train_rows * 5 // 2 // 256 * 256

    def run(seeds, out):
        jobs = [{"configuration": "c", "architecture": "topk", "params": {"k": 4}, "width": 32, "seed": s,
                 "path": str(tmp_path / out / f"seed{s}"), "run_id": None} for s in seeds]
        return train_saes(jobs, manifest, "layers.0.mlp", settings(tokens=tokens), torch.device("cpu"))

    results = run([0, 1], "stacked") + run([2], "apart")
    assert len(results) == 3
    assert len({r["data_digest"] for r in results}) == 1
    cfg = json.loads((tmp_path / "apart" / "seed2" / "cfg.json").read_text())
    assert cfg["tokens"] == tokens > 2 * train_rows


def test_same_seed_same_weights_different_seed_same_batches(tmp_path):
    x, _ = planted_data(4096)
    manifest = write_manifest(tmp_path / "acts", x)

    def run(out, seeds, data_seed=0):
        jobs = [{"configuration": "c", "architecture": arch, "params": params, "width": 32, "seed": s,
                 "path": str(tmp_path / out / f"{arch}-seed{s}"), "run_id": None}
                for arch, params in [("topk", {"k": 4}), ("relu_l1", {"l1_coefficient": 0.1})] for s in seeds]
        return train_saes(jobs, manifest, "layers.0.mlp", settings(data_seed=data_seed), torch.device("cpu"))

    first = run("a", [0, 1])
    run("b", [0])
    other_order = run("c", [0], data_seed=1)
    for arch in ("topk", "relu_l1"):
        w0 = load_file(str(tmp_path / "a" / f"{arch}-seed0" / "sae.safetensors"))
        w0_again = load_file(str(tmp_path / "b" / f"{arch}-seed0" / "sae.safetensors"))
        w1 = load_file(str(tmp_path / "a" / f"{arch}-seed1" / "sae.safetensors"))
        for key in w0:
            assert torch.equal(w0[key], w0_again[key]), (arch, key)
        assert not torch.equal(w0["encoder.weight"], w1["encoder.weight"])
        digests = {r["data_digest"] for r in first if r["job"]["architecture"] == arch}
        assert len(digests) == 1  # both init seeds saw byte-identical batches
        assert digests != {r["data_digest"] for r in other_order if r["job"]["architecture"] == arch}
    for r in first:
        m = r["metrics"]
        assert 0 <= m["dead_fraction"] <= 1 and m["l0"] > 0 and 0 < m["fvu"] < 1.5
    assert load_sae_weights(tmp_path / "a" / "topk-seed0").encoder.shape == (32, 32)


def test_relu_l1_saved_weights_act_on_raw_activations(tmp_path):
    """The input scale used in training is folded into the saved weights: same latents on raw inputs."""
    x, _ = planted_data(2048)
    manifest = write_manifest(tmp_path / "acts", x * 5.0)
    job = {"configuration": "c", "architecture": "relu_l1", "params": {"l1_coefficient": 0.1}, "width": 32,
           "seed": 0, "path": str(tmp_path / "sae"), "run_id": None}
    [res] = train_saes([job], manifest, "layers.0.mlp", settings(), torch.device("cpu"))
    sae = ARCHITECTURES["relu_l1"](32, 32, ARCHITECTURES["relu_l1"].Params(l1_coefficient=0.1))
    sae.load_state_dict(load_file(str(tmp_path / "sae" / "sae.safetensors")))
    raw = torch.from_numpy(held_out(x) * 5.0)
    fvu = sae(raw).fvu.item()
    assert fvu == pytest.approx(res["metrics"]["fvu"], rel=1e-3)


def test_topk_seeds_share_the_planted_latents():
    """Two init seeds on planted data: the planted directions are what both learn, so they are shared."""
    from actors.compare.matching import match_pair

    x, dirs = planted_data(64 * 256)
    saes = []
    for seed in (0, 1):
        t = build_trainer({"architecture": "topk", "params": {"k": 3}, "width": 96, "seed": seed}, 32, 1500,
                          settings(lr=2e-3), torch.device("cpu"))
        rng = np.random.default_rng(1)
        for _ in range(1500):
            t.step(torch.from_numpy(x[rng.integers(0, len(x), 256)]))
        saes.append(t.sae)
    a, b = (
        (s.encoder.weight.detach(), s.W_dec.detach()) for s in saes
    )
    m = match_pair(a[0], a[1], b[0], b[1])
    planted_fraction = len(dirs) / 96
    assert m.statistics()["shared_fraction"] >= 0.8 * planted_fraction
    # The shared latents of A are the ones that learned a planted direction.
    learned = (np.abs(dirs @ torch.nn.functional.normalize(a[1], dim=1).numpy().T).max(0) > 0.9)
    assert (m.shared & ~learned).sum() <= 2


def test_firing_frequency_is_saved_and_matches_l0(tmp_path):
    from actors.store.checkpoint import load_firing_frequency

    x, _ = planted_data(2048)
    manifest = write_manifest(tmp_path / "acts", x)
    job = {"configuration": "c", "architecture": "topk", "params": {"k": 4}, "width": 32, "seed": 0,
           "path": str(tmp_path / "sae"), "run_id": None}
    [res] = train_saes([job], manifest, "layers.0.mlp", settings(), torch.device("cpu"))
    freq = load_firing_frequency(tmp_path / "sae")
    assert freq.shape == (32,) and np.all((freq >= 0) & (freq <= 1))
    # Mean latents active per token (L0) is the sum of the per-latent firing frequencies.
    assert freq.sum() == pytest.approx(res["metrics"]["l0"], rel=1e-4)


def test_intermediate_checkpoints_act_on_raw_inputs_and_leave_training_unchanged(tmp_path):
    x, _ = planted_data(4096)
    manifest = write_manifest(tmp_path / "acts", x)
    archs = [("topk", {"k": 4}), ("relu_l1", {"l1_coefficient": 0.1})]

    def run(out, checkpoint_tokens):
        jobs = [{"configuration": "c", "architecture": arch, "params": params, "width": 32, "seed": 0,
                 "path": str(tmp_path / out / arch / "layers.0.mlp"), "run_id": None} for arch, params in archs]
        train_saes(jobs, manifest, "layers.0.mlp", settings(checkpoint_tokens=checkpoint_tokens), torch.device("cpu"))
        return jobs

    plain = run("plain", [])
    with_checkpoints = run("ckpt", [1000, 2048])
    raw = [torch.from_numpy(held_out(x))]  # the evaluation rows, unscaled
    for (arch, params), job, ref in zip(archs, with_checkpoints, plain):
        final = load_file(str(tmp_path / "ckpt" / arch / "layers.0.mlp" / "sae.safetensors"))
        # Saving checkpoints (a folded copy for relu_l1) must not disturb training.
        for key, value in load_file(str(tmp_path / "plain" / arch / "layers.0.mlp" / "sae.safetensors")).items():
            assert torch.equal(final[key], value), (arch, key)
        # Each checkpoint is taken at the first batch boundary (256 tokens) reaching its token count.
        for requested, tokens in [(1000, 1024), (2048, 2048)]:
            folder = checkpoint_folder(job["path"], requested)
            assert folder == tmp_path / "ckpt" / arch / "checkpoints" / f"tokens{requested}" / "layers.0.mlp"
            cfg = json.loads((folder / "cfg.json").read_text())
            metrics = json.loads((folder / "metrics.json").read_text())
            assert cfg["tokens"] == metrics["train_tokens"] == tokens
            sae = ARCHITECTURES[arch](x.shape[1], 32, ARCHITECTURES[arch].Params.model_validate(params))
            sae.load_state_dict(load_file(str(folder / "sae.safetensors")))
            # The saved weights act on raw activations with the FVU measured (on scaled ones) during training.
            assert evaluate(sae, raw)[0]["fvu"] == pytest.approx(metrics["fvu"], rel=1e-4, abs=1e-6)
            weights = load_file(str(folder / "sae.safetensors"))
            assert not torch.equal(weights["encoder.weight"], final["encoder.weight"])


def test_dead_fraction_counts_the_latents_that_never_fired_in_the_saved_frequencies(tmp_path):
    """One definition of dead (`dead_latents`): fired on none of the evaluation tokens. The metric agrees with the
    saved firing frequencies (the log-density figure's data), whatever the training-time window for AuxK says."""
    from actors.store.checkpoint import load_firing_frequency

    x, _ = planted_data(2048)
    manifest = write_manifest(tmp_path / "acts", x)
    job = {"configuration": "c", "architecture": "topk", "params": {"k": 1}, "width": 256, "seed": 0,
           "path": str(tmp_path / "sae"), "run_id": None}
    # A one-batch window: latents idle in the last batch but firing elsewhere in the evaluation set.
    [res] = train_saes([job], manifest, "layers.0.mlp", settings(dead_window_tokens=256), torch.device("cpu"))
    freq = load_firing_frequency(tmp_path / "sae")
    assert 0 < (freq == 0).sum() < freq.size
    assert res["metrics"]["dead_fraction"] * freq.size == pytest.approx((freq == 0).sum())
