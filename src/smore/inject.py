"""Injection: find the target layers, wrap them, freeze the rest; collect aux losses; summarise.

Small and explicit on purpose: walk ``named_modules()``, match by suffix or regex (the method record's ``find``),
replace with :class:`~smore.adapters.base.AdaptedLinear` (or the method's own wrapper), return the model. The
adapter's config, its wrapped module names and the shared :class:`~smore.adapters.base.ForwardContext` live on the
model as ``model.smore_state``. Adapter files (save, load, restore) are :mod:`smore.adapter_io`.

The adapted model also answers the calls PEFT users type first (:data:`MODEL_CALLS`: ``print_trainable_parameters``,
and ``save_pretrained`` writing the adapter rather than the base), as attributes of that one instance: the class's
own methods stay untouched for every other model, and :func:`remove_adapter` takes them away again.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from smore.adapters.base import (
    AdaptedLinear,
    AdapterWrapper,
    ForwardContext,
    adapted_modules,
    ffn_features,
    keep_quantized_differentiable,
    linear_features,
    parameter_count,
)
from smore.adapters.method import Method
from smore.config import AdapterConfig
from smore.errors import UserError
from smore.registry import method_of

logger = logging.getLogger(__name__)


@dataclass
class AdapterState:
    """What ``adapt`` leaves on the model."""

    config: AdapterConfig
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Wrapped module name → (in_features, out_features), or (hidden, intermediate) for an MLP block."""
    requires_grad: dict[str, bool] = field(default_factory=dict)
    """Which base parameters required grad before ``adapt`` froze them, for :func:`remove_adapter`."""
    context: ForwardContext = field(default_factory=ForwardContext)
    hook: torch.utils.hooks.RemovableHandle | None = None
    undo_setup: Callable[[], None] | None = None
    """What undoes the method's model-level state (T-REX's generate wrapper), for :func:`remove_adapter`."""
    calls: tuple[str, ...] = ()
    """The :data:`MODEL_CALLS` bound to the model by ``adapt``, for :func:`remove_adapter`."""


def _wrap_linear(method: Method, config: AdapterConfig, base: nn.Module, context: ForwardContext) -> AdapterWrapper:
    in_features, out_features = linear_features(base)
    return AdaptedLinear(base, method.build(config, in_features, out_features), context)


def module_shape(module: nn.Module) -> tuple[int, int] | None:
    """The shape a saved adapter records for a base module: (in, out) of a linear layer, (hidden, intermediate) of
    a gated MLP."""
    return linear_features(module) or ffn_features(module)


