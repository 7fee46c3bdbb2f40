"""S'MoRE: Structural Mixture of Residual Experts (Zeng et al., NeurIPS 2025), SPEC §1.

::

        x ──► A (all experts at once) ──► U_i^ℓ = γ_ℓ (B_i^ℓ (A_i^ℓ x + a_i^ℓ) + b_i^ℓ)      one per expert
        │                                        │ gather the routed slots
        └──► TreeRouter (top-down) ──► indices, α │
                                                 ▼
        level 0 (leaves)   x_1 = Σ_children α σ(U)
        level ℓ ≥ 1        x_{ℓ+1} = Σ_children α σ(U + W_ℓ x_ℓ + w_ℓ)           (paper Eq. 3, position "all")
        output             Δy = W_proj x_L + p

Every expert sees the raw token through its own A (the skip connection); between levels only the small W_ℓ maps
act, in widths d_ℓ ≤ d_L. The forward is vectorised: one matmul gives every expert's A projection (the cost of a
LoRA of rank d_L), one batched matmul per level gives every expert's B output, and the routed slots are gathered
from those outputs; expert matrices are never copied per token. The only Python loop is over the L levels.

When each token uses few of the experts it owns (Σ_ℓ F_ℓ r_ℓ at most a quarter of the A rows, e.g. s = [16, 16],
f = [2, 2]) the **grouped** path runs instead: per level, the routed slots are sorted by expert and each expert
computes ``B_i (A_i x + a_i) + b_i`` for its own slots only (one small matmul pair per expert, a loop over experts,
never over tokens), so the expert cost grows with the experts used, not the experts owned. ``W_proj`` still maps
the full message ``x_L`` (width d_L = Σ s_ℓ r_ℓ): that part of the cost is set by the experts owned (SPEC §1.7).
``expert_path`` (``"dense"`` or ``"grouped"``) overrides the choice; both give the same outputs and gradients.
``smore_reference.py`` holds the same computation as a readable loop over tokens and tree nodes, for tests.
``smore_decode.py`` runs instead for inference without autograd on a few tokens (decoding): the same Δy from
tables refolded once per parameter update, in fewer, larger torch calls.

Notation of the S'MoRE paper (SPEC §1.1), level ℓ = 0 is the bottom (leaves), ℓ = L-1 the top:

=============  ====================  ==========================================================
paper          field                 meaning
=============  ====================  ==========================================================
s_ℓ            ``num_experts[ℓ]``    residual experts in level ℓ
f_ℓ            ``top_k[ℓ]``          children picked per selected parent (per token at the top)
r_ℓ            ``ranks[ℓ]``          rank of each expert of level ℓ
α_ℓ (LoRA)     ``alpha[ℓ]``          scaling γ_ℓ = alpha_ℓ / r_ℓ; ``None`` means γ_ℓ = 1
d_g,ℓ          ``router_dims[ℓ]``    width of the level-ℓ router query and keys
d_down         ``down_proj_dim``     width of the token down-projection shared by all levels
σ              ``activation``        non-linearity between levels
=============  ====================  ==========================================================

Per-level fields (``num_experts``, ``top_k``, ``ranks``, ``router_dims``, ``alpha``) take a list, one entry per level,
or a single number for every level. The number of levels is the length of the lists given (they must agree); the
fields left out follow it, so ``SMoREConfig(num_experts=[4, 4, 4])`` is a three-level tree with ``top_k=[2, 2, 2]``.

This file holds everything the library knows about S'MoRE: the config (:class:`SMoREConfig`), the delta, the cost
model (parameters, active parameters, FLOPs, the paper's Table 1 overhead) and the budget search space, in the
method record ``METHOD``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from smore.adapters import smore_decode
from smore.adapters.base import ExpertGroups
from smore.adapters.method import (
    CostModel,
    Counts,
    Method,
    SearchSpace,
    check_config,
    check_features,
    replace_all,
    with_total,
)
from smore.checks import check_int, check_number
from smore.config import AdapterConfig, check_literal, check_positive_ints
from smore.errors import UserError
from smore.routing.stats import ExpertSelection
from smore.routing.tree import TreeRouter
from smore.routing.types import TreeRouting

GateType = Literal["dense", "switch", "noisy_topk"]
Activation = Literal["identity", "tanh", "relu", "prelu"]
ActivationPosition = Literal["all", "child", "child_v2"]
InitMethod = Literal["normal", "b_zero", "bw_zero", "w_final_zero", "eq_1_layer"]
RouterActivation = Literal["relu", "gelu", "silu", "tanh", "prelu"]


@dataclass
class SMoREConfig(AdapterConfig):
    """S'MoRE: a tree of residual experts per adapted linear layer (SPEC §1). Lists are per level, bottom first."""

    method: ClassVar[str] = "smore"

    num_experts: list[int] | int | None = None
    """s_ℓ: residual experts in each level (default 4 per level)."""
    top_k: list[int] | int | None = None
    """f_ℓ: experts picked per selected parent (per token at the top); default 2 per level. Ignored by the
    ``dense`` gate."""
    ranks: list[int] | int | None = None
    """r_ℓ: rank of every expert of a level (default 8 per level)."""
    alpha: list[float] | float | None = None
    """Per-level scaling numerators: γ_ℓ = alpha[ℓ] / ranks[ℓ]. ``None`` gives γ_ℓ = 1, as the paper's runs."""
    router_dims: list[int] | int | None = None
    """d_g,ℓ: width of each level's router query and expert keys (default 32 per level)."""
    down_proj_dim: int | None = 32
    """d_down: width of the token down-projection shared by the routers of all levels; ``None``: each adapted
    layer's own input width (the authors' ``dim_downproj_x: 0``)."""
    router_activation: RouterActivation = "relu"
    """Activation inside each level's two-layer router MLP; ``prelu`` has one learnable slope per router."""
    router_prelu_init: float = 0.25
    """Initial slope of the router's ``prelu`` (only read when router_activation is prelu)."""
    gate: GateType = "switch"
    """``dense`` (every expert, softmax), ``switch`` (top-k of softmax) or ``noisy_topk`` (cosine + noise)."""
    balance_weight: float = 0.01
    """Weight of each gate's load-balancing loss."""
    activation: Activation = "relu"
    """σ between levels; ``prelu`` has one learnable slope per level."""
    prelu_init: float = 0.25
    """Initial slope of ``prelu`` (only read when activation is prelu)."""
    activation_position: ActivationPosition = "all"
    """Where σ acts (S'MoRE*): ``all`` (Eq. 3), ``child`` or ``child_v2``."""
    shared_pool: bool = False
    """S'MoRE#: one pool of experts shared by every level (needs equal num_experts and ranks)."""
    init: InitMethod = "w_final_zero"
    """Initialisation of B, W_ℓ and W_proj (SPEC §1.5); ``w_final_zero`` leaves the model unchanged."""
    recompute: bool = True
    """In training, keep only the inputs of the router and the tree (the token and the routing override) for
    backward and recompute the routing, the experts' outputs and the level messages there: autograd then saves
    about what a LoRA of the same size saves, for a few percent more step time. Outputs and gradients are the same
    either way (the noisy gate replays its noise); evaluation and ``no_grad`` never recompute."""

    LEVEL_DEFAULTS: ClassVar[dict[str, int]] = {"num_experts": 4, "top_k": 2, "ranks": 8, "router_dims": 32}
    DEFAULT_LEVELS: ClassVar[int] = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        per_level = [*self.LEVEL_DEFAULTS, "alpha"]
        given = {name: getattr(self, name) for name in per_level if getattr(self, name) is not None}
        for name, value in given.items():
            if isinstance(value, tuple):
                given[name] = value = list(value)
            if not isinstance(value, (list, int, float)) or isinstance(value, bool):
                raise UserError(
                    f"{name}={value!r} must be a list with one entry per level (bottom level first), or one number "
                    "for every level."
                )
        lengths = {name: len(value) for name, value in given.items() if isinstance(value, list)}
        if len(set(lengths.values())) > 1:
            first = next(iter(lengths))
            other = next(name for name in lengths if lengths[name] != lengths[first])
            raise UserError(
                f"{other} has {lengths[other]} entries but {first} has {lengths[first]} levels; give one {other} "
                "entry per level (bottom level first), or one number for every level."
            )
        levels = next(iter(lengths.values()), self.DEFAULT_LEVELS)
        if levels == 0:
            raise UserError("num_experts must have at least one level, e.g. [4, 4].")
        for name in per_level:
            value = given.get(name, self.LEVEL_DEFAULTS.get(name))
            setattr(self, name, value if value is None or isinstance(value, list) else [value] * levels)
        for name in self.LEVEL_DEFAULTS:
            check_positive_ints(name, getattr(self, name))
        if self.alpha is not None:
            for i, a in enumerate(self.alpha):
                check_number(f"alpha[{i}]", a, low=0, open_low=True)
        check_literal("gate", self.gate, GateType)
        check_literal("activation", self.activation, Activation)
        check_literal("activation_position", self.activation_position, ActivationPosition)
        check_literal("init", self.init, InitMethod)
        check_literal("router_activation", self.router_activation, RouterActivation)
        for level, (k, s) in enumerate(zip(self.top_k, self.num_experts)):
            if k > s:
                raise UserError(
                    f"top_k[{level}]={k} exceeds num_experts[{level}]={s}; pick at most num_experts experts."
                )
            if self.gate == "noisy_topk" and k == s:
                raise UserError(
                    f"gate='noisy_topk' needs top_k[{level}] < num_experts[{level}] (got {k} of {s}): its load "
                    "estimate uses the (k+1)-th logit. Lower top_k, raise num_experts, or use gate='dense'."
                )
        if self.down_proj_dim is not None:
            check_int("down_proj_dim", self.down_proj_dim)
        check_number("router_prelu_init", self.router_prelu_init, low=-math.inf)
        check_number("balance_weight", self.balance_weight, low=0)
        check_number("prelu_init", self.prelu_init, low=-math.inf)
        if not isinstance(self.shared_pool, bool):
            raise UserError(f"shared_pool={self.shared_pool!r} must be true or false.")
        if not isinstance(self.recompute, bool):
            raise UserError(f"recompute={self.recompute!r} must be true or false.")
        if self.shared_pool and (len(set(self.num_experts)) != 1 or len(set(self.ranks)) != 1):
            raise UserError(
                f"shared_pool=True needs the same num_experts and ranks in every level (got num_experts="
                f"{self.num_experts}, ranks={self.ranks}); make them equal or set shared_pool=False."
            )

    # -- derived quantities (SPEC §1.1) ------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        """L, the number of S'MoRE levels."""
        return len(self.num_experts)

    @property
    def fanouts(self) -> list[int]:
        """Children actually picked per parent: top_k, or every expert for the dense gate."""
        return list(self.num_experts) if self.gate == "dense" else list(self.top_k)

    @property
    def widths(self) -> list[int]:
        """d_0 … d_L: width of the message entering each level (d_0 = 0) and of the top message d_L."""
        return message_widths(self.num_experts, self.ranks, self.shared_pool)

    @property
    def slots(self) -> list[int]:
        """F_0 … F_L: expert slots activated per token in each level (F_L = 1, the virtual root)."""
        return slot_counts(self.fanouts)

    def down_width(self, in_features: int) -> int:
        """d_down on a layer of width ``in_features``: ``down_proj_dim``, or that width when it is ``None``."""
        return in_features if self.down_proj_dim is None else self.down_proj_dim

    @property
    def scalings(self) -> list[float]:
        """γ_ℓ = alpha_ℓ / r_ℓ, or 1 when no alpha is given."""
        if self.alpha is None:
            return [1.0] * self.num_levels
        return [a / r for a, r in zip(self.alpha, self.ranks)]


