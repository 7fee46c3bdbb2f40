"""One wrapper, many deltas: :class:`AdaptedLinear` owns the frozen base layer, dtype casting and enable/disable;
each method only computes ``delta(x)`` in its own file.

A delta is an ``nn.Module`` whose ``forward(x, valid=None)`` maps tokens ``x`` (N, d_in) to ``Δy`` (N, d_out);
``valid`` (N,) bool marks real (non-padding) tokens for routing statistics. Routed deltas keep the auxiliary loss of
their last forward in ``aux_loss`` (a scalar tensor, or ``None``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

try:  # GPT-2 style models store their projections as Conv1D (weight of shape (in, out)).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the wrapper works without it
    Conv1D = None


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a supported linear layer, ``None`` for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


class TokenMask:
    """The attention mask of the model call in flight, shared by all adapters of one model.

    A forward pre-hook on the adapted model stores the 2-D ``attention_mask`` here; each adapter takes the columns
    that match its input (the last T during cached decoding). The mask stays until the next model call, so a
    gradient-checkpointing recomputation during backward sees the same mask as the forward did.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self._signatures: dict[int, inspect.Signature] = {}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            signature = self._signatures.setdefault(id(module), inspect.signature(module.forward))
            try:
                mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                mask = None
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def valid_for(self, leading_shape: torch.Size) -> torch.Tensor | None:
        """(N,) bool of real tokens for an input whose leading dims are (batch, time), or ``None`` if unknown."""
        mask = self.mask
        if mask is None or len(leading_shape) != 2 or leading_shape[0] != mask.shape[0]:
            return None
        steps = leading_shape[1]
        if steps > mask.shape[1]:
            return None
        return mask[:, mask.shape[1] - steps :].reshape(-1).bool()


class AdapterWrapper(nn.Module):
    """What every wrapper shares: the frozen base module, the adapter (``delta``), an on/off switch and the
    token mask. ``shape`` is what a saved adapter records to check that it fits a model."""

    def __init__(self, base_layer: nn.Module, delta: nn.Module, token_mask: TokenMask | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.delta = delta
        self.enabled = True
        self.token_mask = token_mask

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _flat_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens as (N, d) in the adapter's dtype, and which of them are real (not padding)."""
        valid = None if self.token_mask is None else self.token_mask.valid_for(x.shape[:-1])
        delta_dtype = next(self.delta.parameters()).dtype
        return x.reshape(-1, x.shape[-1]).to(delta_dtype), valid


class AdaptedLinear(AdapterWrapper):
    """``y = base(x) + delta(x)``: the frozen base layer plus one adapter's contribution."""

    def __init__(self, base_layer: nn.Module, delta: nn.Module, token_mask: TokenMask | None = None) -> None:
        features = linear_features(base_layer)
        if features is None:
            raise ValueError(
                f"AdaptedLinear wraps nn.Linear or transformers Conv1D layers, not {type(base_layer).__name__}."
            )
        super().__init__(base_layer, delta, token_mask)
        self.in_features, self.out_features = features

    @property
    def shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects ``module.weight`` (e.g. dtype checks in HF models)."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return y
        tokens, valid = self._flat_inputs(x)
        dy = self.delta(tokens, valid=valid)  # (N, d_out)
        return y + dy.reshape(*x.shape[:-1], -1).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, enabled={self.enabled}"


def ffn_features(module: nn.Module) -> tuple[int, int] | None:
    """(hidden, intermediate) of a Llama-style gated MLP (gate_proj, up_proj, down_proj, act_fn), else ``None``."""
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts) or not callable(getattr(module, "act_fn", None)):
        return None
    return parts[0].in_features, parts[0].out_features


class AdaptedFFN(AdapterWrapper):
    """A whole gated MLP replaced by an adapter that computes its output from the frozen projections (MixLoRA).

    ``delta(x, base, valid)`` returns the block's full output; with the adapter disabled the base block runs.
    """

    def __init__(self, base_layer: nn.Module, delta: nn.Module, token_mask: TokenMask | None = None) -> None:
        features = ffn_features(base_layer)
        if features is None:
            raise ValueError(
                f"AdaptedFFN wraps gated MLPs with gate_proj, up_proj, down_proj and act_fn, not "
                f"{type(base_layer).__name__}."
            )
        super().__init__(base_layer, delta, token_mask)
        self.hidden_size, self.intermediate_size = features

    @property
    def shape(self) -> tuple[int, int]:
        return self.hidden_size, self.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        tokens, valid = self._flat_inputs(x)
        y = self.delta(tokens, self.base_layer, valid=valid)  # (N, d)
        return y.reshape(x.shape).to(x.dtype)
