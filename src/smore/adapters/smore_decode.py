"""S'MoRE's inference path for a few tokens at a time (decoding with a KV cache), SPEC §1 unchanged.

Decoding calls every adapter once per generated token, so an S'MoRE forward there costs its number of torch calls
(≈ 120 small ones against LoRA's 8), not its FLOPs. Without autograd the parameters are constants, and the forward
can be refolded into fewer, larger products, computed once per parameter update and kept in :class:`Folded`:

- **one token matmul** ``x [A; W₁,ℓ D …]ᵀ`` gives every expert's ``A x + a`` and, for every level's router, the
  down-projection already pushed through the first router layer (``W₁,ℓ [D x + d; keys] = (W₁,ℓ D) x + …``);
- the keys an ancestor hands down enter a child's first router layer linearly, so they become **lookup tables**
  ``T_{ℓ,j} = K_j W₁,ℓ[:, cols_j]ᵀ`` (one row per expert of the ancestor's level);
- the second router layer and the scores fold into one ``(d_g, s)`` matrix ``(K W₂)ᵀ`` for the dot-product gates
  (the noisy gate scores cosines, so it keeps ``W₂`` and the normalised keys);
- every expert's ``γ (B (A x + a) + b)`` of every level is **one matmul** by a block-sparse matrix when that matrix
  is no larger than ``A`` (small trees), else one batched matmul per level as in training.

The load-balancing loss is left as a thunk (:meth:`SMoREDelta.defer_aux_loss`) computed by the gates themselves
only when something reads it (a labelled evaluation call), so generation pays nothing for it. The tree combination
and W_proj are the training code's. Used only when :func:`applies`; ``tests/test_fast_paths.py`` checks it against
the plain forward for every gate, variant and depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smore.routing.gates import DenseGate, NoisyTopKGate
from smore.routing.stats import ExpertSelection

MAX_TOKENS = 64
"""Above this many tokens per call (prefill, scoring) the plain forward is as fast: its calls are amortised."""


def applies(delta, x: torch.Tensor) -> bool:
    """Inference without autograd on at most :data:`MAX_TOKENS` tokens, outside ``torch.compile`` (which fuses the
    plain forward itself and would only trace the table bookkeeping)."""
    return (
        not delta.training
        and not torch.is_grad_enabled()
        and x.shape[0] <= MAX_TOKENS
        and not torch.compiler.is_compiling()
    )


@dataclass
class LevelTables:
    """What one level's router needs at decode time."""

    handed_down: dict[int, torch.Tensor]
    """Ancestor level j → (s_j, d_g,ℓ): the first router layer applied to each key of level j."""
    score: torch.Tensor | None
    """(s, d_g): ``K W₂`` for dot-product gates (a linear map of the hidden layer); ``None`` for the noisy gate."""
    score_bias: torch.Tensor | None
    """(s,): ``K b₂``, or ``None`` for the noisy gate."""
    cosine_keys: torch.Tensor | None
    """(s, d_g) normalised keys, for the noisy gate only."""


@dataclass
class Folded:
    """The refolded matrices of one :class:`SMoREDelta`, valid while its parameters keep their versions."""

    params: list[torch.Tensor]
    versions: list[int]
    token_weight: torch.Tensor  # (R + Σ_ℓ d_g,ℓ, d_in): [A; W₁,ℓ D for every level]
    token_bias: torch.Tensor
    token_widths: list[int]  # R, then d_g,ℓ per level: the column blocks of the token matmul
    levels: list[LevelTables]
    experts: torch.Tensor | None  # (R, Σ_ℓ s_ℓ d_{ℓ+1}) block-sparse γ Bᵀ, or None for the per-level path
    experts_bias: torch.Tensor | None

    def current(self) -> bool:
        return [p._version for p in self.params] == self.versions