def uniform_fan_in_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Kaiming-uniform with a = √5, i.e. U(±1/√fan_in), as ``nn.Linear``'s default weight init.

    Written out because the B tensors are stacked (s, d_out, r) and torch would read the wrong fan-in from them.
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def message_widths(num_experts: list[int], ranks: list[int], shared_pool: bool) -> list[int]:
    """d_0 … d_L (SPEC §1.1): the width of the message entering each level, ``d_0 = 0``, ``d_{ℓ+1} = d_ℓ + s_ℓ r_ℓ``;
    ``s·r`` at every level for the shared pool (S'MoRE#)."""
    if shared_pool:
        return [0] + [num_experts[0] * ranks[0]] * len(num_experts)
    widths = [0]
    for s, r in zip(num_experts, ranks):
        widths.append(widths[-1] + s * r)
    return widths


def slot_counts(fanouts: list[int]) -> list[int]:
    """F_0 … F_L: the expert slots one token activates in each level, ``F_ℓ = ∏_{j ≥ ℓ} f_j``, ``F_L = 1`` (the
    virtual root)."""
    slots = [1]
    for fanout in reversed(fanouts):
        slots.insert(0, slots[0] * fanout)
    return slots


def uses_grouped_path(slots: list[int], ranks: list[int], total_rank: int) -> bool:
    """Whether the grouped expert path runs: a token's slots need at most a quarter of the A rows the dense path
    computes (bench/sparsity.py: at half, e.g. s = [8, 8], f = [2, 2], gathering the tokens costs what it saves on
    CPU). ``slots`` are F_0 … F_{L-1}."""
    return 4 * sum(f * r for f, r in zip(slots, ranks)) <= total_rank


