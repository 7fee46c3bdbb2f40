"""The methods: one record per adapter method (:class:`~smore.adapters.method.Method`), each defined in its own file
under ``adapters/``. Adding a method is that file and one line here."""

from __future__ import annotations

from typing import Any

from smore.adapters import hydralora, lora, mixlora, molora, smore, trex
from smore.adapters.method import Method
from smore.config import AdapterConfig
from smore.errors import UserError

METHODS: dict[str, Method] = {
    method.name: method
    for method in (smore.METHOD, lora.METHOD, molora.METHOD, hydralora.METHOD, mixlora.METHOD, trex.METHOD)
}


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise UserError(f"method={name!r} is unknown; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def method_of(config: AdapterConfig) -> Method:
    """The registered method whose config class ``config`` is."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    raise UserError(
        f"{type(config).__name__} is not a registered adapter config; use one of "
        f"{[m.config_class.__name__ for m in METHODS.values()]}."
    )


def config_from_dict(values: dict[str, Any]) -> AdapterConfig:
    """Build a config from its JSON/YAML form, whose ``method`` key names the method."""
    if not isinstance(values, dict):
        raise UserError(f"an adapter config must be a mapping with a 'method' key, got {type(values).__name__}.")
    if "method" not in values:
        raise UserError(f"the adapter config has no 'method' key; add method: one of {sorted(METHODS)}.")
    return get_method(values["method"]).config_class.from_dict(values)