def use_block_experts(delta) -> bool:
    """One block-sparse matrix for every expert when it is no larger than A itself (its zeros then cost less than
    the per-level calls they replace)."""
    columns = sum(s * delta.widths[level + 1] for level, s in enumerate(delta.num_experts))
    return columns <= delta.in_features


@torch.no_grad()
def fold(delta, block: bool | None = None) -> Folded:
    """Build the tables of :class:`Folded` from the current parameters; ``block`` forces the expert layout."""
    router = delta.router
    d_down = router.down_proj.out_features
    router_dims = [level.keys.shape[1] for level in router.levels]
    rows, biases, tables = [delta.A], [delta.A_bias], []
    for level, level_router in enumerate(router.levels):
        first, second = level_router.mlp[0], level_router.mlp[2]
        w_down = first.weight[:, :d_down]  # the columns that read D x
        rows.append(w_down @ router.down_proj.weight)
        biases.append(w_down @ router.down_proj.bias + first.bias)
        handed_down, column = {}, d_down
        for ancestor in reversed(range(level + 1, delta.num_levels)):  # z = [D x; k_{L-1}; …; k_{ℓ+1}]
            width = router_dims[ancestor]
            ancestor_keys = scored_keys(router.levels[ancestor])
            handed_down[ancestor] = ancestor_keys @ first.weight[:, column : column + width].t()
            column += width
        if isinstance(level_router.gate, NoisyTopKGate):
            tables.append(LevelTables(handed_down, None, None, scored_keys(level_router)))
        else:
            keys = level_router.keys
            tables.append(LevelTables(handed_down, keys @ second.weight, keys @ second.bias, None))
    experts = experts_bias = None
    if use_block_experts(delta) if block is None else block:
        experts, experts_bias = block_experts(delta)
    params = list(delta.parameters())
    return Folded(
        params=params,
        versions=[p._version for p in params],
        token_weight=torch.cat(rows),
        token_bias=torch.cat(biases),
        token_widths=[delta.A.shape[0], *router_dims],
        levels=tables,
        experts=experts,
        experts_bias=experts_bias,
    )


def scored_keys(level_router) -> torch.Tensor:
    """The keys as the gate scores them, which are the keys handed down to the children (normalised for cosine)."""
    return level_router.gate.scores(level_router.keys[:1], level_router.keys)[1]


def block_experts(delta) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, Σ_ℓ s_ℓ d_{ℓ+1}): expert i of level ℓ maps its own A rows to its own column block, scaled by γ_ℓ."""
    reference = delta.A
    columns = [s * delta.widths[level + 1] for level, s in enumerate(delta.num_experts)]
    weight = reference.new_zeros(reference.shape[0], sum(columns))
    bias = reference.new_zeros(sum(columns))
    column = 0
    for level, s in enumerate(delta.num_experts):
        r, width, gamma = delta.ranks[level], delta.widths[level + 1], delta.scalings[level]
        pool = 0 if delta.shared_pool else level
        for expert in range(s):
            row = delta.a_offsets[level] + expert * r
            weight[row : row + r, column : column + width] = gamma * delta.B[pool][expert].t()
            bias[column : column + width] = gamma * delta.B_bias[pool][expert]
            column += width
    return weight, bias


def tables(delta) -> Folded:
    """The delta's :class:`Folded`, rebuilt when a parameter changed in place (an optimizer step, a load)."""
    folded = delta.__dict__.get("_folded")
    if folded is None or not folded.current():
        folded = delta.__dict__["_folded"] = fold(delta)
    return folded


