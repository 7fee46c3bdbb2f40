"""Method registry: name → (config class, builder). Adding a method touches its own file and one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from smore.adapters.hydralora import build_hydralora
from smore.adapters.lora import build_lora
from smore.adapters.mixlora import find_mixlora_targets, wrap_mixlora
from smore.adapters.molora import build_molora
from smore.adapters.smore import build_smore
from smore.adapters.trex import build_trex, setup_trex_prior
from smore.config import (
    AdapterConfig,
    HydraLoRAConfig,
    LoRAConfig,
    MixLoRAConfig,
    MoLoRAConfig,
    SMoREConfig,
    TREXConfig,
)


@dataclass(frozen=True)
class Method:
    """An adapter method: its config class, and how its adapters are built.

    Methods that adapt linear layers give ``build(config, d_in, d_out) -> delta``, wrapped in ``AdaptedLinear``.
    Methods that adapt other modules (MixLoRA's FFN blocks) give ``find(model, config) -> {name: module}`` and
    ``wrap(config, name, module, context) -> AdapterWrapper``.
    """

    name: str
    config_class: type[AdapterConfig]
    build: Callable[[Any, int, int], nn.Module] | None = None
    find: Callable[[nn.Module, Any], dict[str, nn.Module]] | None = None
    wrap: Callable[..., nn.Module] | None = None
    setup: Callable[[nn.Module, Any, Any], Callable[[], None] | None] | None = None
    """Model-level setup after wrapping, ``setup(model, config, context)`` (T-REX attaches its semantic prior);
    it may return a function that undoes it, which :func:`~smore.remove_adapter` calls."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


register(Method("smore", SMoREConfig, build_smore))
register(Method("lora", LoRAConfig, build_lora))
register(Method("molora", MoLoRAConfig, build_molora))
register(Method("hydralora", HydraLoRAConfig, build_hydralora))
register(Method("mixlora", MixLoRAConfig, find=find_mixlora_targets, wrap=wrap_mixlora))
register(Method("trex", TREXConfig, build_trex, setup=setup_trex_prior))


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def method_of(config: AdapterConfig) -> Method:
    """The registered method whose config class ``config`` is."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    raise ValueError(
        f"{type(config).__name__} is not a registered adapter config; use one of "
        f"{[m.config_class.__name__ for m in METHODS.values()]}."
    )


def config_from_dict(values: dict[str, Any]) -> AdapterConfig:
    """Build a config from its JSON/YAML form, whose ``method`` key names the method."""
    if not isinstance(values, dict):
        raise ValueError(f"an adapter config must be a mapping with a 'method' key, got {type(values).__name__}.")
    if "method" not in values:
        raise ValueError(f"the adapter config has no 'method' key; add method: one of {sorted(METHODS)}.")
    return get_method(values["method"]).config_class.from_dict(values)
