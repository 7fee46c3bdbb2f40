"""LoRA (Hu et al., 2021): ``Δy = (alpha / r) · B A dropout(x)``, A Kaiming-uniform, B = 0 at init.

Parameter names and initialisation follow HF PEFT's ``lora.Linear`` (``lora_A``/``lora_B`` as bias-free
``nn.Linear``), so the same weights give the same outputs as PEFT and adapters convert key for key.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRADelta(nn.Module):
    """``d_in → r → d_out`` low-rank update, scaled by ``alpha / rank``."""

    def __init__(self, *, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.aux_loss = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def build_lora(config, in_features: int, out_features: int) -> LoRADelta:
    return LoRADelta(
        in_features=in_features, out_features=out_features, rank=config.rank, alpha=config.alpha, dropout=config.dropout
    )
