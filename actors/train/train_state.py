"""Training state on disk: what a restarted worker needs to continue exactly where a checkpoint left off.

A state folder holds one sub-folder per SAE (`<key>/state.safetensors` + `state.json`, the key derived from the
SAE's output path), so the folders that several Ray Train workers report merge into one checkpoint without
clashing. Tensors go to safetensors and everything else to JSON: resuming unpickles nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..store.checkpoint import replace_folder, save_safetensors, temporary_folder

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"

# One SAE's state: flat tensors, and JSON metadata that refers to them by name.
SAEState = tuple[dict[str, torch.Tensor], dict[str, Any]]


def state_key(job: dict) -> str:
    """Sub-folder of one SAE: stable across restarts (its output path is), whichever worker trains it."""
    return hashlib.sha256(job["path"].encode()).hexdigest()[:16]


def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-able copy of a nested state dict whose tensors are moved into `tensors` under dotted names.

    Dicts with non-string keys (an optimizer's state is keyed by parameter index) are kept as key-value pairs,
    since JSON would turn the keys into strings and the optimizer would then silently drop that state."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"$tensor": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"$items": [[k, pack(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{prefix}: cannot store a {type(obj).__name__} in a training state")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `pack` (tuples come back as lists, which state-dict loaders accept)."""
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            return tensors[obj["$tensor"]]
        if set(obj) == {"$items"}:
            return {k: unpack(v, tensors) for k, v in obj["$items"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def write_training_state(folder: Path, states: dict[str, SAEState]) -> None:
    """Write `{key: (tensors, meta)}` to `folder`: built in a temporary sibling and renamed into place, so a
    folder under the final name is always complete."""
    folder = Path(folder)
    tmp = temporary_folder(folder)
    try:
        for key, (tensors, meta) in states.items():
            (tmp / key).mkdir()
            save_safetensors(tensors, tmp / key / STATE_TENSORS)  # the umask's mode, not safetensors' 0600
            (tmp / key / STATE_META).write_text(json.dumps(meta, sort_keys=True))
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_training_state(folder: Path, jobs: list[dict]) -> dict[str, SAEState] | None:
    """The states of `jobs` (keyed by job path), or None unless the folder has every one of them."""
    folder = Path(folder)
    out = {}
    for job in jobs:
        sub = folder / state_key(job)
        if not ((sub / STATE_TENSORS).is_file() and (sub / STATE_META).is_file()):
            return None
        out[job["path"]] = (load_file(str(sub / STATE_TENSORS)), json.loads((sub / STATE_META).read_text()))
    return out
