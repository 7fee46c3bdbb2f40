"""Pictures of a run (PNG, matplotlib without a display): loss curves and expert-load heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smore.errors import UserError
from smore.routing.stats import LevelHealth

FEW_POINTS = 30
"""Curves with at most this many points are drawn with a marker on each."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Training loss (and held-out loss where measured) against the optimizer step."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    steps = [record["step"] for record in history]
    # A short run has a few log lines (one, when max_steps < log_every): a line through them alone would draw
    # nothing, so each point gets a marker.
    marker = "o" if len(steps) <= FEW_POINTS else None
    axis.plot(steps, [record["loss"] for record in history], marker=marker, label="train loss")
    evaluated = [(record["step"], record["eval_loss"]) for record in history if record.get("eval_loss") is not None]
    if evaluated:
        axis.plot(*zip(*evaluated), "o-", label="held-out loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy per response token")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_expert_load(health: list[LevelHealth], path: str | Path) -> Path:
    """One row per (adapter, level), one column per expert, colour = share of routed slots."""
    plt = _pyplot()
    if not health:
        raise UserError("no routing counts to plot: the adapters are not routed, or tracking was off.")
    width = max(len(level.load) for level in health)
    rows = [level.load + [float("nan")] * (width - len(level.load)) for level in health]
    labels = [f"{level.module.removeprefix('model.')} L{level.level}" for level in health]
    figure, axis = plt.subplots(figsize=(2 + 0.5 * width, 1 + 0.22 * len(rows)))
    image = axis.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0)
    axis.set_yticks(range(len(labels)), labels, fontsize=6)
    axis.set_xticks(range(width))
    axis.set_xlabel("expert")
    figure.colorbar(image, ax=axis, label="share of routed slots")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
