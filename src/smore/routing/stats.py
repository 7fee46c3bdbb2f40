"""Routing health: how often each expert of each level is picked, while training runs.

Routed deltas inherit :class:`RoutingCounter`; while ``track_routing`` is on (see :func:`tracking`), each forward adds
the number of times every expert was selected, padding excluded. :func:`routing_health` turns the counts into the
load per expert, the entropy of that load (1 = perfectly balanced, 0 = one expert takes everything) and the share of
dead experts (never picked), and flags a collapse.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


class RoutingCounter:
    """Mixin for routed deltas: per-level selection counts accumulated while tracking is on."""

    track_routing: bool = False
    routing_counts: list[torch.Tensor] | None = None

    def count_routing(self, indices: list[torch.Tensor], sizes: list[int], valid: torch.Tensor | None) -> None:
        """Add the selections of one forward: ``indices[ℓ]`` (N, slots) of level ℓ with ``sizes[ℓ]`` experts."""
        if not self.track_routing:
            return
        if self.routing_counts is None:
            self.routing_counts = [torch.zeros(size, dtype=torch.long) for size in sizes]
        with torch.no_grad():
            for level, (index, size) in enumerate(zip(indices, sizes)):
                chosen = index if valid is None else index[valid]
                self.routing_counts[level] += torch.bincount(chosen.reshape(-1).cpu(), minlength=size)


def _counters(model: nn.Module) -> dict[str, RoutingCounter]:
    return {
        name: module.delta
        for name, module in model.named_modules()
        if isinstance(getattr(module, "delta", None), RoutingCounter)
    }


def track_routing(model: nn.Module, enabled: bool = True) -> None:
    """Start (from zero) or stop counting the routing decisions of every routed adapter of ``model``."""
    for counter in _counters(model).values():
        counter.track_routing = enabled
        if enabled:
            counter.routing_counts = None


@contextlib.contextmanager
def tracking(model: nn.Module) -> Iterator[None]:
    """Count routing decisions inside the block (counts start from zero); read them with :func:`routing_health`."""
    track_routing(model)
    try:
        yield
    finally:
        track_routing(model, enabled=False)


@dataclass(frozen=True)
class LevelHealth:
    module: str
    level: int
    load: list[float]
    """Share of the routed slots each expert received."""
    entropy: float
    """Entropy of the load divided by log(num_experts): 1 balanced, 0 collapsed."""
    dead_share: float
    """Share of experts never picked."""

    @property
    def collapsed(self) -> bool:
        """One expert takes 90 % of the slots, or half of the experts are never used."""
        return len(self.load) > 1 and (max(self.load) > 0.9 or self.dead_share >= 0.5)


def routing_health(model: nn.Module) -> list[LevelHealth]:
    """Health of every level of every routed adapter from the counts gathered under :func:`tracking`."""
    report = []
    for name, counter in _counters(model).items():
        for level, counts in enumerate(counter.routing_counts or []):
            total = int(counts.sum())
            if total == 0:
                continue
            load = (counts.double() / total).tolist()
            entropy = -sum(p * math.log(p) for p in load if p > 0)
            normalised = entropy / math.log(len(load)) if len(load) > 1 else 1.0
            dead = sum(1 for c in counts.tolist() if c == 0) / len(load)
            report.append(LevelHealth(name, level, load, normalised, dead))
    return report
