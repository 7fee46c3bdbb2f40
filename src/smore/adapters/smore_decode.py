"""S'MoRE's inference path for a few tokens at a time (decoding with a KV cache), SPEC §1 unchanged.

Decoding calls every adapter once per generated token, so an S'MoRE forward there costs its number of torch calls
(≈ 120 small ones against LoRA's 8), not its FLOPs. Without autograd the parameters are constants, and the forward
can be refolded into fewer, larger products, computed once per parameter update and kept in :class:`Folded`:

- **one token matmul** ``x [A; W₁,ℓ D …]ᵀ`` gives every expert's ``A x + a`` and, for every level's router, the
  down-projection already pushed through the first router layer (``W₁,ℓ [D x + d; keys] = (W₁,ℓ D) x + …``), or,
  when the router rows outnumber d_down, ``x [A; D]ᵀ`` and the rows after it (:func:`set_router_rows`: fewer bytes);
- the keys an ancestor hands down enter a child's first router layer linearly, so they become **lookup tables**
  ``T_{ℓ,j} = K_j W₁,ℓ[:, cols_j]ᵀ`` (one row per expert of the ancestor's level);
- the second router layer and the scores fold into one ``(d_g, s)`` matrix ``(K W₂)ᵀ`` for the dot-product gates
  (the noisy gate scores cosines, so it keeps ``W₂`` and the normalised keys);
- every expert's ``γ (B (A x + a) + b)`` of every level is **one matmul** by a block-sparse matrix when that matrix
  is no larger than ``A`` (small trees), else one batched matmul per level as in training.

For small uniform trees (:func:`use_paths`: at most :data:`MAX_PATHS` leaves, the same gate and sizes on every
level, σ everywhere) the router does not wait for the level above: it scores **every path** of the tree at once.
Each router row is a level and a choice of ancestors, whose handed-down keys are constants folded into the row's
bias, and one block-diagonal matmul scores every row; unselected experts get α = 0, and the tree combination
becomes one small batched matmul per level over all paths. That is a fixed 22 torch calls per adapter and token
against 43 slot by slot, for a few more FLOPs (every path of a 4-4 tree: 5 router rows instead of 3).

Sibling adapters that their model calls on one input (a gated MLP's gate_proj and up_proj) decode in one pass
(:class:`DecodeGroup`): their tables stacked on a leading dim, :func:`forward_stacked` computes every member in the
torch calls of one, and the others' Δy wait until they are called on that input. One adapter alone is the same
function with a stack of one (views of its own tables), so there is one every-path code path.

The load-balancing loss is left as a thunk (:meth:`SMoREDelta.defer_aux_loss`) computed by the gates themselves
only when something reads it (a labelled evaluation call), so generation pays nothing for it. Slot by slot, the
tree combination and W_proj are the training code's. Used only when :func:`applies`; ``tests/test_fast_paths.py``
checks it against the plain forward for every gate, variant, depth and layout.

Under ``torch.compile`` too: the tables are plain tensors, but the check that they are current reads parameter
versions, which dynamo cannot trace. So the adapted model's forward pre-hook (``ForwardContext``, run eagerly through
``torch.compiler.disable``) calls :meth:`SMoREDelta.prepare_inference` before every call without autograd short enough
for this path, and the compiled graph reads the tables as inputs: new tables after a weight update are new inputs to
the same graph (``tests/test_compile.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smore.routing.gates import DenseGate, NoisyTopKGate
from smore.routing.stats import DeferredSelection, ExpertSelection

MAX_TOKENS = 64
"""Above this many tokens per call (prefill, scoring) the plain forward is as fast: its calls are amortised."""


def applies(delta, x: torch.Tensor) -> bool:
    """Inference without autograd on at most :data:`MAX_TOKENS` tokens. Under ``torch.compile`` only when the tables
    exist: the model's pre-hook builds them eagerly before each call (:meth:`SMoREDelta.prepare_inference`), and the
    graph reads them as inputs. Its five matmuls stay five extern kernels under inductor, where the plain forward
    keeps its router MLPs and per-level expert products. An adapter compiled on its own, outside its model, has no
    pre-hook: it compiles the plain forward until tables exist, then reads them as its model's last call (or its
    own ``prepare_inference()``) left them."""
    if delta.training or torch.is_grad_enabled() or x.shape[0] > MAX_TOKENS:
        return False
    return not torch.compiler.is_compiling() or "_folded" in delta.__dict__


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
class PathTables:
    """The router and tree of :func:`forward_paths`: one row per (level, ancestors) of the tree, levels top first,
    within a level the ancestors' experts in mixed radix, the top ancestor most significant."""

    blocks: list[int]
    """Rows per level, top first: 1, s_{L-1}, s_{L-1} s_{L-2}, …, ∏_{j≥1} s_j."""
    router_dim: int
    query: torch.Tensor | None
    """(rows · d_g, rows · d_g) block-diagonal W₂ of each row's level, for the noisy gate (which scores cosines of
    the query); else None."""
    query_bias: torch.Tensor | None
    score: torch.Tensor
    """(rows · s, rows · d_g) block-diagonal: K W₂ of each row's level for dot-product gates, the normalised keys
    for the noisy gate. One matmul scores every row, and the logits come out token-major, as α is needed."""
    score_bias: torch.Tensor | None
    """(rows · s,): K b₂ of each row's level, dot-product gates only."""
    activation: Callable[[torch.Tensor], torch.Tensor]
    """The router activation (the same module type on every level, without parameters)."""
    select: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    dense: bool
    """The dense gate weights every expert: its α needs no scatter."""
    sigma: list[Callable[[torch.Tensor], torch.Tensor] | None]
    """σ of each level (None: identity)."""
    carry: list[torch.Tensor]
    """W_ℓ's weight for ℓ ≥ 1, called as F.linear, without a module call each."""
    carry_bias: list[torch.Tensor | None]
    """W_ℓ's bias, or None where it is folded into the block-sparse experts' bias (U_ℓ + w_ℓ)."""
    proj: tuple[torch.Tensor, torch.Tensor]
    """W_proj's (weight, bias)."""