def adapt(model: nn.Module, config: AdapterConfig, *, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the target modules of ``model`` with the adapter ``config`` describes, freeze everything else.

    The model is changed in place and returned. New adapter weights take the device of each base module, its
    train/eval mode and its dtype (float32 for non-float bases), or ``adapter_dtype`` when given: ``torch.float32``
    keeps the adapters in full precision on a bf16/fp16 model, as PEFT does by default, so that small updates are not
    rounded away. Every adapter is built before the model is touched, so a failure leaves it as it was;
    :func:`remove_adapter` undoes a successful call.
    """
    if getattr(model, "smore_state", None) is not None:
        raise UserError("this model already carries a smore adapter; load or adapt a fresh base model.")
    method = method_of(config)
    targets = method.find(model, config)
    state = AdapterState(config=config)
    wrappers = {}
    for name, base in targets.items():
        if method.wrap is not None:
            wrapper = method.wrap(config, name, base, state.context)
        else:
            wrapper = _wrap_linear(method, config, base, state.context)
        weight = next(base.parameters())
        dtype = adapter_dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        wrapper.delta.to(device=weight.device, dtype=dtype)
        wrapper.delta.train(base.training)  # a new module starts in training mode; follow the model's mode
        wrappers[name] = wrapper
    keep_quantized_differentiable(model)  # a bitsandbytes 4-bit base on CPU: see there
    state.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for name, wrapper in wrappers.items():
        _replace(model, name, wrapper)
        state.modules[name] = wrapper.shape
    if method.state is not None:  # model-level state (T-REX's semantic prior), attached to the shared context
        state.undo_setup = method.state.attach(model, config, state.context)
    state.hook = model.register_forward_pre_hook(state.context.hook, with_kwargs=True)
    _bind_calls(model, state)
    model.smore_state = state
    logger.info("adapted %d modules with %s", len(state.modules), config.method)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def remove_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`adapt`: put the base modules back, drop the hook, restore which parameters required grad."""
    state = state_of(model)
    for name, wrapper in adapted_modules(model).items():
        _replace(model, name, wrapper.base_layer)
    if state.hook is not None:
        state.hook.remove()
    if state.undo_setup is not None:
        state.undo_setup()
    for name in state.calls:
        model.__dict__.pop(name, None)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
    del model.smore_state
    return model


def state_of(model: nn.Module) -> AdapterState:
    """What ``adapt`` left on the model; a ``UserError`` if it carries no adapter."""
    state = getattr(model, "smore_state", None)
    if state is None:
        raise UserError("this model carries no smore adapter; call smore.adapt(model, config) first.")
    return state


def aux_loss(model: nn.Module, reduction: str = "sum") -> torch.Tensor:
    """The auxiliary (load-balancing) losses of the last forward, summed over adapters (SPEC §1.3 Decision).

    ``reduction="mean"`` averages over the adapters that have one. Returns a 0-dim tensor (0 when none has one).
    """
    if reduction not in ("sum", "mean"):
        raise UserError(f"reduction={reduction!r} is unknown; use 'sum' or 'mean'.")
    losses = [
        m.delta.aux_loss for m in adapted_modules(model).values() if getattr(m.delta, "aux_loss", None) is not None
    ]
    if not losses:
        param = next(model.parameters())
        return torch.zeros((), device=param.device)
    detached = [loss for loss in losses if not loss.requires_grad and loss.detach().abs().item() > 0]
    if detached and model.training and torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        # A routed forward in training mode left its loss without a graph: the routers would not be balanced.
        raise UserError(
            "the adapters' auxiliary losses carry no gradient: the forward ran without autograd, as under "
            "reentrant gradient checkpointing. Enable checkpointing with "
            "gradient_checkpointing_kwargs={'use_reentrant': False}, or run the forward with gradients enabled."
        )
    total = torch.stack([loss.float() for loss in losses]).sum()
    return total / len(losses) if reduction == "mean" else total


@dataclass(frozen=True)
class AdapterSummary:
    """What ``adapt`` wrapped and what trains."""

    method: str
    modules: dict[str, tuple[int, int]]
    """Wrapped module name → shape: (in, out) of a linear layer, (hidden, intermediate) of an MLP block."""
    kinds: dict[str, str]
    """Wrapped module name → class name of the base module (Linear, Conv1D, LlamaMLP, …)."""
    trainable: int
    total: int

    def __str__(self) -> str:
        groups: dict[tuple[str, tuple[int, int]], int] = {}
        for name, shape in self.modules.items():
            groups[self.kinds[name], shape] = groups.get((self.kinds[name], shape), 0) + 1
        lines = [f"smore adapter: method={self.method}, {len(self.modules)} modules wrapped"]
        for (kind, (d_in, d_out)), count in sorted(groups.items()):
            lines.append(f"  {count:4d} x {kind} {d_in} -> {d_out}")
        lines.append(self.counts())
        return "\n".join(lines)

    def counts(self) -> str:
        """PEFT's line: ``trainable params: X || all params: Y || trainable%: Z``."""
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}"


def summary(model: nn.Module) -> AdapterSummary:
    """A summary of the adapter on ``model``; ``print(smore.summary(model))`` shows it as a table."""
    state = state_of(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    kinds = {name: type(m.base_layer).__name__ for name, m in adapted_modules(model).items()}
    return AdapterSummary(state.config.method, dict(state.modules), kinds, trainable, total)


def adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Adapter weights only, keyed ``{module name}.{delta parameter}``.

    From ``state_dict`` (the whole model's, keyed as ``model.state_dict()``) when given: what HF ``Trainer`` passes to
    ``save_pretrained`` after gathering a sharded model, where the model's own tensors are only this rank's shards.
    """
    own = {
        f"{name}.{key}": (f"{name}.delta.{key}", tensor)
        for name, module in adapted_modules(model).items()
        for key, tensor in module.delta.state_dict().items()
    }
    if state_dict is None:
        return {short: tensor for short, (_, tensor) in own.items()}
    missing = sorted(full for full, _ in own.values() if full not in state_dict)
    if missing:
        raise UserError(
            f"the state_dict given to save the adapter lacks {len(missing)} adapter tensors, e.g. {missing[:3]}; "
            "pass the adapted model's own state_dict() (or none)."
        )
    return {short: state_dict[full] for short, (full, _) in own.items()}


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line of trainable and total parameters (the last line of ``print(smore.summary(model))``)."""
    print(summary(model).counts())


MODEL_CALLS: dict[str, Callable[..., object]] = {"print_trainable_parameters": print_trainable_parameters}
"""PEFT's calls an adapted model answers: name → function of (model, ...), bound to the model by :func:`adapt`.
:mod:`smore.adapter_io` adds ``save_pretrained`` when it is imported (always, through ``import smore``): it writes
the adapter files and imports this module, so the entry cannot be written here without an import circle."""


def _bind_calls(model: nn.Module, state: AdapterState) -> None:
    """Bind :data:`MODEL_CALLS` to this one model: an instance attribute shadows the class's method (HF's
    ``save_pretrained`` writing the whole model) for this model only, and ``deepcopy`` rebinds it to the copy."""
    for name, function in MODEL_CALLS.items():
        model.__dict__[name] = types.MethodType(function, model)
    state.calls = tuple(MODEL_CALLS)
