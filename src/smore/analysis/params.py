"""Parameter and compute cost of adapters (SPEC §1.7), written analytically from the config and layer shapes.

Nothing here builds a module: each method's cost model (closed forms of its config, in its file under ``adapters/``,
part of its record) gives one layer's counts, and the tests check that they equal
``sum(p.numel() for p in build(config, d_in, d_out).parameters())`` exactly, so a change to a delta that adds or
drops a tensor is caught. :func:`model_report` sums them over the layers a config would adapt in a model.

Notation (SPEC §1.1), levels bottom first: ``s_ℓ`` experts, ``f_ℓ`` fanout, ``r_ℓ`` rank, ``d_ℓ`` message widths
(``d_0 = 0``, ``d_L`` the top width; ``s·r`` at every level for the shared pool), ``F_ℓ`` slots per token,
``d_g,ℓ`` router widths, ``d_down`` the router down-projection, ``d_in,ℓ = d_down + Σ_{j>ℓ} d_g,j`` the width of
level ℓ's router input. "FLOPs" are multiply-adds (MACs) of the matrix products; bias additions, activations,
softmax, top-k and gathers are element-wise or O(s) per slot and left out.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from smore.adapters.base import parameter_count
from smore.adapters.method import CostModel, Counts
from smore.adapters.smore import PaperOverhead, paper_overhead
from smore.config import AdapterConfig
from smore.errors import UserError
from smore.inject import module_shape
from smore.registry import METHODS, get_method

logger = logging.getLogger(__name__)

__all__ = [
    "COST_MODELS",
    "LayerReport",
    "ModelReport",
    "PaperOverhead",
    "layer_costs",
    "model_report",
    "paper_overhead",
]

COST_MODELS: dict[str, CostModel] = {name: method.costs for name, method in METHODS.items()}
"""Method name → its cost functions, read from the method records (a view for lookups; the records are the source)."""


def cost_model(method: str) -> CostModel:
    """The cost model of ``method``."""
    if method not in COST_MODELS:
        raise UserError(
            f"method={method!r} has no cost model in smore.analysis.params.COST_MODELS; registered: "
            f"{sorted(COST_MODELS)}. A method's record (adapters/<method>.py, METHOD.costs) gives it."
        )
    return COST_MODELS[method]


def layer_costs(config: AdapterConfig, in_features: int, out_features: int) -> dict[str, Counts | None]:
    """``{"parameters", "active", "flops"}`` breakdowns of one adapter (``None`` where the method has none)."""
    model = cost_model(config.method)
    return {
        "parameters": model.parameters(config, in_features, out_features),
        "active": None if model.active is None else model.active(config, in_features, out_features),
        "flops": None if model.flops is None else model.flops(config, in_features, out_features),
    }


@dataclass(frozen=True)
class LayerReport:
    """Cost of the adapter on one target layer."""

    name: str
    in_features: int
    out_features: int
    parameters: int
    active: int | None
    flops: int | None


@dataclass
class ModelReport:
    """Cost of adapting a whole model with one config: per target layer and summed."""

    method: str
    layers: list[LayerReport] = field(default_factory=list)
    base_parameters: int = 0
    """Parameters of the model before adaptation."""

    @property
    def trainable(self) -> int:
        """Adapter parameters over all target layers: the trainable count after ``smore.adapt``."""
        return sum(layer.parameters for layer in self.layers)

    @property
    def active(self) -> int | None:
        """Active adapter parameters per token, summed over layers (``None`` if the method has no formula)."""
        values = [layer.active for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def flops(self) -> int | None:
        """Adapter multiply-adds per token, summed over layers (``None`` if the method has no formula)."""
        values = [layer.flops for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def trainable_share(self) -> float:
        """Trainable adapter parameters as a fraction of all parameters after adaptation."""
        return self.trainable / max(self.trainable + self.base_parameters, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "modules": len(self.layers),
            "trainable": self.trainable,
            "active": self.active,
            "flops_per_token": self.flops,
            "base_parameters": self.base_parameters,
            "trainable_share": self.trainable_share,
            "layers": [asdict(layer) for layer in self.layers],
        }


def model_report(model: nn.Module, config: AdapterConfig) -> ModelReport:
    """Cost of adapting ``model`` (not yet adapted) with ``config``, without building any adapter.

    The targets are those :func:`smore.inject.find_targets` selects, so ``report.trainable`` equals the trainable
    parameter count after ``smore.adapt(model, config)``.
    """
    if not isinstance(config, AdapterConfig):
        raise UserError(f"config must be an AdapterConfig (e.g. SMoREConfig), got {type(config).__name__}.")
    cost_model(config.method)  # fail before walking the model if the method has no cost model
    report = ModelReport(method=config.method, base_parameters=sum(parameter_count(p) for p in model.parameters()))
    method = get_method(config.method)
    targets = method.find(model, config)
    cache: dict[tuple[str, int, int], LayerReport] = {}  # many layers share a shape; the formulas only see it
    for name, module in targets.items():
        layer_config = method.layer_config(config, module)  # e.g. MixLoRA's attention layers carry a plain LoRA
        in_features, out_features = module_shape(module)
        key = (layer_config.method, in_features, out_features)
        if key not in cache:
            costs = layer_costs(layer_config, in_features, out_features)
            cache[key] = LayerReport(
                name="",
                in_features=in_features,
                out_features=out_features,
                parameters=costs["parameters"]["total"],
                active=None if costs["active"] is None else costs["active"]["total"],
                flops=None if costs["flops"] is None else costs["flops"]["total"],
            )
        report.layers.append(replace(cache[key], name=name))
    logger.debug("model report: %d %s adapters, %d trainable", len(report.layers), config.method, report.trainable)
    return report
