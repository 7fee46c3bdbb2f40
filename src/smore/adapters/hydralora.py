"""HydraLoRA (Tian et al., 2024): one shared A, E heads B_i (zero init), a bias-free router with a dense softmax:
``Δy = Σ_i p_i (alpha/r) B_i A x``.

Vectorised: the outer product of the router weights (N, E) and ``A x`` (N, r) is multiplied by the stacked heads
(d_out, E·r) in one matmul.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class HydraLoRADelta(nn.Module):
    def __init__(
        self, *, in_features: int, out_features: int, num_experts: int, rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank))  # heads stacked by columns
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self.aux_loss = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.router(x).softmax(dim=-1)  # (N, E)
        hidden = self.lora_A(self.dropout(x))  # (N, r)
        mixed = (weights.unsqueeze(-1) * hidden.unsqueeze(1)).flatten(1)  # (N, E·r): p_i · A x per head
        return (mixed @ self.lora_B.t()) * self.scaling


def build_hydralora(config, in_features: int, out_features: int) -> HydraLoRADelta:
    return HydraLoRADelta(
        in_features=in_features,
        out_features=out_features,
        num_experts=config.num_experts,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
    )
