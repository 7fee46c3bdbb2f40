"""Fair comparisons: size every method to the same trainable-parameter budget on the same model.

The paper compares S'MoRE with its baselines "at similar trainable parameters" (SPEC §1.8). :func:`propose_configs`
makes that concrete: given a model (or just its layer shapes) and a budget (a number, or another config whose
trainable count becomes the budget), it proposes one config per method whose trainable parameters are within
``tolerance`` (±5 %) of the budget, and reports what each costs per token and how flexible its routing is.

Each method's search is a small, sensible space around a starting config, registered in :data:`SEARCH_SPACES`:

- only one integer knob moves first (the rank; S'MoRE's ranks, equal in every level), and the value whose count is
  closest to the budget is kept (the count grows with the knob, so a bisection finds it);
- only if no rank meets the tolerance are the method's structure variants tried, each with its own best rank,
  nearest the starting structure first (MoLoRA, HydraLoRA, MixLoRA: ``num_experts`` ± 1, ± 2, …; S'MoRE:
  ``down_proj_dim`` ± 4, ± 8, …, then ``router_dims``; never its tree of experts);
- every other field of the starting config (alpha, gate, top-k, targets, …) is kept as it is.

Counts come from :func:`~smore.analysis.params.model_report`, so ``trainable`` is exactly the trainable parameter
count after ``smore.adapt(model, config)``. A model built on the meta device (:func:`meta_model`) is enough: only
module shapes are read, no weights are allocated.

Structural flexibility Γ (SPEC §1.6) reported per row: S'MoRE Theorem 3.4 ``∏_ℓ C(s_ℓ, f_ℓ)^{F_{ℓ+1}}`` (1 for the
dense gate, which always uses every expert); MoLoRA and MixLoRA ``C(E, k)`` expert sets per token; LoRA 1. HydraLoRA
reports 1: its router is a dense softmax over all ``E`` heads, so every token uses the same structure (all heads),
only with different continuous weights, and Γ counts structures, not weightings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from smore.adapters.method import SearchSpace
from smore.analysis.params import COST_MODELS, LayerReport, ModelReport, layer_costs, model_report
from smore.analysis.shapes import MODEL_SHAPES, TargetShapes, meta_model, model_config  # noqa: F401 (re-exported)
from smore.checks import is_int, is_number
from smore.config import AdapterConfig
from smore.errors import UserError
from smore.registry import METHODS, get_method

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.05
"""Allowed relative deviation of a proposed config's trainable parameters from the budget (±5 %)."""


# -- search spaces --------------------------------------------------------------------------------------------------

SEARCH_SPACES: dict[str, SearchSpace] = {name: m.search for name, m in METHODS.items() if m.search is not None}
"""Method name → how the budget tool sizes it, read from the method records (``METHOD.search`` in each method's
file); a method with a search space joins the comparison."""


def budget_methods() -> list[str]:
    """Methods :func:`propose_configs` sizes by default: those with a cost model and a search space."""
    missing = sorted(set(COST_MODELS) - set(SEARCH_SPACES))
    if missing:
        logger.debug("methods with a cost model but no budget search space (left out): %s", missing)
    return [name for name in COST_MODELS if name in SEARCH_SPACES]


# -- counting -------------------------------------------------------------------------------------------------------

Target = nn.Module | TargetShapes | Sequence[tuple[int, int]]


def _is_block_level(method: str) -> bool:
    """MixLoRA-style methods adapt whole MLP blocks, not linear layers."""
    return get_method(method).block_level


def _shapes_report(shapes: TargetShapes, config: AdapterConfig) -> ModelReport:
    block_level = _is_block_level(config.method)
    layers = shapes.blocks if block_level else shapes.linear
    if not layers:
        kind = "gated MLP blocks (TargetShapes.blocks)" if block_level else "linear layers (TargetShapes.linear)"
        raise UserError(
            f"{config.method} adapts {kind}, and none were given; pass TargetShapes(linear=..., blocks=...) "
            "(e.g. TargetShapes.ffn(hidden, intermediate, layers)) or a model."
        )
    report = ModelReport(method=config.method)
    for index, (in_features, out_features) in enumerate(layers):
        costs = layer_costs(config, in_features, out_features)
        report.layers.append(
            LayerReport(
                name=f"{'block' if block_level else 'linear'}.{index}",
                in_features=in_features,
                out_features=out_features,
                parameters=costs["parameters"]["total"],
                active=None if costs["active"] is None else costs["active"]["total"],
                flops=None if costs["flops"] is None else costs["flops"]["total"],
            )
        )
    return report


