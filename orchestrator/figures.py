"""Comparison figures for the parent MLflow run (matplotlib, headless): one figure per question a reader asks.

Legends name configurations in plain words (`ReLU+L1, L0 target 16, 512 latents`); lines that can coincide get
distinct markers and line styles; count axes have integer ticks; thresholds are labelled.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# A run's figures (a few per configuration) are made together, logged, then closed: not a leak to warn about.
plt.rcParams["figure.max_open_warning"] = 0
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from actors.store.checkpoint import dead_latents  # noqa: E402

from .plan import architecture_title, describe, file_slug, short_name  # noqa: E402

MARKERS = "osD^vP*Xph<>"
LINESTYLES = ["-", "--", "-.", ":"]
LEGEND = {"fontsize": 8, "frameon": False}


def _label(c: dict, with_hookpoint: bool, width: bool = True) -> str:
    text = describe(c["architecture"], c["params"], c["width"] if width else None)
    return f"{text} ({c['hookpoint']})" if with_hookpoint else text


def _several_hookpoints(configurations: dict) -> bool:
    return len({c["hookpoint"] for c in configurations.values()}) > 1


def _file_key(c: dict, with_hookpoint: bool) -> str:
    key = file_slug(short_name(c["architecture"], c["params"], c["width"]))
    return f"{file_slug(c['hookpoint'])}-{key}" if with_hookpoint else key


def _styles():
    """Marker, size and line style per line, so that lines lying on each other stay distinguishable: hollow
    markers of decreasing size nest instead of covering each other."""
    sizes = itertools.cycle([10, 7.5, 5, 3])
    return ({"marker": m, "ls": ls, "ms": ms, "mfc": "none", "mew": 1.5}
            for m, ls, ms in zip(itertools.cycle(MARKERS), itertools.cycle(LINESTYLES), sizes))


def _tokens(v, _pos=None) -> str:
    """Token counts as 2,048 / 262k / 1.05M / 2.1B."""
    if v < 1e5:
        return f"{int(v):,}"
    if v < 1e6:
        return f"{v / 1e3:.0f}k"
    return f"{v / 1e6:.3g}M" if v < 1e9 else f"{v / 1e9:.3g}B"


def heatmaps(configurations: dict) -> dict[str, plt.Figure]:
    several = _several_hookpoints(configurations)
    figs = {}
    for c in configurations.values():
        m = np.array(c["shared_matrix"])
        fig, ax = plt.subplots(figsize=(2.2 + 0.6 * len(m), 1.6 + 0.6 * len(m)))
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(m)), [f"seed {s}" for s in c["seeds"]])
        ax.set_yticks(range(len(m)), [f"seed {s}" for s in c["seeds"]])
        for i in range(len(m)):
            for j in range(len(m)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="w" if m[i, j] < 0.6 else "k")
        ax.set_xlabel("matched against")
        ax.set_ylabel("latents of")
        ax.set_title(f"Fraction of latents shared\n{_label(c, several)}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        figs[f"figures/heatmap_{_file_key(c, several)}.png"] = fig
    return figs


def shared_vs_width(configurations: dict) -> plt.Figure:
    """Shared fraction against width, one panel per architecture, with the chance levels (randomly rotated B;
    the two SAEs at initialisation)."""
    several = _several_hookpoints(configurations)
    panels: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for c in configurations.values():
        panels[c["architecture"]][_label(c, several, width=False)].append(c)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 5.5), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, (arch, lines) in zip(axes[0], sorted(panels.items())):
        for (label, confs), style in zip(sorted(lines.items()), _styles()):
            confs = sorted(confs, key=lambda c: c["width"])
            w = [c["width"] for c in confs]
            line = ax.errorbar(w, [c["shared_mean"] for c in confs], yerr=[c["shared_std"] for c in confs],
                               capsize=3, label=label, **style)
            color = line[0].get_color()
            for key, words, ls in (("rotation_shared", "chance (B rotated)", ":"),
                                   ("init_shared", "chance (at initialisation)", (0, (1, 3)))):
                pts = [(c["width"], c["chance"][key]) for c in confs if c.get("chance", {}).get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), ls=ls, color=color, marker="x", ms=5, label=f"{label}, {words}")
        ax.set_xscale("log", base=2)
        widths = sorted({c["width"] for confs in lines.values() for c in confs})
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("latents (width)")
        ax.set_title(architecture_title(arch), fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), **LEGEND)  # below the panel: lines stay visible
    axes[0][0].set_ylabel("fraction of latents shared\n(mean ± std over seed pairs)")
    fig.suptitle("How many latents do two seeds share, by width?", fontsize=11)
    return fig


def matched_cosine_histograms(configurations: dict, threshold: float) -> dict[str, plt.Figure]:
    several = _several_hookpoints(configurations)
    figs = {}
    for c in configurations.values():
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for which, values in c["matched_cos"].items():
            v = np.asarray(values, dtype=float)
            ax.hist(v[~np.isnan(v)], bins=50, range=(-0.2, 1), alpha=0.6, label=f"{which} rows")
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}: shared above, if both are")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("cosine of a latent with its matched partner")
        ax.set_ylabel("latents (all seed pairs)")
        ax.set_title(f"Matched cosines\n{_label(c, several)}", fontsize=9)
        ax.legend(**LEGEND)
        fig.tight_layout()
        figs[f"figures/matched_cos_{_file_key(c, several)}.png"] = fig
    return figs


def _per_configuration(configurations: dict, draw, xlabel: str, ylabel: str, title: str,
                       integer_x: bool = False) -> plt.Figure:
    """One line per configuration; `draw(ax, label, c, style)` plots it (or nothing)."""
    several = _several_hookpoints(configurations)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c, style in zip(configurations.values(), _styles()):
        draw(ax, _label(c, several), c, style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**LEGEND)
    fig.tight_layout()
    return fig


def nway_figures(configurations: dict) -> dict[str, plt.Figure]:
    def exactly_k(ax, label, c, style):
        counts = np.array(c["nway_counts"], dtype=float)
        if counts.size:
            ax.plot(range(len(counts)), (counts / counts.sum(1, keepdims=True)).mean(0), label=label, **style)

    def no_other(ax, label, c, style):
        if c["no_other_seed_curve"]:
            m = [p["n_seeds"] for p in c["no_other_seed_curve"]]
            ax.errorbar(m, [p["mean"] for p in c["no_other_seed_curve"]],
                        yerr=[p["std"] for p in c["no_other_seed_curve"]], capsize=3, label=label, **style)

    def sweep(ax, label, c, style):
        if c.get("sweep_mean"):
            ax.plot(c["sweep_mean"]["threshold"], c["sweep_mean"]["shared"], label=label, markevery=0.1, **style)

    def frequency(ax, label, c, style):
        fs = c.get("frequency_stability")
        if fs:
            centers = (np.array(fs["log10_freq_bins"][:-1]) + np.array(fs["log10_freq_bins"][1:])) / 2
            ax.plot(centers, fs["shared_per_bin"], label=f"{label} (Spearman ρ = {fs['spearman']:.2f})", **style)

    figs = {
        "figures/exactly_k_seeds.png": _per_configuration(
            configurations, exactly_k, "number of other seeds the latent is shared with",
            "fraction of latents (mean over seeds)", "With how many other seeds is a latent shared?",
            integer_x=True),
        "figures/no_other_seed.png": _per_configuration(
            configurations, no_other, "seeds trained", "fraction of latents shared with no other seed",
            "How many latents are unique to one seed, as seeds are added? (mean ± std over subsets)",
            integer_x=True),
        "figures/threshold_sweep.png": _per_configuration(
            configurations, sweep, "cosine threshold", "fraction of latents shared (mean over pairs)",
            "How does the shared fraction depend on the threshold?"),
        "figures/frequency_vs_stability.png": _per_configuration(
            configurations, frequency, "log10 firing frequency (evaluation set)", "fraction of latents shared",
            "Are frequently firing latents more often shared?"),
    }
    figs["figures/threshold_sweep.png"].axes[0].set_ylim(-0.02, 1.02)
    figs["figures/frequency_vs_stability.png"].axes[0].set_ylim(-0.02, 1.02)
    return figs


def shared_vs_tokens(configurations: dict) -> dict[str, plt.Figure]:
    """Overlap through training, when intermediate checkpoints were saved."""
    if not any(c.get("through_training") for c in configurations.values()):
        return {}

    def draw(ax, label, c, style):
        pts = c.get("through_training")
        if pts:
            ax.errorbar([p["tokens"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                        capsize=3, label=label, **style)

    fig = _per_configuration(configurations, draw, "training tokens seen",
                             "fraction of latents shared\n(mean ± std over seed pairs)",
                             "How does the shared fraction change through training?")
    ax = fig.axes[0]
    ax.set_xscale("log", base=2)
    tokens = sorted({p["tokens"] for c in configurations.values() for p in c.get("through_training") or []})
    ax.set_xticks(tokens)  # one labelled tick per checkpoint, as 16k / 1M: no overlapping minor labels
    ax.minorticks_off()
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    ax.set_ylim(-0.02, 1.02)
    return {"figures/shared_vs_tokens.png": fig}


def log_density_data(frequency: np.ndarray, bins: int = 50) -> dict:
    """The log-density histogram's numbers: latents that never fired (dead, `dead_latents`) apart, the others
    binned by log10 firing frequency."""
    dead = dead_latents(frequency)
    fired = np.log10(frequency[~dead]) if (~dead).any() else np.array([])
    counts, edges = np.histogram(fired, bins=bins) if fired.size else (np.array([], int), np.array([]))
    return {"latents": int(frequency.size), "never_fired": int(dead.sum()), "log10_frequency_edges": edges.tolist(),
            "counts": counts.astype(int).tolist()}


def log_density(frequency: np.ndarray, title: str) -> plt.Figure:
    """Histogram of log10 firing frequency over the evaluation set; latents that never fired are counted apart."""
    data = log_density_data(frequency)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    if data["counts"]:
        edges = np.array(data["log10_frequency_edges"])
        ax.stairs(data["counts"], edges, fill=True)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("log10 firing frequency (evaluation set)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{data['never_fired']} of {data['latents']} latents never fired (dead)", fontsize=9)
    fig.tight_layout()
    return fig


def all_figures(configurations: dict, threshold: float) -> dict[str, plt.Figure]:
    return heatmaps(configurations) | matched_cosine_histograms(configurations, threshold) | nway_figures(
        configurations) | shared_vs_tokens(configurations) | {
        "figures/shared_vs_width.png": shared_vs_width(configurations)}
