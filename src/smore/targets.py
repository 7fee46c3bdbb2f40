"""Which modules an adapter config selects: match by name suffix or regex, filter by layer index and exclusions."""

from __future__ import annotations

import re

from torch import nn

from smore.adapters.base import AdapterWrapper, linear_features
from smore.config import AdapterConfig
from smore.errors import UserError

ALL_LINEAR = "all-linear"
_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(f".{name}.")
    return int(match.group(1)) if match else None


def find_targets(
    model: nn.Module,
    config: AdapterConfig,
    *,
    accepts=linear_features,
    kind: str = "linear layer (nn.Linear or transformers Conv1D)",
) -> dict[str, nn.Module]:
    """Modules that ``config`` selects, by name. ``accepts(module)`` (truthy or not) says whether a matched module
    can be wrapped: a matched module it refuses is an error, and so is matching nothing; both errors list what the
    model has."""
    if config.layers_to_transform is not None:
        _check_layer_indices(model, config.layers_to_transform)
    targets = {}
    everything = config.target_modules == ALL_LINEAR
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if everything:  # PEFT's "all-linear": every linear layer but the output head
            if not name or module is output_head or not linear_features(module):
                continue
        elif not name or not matches(name, config.target_modules):
            continue
        if config.exclude_modules is not None and matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None and layer_index(name) not in config.layers_to_transform:
            continue
        if isinstance(module, AdapterWrapper):
            raise UserError(f"module {name!r} is already adapted; adapt a fresh model or load onto the base model.")
        if not accepts(module):
            raise UserError(
                f"target_modules={config.target_modules!r} matched {name!r}, a {type(module).__name__}, which is "
                f"not a {kind}. Name the modules to adapt more precisely."
            )
        targets[name] = module
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and accepts(m)})
        raise UserError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}) matched no {kind} of this "
            f"{type(model).__name__}. Its modules of that kind are named: {names}."
        )
    return targets


def _check_layer_indices(model: nn.Module, wanted: list[int]) -> None:
    """An index the model does not have is a mistake (often counting from 1), not a filter that matches nothing."""
    present = sorted({i for i in (layer_index(name) for name, _ in model.named_modules()) if i is not None})
    missing = sorted(set(wanted) - set(present))
    if not missing:
        return
    if not present:
        have = "no numbered layers (module names with .layers.N., .h.N. or .blocks.N.)"
    elif present == list(range(present[-1] + 1)):
        have = f"{len(present)} layers, indices 0 to {present[-1]}"
    else:
        have = f"layers {present}"
    raise UserError(
        f"layers_to_transform={wanted!r}: {missing} out of range; this {type(model).__name__} has {have} "
        "(indices count from 0)."
    )
