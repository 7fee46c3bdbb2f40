"""MixLoRA (Li et al., 2024; package ``mixlora``): an FFN-level mixture of LoRA experts.

A bias-free router on the FFN input picks the top-k of E experts (softmax, renormalised); expert e is the frozen
gated MLP with its own LoRA on ``gate_proj``, ``up_proj`` and ``down_proj``::

    y = Σ_{e ∈ top-k(x)} p_e · down_e( act(gate_e(x)) ⊙ up_e(x) ),      proj_e(x) = W_proj x + (α/r) B_e A_e x

plus a Switch-style load-balancing loss (coefficient 0.001). Optionally, plain LoRA on attention projections.

The frozen gate/up projections run once per token, and the frozen down projection (linear, weights summing to 1)
once per token on the weighted sum of the slots' hidden states. The expert LoRAs take one of two paths, with the
same outputs and gradients:

- **grouped** (default from ``GROUPED_MIN_TOKENS`` = 64 tokens on): the N·k routed slots are sorted by expert and
  each expert multiplies only its own slots by its A and B (a loop over the E experts, never over tokens), so the
  LoRA cost is that of the k active experts per token;
- **masked** (a few tokens, e.g. decoding): every expert's A projection comes from one matmul, masked to the slot's
  expert, and one matmul with the stacked B gives the slot updates: fewer calls, but E times the active
  multiply-adds for B of gate/up and A of down.

``expert_path`` (``"auto"``, ``"grouped"`` or ``"masked"``) overrides the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from smore.adapters.base import (
    AdaptedFFN,
    AdaptedLinear,
    AdapterWrapper,
    ExpertGroups,
    ForwardContext,
    ffn_features,
    input_dtype,
    linear_features,
)
from smore.adapters.lora import LoRAConfig, build_lora
from smore.adapters.method import (
    CostModel,
    Counts,
    Method,
    check_config,
    check_features,
    mixture_search,
    with_total,
)
from smore.checks import check_int, check_number
from smore.config import AdapterConfig, as_list, check_patterns
from smore.errors import UserError
from smore.routing.gates import SwitchGate
from smore.routing.stats import ExpertSelection
from smore.targets import find_targets, matches

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GROUPED_MIN_TOKENS = 64
"""From this many tokens on, ``expert_path="auto"`` takes the grouped path: its loop over experts costs a few calls
per expert, which the masked path's E-fold multiply-adds outweigh only beyond a few dozen tokens on a CPU."""


