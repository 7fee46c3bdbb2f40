"""MoLoRA, a mixture of LoRA experts per linear layer (SPEC §2): ``Δy = Σ_{i ∈ top-k} p_i (alpha/r) B_i A_i x``,
``p = softmax(W_g x)`` restricted to the top-k experts and renormalised (k = 1 keeps the softmax value, as the
Switch gate of :mod:`smore.routing.gates`); optional Switch-style load-balancing loss ``w · E · Σ_j f_j P_j``.

With ``alpha = rank`` the scaling is 1 and this is SPEC §2's ``Σ p_i B_i A_i x`` literally; with one expert and
top-1 it is LoRA (p = 1).

Vectorised without gathering expert matrices: all experts' A projections come from one matmul (N, E·r); the gate
weights, spread over each expert's r columns (zero for unselected experts), multiply them; one matmul with the
stacked B (d_out, E·r) sums the experts. The cost is that of a LoRA of rank E·r, whatever k is.
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
    check_config,
    check_features,
    mixture_search,
    with_total,
)
from smore.checks import check_int, check_number, is_int
from smore.errors import UserError
from smore.routing.gates import SwitchGate
from smore.routing.stats import ExpertSelection


@dataclass
class MoLoRAConfig(LoRAConfig):
    """MoLoRA: a mixture of ``num_experts`` LoRA experts per layer, top-k of ``softmax(W_g x)`` renormalised."""

    method: ClassVar[str] = "molora"
    alpha_optional: ClassVar[bool] = True

    alpha: float | None = None
    """Scaling numerator (updates times alpha / rank); null: no scaling, SPEC §2's ``Σ p_i B_i A_i x``."""

    num_experts: int = 4
    """E: LoRA experts per adapted layer."""
    top_k: int = 2
    """Experts used per token."""
    balance_weight: float = 0.0
    """Weight of the Switch-style load-balancing loss (0 turns it off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)
        check_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise UserError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; use at most num_experts.")
        check_number("balance_weight", self.balance_weight, low=0)


class MoLoRADelta(nn.Module):
    """E LoRA experts and a bias-free router ``W_g`` on one ``in_features → out_features`` layer.

    Parameters: ``router.weight`` (E, d_in); ``lora_A`` (E·r, d_in), expert i in rows ``[i r, (i+1) r)``;
    ``lora_B`` (d_out, E·r), expert i in columns ``[i r, (i+1) r)``, zero at init. ``aux_loss`` holds the gate's
    load-balancing loss of the last forward (0 when ``balance_weight`` is 0).
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        balance_weight: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_lora_arguments(rank=rank, alpha=alpha, dropout=dropout)
        if not is_int(num_experts) or num_experts < 1:
            raise UserError(f"num_experts={num_experts!r} must be a positive integer.")
        if not is_int(top_k) or not 1 <= top_k <= num_experts:
            raise UserError(f"top_k={top_k!r} must be an integer in [1, num_experts={num_experts}].")
        self.num_experts, self.top_k, self.rank, self.scaling = num_experts, top_k, rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.gate = SwitchGate(num_experts=num_experts, top_k=top_k, balance_weight=balance_weight)
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, in_features))  # experts stacked by rows
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank))  # experts stacked by columns
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan-in d_in: U(±1/√d_in), as each expert alone
        self.aux_loss: torch.Tensor | None = None
        self.last_selection: ExpertSelection | None = None  # what the last forward routed (RoutedDelta)

    def expert_weights(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Dense (N, E) gate weights: p_i for the selected experts, 0 elsewhere; stores the aux loss."""
        out = self.gate(self.router(x), valid=valid)
        self.aux_loss = out.aux_loss
        self.last_selection = ExpertSelection((out.indices,), (self.num_experts,), valid)  # for RoutingTracker
        return torch.zeros_like(out.probs).scatter(-1, out.indices, out.weights)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``Δy`` (N, d_out) for tokens ``x`` (N, d_in); ``valid`` (N,) keeps padding out of the aux loss."""
        weights = self.expert_weights(x, valid)  # (N, E)
        hidden = self.dropout(x) @ self.lora_A.t()  # (N, E·r): every expert's A x
        hidden = hidden * weights.repeat_interleave(self.rank, dim=-1)  # (N, E·r): p_i A_i x, 0 if not selected
        return (hidden @ self.lora_B.t()) * self.scaling  # (N, d_out): Σ_i p_i B_i A_i x


def build_molora(config, in_features: int, out_features: int) -> MoLoRADelta:
    """Builder: a :class:`MoLoRAConfig` to the keyword arguments of :class:`MoLoRADelta`."""
    return MoLoRADelta(
        in_features=in_features,
        out_features=out_features,
        num_experts=config.num_experts,
        top_k=config.top_k,
        rank=config.rank,
        alpha=config.scaling * config.rank,  # null alpha: scaling 1, SPEC §2's Σ p_i B_i A_i x
        balance_weight=config.balance_weight,
        dropout=config.dropout,
    )


def molora_parameter_counts(config: MoLoRAConfig, in_features: int, out_features: int) -> Counts:
    """MoLoRA: ``{"A": E r d_in, "B": E r d_out, "router": d_in E, "total": E r (d_in + d_out) + d_in E}``."""
    config = check_config(config, MoLoRAConfig)
    check_features(in_features, out_features)
    experts, rank = config.num_experts, config.rank
    return with_total(
        {"A": experts * rank * in_features, "B": experts * rank * out_features, "router": in_features * experts}
    )


def molora_active_parameters(config: MoLoRAConfig, in_features: int, out_features: int) -> Counts:
    """Parameters one token uses: the top-k experts' A and B and the whole router, ``k r (d_in + d_out) + d_in E``."""
    config = check_config(config, MoLoRAConfig)
    check_features(in_features, out_features)
    k, rank = config.top_k, config.rank
    return with_total(
        {"A": k * rank * in_features, "B": k * rank * out_features, "router": in_features * config.num_experts}
    )


def molora_flops_per_token(config: MoLoRAConfig, in_features: int, out_features: int) -> Counts:
    """Multiply-adds per token of this library's MoLoRA forward: it computes **every** expert, routed or not.

    ``router``: ``d_in E``;  ``A``: all experts' A in one matmul, ``d_in E r``;  ``B``: the stacked B on the
    gate-weighted (mostly zero) hidden, ``E r d_out``. The gate and the weighting are element-wise, left out.
    """
    return molora_parameter_counts(config, in_features, out_features)


METHOD = Method(
    name="molora",
    config_class=MoLoRAConfig,
    build=build_molora,
    costs=CostModel(molora_parameter_counts, molora_active_parameters, molora_flops_per_token),
    search=mixture_search(lambda: MoLoRAConfig(num_experts=4, top_k=2), max_experts=8),
)
