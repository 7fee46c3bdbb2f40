"""The record of one adapter method: everything the library needs to know about it, in one place.

Each method's file under ``adapters/`` ends with its ``METHOD = Method(...)``: the config class, how to build its
adapters, which modules it adapts, its cost model (parameters, active parameters, FLOPs), how the budget tool sizes
it, and any state it keeps for the whole model (T-REX's semantic prior). ``smore.registry`` lists the records;
injection, adapter files, the trainer, the cost reports and the budget search read them and never ask which method
they hold. Adding a method is one new file and one line in the registry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from smore.checks import is_int
from smore.config import AdapterConfig
from smore.errors import UserError
from smore.targets import find_targets

Counts = dict[str, int]
"""A cost breakdown, e.g. ``{"A": ..., "B": ..., "router": ..., "total": ...}``."""


def with_total(counts: Counts) -> Counts:
    counts["total"] = sum(counts.values())
    return counts


def check_features(in_features: Any, out_features: Any) -> None:
    """Layer widths given to a cost function: positive integers."""
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not is_int(value) or value < 1:
            raise UserError(f"{name}={value!r} must be a positive integer (a layer width).")


def check_config(config: Any, config_class: type[AdapterConfig]) -> Any:
    """The config a method's cost function was given must be that method's."""
    if type(config) is not config_class:
        raise UserError(
            f"config must be a {config_class.__name__} for the {config_class.method!r} cost functions, got "
            f"{type(config).__name__}; use the cost model of its own method (get_method(config.method).costs)."
        )
    return config


@dataclass(frozen=True)
class CostModel:
    """Cost functions, each ``(config, in_features, out_features) -> Counts`` (for a block-level method the shape is
    ``(hidden_size, intermediate_size)``); ``active`` and ``flops`` may be ``None`` where no formula is written."""

    parameters: Callable[[Any, int, int], Counts]
    active: Callable[[Any, int, int], Counts] | None = None
    flops: Callable[[Any, int, int], Counts] | None = None


@dataclass(frozen=True)
class SearchSpace:
    """How the budget tool (``smore.analysis.budget``) sizes one method.

    ``resize(config, value)`` sets the knob (a rank) to ``value``; the trainable count must grow with it.
    ``variants(config)`` lists the structures tried, each with its best knob value, when no value of the starting
    structure meets the tolerance: tiers, nearest the starting structure first. ``gamma(config)`` is the structural
    flexibility Γ reported (SPEC §1.6).
    """

    default: Callable[[], AdapterConfig]
    resize: Callable[[Any, int], AdapterConfig]
    describe: Callable[[Any], str]
    gamma: Callable[[Any], int]
    variants: Callable[[Any], list[list[AdapterConfig]]] = field(default=lambda config: [])
    knob: str = "rank"
    max_value: int = 4096


def replace_all(config: AdapterConfig, changes: Iterable[dict[str, Any]]) -> list[AdapterConfig]:
    """Valid configs ``config`` becomes under each change (invalid combinations are skipped)."""
    out = []
    for change in changes:
        try:
            out.append(dataclasses.replace(config, **change))
        except ValueError:
            continue
    return out


def expert_variants(low: int, high: int, *, top_k: bool) -> Callable[[Any], list[list[AdapterConfig]]]:
    """Search variants: ``num_experts`` in ``[low, high]``, nearest the starting number first (E ± 1, then E ± 2, …);
    top-k is kept (capped at E)."""

    def variants(config: Any) -> list[list[AdapterConfig]]:
        tiers = []
        for step in range(1, high - low + 1):
            numbers = [e for e in (config.num_experts - step, config.num_experts + step) if low <= e <= high]
            changes = [
                {"num_experts": e, "top_k": min(config.top_k, e)} if top_k else {"num_experts": e} for e in numbers
            ]
            if changes:
                tiers.append(replace_all(config, changes))
        return tiers

    return variants


def set_rank(config: Any, rank: int) -> AdapterConfig:
    """The usual budget knob: the config with its ``rank`` set."""
    return dataclasses.replace(config, rank=rank)


def mixture_search(default: Callable[[], AdapterConfig], *, max_experts: int) -> SearchSpace:
    """The search space of a top-k mixture of LoRA experts (MoLoRA, MixLoRA): the rank first, then ``num_experts``
    in [2, max_experts]; Γ is the number of expert sets a token can use, C(E, k)."""
    return SearchSpace(
        default=default,
        resize=set_rank,
        describe=lambda c: f"E={c.num_experts} k={c.top_k} r={c.rank}",
        gamma=lambda c: math.comb(c.num_experts, c.top_k),
        variants=expert_variants(2, max_experts, top_k=True),
    )


@dataclass(frozen=True)
class ModelState:
    """State a method keeps for the whole model, beyond its adapters' weights (T-REX's semantic prior).

    ``attach(model, config, context)`` creates it when the model is adapted and returns what undoes it (or ``None``);
    ``tensors(context)`` are saved with the adapter weights, ``restore(context, tensors)`` takes them back (removing
    its keys from ``tensors``, raising ``UserError`` if they are missing); ``prepare(model, batches, seed)`` runs once
    before training starts (not on resume, where ``restore`` brings the state back). ``check_data(config,
    num_records)`` runs before the model loads and raises ``UserError`` when ``prepare`` could not succeed on that
    many training records (T-REX: fewer prompts than clusters), saying what to change in the config.
    """

    attach: Callable[[nn.Module, Any, Any], Callable[[], None] | None]
    tensors: Callable[[Any], dict[str, torch.Tensor]]
    restore: Callable[[Any, dict[str, torch.Tensor]], None]
    prepare: Callable[[nn.Module, Iterable[dict], int], None] | None = None
    check_data: Callable[[Any, int], None] | None = None


@dataclass(frozen=True)
class AdapterFileFormat:
    """Another library's layout of a method's adapter files, which ``smore.save_adapter`` writes so that library loads
    the folder as it is (LoRA: HF PEFT's, for ``PeftModel.from_pretrained``).

    ``config_document(model, config, modules)`` is what ``adapter_config.json`` holds for the adapted ``model``
    (``modules``: adapted name -> (in, out)); smore's own config and module shapes then travel in the weights file's
    metadata. ``key_to_file(key)`` names an adapter weight (a key of ``adapter_state_dict``) in the file and
    ``key_from_file(key)`` takes it back (other keys, e.g. a method's model-level state, pass unchanged).
    ``config_from_document(document)`` reads a folder the other library wrote: the method's config, or ``None`` when
    the document is not in this format.
    """

    config_document: Callable[[nn.Module, Any, dict[str, tuple[int, int]]], dict[str, Any]]
    key_to_file: Callable[[str], str]
    key_from_file: Callable[[str], str]
    config_from_document: Callable[[dict[str, Any]], AdapterConfig | None]


def _same_config(config: AdapterConfig, module: nn.Module) -> AdapterConfig:
    return config


@dataclass(frozen=True)
class Method:
    """An adapter method (see the module docstring).

    Linear-layer methods give ``build(config, d_in, d_out) -> delta``, wrapped in ``AdaptedLinear``. Methods that adapt
    other modules (MixLoRA's MLP blocks) give ``wrap(config, name, module, context) -> AdapterWrapper``, set
    ``block_level`` and their own ``find``; ``layer_config(config, module)`` names the config that sizes one target
    (MixLoRA's attention projections carry a plain LoRA).

    ``merge(wrapper)`` folds one adapted layer's delta into its frozen base weight, for PEFT's ``merge_and_unload()``:
    only a method whose delta is one fixed matrix has it (LoRA, ``W0 + (alpha/r) B A``); a routed delta depends on
    each token's routing, so no single matrix added to ``W0`` computes it, and its record leaves ``merge`` ``None``.

    ``file_format``: the layout ``save_adapter`` writes when another library's is the norm for the method (LoRA:
    PEFT's); ``None`` writes smore's own (its config in ``adapter_config.json``, weights under smore's names).
    """

    name: str
    config_class: type[AdapterConfig]
    costs: CostModel
    search: SearchSpace | None = None
    build: Callable[[Any, int, int], nn.Module] | None = None
    wrap: Callable[..., nn.Module] | None = None
    find: Callable[[nn.Module, Any], dict[str, nn.Module]] = find_targets
    layer_config: Callable[[Any, nn.Module], AdapterConfig] = _same_config
    block_level: bool = False
    state: ModelState | None = None
    merge: Callable[[nn.Module], None] | None = None
    file_format: AdapterFileFormat | None = None
