"""SAE folders on disk: `sae.safetensors` + `cfg.json`, the layout EleutherAI sparsify writes.

Reading accepts this project's and sparsify's tensor names, and SAELens' (`W_enc` [d, n]). Weights come from
safetensors only: nothing is unpickled. Writes go to a temporary folder that is renamed into place, so an
interrupted save never leaves a folder that looks complete. `load_sae` rebuilds the SAE module itself, from this
project's folders and from their exports (actors/store/export.py).

Every folder this project writes (an SAE, an intermediate checkpoint, an export) ends with `checksums.json`: the
sha256 of each of its files. Reading verifies them where present, and refuses unreadable files and non-finite or
all-zero weights with a `SAEFolderError` naming the file; the train stage retrains a folder whose checksums fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
METRICS = "metrics.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
FREQUENCY = "firing_frequency.safetensors"  # per-latent firing frequency over the evaluation set
EXPORTED_CFG = "sae_seeds"  # key under which an export's cfg.json keeps this project's cfg
CHECKSUMS = "checksums.json"  # {"written_by": ..., "files": {name: sha256}}, the last file of a folder written
WRITTEN_BY_TRAINING = "sae-seeds train"
WRITTEN_BY_EXPORT = "sae-seeds export"
_ENCODER_NAMES, _DECODER_NAMES = ("encoder.weight", "W_enc"), ("W_dec",)


class SAEFolderError(ValueError):
    """An SAE folder that cannot be used as it is: a missing, damaged or unreadable file, or unusable weights. Bad
    input, not a bug: the message names the file and what to do. `problem` is the message without the advice."""

    def __init__(self, problem: str, remedy: str | None = None):
        super().__init__(f"{problem}; {remedy}" if remedy else problem)
        self.problem = problem


@dataclass
class SAEWeights:
    """The directions matching needs, as float32 [n_latents, d_in] tensors, plus the folder's cfg."""

    encoder: torch.Tensor
    decoder: torch.Tensor
    cfg: dict[str, Any]


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file (0o666 less the umask). safetensors writes its files
    0600, which locks other users of a shared output folder out."""
    try:  # Linux reports the umask without changing it, which os.umask cannot do (and is racy across threads)
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, file_mode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path, written_by: str, **extra: Any) -> None:
    """Record the sha256 of every file in `folder` (a temporary folder about to be renamed into place)."""
    files = {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (Path(folder) / CHECKSUMS).write_text(json.dumps({"written_by": written_by, "files": files, **extra},
                                                     indent=2, sort_keys=True))


def read_checksums(folder: Path) -> dict[str, Any] | None:
    """The folder's checksums record, or None if it has none (a folder from another library or older version)."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise SAEFolderError(f"{path}: not a checksums record (no 'files' object)", _remedy(None))
    return record


def _remedy(record: dict | None) -> str:
    if record is not None and record.get("written_by") == WRITTEN_BY_EXPORT:
        return "export the SAE again (sae-seeds export ... --force)"
    return ("re-run the experiment that trained it (same config and --output): it retrains damaged SAE folders"
            if record is not None else "the folder is damaged or was not written completely")


def verify_checksums(folder: Path, required: bool = False) -> dict[str, Any] | None:
    """Check every file the folder's checksums record lists (present, same sha256); returns the record.
    `required`: a folder without a record is refused too."""
    folder = Path(folder)
    record = read_checksums(folder)
    if record is None:
        if required:
            raise SAEFolderError(f"{folder / CHECKSUMS}: missing, so the folder's files cannot be verified "
                                 "(written by an older sae-seeds, or damaged)")
        return None
    for name, expected in sorted(record["files"].items()):
        path = folder / name
        if not path.is_file():
            raise SAEFolderError(f"{path}: missing (listed in {CHECKSUMS})", _remedy(record))
        if sha256_file(path) != expected:
            raise SAEFolderError(f"{path}: does not match the sha256 recorded when it was written "
                                 "(corrupt or replaced)", _remedy(record))
    return record


