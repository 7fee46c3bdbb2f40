"""Pictures of a run (PNG, matplotlib without a display): loss curves and expert-load heatmaps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def _place(module: str) -> tuple[str, int | None]:
    """``(projection, layer)`` of an adapted module's name: ``model.layers.3.mlp.gate_proj`` → ``("mlp.gate_proj",
    3)``. The layer is the first number in the name (the decoder layer's index in every HF decoder); a name without
    one is its own projection with no layer."""
    parts = module.removeprefix("model.").split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is None:
        return ".".join(parts), None
    return ".".join(parts[index + 1 :]) or ".".join(parts[:index]), int(parts[index])


@dataclass
class LoadPanel:
    """One heatmap: a projection's level, one row per decoder layer, one column per expert."""

    projection: str
    level: int
    rows: list[LevelHealth] = field(default_factory=list)

    @property
    def experts(self) -> int:
        return max(len(row.load) for row in self.rows)

    def row_label(self, row: LevelHealth) -> str:
        layer = _place(row.module)[1]
        return row.module.removeprefix("model.") if layer is None else f"layer {layer}"


def load_panels(health: list[LevelHealth]) -> list[LoadPanel]:
    """The health grouped into one panel per (projection, level): a row of the figure per level, projections in the
    model's order, each panel's rows by layer."""
    panels: dict[tuple[str, int], LoadPanel] = {}
    for row in health:
        projection = _place(row.module)[0]
        panels.setdefault((projection, row.level), LoadPanel(projection, row.level)).rows.append(row)
    projections = list(dict.fromkeys(projection for projection, _ in panels))
    for panel in panels.values():
        panel.rows.sort(key=lambda row: (_place(row.module)[1] is None, _place(row.module)[1] or 0, row.module))
    return sorted(panels.values(), key=lambda panel: (panel.level, projections.index(panel.projection)))


def _summary(row: LevelHealth) -> str:
    """The line beside a layer's row: the entropy of its load (1 balanced) and its dead experts."""
    dead = round(row.dead_share * len(row.load))
    return f"H {row.entropy:.2f}  dead {dead}/{len(row.load)}" + ("  !" if row.collapsed else "")


CELL_WIDTH, CELL_HEIGHT = 0.34, 0.2
"""Inches per expert column and per layer row of a heatmap (a panel is never narrower or shorter than it needs for
its title and labels)."""
MAX_COLUMNS = 4
"""Panels per row of the figure: one per projection up to this many, then the grid wraps."""
ANNOTATE_CELLS = 12
"""Panels with at most this many layers and experts print each share in its cell; larger ones rely on the colours."""
MAX_RATIO = 4.0
"""The colour scale ends at this many times the balanced load (a collapsed expert saturates it)."""


def expert_load_figure(health: list[LevelHealth]):
    """The expert-load figure and its panels (one heatmap per projection and level, see :func:`plot_expert_load`)."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    if not health:
        raise UserError("no routing counts to plot: the adapters are not routed, or tracking was off.")
    panels = load_panels(health)
    columns = min(len(panels), MAX_COLUMNS, len({panel.projection for panel in panels}))
    grid_rows = -(-len(panels) // columns)
    experts = max(panel.experts for panel in panels)
    layers = max(len(panel.rows) for panel in panels)
    cell = min(CELL_WIDTH, 4.0 / experts)  # many experts: narrower cells, the same panel width
    panel_width, panel_height = 3.0 + max(cell * experts, 1.4), 1.1 + max(CELL_HEIGHT * layers, 0.8)
    figure, axes = plt.subplots(
        grid_rows,
        columns,
        figsize=(panel_width * columns, panel_height * grid_rows + 1.2),
        squeeze=False,
        layout="constrained",
    )
    # Colour = load over the balanced load 1/E: white is balanced whatever a level's number of experts, blue an
    # expert under-used, red over-used; beyond MAX_RATIO times the balanced load the colour saturates.
    top = max(max(row.load) * len(row.load) for row in health)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=min(max(top, 2.0), MAX_RATIO))
    image = None
    for axis, panel in zip(axes.flat, panels):
        image = _draw_panel(axis, panel, norm)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle("expert load per decoder layer (cells: share of routed slots; right: load entropy H, 1 = balanced)")
    figure.colorbar(
        image,
        ax=axes,
        location="bottom",
        shrink=0.5,
        aspect=40,
        extend="max" if top > MAX_RATIO else "neither",
        label="load ÷ balanced load (0 dead, 1 balanced)",
    )
    return figure, panels


def _dead_cells(row: LevelHealth) -> set[int]:
    """The experts counted in ``row.dead_share``: never picked (top-k), or under the dense floor (a dense router)."""
    count = round(row.dead_share * len(row.load))
    return set(sorted(range(len(row.load)), key=lambda e: row.load[e])[:count])


def _draw_panel(axis, panel: LoadPanel, norm):
    """One heatmap: layers down, experts across; the layer's entropy and dead experts on the right."""
    width = panel.experts
    ratios = np.full((len(panel.rows), width), np.nan)
    for i, row in enumerate(panel.rows):
        ratios[i, : len(row.load)] = np.asarray(row.load) * len(row.load)
    image = axis.imshow(ratios, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    axis.set_title(f"{panel.projection} · level {panel.level}  ({width} experts, balanced {1 / width:.0%})", fontsize=9)
    axis.set_xticks(range(width), [str(e) for e in range(width)], fontsize=7)
    axis.set_xlabel("expert", fontsize=8)
    labels = [panel.row_label(row) for row in panel.rows]
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    right = axis.secondary_yaxis("right")
    right.set_yticks(range(len(labels)), [_summary(row) for row in panel.rows], fontsize=7)
    for tick, row in zip(right.get_yticklabels(), panel.rows):
        if row.collapsed:
            tick.set_color("crimson")
    annotate = len(panel.rows) <= ANNOTATE_CELLS and width <= ANNOTATE_CELLS
    for i, row in enumerate(panel.rows):
        dead = _dead_cells(row)
        for j, share in enumerate(row.load):
            if j in dead:
                axis.text(j, i, "×", ha="center", va="center", color="white", fontsize=8)
            elif annotate:  # white on the dark ends of the scale, black on the light middle
                colour = "white" if abs(norm(share * len(row.load)) - 0.5) > 0.3 else "black"
                axis.text(j, i, f"{share:.0%}", ha="center", va="center", color=colour, fontsize=6)
    return image


def plot_expert_load(health: list[LevelHealth], path: str | Path) -> Path:
    """The routing health of a run as a grid of heatmaps, one per projection (``mlp.gate_proj``, ...) and level:
    decoder layers down, experts across, colour = share of routed slots; beside each layer its load entropy and
    dead experts (red: collapsed). Readable from a 2-layer test model to 30 layers × 3 projections × 2 levels."""
    plt = _pyplot()
    figure, _ = expert_load_figure(health)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
