"""SAE folders on disk: `sae.safetensors` + `cfg.json`, the layout EleutherAI sparsify writes.

Reading accepts this project's and sparsify's tensor names, and SAELens' (`W_enc` [d, n]). Weights come from
safetensors only: nothing is unpickled. Writes go to a temporary folder that is renamed into place, so an
interrupted save never leaves a folder that looks complete.
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


def save_sae_folder(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
                    metrics: dict[str, Any] | None = None, firing_frequency: torch.Tensor | None = None) -> None:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if firing_frequency is not None:
        save_file({"firing_frequency": firing_frequency.detach().cpu().float()}, str(tmp / FREQUENCY))
    if metrics is not None:
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
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


def load_sae_weights(folder: str | Path) -> SAEWeights:
    folder = Path(folder)
    cfg_path = folder / CONFIG
    # sparsify and this project write sae.safetensors; SAELens writes sae_weights.safetensors.
    weights_path = next((folder / n for n in (WEIGHTS, SAELENS_WEIGHTS) if (folder / n).is_file()), None)
    if weights_path is None:
        raise FileNotFoundError(f"{folder} is not an SAE folder: no {WEIGHTS} or {SAELENS_WEIGHTS}")
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


def load_sae(folder: str | Path):
    """The trained SAE module of a folder this project wrote, in eval mode, acting on raw activations: cfg.json
    names the architecture and its hyper-parameters, sae.safetensors holds every tensor it needs (thresholds,
    r_mag, ...); a missing or unexpected tensor is an error."""
    from .sae import ARCHITECTURES  # the registry imports torch modules only this loader needs

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("architecture") not in ARCHITECTURES:
        raise ValueError(f"{folder}: cfg.json names no registered architecture ({cfg.get('architecture')!r}); "
                         f"load_sae_weights reads the directions of other projects' SAEs")
    arch = ARCHITECTURES[cfg["architecture"]]
    sae = arch(cfg["d_in"], cfg["num_latents"], arch.Params.model_validate(cfg["params"]))
    sae.load_state_dict(load_file(str(folder / WEIGHTS)))
    return sae.eval()


def load_firing_frequency(folder: str | Path):
    """Per-latent firing frequency measured after training (numpy float32), or None if not recorded."""
    path = Path(folder) / FREQUENCY
    if not path.is_file():
        return None
    return load_file(str(path))["firing_frequency"].numpy()
