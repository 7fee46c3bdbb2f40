"""Import checkpoints trained with the S'MoRE authors' code (ZimpleX/SMoRE-LLM, a fork of peft: tuner ``hier_moe``,
layer ``SMoREFFN``), and export ours to their layout.

Three entry points::

    config = config_from_reference(json.load(open("adapter_config.json")))   # their peft config, or the moe_* keys
    model = smore.adapt(base_model, config)                                  # of their LLaMA-Factory YAML
    load_reference_state_dict(model, safetensors.torch.load_file("adapter_model.safetensors"))

    export_reference_state_dict(model)   # the inverse: our weights in their names and shapes

Their names, per adapted module (``{l}`` a level, 0 = bottom, as in our code; ``default`` the peft adapter name,
which peft's ``save_pretrained`` drops from the file's keys; both forms load)::

    moe_A.default.{l}          (s_l, r_l, d)       ↔ delta.A rows [a_offsets[l], + s_l r_l), expert-major
    moe_A_bias.default.{l}     (s_l, r_l)          ↔ delta.A_bias, same rows
    moe_B.default.{l}          (s_l, d_{l+1}, r_l) ↔ delta.B[l]
    moe_B_bias.default.{l}     (s_l, d_{l+1})      ↔ delta.B_bias[l]
    moe_W.default.{l}, l ≥ 1   (d_{l+1}, d_l)      ↔ delta.W[l-1].weight   (moe_W_bias: .bias)
    moe_W_final.default        (d_out, d_L)        ↔ delta.proj.weight     (moe_W_final_bias: .bias)
    moe_downproj_x.default.{weight,bias}           ↔ delta.router.down_proj
    moe_gate.default.{l}.mlp.{0,2}.{weight,bias}   ↔ delta.router.levels[l].mlp[0], mlp[2]
    moe_gate.default.{l}.mlp.1.weight  (1,)        ↔ delta.router.levels[l].mlp[1].weight (prelu router only)
    moe_gate.default.{l}.keys  (s_l, d_g)          ↔ delta.router.levels[l].keys
    moe_gate.default.{l}.weight_noise.weight       ↔ delta.router.levels[l].gate.weight_noise (noisy top-k only)
    moe_expert_act_param.default.{l}  (1,)         ↔ delta.prelu_slopes[l] (prelu only)

With the shared pool (S'MoRE#) every level's A/B key holds the same tensor: level 0's is loaded, the others must be
equal to it or absent.

Their code is not a dependency and none of it is copied here; the mapping was written from the layout above.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smore.adapters.smore import SMoREConfig, SMoREDelta
from smore.inject import adapt, adapted_modules

logger = logging.getLogger(__name__)

__all__ = [
    "ReferenceLoadReport",
    "adapt_from_reference",
    "config_from_reference",
    "export_reference_state_dict",
    "load_reference_state_dict",
]

# -- config ------------------------------------------------------------------------------------------------------

_MAPPED = (
    "num_experts",
    "num_active",
    "expert_dims",
    "gate_dims",
    "dim_downproj_x",
    "gate_act_fn",
    "expert_act_fn",
    "gate_type",
    "gate_arch",
    "init_method",
    "is_shared_expert_pool",
    "activation_position",
    "lora_alpha",
    "lora_scaling",
    "balance_loss_weight",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
)
"""Their config names that we translate (without the ``moe_`` prefix of their LLaMA-Factory arguments)."""

_BOOKKEEPING = (
    "layer_forward_mode",  # subgraph / tree / loop: three implementations of the same forward
    "moe_arch",  # always "smore" for S'MoRE (checked below)
    "moe_dropout",  # declared, never applied by their layer (checked below)
    "init_moe_weights",  # declared, never read by their layer
    "bias",  # declared, never read by their tuner
    "modules_to_save",  # None or empty (checked below)
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
)
"""Their keys that do not change the computation of a loaded adapter (some are checked for unsupported values)."""

_KNOWN = frozenset(_MAPPED) | frozenset(_BOOKKEEPING)

# Defaults of their peft config (HieRMoEConfig) for the keys a YAML may leave out. Their list defaults are broken
# (lambdas), so the per-level lists are required.
_REFERENCE_DEFAULTS: dict[str, Any] = {
    "gate_act_fn": "relu",
    "expert_act_fn": "relu",
    "gate_type": "noisy_topk",
    "gate_arch": "mlp",
    "init_method": "b_zero",
    "is_shared_expert_pool": False,
    "activation_position": "all",
    "dim_downproj_x": 32,
    "balance_loss_weight": 1e-2,
}
_REQUIRED = ("num_experts", "num_active", "expert_dims", "gate_dims")
_NAME_LIST = re.compile(r"^[\w.\-]+(\s*,\s*[\w.\-]+)*\s*,?$")


def _canonical_key(key: str) -> str | None:
    """Their name without the LLaMA-Factory ``moe_`` prefix, or ``None`` when unknown."""
    if key in _KNOWN:
        return key
    if key.startswith("moe_") and key[4:] in _KNOWN:
        return key[4:]
    return None


def _int_list(key: str, value: Any) -> list[int]:
    """A per-level list of ints from a YAML/JSON value: a list, one int, or a comma string such as ``"4,4"``."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        items: list[Any] = [item for item in re.split(r"[,\s]+", text) if item]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        raise ValueError(f"{key}={value!r} must be a list of integers, one per level (bottom level first).")
    out = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{key}={value!r} must hold integers, not booleans.")
        try:
            number = float(item) if isinstance(item, str) else item
        except ValueError:
            raise ValueError(f"{key}={value!r}: {item!r} is not an integer.") from None
        if not isinstance(number, (int, float)) or not float(number).is_integer():
            raise ValueError(f"{key}={value!r}: {item!r} is not an integer.")
        out.append(int(number))
    if not out:
        raise ValueError(f"{key}={value!r} is empty; give one entry per level (bottom level first).")
    return out


