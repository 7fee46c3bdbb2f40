"""Parameter and compute cost of adapters (SPEC §1.7), written analytically from the config and layer shapes.

Nothing here builds a module: the counts are closed forms of the config, and the tests check that they equal
``sum(p.numel() for p in build(config, d_in, d_out).parameters())`` exactly, so a change to a delta that adds or
drops a tensor is caught. Each method registers its cost functions in :data:`COST_MODELS`; :func:`model_report` sums
them over the layers a config would adapt in a model.

Notation (SPEC §1.1), levels bottom first: ``s_ℓ`` experts, ``f_ℓ`` fanout, ``r_ℓ`` rank, ``d_ℓ`` message widths
(``d_0 = 0``, ``d_L`` the top width; ``s·r`` at every level for the shared pool), ``F_ℓ`` slots per token,
``d_g,ℓ`` router widths, ``d_down`` the router down-projection, ``d_in,ℓ = d_down + Σ_{j>ℓ} d_g,j`` the width of
level ℓ's router input. "FLOPs" are multiply-adds (MACs) of the matrix products; bias additions, activations,
softmax, top-k and gathers are element-wise or O(s) per slot and left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from smore.adapters.base import linear_features
from smore.adapters.mixlora import attention_lora_config
from smore.config import (
    AdapterConfig,
    HydraLoRAConfig,
    LoRAConfig,
    MixLoRAConfig,
    MoLoRAConfig,
    SMoREConfig,
    TREXConfig,
)
from smore.inject import module_shape
from smore.registry import get_method
from smore.targets import find_targets

logger = logging.getLogger(__name__)

Counts = dict[str, int]


def _check_features(in_features: Any, out_features: Any) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer (the adapted layer's width).")


def _check_smore(config: Any) -> SMoREConfig:
    if not isinstance(config, SMoREConfig):
        raise ValueError(
            f"config must be an SMoREConfig for the S'MoRE cost functions, got {type(config).__name__}; "
            "use the cost model registered for its method (COST_MODELS[config.method])."
        )
    return config


def _router_input_dims(config: SMoREConfig, in_features: int) -> list[int]:
    """d_in,ℓ: the down-projected token plus the keys of every level above (SPEC §1.3)."""
    down = config.down_width(in_features)
    return [down + sum(config.router_dims[level + 1 :]) for level in range(config.num_levels)]


def _with_total(counts: Counts) -> Counts:
    counts["total"] = sum(counts.values())
    return counts


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
    config = _check_smore(config)
    _check_features(in_features, out_features)
    widths = config.widths
    top = widths[-1]
    if config.shared_pool:
        s, r = config.num_experts[0], config.ranks[0]
        b = s * top * (r + 1)  # one pool, stored once however many levels read it
    else:
        b = sum(s * widths[level + 1] * (r + 1) for level, (s, r) in enumerate(zip(config.num_experts, config.ranks)))
    return _with_total(
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
    config = _check_smore(config)
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
    return _with_total(
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
    config = _check_smore(config)
    _check_features(in_features, out_features)
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
    if 4 * active_rows <= widths[-1]:  # grouped path (widths[-1] is R, the rows of A)
        a = in_features * active_rows
        b = sum(slots[level] * config.ranks[level] * widths[level + 1] for level in levels)
    else:
        a = in_features * widths[-1]
        pools = [0] if config.shared_pool else list(levels)
        b = sum(config.num_experts[level] * config.ranks[level] * widths[level + 1] for level in pools)
    return _with_total(
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
        return asdict(self)


def paper_overhead(config: SMoREConfig, in_features: int) -> PaperOverhead:
    """S'MoRE's compute overhead in the convention of the paper's Table 1 (SPEC §1.7), exactly as stated there.

    Unlike :func:`smore_flops_per_token`, each ``W_ℓ`` counts once (not once per slot) and the router is left out.
    Example: d = 4096, s = [4, 4], r = [8, 8] gives d_L = 64, main = 524 288 (≈ 0.5M), Δ = 5120, ratio ≈ 1.0 %.
    """
    config = _check_smore(config)
    _check_features(in_features, in_features)
    widths = config.widths
    main = 2 * in_features * widths[-1]
    delta = sum(s * r * widths[level + 1] for level, (s, r) in enumerate(zip(config.num_experts, config.ranks)))
    delta += sum(widths[level + 1] * widths[level] for level in range(1, config.num_levels))
    return PaperOverhead(top_width=widths[-1], main=main, delta=delta, ratio=delta / main)


# -- LoRA-style baselines (SPEC §2) ------------------------------------------------------------------------------


def _check_baseline(config: Any, config_class: type[AdapterConfig]) -> Any:
    if not isinstance(config, config_class) or config.method != config_class.method:
        raise ValueError(
            f"config must be a {config_class.__name__} for the {config_class.method!r} cost functions, got "
            f"{type(config).__name__}; use the cost model registered for its method (COST_MODELS[config.method])."
        )
    return config


def lora_parameter_counts(config: LoRAConfig, in_features: int, out_features: int) -> Counts:
    """LoRA: ``{"A": r d_in, "B": r d_out, "total": r (d_in + d_out)}``. Every token uses all of them."""
    config = _check_baseline(config, LoRAConfig)
    _check_features(in_features, out_features)
    return _with_total({"A": config.rank * in_features, "B": config.rank * out_features})


def lora_flops_per_token(config: LoRAConfig, in_features: int, out_features: int) -> Counts:
    """LoRA multiply-adds per token: ``{"A": d_in r, "B": r d_out, "total"}`` (the same numbers as its parameters)."""
    return lora_parameter_counts(config, in_features, out_features)


def molora_parameter_counts(config: MoLoRAConfig, in_features: int, out_features: int) -> Counts:
    """MoLoRA: ``{"A": E r d_in, "B": E r d_out, "router": d_in E, "total": E r (d_in + d_out) + d_in E}``."""
    config = _check_baseline(config, MoLoRAConfig)
    _check_features(in_features, out_features)
    experts, rank = config.num_experts, config.rank
    return _with_total(
        {"A": experts * rank * in_features, "B": experts * rank * out_features, "router": in_features * experts}
    )


def molora_active_parameters(config: MoLoRAConfig, in_features: int, out_features: int) -> Counts:
    """Parameters one token uses: the top-k experts' A and B and the whole router, ``k r (d_in + d_out) + d_in E``."""
    config = _check_baseline(config, MoLoRAConfig)
    _check_features(in_features, out_features)
    k, rank = config.top_k, config.rank
    return _with_total(
        {"A": k * rank * in_features, "B": k * rank * out_features, "router": in_features * config.num_experts}
    )