class _Counter:
    """``report(config)``: the model report of ``config`` on the target, memoised by the config's JSON form."""

    def __init__(self, target: Target) -> None:
        if isinstance(target, nn.Module):
            self.model: nn.Module | None = target
            self.shapes: TargetShapes | None = None
        elif isinstance(target, TargetShapes):
            self.model, self.shapes = None, target
        else:
            try:
                linear = tuple((int(i), int(o)) for i, o in target)
            except (TypeError, ValueError) as error:
                raise UserError(
                    "model must be a transformers model, a TargetShapes or a list of (in_features, out_features) "
                    f"pairs, got {type(target).__name__}."
                ) from error
            self.model, self.shapes = None, TargetShapes(linear=linear)
        self._cache: dict[str, ModelReport] = {}

    def report(self, config: AdapterConfig) -> ModelReport:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._cache:
            if self.model is not None:
                self._cache[key] = model_report(self.model, config)
            else:
                self._cache[key] = _shapes_report(self.shapes, config)
        return self._cache[key]

    def trainable(self, config: AdapterConfig) -> int:
        return self.report(config).trainable


def resolve_budget(model: Target, budget: int | AdapterConfig) -> int:
    """The budget in trainable parameters: ``budget`` itself, or the trainable count of a config on ``model``."""
    if isinstance(budget, AdapterConfig):
        return _Counter(model).trainable(budget)
    if not is_int(budget) or budget < 1:
        raise UserError(
            f"budget={budget!r} must be a positive number of trainable parameters, or an adapter config to match."
        )
    return budget


# -- search ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetRow:
    """One method's proposal for the budget.

    When no config of the method meets the tolerance (and ``strict=False``), ``missing`` says why and the other
    fields describe the closest config found, so the gap is visible; ``config`` is ``None`` if nothing could be
    counted at all.
    """

    method: str
    config: AdapterConfig | None
    trainable: int | None
    """Trainable parameters after ``smore.adapt(model, config)`` (``model_report(model, config).trainable``)."""
    active: int | None
    """Adapter parameters one token uses, summed over the adapted layers (the cost model's upper bound)."""
    flops: int | None
    """Adapter multiply-adds per token, summed over the adapted layers (the cost model's convention)."""
    gamma: int | None
    """Structural flexibility Γ (see the module docstring for what each method reports)."""
    deviation: float | None
    """``(trainable - budget) / budget``."""
    summary: str = ""
    """The searched fields in one line, e.g. ``E=4 k=2 r=16``."""
    missing: str | None = None
    """Why no config of this method is within the tolerance; ``None`` when the row is a valid proposal."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "summary": self.summary,
            "trainable": self.trainable,
            "active": self.active,
            "flops_per_token": self.flops,
            "gamma": self.gamma,
            "deviation": self.deviation,
            "missing": self.missing,
            "config": None if self.config is None else self.config.to_dict(),
        }


@dataclass
class _Search:
    """The bisection over one method's knob, remembering every count it saw (for the error message)."""

    counter: _Counter
    space: SearchSpace
    budget: int
    seen: dict[int, AdapterConfig] = field(default_factory=dict)  # trainable count → a config with it

    def count(self, config: AdapterConfig) -> int:
        value = self.counter.trainable(config)
        self.seen.setdefault(value, config)
        return value

    def best_knob(self, structure: AdapterConfig) -> AdapterConfig:
        """The config of this structure whose count is closest to the budget (counts grow with the knob)."""
        resize, top = self.space.resize, self.space.max_value
        low = resize(structure, 1)
        if self.count(low) >= self.budget:
            return low
        high = 2
        while high < top and self.count(resize(structure, high)) < self.budget:
            high *= 2
        high = min(high, top)
        if self.count(resize(structure, high)) < self.budget:
            return resize(structure, high)
        lo = high // 2  # count(lo) < budget <= count(high)
        while high - lo > 1:
            mid = (lo + high) // 2
            if self.count(resize(structure, mid)) < self.budget:
                lo = mid
            else:
                high = mid
        below, above = resize(structure, lo), resize(structure, high)
        return min((below, above), key=lambda c: abs(self.count(c) - self.budget))

    def hint(self, tolerance: float) -> str:
        counts = sorted(self.seen)
        below = [c for c in counts if c < self.budget]
        above = [c for c in counts if c > self.budget]
        if not below:
            need = math.ceil(counts[0] / (1 + tolerance))
            return (
                f"even the smallest config searched has {counts[0]:,}: raise the budget to at least {need:,}, or "
                "adapt fewer modules (target_modules, layers_to_transform)"
            )
        if not above:
            return (
                f"the largest config searched ({self.space.knob}={self.space.max_value}) has {counts[-1]:,}: lower "
                "the budget, or adapt more modules"
            )
        return (
            f"the budget falls between sizes {below[-1]:,} and {above[0]:,}: move the budget toward one of them, or "
            "change the structure (e.g. num_experts) so finer steps exist"
        )


