"""Routing health: how often each expert of each level is picked, while training runs.

A routed delta only records what it selected in its last forward, as an :class:`ExpertSelection` in
``last_selection`` (references to tensors it computed anyway: no copy, no host sync). A :class:`RoutingTracker`
hooks the routed deltas of a model and adds each forward's selections, padding excluded, to per-level counts kept on
the model's device; they reach the host only when :meth:`RoutingTracker.health` is read (once per log window in
training). The health is the load per expert, the entropy of that load (1 = perfectly balanced, 0 = one expert takes
everything) and the share of dead experts (never picked), with a collapse flag.

Dense routers (HydraLoRA's softmax over its heads, T-REX's token router over its rank-one experts) pick no expert:
every token weighs every expert. They give their (N, E) router weights instead of indices, and an expert's load is
its mean weight over the real tokens, normalised to a share (the same sum-to-one load as a top-k router's, for which
the weight of a picked slot is 1). No weight of a softmax is exactly zero, so a dense expert counts as dead when its
share is under :data:`DENSE_DEAD_SHARE` of the balanced share 1/E.

:func:`track_routing`, :func:`tracking` and :func:`routing_health` are the same tracker keyed by the model, for code
that holds only the model.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertSelection:
    """What a routed delta selected in one forward over N tokens."""

    indices: tuple[torch.Tensor, ...]
    """Per level, (N, slots) long: the expert picked in each slot (S'MoRE: bottom level first)."""
    sizes: tuple[int, ...]
    """Per level, the number of experts to pick from."""
    valid: torch.Tensor | None
    """(N,) bool: the real (non-padding) tokens; ``None`` when every token is real."""
    weights: tuple[torch.Tensor, ...] = ()
    """Dense routers only, per level, (N, sizes[level]) non-negative router weights of every expert for every token
    (``indices`` is then empty): the load is each expert's mean weight, see the module docstring."""

    @property
    def dense(self) -> bool:
        return bool(self.weights)


class DeferredSelection(ExpertSelection):
    """An :class:`ExpertSelection` whose indices are computed the first time they are read: the decode path's
    every-path router has no per-slot selection of its own, and generation never reads it."""

    def __init__(self, indices: Callable[[], tuple[torch.Tensor, ...]], sizes: tuple[int, ...], valid) -> None:
        # The frozen dataclass's fields, set as its own __init__ would; indices stay a thunk until read.
        object.__setattr__(self, "_indices", indices)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "valid", valid)
        object.__setattr__(self, "weights", ())

    @property
    def indices(self) -> tuple[torch.Tensor, ...]:
        value = self._indices
        if callable(value):
            value = value()
            object.__setattr__(self, "_indices", value)
        return value


DENSE_DEAD_SHARE = 0.01
"""A dense router's expert is dead when its load is under this fraction of the balanced load 1/E."""


@runtime_checkable
class RoutedDelta(Protocol):
    """A delta that routes tokens to experts: it sets ``last_selection`` in every forward."""

    last_selection: ExpertSelection | None


def routed_deltas(model: nn.Module) -> dict[str, nn.Module]:
    """The routed deltas of ``model``, by the name of the adapted module that holds them."""
    return {
        name: module.delta
        for name, module in model.named_modules()
        if isinstance(getattr(module, "delta", None), RoutedDelta)
    }


MIN_ROUTED_PER_EXPERT = 16
"""Slots per expert a level must have routed before its health can call a collapse (see LevelHealth.conclusive)."""


@dataclass(frozen=True)
class LevelHealth:
    module: str
    level: int
    load: list[float]
    """Share of the routed slots each expert received (a dense router: its share of the summed router weights)."""
    entropy: float
    """Entropy of the load divided by log(num_experts): 1 balanced, 0 collapsed."""
    dead_share: float
    """Share of experts never picked."""
    routed: float = 0.0
    """Slots routed through the level in the window (a dense router: its summed weights)."""

    @property
    def collapsed(self) -> bool:
        """One expert takes 90 % of the slots, or half of the experts are never used."""
        return len(self.load) > 1 and (max(self.load) > 0.9 or self.dead_share >= 0.5)

    @property
    def conclusive(self) -> bool:
        """Enough slots routed for the shares to mean something: at the first steps of a tiny run one expert may
        take every slot by chance, and a collapse warning then would be noise."""
        return self.routed >= MIN_ROUTED_PER_EXPERT * len(self.load)