def structures(num_experts: list[int], fanouts: list[int]) -> int:
    """Theorem 3.4: Γ = ∏_ℓ C(s_ℓ, f_ℓ)^{F_{ℓ+1}}, the routing trees of a token (1 for the dense gate's full tree)."""
    slots = slot_counts(fanouts)
    return math.prod(math.comb(s, f) ** slots[level + 1] for level, (s, f) in enumerate(zip(num_experts, fanouts)))


ACTIVATIONS = get_args(Activation)
POSITIONS = get_args(ActivationPosition)
INITS = get_args(InitMethod)


class SMoREDelta(nn.Module):
    """The S'MoRE contribution ``Δy`` for one adapted linear layer ``in_features → out_features``.

    Parameters (level ℓ, bottom first; R = Σ_ℓ s_ℓ r_ℓ, or s·r for the shared pool):

    - ``A`` (R, d), ``A_bias`` (R,): all experts' down-projections stacked, level by level, expert by expert.
    - ``B[ℓ]`` (s_ℓ, d_{ℓ+1}, r_ℓ), ``B_bias[ℓ]`` (s_ℓ, d_{ℓ+1}); one entry shared by all levels for the pool.
    - ``W[ℓ-1]``: ``nn.Linear(d_ℓ → d_{ℓ+1})`` for ℓ ≥ 1.  ``proj``: ``nn.Linear(d_L → d_out)`` (W_proj, p).
    - ``prelu_slopes`` (L,) when ``activation="prelu"``.  ``router``: the :class:`TreeRouter`.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        num_experts: list[int],
        top_k: list[int],
        ranks: list[int],
        scalings: list[float],
        router_dims: list[int],
        down_proj_dim: int,
        router_activation: str = "relu",
        router_prelu_init: float = 0.25,
        gate: str = "switch",
        balance_weight: float = 0.01,
        activation: str = "relu",
        prelu_init: float = 0.25,
        activation_position: str = "all",
        shared_pool: bool = False,
        init: str = "w_final_zero",
        recompute: bool = True,
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("activation", activation, ACTIVATIONS),
            ("activation_position", activation_position, POSITIONS),
            ("init", init, INITS),
        ):
            if value not in choices:
                raise UserError(f"{name}={value!r} is unknown; choose one of {list(choices)}.")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.ranks, self.scalings = list(num_experts), list(ranks), list(scalings)
        self.activation, self.activation_position = activation, activation_position
        self.shared_pool, self.init = shared_pool, init
        self.recompute = recompute
        levels = len(num_experts)
        self.widths = message_widths(self.num_experts, self.ranks, shared_pool)
        # Level ℓ's experts own A rows [d_ℓ, d_{ℓ+1}); every level reads the same pool of rows in S'MoRE#.
        self.a_offsets = [0] * levels if shared_pool else self.widths[:-1]
        total_rank = self.widths[-1]

        self.router = TreeRouter(
            in_features=in_features,
            num_experts=num_experts,
            top_k=top_k,
            router_dims=router_dims,
            down_proj_dim=down_proj_dim,
            router_activation=router_activation,
            router_prelu_init=router_prelu_init,
            gate=gate,
            balance_weight=balance_weight,
        )
        self.fanouts = self.router.fanouts
        self.A = nn.Parameter(torch.empty(total_rank, in_features))
        self.A_bias = nn.Parameter(torch.empty(total_rank))
        pool_levels = 1 if shared_pool else levels
        self.B = nn.ParameterList(
            [nn.Parameter(torch.empty(num_experts[i], self.widths[i + 1], ranks[i])) for i in range(pool_levels)]
        )
        self.B_bias = nn.ParameterList(
            [nn.Parameter(torch.empty(num_experts[i], self.widths[i + 1])) for i in range(pool_levels)]
        )
        self.W = nn.ModuleList([nn.Linear(self.widths[i], self.widths[i + 1]) for i in range(1, levels)])
        self.proj = nn.Linear(self.widths[-1], out_features)
        self.prelu_slopes = nn.Parameter(torch.full((levels,), float(prelu_init))) if activation == "prelu" else None
        self.aux_loss = None
        self.last_selection: ExpertSelection | None = None  # what the last forward routed (RoutedDelta)
        self.expert_path = "grouped" if uses_grouped_path(self.slots, ranks, total_rank) else "dense"
        self.reset_parameters()

    # -- the load-balancing loss of the last forward, computed when read on the decode path --------------------
    @property
    def aux_loss(self) -> torch.Tensor | None:
        thunk = self.__dict__.pop("_aux_thunk", None)
        if thunk is not None:
            self.__dict__["_aux_loss"] = thunk()
        return self.__dict__.get("_aux_loss")

    @aux_loss.setter
    def aux_loss(self, value: torch.Tensor | None) -> None:
        # Through __dict__: nn.Module.__setattr__ would check for parameters and modules on every forward.
        self.__dict__.pop("_aux_thunk", None)
        self.__dict__["_aux_loss"] = value

    def defer_aux_loss(self, routing: Callable[[], tuple[list, list]], valid: torch.Tensor | None) -> None:
        """The aux loss of a routing that ``routing()`` gives as per-level logits (N, P, s) and selections (N, P·k),
        computed by the gates themselves (``forced`` to the selection) the first time :attr:`aux_loss` is read."""

        def compute() -> torch.Tensor:
            logits, indices = routing()
            return self.router.forced_aux_loss(logits, indices, valid)

        self.__dict__.pop("_aux_loss", None)
        self.__dict__["_aux_thunk"] = compute

    # The decode tables (smore_decode.Folded) follow in-place updates by parameter versions; a move, cast or load
    # may replace the parameters themselves, so those drop the tables.
    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_folded", None)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_folded", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def share_input(self, siblings: list[SMoREDelta]) -> None:
        """Decode ``siblings`` (this delta among them) in one pass where the model calls them on one input: the
        adapters of one parent module's layers of the same shape (a gated MLP's gate_proj and up_proj), which
        injection hands over. See :class:`smore_decode.DecodeGroup`."""
        group = smore_decode.DecodeGroup(siblings)
        for delta in siblings:
            delta.__dict__["_decode_group"] = group  # not a submodule: outside the state dict and module tree

    def prepare_inference(self, tokens: int | None = None) -> None:
        """Build or refresh the decode tables now, for a model call of ``tokens`` tokens in all (the model's
        pre-hook calls it before each call without autograd), so that a compiled forward can read them unchecked.
        A call too long for the decode path (prefill, scoring) does not read them: nothing to do."""
        if tokens is None or tokens <= smore_decode.MAX_TOKENS:
            smore_decode.tables(self)

    @property
    def slots(self) -> list[int]:
        """F_ℓ per level (bottom first): the expert slots one token activates in level ℓ, ∏_{j ≥ ℓ} f_j."""
        return slot_counts(self.fanouts)[:-1]

    @property
    def num_levels(self) -> int:
        return len(self.num_experts)

    # -- initialisation (SPEC §1.5) --------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        init = self.init
        uniform_fan_in_(self.A, self.in_features)
        nn.init.zeros_(self.A_bias)
        for level, (b, b_bias) in enumerate(zip(self.B, self.B_bias)):
            nn.init.zeros_(b_bias)
            if init in ("normal", "w_final_zero"):
                uniform_fan_in_(b, self.ranks[level])
            elif init == "eq_1_layer":  # rows [i r, (i+1) r) of B_i are the identity: expert i writes its own block
                with torch.no_grad():
                    b.zero_()
                    r = self.ranks[level]
                    for expert in range(b.shape[0]):
                        b[expert, expert * r : (expert + 1) * r, :] = torch.eye(r)
            else:
                nn.init.zeros_(b)
        for level, w in enumerate(self.W, start=1):
            nn.init.zeros_(w.bias)
            if init == "bw_zero":
                nn.init.zeros_(w.weight)
            elif init == "eq_1_layer":  # the children's message is copied into the last d_ℓ rows
                with torch.no_grad():
                    w.weight.zero_()
                    d_in = self.widths[level]
                    w.weight[-d_in:, :] = torch.eye(d_in)
            else:
                uniform_fan_in_(w.weight, self.widths[level])
        nn.init.zeros_(self.proj.bias)
        if init in ("w_final_zero", "eq_1_layer"):
            nn.init.zeros_(self.proj.weight)
        else:
            uniform_fan_in_(self.proj.weight, self.widths[-1])

    # -- forward ---------------------------------------------------------------------------------------------
    def sigma(self, t: torch.Tensor, level: int) -> torch.Tensor:
        """σ between levels; prelu uses the slope of this level."""
        if self.activation == "identity":
            return t
        if self.activation == "tanh":
            return torch.tanh(t)
        if self.activation == "relu":
            return F.relu(t)
        return F.prelu(t, self.prelu_slopes[level : level + 1].to(t.dtype))

    def _all_experts(self, down: torch.Tensor, level: int, scaling: float) -> torch.Tensor:
        """``scaling · (B_i a_i + b_i)`` of every expert i of a level as (s_ℓ, N, d_{ℓ+1}): one batched matmul."""
        s, r = self.num_experts[level], self.ranks[level]
        offset = self.a_offsets[level]
        a = down[:, offset : offset + s * r].reshape(-1, s, r).transpose(0, 1)  # (s, N, r)
        pool = 0 if self.shared_pool else level
        b, b_bias = self.B[pool], self.B_bias[pool]  # (s, d_{ℓ+1}, r), (s, d_{ℓ+1})
        return torch.baddbmm(b_bias.unsqueeze(1), a, b.transpose(1, 2), beta=scaling, alpha=scaling)

    def _dense_slot_outputs(
        self, x: torch.Tensor, routing: TreeRouting, down: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per level, U of the routed slots (N, F_ℓ, d_{ℓ+1}), gathered from every expert's output; ``down`` is
        ``A x + a`` when the caller computed it already."""
        if down is None:
            down = F.linear(x, self.A, self.A_bias)  # (N, R): every expert's A x + a in one matmul
        pool_outputs = self._all_experts(down, 0, 1.0) if self.shared_pool else None  # one pool: B once for all
        outputs = []
        for level in range(self.num_levels):
            scaling = self.scalings[level]
            u = self._all_experts(down, level, scaling) if pool_outputs is None else pool_outputs  # (s, N, d)
            index = routing.indices[level].t().unsqueeze(-1).expand(-1, -1, u.shape[-1])  # (F_ℓ, N, d_{ℓ+1})
            u = u.gather(0, index).transpose(0, 1)  # (N, F_ℓ, d_{ℓ+1})
            outputs.append(u * scaling if pool_outputs is not None and scaling != 1.0 else u)
        return outputs

    def _grouped_slot_outputs(self, x: torch.Tensor, routing: TreeRouting) -> list[torch.Tensor]:
        """Per level, U of the routed slots (N, F_ℓ, d_{ℓ+1}), each expert computed for its own slots only."""
        outputs = []
        for level in range(self.num_levels):
            s, r = self.num_experts[level], self.ranks[level]
            offset = self.a_offsets[level]
            pool = 0 if self.shared_pool else level
            index = routing.indices[level]  # (N, F_ℓ)
            n, slots = index.shape
            groups = ExpertGroups(index.reshape(-1), s)  # slots sorted by expert
            rows = x.index_select(0, groups.order.div(slots, rounding_mode="floor"))  # (N·F_ℓ, d): each slot's token
            a, a_bias = self.A[offset : offset + s * r].view(s, r, -1), self.A_bias[offset : offset + s * r].view(s, r)
            hidden = groups.linear(rows, a, a_bias)  # (N·F_ℓ, r): A_e x + a_e
            u = groups.unsort(groups.linear(hidden, self.B[pool], self.B_bias[pool]))  # back to (token, slot) order
            if self.scalings[level] != 1.0:
                u = u * self.scalings[level]
            outputs.append(u.view(n, slots, -1))
        return outputs

    def combine(self, level: int, u: torch.Tensor, weights: torch.Tensor, message: torch.Tensor | None) -> torch.Tensor:
        """Aggregate the routed slots of a level into their parents.

        ``u`` (N, F_ℓ, d_{ℓ+1}) are the slots' expert outputs, ``weights`` (N, F_ℓ) their α, ``message``
        (N, F_ℓ, d_ℓ) the slots' own children's messages (``None`` at the leaves). Returns (N, F_{ℓ+1}, d_{ℓ+1}).
        """
        alpha = weights.unsqueeze(-1)
        position = self.activation_position
        if message is None:  # leaves: no W term; the child modes apply no σ here
            terms = alpha * (self.sigma(u, level) if position == "all" else u)
        else:
            w = self.W[level - 1]
            carried = w(message if position == "all" else self.sigma(message, level))  # W_ℓ x + w_ℓ
            if position == "all":
                terms = alpha * self.sigma(u + carried, level)
            elif position == "child":
                terms = alpha * u + carried
            else:  # child_v2
                terms = alpha * (u + carried)
        n, slots, width = terms.shape
        return terms.reshape(n, slots // self.fanouts[level], self.fanouts[level], width).sum(dim=2)

    def _grouped(self) -> bool:
        # Under torch.compile the dense path runs: the grouped one sorts slots into groups whose sizes the graph
        # cannot know.
        return self.expert_path == "grouped" and not torch.compiler.is_compiling()

    def _message(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None,
        routing: TreeRouting | None,
        router_down: torch.Tensor | None = None,
        down: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TreeRouting]:
        """Route (unless ``routing`` is given), compute the routed slots' expert outputs and combine them level by
        level: the top message x_L (N, d_L) and the routing used. ``router_down`` (D x + d) and ``down`` (A x + a)
        are the products of x when the caller computed them. Pure (no attribute is set), so that it can be
        recomputed in backward."""
        if routing is None:
            routing = self.router(x, valid, down=router_down)
        if self._grouped():
            slot_outputs = self._grouped_slot_outputs(x, routing)
        else:
            slot_outputs = self._dense_slot_outputs(x, routing, down)
        message = None
        for level, u in enumerate(slot_outputs):  # bottom-up: (N, F_ℓ, d_{ℓ+1}) slots into their parents
            message = self.combine(level, u, routing.weights[level], message)
        return message.squeeze(1), routing

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, routing: TreeRouting | None = None
    ) -> torch.Tensor:
        """``Δy`` (N, d_out) for tokens ``x`` (N, d_in); ``routing`` overrides the router (tests, enumeration)."""
        if routing is None and smore_decode.applies(self, x):  # decoding: the same Δy in fewer torch calls
            return smore_decode.forward(self, x, valid)
        if self.recompute and self.training and torch.is_grad_enabled():
            # Autograd would keep every slot's expert output, σ input and α product and the router's activations,
            # all per token: 1.2-1.5x the activations of a LoRA of the same size. The checkpoint keeps only its
            # inputs and reruns _message in backward, with the RNG state of this call so that the noisy gate draws
            # the same noise and routes the same way. The two products that read x (A x + a, D x + d) stay outside:
            # they are narrow (R and d_down columns) to keep and the costliest part to rerun.
            router_down = self.router.down_proj(x) if routing is None else None
            down = None if self._grouped() else F.linear(x, self.A, self.A_bias)
            message, routing = checkpoint(
                self._message, x, valid, routing, router_down, down, use_reentrant=False, preserve_rng_state=True
            )
        else:
            message, routing = self._message(x, valid, routing)
        self.aux_loss = routing.aux_loss
        self.last_selection = ExpertSelection(routing.indices, tuple(self.num_experts), valid)  # for RoutingTracker
        return self.proj(message)  # (N, d_out): W_proj outside the checkpoint, so x_L is saved once, not recomputed


