"""The training loss: mean cross-entropy over response tokens, with the LM head run only where it is needed.

Supervised fine-tuning puts loss on the response only, often a few tokens of a long prompt (one letter for a
multiple-choice question), so the head projects only the positions whose next token carries loss in some row of the
batch (see :mod:`smore.lm`); the loss is the same mean over response tokens that the model's own ``loss`` computes
(``tests/test_train.py`` checks loss and gradients).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from smore.constants import IGNORE_INDEX
from smore.lm import accepts_logits_to_keep, unwrapped


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of ``batch["labels"]`` (``-100`` = no loss) under ``model``, shifted as causal LMs are."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    if positions.numel() == 0 or not accepts_logits_to_keep(type(unwrapped(model))):
        return model(**batch).loss  # nothing to select, or a model without the option: the model's own loss
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, logits_to_keep=positions).logits  # (batch, kept, vocab)
    kept = targets[:, positions]
    # float32 as transformers' ForCausalLMLoss; the mean over non-ignored tokens is its default reduction.
    return F.cross_entropy(logits.float().flatten(0, 1), kept.flatten(), ignore_index=IGNORE_INDEX)
