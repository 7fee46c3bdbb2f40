"""Injection: find the target layers, wrap them, freeze the rest; collect aux losses; summarise.

Small and explicit on purpose: walk ``named_modules()``, match by suffix or regex (the method record's ``find``),
replace with :class:`~smore.adapters.base.AdaptedLinear` (or the method's own wrapper), return the model. The
adapter's config, its wrapped module names and the shared :class:`~smore.adapters.base.ForwardContext` live on the
model as ``model.smore_state``. Adapter files (save, load, restore) are :mod:`smore.adapter_io`.

The adapted model also answers the calls PEFT users type first (:data:`MODEL_CALLS`: ``print_trainable_parameters``,
and ``save_pretrained`` writing the adapter rather than the base), as attributes of that one instance: the class's
own methods stay untouched for every other model, and :func:`remove_adapter` takes them away again.

A call with ``labels`` returns a ``loss`` that already holds the adapters' balance losses, and the output carries the
aux term as ``aux_loss``, as HF's own mixture-of-experts models do (:class:`AuxInOutput`), so HF ``Trainer``, TRL and
hand-written loops train the routers without knowing about them; :func:`set_aux_loss_in_output` turns it off for a
loop that adds :func:`aux_loss` itself (``smore train`` does, with its own token weighting).
"""

from __future__ import annotations

import logging
import types
import warnings
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
from smore.checks import check_choice
from smore.config import AdapterConfig
from smore.constants import IGNORE_INDEX
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
    aux: AuxInOutput | None = None
    """Puts the aux loss into the model's output (:func:`set_aux_loss_in_output`); its hooks go with ``aux_hooks``."""
    aux_hooks: tuple[torch.utils.hooks.RemovableHandle, ...] = ()


def _wrap_linear(method: Method, config: AdapterConfig, base: nn.Module, context: ForwardContext) -> AdapterWrapper:
    in_features, out_features = linear_features(base)
    return AdaptedLinear(base, method.build(config, in_features, out_features), context)


def module_shape(module: nn.Module) -> tuple[int, int] | None:
    """The shape a saved adapter records for a base module: (in, out) of a linear layer, (hidden, intermediate) of
    a gated MLP."""
    return linear_features(module) or ffn_features(module)


def adapt(
    model: nn.Module,
    config: AdapterConfig,
    *,
    adapter_dtype: torch.dtype | None = None,
    aux_loss_in_output: bool = True,
) -> nn.Module:
    """Wrap the target modules of ``model`` with the adapter ``config`` describes, freeze everything else.

    The model is changed in place and returned. New adapter weights take the device of each base module, its
    train/eval mode and its dtype (float32 for non-float bases), or ``adapter_dtype`` when given: ``torch.float32``
    keeps the adapters in full precision on a bf16/fp16 model, as PEFT does by default, so that small updates are not
    rounded away. With ``aux_loss_in_output`` (the default) a call with ``labels`` returns a ``loss`` that includes
    the adapters' balance losses and the output carries them as ``aux_loss`` (:func:`set_aux_loss_in_output`);
    ``False`` for a loop that adds :func:`aux_loss` itself. Every adapter is built before the model is touched, so a
    failure leaves it as it was; :func:`remove_adapter` undoes a successful call.
    """
    if getattr(model, "smore_state", None) is not None:
        raise UserError("this model already carries a smore adapter; load or adapt a fresh base model.")
    if not isinstance(aux_loss_in_output, bool):
        raise UserError(f"aux_loss_in_output={aux_loss_in_output!r} must be True or False.")
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
    _share_inputs(wrappers)
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
    _attach_aux(model, state, aux_loss_in_output)
    model.smore_state = state
    logger.info("adapted %d modules with %s", len(state.modules), config.method)
    return model


def _share_inputs(wrappers: dict[str, AdapterWrapper]) -> None:
    """Hand the deltas that can compute for siblings (``share_input``: S'MoRE's decode path) the deltas of the other
    layers of their parent module with the same shape: layers a model usually calls on one input (gate_proj and
    up_proj, k_proj and v_proj). Whether a model really does is the delta's to observe."""
    siblings: dict[tuple, list[nn.Module]] = {}
    for name, wrapper in wrappers.items():
        if hasattr(wrapper.delta, "share_input"):
            siblings.setdefault((name.rpartition(".")[0], type(wrapper), wrapper.shape), []).append(wrapper.delta)
    for deltas in siblings.values():
        if len(deltas) > 1:
            deltas[0].share_input(deltas)


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
    for handle in state.aux_hooks:
        handle.remove()
    if state.aux is not None and state.aux.declared_router_logits:
        del model.config.output_router_logits
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
    routed = [
        (m.ran_with_grad, m.delta.aux_loss)
        for m in adapted_modules(model).values()
        if getattr(m.delta, "aux_loss", None) is not None
    ]
    if not routed:
        param = next(model.parameters())
        return torch.zeros((), device=param.device)
    losses = [loss for _, loss in routed]
    # Only a training forward run without autograd can lose the graph. Each wrapper records whether its forward ran
    # with autograd, so a loss's value (a host sync) is read only for such a forward: a training step with autograd,
    # and evaluation calls (which compute the aux loss on every labelled forward), never wait for the device.
    training = model.training and torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    if training and any(not with_grad and loss.detach().abs().item() > 0 for with_grad, loss in routed):
        # A routed forward in training mode left its loss without a graph: the routers would not be balanced.
        raise UserError(
            "the adapters' auxiliary losses carry no gradient: the forward ran without autograd, as under "
            "reentrant gradient checkpointing. Enable checkpointing with "
            "gradient_checkpointing_kwargs={'use_reentrant': False}, or run the forward with gradients enabled."
        )
    total = torch.stack([loss.float() for loss in losses]).sum()
    return total / len(losses) if reduction == "mean" else total


