"""The output folder of `sae-seeds run`: claimed before anything is written, refused when it already holds files
that no sae-seeds run wrote (a re-run writes over its own outputs, so a mistyped --output must not be a folder of
the user's)."""

from __future__ import annotations

import re
from pathlib import Path

from .config import ConfigError

MARKER = ".sae-seeds-output"  # written first into every output folder
# What a run writes at the top of its output folder (README "Output layout"); a folder holding only these is an
# output of a version that wrote no marker.
KNOWN = {"activations", "saes", "overlap", "ray_train", "model", "mlflow.db", "mlartifacts", MARKER}
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.(tmp|old)$")  # checkpoint.temporary_folder / replace_folder names


def claim_output_folder(path: Path) -> None:
    """Create `path` (or accept it: empty, marked, or holding only a run's outputs) and mark it as an output."""
    check_output_folder(path)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()


def check_output_folder(path: Path) -> None:
    """Refuse `path` if it is not a folder, or holds files and is not a sae-seeds output; writes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output folder {path}: exists and is not a folder; choose a new or empty folder with "
                          "--output (or output_dir)")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if entries and MARKER not in entries:
        foreign = [e for e in entries if e not in KNOWN and not _TEMPORARY.match(e)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"output folder {path}: not empty and not a sae-seeds output (it holds {shown}); a run "
                              "writes over its output folder, so choose a new or empty folder with --output (or "
                              "output_dir), or the output folder of an earlier run")
