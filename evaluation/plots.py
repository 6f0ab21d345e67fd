"""The evaluation's pictures: accuracy per kind and language, and the training loss curves."""

from __future__ import annotations

import os
from pathlib import Path

from .exact import table


def plot_accuracy(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds, langs = list(result["by_kind"]), list(result["by_lang"])
    fig, (ax, tx) = plt.subplots(2, 1, figsize=(9, 7), gridspec_kw={"height_ratios": [3, 2]})
    width = 0.8 / (len(langs) + 1)
    for j, name in enumerate([*langs, "all"]):
        vals = [result["by_kind"][k] if name == "all" else result["by_kind_lang"].get(f"{k}/{name}") or 0 for k in kinds]
        ax.bar([i + (j - len(langs) / 2) * width for i in range(len(kinds))], [100 * v for v in vals], width, label=name)
    ax.axhline(100 * result["overall"], color="k", ls="--", lw=1, label=f"overall {100 * result['overall']:.1f}%")
    if result.get("ood"):
        ood = result["ood"]
        ax.scatter(range(len(kinds)), [100 * (ood["by_kind"].get(k) or 0) for k in kinds], marker="v", color="r", zorder=3,
                   label="ood, all")
        ax.axhline(100 * ood["overall"], color="r", ls=":", lw=1, label=f"ood overall {100 * ood['overall']:.1f}%")
    ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("exact match (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"eval exact match ({result['counts']['turns']} assistant turns), loss {result['loss']}")
    tx.axis("off")
    tx.text(0, 1, table(result), family="monospace", fontsize=9, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_losses(paths: list[str], path: str) -> list[str]:
    """Loss vs optimizer step, one panel per stage's metrics.jsonl; returns the files plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.metrics import read_jsonl

    found = [p for p in paths if os.path.exists(p)]
    fig, axes = plt.subplots(1, max(1, len(found)), figsize=(5 * max(1, len(found)), 3.5), squeeze=False)
    for ax, p in zip(axes[0], found):
        recs = [r for r in read_jsonl(p) if "loss" in r and "step" in r]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
        ax.set_title(Path(p).parent.name or p)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return found
