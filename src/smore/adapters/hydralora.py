"""HydraLoRA (Tian et al., 2024), SPEC §2: one shared A, E heads B_i (zero init), a bias-free router with a dense
softmax: ``Δy = Σ_i p_i (alpha/r) B_i A x``, ``p = softmax(W_g x)``. No auxiliary loss.

Vectorised: the outer product of the router weights (N, E) and ``A x`` (N, r) is multiplied by the stacked heads
(d_out, E·r) in one matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from smore.adapters.lora import LoRAConfig, check_lora_arguments
from smore.adapters.method import (
    CostModel,
    Counts,
    Method,
    SearchSpace,
    check_config,
    check_features,
    expert_variants,
    set_rank,
    with_total,
)
from smore.checks import check_int, is_int
from smore.errors import UserError
from smore.routing.stats import ExpertSelection


@dataclass
class HydraLoRAConfig(LoRAConfig):
    """HydraLoRA: one shared A, ``num_experts`` B heads, a dense softmax router without bias."""

    method: ClassVar[str] = "hydralora"

    num_experts: int = 4
    """E: B heads per adapted layer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)


class HydraLoRADelta(nn.Module):
    """A shared ``lora_A`` (``nn.Linear(d_in, r)``), E heads and a router on one ``in_features → out_features`` layer.

    Parameters: ``router.weight`` (E, d_in), no bias; ``lora_A.weight`` (r, d_in); ``lora_B`` (d_out, E·r), head i
    in columns ``[i r, (i+1) r)``, zero at init.
    """

    def __init__(
        self, *, in_features: int, out_features: int, num_experts: int, rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_lora_arguments(rank=rank, alpha=alpha, dropout=dropout)
        if not is_int(num_experts) or num_experts < 1:
            raise UserError(f"num_experts={num_experts!r} must be a positive integer.")
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank))  # heads stacked by columns
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self.aux_loss = None
        self.last_selection: ExpertSelection | None = None  # the last forward's router weights (RoutedDelta)

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (N, E) router weights ``softmax(W_g x)``: every head, every token."""
        return self.router(x).softmax(dim=-1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``Δy`` (N, d_out) for tokens ``x`` (N, d_in); ``valid`` only marks the real tokens for the routing
        statistics (a dense router: the tracker sums each head's weight, see ``smore.routing.stats``)."""
        weights = self.expert_weights(x)  # (N, E)
        self.last_selection = ExpertSelection((), (self.num_experts,), valid, weights=(weights.detach(),))
        hidden = self.lora_A(self.dropout(x))  # (N, r): the shared A x
        mixed = (weights.unsqueeze(-1) * hidden.unsqueeze(1)).flatten(1)  # (N, E·r): p_i · A x per head
        return (mixed @ self.lora_B.t()) * self.scaling  # (N, d_out): Σ_i p_i B_i A x


def build_hydralora(config, in_features: int, out_features: int) -> HydraLoRADelta:
    """Builder: a :class:`HydraLoRAConfig` to the keyword arguments of :class:`HydraLoRADelta`."""
    return HydraLoRADelta(
        in_features=in_features,
        out_features=out_features,
        num_experts=config.num_experts,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
    )


def hydralora_parameter_counts(config: HydraLoRAConfig, in_features: int, out_features: int) -> Counts:
    """HydraLoRA: ``{"A": r d_in, "B": E r d_out, "router": d_in E, "total"}``. The router is dense, so every
    token uses every parameter: this is also its active count."""
    config = check_config(config, HydraLoRAConfig)
    check_features(in_features, out_features)
    experts, rank = config.num_experts, config.rank
    return with_total({"A": rank * in_features, "B": experts * rank * out_features, "router": in_features * experts})


def hydralora_flops_per_token(config: HydraLoRAConfig, in_features: int, out_features: int) -> Counts:
    """Multiply-adds per token: ``router`` ``d_in E``, the shared ``A`` ``d_in r``, the stacked heads ``B``
    ``E r d_out`` (the outer product p ⊗ A x is element-wise, left out). Equal to the parameter counts."""
    return hydralora_parameter_counts(config, in_features, out_features)


METHOD = Method(
    name="hydralora",
    config_class=HydraLoRAConfig,
    build=build_hydralora,
    costs=CostModel(hydralora_parameter_counts, hydralora_parameter_counts, hydralora_flops_per_token),
    search=SearchSpace(
        default=lambda: HydraLoRAConfig(num_experts=4),
        resize=set_rank,
        describe=lambda c: f"E={c.num_experts} r={c.rank}",
        gamma=lambda c: 1,  # a dense softmax over all heads: one structure (Γ counts structures, not weightings)
        variants=expert_variants(2, 8, top_k=False),
    ),
)
