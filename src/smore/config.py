"""Typed, validated adapter configurations.

One name travels end to end: the YAML/JSON key, the dataclass field and the keyword argument of the module that
uses it are the same word. Every field is checked in ``__post_init__`` and a bad value raises ``ValueError`` naming
the field and the fix, before any model is touched.

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
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from smore.checks import check_choice, check_int, check_number

GateType = Literal["dense", "switch", "noisy_topk"]
Activation = Literal["identity", "tanh", "relu", "prelu"]
ActivationPosition = Literal["all", "child", "child_v2"]
InitMethod = Literal["normal", "b_zero", "bw_zero", "w_final_zero", "eq_1_layer"]
RouterActivation = Literal["relu", "gelu", "silu", "tanh", "prelu"]
AuxReduction = Literal["sum", "mean"]


def _check_choice(name: str, value: Any, literal: Any) -> None:
    check_choice(name, value, get_args(literal))


def _check_positive_ints(name: str, values: list[int], *, allow_zero: bool = False) -> None:
    for i, v in enumerate(values):
        check_int(f"{name}[{i}]", v, 0 if allow_zero else 1)


def _as_list(name: str, value: Any) -> list:
    if isinstance(value, tuple):
        return list(value)
    if not isinstance(value, list):
        raise ValueError(f"{name}={value!r} must be a list with one entry per level (bottom level first).")
    return value


def _check_patterns(name: str, value: Any) -> list[str] | str:
    """Module-name patterns: a non-empty list of non-empty suffixes, or one regular expression."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str) and value:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{name}={value!r} is not a valid regular expression ({error}).") from error
        return value
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise ValueError(
            f"{name}={value!r} must be a non-empty list of module-name suffixes (non-empty strings) or a regular "
            "expression, e.g. ['gate_proj', 'up_proj', 'down_proj']."
        )
    return value


