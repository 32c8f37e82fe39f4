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

An export ends with `checksums.json` (written_by "sae-seeds export"), which also marks the folder as an export:
`overwrite` replaces only such a folder, and only if it holds nothing but the files it lists, so that no export
deletes the SAE it reads or files of the user's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from .checkpoint import (CHECKSUMS, CONFIG, EXPORTED_CFG, SAELENS_WEIGHTS, WEIGHTS, WRITTEN_BY_EXPORT, SAEFolderError,
                         load_sae, load_sae_cfg, read_checksums, replace_folder, save_safetensors, temporary_folder,
                         write_checksums)

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
    check_export_target(folder, out_dir, overwrite)
    sae, cfg = load_sae(folder), load_sae_cfg(folder)
    written = _WRITERS[layout](sae, cfg)
    if written is None:
        able = [name for name, writer in _WRITERS.items() if writer(sae, cfg) is not None]
        raise ExportError(f"{sae.name} SAEs cannot be written faithfully in the {layout} layout (its SAE would "
                          f"encode differently); layouts that can hold them: {', '.join(able) or 'none'}")
    weights_name, tensors, out_cfg = written
    tmp = temporary_folder(out_dir)
    try:
        save_safetensors(tensors, tmp / weights_name)
        (tmp / CONFIG).write_text(json.dumps(out_cfg | {EXPORTED_CFG: cfg}, indent=2, sort_keys=True))
        write_checksums(tmp, WRITTEN_BY_EXPORT, layout=layout, source=str(folder.resolve()))
        check_export_target(folder, out_dir, overwrite)  # nothing appeared there meanwhile
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the write failed
    return out_dir


def check_export_target(source: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse an `out_dir` whose replacement would delete data the export did not write: the source SAE folder,
    a folder containing it or inside it, or an existing folder that is not an earlier export (one whose
    checksums.json says "sae-seeds export" and that holds nothing else). An empty folder is fine."""
    src, out = source.resolve(), out_dir.resolve()
    if out == src or out in src.parents:
        raise ExportError(f"--out {out_dir}: {'is' if out == src else 'contains'} the SAE folder being exported "
                          f"({source}); replacing it would delete the source: choose a new folder")
    if src in out.parents:
        raise ExportError(f"--out {out_dir}: inside the SAE folder being exported ({source}); choose a folder "
                          "outside it")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"--out {out_dir}: exists and is not a folder; choose a new folder")
    present = sorted(p.name for p in out_dir.iterdir())
    if not present:
        return
    if not overwrite:
        raise FileExistsError(f"--out {out_dir} exists; choose a new folder, or --force to replace an earlier "
                              "export there")
    try:
        record = read_checksums(out_dir)
    except SAEFolderError:
        record = None
    if record is None or record.get("written_by") != WRITTEN_BY_EXPORT:
        raise ExportError(f"--out {out_dir}: not an earlier export (no {CHECKSUMS} written by sae-seeds export), so "
                          f"--force will not replace it (it holds {_listing(present)}); choose a new folder")
    others = [name for name in present if name not in record["files"] and name != CHECKSUMS]
    if others:
        raise ExportError(f"--out {out_dir}: an earlier export, but it also holds {_listing(others)}, which the "
                          "export did not write; --force will not delete them: move them or choose a new folder")


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
