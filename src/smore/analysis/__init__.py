"""Analysis of adapters without training: parameter and compute cost (SPEC §1.7), structural flexibility Γ (§1.6).

Every function is a pure function of a config and layer shapes (or, for :func:`empirical_gamma`, of one adapter and
one token); :mod:`smore.analysis.cli` exposes them as ``smore analyze``.
"""

from smore.adapters.method import CostModel
from smore.adapters.smore import (
    PaperOverhead,
    paper_overhead,
    smore_active_parameters,
    smore_flops_per_token,
    smore_parameter_counts,
)
from smore.analysis.flexibility import (
    empirical_gamma,
    enumerate_routing_trees,
    gamma_flat_bound,
    gamma_moe,
    gamma_smore,
)
from smore.analysis.params import COST_MODELS, LayerReport, ModelReport, layer_costs, model_report

__all__ = [
    "COST_MODELS",
    "CostModel",
    "LayerReport",
    "ModelReport",
    "PaperOverhead",
    "empirical_gamma",
    "enumerate_routing_trees",
    "gamma_flat_bound",
    "gamma_moe",
    "gamma_smore",
    "layer_costs",
    "model_report",
    "paper_overhead",
    "smore_active_parameters",
    "smore_flops_per_token",
    "smore_parameter_counts",
]
