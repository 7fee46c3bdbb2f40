"""The expert-load picture: one heatmap per (projection, level), decoder layers down and experts across, a size a
screen shows from a 2-layer test model to a 30-layer model with 3 projections and 2 levels."""

from __future__ import annotations

import math
import random

import matplotlib.image
import pytest
import torch

import smore
from helpers import small_smore, tiny_batch, tiny_llama
from smore.plots import expert_load_figure, load_panels, plot_expert_load
from smore.routing.stats import LevelHealth, routing_health, tracking


def synthetic_health(layers: int, projections=("gate_proj", "up_proj", "down_proj"), levels=(4, 8), seed=0):
    rng = random.Random(seed)
    health = []
    for layer in range(layers):
        for projection in projections:
            for level, experts in enumerate(levels):
                weights = [rng.random() ** 3 for _ in range(experts)]
                weights[0] *= rng.random() < 0.8  # some experts dead
                load = [w / sum(weights) for w in weights]
                entropy = -sum(p * math.log(p) for p in load if p > 0) / math.log(experts)
                dead = sum(p == 0 for p in load) / experts
                health.append(LevelHealth(f"model.layers.{layer}.mlp.{projection}", level, load, entropy, dead, 1e3))
    return health


def pixel_size(path) -> tuple[int, int]:
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_ninety_adapters_make_six_panels_of_thirty_layers_on_one_screen(tmp_path):
    health = synthetic_health(30)
    assert len(health) == 180
    figure, panels = expert_load_figure(health)
    assert [(p.projection, p.level) for p in panels] == [
        (f"mlp.{name}", level) for level in (0, 1) for name in ("gate_proj", "up_proj", "down_proj")
    ]
    assert all(len(panel.rows) == 30 for panel in panels)
    assert [panels[0].row_label(row) for row in panels[0].rows][:2] == ["layer 0", "layer 1"]
    heatmaps = [axis for axis in figure.axes if axis.images and axis.get_visible()]
    assert len(heatmaps) == 6
    path = plot_expert_load(health, tmp_path / "expert_load.png")
    width, height = pixel_size(path)
    assert 800 < width < 2500 and 800 < height < 2500, (width, height)


def test_a_two_layer_model_gets_one_panel_per_projection_and_level(tmp_path):
    model = smore.adapt(tiny_llama(), small_smore(init="normal"))
    with tracking(model), torch.no_grad():
        model(**tiny_batch(batch=4, length=16))
    health = routing_health(model)
    panels = load_panels(health)
    assert len(panels) == len({(h.module.rsplit(".", 1)[-1], h.level) for h in health}) == 6
    assert all(len(panel.rows) == 2 for panel in panels)
    width, height = pixel_size(plot_expert_load(health, tmp_path / "expert_load.png"))
    assert 600 < width < 2500 and 300 < height < 1200, (width, height)


def test_modules_without_a_layer_number_are_rows_of_their_own():
    health = [LevelHealth("encoder.proj", 0, [0.5, 0.5], 1.0, 0.0), LevelHealth("head", 0, [1.0, 0.0], 0.0, 0.5)]
    panels = load_panels(health)
    assert [(p.projection, [p.row_label(r) for r in p.rows]) for p in panels] == [
        ("encoder.proj", ["encoder.proj"]),
        ("head", ["head"]),
    ]


def test_no_routing_counts_is_a_user_error(tmp_path):
    with pytest.raises(smore.UserError, match="no routing counts"):
        plot_expert_load([], tmp_path / "x.png")