class RoutingTracker:
    """Counts, on the device, how often every expert of every level of ``model``'s routed deltas is selected.

    Counting starts at construction (forward hooks on the routed deltas) and ends with :meth:`close`, or at the end
    of a ``with`` block; the counts stay readable after that. ``counts[module][level]`` is a (sizes[level],) long
    tensor (float32 for a dense router: summed weights), made at the first forward that routes through the level."""

    def __init__(self, model: nn.Module) -> None:
        deltas = routed_deltas(model)
        self.counts: dict[str, list[torch.Tensor]] = {}
        self._order = list(deltas)  # the report follows the model's module order, not the order of first use
        self._hooks = [delta.register_forward_hook(partial(self._count, name)) for name, delta in deltas.items()]

    def _count(self, name: str, delta: nn.Module, args, output) -> None:
        selection = delta.last_selection
        if selection is None:
            return
        device, valid = (selection.weights or selection.indices)[0].device, selection.valid
        counts = self.counts.get(name)
        if counts is None or counts[0].device != device:
            dtype = torch.float32 if selection.dense else torch.long  # summed weights, or counted slots
            counts = self.counts[name] = [torch.zeros(size, dtype=dtype, device=device) for size in selection.sizes]
        with torch.no_grad():
            for level, weights in enumerate(selection.weights):  # dense: add every token's weights, padding masked
                weights = weights.float() if valid is None else weights.float() * valid.unsqueeze(-1)
                counts[level].add_(weights.sum(dim=0))
            for level, index in enumerate(selection.indices):
                # Add 1 per real token's slot and 0 per padding slot, rather than bincount(index[valid]): the boolean
                # selection and CUDA's bincount both ask the GPU for a size, a host sync per layer and forward.
                ones = torch.ones_like(index) if valid is None else valid.unsqueeze(-1).expand_as(index).long()
                counts[level].index_add_(0, index.reshape(-1), ones.reshape(-1))

    def reset(self) -> None:
        """Start the counts again from zero (a new log window)."""
        self.counts.clear()

    def close(self) -> None:
        """Stop counting; the counts gathered so far stay readable."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> RoutingTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self) -> list[LevelHealth]:
        """Health of every level that routed at least one real token since the last reset."""
        levels = [
            (name, level, counts) for name in self._order for level, counts in enumerate(self.counts.get(name, []))
        ]
        if not levels:
            return []
        # one transfer to the host for every level of every module
        host = torch.cat([counts.double() for _, _, counts in levels]).cpu().split([len(c) for _, _, c in levels])
        report = []
        for (name, level, device_counts), counts in zip(levels, host):
            total = float(counts.sum())
            if total <= 0:
                continue
            load = (counts / total).tolist()
            entropy = -sum(p * math.log(p) for p in load if p > 0)
            normalised = entropy / math.log(len(load)) if len(load) > 1 else 1.0
            floor = DENSE_DEAD_SHARE / len(load) if device_counts.is_floating_point() else 0.0
            dead = sum(1 for p in load if p <= floor) / len(load)
            report.append(LevelHealth(name, level, load, normalised, dead, routed=total))
        return report


_TRACKERS: weakref.WeakKeyDictionary[nn.Module, RoutingTracker] = weakref.WeakKeyDictionary()
"""The tracker :func:`track_routing` started for each model (weakly keyed: it never keeps a model alive)."""


def track_routing(model: nn.Module, enabled: bool = True) -> None:
    """Start (from zero) or stop counting the routing decisions of every routed adapter of ``model``."""
    tracker = _TRACKERS.get(model)
    if tracker is not None:
        tracker.close()
    if enabled:
        _TRACKERS[model] = RoutingTracker(model)


@contextlib.contextmanager
def tracking(model: nn.Module) -> Iterator[None]:
    """Count routing decisions inside the block (counts start from zero); read them with :func:`routing_health`."""
    track_routing(model)
    try:
        yield
    finally:
        track_routing(model, enabled=False)


def routing_counts(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The per-level selection counts gathered by :func:`track_routing` on ``model`` (empty if it never ran)."""
    tracker = _TRACKERS.get(model)
    return {} if tracker is None else tracker.counts


def routing_health(model: nn.Module) -> list[LevelHealth]:
    """Health of every level of every routed adapter from the counts gathered under :func:`tracking`."""
    tracker = _TRACKERS.get(model)
    return [] if tracker is None else tracker.health()