@dataclass
class MixLoRAConfig(AdapterConfig):
    """MixLoRA: each gated MLP becomes a top-k mixture of ``num_experts`` copies of itself, each with its own LoRA on
    ``expert_modules``; optional plain LoRA on ``attention_modules``. Llama-style MLPs only."""

    method: ClassVar[str] = "mixlora"

    target_modules: list[str] | str = field(default_factory=lambda: ["mlp"])
    """The gated MLP blocks to turn into mixtures (modules with gate_proj, up_proj, down_proj and act_fn)."""
    num_experts: int = 8
    """E: experts per MLP block."""
    top_k: int = 2
    """Experts used per token."""
    rank: int = 8
    """r: rank of every expert LoRA (and of the attention LoRA)."""
    alpha: float = 16.0
    """LoRA scaling numerator: updates are multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA inputs, in training only."""
    expert_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """Which projections of the MLP get a LoRA per expert."""
    attention_modules: list[str] | str | None = None
    """Attention projections that get a plain LoRA (e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']); null: none."""
    balance_weight: float = 0.001
    """Weight of the Switch-style load-balancing loss."""
    router_init_range: float = 0.02
    """Standard deviation of the router's normal initialisation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "top_k", "rank"):
            check_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise UserError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; use at most num_experts.")
        check_number("alpha", self.alpha, low=0, open_low=True)
        check_number("dropout", self.dropout, low=0, high=1)
        check_number("balance_weight", self.balance_weight, low=0)
        check_number("router_init_range", self.router_init_range, low=0)
        projections = ("gate_proj", "up_proj", "down_proj")
        self.expert_modules = as_list("expert_modules", self.expert_modules)
        if not self.expert_modules or any(m not in projections for m in self.expert_modules):
            raise UserError(
                f"expert_modules={self.expert_modules!r} must be a non-empty subset of {list(projections)}."
            )
        if self.attention_modules is not None:
            self.attention_modules = check_patterns("attention_modules", self.attention_modules)


class MixLoRAFFN(nn.Module):
    """The MixLoRA block for one gated MLP ``hidden → intermediate → hidden``; call with the frozen base MLP."""

    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        expert_modules: list[str],
        balance_weight: float = 0.001,
        router_init_range: float = 0.02,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = sorted(set(expert_modules) - set(EXPERT_PROJECTIONS))
        if unknown or not expert_modules:
            raise UserError(f"expert_modules={expert_modules!r} must be a non-empty subset of {EXPERT_PROJECTIONS}.")
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=router_init_range)
        # MixLoRA renormalises even a single expert's weight to 1 (as its package does).
        self.gate = SwitchGate(
            num_experts=num_experts, top_k=top_k, balance_weight=balance_weight, renormalize_top1=True
        )
        shapes = {
            "gate_proj": (hidden_size, intermediate_size),
            "up_proj": (hidden_size, intermediate_size),
            "down_proj": (intermediate_size, hidden_size),
        }
        # Experts stacked: A by rows (E·r, d_in), B by columns (d_out, E·r); expert e owns block e.
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in EXPERT_PROJECTIONS:
            if name in expert_modules:
                d_in, d_out = shapes[name]
                self.lora_A[name] = nn.Parameter(torch.empty(num_experts * rank, d_in))
                self.lora_B[name] = nn.Parameter(torch.zeros(d_out, num_experts * rank))
                for expert in range(num_experts):  # each expert's A as nn.Linear's default init
                    nn.init.kaiming_uniform_(self.lora_A[name][expert * rank : (expert + 1) * rank], a=math.sqrt(5))
        self.aux_loss: torch.Tensor | None = None
        self.last_selection: ExpertSelection | None = None  # what the last forward routed (RoutedDelta)
        self.expert_path = "auto"

    def _expert_hidden(self, name: str, x: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        """A_e x for the expert of every slot, as (N, k, E·r) with the other experts' blocks zeroed; x is (N, d)
        (shared by the slots) or (N, k, d)."""
        hidden = self.dropout(x) @ self.lora_A[name].t()  # (N, E·r) or (N, k, E·r)
        return (hidden.unsqueeze(1) if hidden.dim() == 2 else hidden) * slot_mask

    def _up(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """(α/r) B_e (·): the stacked B applied to masked expert hidden states."""
        return (hidden @ self.lora_B[name].t()) * self.scaling

    def forward(self, x: torch.Tensor, base: nn.Module, valid: torch.Tensor | None = None) -> torch.Tensor:
        routing = self.gate(self.router(x), valid=valid)
        self.aux_loss = routing.aux_loss
        self.last_selection = ExpertSelection((routing.indices,), (self.num_experts,), valid)  # for RoutingTracker
        path = self.expert_path
        if path == "auto":
            path = "grouped" if x.shape[0] >= GROUPED_MIN_TOKENS else "masked"
        if torch.compiler.is_compiling():
            path = "masked"  # the grouped path's groups have sizes the compiled graph cannot know
        if path == "grouped":
            return self._grouped_forward(x, base, routing.indices, routing.weights)
        return self._masked_forward(x, base, routing.indices, routing.weights)

    def _masked_forward(self, x, base, indices, weights) -> torch.Tensor:
        """Every expert's A for every slot, masked to the slot's expert; one stacked-B matmul."""
        weights = weights.unsqueeze(-1)  # (N, k, 1)
        # One-hot by scatter: F.one_hot checks the indices' range on the host (a sync on CPU, and a graph break).
        slot_mask = x.new_zeros(*indices.shape, self.num_experts).scatter_(-1, indices.unsqueeze(-1), 1.0)  # (N, k, E)
        slot_mask = slot_mask.repeat_interleave(self.rank, dim=-1)  # (N, k, E·r): keep the slot's expert block
        base_x = x.to(input_dtype(base.gate_proj, x.dtype))
        gate = base.gate_proj(base_x).to(x.dtype).unsqueeze(1)  # (N, 1, d_ff), shared by the experts
        up = base.up_proj(base_x).to(x.dtype).unsqueeze(1)
        if "gate_proj" in self.lora_A:
            gate = gate + self._up("gate_proj", self._expert_hidden("gate_proj", x, slot_mask))  # (N, k, d_ff)
        if "up_proj" in self.lora_A:
            up = up + self._up("up_proj", self._expert_hidden("up_proj", x, slot_mask))
        hidden = base.act_fn(gate) * up  # (N, k, d_ff)
        mixed = (weights * hidden).sum(dim=1)  # Σ_j p_j h_j, since down_proj is linear and Σ_j p_j = 1
        y = base.down_proj(mixed.to(input_dtype(base.down_proj, x.dtype))).to(x.dtype)
        if "down_proj" in self.lora_A:  # Σ_j p_j B_j A_j h_j = B (Σ_j p_j masked A h_j): one B matmul per token
            y = y + self._up("down_proj", (weights * self._expert_hidden("down_proj", hidden, slot_mask)).sum(dim=1))
        return y  # (N, d)

    def _grouped_lora(self, name: str, rows: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """(α/r) B_e A_e for rows (M, d_in) sorted by expert (``groups``): (M, d_out)."""
        a = self.lora_A[name].view(self.num_experts, self.rank, -1)  # (E, r, d_in)
        b = self.lora_B[name].view(-1, self.num_experts, self.rank).transpose(0, 1)  # (E, d_out, r)
        return groups.linear(groups.linear(rows, a), b) * self.scaling

    def _grouped_forward(self, x, base, indices, weights) -> torch.Tensor:
        """The N·k slots sorted by expert; each expert's LoRAs applied to its own slots only."""
        n, k = indices.shape
        groups = ExpertGroups(indices.reshape(-1), self.num_experts)  # slots grouped by expert
        tokens = groups.order.div(k, rounding_mode="floor")  # (M = N·k,): the token of each sorted slot
        slot_weights = groups.sort(weights.reshape(-1)).unsqueeze(-1)  # (M, 1)
        base_x = x.to(input_dtype(base.gate_proj, x.dtype))
        gate = base.gate_proj(base_x).to(x.dtype).index_select(0, tokens)  # (M, d_ff)
        up = base.up_proj(base_x).to(x.dtype).index_select(0, tokens)
        if "gate_proj" in self.lora_A or "up_proj" in self.lora_A:
            rows = self.dropout(x).index_select(0, tokens)  # (M, d): the LoRA input of each slot
            if "gate_proj" in self.lora_A:
                gate = gate + self._grouped_lora("gate_proj", rows, groups)
            if "up_proj" in self.lora_A:
                up = up + self._grouped_lora("up_proj", rows, groups)
        hidden = base.act_fn(gate) * up  # (M, d_ff)
        mixed = x.new_zeros(n, hidden.shape[-1]).index_add(0, tokens, slot_weights * hidden)  # Σ_j p_j h_j
        y = base.down_proj(mixed.to(input_dtype(base.down_proj, x.dtype))).to(x.dtype)
        if "down_proj" in self.lora_A:
            update = self._grouped_lora("down_proj", self.dropout(hidden), groups)  # (M, d)
            y = y.index_add(0, tokens, slot_weights * update)
        return y  # (N, d)


