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
    chance: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for c in configurations.values():
        params = ",".join(f"{k}={v}" for k, v in sorted(c["params"].items()))
        if c.get("chance"):
            chance[f"{c['hookpoint']} {c['architecture']}({params})"].append((c["width"], c["chance"]["rotation_shared"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(lines.items()):
        pts.sort()
        w, mean, std = map(np.array, zip(*pts))
        line = ax.errorbar(w, mean, yerr=std, marker="o", capsize=3, label=label)
        if chance.get(label):  # chance level: trained A against a randomly rotated B
            cw, cv = map(np.array, zip(*sorted(chance[label])))
            ax.plot(cw, cv, ls=":", color=line[0].get_color(), label=f"{label} chance (rotation)")
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


def _per_configuration(configurations: dict, draw, xlabel: str, ylabel: str, title: str) -> plt.Figure:
    """One line per configuration; `draw(ax, name, c)` plots it (or nothing)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, c in configurations.items():
        draw(ax, name, c)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def nway_figures(configurations: dict) -> dict[str, plt.Figure]:
    def exactly_k(ax, name, c):
        counts = np.array(c["nway_counts"], dtype=float)
        if counts.size:
            ax.plot(range(len(counts)), (counts / counts.sum(1, keepdims=True)).mean(0), marker="o", label=name)

    def no_other(ax, name, c):
        if c["no_other_seed_curve"]:
            m = [p["n_seeds"] for p in c["no_other_seed_curve"]]
            ax.errorbar(m, [p["mean"] for p in c["no_other_seed_curve"]],
                        yerr=[p["std"] for p in c["no_other_seed_curve"]], marker="o", capsize=3, label=name)

    def sweep(ax, name, c):
        if c.get("sweep_mean"):
            ax.plot(c["sweep_mean"]["threshold"], c["sweep_mean"]["shared"], label=name)

    def frequency(ax, name, c):
        fs = c.get("frequency_stability")
        if fs:
            centers = (np.array(fs["log10_freq_bins"][:-1]) + np.array(fs["log10_freq_bins"][1:])) / 2
            ax.plot(centers, fs["shared_per_bin"], marker="o", label=f"{name} (rho={fs['spearman']:.2f})")

    return {
        "figures/exactly_k_seeds.png": _per_configuration(
            configurations, exactly_k, "other seeds a latent is shared with", "fraction of latents (mean over base seeds)",
            "shared with exactly k other seeds"),
        "figures/no_other_seed.png": _per_configuration(
            configurations, no_other, "number of seeds", "fraction in no other seed",
            "latents found in no other seed (mean ± std over subsets)"),
        "figures/threshold_sweep.png": _per_configuration(
            configurations, sweep, "cosine threshold", "shared fraction (mean over pairs)", "threshold sweep"),
        "figures/frequency_vs_stability.png": _per_configuration(
            configurations, frequency, "log10 firing frequency", "fraction shared", "frequency and stability"),
    }


def shared_vs_tokens(configurations: dict) -> dict[str, plt.Figure]:
    """Overlap through training, when intermediate checkpoints were saved."""
    if not any(c.get("through_training") for c in configurations.values()):
        return {}

    def draw(ax, name, c):
        pts = c.get("through_training")
        if pts:
            ax.errorbar([p["tokens"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                        marker="o", capsize=3, label=name)

    fig = _per_configuration(configurations, draw, "training tokens", "shared fraction (mean ± std over seed pairs)",
                             "overlap through training")
    fig.axes[0].set_xscale("log")
    fig.axes[0].set_ylim(0, 1)
    return {"figures/shared_vs_tokens.png": fig}


def log_density(frequency: np.ndarray, title: str) -> plt.Figure:
    """Histogram of log10 firing frequency over the evaluation set; latents that never fired are counted apart."""
    fig, ax = plt.subplots(figsize=(5, 3))
    fired = frequency[frequency > 0]
    if fired.size:
        ax.hist(np.log10(fired), bins=50)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{int((frequency <= 0).sum())} of {frequency.size} latents never fired", fontsize=8)
    fig.tight_layout()
    return fig


def all_figures(configurations: dict, threshold: float) -> dict[str, plt.Figure]:
    return heatmaps(configurations) | matched_cosine_histograms(configurations, threshold) | nway_figures(
        configurations) | shared_vs_tokens(configurations) | {
        "figures/shared_vs_width.png": shared_vs_width(configurations)}