def build_smore(config, in_features: int, out_features: int) -> SMoREDelta:
    """Builder: an :class:`SMoREConfig` to the keyword arguments of :class:`SMoREDelta`."""
    return SMoREDelta(
        in_features=in_features,
        out_features=out_features,
        num_experts=config.num_experts,
        top_k=config.top_k,
        ranks=config.ranks,
        scalings=config.scalings,
        router_dims=config.router_dims,
        down_proj_dim=config.down_width(in_features),
        router_activation=config.router_activation,
        router_prelu_init=config.router_prelu_init,
        gate=config.gate,
        balance_weight=config.balance_weight,
        activation=config.activation,
        prelu_init=config.prelu_init,
        activation_position=config.activation_position,
        shared_pool=config.shared_pool,
        init=config.init,
        recompute=config.recompute,
    )


# -- cost model (SPEC §1.7) -----------------------------------------------------------------------------------


def _router_input_dims(config: SMoREConfig, in_features: int) -> list[int]:
    """d_in,ℓ: the down-projected token plus the keys of every level above (SPEC §1.3)."""
    down = config.down_width(in_features)
    return [down + sum(config.router_dims[level + 1 :]) for level in range(config.num_levels)]


def _router_parameters(config: SMoREConfig, in_features: int) -> int:
    """D (with bias), then per level the two-layer MLP (with biases), the keys and, for noisy top-k, W_noise."""
    down = config.down_width(in_features)
    total = in_features * down + down
    for d_in, d_g, s in zip(_router_input_dims(config, in_features), config.router_dims, config.num_experts):
        total += d_in * d_g + d_g + d_g * d_g + d_g + s * d_g
        if config.router_activation == "prelu":
            total += 1  # the router activation's learnable slope
        if config.gate == "noisy_topk":
            total += d_in * s  # W_noise: Linear(d_in,ℓ → s_ℓ) without bias
    return total