@dataclass
class AdapterConfig:
    """Fields shared by every method: where the adapters go."""

    method: ClassVar[str] = ""

    target_modules: list[str] | str = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """Module names to adapt: a list of name suffixes (``"up_proj"`` matches ``model.layers.0.mlp.up_proj``) or one
    regular expression matched against the full module name."""
    exclude_modules: list[str] | str | None = None
    """Names to leave alone, matched the same way as ``target_modules``."""
    layers_to_transform: list[int] | None = None
    """Only adapt modules inside these decoder-layer indices (``...layers.{i}...``); ``None`` adapts every layer."""

    def __post_init__(self) -> None:
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules)
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
                self.layers_to_transform = [self.layers_to_transform]
            self.layers_to_transform = _as_list("layers_to_transform", self.layers_to_transform)
            _check_positive_ints("layers_to_transform", self.layers_to_transform, allow_zero=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON/YAML form: ``method`` plus every field."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        """Build from a mapping; unknown keys are refused with the list of valid ones."""
        values = {k: v for k, v in values.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)


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
                raise ValueError(
                    f"{name}={value!r} must be a list with one entry per level (bottom level first), or one number "
                    "for every level."
                )
        lengths = {name: len(value) for name, value in given.items() if isinstance(value, list)}
        if len(set(lengths.values())) > 1:
            first = next(iter(lengths))
            other = next(name for name in lengths if lengths[name] != lengths[first])
            raise ValueError(
                f"{other} has {lengths[other]} entries but {first} has {lengths[first]} levels; give one {other} "
                "entry per level (bottom level first), or one number for every level."
            )
        levels = next(iter(lengths.values()), self.DEFAULT_LEVELS)
        if levels == 0:
            raise ValueError("num_experts must have at least one level, e.g. [4, 4].")
        for name in per_level:
            value = given.get(name, self.LEVEL_DEFAULTS.get(name))
            setattr(self, name, value if value is None or isinstance(value, list) else [value] * levels)
        for name in self.LEVEL_DEFAULTS:
            _check_positive_ints(name, getattr(self, name))
        if self.alpha is not None:
            for i, a in enumerate(self.alpha):
                check_number(f"alpha[{i}]", a, low=0, open_low=True)
        _check_choice("gate", self.gate, GateType)
        _check_choice("activation", self.activation, Activation)
        _check_choice("activation_position", self.activation_position, ActivationPosition)
        _check_choice("init", self.init, InitMethod)
        _check_choice("router_activation", self.router_activation, RouterActivation)
        for level, (k, s) in enumerate(zip(self.top_k, self.num_experts)):
            if k > s:
                raise ValueError(
                    f"top_k[{level}]={k} exceeds num_experts[{level}]={s}; pick at most num_experts experts."
                )
            if self.gate == "noisy_topk" and k == s:
                raise ValueError(
                    f"gate='noisy_topk' needs top_k[{level}] < num_experts[{level}] (got {k} of {s}): its load "
                    "estimate uses the (k+1)-th logit. Lower top_k, raise num_experts, or use gate='dense'."
                )
        if self.down_proj_dim is not None:
            check_int("down_proj_dim", self.down_proj_dim)
        check_number("router_prelu_init", self.router_prelu_init, low=-math.inf)
        check_number("balance_weight", self.balance_weight, low=0)
        check_number("prelu_init", self.prelu_init, low=-math.inf)
        if not isinstance(self.shared_pool, bool):
            raise ValueError(f"shared_pool={self.shared_pool!r} must be true or false.")
        if self.shared_pool and (len(set(self.num_experts)) != 1 or len(set(self.ranks)) != 1):
            raise ValueError(
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
        if self.shared_pool:
            return [0] + [self.num_experts[0] * self.ranks[0]] * self.num_levels
        widths = [0]
        for s, r in zip(self.num_experts, self.ranks):
            widths.append(widths[-1] + s * r)
        return widths

    @property
    def slots(self) -> list[int]:
        """F_0 … F_L: expert slots activated per token in each level (F_L = 1, the virtual root)."""
        slots = [1]
        for f in reversed(self.fanouts):
            slots.insert(0, slots[0] * f)
        return slots

    def down_width(self, in_features: int) -> int:
        """d_down on a layer of width ``in_features``: ``down_proj_dim``, or that width when it is ``None``."""
        return in_features if self.down_proj_dim is None else self.down_proj_dim

    @property
    def scalings(self) -> list[float]:
        """γ_ℓ = alpha_ℓ / r_ℓ, or 1 when no alpha is given."""
        if self.alpha is None:
            return [1.0] * self.num_levels
        return [a / r for a, r in zip(self.alpha, self.ranks)]


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``Δy = (alpha / rank) B A x`` (HF PEFT's LoRA, same weights and outputs)."""

    method: ClassVar[str] = "lora"

    rank: int = 8
    """r: the rank of the update."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in training only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank)
        if self.alpha is not None or not self.alpha_optional:
            check_number("alpha", self.alpha, low=0, open_low=True)
        check_number("dropout", self.dropout, low=0, high=1)

    alpha_optional: ClassVar[bool] = False

    @property
    def scaling(self) -> float:
        """The factor on every update: alpha / rank (1 when alpha is null, where the method allows it)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class MoLoRAConfig(LoRAConfig):
    """MoLoRA: a mixture of ``num_experts`` LoRA experts per layer, top-k of ``softmax(W_g x)`` renormalised."""

    method: ClassVar[str] = "molora"
    alpha_optional: ClassVar[bool] = True

    alpha: float | None = None
    """Scaling numerator (updates times alpha / rank); null: no scaling, SPEC §2's ``Σ p_i B_i A_i x``."""

    num_experts: int = 4
    """E: LoRA experts per adapted layer."""
    top_k: int = 2
    """Experts used per token."""
    balance_weight: float = 0.0
    """Weight of the Switch-style load-balancing loss (0 turns it off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)
        check_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; use at most num_experts.")
        check_number("balance_weight", self.balance_weight, low=0)


@dataclass
class HydraLoRAConfig(LoRAConfig):
    """HydraLoRA: one shared A, ``num_experts`` B heads, a dense softmax router without bias."""

    method: ClassVar[str] = "hydralora"

    num_experts: int = 4
    """E: B heads per adapted layer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)


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
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; use at most num_experts.")
        check_number("alpha", self.alpha, low=0, open_low=True)
        check_number("dropout", self.dropout, low=0, high=1)
        check_number("balance_weight", self.balance_weight, low=0)
        check_number("router_init_range", self.router_init_range, low=0)
        projections = ("gate_proj", "up_proj", "down_proj")
        self.expert_modules = _as_list("expert_modules", self.expert_modules)
        if not self.expert_modules or any(m not in projections for m in self.expert_modules):
            raise ValueError(
                f"expert_modules={self.expert_modules!r} must be a non-empty subset of {list(projections)}."
            )
        if self.attention_modules is not None:
            self.attention_modules = _check_patterns("attention_modules", self.attention_modules)


@dataclass
class TREXConfig(AdapterConfig):
    """T-REX: rank_in·rank_out rank-one experts from LoRA factors, routed by tokens and a per-sample semantic prior
    (SPEC §3). Call ``smore.fit_prior(model, batches)`` on the training prompts before training."""

    method: ClassVar[str] = "trex"

    target_modules: list[str] | str = "all-linear"
    """Every linear layer except the output head, as the authors; or suffixes / a regex as for other methods."""
    rank_in: int = 4
    """r1: rows of A, i.e. the down-projection rank."""
    rank_out: int = 8
    """r2: columns of B; rank_in·rank_out experts (and prior clusters)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank_in", self.rank_in)
        check_int("rank_out", self.rank_out)
