"""Typed routing results shared by the flat routers and the S'MoRE tree router."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GateOutput:
    """What one gate decides for M routing queries (tokens, or parent slots of tokens), each picking k experts."""

    indices: torch.Tensor
    """(M, k) long: the selected experts."""
    weights: torch.Tensor
    """(M, k): their mixing weights α."""
    probs: torch.Tensor
    """(M, s): the gate's full score distribution (softmax, or the normalised selection for noisy top-k), for
    routing statistics."""
    aux_loss: torch.Tensor
    """Scalar load-balancing loss, already multiplied by the balance weight (0 for gates without one)."""


@dataclass(frozen=True)
class TreeRouting:
    """Routing of a whole S'MoRE tree for N tokens; tuples are indexed by level, bottom (ℓ = 0) first.

    Slots of level ℓ are laid out parent-major: slot ``p * f_ℓ + j`` is the j-th child picked by parent slot ``p`` of
    level ℓ + 1, so ``indices[ℓ].view(N, F_ℓ₊₁, f_ℓ)`` groups the children of each parent.
    """

    indices: tuple[torch.Tensor, ...]
    """Per level, (N, F_ℓ) long: the expert in each slot."""
    weights: tuple[torch.Tensor, ...]
    """Per level, (N, F_ℓ): α of each slot with respect to its parent."""
    probs: tuple[torch.Tensor, ...]
    """Per level, (N, F_ℓ₊₁, s_ℓ): the full score distribution each parent slot computed over its level."""
    aux_loss: torch.Tensor
    """Scalar: the sum of the gates' load-balancing losses."""

    @property
    def num_levels(self) -> int:
        return len(self.indices)
