"""Training curves: one panel per task loss, one for the loss weights, one for validation ranking metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_training_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    epochs = [record["epoch"] for record in history]
    losses = sorted({k for record in history for k in record if k.startswith("train/loss_")})
    weights = sorted({k for record in history for k in record if k.startswith("train/weight_")})
    ranking = [k for k in ("validation/NDCG@10", "validation/HR@10", "validation/MRR@10") if k in history[0]]
    panels = [(k, [k]) for k in losses] + [("loss weights", weights)] * bool(weights) + [("validation", ranking)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            axis.plot(epochs, [record.get(key, float("nan")) for record in history], marker=".", label=key.split("/")[-1])
        axis.set_title(title.replace("train/loss_", "loss: "))
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if len(keys) > 1:
            axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
