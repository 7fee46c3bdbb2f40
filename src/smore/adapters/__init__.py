"""Adapter deltas, one file per method, all wrapped by :class:`~smore.adapters.base.AdaptedLinear`."""

from smore.adapters.base import AdaptedLinear, ForwardContext, linear_features
from smore.adapters.smore import SMoREDelta, build_smore

__all__ = ["AdaptedLinear", "ForwardContext", "SMoREDelta", "build_smore", "linear_features"]