def select(gate, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode selection of the gates (SPEC §1.3), on logits (N, P, s): indices and α, each (N, P, k)."""
    if isinstance(gate, DenseGate):
        probs = logits.softmax(dim=-1)
        return torch.arange(gate.num_experts, device=logits.device).expand_as(probs), probs
    if isinstance(gate, NoisyTopKGate):  # no noise outside training: top-k of the cosine logits
        chosen, indices = logits.topk(gate.top_k, dim=-1)
        return indices, chosen.softmax(dim=-1) if gate.top_k > 1 else chosen
    if gate.renormalize:  # Switch: the renormalised top-k of the softmax is the softmax of the top-k logits
        chosen, indices = logits.topk(gate.top_k, dim=-1)
        return indices, chosen.softmax(dim=-1)
    weights, indices = logits.softmax(dim=-1).topk(gate.top_k, dim=-1)
    return indices, weights


def route(delta, folded: Folded, token_terms: list[torch.Tensor]):
    """Top-down routing from the folded router columns (N, d_g,ℓ) of each level: per level (bottom first) indices
    and α (N, F_ℓ), and the logits (N, F_{ℓ+1}, s_ℓ) the deferred aux loss needs."""
    n = token_terms[0].shape[0]
    levels = delta.num_levels
    indices, weights, logits_by_level = [None] * levels, [None] * levels, [None] * levels
    slots = [1]  # F_{ℓ+1} for the level being routed, built top-down
    for level in reversed(range(levels)):
        level_router, table = delta.router.levels[level], folded.levels[level]
        hidden = token_terms[level].unsqueeze(1)  # (N, 1, d_g), broadcast over the parent slots
        for ancestor, lookup in table.handed_down.items():
            # The ancestor of level j of each parent slot: slots are parent-major, so it repeats F_{ℓ+1}/F_j times.
            ancestors = indices[ancestor].repeat_interleave(slots[0] // indices[ancestor].shape[1], dim=1)
            hidden = hidden + lookup[ancestors]  # (N, F_{ℓ+1}, d_g)
        hidden = level_router.mlp[1](hidden)
        if table.score is None:
            query = level_router.mlp[2](hidden)
            logits = F.normalize(query, dim=-1) @ table.cosine_keys.t()
        else:
            logits = F.linear(hidden, table.score, table.score_bias)  # (N, F_{ℓ+1}, s)
        chosen, alpha = select(level_router.gate, logits)
        indices[level], weights[level] = chosen.reshape(n, -1), alpha.reshape(n, -1)
        logits_by_level[level] = logits
        slots.insert(0, indices[level].shape[1])
    return indices, weights, logits_by_level


def slot_outputs(delta, folded: Folded, down: torch.Tensor, indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, U of the routed slots (N, F_ℓ, d_{ℓ+1})."""
    n = down.shape[0]
    if folded.experts is not None:
        every = torch.addmm(folded.experts_bias, down, folded.experts)  # (N, Σ_ℓ s_ℓ d_{ℓ+1})
        sizes = [s * delta.widths[level + 1] for level, s in enumerate(delta.num_experts)]
        per_level = [u.view(n, s, -1) for u, s in zip(every.split(sizes, dim=-1), delta.num_experts)]
    else:
        per_level = [
            delta._all_experts(down, level, delta.scalings[level]).transpose(0, 1) for level in range(delta.num_levels)
        ]  # (N, s_ℓ, d_{ℓ+1}) each
    return [u.gather(1, index.unsqueeze(-1).expand(-1, -1, u.shape[-1])) for u, index in zip(per_level, indices)]


def forward(delta, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Δy (N, d_out), equal to :meth:`SMoREDelta.forward` in eval mode; sets the same side outputs."""
    folded = tables(delta)
    projected = F.linear(x, folded.token_weight, folded.token_bias)  # (N, R + Σ d_g)
    down, *token_terms = projected.split(folded.token_widths, dim=-1)
    indices, weights, logits = route(delta, folded, token_terms)
    delta.defer_aux_loss(logits, indices, valid)
    delta.last_selection = ExpertSelection(tuple(indices), tuple(delta.num_experts), valid)
    message = None
    for level, u in enumerate(slot_outputs(delta, folded, down, indices)):
        message = delta.combine(level, u, weights[level], message)
    return delta.proj(message.squeeze(1))
