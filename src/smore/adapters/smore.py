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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smore.routing.stats import ExpertSelection
from smore.routing.tree import TreeRouter
from smore.routing.types import TreeRouting


def uniform_fan_in_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Kaiming-uniform with a = √5, i.e. U(±1/√fan_in), as ``nn.Linear``'s default weight init.

    Written out because the B tensors are stacked (s, d_out, r) and torch would read the wrong fan-in from them.
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


ACTIVATIONS = ("identity", "tanh", "relu", "prelu")
POSITIONS = ("all", "child", "child_v2")
INITS = ("normal", "b_zero", "bw_zero", "w_final_zero", "eq_1_layer")


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
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("activation", activation, ACTIVATIONS),
            ("activation_position", activation_position, POSITIONS),
            ("init", init, INITS),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is unknown; choose one of {list(choices)}.")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.ranks, self.scalings = list(num_experts), list(ranks), list(scalings)
        self.activation, self.activation_position = activation, activation_position
        self.shared_pool, self.init = shared_pool, init
        levels = len(num_experts)
        if shared_pool:
            self.widths = [0] + [num_experts[0] * ranks[0]] * levels
            self.a_offsets = [0] * levels  # every level reads the same pool of A rows
            total_rank = num_experts[0] * ranks[0]
        else:
            self.widths = [0]
            self.a_offsets = []
            for s, r in zip(num_experts, ranks):
                self.a_offsets.append(self.widths[-1])
                self.widths.append(self.widths[-1] + s * r)
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
        self.aux_loss: torch.Tensor | None = None
        self.last_selection: ExpertSelection | None = None  # what the last forward routed (RoutedDelta)
        # The grouped path pays when a token's slots need at most a quarter of the A rows the dense path computes
        # (bench/sparsity.py: at half, e.g. s = [8, 8], f = [2, 2], gathering the tokens costs what it saves on CPU).
        active_rows = sum(slots * r for slots, r in zip(self.slots, ranks))
        self.expert_path = "grouped" if 4 * active_rows <= total_rank else "dense"
        self.reset_parameters()

    @property
    def slots(self) -> list[int]:
        """F_ℓ per level (bottom first): the expert slots one token activates in level ℓ, ∏_{j ≥ ℓ} f_j."""
        slots, product = [], 1
        for fanout in reversed(self.fanouts):
            product *= fanout
            slots.insert(0, product)
        return slots

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

    def expert_outputs(self, down: torch.Tensor, level: int) -> torch.Tensor:
        """U (N, s_ℓ, d_{ℓ+1}) of every expert of a level, from the stacked A projections ``down`` (N, R)."""
        return self._all_experts(down, level, self.scalings[level]).transpose(0, 1)

    def _all_experts(self, down: torch.Tensor, level: int, scaling: float) -> torch.Tensor:
        """``scaling · (B_i a_i + b_i)`` of every expert i of a level as (s_ℓ, N, d_{ℓ+1}): one batched matmul."""
        s, r = self.num_experts[level], self.ranks[level]
        offset = self.a_offsets[level]
        a = down[:, offset : offset + s * r].reshape(-1, s, r).transpose(0, 1)  # (s, N, r)
        pool = 0 if self.shared_pool else level
        b, b_bias = self.B[pool], self.B_bias[pool]  # (s, d_{ℓ+1}, r), (s, d_{ℓ+1})
        return torch.baddbmm(b_bias.unsqueeze(1), a, b.transpose(1, 2), beta=scaling, alpha=scaling)

    def _dense_slot_outputs(self, x: torch.Tensor, routing: TreeRouting) -> list[torch.Tensor]:
        """Per level, U of the routed slots (N, F_ℓ, d_{ℓ+1}), gathered from every expert's output."""
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
            flat = index.reshape(-1)
            order = flat.argsort(stable=True)  # slots grouped by expert
            counts = torch.bincount(flat, minlength=s).tolist()
            rows = x.index_select(0, order.div(slots, rounding_mode="floor"))  # (N·F_ℓ, d): each slot's token
            a = self.A[offset : offset + s * r].view(s, r, -1).unbind(0)
            a_bias = self.A_bias[offset : offset + s * r].view(s, r).unbind(0)
            b, b_bias = self.B[pool].unbind(0), self.B_bias[pool].unbind(0)
            parts = [
                F.linear(F.linear(chunk, a[e], a_bias[e]), b[e], b_bias[e])  # (n_e, d_{ℓ+1})
                for e, chunk in enumerate(rows.split(counts))
            ]
            u = torch.cat(parts).index_select(0, order.argsort())  # back to (token, slot) order
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

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, routing: TreeRouting | None = None
    ) -> torch.Tensor:
        """``Δy`` (N, d_out) for tokens ``x`` (N, d_in); ``routing`` overrides the router (tests, enumeration)."""
        if routing is None:
            routing = self.router(x, valid)
        self.aux_loss = routing.aux_loss
        self.last_selection = ExpertSelection(routing.indices, tuple(self.num_experts), valid)  # for RoutingTracker
        if self.expert_path == "grouped":
            slot_outputs = self._grouped_slot_outputs(x, routing)
        else:
            slot_outputs = self._dense_slot_outputs(x, routing)
        message = None
        for level, u in enumerate(slot_outputs):  # bottom-up: (N, F_ℓ, d_{ℓ+1}) slots into their parents
            message = self.combine(level, u, routing.weights[level], message)
        return self.proj(message.squeeze(1))  # (N, d_out)


def build_smore(config, in_features: int, out_features: int) -> SMoREDelta:
    """Builder: an :class:`~smore.config.SMoREConfig` to the keyword arguments of :class:`SMoREDelta`."""
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
    )
