"""The S'MoRE authors' config (their peft fork's ``hier_moe`` tuner, or their LLaMA-Factory YAML) → our
:class:`~smore.config.SMoREConfig`.

Every key of theirs is one row: ``_KEYS`` (how to read and check its value, which SMoREConfig field it fills, their
default) or ``_BOOKKEEPING`` (keys that do not change a loaded adapter's computation, a few of which must still have
harmless values). What depends on several keys is one of the named rules in ``_RULES``: the per-level list lengths,
lora_alpha against lora_scaling, the dense gate's top_k. Adding a key is one row.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from smore.adapters.smore import Activation, GateType, SMoREConfig
from smore.checks import is_int
from smore.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["config_from_reference"]

_NAME_LIST = re.compile(r"^[\w.\-]+(\s*,\s*[\w.\-]+)*\s*,?$")


# -- value readers: (the key as they wrote it, its value) → ours, or a ValueError naming the key ------------------


def _items(value: Any) -> list[Any]:
    """The entries of a comma/space string such as ``"4,4"`` or ``"[8, 16]"`` (how YAML and CLI tools write lists)."""
    return [item for item in re.split(r"[,\s]+", value.strip().strip("[]()")) if item]


def _int_list(key: str, value: Any) -> list[int]:
    """A per-level list of ints from a YAML/JSON value: a list, one int, or a comma string such as ``"4,4"``."""
    if isinstance(value, str):
        items = _items(value)
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif is_int(value):
        items = [value]
    else:
        raise UserError(f"{key}={value!r} must be a list of integers, one per level (bottom level first).")
    out = []
    for item in items:
        if isinstance(item, bool):
            raise UserError(f"{key}={value!r} must hold integers, not booleans.")
        try:
            number = float(item) if isinstance(item, str) else item
        except ValueError:
            raise UserError(f"{key}={value!r}: {item!r} is not an integer.") from None
        if not isinstance(number, (int, float)) or not float(number).is_integer():
            raise UserError(f"{key}={value!r}: {item!r} is not an integer.")
        out.append(int(number))
    if not out:
        raise UserError(f"{key}={value!r} is empty; give one entry per level (bottom level first).")
    return out


def _float_list(key: str, value: Any) -> list[float]:
    if isinstance(value, str):
        items = _items(value)
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif is_int(value) or isinstance(value, float):
        items = [value]
    else:
        raise UserError(f"{key}={value!r} must be a list of numbers, one per level (bottom level first).")
    out = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            out.append(float(item))
        except (TypeError, ValueError):
            raise UserError(f"{key}={value!r}: {item!r} is not a number.") from None
    if not out:
        raise UserError(f"{key}={value!r} is empty; give one entry per level (bottom level first).")
    return out


def _number(key: str, value: Any) -> float:
    """A float; PyYAML reads ``1e-2`` (no dot) as a string, as their LLaMA-Factory arguments also handle."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r} must be a number.") from None
    if not math.isfinite(number):
        raise UserError(f"{key}={value!r} must be a finite number.")
    return number


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UserError(f"{key}={value!r} must be true or false.")


def _as_given(key: str, value: Any) -> Any:
    """A value whose names are the same in their code and ours; SMoREConfig checks it."""
    return value


def _down_proj_dim(key: str, value: Any) -> int | None:
    """Their ``dim_downproj_x <= 0`` is "the layer's own width": ``None``, which each adapted layer resolves to its
    input width at adapt time, so layers of different widths work."""
    down = _number(key, value)
    if not down.is_integer():
        raise UserError(f"{key}={down!r} must be an integer.")
    return int(down) if down > 0 else None


def _activation(key: str, value: Any, plain: tuple[str, ...]) -> tuple[str, float | None]:
    """Their activation string, ``<plain name> | prelu|<init slope>`` → (our name, prelu init or None)."""
    choices = ", ".join(plain) + " or prelu|<init slope>"
    if not isinstance(value, str):
        raise UserError(f"{key}={value!r} must be a string: {choices}.")
    text = value.strip()
    if text in plain:
        return text, None
    if text == "prelu":  # nn.PReLU's own default slope
        return "prelu", None
    if text.startswith("prelu|"):
        try:
            slope = float(text.split("|", 1)[1])
        except ValueError:
            raise UserError(
                f"{key}={value!r}: the prelu init slope after '|' must be a number, e.g. 'prelu|0.25'."
            ) from None
        return "prelu", slope
    raise UserError(f"{key}={value!r} is not supported; choose {choices} (e.g. 'prelu|0.25').")