def _float_list(key: str, value: Any) -> list[float]:
    if isinstance(value, str):
        items: list[Any] = [item for item in re.split(r"[,\s]+", value.strip().strip("[]()")) if item]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    else:
        raise ValueError(f"{key}={value!r} must be a list of numbers, one per level (bottom level first).")
    out = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            out.append(float(item))
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r}: {item!r} is not a number.") from None
    if not out:
        raise ValueError(f"{key}={value!r} is empty; give one entry per level (bottom level first).")
    return out


def _number(key: str, value: Any) -> float:
    """A float; PyYAML reads ``1e-2`` (no dot) as a string, as their LLaMA-Factory arguments also handle."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} must be a number.") from None
    if not math.isfinite(number):
        raise ValueError(f"{key}={value!r} must be a finite number.")
    return number


def _bool(key: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{key}={value!r} must be true or false.")


def _module_names(key: str, value: Any) -> list[str] | str:
    """target/exclude modules: a list of name suffixes, a comma string of names (split), or one regex (kept)."""
    if isinstance(value, (list, tuple, set)):
        names = sorted(value) if isinstance(value, set) else list(value)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{key}={value!r} must hold module names (non-empty strings).")
        for name in names:
            if re.search(r"[\\*+?\[\]()|^$]", name):
                logger.warning(
                    "%s entry %r looks like a regular expression, but list entries are name suffixes (in their "
                    "peft fork as here), so it matches nothing; give one regex string instead if that was meant.",
                    key,
                    name,
                )
        return names
    if isinstance(value, str):
        if value == "all-linear":
            raise ValueError(
                f"{key}='all-linear' (peft's wildcard) is not supported; list the module names instead, "
                "e.g. ['gate_proj', 'up_proj', 'down_proj']."
            )
        if "," in value and _NAME_LIST.match(value.strip()):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value  # one regular expression, matched against the full module name (peft's and our rule)
    raise ValueError(f"{key}={value!r} must be a list of module names, a comma-separated string or a regex.")


def _activation(key: str, value: Any, plain: tuple[str, ...]) -> tuple[str, float | None]:
    """Their activation string, ``<plain name> | prelu|<init slope>`` → (our name, prelu init or None)."""
    choices = ", ".join(plain) + " or prelu|<init slope>"
    if not isinstance(value, str):
        raise ValueError(f"{key}={value!r} must be a string: {choices}.")
    text = value.strip()
    if text in plain:
        return text, None
    if text == "prelu":  # nn.PReLU's own default slope
        return "prelu", None
    if text.startswith("prelu|"):
        try:
            slope = float(text.split("|", 1)[1])
        except ValueError:
            raise ValueError(
                f"{key}={value!r}: the prelu init slope after '|' must be a number, e.g. 'prelu|0.25'."
            ) from None
        return "prelu", slope
    raise ValueError(f"{key}={value!r} is not supported; choose {choices} (e.g. 'prelu|0.25').")


def config_from_reference(d: Mapping[str, Any], *, ignore_unknown: bool = False) -> SMoREConfig:
    """An :class:`~smore.config.SMoREConfig` from the authors' config.

    ``d`` holds either their peft config (``adapter_config.json`` of ``hier_moe``: ``num_experts``, ``num_active``,
    ``expert_dims``, ``gate_dims``, ...) or the ``moe_``-prefixed arguments of their LLaMA-Factory YAML
    (``moe_num_experts``, ...). Keys that do not change a loaded adapter's computation are ignored (logged at debug
    level); values we cannot reproduce raise ``ValueError`` naming the key and the fix; unknown keys raise
    ``ValueError`` listing them, unless ``ignore_unknown`` (e.g. to pass a whole LLaMA-Factory YAML).

    Their ``dim_downproj_x <= 0`` means "down-project to the layer's own width d": it becomes ``down_proj_dim=None``,
    which each adapted layer resolves to its own input width, so layers of different widths work.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"config_from_reference needs a mapping of the authors' config keys, got {type(d).__name__}.")
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    unknown = []
    for raw, value in d.items():
        key = _canonical_key(str(raw))
        if key is None:
            unknown.append(str(raw))
            continue
        if key in values and values[key] != value:
            raise ValueError(
                f"{source[key]}={values[key]!r} and {raw}={value!r} name the same setting with different values; "
                "keep one of them."
            )
        values[key], source[key] = value, str(raw)
    if unknown:
        if not ignore_unknown:
            raise ValueError(
                f"unknown key(s) {sorted(unknown)} in the authors' config; known keys are {sorted(_KNOWN)} (also "
                "with a 'moe_' prefix). Pass ignore_unknown=True to skip the rest of a LLaMA-Factory YAML."
            )
        logger.debug("config_from_reference: ignoring unknown keys %s", sorted(unknown))

    def name(key: str) -> str:
        return source.get(key, key)

    def get(key: str) -> Any:
        value = values.get(key)
        if value is None and key in _REFERENCE_DEFAULTS:
            logger.debug("config_from_reference: %s not given, using the authors' default", key)
            return _REFERENCE_DEFAULTS[key]
        return value

    # -- bookkeeping keys: ignored, but a few values would change the model ----------------------------------
    for key in _BOOKKEEPING:
        if key in values:
            logger.debug("config_from_reference: ignoring %s=%r (does not change the computation)", key, values[key])
    moe_arch = values.get("moe_arch")
    if moe_arch not in (None, "smore"):
        raise ValueError(f"{name('moe_arch')}={moe_arch!r} is not S'MoRE; only moe_arch='smore' can be imported.")
    peft_type = values.get("peft_type")
    if peft_type is not None and str(peft_type).split(".")[-1].upper() != "HIER_MOE":
        raise ValueError(
            f"{name('peft_type')}={peft_type!r}: only the authors' S'MoRE tuner (peft_type 'HIER_MOE') can be imported."
        )
    modules_to_save = values.get("modules_to_save")
    if modules_to_save:
        raise ValueError(
            f"{name('modules_to_save')}={modules_to_save!r}: the checkpoint also trained whole modules, which this "
            "importer does not load; load those weights into the base model yourself and drop the key."
        )
    dropout = values.get("moe_dropout")
    if dropout not in (None, 0, 0.0) and _number(name("moe_dropout"), dropout) != 0:
        logger.warning(
            "%s=%r is ignored: the authors' SMoREFFN layer declares but never applies dropout, so the checkpoint "
            "was trained and evaluates without it.",
            name("moe_dropout"),
            dropout,
        )
    bias = values.get("bias")
    if bias not in (None, "none"):
        logger.warning("%s=%r is ignored: the authors' hier_moe tuner never reads it.", name("bias"), bias)

    # -- unsupported architecture choices -----------------------------------------------------------------------
    gate_arch = get("gate_arch")
    if gate_arch != "mlp":
        raise ValueError(
            f"{name('gate_arch')}={gate_arch!r} is not supported; only the two-layer MLP router (gate_arch='mlp', "
            "the paper's) can be imported."
        )

    # -- per-level lists ------------------------------------------------------------------------------------------
    missing = [name(k) if k in values else k for k in _REQUIRED if values.get(k) is None]
    if missing:
        raise ValueError(f"the authors' config lacks {missing}; give one entry per level (bottom level first).")
    num_experts = _int_list(name("num_experts"), values["num_experts"])
    top_k = _int_list(name("num_active"), values["num_active"])
    ranks = _int_list(name("expert_dims"), values["expert_dims"])
    levels = len(num_experts)
    for key, lst in (("num_active", top_k), ("expert_dims", ranks)):
        if len(lst) != levels:
            raise ValueError(
                f"{name(key)} has {len(lst)} entries but {name('num_experts')} has {levels}; give one per level."
            )
    router_dims = _int_list(name("gate_dims"), values["gate_dims"])
    if len(router_dims) == 1:  # their LLaMA-Factory arguments broadcast a single gate dim to every level
        router_dims = router_dims * levels
    if len(router_dims) != levels:
        raise ValueError(
            f"{name('gate_dims')} has {len(router_dims)} entries for {levels} levels; "
            "give one per level or one for all."
        )

    # -- scaling: lora_alpha, or lora_scaling (alpha = scaling * r) --------------------------------------------
    alpha = None
    if values.get("lora_alpha") is not None:
        alpha = _float_list(name("lora_alpha"), values["lora_alpha"])
        if len(alpha) != levels:
            raise ValueError(f"{name('lora_alpha')} has {len(alpha)} entries for {levels} levels; give one per level.")
    if values.get("lora_scaling") is not None:
        scaling = _float_list(name("lora_scaling"), values["lora_scaling"])
        if len(scaling) == 1:
            scaling = scaling * levels
        if len(scaling) != levels:
            raise ValueError(
                f"{name('lora_scaling')} has {len(scaling)} entries for {levels} levels; give one per level or one."
            )
        if alpha is not None:
            implied = [a / r for a, r in zip(alpha, ranks)]
            if any(not math.isclose(s, i, rel_tol=1e-6) for s, i in zip(scaling, implied)):
                logger.warning(
                    "%s=%s disagrees with %s / expert_dims = %s; using lora_alpha (what their layer reads).",
                    name("lora_scaling"),
                    scaling,
                    name("lora_alpha"),
                    implied,
                )
        elif source["lora_scaling"].startswith("moe_"):
            # LLaMA-Factory turns moe_lora_scaling into lora_alpha = scaling * r before building the adapter.
            alpha = [s * r for s, r in zip(scaling, ranks)]
        else:
            logger.debug("lora_scaling is only logged by their peft layer (it reads lora_alpha); ignoring it")
    if alpha is not None and all(math.isclose(a, r) for a, r in zip(alpha, ranks)):
        alpha = None  # γ = 1 in every level: the same as no alpha

    # -- scalar settings -------------------------------------------------------------------------------------------
    down = get("dim_downproj_x")
    down = _number(name("dim_downproj_x"), down)
    if not float(down).is_integer():
        raise ValueError(f"{name('dim_downproj_x')}={down!r} must be an integer.")
    down = int(down) if down > 0 else None  # None: each adapted layer's own width, resolved at adapt time

    router_activation, router_prelu_init = _activation(name("gate_act_fn"), get("gate_act_fn"), ("relu", "tanh"))
    activation, prelu_init = _activation(name("expert_act_fn"), get("expert_act_fn"), ("identity", "tanh", "relu"))

    gate = get("gate_type")
    if gate not in ("dense", "switch", "noisy_topk"):
        raise ValueError(f"{name('gate_type')}={gate!r} is unknown; choose dense, switch or noisy_topk.")
    if gate == "dense":  # the dense gate uses every expert; num_active is not read
        top_k = [min(k, s) for k, s in zip(top_k, num_experts)]

    init = get("init_method")
    position = get("activation_position")
    shared_pool = _bool(name("is_shared_expert_pool"), get("is_shared_expert_pool"))
    balance = _number(name("balance_loss_weight"), get("balance_loss_weight"))

    kwargs: dict[str, Any] = dict(
        num_experts=num_experts,
        top_k=top_k,
        ranks=ranks,
        alpha=alpha,
        router_dims=router_dims,
        down_proj_dim=down,
        router_activation=router_activation,
        gate=gate,
        balance_weight=balance,
        activation=activation,
        activation_position=position,
        shared_pool=shared_pool,
        init=init,
    )
    if prelu_init is not None:
        kwargs["prelu_init"] = prelu_init
    if router_prelu_init is not None:
        kwargs["router_prelu_init"] = router_prelu_init
    if values.get("target_modules") is not None:
        kwargs["target_modules"] = _module_names(name("target_modules"), values["target_modules"])
    if values.get("exclude_modules") is not None:
        kwargs["exclude_modules"] = _module_names(name("exclude_modules"), values["exclude_modules"])
    if values.get("layers_to_transform") is not None:
        layers = values["layers_to_transform"]
        kwargs["layers_to_transform"] = (
            layers if isinstance(layers, int) else _int_list(name("layers_to_transform"), layers)
        )
    try:
        config = SMoREConfig(**kwargs)
    except ValueError as error:
        raise ValueError(f"the authors' config does not translate to a valid SMoREConfig: {error}") from error
    return config


