"""What a causal LM's forward offers beyond full logits: an LM head that projects only some positions.

A causal LM's head (hidden → vocabulary: 576 × 49,152 in SmolLM2, a fifth of its FLOPs per token) projects every
position by default, while a response-only loss or a log-likelihood needs only the positions that predict scored
tokens. Transformers' models take ``logits_to_keep`` (an int: the last positions; a 1-D tensor: those positions) for
that; the trainer's loss and the evaluator's scoring both ask :func:`accepts_logits_to_keep` before passing it.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def accepts_logits_to_keep(model_class: type) -> bool:
    """Whether ``model_class.forward`` takes ``logits_to_keep`` (cached: one signature look-up per class)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP and similar wrappers (they keep it in ``.module``): the one whose signature counts."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
