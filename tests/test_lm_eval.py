"""LM loss with an SAE spliced in, on a real (locally built) transformers model: checked with SAEs whose
reconstruction is known exactly (the identity, and zero)."""

import math

import pytest
import torch

from actors.train.lm_eval import spliced_lm_metrics
from actors.generate.models import build_local_model, load_model
from actors.sae import ARCHITECTURES

BUILD = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 64}
HOOKPOINT = "gpt_neox.layers.0.mlp"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = build_local_model(BUILD, 0, tmp_path_factory.mktemp("model"))
    return load_model(str(folder), None, "float32", False, "cpu")


def relu_sae(d: int, decoder_sign: float) -> torch.nn.Module:
    """Latents relu(x) and relu(-x); decoder +-I: the identity (sign 1) or, with sign 0, the zero map."""
    arch = ARCHITECTURES["relu_l1"]
    sae = arch(d, 2 * d, arch.Params(l1_coefficient=1.0))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(decoder_sign * torch.cat([eye, -eye]))
    return sae


def test_identity_recovers_everything_and_zero_nothing(model):
    input_ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(input_ids).logits
    identity, zero = spliced_lm_metrics(model, HOOKPOINT, [relu_sae(32, 1.0), relu_sae(32, 0.0)], input_ids,
                                        batch_size=3)
    assert identity["ce_clean"] == zero["ce_clean"] and math.isfinite(identity["ce_clean"])
    assert identity["ce_zero_ablated"] != pytest.approx(identity["ce_clean"], abs=1e-4)  # the MLP matters
    assert identity["ce_spliced"] == pytest.approx(identity["ce_clean"], abs=1e-5)
    assert identity["ce_delta"] == pytest.approx(0.0, abs=1e-5)
    assert identity["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert zero["ce_spliced"] == pytest.approx(zero["ce_zero_ablated"], abs=1e-6)
    assert zero["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    with torch.inference_mode():  # the hooks are gone
        assert torch.equal(model(input_ids).logits, before)
