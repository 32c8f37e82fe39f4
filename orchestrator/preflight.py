"""Checks that need no Ray: everything about the inputs that can be known before the cluster starts.

`preflight(cfg)` runs in seconds on the driver, before Ray and MLflow start, and raises `PreflightError` (exit
code 2) naming the config field or file and what to do. It checks: the model (a local folder with a config and
safetensors weights, or a Hub id), the hookpoints against the model's module tree on the meta device, `ctx_len`
against the model's positions, and the dataset (files exist, the first record has the text column). Token budgets
(num_tokens against ctx_len, batch size and checkpoints) are config validation and were checked on loading.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from actors.generate.corpus import load_documents
from actors.generate.models import (build_config, load_tokenizer, resolve_hookpoints, skeleton_from_config,
                                    skeleton_model)

from .config import ConfigError, ExperimentConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PreflightError(ConfigError):
    """An input that cannot work, found before Ray starts; the message names the field or file."""


def preflight(cfg: ExperimentConfig) -> None:
    model = _check_model(cfg)
    try:
        resolve_hookpoints(model, cfg.generate.hookpoints)
    except ValueError as err:
        raise PreflightError(f"generate.hookpoints: {err}") from None
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.generate.ctx_len > positions:
        raise PreflightError(f"generate.ctx_len ({cfg.generate.ctx_len}) is longer than the model's "
                             f"max_position_embeddings ({positions}); lower generate.ctx_len")
    _check_dataset(cfg)


def _check_model(cfg: ExperimentConfig):
    """The model's module tree on the meta device, after checking that its weights can be loaded safely."""
    m = cfg.model
    if m.build is not None:  # built locally from the config: nothing to find
        try:
            return skeleton_from_config(build_config(m.build))
        except (ValueError, TypeError, KeyError) as err:
            raise PreflightError(f"model.build: transformers cannot build this model: {err}") from None
    folder = Path(m.name).expanduser()
    if folder.exists():
        _check_local_folder(folder)
        try:
            load_tokenizer(str(folder), None, m.trust_remote_code)
        except (OSError, ValueError) as err:
            raise PreflightError(f"model.name: no usable tokenizer in {folder}: {err}") from None
    elif not _is_hub_id(m.name):
        raise PreflightError(f"model.name: {m.name!r} is neither an existing local folder nor a Hugging Face Hub id "
                             "('name' or 'namespace/name'); check the path")
    try:
        return skeleton_model(m.name, m.revision, m.trust_remote_code)
    except (OSError, ValueError) as err:  # transformers: no such repo or revision, offline, no config.json
        raise PreflightError(f"model.name: cannot read the model config of {m.name!r} "
                             f"(revision {m.revision or 'default'}): {_first_line(err)}") from None


def _check_local_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise PreflightError(f"model.name: {folder} is a file; give a model folder (config.json + *.safetensors) "
                             "or a Hub id")
    if not (folder / "config.json").is_file():
        raise PreflightError(f"model.name: {folder} has no config.json, so it is not a transformers model folder")
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise PreflightError(
            f"model.name: {folder} has only pickled weights ({', '.join(pickled[:3])}); sae-seeds loads safetensors "
            "only and never unpickles. Convert them once where you trust the file (transformers: "
            "from_pretrained(...).save_pretrained(out, safe_serialization=True)) and point model.name at the result")
    raise PreflightError(f"model.name: {folder} has no *.safetensors weights")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_dataset(cfg: ExperimentConfig) -> None:
    d = cfg.dataset
    if d.kind == "synthetic":
        return
    if d.kind == "files" and "://" not in d.path:
        if not glob.glob(os.path.expanduser(d.path), recursive=True):
            raise PreflightError(f"dataset.path: no file matches {d.path!r}")
    try:
        first = next(iter(load_documents(d).take(1)), None)
    except Exception as err:  # datasets raises many types (not found, bad JSON, bad Parquet, network)
        raise PreflightError(f"dataset.path: cannot read {d.path!r}: {type(err).__name__}: {_first_line(err)}") \
            from None
    if first is None:
        raise PreflightError(f"dataset.path: {d.path!r} holds no records (split {d.split!r})")
    if d.text_column not in first:
        raise PreflightError(f"dataset.text_column: {d.text_column!r} is not a column of {d.path!r}; its columns: "
                             f"{sorted(first)}")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
