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
        return f"{slug(self.hookpoint)}/{self.point.label}"

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