def molora_flops_per_token(config: MoLoRAConfig, in_features: int, out_features: int) -> Counts:
    """Multiply-adds per token of this library's MoLoRA forward: it computes **every** expert, routed or not.

    ``router``: ``d_in E``;  ``A``: all experts' A in one matmul, ``d_in E r``;  ``B``: the stacked B on the
    gate-weighted (mostly zero) hidden, ``E r d_out``. The gate and the weighting are element-wise, left out.
    """
    return molora_parameter_counts(config, in_features, out_features)


def hydralora_parameter_counts(config: HydraLoRAConfig, in_features: int, out_features: int) -> Counts:
    """HydraLoRA: ``{"A": r d_in, "B": E r d_out, "router": d_in E, "total"}``. The router is dense, so every
    token uses every parameter: this is also its active count."""
    config = _check_baseline(config, HydraLoRAConfig)
    _check_features(in_features, out_features)
    experts, rank = config.num_experts, config.rank
    return _with_total({"A": rank * in_features, "B": experts * rank * out_features, "router": in_features * experts})


def hydralora_flops_per_token(config: HydraLoRAConfig, in_features: int, out_features: int) -> Counts:
    """Multiply-adds per token: ``router`` ``d_in E``, the shared ``A`` ``d_in r``, the stacked heads ``B``
    ``E r d_out`` (the outer product p ⊗ A x is element-wise, left out). Equal to the parameter counts."""
    return hydralora_parameter_counts(config, in_features, out_features)