def smore_parameter_counts(config: SMoREConfig, in_features: int, out_features: int) -> Counts:
    """Trainable parameters of one S'MoRE adapter on a ``in_features → out_features`` layer (SPEC §1.7).

    Returns ``{"A", "B", "W", "proj", "router", "prelu", "total"}``, all biases included:

    - ``A``: ``d·R + R`` with ``R = d_L`` (``Σ s_ℓ r_ℓ``, or ``s·r`` for the shared pool, where ``d_L = s·r`` too);
    - ``B``: ``Σ_ℓ s_ℓ d_{ℓ+1} (r_ℓ + 1)``; the shared pool has one ``B`` of shape ``(s, s·r, r)``: ``s·sr·(r+1)``;
    - ``W``: ``Σ_{ℓ≥1} d_{ℓ+1} (d_ℓ + 1)``;  ``proj``: ``d_out (d_L + 1)``;
    - ``router``: ``d·d_down + d_down + Σ_ℓ (d_in,ℓ d_g + d_g + d_g² + d_g + s_ℓ d_g)`` (+ ``Σ_ℓ d_in,ℓ s_ℓ`` for
      ``noisy_topk``);  ``prelu``: ``L`` slopes when ``activation="prelu"``, else 0.
    """
    config = check_config(config, SMoREConfig)
    check_features(in_features, out_features)
    widths = config.widths
    top = widths[-1]
    if config.shared_pool:
        s, r = config.num_experts[0], config.ranks[0]
        b = s * top * (r + 1)  # one pool, stored once however many levels read it
    else:
        b = sum(s * widths[level + 1] * (r + 1) for level, (s, r) in enumerate(zip(config.num_experts, config.ranks)))
    return with_total(
        {
            "A": in_features * top + top,
            "B": b,
            "W": sum(widths[level + 1] * (widths[level] + 1) for level in range(1, config.num_levels)),
            "proj": out_features * (top + 1),
            "router": _router_parameters(config, in_features),
            "prelu": config.num_levels if config.activation == "prelu" else 0,
        }
    )