class AuxInOutput:
    """The adapters' balance losses in the model's own output, where trainers look for a loss.

    A forward hook on the top-level model adds :func:`aux_loss` to ``outputs.loss`` (when the call had ``labels``)
    and sets ``outputs.aux_loss`` (the unweighted term; added to the base's own when an MoE base returns one) in
    training mode, as HF's MoE models do with ``output_router_logits``. Evaluation calls without ``labels`` (and
    ``generate``) are left untouched. When the call carries ``num_items_in_batch`` (HF ``Trainer`` passes it: the
    cross-entropy is then a sum over the whole accumulated batch divided by that count), the micro-batch's aux loss
    is weighted by its share of those tokens, the weighting ``smore train`` uses, so accumulation does not multiply it.

    TRL 1.16's ``SFTTrainer`` computes its loss from its fused head's log-probabilities, not ``outputs.loss``, and adds
    ``router_aux_loss_coef * outputs.aux_loss`` when the model config declares ``output_router_logits``: so ``adapt``
    declares it (``False``) on a config that has none, and drops the ``output_router_logits`` argument TRL then passes
    (the base is not an MoE model and has no router logits to return). Either way the term is counted once.

    The hooks are methods of this object, so ``deepcopy`` of the model rebinds them to the copy's own.
    """

    def __init__(self, enabled: bool, reduction: str = "sum", declared_router_logits: bool = False) -> None:
        self.enabled, self.reduction = enabled, reduction
        self.declared_router_logits = declared_router_logits
        """``adapt`` added ``output_router_logits`` to the model config (for TRL); ``remove_adapter`` removes it."""
        self.requested = False
        self.warned = False

    def before(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.requested = bool(kwargs.pop("output_router_logits", False)) if self.declared_router_logits else False
        if self.requested and not self.enabled:
            raise UserError(
                "the trainer asks for the aux loss in the output (output_router_logits, e.g. TRL's "
                "router_aux_loss_coef), but smore.set_aux_loss_in_output(model, False) turned it off; turn it on, "
                "or set the trainer's coefficient to 0 (SFTConfig(router_aux_loss_coef=0.0))."
            )
        if kwargs.get("fused_lm_head") and self.enabled and not self.requested and model.training and not self.warned:
            self.warned = True  # TRL's fused head: its loss comes from log-probabilities, not outputs.loss
            warnings.warn(
                "TRL computes this loss from its fused head and ignores outputs.loss, so the adapters' balance loss "
                "is left out; pass SFTConfig(router_aux_loss_coef=1.0) to add outputs.aux_loss.",
                stacklevel=2,
            )
        return args, kwargs

    def after(self, model: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        labelled = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
        if not self.enabled or not (model.training or labelled):
            return None
        aux = aux_loss(model, reduction=self.reduction)
        if isinstance(output, dict):  # a ModelOutput: item assignment sets the key and the attribute
            if output.get("loss") is not None:
                output["loss"] = output["loss"] + aux * _batch_share(kwargs)
            if model.training:  # not in evaluation: Trainer would collect a 0-dim tensor among the predictions
                own = output.get("aux_loss")
                output["aux_loss"] = aux if own is None else own + aux
            return output
        if isinstance(output, tuple) and labelled and torch.is_tensor(output[0]) and output[0].dim() == 0:
            return (output[0] + aux * _batch_share(kwargs), *output[1:])  # return_dict=False: the loss comes first
        return None


def _batch_share(kwargs: dict) -> torch.Tensor | float:
    """This micro-batch's share of ``num_items_in_batch`` (the response tokens of the whole accumulated batch), or 1
    when the call's loss is its own mean. Counted as HF ``Trainer`` counts: labels shifted, ``-100`` ignored."""
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None and kwargs.get("labels") is not None:
        labels = kwargs["labels"][..., 1:]
    if total is None or labels is None:
        return 1.0
    count = (labels != IGNORE_INDEX).sum()
    # A count given as a tensor stays a tensor (moved to the labels' device if needed); a Python number divides as
    # a number: a tensor built from it on the device would be a transfer in every training step.
    if torch.is_tensor(total):
        return count / total.to(labels.device).clamp(min=1)
    return count / max(total, 1)


def _attach_aux(model: nn.Module, state: AdapterState, enabled: bool) -> None:
    """Register the :class:`AuxInOutput` hooks of ``adapt`` on the top-level model."""
    config = getattr(model, "config", None)
    declare = config is not None and not hasattr(config, "output_router_logits")
    if declare:
        config.output_router_logits = False  # TRL adds outputs.aux_loss only for configs that declare it
    state.aux = AuxInOutput(enabled, declared_router_logits=declare)
    state.aux_hooks = (
        model.register_forward_pre_hook(state.aux.before, with_kwargs=True),
        model.register_forward_hook(state.aux.after, with_kwargs=True),
    )


def set_aux_loss_in_output(model: nn.Module, enabled: bool, *, reduction: str = "sum") -> None:
    """Whether a call of the adapted model puts the adapters' balance losses into ``outputs.loss`` and
    ``outputs.aux_loss`` (on by default, see :class:`AuxInOutput`). Turn it off when the training loop adds
    ``smore.aux_loss(model)`` itself, or the term is counted twice. ``reduction`` as :func:`aux_loss`'s: ``"sum"``
    over adapters (SPEC §1.3), or ``"mean"``."""
    if not isinstance(enabled, bool):
        raise UserError(f"enabled={enabled!r} must be True or False.")
    check_choice("reduction", reduction, ("sum", "mean"))
    aux = state_of(model).aux
    aux.enabled, aux.reduction = enabled, reduction


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