def mixlora_parameter_counts(config: MixLoRAConfig, hidden_size: int, intermediate_size: int) -> Counts:
    """One MixLoRA FFN block ``hidden → intermediate → hidden``: E LoRAs of rank r on each expert projection,
    ``E r (d + d_ff)`` each, and the bias-free router ``d E`` (SPEC §2: ``E r · 3(d + d_ff) + d E`` for all three)."""
    config = _check_baseline(config, MixLoRAConfig)
    _check_features(hidden_size, intermediate_size)
    width = config.num_experts * config.rank * (hidden_size + intermediate_size)
    counts = {name: width for name in config.expert_modules}
    counts["router"] = hidden_size * config.num_experts
    return _with_total(counts)


def mixlora_active_parameters(config: MixLoRAConfig, hidden_size: int, intermediate_size: int) -> Counts:
    """Parameters one token uses in a block: the top-k experts' LoRAs and the whole router."""
    config = _check_baseline(config, MixLoRAConfig)
    _check_features(hidden_size, intermediate_size)
    width = config.top_k * config.rank * (hidden_size + intermediate_size)
    counts = {name: width for name in config.expert_modules}
    counts["router"] = hidden_size * config.num_experts
    return _with_total(counts)


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
    config = _check_baseline(config, MixLoRAConfig)
    _check_features(hidden_size, intermediate_size)
    if path not in ("grouped", "masked"):
        raise ValueError(f"path={path!r} must be 'grouped' or 'masked'.")
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
    return _with_total(counts)


def trex_parameter_counts(config: TREXConfig, in_features: int, out_features: int) -> Counts:
    """T-REX (SPEC §3): ``A`` r1 d_in, ``B`` r2 d_out, the token router ``d_in r1 r2`` and the two gate scalars."""
    config = _check_baseline(config, TREXConfig)
    _check_features(in_features, out_features)
    r1, r2 = config.rank_in, config.rank_out
    return _with_total({"A": r1 * in_features, "B": r2 * out_features, "router": in_features * r1 * r2, "gates": 2})


def trex_flops_per_token(config: TREXConfig, in_features: int, out_features: int) -> Counts:
    """Multiply-adds per token: ``A x`` d_in r1, the router d_in r1 r2, the mix ``Rᵀ(Ax)`` r1 r2, ``B`` r2 d_out.

    The semantic prior adds one forward of the frozen encoder per sequence (not per layer), left out here."""
    config = _check_baseline(config, TREXConfig)
    _check_features(in_features, out_features)
    r1, r2 = config.rank_in, config.rank_out
    counts = {"A": in_features * r1, "router": in_features * r1 * r2, "mix": r1 * r2, "B": r2 * out_features}
    return _with_total(counts)