def _router_activation(key: str, value: Any) -> tuple[str, float | None]:
    return _activation(key, value, ("relu", "tanh"))


def _expert_activation(key: str, value: Any) -> tuple[str, float | None]:
    return _activation(key, value, tuple(a for a in get_args(Activation) if a != "prelu"))


def _gate_type(key: str, value: Any) -> str:
    if value not in get_args(GateType):
        raise UserError(f"{key}={value!r} is unknown; choose {', '.join(get_args(GateType))}.")
    return value


def _mlp_router(key: str, value: Any) -> None:
    if value != "mlp":
        raise UserError(
            f"{key}={value!r} is not supported; only the two-layer MLP router (gate_arch='mlp', "
            "the paper's) can be imported."
        )


def _module_names(key: str, value: Any) -> list[str] | str:
    """target/exclude modules: a list of name suffixes, a comma string of names (split), or one regex (kept)."""
    if isinstance(value, (list, tuple, set)):
        names = sorted(value) if isinstance(value, set) else list(value)
        if not all(isinstance(n, str) and n for n in names):
            raise UserError(f"{key}={value!r} must hold module names (non-empty strings).")
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
            raise UserError(
                f"{key}='all-linear' (peft's wildcard) is not supported; list the module names instead, "
                "e.g. ['gate_proj', 'up_proj', 'down_proj']."
            )
        if "," in value and _NAME_LIST.match(value.strip()):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value  # one regular expression, matched against the full module name (peft's and our rule)
    raise UserError(f"{key}={value!r} must be a list of module names, a comma-separated string or a regex.")


def _layers(key: str, value: Any) -> int | list[int]:
    """Layer indices: one int (SMoREConfig checks it) or a list in any form :func:`_int_list` reads."""
    return value if isinstance(value, int) else _int_list(key, value)


# -- the keys ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    """How one key of theirs translates."""

    read: Callable[[str, Any], Any]
    """(the key as they wrote it, its value) → our value; raises ``ValueError`` naming the key."""
    fields: tuple[str, ...] = ()
    """The SMoREConfig fields it fills; a reader of several returns a tuple, where ``None`` keeps that field's
    default. Empty: the value is only checked (gate_arch) or read by a rule (lora_scaling)."""
    default: Any = None
    """Their default (HieRMoEConfig's) for a key left out or ``None``; without one such a key fills nothing."""
    required: bool = False
    """Their list defaults are broken (lambdas), so the per-level lists must be given."""


_KEYS: dict[str, _Key] = {  # their names, without the moe_ prefix of their LLaMA-Factory arguments
    "num_experts": _Key(_int_list, ("num_experts",), required=True),
    "num_active": _Key(_int_list, ("top_k",), required=True),
    "expert_dims": _Key(_int_list, ("ranks",), required=True),
    "gate_dims": _Key(_int_list, ("router_dims",), required=True),
    "dim_downproj_x": _Key(_down_proj_dim, ("down_proj_dim",), default=32),
    "gate_act_fn": _Key(_router_activation, ("router_activation", "router_prelu_init"), default="relu"),
    "expert_act_fn": _Key(_expert_activation, ("activation", "prelu_init"), default="relu"),
    "gate_type": _Key(_gate_type, ("gate",), default="noisy_topk"),
    "gate_arch": _Key(_mlp_router, default="mlp"),
    "init_method": _Key(_as_given, ("init",), default="b_zero"),
    "is_shared_expert_pool": _Key(_bool, ("shared_pool",), default=False),
    "activation_position": _Key(_as_given, ("activation_position",), default="all"),
    "lora_alpha": _Key(_float_list, ("alpha",)),
    "lora_scaling": _Key(_float_list),  # read by _alpha_or_scaling
    "balance_loss_weight": _Key(_number, ("balance_weight",), default=1e-2),
    "target_modules": _Key(_module_names, ("target_modules",)),
    "exclude_modules": _Key(_module_names, ("exclude_modules",)),
    "layers_to_transform": _Key(_layers, ("layers_to_transform",)),
}


