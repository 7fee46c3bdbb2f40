"""What differs between the transformers releases we support (``pyproject.toml``), in one place.

transformers 5.24 renamed the KV-cache argument ``past_key_values`` to ``cache`` (the old name warns until 5.40) and
gradient checkpointing to "activation checkpointing" (the old names warn until v6). Code that calls the model goes
through these helpers, so it warns on no release and works on the older ones.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

CACHE_ARGUMENTS = ("cache", "past_key_values", "cache_params")
"""Names a model call's KV cache goes by: ``cache`` from transformers 5.24, ``past_key_values`` before, and
``cache_params`` for state-space models."""


def cache_argument(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a model call returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def enable_checkpointing(model: nn.Module, *, use_reentrant: bool = False) -> None:
    """Turn on HF gradient (activation) checkpointing by the name this release uses."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
