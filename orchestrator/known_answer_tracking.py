"""MLflow logging of the ground-truth scores (sources with a known answer) and of uncertified matchings.

Kept apart from tracking.py: the driver calls these after `ExperimentTracker.log_results`, with its client."""

from __future__ import annotations

import time
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .plan import describe  # noqa: E402
from .tracking import configuration_key  # noqa: E402

UNCERTIFIED_TAG = "sae_seeds.uncertified_matching"


def log_known_answer(client: MlflowClient, parent_id: str, train_manifest: dict, compare: dict) -> None:
    """Child runs: recovery, MCC, true-latent fraction of their SAE and the precision of its shared / orphan
    latents; parent: the same per configuration (`gt_<metric>/<configuration>`, as tracking.py names every
    per-configuration value) and the ground-truth figure."""
    confs = compare["manifest"]["configurations"]
    if not any(c.get("ground_truth") for c in confs.values()):
        return
    now = int(time.time() * 1000)
    tables = compare["tables"]
    per_sae = tables["ground_truth_saes"].set_index(["configuration", "seed"])
    pairs = tables["ground_truth_pairs"]
    for sae in train_manifest["saes"]:
        key = (sae["configuration"], sae["seed"])
        if key not in per_sae.index or not sae.get("run_id"):
            continue
        own = pairs[(pairs.configuration == key[0]) & (pairs.seed == key[1])]
        metrics = {f"gt_{k}": float(v) for k, v in per_sae.loc[key].items()}
        metrics |= {f"gt_{k}_mean_over_pairs": float(own[k].mean()) for k in ("precision_shared", "precision_orphan")
                    if len(own)}
        client.log_batch(sae["run_id"], metrics=[Metric(k, v, now, 0) for k, v in metrics.items()
                                                 if np.isfinite(v)])
    parent = []
    several_hookpoints = len({c["hookpoint"] for c in confs.values()}) > 1
    for c in confs.values():
        truth = c.get("ground_truth")
        if truth:
            key = configuration_key(c, several_hookpoints)
            parent += [Metric(f"gt_{k}/{key}", float(v), now, 0) for k, v in truth.items()
                       if not isinstance(v, list) and np.isfinite(v)]
    for i in range(0, len(parent), 1000):
        client.log_batch(parent_id, metrics=parent[i:i + 1000])
    fig = ground_truth_figure(confs)
    client.log_figure(parent_id, fig, "figures/ground_truth.png")
    plt.close(fig)


def ground_truth_figure(configurations: dict) -> plt.Figure:
    """Against width, per architecture: recovery and MCC; true-feature precision of shared and orphan latents;
    and precision by the number of other seeds a latent is shared with."""
    lines: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for c in configurations.values():
        if c.get("ground_truth"):
            lines[f"{c['hookpoint']}: {describe(c['architecture'], c['params'])}"].append((c["width"], c["ground_truth"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, pts in sorted(lines.items()):
        pts.sort(key=lambda p: p[0])
        w = [p[0] for p in pts]
        line = axes[0].plot(w, [p[1]["recovered_mean"] for p in pts], marker="o", label=f"{label} recovered")[0]
        axes[0].plot(w, [p[1]["mcc_mean"] for p in pts], marker="s", ls="--", color=line.get_color(),
                     label=f"{label} MCC")
        axes[1].plot(w, [p[1]["precision_shared"] for p in pts], marker="o", color=line.get_color(),
                     label=f"{label} shared")
        axes[1].plot(w, [p[1]["precision_orphan"] for p in pts], marker="x", ls=":", color=line.get_color(),
                     label=f"{label} orphans")
        for width, truth in pts:
            axes[2].plot(range(len(truth["precision_by_k"])), truth["precision_by_k"], marker="o",
                         label=f"{label} w{width}")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latents")
    axes[0].set_ylabel("fraction of true features recovered / MCC")
    axes[1].set_ylabel("fraction of latents that are true features")
    axes[1].set_title("shared vs orphan latents", fontsize=9)
    axes[2].set_xlabel("other seeds a latent is shared with")
    axes[2].set_ylabel("true-feature precision")
    for ax in axes:
        ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def tag_uncertified(client: MlflowClient, parent_id: str, train_manifest: dict, compare: dict) -> None:
    """Tag the parent run, and the child runs of each configuration, whose matching was not proven optimal."""
    bad = [name for name, c in compare["manifest"]["configurations"].items() if not c["certified"]]
    if not bad:
        return
    client.set_tag(parent_id, UNCERTIFIED_TAG, ", ".join(bad)[:5000])
    for sae in train_manifest["saes"]:
        if sae["configuration"] in bad and sae.get("run_id"):
            client.set_tag(sae["run_id"], UNCERTIFIED_TAG, "true")