@dataclass
class Stacked:
    """The tensors :func:`forward_stacked` reads for G deltas of one every-path layout, each with a leading dim of G
    and every matrix as the right operand of a batched matmul (transposed from ``F.linear``'s layout): one delta's
    own (G = 1, views of its :class:`Folded`, :func:`stack`) or a :class:`DecodeGroup`'s (copies)."""

    token_weight: torch.Tensor
    """(G · W, d_in): the members' token matmuls one after the other, so that one ``F.linear`` serves them all."""
    token_bias: torch.Tensor
    router_weight: torch.Tensor | None  # (G, d_down, K), when the router rows are not folded into the token matmul
    router_bias: torch.Tensor | None  # (G, 1, K)
    query: torch.Tensor | None  # (G, rows · d_g, rows · d_g), the noisy gate only
    query_bias: torch.Tensor | None
    score: torch.Tensor  # (G, rows · d_g, rows · s)
    score_bias: torch.Tensor | None  # (G, 1, rows · s), dot-product gates only
    experts: torch.Tensor | None  # (G, R, Σ_ℓ s_ℓ d_{ℓ+1}), or None for the per-level experts (G = 1 only)
    experts_bias: torch.Tensor | None
    carry: list[torch.Tensor]  # (G, d_ℓ, d_{ℓ+1}) per level ℓ ≥ 1
    proj: torch.Tensor  # (G, d_L, d_out)
    proj_bias: torch.Tensor | None  # (G, 1, d_out)