def _deviation(trainable: int, budget: int) -> float:
    return (trainable - budget) / budget


def _search(
    counter: _Counter, space: SearchSpace, start: AdapterConfig, budget: int, tolerance: float
) -> tuple[AdapterConfig, str | None]:
    """The closest config to ``budget``: the starting structure first, then the variants tier by tier while none
    meets ``tolerance``. Returns the config and, if it misses the tolerance, the reason."""
    search = _Search(counter, space, budget)
    closest: AdapterConfig | None = None
    for stage in [[start], *space.variants(start)]:
        found = [search.best_knob(structure) for structure in stage]
        if not found:
            continue
        best = min(found, key=lambda c: abs(search.count(c) - budget))  # first on ties: the order is a preference
        if closest is None or abs(search.count(best) - budget) < abs(search.count(closest) - budget):
            closest = best
        if abs(_deviation(search.count(best), budget)) <= tolerance:
            return best, None
    trainable = search.count(closest)
    reason = (
        f"{start.method}: no config within ±{tolerance:.0%} of the budget {budget:,}; the closest is "
        f"{space.describe(closest)} with {trainable:,} trainable parameters ({_deviation(trainable, budget):+.1%}): "
        f"{search.hint(tolerance)}"
    )
    return closest, reason


def _row(counter: _Counter, space: SearchSpace, config: AdapterConfig, budget: int, missing: str | None) -> BudgetRow:
    report = counter.report(config)
    return BudgetRow(
        method=config.method,
        config=config,
        trainable=report.trainable,
        active=report.active,
        flops=report.flops,
        gamma=space.gamma(config),
        deviation=_deviation(report.trainable, budget),
        summary=space.describe(config),
        missing=missing,
    )


def _starting_configs(
    methods: Sequence[str] | None, configs: Sequence[AdapterConfig] | None, match: AdapterConfig | None
) -> list[AdapterConfig]:
    """One starting config per row: the given ones (a method may appear more than once), the matched config for
    its method, the search space's default for every other method."""
    configs = list(configs or ())
    for config in configs:
        if not isinstance(config, AdapterConfig):
            raise UserError(f"configs must hold adapter configs (e.g. SMoREConfig), got {type(config).__name__}.")
    if methods is None:
        names = budget_methods()
        names += [c.method for c in configs if c.method not in names]
    else:
        names = list(dict.fromkeys(methods))
        extra = sorted({c.method for c in configs} - set(names))
        if extra:
            raise UserError(f"configs name method(s) {extra} that methods={list(methods)} leaves out; add them.")
    for name in names:
        if name not in SEARCH_SPACES:
            raise UserError(
                f"method {name!r} has no budget search space; choose from {sorted(SEARCH_SPACES)} or add one line "
                "to smore.analysis.budget.SEARCH_SPACES."
            )
        if name not in COST_MODELS:
            raise UserError(f"method {name!r} has no cost model in smore.analysis.params.COST_MODELS; add one.")
    if match is not None and match.method in names and not any(c.method == match.method for c in configs):
        configs.append(match)
    starts = []
    for name in names:
        given = [c for c in configs if c.method == name]
        starts.extend(given or [SEARCH_SPACES[name].default()])
    return starts