def smore_active_parameters(config: SMoREConfig, in_features: int, out_features: int) -> Counts:
    """Parameters one token uses (SPEC §1.7), as ``{"A", "B", "W", "proj", "router", "prelu", "total"}``.

    The selected experts' ``A`` and ``B`` rows (with biases): at most ``min(F_ℓ, s_ℓ)`` distinct experts in level
    ℓ (all ``s_ℓ`` for the dense gate), or ``min(Σ_ℓ F_ℓ, s)`` for the shared pool, whose levels draw on the same
    experts. Every ``W_ℓ``, ``W_proj`` and the PReLU slopes act on every token. **The router counts in full**: every
    token runs the down-projection, the MLPs and the key scores (the noisy gate's ``W_noise`` is included too,
    though it only runs in training). This is the upper bound over tokens: a token whose parents pick overlapping
    children uses fewer distinct experts.
    """
    config = check_config(config, SMoREConfig)
    params = smore_parameter_counts(config, in_features, out_features)
    widths, slots = config.widths, config.slots
    if config.shared_pool:
        s, r = config.num_experts[0], config.ranks[0]
        unique = min(sum(slots[: config.num_levels]), s)
        a = unique * r * (in_features + 1)
        b = unique * widths[-1] * (r + 1)
    else:
        a = b = 0
        for level, (s, r) in enumerate(zip(config.num_experts, config.ranks)):
            unique = min(slots[level], s)
            a += unique * r * (in_features + 1)
            b += unique * widths[level + 1] * (r + 1)
    return with_total(
        {"A": a, "B": b, "W": params["W"], "proj": params["proj"], "router": params["router"], "prelu": params["prelu"]}
    )


