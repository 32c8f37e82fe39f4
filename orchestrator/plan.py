"""The experiment plan: the SAE grid expanded into configurations and per-seed jobs, with their folders.

A configuration is (hookpoint, architecture, hyper-parameters, width); its seeds differ only in init.
Hookpoints come from the generate manifest, since patterns resolve against the loaded model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from actors.sae import ARCHITECTURES

from .config import ExperimentConfig


@dataclass(frozen=True)
class GridPoint:
    architecture: str
    params: tuple  # sorted (name, value) pairs, hashable
    width: int

    @property
    def label(self) -> str:
        return f"{ARCHITECTURES[self.architecture].label(dict(self.params))}-w{self.width}"


@dataclass
class SAEConfiguration:
    """All seeds of one (hookpoint, grid point): the unit that is matched seed against seed."""

    hookpoint: str
    point: GridPoint
    seeds: list[int]
    root: Path
    run_ids: dict[int, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The configuration's id: the key of manifests and tables (stable; not meant for reading)."""
        return f"{slug(self.hookpoint)}/{self.point.label}"

    @property
    def title(self) -> str:
        """Plain words, e.g. `ReLU+L1, L0 target 16, 512 latents`."""
        return describe(self.point.architecture, dict(self.point.params), self.point.width)

    def run_name(self, seed: int, with_hookpoint: bool = False) -> str:
        """MLflow child run name, varying part first, e.g. `topk k16 · 512 · seed 0` (then the hookpoint when the
        experiment has several: it is long, and the table cuts names short)."""
        return " · ".join([short_name(self.point.architecture, dict(self.point.params), self.point.width),
                           f"seed {seed}"] + ([self.hookpoint] if with_hookpoint else []))

    def sae_path(self, seed: int) -> Path:
        # sparsify's layout: one folder per hookpoint inside a run folder, one run folder per seed.
        return self.root / "saes" / self.point.label / f"seed{seed}" / self.hookpoint

    def jobs(self) -> list[dict]:
        return [{
            "configuration": self.name, "hookpoint": self.hookpoint, "architecture": self.point.architecture,
            "params": dict(self.point.params), "width": self.point.width, "seed": seed,
            "path": str(self.sae_path(seed)), "run_id": self.run_ids.get(seed),
        } for seed in self.seeds]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


# How a configuration reads. The architecture's own class may declare `title`; these cover the built-in ones.
ARCHITECTURE_TITLES = {"topk": "TopK", "batchtopk": "BatchTopK", "relu_l1": "ReLU+L1", "gated": "Gated",
                       "jumprelu": "JumpReLU", "matryoshka": "Matryoshka"}
# Hyper-parameter -> (words, compact form); others read as `name value` and `name=value`.
PARAM_WORDS = {"k": ("k {}", "k{}"), "target_l0": ("L0 target {}", "L0 {}"),
               "l1_coefficient": ("L1 coefficient {}", "l1 {}"), "l0_coefficient": ("L0 coefficient {}", "l0coef {}"),
               "auxk_alpha": ("AuxK weight {}", "auxk {}"), "lr": ("lr {}", "lr {}")}


def _number(v) -> str:
    if isinstance(v, (list, tuple)):
        return "/".join(map(_number, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _shown_params(architecture: str, params: dict) -> dict:
    """The hyper-parameters that tell configurations apart: required ones and those set away from their default."""
    fields = ARCHITECTURES[architecture].Params.model_fields
    return {k: v for k, v in sorted(params.items())
            if v is not None and (k not in fields or fields[k].is_required() or v != fields[k].default)}


def architecture_title(architecture: str) -> str:
    return getattr(ARCHITECTURES[architecture], "title", None) or ARCHITECTURE_TITLES.get(architecture, architecture)


def describe(architecture: str, params: dict, width: int | None = None) -> str:
    """A configuration in plain words: `ReLU+L1, L0 target 16, 512 latents` (figure legends, summary tables)."""
    words = [PARAM_WORDS.get(k, (k.replace("_", " ") + " {}",))[0].format(_number(v))
             for k, v in _shown_params(architecture, params).items()]
    return ", ".join([architecture_title(architecture), *words] + ([f"{width} latents"] if width else []))


def short_name(architecture: str, params: dict, width: int | None = None) -> str:
    """A configuration in a few characters, varying part first: `topk k16 · 512` (run names, metric keys)."""
    forms = [PARAM_WORDS[k][1] if k in PARAM_WORDS else f"{k}={{}}" for k in _shown_params(architecture, params)]
    text = " ".join([architecture] + [f.format(_number(v)) for f, v in
                                      zip(forms, _shown_params(architecture, params).values())])
    return f"{text} · {width}" if width else text


def file_slug(text: str) -> str:
    """A short name as a file or metric-key part: `topk k16 · 512` -> `topk-k16-512`."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")


def grid_points(cfg: ExperimentConfig) -> list[GridPoint]:
    points = []
    for spec in cfg.sae.architectures:
        arch = ARCHITECTURES[spec["name"]]
        for params in arch.expand_sweep({k: v for k, v in spec.items() if k != "name"}):
            for width in cfg.sae.widths:
                points.append(GridPoint(spec["name"], tuple(sorted(params.items())), width))
    return points


def plan_configurations(cfg: ExperimentConfig, hookpoints: list[str]) -> list[SAEConfiguration]:
    return [SAEConfiguration(hp, point, list(cfg.sae.seeds), cfg.output_path)
            for hp in hookpoints for point in grid_points(cfg)]