def propose_configs(
    model: Target,
    budget: int | AdapterConfig,
    *,
    methods: Sequence[str] | None = None,
    configs: Sequence[AdapterConfig] | None = None,
    target_modules: list[str] | str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    strict: bool = True,
) -> list[BudgetRow]:
    """One config per method whose trainable parameters on ``model`` are within ``tolerance`` of ``budget``.

    Args:
        model: an HF model (not adapted; the meta device is enough, see :func:`meta_model`), a
            :class:`TargetShapes`, or a list of ``(in_features, out_features)`` of the adapted linear layers.
        budget: trainable parameters, or a config to match: the budget is then its trainable count on ``model``,
            its method's row starts from it, and if it adapts linear layers its ``target_modules`` and
            ``exclude_modules`` are used for every linear-level method (unless ``target_modules`` is given), and
            its ``layers_to_transform`` for every method.
        methods: which methods, in this order; default every method with a cost model and a search space
            (:func:`budget_methods`).
        configs: starting configs whose structure is kept (only the rank, then the variants of
            :data:`SEARCH_SPACES`, are searched); a method may appear several times, e.g. S'MoRE (2-2) and (4-4),
            and gets one row each. Methods without one start from their search space's default.
        target_modules: where every linear-level method goes (not MixLoRA, which adapts MLP blocks); default each
            starting config's own (the FFN projections gate/up/down, as the paper). Only with a model.
        tolerance: the allowed relative deviation, 0.05 for ±5 %.
        strict: raise ``ValueError`` naming every method that cannot meet the tolerance (with the closest count
            and what to change); with ``strict=False`` such a row is returned with ``missing`` set instead.

    Returns:
        one :class:`BudgetRow` per starting config, in ``methods`` order.
    """
    if not is_number(tolerance) or not 0 < tolerance < 1:
        raise UserError(f"tolerance={tolerance!r} must be a fraction in (0, 1), e.g. 0.05 for ±5 %.")
    counter = _Counter(model)
    match = budget if isinstance(budget, AdapterConfig) else None
    budget = resolve_budget(model, budget)
    if target_modules is not None and counter.model is None:
        raise UserError("target_modules selects modules of a model; with layer shapes, list only the targets' shapes.")
    starts = _starting_configs(methods, configs, match)
    placement: dict[str, Any] = {}
    if target_modules is not None:
        placement.update(target_modules=target_modules, exclude_modules=None)
    elif match is not None and not _is_block_level(match.method):
        placement.update(target_modules=match.target_modules, exclude_modules=match.exclude_modules)
    rows, failures = [], []
    for start in starts:
        changes = {} if _is_block_level(start.method) else dict(placement)
        if match is not None and start is not match:
            changes["layers_to_transform"] = match.layers_to_transform
        space = SEARCH_SPACES[start.method]
        try:
            start = dataclasses.replace(start, **changes)
            config, missing = _search(counter, space, start, budget, tolerance)
        except ValueError as error:  # e.g. no module of the model matches this method's targets
            if strict:
                failures.append(f"{start.method}: {error}")
                continue
            rows.append(BudgetRow(start.method, None, None, None, None, None, None, missing=f"{start.method}: {error}"))
            continue
        if missing is not None and strict:
            failures.append(missing)
            continue
        rows.append(_row(counter, space, config, budget, missing))
    if failures:
        raise UserError("\n".join([*failures, "(or pass strict=False, --no-strict, to mark these methods missing)"]))
    logger.debug("budget %d: %s", budget, [(r.method, r.trainable) for r in rows])
    return rows