# -- weights -----------------------------------------------------------------------------------------------------

_PARAM_NAMES = frozenset(
    {
        "moe_A",
        "moe_A_bias",
        "moe_B",
        "moe_B_bias",
        "moe_W",
        "moe_W_bias",
        "moe_W_final",
        "moe_W_final_bias",
        "moe_downproj_x",
        "moe_gate",
        "moe_expert_act_param",
    }
)


@dataclass
class _Slot:
    """One tensor of their layout: its shape there, how to read ours in that shape, how to write theirs into ours."""

    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    write: Callable[[torch.Tensor], None]


def _param_slot(param: torch.Tensor) -> _Slot:
    def write(t: torch.Tensor) -> None:
        param.copy_(t.to(device=param.device, dtype=param.dtype))

    return _Slot(tuple(param.shape), lambda: param, write)


def _rows_slot(param: torch.Tensor, start: int, shape: tuple[int, ...]) -> _Slot:
    """Rows ``[start, start + shape[0] * shape[1])`` of ``param`` (A or A_bias) seen as ``shape`` (expert-major)."""
    stop = start + shape[0] * shape[1]

    def read() -> torch.Tensor:
        return param[start:stop].reshape(shape)

    def write(t: torch.Tensor) -> None:
        param[start:stop].copy_(t.reshape(param[start:stop].shape).to(device=param.device, dtype=param.dtype))

    return _Slot(shape, read, write)


