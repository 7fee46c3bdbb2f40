"""The S'MoRE tree router (SPEC §1.3): routing runs top-down, before any expert is computed.

For every selected parent of level ℓ+1, level ℓ's router reads ``z = [D x ; k_{a_{L-1}} ; … ; k_{a_{ℓ+1}}]`` (the
down-projected token, then the keys of all selected ancestors, top first), makes a query ``q = MLP_ℓ(z)``, scores it
against the level's learnable keys and lets its gate pick ``f_ℓ`` children. All parent slots of all tokens are
routed in one batched call per level; the only Python loop is over the L levels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from smore.errors import UserError
from smore.routing.gates import Gate, build_gate
from smore.routing.types import TreeRouting

ROUTER_ACTIVATIONS: dict[str, Callable[[float], nn.Module]] = {
    "relu": lambda prelu_init: nn.ReLU(),
    "gelu": lambda prelu_init: nn.GELU(),
    "silu": lambda prelu_init: nn.SiLU(),
    "tanh": lambda prelu_init: nn.Tanh(),
    "prelu": lambda prelu_init: nn.PReLU(init=prelu_init),  # one learnable slope, the authors' "prelu|<init>"
}
"""Router activation by name; each builder takes the initial PReLU slope (read by ``prelu`` only)."""


def tree_aux_loss(level_losses: Sequence[torch.Tensor], *, like: torch.Tensor) -> torch.Tensor:
    """The tree's auxiliary loss from its levels' (bottom first): their sum from a zero of ``like``'s dtype and device,
    top level first, the order routing runs in. Every path that computes it (the router's forward, the decode path's
    deferred loss) sums here, so all give the same number: float addition is not associative."""
    total = like.new_zeros(())
    for loss in reversed(level_losses):
        total = total + loss
    return total


class LevelRouter(nn.Module):
    """One level: ``MLP_ℓ = Linear(d_in → d_g) → act → Linear(d_g → d_g)``, keys ``K_ℓ ∈ R^{s×d_g}`` ~ U(0, 1)."""

    def __init__(
        self,
        *,
        input_dim: int,
        router_dim: int,
        num_experts: int,
        activation: str,
        gate: Gate,
        prelu_init: float = 0.25,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, router_dim),
            ROUTER_ACTIVATIONS[activation](prelu_init),
            nn.Linear(router_dim, router_dim),
        )
        self.keys = nn.Parameter(torch.rand(num_experts, router_dim))
        self.gate = gate

    def forward(self, z: torch.Tensor, valid: torch.Tensor | None, forced: torch.Tensor | None):
        logits, scored_keys = self.gate.scores(self.mlp(z), self.keys)
        return self.gate(logits, router_input=z, valid=valid, forced=forced), scored_keys


class TreeRouter(nn.Module):
    """Routes every token through the expert tree; returns a :class:`TreeRouting` (bottom level first)."""

    def __init__(
        self,
        *,
        in_features: int,
        num_experts: list[int],
        top_k: list[int],
        router_dims: list[int],
        down_proj_dim: int,
        router_activation: str = "relu",
        router_prelu_init: float = 0.25,
        gate: str = "switch",
        balance_weight: float = 0.01,
    ) -> None:
        super().__init__()
        if router_activation not in ROUTER_ACTIVATIONS:
            raise UserError(
                f"router_activation={router_activation!r} is unknown; choose one of {sorted(ROUTER_ACTIVATIONS)}."
            )
        self.down_proj = nn.Linear(in_features, down_proj_dim)
        levels = []
        for level in range(len(num_experts)):
            # The router input grows by the key width of every level above this one.
            input_dim = down_proj_dim + sum(router_dims[level + 1 :])
            levels.append(
                LevelRouter(
                    input_dim=input_dim,
                    router_dim=router_dims[level],
                    num_experts=num_experts[level],
                    activation=router_activation,
                    prelu_init=router_prelu_init,
                    gate=build_gate(
                        gate,
                        num_experts=num_experts[level],
                        top_k=top_k[level],
                        balance_weight=balance_weight,
                        router_input_dim=input_dim,
                    ),
                )
            )
        self.levels = nn.ModuleList(levels)

    @property
    def fanouts(self) -> list[int]:
        return [level.gate.fanout for level in self.levels]

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None = None,
        forced: list[torch.Tensor] | None = None,
        down: torch.Tensor | None = None,
    ) -> TreeRouting:
        """Route tokens ``x`` (N, d). ``valid`` (N,) bool excludes padding from the statistics. ``forced``, one
        (N, F_ℓ) index tensor per level (bottom first), imposes the selection, to enumerate routing trees. ``down``
        is ``down_proj(x)`` when the caller computed it already."""
        n = x.shape[0]
        context = (self.down_proj(x) if down is None else down).unsqueeze(1)  # (N, P=1, d_down): one root per token
        indices, weights, probs, aux = [], [], [], []
        for level in reversed(range(len(self.levels))):
            router = self.levels[level]
            parents, k = context.shape[1], router.gate.fanout
            flat_valid = None if valid is None else valid.repeat_interleave(parents)
            flat_forced = None if forced is None else forced[level].reshape(n * parents, k)
            out, keys = router(context.reshape(n * parents, -1), flat_valid, flat_forced)
            indices.insert(0, out.indices.reshape(n, parents * k))
            weights.insert(0, out.weights.reshape(n, parents * k))
            probs.insert(0, out.probs.reshape(n, parents, -1))
            aux.insert(0, out.aux_loss)
            if level == 0:
                break
            # Children inherit the parent's context and append the key their parent was scored with.
            child_keys = keys[out.indices].reshape(n, parents, k, -1)  # (N, P, k, d_g)
            context = torch.cat([context.unsqueeze(2).expand(-1, -1, k, -1), child_keys], dim=-1)
            context = context.reshape(n, parents * k, -1)
        aux_loss = tree_aux_loss(aux, like=x)
        return TreeRouting(indices=tuple(indices), weights=tuple(weights), probs=tuple(probs), aux_loss=aux_loss)

    def forced_aux_loss(
        self, logits: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], valid: torch.Tensor | None
    ) -> torch.Tensor:
        """The aux loss of a routing given per level (bottom first) as logits (N, P, s) and selections (N, P·k),
        computed by the gates themselves, ``forced`` to the selection: what :meth:`forward` gives for it."""
        level_losses = []
        for level in reversed(range(len(self.levels))):  # top-down, the gates called in the order forward calls them
            n, parents, s = logits[level].shape
            flat_valid = None if valid is None else valid.repeat_interleave(parents)
            forced = indices[level].reshape(n * parents, -1)
            out = self.levels[level].gate(logits[level].reshape(n * parents, s), valid=flat_valid, forced=forced)
            level_losses.insert(0, out.aux_loss)
        return tree_aux_loss(level_losses, like=logits[0])
