"""Config validation: every invalid case fails before Ray starts, naming the field."""

import pytest
import ray
import yaml

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config, parse_config

from .conftest import TINY

BASE = yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("override,expected", [
    ("sae.widths=[64,-8]", "widths must be positive"),
    ("sae.widths=[2]", "k=4 must be at most the width (2)"),
    ("sae.seeds=[]", "sae.seeds"),
    ("sae.architectures=[{name: magic}]",
     "allowed: ['batchtopk', 'gated', 'jumprelu', 'matryoshka', 'relu_l1', 'topk']"),
    ("sae.architectures=[{name: topk, kk: 3}]", "unknown hyper-parameter 'kk' for topk; allowed: ['auxk_alpha', 'k']"),
    ("sae.architectures=[{name: topk, k: 0}]", "architectures[0].k"),
    ("train.batch_size=many", "train.batch_size"),
    ("train.learning_rate=0.1", "train.learning_rate: Extra inputs are not permitted"),
    ("bogus=1", "bogus"),
    ("generate.dtype=int8", "generate.dtype"),
    ("compare.threshold=2", "compare.threshold"),
    ("dataset.kind=hub", "dataset.path is required"),
    ("train.checkpoint_tokens=[4096,1024]", "strictly increasing"),
    ("sae.architectures=[{name: relu_l1, l1_coefficient: 1, target_l0: 8}]", "give exactly one of l1_coefficient"),
    ("sae.architectures=[{name: relu_l1}]", "give l1_coefficient or target_l0"),
    ("sae.architectures=[{name: relu_l1, target_l0: 64}]", "target_l0=64.0 must be below the width (64)"),
    ("sae.architectures=[{name: relu_l1, target_l0: 0}]", "architectures[0].target_l0: Input should be greater than 0"),
    ("sae.architectures=[{name: relu_l1, target_l0: -4}]", "architectures[0].target_l0: Input should be greater than 0"),
    ("sae.architectures=[{name: topk, k: 4, target_l0: 4}]",
     "architectures[0].target_l0: topk has no L1 coefficient to calibrate to a target L0"),
    # tiny.yaml: one pass over 16,384 generated tokens unless train.tokens says otherwise.
    ("train.checkpoint_tokens=[1024,16384]", "checkpoint_tokens [16384] must be below the training budget of 14336"),
])
def test_invalid_config_names_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE, [override])
    assert expected in str(err.value)


def test_cli_rejects_bad_config_before_ray_starts(capsys, tmp_path, monkeypatch):
    def no_ray(*args, **kwargs):  # whatever other tests left running, this run must not reach Ray
        raise AssertionError("ray.init called for an invalid config")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    code = main(["run", str(TINY), "--set", "sae.widths=[0]", "--output", str(tmp_path)])
    assert code == 2
    assert "sae.widths" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_overrides_and_output(tmp_path):
    cfg = load_config(TINY, ["sae.widths=[32]", "train.data_seed=5", "model.build.hidden_size=16"], str(tmp_path))
    assert cfg.sae.widths == [32] and cfg.train.data_seed == 5 and cfg.model.build["hidden_size"] == 16
    assert cfg.output_path == tmp_path.resolve()
    assert cfg.content_hash() != load_config(TINY).content_hash()


def test_default_config_is_valid_and_large_enough():
    cfg = load_config()
    assert len(cfg.sae.architectures) >= 2 and len(cfg.sae.widths) >= 2 and len(cfg.sae.seeds) >= 3
    assert cfg.compare.threshold == 0.7 and cfg.model.trust_remote_code is False