def _module_slots(delta: SMoREDelta) -> tuple[dict[str, _Slot], dict[str, str]]:
    """Their keys (adapter name removed, relative to the module) → slots, and the shared-pool aliases
    (level ≥ 1 A/B keys → the level-0 key they must equal)."""
    slots: dict[str, _Slot] = {}
    aliases: dict[str, str] = {}
    d = delta.in_features
    levels = delta.num_levels
    for level in range(levels):
        s, r = delta.num_experts[level], delta.ranks[level]
        if delta.shared_pool and level > 0:
            for key in ("moe_A", "moe_A_bias", "moe_B", "moe_B_bias"):
                aliases[f"{key}.{level}"] = f"{key}.0"
            continue
        offset = delta.a_offsets[level]
        slots[f"moe_A.{level}"] = _rows_slot(delta.A, offset, (s, r, d))
        slots[f"moe_A_bias.{level}"] = _rows_slot(delta.A_bias, offset, (s, r))
        slots[f"moe_B.{level}"] = _param_slot(delta.B[level])
        slots[f"moe_B_bias.{level}"] = _param_slot(delta.B_bias[level])
    for level in range(1, levels):
        w = delta.W[level - 1]
        slots[f"moe_W.{level}"] = _param_slot(w.weight)
        slots[f"moe_W_bias.{level}"] = _param_slot(w.bias)
    slots["moe_W_final"] = _param_slot(delta.proj.weight)
    slots["moe_W_final_bias"] = _param_slot(delta.proj.bias)
    router = delta.router
    slots["moe_downproj_x.weight"] = _param_slot(router.down_proj.weight)
    slots["moe_downproj_x.bias"] = _param_slot(router.down_proj.bias)
    for level, level_router in enumerate(router.levels):
        prefix = f"moe_gate.{level}"
        for index in (0, 2):
            linear = level_router.mlp[index]
            slots[f"{prefix}.mlp.{index}.weight"] = _param_slot(linear.weight)
            slots[f"{prefix}.mlp.{index}.bias"] = _param_slot(linear.bias)
        if isinstance(level_router.mlp[1], nn.PReLU):  # their nn.PReLU sits at the same index of the same Sequential
            slots[f"{prefix}.mlp.1.weight"] = _param_slot(level_router.mlp[1].weight)
        slots[f"{prefix}.keys"] = _param_slot(level_router.keys)
        noise = getattr(level_router.gate, "weight_noise", None)
        if noise is not None:
            slots[f"{prefix}.weight_noise.weight"] = _param_slot(noise.weight)
    if delta.prelu_slopes is not None:
        slopes = delta.prelu_slopes
        for level in range(levels):
            slots[f"moe_expert_act_param.{level}"] = _slope_slot(slopes, level)
    return slots, aliases


