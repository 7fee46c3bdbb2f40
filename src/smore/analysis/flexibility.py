"""Structural flexibility Γ (SPEC §1.6): how many distinct outputs the routing trees of one token can produce.

Closed forms from the S'MoRE paper (exact, as Python ints) and a brute-force check that enumerates every routing
tree of a real :class:`~smore.adapters.smore.SMoREDelta` and counts the distinct outputs.

Levels are bottom first (ℓ = 0 the leaves), ``num_experts[ℓ] = s_ℓ``, ``top_k[ℓ] = f_ℓ``, ``F_ℓ = ∏_{j≥ℓ} f_j``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence

import torch

from smore.adapters.smore import SMoREDelta, slot_counts, structures
from smore.checks import is_int
from smore.errors import UserError
from smore.routing.types import TreeRouting

logger = logging.getLogger(__name__)

MAX_TREES = 200_000
"""Default ceiling on the number of routing trees ``empirical_gamma`` enumerates (time and the O(N²) comparison)."""


def _check_levels(num_experts: Sequence[int], top_k: Sequence[int]) -> tuple[list[int], list[int]]:
    """Validate per-level lists; the same rules as :class:`~smore.config.SMoREConfig` so the messages agree."""
    num_experts, top_k = list(num_experts), list(top_k)
    if not num_experts:
        raise UserError("num_experts must have at least one level, e.g. [4, 4].")
    if len(top_k) != len(num_experts):
        raise UserError(
            f"top_k has {len(top_k)} entries but num_experts has {len(num_experts)} levels; "
            "give one top_k entry per level (bottom level first)."
        )
    for name, values in (("num_experts", num_experts), ("top_k", top_k)):
        for i, v in enumerate(values):
            if not is_int(v) or v < 1:
                raise UserError(f"{name}[{i}]={v!r} must be an integer >= 1.")
    for level, (s, f) in enumerate(zip(num_experts, top_k)):
        if f > s:
            raise UserError(f"top_k[{level}]={f} exceeds num_experts[{level}]={s}; pick at most num_experts experts.")
    return num_experts, top_k


def gamma_smore(num_experts: Sequence[int], top_k: Sequence[int]) -> int:
    """Theorem 3.4: ``Γ = ∏_ℓ C(s_ℓ, f_ℓ)^{F_{ℓ+1}}`` for S'MoRE with a non-linear σ.

    Every one of the ``F_{ℓ+1}`` parent slots of level ℓ+1 independently picks an ``f_ℓ``-subset of level ℓ, so this
    is also the number of routing trees. Example: s = [4, 4], f = [2, 2] gives 6 · 6² = 216.
    """
    num_experts, top_k = _check_levels(num_experts, top_k)
    return structures(num_experts, top_k)


def gamma_flat_bound(num_experts: Sequence[int], top_k: Sequence[int]) -> int:
    """Theorem 3.3: the upper bound ``C(s_{L-1}, f_{L-1}) · ∏_{ℓ<L-1} Σ_{i=f_ℓ}^{min(F_ℓ, s_ℓ)} C(s_ℓ, i)``.

    A flat mixture ("MoMOR") only sees which experts of each lower level are active at all (between ``f_ℓ`` and
    ``min(F_ℓ, s_ℓ)`` of them), not which parent picked them. Example: s = [4, 4], f = [2, 2] gives 6 · 11 = 66.
    """
    num_experts, top_k = _check_levels(num_experts, top_k)
    slots = slot_counts(top_k)
    top = len(num_experts) - 1
    bound = math.comb(num_experts[top], top_k[top])
    for level in range(top):
        s, f = num_experts[level], top_k[level]
        bound *= sum(math.comb(s, i) for i in range(f, min(slots[level], s) + 1))
    return bound


def gamma_moe(num_experts: int, top_k: int) -> int:
    """A one-level MoE with ``num_experts`` experts and top-``top_k`` routing: ``C(E, k)`` expert sets."""
    (num_experts,), (top_k,) = _check_levels([num_experts], [top_k])
    return math.comb(num_experts, top_k)


def enumerate_routing_trees(num_experts: Sequence[int], top_k: Sequence[int]) -> list[torch.Tensor]:
    """Every routing tree as forced selections: one (N, F_ℓ) long tensor per level, bottom first.

    Tree t is a mixed-radix number with one digit per parent slot (top level first): the digit picks that slot's
    sorted ``f_ℓ``-subset of level ℓ (sorted because the mixture is symmetric in its children, so order would only
    duplicate trees). Slots are parent-major, as :class:`~smore.routing.types.TreeRouting` lays them out.
    """
    num_experts, top_k = _check_levels(num_experts, top_k)
    slots = slot_counts(top_k)
    levels = len(num_experts)
    combos = [
        torch.combinations(torch.arange(s), r=f) if f > 1 else torch.arange(s).unsqueeze(1)
        for s, f in zip(num_experts, top_k)
    ]  # (C(s_ℓ, f_ℓ), f_ℓ) sorted subsets
    total = gamma_smore(num_experts, top_k)
    tree = torch.arange(total)
    stride = 1
    forced: list[torch.Tensor] = [torch.empty(0)] * levels
    # Least-significant digits are the lowest slots, so neighbouring trees differ near the leaves.
    for level in range(levels):
        table = combos[level]
        per_slot = []
        for _ in range(slots[level + 1]):
            digit = (tree // stride) % table.shape[0]
            per_slot.append(table[digit])  # (N, f_ℓ)
            stride *= table.shape[0]
        forced[level] = torch.cat(per_slot, dim=1)  # (N, F_ℓ), parent slot p owns columns [p f_ℓ, (p+1) f_ℓ)
    return forced


def count_distinct(rows: torch.Tensor, tol: float = 1e-6, chunk: int = 4096) -> int:
    """Number of rows not within ``tol`` (max-abs distance, relative to ``max(1, max|rows|)``) of an earlier row.

    For well-separated clusters this is the number of clusters; it avoids rounding to a grid, whose cell borders
    would split two equal outputs that differ in the last bits.
    """
    if tol < 0:
        raise UserError(f"tol={tol!r} must be >= 0, e.g. 1e-6.")
    rows = rows.reshape(rows.shape[0], -1)
    threshold = tol * max(1.0, float(rows.abs().max())) if rows.numel() else tol
    distinct = 0
    for start in range(0, rows.shape[0], chunk):
        block = rows[start : start + chunk]
        distance = torch.cdist(block, rows[: start + block.shape[0]], p=float("inf"))  # (b, start + b)
        earlier = torch.arange(start + block.shape[0]).unsqueeze(0) < torch.arange(
            start, start + block.shape[0]
        ).unsqueeze(1)
        duplicate = ((distance <= threshold) & earlier).any(dim=1)
        distinct += int((~duplicate).sum())
    return distinct


@torch.no_grad()
def empirical_gamma(
    delta: SMoREDelta,
    x: torch.Tensor,
    tol: float = 1e-6,
    *,
    weights: str = "router",
    max_trees: int = MAX_TREES,
) -> int:
    """Brute-force Γ: run ``delta`` on token ``x`` (d,) under every routing tree and count the distinct outputs.

    All trees go through one router call (forced selections) and one forward, as N rows of the same token. The
    work runs on a float64 copy in eval mode (no gate noise), so ``delta`` itself is left untouched and
    distinctness does not drown in float32 rounding.

    ``weights="router"`` (SPEC §1.6) keeps the α the gates compute for the forced experts. ``weights="uniform"``
    replaces every α by ``1/f_ℓ``, so only the tree's structure can tell two outputs apart. That is the setting in
    which identity σ loses trees (a child picked by two parents adds up into one term, and swapping two parents'
    child sets changes nothing). With router weights this library's router conditions each child's α on its
    parent's key, so even identity σ generically separates every tree: there the count stays at Γ.

    The output is ``W_proj x_L + p``: an adapter whose ``W_proj`` is zero (``init="w_final_zero"``, the default, or
    ``eq_1_layer``) gives 1, and ``out_features < d_L`` can merge trees; build it with ``init="normal"``. With a
    non-linear σ such as tanh the count reaches Theorem 3.4's Γ.
    """
    if not isinstance(delta, SMoREDelta):
        raise UserError(f"delta must be an SMoREDelta, got {type(delta).__name__}; build one with build_smore.")
    gates = {type(level.gate).__name__ for level in delta.router.levels}
    if "DenseGate" in gates:
        raise UserError(
            "empirical_gamma cannot enumerate a gate='dense' adapter: the dense gate always uses every expert, so "
            "there is exactly one routing tree. Build the adapter with gate='switch' or 'noisy_topk'."
        )
    if weights not in ("router", "uniform"):
        raise UserError(f"weights={weights!r} is unknown; use 'router' (the gates' α) or 'uniform' (α = 1/f).")
    if x.dim() != 1 or x.shape[0] != delta.in_features:
        raise UserError(f"x must be one token of shape ({delta.in_features},), got {tuple(x.shape)}.")
    num_experts, top_k = delta.num_experts, delta.fanouts
    total = gamma_smore(num_experts, top_k)
    if total > max_trees:
        raise UserError(
            f"num_experts={num_experts}, top_k={top_k} has {total} routing trees, more than max_trees={max_trees}; "
            "use fewer experts or levels, or raise max_trees."
        )
    work = copy.deepcopy(delta).double().eval()  # a copy: the caller's module keeps its dtype and mode
    forced = enumerate_routing_trees(num_experts, top_k)
    device = work.A.device
    forced = [f.to(device) for f in forced]
    tokens = x.detach().to(device=device, dtype=torch.float64).unsqueeze(0).expand(total, -1).contiguous()
    routing: TreeRouting = work.router(tokens, forced=forced)
    if weights == "uniform":
        routing = dataclasses.replace(
            routing, weights=tuple(torch.full_like(w, 1.0 / f) for w, f in zip(routing.weights, top_k))
        )
    outputs = work(tokens, routing=routing)
    distinct = count_distinct(outputs, tol=tol)
    logger.debug("empirical Γ: %d distinct outputs from %d routing trees", distinct, total)
    return distinct