def _only_smore(key: str, value: Any) -> None:
    if value != "smore":
        raise UserError(f"{key}={value!r} is not S'MoRE; only moe_arch='smore' can be imported.")


def _hier_moe(key: str, value: Any) -> None:
    if str(value).split(".")[-1].upper() != "HIER_MOE":
        raise UserError(f"{key}={value!r}: only the authors' S'MoRE tuner (peft_type 'HIER_MOE') can be imported.")


def _nothing_to_save(key: str, value: Any) -> None:
    if value:
        raise UserError(
            f"{key}={value!r}: the checkpoint also trained whole modules, which this importer does not load; "
            "load those weights into the base model yourself and drop the key."
        )


def _unused_dropout(key: str, value: Any) -> None:
    if value != 0 and _number(key, value) != 0:
        logger.warning(
            "%s=%r is ignored: the authors' SMoREFFN layer declares but never applies dropout, so the checkpoint "
            "was trained and evaluates without it.",
            key,
            value,
        )


def _unused_bias(key: str, value: Any) -> None:
    if value != "none":
        logger.warning("%s=%r is ignored: the authors' hier_moe tuner never reads it.", key, value)


_BOOKKEEPING: dict[str, Callable[[str, Any], None] | None] = {  # key → the check of a value that is not None
    "layer_forward_mode": None,  # subgraph / tree / loop: three implementations of the same forward
    "moe_arch": _only_smore,
    "moe_dropout": _unused_dropout,
    "init_moe_weights": None,  # declared, never read by their layer
    "bias": _unused_bias,
    "modules_to_save": _nothing_to_save,
    "peft_type": _hier_moe,
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": None,
    "auto_mapping": None,
    "peft_version": None,
}
"""Their keys that do not change the computation of a loaded adapter (some are checked for unsupported values)."""

_KNOWN = frozenset(_KEYS) | frozenset(_BOOKKEEPING)


# -- reading the mapping -------------------------------------------------------------------------------------------


@dataclass
class _Given:
    """Their keys by canonical name: the values, and the names they were written with (for messages)."""

    values: dict[str, Any]
    names: dict[str, str]

    def name(self, key: str) -> str:
        return self.names.get(key, key)


def _canonical_key(key: str) -> str | None:
    """Their name without the LLaMA-Factory ``moe_`` prefix, or ``None`` when unknown."""
    if key in _KNOWN:
        return key
    if key.startswith("moe_") and key[4:] in _KNOWN:
        return key[4:]
    return None


def _collect(d: Mapping[str, Any], ignore_unknown: bool) -> _Given:
    """Their keys by canonical name; one setting given twice (with and without ``moe_``) must agree."""
    if not isinstance(d, Mapping):
        raise UserError(f"config_from_reference needs a mapping of the authors' config keys, got {type(d).__name__}.")
    given = _Given({}, {})
    unknown = []
    for raw, value in d.items():
        key = _canonical_key(str(raw))
        if key is None:
            unknown.append(str(raw))
            continue
        if key in given.values and given.values[key] != value:
            raise UserError(
                f"{given.names[key]}={given.values[key]!r} and {raw}={value!r} name the same setting with different "
                "values; keep one of them."
            )
        given.values[key], given.names[key] = value, str(raw)
    if unknown:
        if not ignore_unknown:
            raise UserError(
                f"unknown key(s) {sorted(unknown)} in the authors' config; known keys are {sorted(_KNOWN)} (also "
                "with a 'moe_' prefix). Pass ignore_unknown=True to skip the rest of a LLaMA-Factory YAML."
            )
        logger.debug("config_from_reference: ignoring unknown keys %s", sorted(unknown))
    return given


def _check_bookkeeping(given: _Given) -> None:
    """Bookkeeping keys are ignored, but a few values would change the model: those are refused or warned about."""
    for key, check in _BOOKKEEPING.items():
        if key not in given.values:
            continue
        value = given.values[key]
        logger.debug("config_from_reference: ignoring %s=%r (does not change the computation)", key, value)
        if check is not None and value is not None:
            check(given.name(key), value)