def smore_flops_per_token(
    config: SMoREConfig, in_features: int, out_features: int, *, training: bool = False
) -> Counts:
    """Multiply-adds per token of this library's S'MoRE forward, as ``{"A", "B", "W", "proj", "router", "total"}``.

    The forward takes one of two paths (``SMoREDelta.expert_path``), so these are not the paper's counts:

    - dense (the default): ``A``, every expert's down-projection in one matmul, ``d·R`` (``R = Σ s_ℓ r_ℓ``, or
      ``s·r`` for the pool); ``B``, every expert's output in every level, routed or not, ``Σ_ℓ s_ℓ r_ℓ d_{ℓ+1}``
      (the shared pool's ``B`` once, ``s·r·d_1``: each level rescales the same outputs);
    - grouped (when a token's slots need at most a quarter of the A rows, ``4·Σ_ℓ F_ℓ r_ℓ ≤ R``): each routed slot
      computes only its own expert, ``A`` = ``d·Σ_ℓ F_ℓ r_ℓ`` and ``B`` = ``Σ_ℓ F_ℓ r_ℓ d_{ℓ+1}``;
    - both: ``W``: ``W_ℓ`` once per slot of level ℓ ≥ 1, ``Σ_{ℓ≥1} F_ℓ d_ℓ d_{ℓ+1}``;  ``proj``: ``d_L · d_out``;
    - ``router``: ``d·d_down`` plus, per level and per parent slot (``F_{ℓ+1}`` of them), the MLP
      ``d_in,ℓ d_g + d_g²`` and the key scores ``s_ℓ d_g``; with ``training=True`` the noisy gate's noise scale
      adds ``d_in,ℓ s_ℓ`` per parent slot (it is skipped in eval).
    """
    config = check_config(config, SMoREConfig)
    check_features(in_features, out_features)
    widths, slots = config.widths, config.slots
    router = in_features * config.down_width(in_features)
    dims = zip(_router_input_dims(config, in_features), config.router_dims, config.num_experts)
    for level, (d_in, d_g, s) in enumerate(dims):
        per_parent = d_in * d_g + d_g * d_g + s * d_g
        if training and config.gate == "noisy_topk":
            per_parent += d_in * s
        router += slots[level + 1] * per_parent
    levels = range(config.num_levels)
    active_rows = sum(slots[level] * config.ranks[level] for level in levels)
    if uses_grouped_path(slots[:-1], config.ranks, widths[-1]):  # widths[-1] is R, the rows of A
        a = in_features * active_rows
        b = sum(slots[level] * config.ranks[level] * widths[level + 1] for level in levels)
    else:
        a = in_features * widths[-1]
        pools = [0] if config.shared_pool else list(levels)
        b = sum(config.num_experts[level] * config.ranks[level] * widths[level + 1] for level in pools)
    return with_total(
        {
            "A": a,
            "B": b,
            "W": sum(slots[level] * widths[level] * widths[level + 1] for level in range(1, config.num_levels)),
            "proj": widths[-1] * out_features,
            "router": router,
        }
    )


