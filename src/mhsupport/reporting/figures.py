"""The report's figures, each as PNG and PDF: BLEU with its intervals per system, and the tag-use
confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay

def bleu_figure(systems: dict[str, dict], stem: Path, title: str) -> None:
    """BLEU bars with whiskers from each eval's stored interval (unrounded), or +- sd across training
    seeds when there are several, as PNG and PDF."""
    names = list(systems)
    bleu = [systems[name]["metrics"]["bleu"] for name in names]
    values = [b["value"] for b in bleu]
    if all(b.get("sd") is not None and b["ci_low"] is None for b in bleu):
        errors = [[b["sd"] for b in bleu], [b["sd"] for b in bleu]]
        title += " (whiskers: sd across training seeds)"
    else:
        errors = [[b["value"] - b["ci_low"] for b in bleu], [b["ci_high"] - b["value"] for b in bleu]]
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4.2))
    axes.bar(range(len(names)), values, yerr=errors, capsize=4, color="#4C72B0")
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_ylabel("sacrebleu BLEU (0-100), default protocol")
    axes.set_title(title)
    save_figure(figure, stem)

def confusion_figure(rows: list[dict], stem: Path, title: str) -> None:
    """The gold x lowest-NLL-tag confusion matrix of each tagged generator, side by side."""
    figure, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 4.2), squeeze=False)
    for axis, r in zip(axes[0], rows):
        labels = r["confusion"]["labels"]
        ConfusionMatrixDisplay(np.array(r["confusion"]["rows_gold_cols_predicted"]),
                               display_labels=[label[:5] for label in labels]).plot(ax=axis, colorbar=False)
        axis.set_title(f"{r['system']}: {100 * r['tag_discrimination']:.1f}% (chance {100 * r['chance']:.0f}%)")
        axis.set_xlabel("tag giving the reference the lowest NLL")
        axis.set_ylabel("gold tag")
    figure.suptitle(title)
    save_figure(figure, stem)

def counterfactual_figure(rows: list[dict], stem: Path, title: str) -> None:
    """Each tagged generator's replies under every forced category, as the recogniser reads them
    (row-normalised %, empty replies as their own column), side by side."""
    figure, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 4.4), squeeze=False)
    for axis, r in zip(axes[0], rows):
        labels = r["labels"]
        columns = list(next(iter(r["confusion"].values())))
        counts = np.array([[r["confusion"][f][c] for c in columns] for f in labels], dtype=np.float64)
        shares = 100 * counts / counts.sum(axis=1, keepdims=True).clip(min=1)
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=100)
        for i in range(len(labels)):
            for j in range(len(columns)):
                axis.text(j, i, f"{shares[i, j]:.0f}", ha="center", va="center",
                          color="white" if shares[i, j] > 60 else "black")
        axis.set_xticks(range(len(columns)), [c[:7] for c in columns], rotation=30, ha="right")
        axis.set_yticks(range(len(labels)), [label[:7] for label in labels])
        axis.set_xlabel("recognised category of the reply")
        axis.set_ylabel("forced category")
        axis.set_title(f"{r['system']}: following {r['tag_following']:.1f}% "
                       f"(human replies {r['recogniser_on_references']:.1f}%)")
    figure.suptitle(title)
    save_figure(figure, stem)

def save_figure(figure, stem: Path) -> None:
    """A report figure as PNG and PDF."""
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=120)
    figure.savefig(stem.with_suffix(".pdf"))
    plt.close(figure)
