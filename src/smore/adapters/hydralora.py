"""HydraLoRA (Tian et al., 2024), SPEC §2: one shared A, E heads B_i (zero init), a bias-free router with a dense
softmax: ``Δy = Σ_i p_i (alpha/r) B_i A x``, ``p = softmax(W_g x)``. No auxiliary loss.

Vectorised: the outer product of the router weights (N, E) and ``A x`` (N, r) is multiplied by the stacked heads
(d_out, E·r) in one matmul.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smore.adapters.lora import check_lora_arguments


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
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r} must be a positive integer.")
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank))  # heads stacked by columns
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self.aux_loss = None

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (N, E) router weights ``softmax(W_g x)``: every head, every token."""
        return self.router(x).softmax(dim=-1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``Δy`` (N, d_out) for tokens ``x`` (N, d_in); ``valid`` is unused (dense router, no statistics)."""
        weights = self.expert_weights(x)  # (N, E)
        hidden = self.lora_A(self.dropout(x))  # (N, r): the shared A x
        mixed = (weights.unsqueeze(-1) * hidden.unsqueeze(1)).flatten(1)  # (N, E·r): p_i · A x per head
        return (mixed @ self.lora_B.t()) * self.scaling  # (N, d_out): Σ_i p_i B_i A x


def build_hydralora(config, in_features: int, out_features: int) -> HydraLoRADelta:
    """Builder: a :class:`~smore.config.HydraLoRAConfig` to the keyword arguments of :class:`HydraLoRADelta`."""
    return HydraLoRADelta(
        in_features=in_features,
        out_features=out_features,
        num_experts=config.num_experts,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
    )
