"""Typed, validated adapter configurations.

One name travels end to end: the YAML/JSON key, the dataclass field and the keyword argument of the module that
uses it are the same word. Every field is checked in ``__post_init__`` and a bad value raises ``ValueError`` naming
the field and the fix, before any model is touched.

Each method's config class lives in its own file under ``adapters/`` beside its delta, and subclasses
:class:`AdapterConfig` (where its adapters go). The checks below are shared by all of them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from smore.checks import check_choice, check_int, is_int
from smore.errors import UserError

AuxReduction = Literal["sum", "mean"]


def check_literal(name: str, value: Any, literal: Any) -> None:
    check_choice(name, value, get_args(literal))


def check_positive_ints(name: str, values: list[int], *, allow_zero: bool = False) -> None:
    for i, v in enumerate(values):
        check_int(f"{name}[{i}]", v, 0 if allow_zero else 1)


def as_list(name: str, value: Any) -> list:
    if isinstance(value, tuple):
        return list(value)
    if not isinstance(value, list):
        raise UserError(f"{name}={value!r} must be a list with one entry per level (bottom level first).")
    return value


def check_patterns(name: str, value: Any) -> list[str] | str:
    """Module-name patterns: a non-empty list of non-empty suffixes, or one regular expression."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str) and value:
        try:
            re.compile(value)
        except re.error as error:
            raise UserError(f"{name}={value!r} is not a valid regular expression ({error}).") from error
        return value
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise UserError(
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
        self.target_modules = check_patterns("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = check_patterns("exclude_modules", self.exclude_modules)
        if self.layers_to_transform is not None:
            if is_int(self.layers_to_transform):
                self.layers_to_transform = [self.layers_to_transform]
            self.layers_to_transform = as_list("layers_to_transform", self.layers_to_transform)
            check_positive_ints("layers_to_transform", self.layers_to_transform, allow_zero=True)

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
            raise UserError(f"unknown {cls.__name__} key(s) {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)
