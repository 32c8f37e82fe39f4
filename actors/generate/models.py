"""Loading the language model whose activations we record: from the Hub, a local folder, or built locally.

A locally built model (config `model.build`) is created from a transformers config with a fixed seed together
with a byte-level tokenizer, then saved as a normal Hugging Face folder (safetensors), so every actor loads it
through the same `from_pretrained` path as a Hub model.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

EOS = "<|endoftext|>"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def byte_level_tokenizer():
    """256 byte tokens plus EOS; no merges, so it needs no training data and is identical everywhere."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # Split into words as GPT-2 does: the tokens are the same bytes either way (no merges), but the BPE word cache
    # then holds short words; unsplit, every document was one cached "word" (up to ~120 MB of cache per process).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def build_config(build: dict, tokenizer=None):
    """The transformers config of a locally built model (`model.build`), sized to the byte-level tokenizer."""
    from transformers import AutoConfig

    tokenizer = tokenizer or byte_level_tokenizer()
    kwargs = dict(build)
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    return AutoConfig.for_model(model_type, **kwargs)


def build_local_model(build: dict, init_seed: int, folder: Path) -> Path:
    """Create (once) a randomly initialised model + tokenizer folder; returns the folder."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    tokenizer = byte_level_tokenizer()
    config = build_config(build, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModelForCausalLM.from_config(config)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process got there first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(name_or_path: str, revision: str | None, dtype: str, trust_remote_code: bool, device: str,
               device_map: str | dict | None = None, random_init_seed: int | None = None):
    """A causal LM in eval mode, from safetensors only; `device_map` (e.g. "auto") spreads a model too large for
    one GPU over several (through accelerate), otherwise the whole model goes to `device`. `random_init_seed`:
    the random-model control, weights re-initialised after loading (`reinitialise`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, revision=revision, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
        use_safetensors=True, device_map=device_map,
    )
    model = model if device_map is not None else model.to(device)
    if random_init_seed is not None:
        reinitialise(model, random_init_seed)
    return model.eval()


def reinitialise(model, seed: int) -> None:
    """Re-draw every weight with the model class's own transformers init (`init_weights`: `_init_weights` per
    module, then weight tying) under torch seed `seed`: the random-transformer baseline of a trained model (Heap et
    al. 2025). transformers marks loaded tensors as initialised and its init functions skip those, so the marks are
    cleared first. Deterministic for a given seed, model and device."""
    for module in model.modules():
        if getattr(module, "_is_hf_initialized", False):
            module._is_hf_initialized = False
    for tensor in [*model.parameters(), *model.buffers()]:
        if getattr(tensor, "_is_hf_initialized", False):
            tensor._is_hf_initialized = False
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        model.init_weights()


def load_tokenizer(name_or_path: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def skeleton_model(name_or_path: str, revision: str | None, trust_remote_code: bool) -> nn.Module:
    """The model's module tree on the meta device: no weights loaded, so hookpoints are checked in a second."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return skeleton_from_config(config, trust_remote_code)


def skeleton_from_config(config, trust_remote_code: bool = False) -> nn.Module:
    """The module tree a transformers config describes, on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def resolve_hookpoints(model: nn.Module, patterns: list[str]) -> list[str]:
    """Module names matching each pattern; a pattern matches a full name or a dotted suffix ('layers.1.mlp')."""
    names = [n for n, _ in model.named_modules() if n]
    resolved: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, "*." + pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3)
            raise ValueError(f"hookpoint {pattern!r} matches no module; closest module names: {close}")
        resolved += [h for h in hits if h not in resolved]
    return resolved