@dataclass(frozen=True)
class PaperOverhead:
    """The paper's Table 1 accounting for one adapter on a ``d → d`` layer."""

    top_width: int
    """d_L."""
    main: int
    """``2·d·d_L``: all A projections plus W_proj, the cost of a LoRA of rank d_L."""
    delta: int
    """``Σ_ℓ s_ℓ r_ℓ d_{ℓ+1} + Σ_{ℓ≥1} d_{ℓ+1} d_ℓ``: every B computed for every expert, each W_ℓ once."""
    ratio: float
    """``delta / main``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paper_overhead(config: SMoREConfig, in_features: int) -> PaperOverhead:
    """S'MoRE's compute overhead in the convention of the paper's Table 1 (SPEC §1.7), exactly as stated there.

    Unlike :func:`smore_flops_per_token`, each ``W_ℓ`` counts once (not once per slot) and the router is left out.
    Example: d = 4096, s = [4, 4], r = [8, 8] gives d_L = 64, main = 524 288 (≈ 0.5M), Δ = 5120, ratio ≈ 1.0 %.
    """
    config = check_config(config, SMoREConfig)
    check_features(in_features, in_features)
    widths = config.widths
    main = 2 * in_features * widths[-1]
    delta = sum(s * r * widths[level + 1] for level, (s, r) in enumerate(zip(config.num_experts, config.ranks)))
    delta += sum(widths[level + 1] * widths[level] for level in range(1, config.num_levels))
    return PaperOverhead(top_width=widths[-1], main=main, delta=delta, ratio=delta / main)


# -- budget search (smore.analysis.budget) --------------------------------------------------------------------------


def _variants(config: SMoREConfig) -> list[list[AdapterConfig]]:
    """The router's size, never the tree: first the token down-projection ``d_down`` in steps of 4 (it moves the
    count most, ``d·d_down`` per adapter), nearest the starting one first; then the same with the level routers'
    width ``d_g`` at 16 or 64."""
    downs = range(4, 129, 4)
    start = config.down_proj_dim or 32  # a layer-width down-projection (None) is searched from the usual 32

    def tiers(router_dims: list[int]) -> list[list[AdapterConfig]]:
        out = []
        for distance in sorted({abs(d - start) for d in downs}):
            changes = [
                {"down_proj_dim": d, "router_dims": router_dims}
                for d in downs
                if abs(d - start) == distance and (d, router_dims) != (start, config.router_dims)
            ]
            if changes:
                out.append(replace_all(config, changes))
        return out

    levels = config.num_levels
    result = tiers(list(config.router_dims))
    for width in (16, 64):
        if [width] * levels != config.router_dims:
            result += tiers([width] * levels)
    return result


def _describe(config: SMoREConfig) -> str:
    def joined(values: list[int]) -> str:
        return ",".join(str(v) for v in values)

    text = f"s={joined(config.num_experts)} f={joined(config.top_k)} r={joined(config.ranks)}"
    down = "d" if config.down_proj_dim is None else config.down_proj_dim
    text += f" d_g={joined(config.router_dims)} d_down={down} {config.gate}"
    return text + (" shared" if config.shared_pool else "")


METHOD = Method(
    name="smore",
    config_class=SMoREConfig,
    build=build_smore,
    costs=CostModel(smore_parameter_counts, smore_active_parameters, smore_flops_per_token),
    search=SearchSpace(
        default=SMoREConfig,
        resize=lambda c, r: dataclasses.replace(c, ranks=[r] * c.num_levels),
        describe=_describe,
        gamma=lambda c: structures(c.num_experts, c.fanouts),
        variants=_variants,
    ),
)