def attention_lora_config(config):
    """The plain LoRA that MixLoRA puts on the attention projections ``attention_modules``."""
    return LoRAConfig(
        target_modules=config.attention_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
    )


def find_mixlora_targets(model: nn.Module, config) -> dict[str, nn.Module]:
    """The gated MLP blocks ``target_modules`` selects, and the attention layers ``attention_modules`` selects."""
    blocks = find_targets(model, config, accepts=ffn_features, kind="gated MLP (gate_proj, up_proj, down_proj, act_fn)")
    if config.attention_modules is None:
        return blocks
    attention = find_targets(model, attention_lora_config(config))
    inside = [name for name in attention if any(name.startswith(block + ".") for block in blocks)]
    if inside:
        raise UserError(
            f"attention_modules={config.attention_modules!r} matched {inside[:3]}, inside the MLP blocks MixLoRA "
            "replaces; name attention projections only (e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj'])."
        )
    return {**blocks, **attention}


def wrap_mixlora(config, name: str, module: nn.Module, context: ForwardContext) -> AdapterWrapper:
    """An FFN block gets the MixLoRA mixture; an attention projection a plain LoRA."""
    features = ffn_features(module)
    if features is not None and matches(name, config.target_modules):
        hidden_size, intermediate_size = features
        delta = MixLoRAFFN(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_experts=config.num_experts,
            top_k=config.top_k,
            rank=config.rank,
            alpha=config.alpha,
            expert_modules=config.expert_modules,
            balance_weight=config.balance_weight,
            router_init_range=config.router_init_range,
            dropout=config.dropout,
        )
        return AdaptedFFN(module, delta, context)
    in_features, out_features = linear_features(module)
    return AdaptedLinear(module, build_lora(attention_lora_config(config), in_features, out_features), context)


