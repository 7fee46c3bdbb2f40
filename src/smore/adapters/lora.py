"""LoRA (Hu et al., 2021): ``Δy = (alpha / r) · B A dropout(x)``, A Kaiming-uniform, B = 0 at init.

::

    x ──► dropout ──► A (r × d_in) ──► B (d_out × r) ──► · alpha/r ──► Δy

Parameter names and initialisation follow HF PEFT's ``lora.Linear`` (``lora_A``/``lora_B`` as bias-free
``nn.Linear``), so the same weights give the same outputs as PEFT and adapters convert key for key
(:mod:`smore.interop.peft`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from smore.adapters.method import (
    CostModel,
    Counts,
    Method,
    SearchSpace,
    check_config,
    check_features,
    set_rank,
    with_total,
)
from smore.checks import check_int, check_number, is_int, is_number
from smore.config import AdapterConfig
from smore.errors import UserError


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``Δy = (alpha / rank) B A x`` (HF PEFT's LoRA, same weights and outputs)."""

    method: ClassVar[str] = "lora"

    rank: int = 8
    """r: the rank of the update."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in training only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank)
        if self.alpha is not None or not self.alpha_optional:
            check_number("alpha", self.alpha, low=0, open_low=True)
        check_number("dropout", self.dropout, low=0, high=1)

    alpha_optional: ClassVar[bool] = False

    @property
    def scaling(self) -> float:
        """The factor on every update: alpha / rank (1 when alpha is null, where the method allows it)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


def check_lora_arguments(*, rank: int, alpha: float, dropout: float) -> None:
    """The checks every LoRA-style delta shares; ``ValueError`` naming the argument."""
    if not is_int(rank) or rank < 1:
        raise UserError(f"rank={rank!r} must be a positive integer.")
    if not is_number(alpha) or alpha <= 0:
        raise UserError(f"alpha={alpha!r} must be a positive number (the update is scaled by alpha / rank).")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise UserError(f"dropout={dropout!r} must be a number in [0, 1).")


class LoRADelta(nn.Module):
    """``d_in → r → d_out`` low-rank update, scaled by ``alpha / rank``.

    Parameters: ``lora_A`` (``nn.Linear(d_in, r)``, weight (r, d_in)), ``lora_B`` (``nn.Linear(r, d_out)``, weight
    (d_out, r), zero at init). ``r (d_in + d_out)`` parameters in all.
    """

    def __init__(self, *, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        check_lora_arguments(rank=rank, alpha=alpha, dropout=dropout)
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.aux_loss = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``Δy`` (N, d_out) for tokens ``x`` (N, d_in); ``valid`` is unused (no routing)."""
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # (N, r) -> (N, d_out)


def build_lora(config, in_features: int, out_features: int) -> LoRADelta:
    """Builder: a :class:`LoRAConfig` to the keyword arguments of :class:`LoRADelta`."""
    return LoRADelta(
        in_features=in_features, out_features=out_features, rank=config.rank, alpha=config.alpha, dropout=config.dropout
    )


def lora_parameter_counts(config: LoRAConfig, in_features: int, out_features: int) -> Counts:
    """LoRA: ``{"A": r d_in, "B": r d_out, "total": r (d_in + d_out)}``. Every token uses all of them."""
    config = check_config(config, LoRAConfig)
    check_features(in_features, out_features)
    return with_total({"A": config.rank * in_features, "B": config.rank * out_features})


def lora_flops_per_token(config: LoRAConfig, in_features: int, out_features: int) -> Counts:
    """LoRA multiply-adds per token: ``{"A": d_in r, "B": r d_out, "total"}`` (the same numbers as its parameters)."""
    return lora_parameter_counts(config, in_features, out_features)


def merge_lora(wrapper: nn.Module) -> None:
    """Fold ``(alpha / r) B A`` into the base weight of ``wrapper`` (an ``AdaptedLinear``), in the base's dtype;
    transformers' ``Conv1D`` stores its weight as (d_in, d_out), the transpose of ``nn.Linear``'s."""
    base, delta = wrapper.base_layer, wrapper.delta
    with torch.no_grad():
        update = (delta.lora_B.weight.float() @ delta.lora_A.weight.float()) * delta.scaling  # (d_out, d_in)
        if not isinstance(base, nn.Linear):  # Conv1D, the only other layer AdaptedLinear wraps
            update = update.T
        base.weight.add_(update.to(device=base.weight.device, dtype=base.weight.dtype))


METHOD = Method(
    name="lora",
    config_class=LoRAConfig,
    build=build_lora,
    costs=CostModel(lora_parameter_counts, lora_parameter_counts, lora_flops_per_token),
    search=SearchSpace(
        default=LoRAConfig,
        resize=set_rank,
        describe=lambda c: f"r={c.rank}",
        gamma=lambda c: 1,
    ),
    merge=merge_lora,
)
