"""docs/configuration.md, generated from the config models' field descriptions (one place defines each field).

    python -m orchestrator.config_reference > docs/configuration.md

`tests/test_docs.py` fails when the file and the models disagree.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import ExperimentConfig

HEADER = """# Configuration reference

Generated from the descriptions in `orchestrator/config.py` by `python -m orchestrator.config_reference`; do not
edit by hand. Every field can be set in the YAML file or with `--set section.field=value` (values parsed as YAML).
A field without a default is required. An architecture's own hyper-parameters (`sae.architectures[].*`) are
described in [architectures.md](architectures.md).
"""


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in get_args(annotation))
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    return text.replace(" | ", " or ").replace("NoneType", "None")


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    return "" if field.default is PydanticUndefined else f"`{field.default!r}`"


def _nested(field) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    rows, children = [], []
    for name, field in model.model_fields.items():
        nested = _nested(field)
        if nested is not None:
            children.append((f"{prefix}{name}", nested, field.description))
            continue
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
    if rows:
        out += ["| field | type | default | description |", "|---|---|---|---|", *rows, ""]
    for path, nested, description in children:
        out += [f"## `{path}`", ""]
        if description:
            out += [description, ""]
        _section(nested, f"{path}.", out)


def render() -> str:
    out = [HEADER, "## Top level", ""]
    _section(ExperimentConfig, "", out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
