"""MoLoRA, a mixture of LoRA experts per linear layer: ``Δy = Σ_i p_i (alpha/r) B_i A_i x`` over the top-k experts
of ``softmax(W_g x)``, renormalised; optional Switch-style load-balancing loss.

Vectorised without gathering expert matrices: all experts' A projections come from one matmul (N, E·r); the gate
weights, spread over each expert's r columns (zero for unselected experts), multiply them; one matmul with the
stacked B (d_out, E·r) sums the experts. The cost is that of a LoRA of rank E·r.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smore.routing.gates import SwitchGate


class MoLoRADelta(nn.Module):
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
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.gate = SwitchGate(num_experts=num_experts, top_k=top_k, balance_weight=balance_weight)
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, in_features))  # experts stacked by rows
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank))  # experts stacked by columns
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.aux_loss: torch.Tensor | None = None

    def expert_weights(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Dense (N, E) gate weights: p_i for the selected experts, 0 elsewhere; stores the aux loss."""
        out = self.gate(self.router(x), valid=valid)
        self.aux_loss = out.aux_loss
        return torch.zeros_like(out.probs).scatter(-1, out.indices, out.weights)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.expert_weights(x, valid)  # (N, E)
        hidden = self.dropout(x) @ self.lora_A.t()  # (N, E·r)
        hidden = hidden * weights.repeat_interleave(self.rank, dim=-1)
        return (hidden @ self.lora_B.t()) * self.scaling


def build_molora(config, in_features: int, out_features: int) -> MoLoRADelta:
    return MoLoRADelta(
        in_features=in_features,
        out_features=out_features,
        num_experts=config.num_experts,
        top_k=config.top_k,
        rank=config.rank,
        alpha=config.alpha,
        balance_weight=config.balance_weight,
        dropout=config.dropout,
    )
