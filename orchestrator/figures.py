"""Comparison figures for the parent MLflow run (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .plan import slug  # noqa: E402


def heatmaps(configurations: dict) -> dict[str, plt.Figure]:
    figs = {}
    for name, c in configurations.items():
        m = np.array(c["shared_matrix"])
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(m), 1.0 + 0.6 * len(m)))
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(m)), [f"s{s}" for s in c["seeds"]])
        ax.set_yticks(range(len(m)), [f"s{s}" for s in c["seeds"]])
        for i in range(len(m)):
            for j in range(len(m)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(f"shared fraction\n{name}", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        figs[f"figures/heatmap_{slug(name)}.png"] = fig
    return figs


def shared_vs_width(configurations: dict) -> plt.Figure:
    lines: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for c in configurations.values():
        params = ",".join(f"{k}={v}" for k, v in sorted(c["params"].items()))
        lines[f"{c['hookpoint']} {c['architecture']}({params})"].append((c["width"], c["shared_mean"], c["shared_std"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(lines.items()):
        pts.sort()
        w, mean, std = map(np.array, zip(*pts))
        ax.errorbar(w, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("latents")
    ax.set_ylabel("shared fraction (mean ± std over seed pairs)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def matched_cosine_histograms(configurations: dict, threshold: float) -> dict[str, plt.Figure]:
    figs = {}
    for name, c in configurations.items():
        fig, ax = plt.subplots(figsize=(5, 3))
        for which, values in c["matched_cos"].items():
            v = np.asarray(values, dtype=float)
            ax.hist(v[~np.isnan(v)], bins=50, range=(-0.2, 1), alpha=0.6, label=which)
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set_xlabel("matched cosine")
        ax.set_ylabel("latents (all seed pairs)")
        ax.set_title(name, fontsize=8)
        ax.legend()
        fig.tight_layout()
        figs[f"figures/matched_cos_{slug(name)}.png"] = fig
    return figs


def all_figures(configurations: dict, threshold: float) -> dict[str, plt.Figure]:
    return heatmaps(configurations) | matched_cosine_histograms(configurations, threshold) | {
        "figures/shared_vs_width.png": shared_vs_width(configurations)}