# -- registry -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """The cost functions of one method, each ``(config, in_features, out_features) -> {..., "total": int}``.

    ``active`` and ``flops`` may be ``None`` for a method that has not written them; reports then leave them out.
    """

    parameters: Callable[[Any, int, int], Counts]
    active: Callable[[Any, int, int], Counts] | None = None
    flops: Callable[[Any, int, int], Counts] | None = None


COST_MODELS: dict[str, CostModel] = {
    "smore": CostModel(smore_parameter_counts, smore_active_parameters, smore_flops_per_token),
    "lora": CostModel(lora_parameter_counts, lora_parameter_counts, lora_flops_per_token),
    "molora": CostModel(molora_parameter_counts, molora_active_parameters, molora_flops_per_token),
    "hydralora": CostModel(hydralora_parameter_counts, hydralora_parameter_counts, hydralora_flops_per_token),
    "mixlora": CostModel(mixlora_parameter_counts, mixlora_active_parameters, mixlora_flops_per_token),
    "trex": CostModel(trex_parameter_counts, trex_parameter_counts, trex_flops_per_token),
}
"""Method name → its cost functions. A new method adds one line, e.g.
``"lora": CostModel(lora_parameter_counts, lora_parameter_counts, lora_flops_per_token)``."""


def cost_model(method: str) -> CostModel:
    """The registered cost model of ``method``."""
    if method not in COST_MODELS:
        raise ValueError(
            f"method={method!r} has no cost model in smore.analysis.params.COST_MODELS; registered: "
            f"{sorted(COST_MODELS)}. Add one line there for the new method."
        )
    return COST_MODELS[method]


def layer_costs(config: AdapterConfig, in_features: int, out_features: int) -> dict[str, Counts | None]:
    """``{"parameters", "active", "flops"}`` breakdowns of one adapter (``None`` where the method has none)."""
    model = cost_model(config.method)
    return {
        "parameters": model.parameters(config, in_features, out_features),
        "active": None if model.active is None else model.active(config, in_features, out_features),
        "flops": None if model.flops is None else model.flops(config, in_features, out_features),
    }


@dataclass(frozen=True)
class LayerReport:
    """Cost of the adapter on one target layer."""

    name: str
    in_features: int
    out_features: int
    parameters: int
    active: int | None
    flops: int | None


@dataclass
class ModelReport:
    """Cost of adapting a whole model with one config: per target layer and summed."""

    method: str
    layers: list[LayerReport] = field(default_factory=list)
    base_parameters: int = 0
    """Parameters of the model before adaptation."""

    @property
    def trainable(self) -> int:
        """Adapter parameters over all target layers: the trainable count after ``smore.adapt``."""
        return sum(layer.parameters for layer in self.layers)

    @property
    def active(self) -> int | None:
        """Active adapter parameters per token, summed over layers (``None`` if the method has no formula)."""
        values = [layer.active for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def flops(self) -> int | None:
        """Adapter multiply-adds per token, summed over layers (``None`` if the method has no formula)."""
        values = [layer.flops for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def trainable_share(self) -> float:
        """Trainable adapter parameters as a fraction of all parameters after adaptation."""
        return self.trainable / max(self.trainable + self.base_parameters, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "modules": len(self.layers),
            "trainable": self.trainable,
            "active": self.active,
            "flops_per_token": self.flops,
            "base_parameters": self.base_parameters,
            "trainable_share": self.trainable_share,
            "layers": [asdict(layer) for layer in self.layers],
        }


def model_report(model: nn.Module, config: AdapterConfig) -> ModelReport:
    """Cost of adapting ``model`` (not yet adapted) with ``config``, without building any adapter.

    The targets are those :func:`smore.inject.find_targets` selects, so ``report.trainable`` equals the trainable
    parameter count after ``smore.adapt(model, config)``.
    """
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"config must be an AdapterConfig (e.g. SMoREConfig), got {type(config).__name__}.")
    cost_model(config.method)  # fail before walking the model if the method has no cost model
    report = ModelReport(method=config.method, base_parameters=sum(p.numel() for p in model.parameters()))
    method = get_method(config.method)
    targets = method.find(model, config) if method.find else find_targets(model, config)
    cache: dict[tuple[str, int, int], LayerReport] = {}  # many layers share a shape; the formulas only see it
    for name, module in targets.items():
        layer_config = config
        if isinstance(config, MixLoRAConfig) and linear_features(module) is not None:
            layer_config = attention_lora_config(config)  # MixLoRA's attention layers carry a plain LoRA
        in_features, out_features = module_shape(module)
        key = (layer_config.method, in_features, out_features)
        if key not in cache:
            costs = layer_costs(layer_config, in_features, out_features)
            cache[key] = LayerReport(
                name="",
                in_features=in_features,
                out_features=out_features,
                parameters=costs["parameters"]["total"],
                active=None if costs["active"] is None else costs["active"]["total"],
                flops=None if costs["flops"] is None else costs["flops"]["total"],
            )
        report.layers.append(replace(cache[key], name=name))
    logger.debug("model report: %d %s adapters, %d trainable", len(report.layers), config.method, report.trainable)
    return report