def _read_keys(given: _Given) -> dict[str, Any]:
    """Each key of ``_KEYS`` read by its row (their default for one left out); keys without a value are absent."""
    missing = [
        given.name(k) if k in given.values else k
        for k, row in _KEYS.items()
        if row.required and given.values.get(k) is None
    ]
    if missing:
        raise UserError(f"the authors' config lacks {missing}; give one entry per level (bottom level first).")
    read = {}
    for key, row in _KEYS.items():
        value = given.values.get(key)
        if value is None and row.default is not None:
            logger.debug("config_from_reference: %s not given, using the authors' default", key)
            value = row.default
        if value is not None:
            read[key] = row.read(given.name(key), value)
    return read


# -- rules across keys: each takes the values read and may change them -------------------------------------------


def _per_level_lengths(read: dict[str, Any], given: _Given) -> None:
    """One entry per level of num_experts; gate_dims and lora_scaling may give one for all (their LLaMA-Factory
    arguments broadcast a single gate dim or scaling to every level)."""
    levels = len(read["num_experts"])
    for key in ("num_active", "expert_dims"):
        if len(read[key]) != levels:
            raise UserError(
                f"{given.name(key)} has {len(read[key])} entries but {given.name('num_experts')} has {levels}; "
                "give one per level."
            )
    broadcast = {"gate_dims": " or one for all", "lora_scaling": " or one"}
    for key in ("gate_dims", "lora_alpha", "lora_scaling"):
        if key not in read:
            continue
        if key in broadcast and len(read[key]) == 1:
            read[key] = read[key] * levels
        if len(read[key]) != levels:
            raise UserError(
                f"{given.name(key)} has {len(read[key])} entries for {levels} levels; "
                f"give one per level{broadcast.get(key, '')}."
            )


def _alpha_or_scaling(read: dict[str, Any], given: _Given) -> None:
    """Their layer reads lora_alpha (γ = alpha / r); LLaMA-Factory's moe_lora_scaling becomes alpha = scaling · r,
    their peft config's lora_scaling is only logged. γ = 1 in every level is the same as no alpha."""
    ranks, alpha, scaling = read["expert_dims"], read.get("lora_alpha"), read.get("lora_scaling")
    if scaling is not None:
        if alpha is not None:
            implied = [a / r for a, r in zip(alpha, ranks)]
            if any(not math.isclose(s, i, rel_tol=1e-6) for s, i in zip(scaling, implied)):
                logger.warning(
                    "%s=%s disagrees with %s / expert_dims = %s; using lora_alpha (what their layer reads).",
                    given.name("lora_scaling"),
                    scaling,
                    given.name("lora_alpha"),
                    implied,
                )
        elif given.name("lora_scaling").startswith("moe_"):
            alpha = [s * r for s, r in zip(scaling, ranks)]
        else:
            logger.debug("lora_scaling is only logged by their peft layer (it reads lora_alpha); ignoring it")
    if alpha is not None and all(math.isclose(a, r) for a, r in zip(alpha, ranks)):
        alpha = None
    read["lora_alpha"] = alpha


def _dense_gate_top_k(read: dict[str, Any], given: _Given) -> None:
    """The dense gate uses every expert and never reads num_active, which may then exceed num_experts."""
    if read["gate_type"] == "dense":
        read["num_active"] = [min(k, s) for k, s in zip(read["num_active"], read["num_experts"])]


_RULES: tuple[Callable[[dict[str, Any], _Given], None], ...] = (
    _per_level_lengths,
    _alpha_or_scaling,
    _dense_gate_top_k,
)


def _fields(read: dict[str, Any]) -> dict[str, Any]:
    """SMoREConfig's keyword arguments from the values read, by each row's ``fields``."""
    kwargs: dict[str, Any] = {}
    for key, row in _KEYS.items():
        if key not in read or not row.fields:
            continue
        if len(row.fields) == 1:
            kwargs[row.fields[0]] = read[key]
        else:
            kwargs.update((field, value) for field, value in zip(row.fields, read[key]) if value is not None)
    return kwargs


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
    given = _collect(d, ignore_unknown)
    _check_bookkeeping(given)
    read = _read_keys(given)
    for rule in _RULES:
        rule(read, given)
    try:
        return SMoREConfig(**_fields(read))
    except ValueError as error:
        raise UserError(f"the authors' config does not translate to a valid SMoREConfig: {error}") from error
