"""A slow, readable S'MoRE: one token at a time, one tree node at a time, straight from SPEC §1.2-1.3.

It shares nothing with the fast path but the parameters, so tests can check the vectorised forward, the batched
tree router and their gradients against it. Never used in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smore.adapters.smore import SMoREDelta
from smore.routing.gates import DenseGate, NoisyTopKGate, SwitchGate
from smore.routing.types import TreeRouting


def expert_output(delta: SMoREDelta, x: torch.Tensor, level: int, expert: int) -> torch.Tensor:
    """U_i^ℓ = γ_ℓ (B_i (A_i x + a_i) + b_i) for one token x (d,)."""
    r = delta.ranks[level]
    rows = slice(delta.a_offsets[level] + expert * r, delta.a_offsets[level] + (expert + 1) * r)
    pool = 0 if delta.shared_pool else level
    hidden = delta.A[rows] @ x + delta.A_bias[rows]
    return delta.scalings[level] * (delta.B[pool][expert] @ hidden + delta.B_bias[pool][expert])


def node_term(delta: SMoREDelta, x, routing: TreeRouting, token: int, level: int, slot: int) -> torch.Tensor:
    """What the node in ``slot`` of ``level`` adds to its parent's sum (the summand of Eq. 3 or its variants)."""
    expert = int(routing.indices[level][token, slot])
    alpha = routing.weights[level][token, slot]
    u = expert_output(delta, x, level, expert)
    position = delta.activation_position
    if level == 0:
        return alpha * (delta.sigma(u, level) if position == "all" else u)
    children = children_message(delta, x, routing, token, level, slot)
    w = delta.W[level - 1]
    if position == "all":
        return alpha * delta.sigma(u + w.weight @ children + w.bias, level)
    carried = w.weight @ delta.sigma(children, level) + w.bias
    return alpha * u + carried if position == "child" else alpha * (u + carried)


def children_message(delta: SMoREDelta, x, routing: TreeRouting, token: int, level: int, slot: int) -> torch.Tensor:
    """x_ℓ of the node in ``slot`` of ``level``: the sum of its children's terms (level - 1)."""
    fanout = delta.fanouts[level - 1]
    children = range(slot * fanout, (slot + 1) * fanout)
    return sum(node_term(delta, x, routing, token, level - 1, child) for child in children)


def reference_forward(delta: SMoREDelta, x: torch.Tensor, routing: TreeRouting) -> torch.Tensor:
    """Δy (N, d_out) computed token by token and node by node with the given routing."""
    top = delta.num_levels - 1
    outputs = []
    for token in range(x.shape[0]):
        root = sum(
            node_term(delta, x[token], routing, token, top, slot) for slot in range(delta.fanouts[top])
        )  # x_L of the virtual root
        outputs.append(delta.proj.weight @ root + delta.proj.bias)
    return torch.stack(outputs)


def reference_route(delta: SMoREDelta, x: torch.Tensor) -> TreeRouting:
    """Indices and weights of the tree routing, one token and one parent at a time (no noise: eval mode only).

    Probabilities and the auxiliary loss are not recomputed here; the returned ``probs`` are empty tensors.
    """
    router = delta.router
    levels = len(router.levels)
    indices = [[] for _ in range(levels)]
    weights = [[] for _ in range(levels)]

    def visit(token: int, level: int, context: torch.Tensor) -> None:
        level_router = router.levels[level]
        query = level_router.mlp(context)
        keys = level_router.keys
        gate = level_router.gate
        if isinstance(gate, NoisyTopKGate):
            keys = F.normalize(keys, dim=-1)
            logits = F.normalize(query, dim=-1) @ keys.t()
        else:
            logits = query @ keys.t()
        k = level_router.gate.fanout
        if isinstance(gate, DenseGate):
            chosen, alpha = torch.arange(k), logits.softmax(-1)
        elif isinstance(gate, SwitchGate):
            probs = logits.softmax(-1)
            chosen = probs.topk(k).indices
            alpha = probs[chosen] / probs[chosen].sum() if k > 1 else probs[chosen]
        else:
            chosen = logits.topk(k).indices
            alpha = logits[chosen].softmax(-1) if k > 1 else logits[chosen]
        for j in range(k):
            indices[level][token].append(int(chosen[j]))
            weights[level][token].append(alpha[j])
            if level > 0:
                visit(token, level - 1, torch.cat([context, keys[chosen[j]]]))

    for token in range(x.shape[0]):
        for level in range(levels):
            indices[level].append([])
            weights[level].append([])
        visit(token, levels - 1, router.down_proj(x[token]))
    return TreeRouting(
        indices=tuple(torch.tensor(level) for level in indices),
        weights=tuple(torch.stack([torch.stack(w) for w in level]) for level in weights),
        probs=tuple(torch.empty(0) for _ in range(levels)),
        aux_loss=x.new_zeros(()),
    )
