"""Export an SAE folder to the layouts EleutherAI sparsify and SAELens load.

sparsify (`SparseCoder.load_from_disk`): `sae.safetensors` with encoder.weight [n, d], encoder.bias [n], W_dec
[n, d], b_dec [d] (this project's names already), and `cfg.json` with `SparseCoderConfig`'s keys plus d_in.

SAELens >= 6 (`SAE.load_from_disk`): `sae_weights.safetensors` with W_enc [d, n], b_enc [n] (Gated: b_gate),
W_dec [n, d], b_dec [d] and any tensors its architecture adds (JumpReLU's `threshold` [n], Gated's r_mag, b_mag),
and `cfg.json` in its 6.x format: d_in, d_sae, dtype, architecture and that architecture's options, and a
`metadata` object.

Each architecture declares how a library can compute exactly its latents (`SparseAutoencoder.sparsify_cfg`,
`saelens_cfg`); one that declares nothing for a layout is refused with an error, not written approximately. Saved
folders already act on raw activations (input normalisation is folded in at save), so neither export asks the
library to normalise. Both cfg.json files keep this project's cfg under "sae_seeds" (both libraries ignore keys
they do not know), which lets `checkpoint.load_sae` read an export back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import (CONFIG, EXPORTED_CFG, SAELENS_WEIGHTS, WEIGHTS, load_sae, load_sae_cfg, replace_folder,
                         temporary_folder)

LAYOUTS = ("sparsify", "saelens")
# The cfg format the SAELens export follows; SAELens reads cfgs that claim an older version through a legacy path.
SAELENS_FORMAT_VERSION = "6.0.0"


class ExportError(ValueError):
    """The SAE cannot be written in the requested layout."""


def _sparsify(sae, cfg: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
    keys = sae.sparsify_cfg()
    if keys is None:
        return None
    tensors = {"encoder.weight": sae.encoder.weight, "encoder.bias": sae.encoder.bias,
               "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    # expansion_factor is an int there and unused once num_latents is set; written only so the cfg is well-typed.
    out = {"d_in": sae.d_in, "num_latents": sae.num_latents, "expansion_factor": max(1, sae.num_latents // sae.d_in),
           "multi_topk": False, "skip_connection": False, "transcode": False, **keys}
    return WEIGHTS, tensors, out


def _saelens(sae, cfg: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
    spec = sae.saelens_cfg()
    if spec is None:
        return None
    keys, extra = spec
    tensors = {"W_enc": sae.encoder.weight.T, "b_enc": sae.encoder.bias, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
               **extra}
    # An architecture drops a tensor its SAELens class does not have (Gated: b_gate instead of b_enc) by mapping it
    # to None: SAELens loads state dicts strictly, so an extra tensor would fail the load.
    tensors = {k: v for k, v in tensors.items() if v is not None}
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None}
    if cfg.get("hookpoint"):
        metadata["hf_hook_name"] = cfg["hookpoint"]  # a Hugging Face module name, not a TransformerLens hook
    out = {"d_in": sae.d_in, "d_sae": sae.num_latents, "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": metadata, **keys}
    return SAELENS_WEIGHTS, tensors, out


_WRITERS = {"sparsify": _sparsify, "saelens": _saelens}


def export_sae(folder: str | Path, layout: str, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the SAE in `folder` to `out_dir` in `layout` ("sparsify" or "saelens"); returns `out_dir`.

    The folder appears complete or not at all (written beside it, then renamed). An existing `out_dir` is replaced
    only with `overwrite`.
    """
    if layout not in _WRITERS:
        raise ExportError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    folder, out_dir = Path(folder), Path(out_dir)
    if out_dir.resolve() == folder.resolve():
        raise ExportError(f"{out_dir}: the export would replace the SAE folder it reads")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another folder or overwrite it")
    sae, cfg = load_sae(folder), load_sae_cfg(folder)
    written = _WRITERS[layout](sae, cfg)
    if written is None:
        able = [name for name, writer in _WRITERS.items() if writer(sae, cfg) is not None]
        raise ExportError(f"{sae.name} SAEs cannot be written faithfully in the {layout} layout (its SAE would "
                          f"encode differently); layouts that can hold them: {', '.join(able) or 'none'}")
    weights_name, tensors, out_cfg = written
    tmp = temporary_folder(out_dir)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / weights_name))
        (tmp / CONFIG).write_text(json.dumps(out_cfg | {EXPORTED_CFG: cfg}, indent=2, sort_keys=True))
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the write failed
    return out_dir