@dataclass
class Folded:
    """The refolded matrices of one :class:`SMoREDelta`, valid while its parameters keep their versions."""

    params: list[torch.Tensor]
    versions: list[int]
    levels: list[LevelTables]
    router_dims: list[int]  # d_g,ℓ per level: the blocks of the router rows, slot by slot
    expert_offsets: list[int]  # where each level's block starts in the block-sparse experts' columns
    experts: torch.Tensor | None  # (R, Σ_ℓ s_ℓ d_{ℓ+1}) block-sparse γ Bᵀ, or None for the per-level path
    experts_bias: torch.Tensor | None
    paths: PathTables | None = None  # every path at once (small uniform trees), else slot by slot
    # The token matmul (:func:`set_router_rows`): [A; W_rows D] or [A; D], then W_rows after it in the second case.
    token_weight: torch.Tensor | None = None
    token_bias: torch.Tensor | None = None
    token_widths: list[int] | None = None  # R, then the router columns
    router_weight: torch.Tensor | None = None  # (K, d_down) router rows applied to D x + d, when not folded in
    router_bias: torch.Tensor | None = None
    stacked: Stacked | None = None  # the every-path tensors as forward_stacked reads them (G = 1: views)

    def current(self) -> bool:
        return [p._version for p in self.params] == self.versions


def use_block_experts(delta) -> bool:
    """One block-sparse matrix for every expert when it is no larger than A itself (its zeros then cost less than
    the per-level calls they replace)."""
    columns = sum(s * delta.widths[level + 1] for level, s in enumerate(delta.num_experts))
    return columns <= delta.in_features


MAX_PATHS = 64
"""Up to this many leaves (∏ s_ℓ), routing every path costs less than the slot-by-slot calls it replaces."""


def use_paths(delta) -> bool:
    """Every path at once needs rows that stack: the same number of experts, router width, gate and fanout on every
    level, σ on every level (``activation_position="all"``, so α multiplies whole terms) and a router activation
    without a per-level parameter."""
    levels = delta.router.levels

    def signature(level_router) -> tuple:
        gate = level_router.gate
        return type(gate), gate.num_experts, gate.fanout, getattr(gate, "renormalize", None), level_router.keys.shape

    return (
        delta.activation_position == "all"
        and math.prod(delta.num_experts) <= MAX_PATHS
        and all(signature(level) == signature(levels[0]) for level in levels)
        and not isinstance(levels[0].mlp[1], nn.PReLU)
        and path_router_size(delta) <= delta.A.numel()
    )


def path_router_size(delta) -> int:
    """Elements of the block-diagonal router matrices of every path: kept no larger than A, so that their zeros
    cost less than the calls they save."""
    sizes, d_g = delta.num_experts, delta.router.levels[0].keys.shape[1]
    rows = sum(math.prod(sizes[level + 1 :]) for level in range(len(sizes)))
    noisy = isinstance(delta.router.levels[0].gate, NoisyTopKGate)
    return rows * d_g * rows * (sizes[0] + (d_g if noisy else 0))


@torch.no_grad()
def fold(delta, block: bool | None = None, paths: bool | None = None) -> Folded:
    """Build the tables of :class:`Folded` from the current parameters; ``block`` forces the expert layout and
    ``paths`` the routing layout."""
    router = delta.router
    d_down = router.down_proj.out_features
    router_dims = [level.keys.shape[1] for level in router.levels]
    w_downs, tables = [], []
    for level, level_router in enumerate(router.levels):
        first, second = level_router.mlp[0], level_router.mlp[2]
        w_downs.append(first.weight[:, :d_down])  # the columns that read D x
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
    folded = Folded(
        params=params,
        versions=[p._version for p in params],
        levels=tables,
        router_dims=router_dims,
        expert_offsets=[
            sum(s * w for s, w in zip(delta.num_experts[:level], delta.widths[1:])) for level in range(delta.num_levels)
        ],
        experts=experts,
        experts_bias=experts_bias,
    )
    first_biases = [level_router.mlp[0].bias for level_router in router.levels]
    if use_paths(delta) if paths is None else paths:
        weights, biases = fold_paths(delta, folded, w_downs, first_biases)
    else:
        weights, biases = w_downs, first_biases
    set_router_rows(delta, folded, torch.cat(weights), torch.cat(biases))
    if folded.paths is not None:
        folded.stacked = stack([folded])
    return folded


