"""Adapter deltas, one file per method, all wrapped by :class:`~smore.adapters.base.AdaptedLinear`."""

from smore.adapters.base import AdaptedLinear, TokenMask, linear_features
from smore.adapters.smore import SMoREDelta, build_smore

__all__ = ["AdaptedLinear", "SMoREDelta", "TokenMask", "build_smore", "linear_features"]
