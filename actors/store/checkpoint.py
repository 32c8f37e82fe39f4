"""SAE folders on disk: `sae.safetensors` + `cfg.json`, the layout EleutherAI sparsify writes.

Reading accepts this project's and sparsify's tensor names, and SAELens' (`W_enc` [d, n]). Weights come from
safetensors only: nothing is unpickled. Writes go to a temporary folder that is renamed into place, so an
interrupted save never leaves a folder that looks complete. `load_sae` rebuilds the SAE module itself, from this
project's folders and from their exports (actors/store/export.py).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
METRICS = "metrics.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
FREQUENCY = "firing_frequency.safetensors"  # per-latent firing frequency over the evaluation set
EXPORTED_CFG = "sae_seeds"  # key under which an export's cfg.json keeps this project's cfg


@dataclass
class SAEWeights:
    """The directions matching needs, as float32 [n_latents, d_in] tensors, plus the folder's cfg."""

    encoder: torch.Tensor
    decoder: torch.Tensor
    cfg: dict[str, Any]


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_parquet_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def save_sae_folder(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
                    metrics: dict[str, Any] | None = None, firing_frequency: torch.Tensor | None = None) -> None:
    folder = Path(folder)
    tmp = temporary_folder(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if firing_frequency is not None:
        save_file({"firing_frequency": firing_frequency.detach().cpu().float()}, str(tmp / FREQUENCY))
    if metrics is not None:
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    replace_folder(tmp, folder)


def temporary_folder(folder: Path) -> Path:
    """An empty hidden sibling of `folder` to write into before `replace_folder` renames it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    return tmp


def replace_folder(tmp: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def checkpoint_folder(sae_folder: str | Path, tokens: int) -> Path:
    """Where the intermediate SAE saved after `tokens` training tokens lives, beside the run's final folders:
    `<run>/checkpoints/tokens<N>/<hookpoint>` for the final `<run>/<hookpoint>` (a sparsify-style run folder)."""
    sae_folder = Path(sae_folder)
    return sae_folder.parent / "checkpoints" / f"tokens{tokens}" / sae_folder.name


def is_trained(path: str | Path, expected_hash: str | None, checkpoint_tokens: list[int] = ()) -> bool:
    """Complete (metrics written last, intermediate checkpoints too) and trained with the settings whose train hash
    is `expected_hash`."""
    folder = Path(path)
    if not all((f / METRICS).is_file() for f in [folder, *(checkpoint_folder(folder, n) for n in checkpoint_tokens)]):
        return False
    return json.loads((folder / CONFIG).read_text()).get("train_hash") == expected_hash


def _weights_path(folder: Path) -> Path:
    # sparsify and this project write sae.safetensors; SAELens writes sae_weights.safetensors.
    weights_path = next((folder / n for n in (WEIGHTS, SAELENS_WEIGHTS) if (folder / n).is_file()), None)
    if weights_path is None:
        raise FileNotFoundError(f"{folder} is not an SAE folder: no {WEIGHTS} or {SAELENS_WEIGHTS}")
    return weights_path


def load_sae_cfg(folder: str | Path) -> dict[str, Any]:
    """This project's cfg of an SAE folder: its cfg.json, or the copy an export keeps inside its own."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an SAE folder: no {CONFIG}")
    cfg = json.loads(path.read_text())
    if EXPORTED_CFG in cfg:
        return cfg[EXPORTED_CFG]
    if "architecture" not in cfg and cfg.get("activation", "topk") == "topk" and cfg.get("k") \
            and not (cfg.get("transcode") or cfg.get("skip_connection")):
        # Trained by sparsify itself: a TopK SAE that computes what this project's does. Its width is num_latents,
        # or d_in x expansion_factor (default 32) when num_latents is 0.
        width = cfg.get("num_latents") or cfg["d_in"] * cfg.get("expansion_factor", 32)
        cfg = cfg | {"architecture": "topk", "params": {"k": cfg["k"]}, "num_latents": int(width)}
    return cfg


def load_sae(folder: str | Path):
    """The SAE module a folder holds (this project's, an export of one, or a plain sparsify TopK SAE), in eval
    mode and on the CPU."""
    from ..sae import ARCHITECTURES

    folder = Path(folder)
    cfg = load_sae_cfg(folder)
    arch = ARCHITECTURES.get(cfg.get("architecture"))
    if arch is None:
        raise ValueError(f"{folder / CONFIG}: architecture {cfg.get('architecture')!r} is not one of "
                         f"{sorted(ARCHITECTURES)}")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        sae = arch(cfg["d_in"], cfg["num_latents"], arch.Params.model_validate(cfg["params"]))
    tensors = load_file(str(_weights_path(folder)))
    if "W_enc" in tensors:  # SAELens names
        tensors["encoder.weight"] = tensors.pop("W_enc").T.contiguous()
        if "b_enc" in tensors:  # SAELens' Gated SAE has b_gate instead; its load_exported_state renames that
            tensors["encoder.bias"] = tensors.pop("b_enc")
    try:
        sae.load_exported_state(tensors)
    except RuntimeError as err:  # load_state_dict's message lists the missing, unexpected and mis-shaped tensors
        raise ValueError(f"{folder}: weights do not fit a {arch.name} SAE: {err}") from None
    return sae.eval()


def load_sae_weights(folder: str | Path) -> SAEWeights:
    folder = Path(folder)
    cfg_path = folder / CONFIG
    weights_path = _weights_path(folder)
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    t = load_file(str(weights_path))
    if "encoder.weight" in t:  # this project and sparsify
        encoder = t["encoder.weight"]
    elif "W_enc" in t:  # SAELens stores the encoder as [d_in, n]
        encoder = t["W_enc"].T
    else:
        raise KeyError(f"{weights_path}: no encoder tensor (expected 'encoder.weight' or 'W_enc'); has {sorted(t)}")
    if "W_dec" not in t:
        raise KeyError(f"{weights_path}: no decoder tensor 'W_dec'; has {sorted(t)}")
    decoder = t["W_dec"]
    if encoder.shape != decoder.shape:
        raise ValueError(f"{weights_path}: encoder {tuple(encoder.shape)} and decoder {tuple(decoder.shape)} disagree")
    return SAEWeights(encoder=encoder.float(), decoder=decoder.float(), cfg=cfg)


def dead_latents(frequency):
    """The one definition of a dead latent, used by every metric, table and figure: it fired on none of the
    evaluation tokens (its entry in `firing_frequency.safetensors` is 0). A boolean mask, numpy or torch alike.

    (Training also tracks latents idle for `dead_window_tokens`, which AuxK-style losses revive; that is a
    training mechanism, not a reported number.)"""
    return frequency <= 0


def load_firing_frequency(folder: str | Path):
    """Per-latent firing frequency measured after training (numpy float32), or None if not recorded."""
    path = Path(folder) / FREQUENCY
    if not path.is_file():
        return None
    return load_file(str(path))["firing_frequency"].numpy()
