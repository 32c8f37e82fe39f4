"""SAE folders published on the Hugging Face Hub, named `hf://owner/name[@revision][/subfolder]`.

Only `cfg.json` and `*.safetensors` under the subfolder are fetched (never a pickle), through huggingface_hub's
cache, so HF_HUB_OFFLINE=1 and HF_HUB_CACHE work as for any Hub download. The folder that comes back is read by
checkpoint.load_sae_weights, which knows sparsify's (`sae.safetensors`, `encoder.weight` [n, d]) and SAELens'
(`sae_weights.safetensors`, `W_enc` [d, n]) layouts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hf://"
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubSAE:
    """Where an SAE lives on the Hub."""

    repo_id: str  # owner/name of a model repository
    subfolder: str  # folder inside the repository holding cfg.json and the weights ("" for the root)
    revision: str | None  # branch, tag or commit hash; None: the default branch


def parse_hub_source(spec: str) -> HubSAE:
    """`hf://owner/name[@revision][/subfolder]` -> HubSAE; ValueError naming the expected form otherwise."""
    if not spec.startswith(PREFIX):
        raise ValueError(f"{spec!r} is not a Hub source: expected {PREFIX}owner/name[@revision][/subfolder]")
    parts = spec[len(PREFIX):].strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"{spec!r}: expected {PREFIX}owner/name[@revision][/subfolder]")
    name, _, revision = parts[1].partition("@")
    repo_id = f"{parts[0]}/{name}"
    subfolder = "/".join(parts[2:])
    if not _REPO.match(repo_id) or (_ and not revision) or any(p in ("", ".", "..") for p in parts[2:]):
        raise ValueError(f"{spec!r}: expected {PREFIX}owner/name[@revision][/subfolder]")
    return HubSAE(repo_id, subfolder, revision or None)


def is_hub_source(spec: str) -> bool:
    return spec.startswith(PREFIX)


def fetch_sae_folder(spec: str) -> Path:
    """Local folder with the SAE's cfg.json and safetensors weights (downloaded or found in the Hub cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    src = parse_hub_source(spec)
    prefix = f"{src.subfolder}/" if src.subfolder else ""
    try:
        root = snapshot_download(src.repo_id, revision=src.revision, repo_type="model",
                                 allow_patterns=[f"{prefix}cfg.json", f"{prefix}*.safetensors"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(f"{spec}: not found on the Hub or in its cache "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    folder = Path(root) / src.subfolder
    if not folder.is_dir():
        raise FileNotFoundError(f"{spec}: the repository has no folder {src.subfolder!r}")
    return folder