def _slope_slot(slopes: torch.Tensor, level: int) -> _Slot:
    def read() -> torch.Tensor:
        return slopes[level : level + 1]

    def write(t: torch.Tensor) -> None:
        slopes[level : level + 1].copy_(t.reshape(1).to(device=slopes.device, dtype=slopes.dtype))

    return _Slot((1,), read, write)


def _smore_modules(model: nn.Module) -> dict[str, SMoREDelta]:
    modules = adapted_modules(model)
    if not modules:
        raise ValueError("the model carries no adapted module; call smore.adapt(model, config) first.")
    deltas = {}
    for name, module in modules.items():
        if not isinstance(module.delta, SMoREDelta):
            raise ValueError(
                f"module {name!r} carries a {type(module.delta).__name__}, not an S'MoRE delta; the authors' "
                "checkpoints hold S'MoRE adapters only."
            )
        deltas[name] = module.delta
    return deltas


def _split_key(key: str, adapter_name: str) -> tuple[str, str] | None:
    """``(module path, relative key without the adapter name)``, or ``None`` without an S'MoRE parameter name."""
    parts = key.split(".")
    index = next((i for i in range(len(parts) - 1, -1, -1) if parts[i] in _PARAM_NAMES), None)
    if index is None:
        return None
    tail = parts[index:]
    if len(tail) >= 2 and tail[1] == adapter_name:
        tail = [tail[0], *tail[2:]]
    return ".".join(parts[:index]), ".".join(tail)