def mixlora_parameter_counts(config: MixLoRAConfig, hidden_size: int, intermediate_size: int) -> Counts:
    """One MixLoRA FFN block ``hidden → intermediate → hidden``: E LoRAs of rank r on each expert projection,
    ``E r (d + d_ff)`` each, and the bias-free router ``d E`` (SPEC §2: ``E r · 3(d + d_ff) + d E`` for all three)."""
    config = check_config(config, MixLoRAConfig)
    check_features(hidden_size, intermediate_size)
    width = config.num_experts * config.rank * (hidden_size + intermediate_size)
    counts = {name: width for name in config.expert_modules}
    counts["router"] = hidden_size * config.num_experts
    return with_total(counts)


def mixlora_active_parameters(config: MixLoRAConfig, hidden_size: int, intermediate_size: int) -> Counts:
    """Parameters one token uses in a block: the top-k experts' LoRAs and the whole router."""
    config = check_config(config, MixLoRAConfig)
    check_features(hidden_size, intermediate_size)
    width = config.top_k * config.rank * (hidden_size + intermediate_size)
    counts = {name: width for name in config.expert_modules}
    counts["router"] = hidden_size * config.num_experts
    return with_total(counts)


def mixlora_flops_per_token(
    config: MixLoRAConfig, hidden_size: int, intermediate_size: int, *, path: str = "grouped"
) -> Counts:
    """Multiply-adds per token of this library's MixLoRA block, beyond the frozen FFN (which runs once per token).

    ``path="grouped"`` (inputs of ``GROUPED_MIN_TOKENS`` tokens or more, i.e. training and prefill): each of the
    token's ``k`` slots runs its own expert's LoRA only, ``k r (d + d_ff)`` per projection. ``path="masked"``
    (shorter inputs, e.g. decoding): gate/up: every expert's A on the token (``d E r``), then the stacked B once per
    selected slot (``k E r d_ff``, the other experts' blocks masked to zero); down: every expert's A once per slot
    (``k d_ff E r``), then the stacked B once on the weighted sum (``E r d``). Router ``d E`` either way.
    """
    config = check_config(config, MixLoRAConfig)
    check_features(hidden_size, intermediate_size)
    if path not in ("grouped", "masked"):
        raise UserError(f"path={path!r} must be 'grouped' or 'masked'.")
    stacked, k, r = config.num_experts * config.rank, config.top_k, config.rank
    if path == "grouped":
        per_projection = dict.fromkeys(("gate_proj", "up_proj", "down_proj"), k * r * (hidden_size + intermediate_size))
    else:
        per_projection = {
            "gate_proj": hidden_size * stacked + k * stacked * intermediate_size,
            "up_proj": hidden_size * stacked + k * stacked * intermediate_size,
            "down_proj": k * intermediate_size * stacked + stacked * hidden_size,
        }
    counts = {name: per_projection[name] for name in config.expert_modules}
    counts["router"] = hidden_size * config.num_experts
    return with_total(counts)


def _layer_config(config: MixLoRAConfig, module: nn.Module) -> AdapterConfig:
    """The config that sizes one target: the mixture for an MLP block, the plain LoRA for an attention projection."""
    return attention_lora_config(config) if linear_features(module) is not None else config


METHOD = Method(
    name="mixlora",
    config_class=MixLoRAConfig,
    wrap=wrap_mixlora,
    find=find_mixlora_targets,
    layer_config=_layer_config,
    block_level=True,
    costs=CostModel(mixlora_parameter_counts, mixlora_active_parameters, mixlora_flops_per_token),
    search=mixture_search(lambda: MixLoRAConfig(num_experts=8, top_k=2), max_experts=16),
)