def set_router_rows(delta, folded: Folded, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """The token matmul and the router's first layer, for router rows ``weight (K, d_down) (D x + d) + bias``.

    Decoding reads every weight once per token, so the cheaper layout is the one with fewer bytes: pushing the rows
    through D (one matmul, K rows of d_in) when K ≤ d_down, else D in the token matmul and the K rows after it."""
    down = delta.router.down_proj
    rows = weight.shape[0]
    if rows <= down.out_features:
        folded.token_weight = torch.cat([delta.A, weight @ down.weight])
        folded.token_bias = torch.cat([delta.A_bias, weight @ down.bias + bias])
        folded.token_widths = [delta.A.shape[0], rows]
    else:
        folded.token_weight = torch.cat([delta.A, down.weight])
        folded.token_bias = torch.cat([delta.A_bias, down.bias])
        folded.token_widths = [delta.A.shape[0], down.out_features]
        folded.router_weight, folded.router_bias = weight, bias


def router_rows(folded: Folded, tail: torch.Tensor) -> torch.Tensor:
    """The router rows' pre-activations (N, K) from the token matmul's columns after A's."""
    return tail if folded.router_weight is None else F.linear(tail, folded.router_weight, folded.router_bias)


def fold_paths(delta, folded: Folded, w_downs: list[torch.Tensor], first_biases: list[torch.Tensor]):
    """The every-path layout: :class:`PathTables` in ``folded``, and the router rows (weights on D x + d and
    biases, one block of d_g rows per path row) with each row's ancestors' handed-down keys in its bias."""
    levels, sizes = delta.num_levels, delta.num_experts
    d_g = delta.router.levels[0].keys.shape[1]
    weights, biases, blocks, row_levels = [], [], [], []
    for level in reversed(range(levels)):
        count = math.prod(sizes[level + 1 :])  # one row per choice of the ancestors' experts
        hidden = first_biases[level].expand(count, d_g).clone()
        stride = 1
        for ancestor in range(level + 1, levels):  # mixed radix, the lowest ancestor least significant
            picked = torch.arange(count, device=hidden.device).div(stride, rounding_mode="floor") % sizes[ancestor]
            hidden += folded.levels[level].handed_down[ancestor][picked]
            stride *= sizes[ancestor]
        weights.append(w_downs[level].repeat(count, 1))
        biases.append(hidden.reshape(-1))
        blocks.append(count)
        row_levels += [level] * count
    per_row = [folded.levels[level] for level in row_levels]
    seconds = [delta.router.levels[level].mlp[2] for level in row_levels]
    noisy = per_row[0].score is None
    top = delta.router.levels[0]
    gate = top.gate
    folded.paths = PathTables(
        blocks=blocks,
        router_dim=d_g,
        query=torch.block_diag(*[second.weight for second in seconds]) if noisy else None,
        query_bias=torch.cat([second.bias for second in seconds]) if noisy else None,
        score=torch.block_diag(*[t.cosine_keys if noisy else t.score for t in per_row]),
        score_bias=None if noisy else torch.cat([t.score_bias for t in per_row]),
        activation=top.mlp[1].forward,
        select=functools.partial(select, gate),
        dense=isinstance(gate, DenseGate),
        sigma=[level_sigma(delta, level) for level in range(levels)],
        carry=[w.weight for w in delta.W],
        carry_bias=[None if folded.experts is not None else w.bias for w in delta.W],
        proj=(delta.proj.weight, delta.proj.bias),
    )
    if folded.experts is not None:  # W_ℓ's bias joins U_ℓ's, since every value of level ℓ adds both
        for level, w in enumerate(delta.W, start=1):
            start, width = folded.expert_offsets[level], sizes[level] * delta.widths[level + 1]
            folded.experts_bias[start : start + width].view(sizes[level], -1).add_(w.bias)
    return weights, biases


def level_sigma(delta, level: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """σ of ``level`` as one call (None: the identity), without :meth:`SMoREDelta.sigma`'s dispatch on the name."""
    if delta.activation == "identity":
        return None
    if delta.activation in ("tanh", "relu"):
        return torch.tanh if delta.activation == "tanh" else F.relu
    return functools.partial(delta.sigma, level=level)  # prelu: the slope of this level, cast to the input's dtype


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
    """The delta's :class:`Folded`, rebuilt when a parameter changed in place (an optimizer step, a load).
    Compiled, the version check cannot be traced (a parameter's ``_version`` is data to dynamo): the tables are the
    ones the model's pre-hook has just checked eagerly."""
    if torch.compiler.is_compiling():
        return delta.__dict__["_folded"]
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


def expert_outputs(delta, folded: Folded, down: torch.Tensor) -> list[torch.Tensor]:
    """Per level, U of every expert (N, s_ℓ, d_{ℓ+1}), γ_ℓ included."""
    n = down.shape[0]
    if folded.experts is not None:
        every = torch.addmm(folded.experts_bias, down, folded.experts)  # (N, Σ_ℓ s_ℓ d_{ℓ+1}), fresh and contiguous
        # Each level's block as (N, s_ℓ, d_{ℓ+1}) in one call (a split and a view would be two).
        row = every.shape[1]
        return [
            every.as_strided((n, s, width), (row, width, 1), offset)
            for s, width, offset in zip(delta.num_experts, delta.widths[1:], folded.expert_offsets)
        ]
    if delta.shared_pool:  # one pool: B once, scaled per level
        pool = delta._all_experts(down, 0, 1.0).transpose(0, 1)
        return [pool if gamma == 1.0 else pool * gamma for gamma in delta.scalings]
    return [delta._all_experts(down, level, delta.scalings[level]).transpose(0, 1) for level in range(delta.num_levels)]


def slot_outputs(delta, folded: Folded, down: torch.Tensor, indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, U of the routed slots (N, F_ℓ, d_{ℓ+1})."""
    per_level = expert_outputs(delta, folded, down)
    return [u.gather(1, index.unsqueeze(-1).expand(-1, -1, u.shape[-1])) for u, index in zip(per_level, indices)]


def forward(delta, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Δy (N, d_out), equal to :meth:`SMoREDelta.forward` in eval mode; sets the same side outputs."""
    group = delta.__dict__.get("_decode_group")
    if group is not None and not torch.compiler.is_compiling():  # compiled: one graph per delta, no Python state
        return group.forward(delta, x, valid)
    return forward_alone(delta, x, valid)


def forward_alone(delta, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """:func:`forward` for this delta only."""
    folded = tables(delta)
    if folded.paths is not None:
        return forward_stacked([delta], [folded], folded.stacked, x, valid)[0]
    down, tail = F.linear(x, folded.token_weight, folded.token_bias).split_with_sizes(folded.token_widths, -1)
    token_terms = router_rows(folded, tail).split(folded.router_dims, dim=-1)
    indices, weights, logits = route(delta, folded, token_terms)
    delta.defer_aux_loss(lambda: (logits, indices), valid)
    delta.last_selection = ExpertSelection(tuple(indices), tuple(delta.num_experts), valid)
    message = None
    for level, u in enumerate(slot_outputs(delta, folded, down, indices)):
        message = delta.combine(level, u, weights[level], message)
    return delta.proj(message.squeeze(1))


def stack(folds: list[Folded]) -> Stacked:
    """The :class:`Stacked` tensors of deltas with every-path tables of the same shapes: views for one delta,
    copies (``torch.stack``) for several."""

    def joined(tensors: list[torch.Tensor | None], transpose: bool = False, bias: bool = False):
        if tensors[0] is None:
            return None
        tensors = [t.t() if transpose else t.unsqueeze(0) if bias else t for t in tensors]
        return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

    paths = [folded.paths for folded in folds]
    return Stacked(
        token_weight=torch.cat([folded.token_weight for folded in folds]),
        token_bias=torch.cat([folded.token_bias for folded in folds]),
        router_weight=joined([folded.router_weight for folded in folds], transpose=True),
        router_bias=joined([folded.router_bias for folded in folds], bias=True),
        query=joined([p.query for p in paths], transpose=True),
        query_bias=joined([p.query_bias for p in paths], bias=True),
        score=joined([p.score for p in paths], transpose=True),
        score_bias=joined([p.score_bias for p in paths], bias=True),
        experts=joined([folded.experts for folded in folds]),
        experts_bias=joined([folded.experts_bias for folded in folds], bias=True),
        carry=[joined(list(weights), transpose=True) for weights in zip(*[p.carry for p in paths])],
        proj=joined([p.proj[0] for p in paths], transpose=True),
        proj_bias=joined([p.proj[1] for p in paths], bias=True),
    )


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight + bias`` per member: x (G, M, a), weight (G, a, b), bias (G, 1, b) or None."""
    return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)


def route_paths(paths: PathTables, stacked: Stacked, pre_activation: torch.Tensor):
    """Score every router row for tokens whose rows' pre-activations are (G, N, rows · d_g): logits (G, N, rows, s),
    the gate's selection (G, N, rows, k) and α of every expert (G, N, rows, s), 0 where not selected."""
    g, n = pre_activation.shape[:2]
    hidden = paths.activation(pre_activation)
    if stacked.query is not None:  # cosine: normalise each row's query, then score it against the normalised keys
        query = batched_linear(hidden, stacked.query, stacked.query_bias).view(g, n, -1, paths.router_dim)
        hidden = F.normalize(query, dim=-1).view(g, n, -1)
    logits = batched_linear(hidden, stacked.score, stacked.score_bias).view(g, n, sum(paths.blocks), -1)
    indices, alpha = paths.select(logits)
    weights = alpha if paths.dense else torch.zeros_like(logits).scatter_(-1, indices, alpha)
    return logits, indices, weights


def routed_slots(paths: PathTables, sizes: list[int], logits: torch.Tensor, indices: torch.Tensor):
    """What the slot-by-slot router would have returned, read off the rows of the selected paths: per level
    (bottom first) the logits (N, F_{ℓ+1}, s) and the selection (N, F_ℓ). Only the aux loss and the routing
    statistics ask for it, so generation never computes it."""
    n = logits.shape[0]
    tokens = torch.arange(n, device=logits.device).unsqueeze(1)
    rows = torch.zeros(n, 1, dtype=torch.long, device=logits.device)  # each parent slot's row in its level's block
    slot_logits, slot_indices = [], []
    for level, (block_logits, block_indices) in zip(
        reversed(range(len(sizes))), zip(logits.split(paths.blocks, 1), indices.split(paths.blocks, 1))
    ):
        picked = block_indices[tokens, rows]  # (N, F_{ℓ+1}, k)
        slot_logits.insert(0, block_logits[tokens, rows])
        slot_indices.insert(0, picked.reshape(n, -1))
        rows = (rows.unsqueeze(-1) * sizes[level] + picked).reshape(n, -1)  # the children's rows, parent-major
    return slot_logits, slot_indices


def defer_side_outputs(delta, member: int, paths: PathTables, logits: torch.Tensor, indices: torch.Tensor, valid):
    """The aux loss and the selection of ``delta``, member ``member`` of a stacked call, from its rows of the logits
    and the selection (G, N, rows, ·), read off only if something asks (generation never does)."""
    sizes = delta.num_experts
    memo = []  # routed_slots, computed once if read (a closure over a list: functools.cache costs more per call)

    def routed():
        if not memo:
            memo.append(routed_slots(paths, sizes, logits[member], indices[member]))
        return memo[0]

    delta.defer_aux_loss(routed, valid)
    delta.__dict__["last_selection"] = DeferredSelection(lambda: tuple(routed()[1]), tuple(sizes), valid)


def forward_stacked(deltas: list, folds: list[Folded], stacked: Stacked, x: torch.Tensor, valid) -> torch.Tensor:
    """Δy (G, N, d_out) of G deltas of one every-path layout for the same tokens x (N, d_in), in the torch calls of
    one: route every path, then combine every path bottom-up, α = 0 dropping the experts nobody selected. Sets each
    delta's side outputs."""
    paths = folds[0].paths
    g, n = len(deltas), x.shape[0]
    tokens = F.linear(x, stacked.token_weight, stacked.token_bias).view(n, g, -1).transpose(0, 1)  # (G, N, W)
    down, tail = tokens.split_with_sizes(folds[0].token_widths, -1)
    if stacked.router_weight is not None:
        tail = batched_linear(tail, stacked.router_weight, stacked.router_bias)
    logits, indices, weights = route_paths(paths, stacked, tail)
    for member, delta in enumerate(deltas):
        defer_side_outputs(delta, member, paths, logits, indices, valid)
    sizes = deltas[0].num_experts
    # From here on (G, N) is one batch dim B: the α products are per token, only W_ℓ and W_proj per member.
    alphas = weights.flatten(0, 1).split_with_sizes(paths.blocks, 1)[::-1]  # bottom first, (B, P_ℓ, s_ℓ)
    if stacked.experts is not None:
        every = batched_linear(down, stacked.experts, stacked.experts_bias)  # (G, N, Σ_ℓ s_ℓ d_{ℓ+1}), contiguous
        row = every.shape[-1]  # each level's block as (B, s_ℓ, d_{ℓ+1}) in one call (a split and a view: two)
        per_level = [
            every.as_strided((g * n, s, width), (row, width, 1), offset)
            for s, width, offset in zip(sizes, deltas[0].widths[1:], folds[0].expert_offsets)
        ]
    else:  # the per-level layout: one delta (a group stacks block experts only)
        per_level = expert_outputs(deltas[0], folds[0], down[0])
    value = alpha_below = None
    for level, u in enumerate(per_level):  # u: (B, s_ℓ, d_{ℓ+1})
        sigma, alpha = paths.sigma[level], alphas[level]
        if value is not None:
            # W_ℓ Σ α v = Σ α W_ℓ v: W_ℓ runs on the values of the level below before their α mix them, so that on
            # the leaves it runs once per expert, shared by every path, and the mix and the sum with U are one call.
            width = value.shape[-1]
            projected = torch.bmm(value.reshape(g, -1, width), stacked.carry[level - 1])  # no bias: Σ α is not 1
            projected = projected.view(*value.shape[:-1], -1)  # for every gate
            if paths.carry_bias[level - 1] is not None:  # else already in U's bias (one delta: a group has none)
                u = u + paths.carry_bias[level - 1]
            parents = alpha.shape[1]
            if projected.dim() == 3 and parents == 1:  # the leaves under the top level: mix and add in one call
                u = torch.baddbmm(u, alpha_below, projected)
            else:
                if projected.dim() == 3:  # the leaves, shared by every path: (B, P_{ℓ-1}, d_{ℓ+1})
                    carried = torch.bmm(alpha_below, projected)
                else:  # a middle level's values, one set per path
                    carried = (alpha_below.unsqueeze(-2) @ projected).squeeze(-2)
                u = u + carried if parents == 1 else u.unsqueeze(1) + carried.view(g * n, parents, sizes[level], -1)
        value = u if sigma is None else sigma(u)  # (B, s_ℓ, d) shared by the parents, or (B, P_ℓ, s_ℓ, d)
        alpha_below = alpha
    message = torch.bmm(alpha_below, value).view(g, n, -1)  # the top level has one parent
    return batched_linear(message, stacked.proj, stacked.proj_bias)


def stackable(deltas: list, folds: list[Folded]) -> bool:
    """Whether :func:`forward_stacked` can serve these deltas at once: every-path tables with block experts, of the
    same shapes, and the same gate and σ (which the call takes from the first; prelu's slopes are per delta)."""
    first = deltas[0]

    def signature(delta, folded: Folded) -> tuple:
        if folded.paths is None or folded.experts is None or delta.activation == "prelu":
            return ()
        gate = delta.router.levels[0].gate
        shapes = []
        for field in dataclasses.fields(Stacked):
            value = getattr(folded.stacked, field.name)
            shapes.append([t.shape for t in value] if isinstance(value, list) else getattr(value, "shape", None))
        return type(gate), getattr(gate, "top_k", None), getattr(gate, "renormalize", None), delta.activation, shapes

    reference = signature(first, folds[0])
    return bool(reference) and all(signature(d, f) == reference for d, f in zip(deltas[1:], folds[1:]))


def same_input(seen: tuple, x: torch.Tensor) -> bool:
    """Whether ``x`` is the input recorded in ``seen`` (input, its version): the same memory, shape and strides (the
    record keeps that memory alive, so no other tensor can have taken it), unchanged since (the version counter,
    where the tensor has one: inference-mode tensors keep none)."""
    recorded, version = seen
    return (
        recorded.data_ptr() == x.data_ptr()
        and recorded.shape == x.shape
        and recorded.stride() == x.stride()
        and recorded.dtype == x.dtype
        and version == input_version(x)
    )


def input_version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version


class DecodeGroup:
    """Sibling deltas that their model calls on one input, computed in one pass when decoding: a gated MLP's
    gate_proj and up_proj both read the block's input. A decoding step pays an adapter's torch calls, not its FLOPs
    (see the module docstring), so the group's first call computes every member with :func:`forward_stacked` in the
    calls of one and keeps the others' Δy until they are called on that input.

    That the members share their input is observed, not assumed from the model's code: the group starts fusing once
    a member is called on the input another member was just called on (same memory, shape and version), and stops at
    the first call that does not take a result kept for it. A miss costs one computed Δy that nobody reads. Under
    ``torch.compile`` every delta computes alone (one graph per delta, no Python state across calls).

    Made by :meth:`SMoREDelta.share_input` when the model is adapted, for the layers of one parent module with the
    same shape; only the decode path reads it.
    """

    def __init__(self, members: list) -> None:
        self.members = list(members)
        self.fusing = False
        self.seen: tuple | None = None  # (input, version, member) of the last call computed alone
        self.pending: tuple | None = None  # (input, version, {member: Δy}) kept from a fused call
        self.sources: list[Folded] | None = None  # the members' tables the stack was built from
        self.stacked: Stacked | None = None

    @property
    def stacks(self) -> bool:
        """False once the members' tables turned out not to stack (another layout or shape, which weight updates
        never change)."""
        return self.sources is None or self.stacked is not None

    def tables(self) -> tuple[list[Folded], Stacked | None]:
        folds = [tables(member) for member in self.members]
        if self.sources is None or any(new is not old for new, old in zip(folds, self.sources)):
            self.sources = folds
            self.stacked = stack(folds) if stackable(self.members, folds) else None
        return folds, self.stacked

    def forward(self, delta, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        pending = self.pending
        if pending is not None:
            self.pending = None
            results = pending[2]
            if delta in results and same_input(pending[:2], x):
                out = results.pop(delta)
                if results:  # a third member still to come
                    self.pending = pending
                return out
            self.fusing = False  # a member was called on another input: the model does not share it
        if self.fusing and not any(member.training for member in self.members):  # the decode path is eval's
            folds, stacked = self.tables()
            if stacked is not None:
                out = forward_stacked(self.members, folds, stacked, x, valid)  # (G, N, d_out)
                own = self.members.index(delta)
                others = {m: out[i] for i, m in enumerate(self.members) if i != own}
                self.pending = (x, input_version(x), others)
                return out[own]
            self.fusing = False  # another layout or shape: each member alone from now on (``stacks``)
        elif self.stacks and self.seen is not None and self.seen[2] is not delta and same_input(self.seen[:2], x):
            self.fusing = True
        self.seen = (x, input_version(x), delta)
        return forward_alone(delta, x, valid)