def _match_module(path: str, names: list[str]) -> str | None:
    """The adapted module whose name ends ``path`` at a dot boundary (longest wins), e.g. ``base_model.model.X`` → X."""
    best = None
    for name in names:
        if (path == name or path.endswith("." + name)) and (best is None or len(name) > len(best)):
            best = name
    return best


@dataclass(frozen=True)
class ReferenceLoadReport:
    """What :func:`load_reference_state_dict` did."""

    modules: int
    """Adapted modules filled."""
    tensors: int
    """Tensors copied into the model."""
    shared_checked: int
    """Shared-pool copies (levels ≥ 1 of S'MoRE#) checked equal to level 0 and skipped."""

    def __str__(self) -> str:
        extra = f", {self.shared_checked} shared-pool copies checked" if self.shared_checked else ""
        return f"loaded {self.tensors} tensors into {self.modules} S'MoRE modules{extra}"


def load_reference_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> ReferenceLoadReport:
    """Copy a state dict in the authors' layout into ``model``, adapted with ``smore.adapt(model, config)``.

    Keys may carry any prefix before the module name (``base_model.model.`` from peft) and may include the peft
    adapter name (``moe_A.default.0``, the in-memory form) or not (``moe_A.0``, what peft's ``save_pretrained``
    writes). Every key is checked before anything is copied: all missing, unexpected and wrong-shaped keys are listed
    in one ``ValueError``.
    """
    deltas = _smore_modules(model)
    names = sorted(deltas)
    plan = {name: _module_slots(delta) for name, delta in deltas.items()}
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {name: {} for name in names}
    problems: list[str] = []
    for key, tensor in state_dict.items():
        split = _split_key(key, adapter_name)
        if split is None:
            problems.append(f"unexpected key {key!r}: not an S'MoRE parameter (no moe_* name)")
            continue
        path, relative = split
        module = _match_module(path, names)
        if module is None:
            problems.append(f"unexpected key {key!r}: no adapted module matches {path!r}")
            continue
        slots, aliases = plan[module]
        if relative not in slots and relative not in aliases:
            hint = f" (is the adapter named {adapter_name!r}?)" if len(relative.split(".")) > 1 else ""
            problems.append(f"unexpected key {key!r} for module {module!r}{hint}")
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{module!r} {relative}: value of {key!r} is a {type(tensor).__name__}, not a tensor")
            continue
        if relative in found[module]:
            problems.append(f"{module!r} {relative}: given twice ({found[module][relative][0]!r} and {key!r})")
            continue
        found[module][relative] = (key, tensor)

    copies = checked = 0
    for module in names:
        slots, aliases = plan[module]
        given = found[module]
        for relative, slot in slots.items():
            if relative not in given:
                problems.append(f"{module!r} {relative}: missing (expected shape {slot.shape})")
            elif tuple(given[relative][1].shape) != slot.shape:
                problems.append(
                    f"{module!r} {relative}: shape {tuple(given[relative][1].shape)} in the state dict, "
                    f"{slot.shape} expected"
                )
        for relative, target in aliases.items():
            if relative not in given or target not in given:
                continue
            tensor, reference = given[relative][1], given[target][1]
            if tensor.shape != reference.shape:
                problems.append(
                    f"{module!r} {relative}: shape {tuple(tensor.shape)}, but the shared pool needs the shape of "
                    f"{target} {tuple(reference.shape)}"
                )
            elif not torch.equal(tensor.to(reference.device, reference.dtype), reference):
                problems.append(f"{module!r} {relative}: differs from {target}, but the shared pool shares one tensor")
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ValueError(
            f"the state dict does not fit the adapted model ({len(problems)} problem(s); the model's S'MoRE "
            f"config must match the checkpoint's, see config_from_reference):\n  " + "\n  ".join(shown) + more
        )
    with torch.no_grad():
        for module in names:
            slots, aliases = plan[module]
            for relative, slot in slots.items():
                slot.write(found[module][relative][1])
                copies += 1
            checked += sum(1 for relative in aliases if relative in found[module])
    logger.info("load_reference_state_dict: %d tensors into %d modules", copies, len(names))
    return ReferenceLoadReport(modules=len(names), tensors=copies, shared_checked=checked)