def read_json(path: Path) -> Any:
    """A JSON file, or a `SAEFolderError` naming it and where it is invalid."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise SAEFolderError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})",
                             _remedy(None)) from None
    except UnicodeDecodeError:
        raise SAEFolderError(f"{path}: not valid JSON (not UTF-8 text)", _remedy(None)) from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, checked for use as SAE weights: readable (not truncated, empty or with a
    corrupt header), finite, and with an encoder and a decoder that are not all zeros."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        problem = str(err).removeprefix("Error while deserializing header: ")
        size = path.stat().st_size
        raise SAEFolderError(f"{path}: not a readable safetensors file ({problem}, {size} bytes): truncated, empty "
                             "or corrupt", _remedy(None)) from None
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise SAEFolderError(f"{path}: tensor {name!r} has {bad} non-finite (NaN or inf) values of {t.numel()}; "
                                 "such an SAE cannot be matched or exported (training diverged, or the file is "
                                 "damaged)")
    for name in (*_ENCODER_NAMES, *_DECODER_NAMES):
        if name in tensors and tensors[name].numel() and not bool(tensors[name].any()):
            raise SAEFolderError(f"{path}: tensor {name!r} is all zeros: every latent's direction is undefined, "
                                 "so this SAE cannot be matched or exported")
    return tensors


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
    try:
        save_safetensors(tensors, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if firing_frequency is not None:
            save_safetensors({"firing_frequency": firing_frequency.float()}, tmp / FREQUENCY)
        if metrics is not None:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        write_checksums(tmp, WRITTEN_BY_TRAINING)
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the write failed


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
    """Complete (metrics written, intermediate checkpoints too), intact (every file matches its recorded
    checksum) and trained with the settings whose train hash is `expected_hash`."""
    return training_state(path, expected_hash, checkpoint_tokens)[0]


def training_state(path: str | Path, expected_hash: str | None,
                   checkpoint_tokens: list[int] = ()) -> tuple[bool, list[tuple[Path, str]]]:
    """(reusable, damage): whether the SAE at `path` can be reused as it is, and what is damaged, as (folder,
    problem) per folder: a complete folder (one with metrics.json) whose files fail their checksums, or a checkpoint
    folder missing from an SAE that is otherwise complete. Folders never finished, or trained with other settings,
    are simply not reusable."""
    folder = Path(path)
    folders = [folder, *(checkpoint_folder(folder, n) for n in checkpoint_tokens)]
    damage = []
    for f in folders:
        if (f / METRICS).is_file():
            try:
                verify_checksums(f, required=True)
            except SAEFolderError as err:
                damage.append((f, err.problem))
        elif f != folder and (folder / METRICS).is_file():
            damage.append((f, f"{f}: missing (an intermediate checkpoint of a trained SAE)"))
    if damage or not all((f / METRICS).is_file() for f in folders):
        return False, damage
    try:
        return read_json(folder / CONFIG).get("train_hash") == expected_hash, damage
    except (SAEFolderError, AttributeError):  # listed in no checksums record yet unreadable: treat as damaged
        return False, [(folder, f"{folder / CONFIG}: not a valid SAE config")]


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
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise SAEFolderError(f"{path}: not an SAE config (a JSON object expected, found {type(cfg).__name__})")
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
    verify_checksums(folder)
    cfg = load_sae_cfg(folder)
    arch = ARCHITECTURES.get(cfg.get("architecture"))
    if arch is None:
        raise SAEFolderError(f"{folder / CONFIG}: architecture {cfg.get('architecture')!r} is not one of "
                         f"{sorted(ARCHITECTURES)}")
    try:
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
            sae = arch(cfg["d_in"], cfg["num_latents"], arch.Params.model_validate(cfg["params"]))
    except (KeyError, TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        raise SAEFolderError(f"{folder / CONFIG}: not a valid {arch.name} SAE config "
                             f"({type(err).__name__}: {err})") from None
    tensors = read_tensors(_weights_path(folder))
    if "W_enc" in tensors:  # SAELens names
        tensors["encoder.weight"] = tensors.pop("W_enc").T.contiguous()
        if "b_enc" in tensors:  # SAELens' Gated SAE has b_gate instead; its load_exported_state renames that
            tensors["encoder.bias"] = tensors.pop("b_enc")
    try:
        sae.load_exported_state(tensors)
    except RuntimeError as err:  # load_state_dict's message lists the missing, unexpected and mis-shaped tensors
        raise SAEFolderError(f"{folder}: weights do not fit a {arch.name} SAE: {err}") from None
    return sae.eval()


def load_sae_weights(folder: str | Path) -> SAEWeights:
    folder = Path(folder)
    verify_checksums(folder)
    cfg_path = folder / CONFIG
    weights_path = _weights_path(folder)
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    t = read_tensors(weights_path)
    if "encoder.weight" in t:  # this project and sparsify
        encoder = t["encoder.weight"]
    elif "W_enc" in t:  # SAELens stores the encoder as [d_in, n]
        encoder = t["W_enc"].T
    else:
        raise SAEFolderError(f"{weights_path}: no encoder tensor (expected 'encoder.weight' or 'W_enc'); "
                             f"has {sorted(t)}")
    if "W_dec" not in t:
        raise SAEFolderError(f"{weights_path}: no decoder tensor 'W_dec'; has {sorted(t)}")
    decoder = t["W_dec"]
    if encoder.shape != decoder.shape:
        raise SAEFolderError(f"{weights_path}: encoder {tuple(encoder.shape)} and decoder {tuple(decoder.shape)} "
                             "disagree")
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