def export_reference_state_dict(
    model: nn.Module, adapter_name: str | None = "default", prefix: str = "base_model.model."
) -> dict[str, torch.Tensor]:
    """Our S'MoRE weights in the authors' layout (the inverse of :func:`load_reference_state_dict`).

    Keys are ``{prefix}{module name}.{their key}``; ``adapter_name=None`` leaves the adapter name out, as peft's
    ``save_pretrained`` writes files. Tensors are detached copies (shared-pool levels get separate copies of the
    same values, so the dict can be saved with safetensors).
    """
    out: dict[str, torch.Tensor] = {}
    for name, delta in _smore_modules(model).items():
        slots, aliases = _module_slots(delta)
        everything = {**{k: slots[k] for k in slots}, **{alias: slots[target] for alias, target in aliases.items()}}
        for relative, slot in everything.items():
            head, _, rest = relative.partition(".")
            parts = [head] + ([adapter_name] if adapter_name else []) + ([rest] if rest else [])
            out[f"{prefix}{name}." + ".".join(parts)] = slot.read().detach().clone()
    return out


def adapt_from_reference(
    model: nn.Module,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    adapter_name: str = "default",
) -> tuple[nn.Module, ReferenceLoadReport]:
    """Adapt a base ``model`` with the authors' ``config`` and load their ``state_dict`` into it, in one call.

    The config is translated before the model is touched; if the weights then do not fit, the ``ValueError`` comes
    after ``adapt`` changed the model, so start again from a fresh base model.
    """
    smore_config = config_from_reference(config)
    adapt(model, smore_config)
    report = load_reference_state_dict(model, state_dict, adapter_name=adapter_name)
    return model, report
