"""Injection: find the target layers, wrap them, freeze the rest; collect aux losses; adapter-only save and load.

Small and explicit on purpose: walk ``named_modules()``, match by suffix or regex, replace with
:class:`~smore.adapters.base.AdaptedLinear`, return the model. The adapter's config, its wrapped module names and the
shared :class:`~smore.adapters.base.ForwardContext` live on the model as ``model.smore_state``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from smore.adapters.base import AdaptedLinear, AdapterWrapper, ForwardContext, ffn_features, linear_features
from smore.config import AdapterConfig
from smore.files import (
    document_digest,
    read_json_object,
    read_safetensors,
    safetensors_metadata,
    write_json,
    write_safetensors,
)
from smore.registry import Method, config_from_dict, method_of
from smore.targets import find_targets

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
PRIOR_KEY = "smore_prior.centroids"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_DIGEST_KEY = "smore_config_sha256"
"""Metadata of the weights file: the digest of the config and module shapes they were saved with, so that a damaged
or edited ``adapter_config.json`` that still parses (a changed rank or alpha) is refused instead of loaded silently."""


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
    """What undoes the method's model-level setup (T-REX's generate wrapper), for :func:`remove_adapter`."""


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
        raise ValueError("this model already carries a smore adapter; load or adapt a fresh base model.")
    method = method_of(config)
    targets = method.find(model, config) if method.find else find_targets(model, config)
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
    state.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for name, wrapper in wrappers.items():
        _replace(model, name, wrapper)
        state.modules[name] = wrapper.shape
    if method.setup is not None:
        state.undo_setup = method.setup(model, config, state.context)
    state.hook = model.register_forward_pre_hook(state.context.hook, with_kwargs=True)
    model.smore_state = state
    logger.info("adapted %d modules with %s", len(state.modules), config.method)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def remove_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`adapt`: put the base modules back, drop the hook, restore which parameters required grad."""
    state = _state(model)
    for name, wrapper in adapted_modules(model).items():
        _replace(model, name, wrapper.base_layer)
    if state.hook is not None:
        state.hook.remove()
    if state.undo_setup is not None:
        state.undo_setup()
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
    del model.smore_state
    return model


def adapted_modules(model: nn.Module) -> dict[str, AdapterWrapper]:
    """Every adapter wrapper (:class:`AdaptedLinear`, :class:`AdaptedFFN`) in ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterWrapper)}


def _state(model: nn.Module) -> AdapterState:
    state = getattr(model, "smore_state", None)
    if state is None:
        raise ValueError("this model carries no smore adapter; call smore.adapt(model, config) first.")
    return state


def aux_loss(model: nn.Module, reduction: str = "sum") -> torch.Tensor:
    """The auxiliary (load-balancing) losses of the last forward, summed over adapters (SPEC §1.3 Decision).

    ``reduction="mean"`` averages over the adapters that have one. Returns a 0-dim tensor (0 when none has one).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is unknown; use 'sum' or 'mean'.")
    losses = [
        m.delta.aux_loss for m in adapted_modules(model).values() if getattr(m.delta, "aux_loss", None) is not None
    ]
    if not losses:
        param = next(model.parameters())
        return torch.zeros((), device=param.device)
    detached = [loss for loss in losses if not loss.requires_grad and loss.detach().abs().item() > 0]
    if detached and model.training and torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        # A routed forward in training mode left its loss without a graph: the routers would not be balanced.
        raise ValueError(
            "the adapters' auxiliary losses carry no gradient: the forward ran without autograd, as under "
            "reentrant gradient checkpointing. Enable checkpointing with "
            "gradient_checkpointing_kwargs={'use_reentrant': False}, or run the forward with gradients enabled."
        )
    total = torch.stack([loss.float() for loss in losses]).sum()
    return total / len(losses) if reduction == "mean" else total


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base (every adapter off); the previous state returns after."""
    modules = list(adapted_modules(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.enabled = was


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
        share = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {share:.4f}")
        return "\n".join(lines)


def summary(model: nn.Module) -> AdapterSummary:
    """A summary of the adapter on ``model``; ``print(smore.summary(model))`` shows it as a table."""
    state = _state(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    kinds = {name: type(m.base_layer).__name__ for name, m in adapted_modules(model).items()}
    return AdapterSummary(state.config.method, dict(state.modules), kinds, trainable, total)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, keyed ``{module name}.{delta parameter}``."""
    return {
        f"{name}.{key}": tensor
        for name, module in adapted_modules(model).items()
        for key, tensor in module.delta.state_dict().items()
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter weights only) into ``path``.

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a torn file.
    """
    from smore import __version__

    state = _state(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    prior = state.context.prior_source
    if prior is not None:
        if prior.centroids is None:
            raise ValueError(
                f"this {state.config.method} adapter has no semantic prior yet; call smore.fit_prior(model, batches) "
                "before saving, so that inference can reproduce the prior."
            )
        tensors[PRIOR_KEY] = prior.centroids.detach().contiguous().cpu()
    base_name = getattr(getattr(model, "config", None), "name_or_path", None)
    document = {
        **state.config.to_dict(),
        "smore_version": __version__,
        "base_model": base_name or None,
        "modules": {name: list(shape) for name, shape in state.modules.items()},
    }
    metadata = {CONFIG_DIGEST_KEY: _config_digest(state.config, state.modules)}
    write_safetensors(path / WEIGHTS_NAME, tensors, metadata)  # with the digest of its tensors (smore.files)
    write_json(path / CONFIG_NAME, document)
    logger.info("saved %s adapter (%d tensors) to %s", state.config.method, len(tensors), path)
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict]:
    """The config saved in an adapter folder and the raw JSON document."""
    file = Path(path) / CONFIG_NAME
    document = read_json_object(file, f"an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    fields = {k: v for k, v in document.items() if k not in ("smore_version", "base_model", "modules")}
    try:
        return config_from_dict(fields), document
    except (TypeError, ValueError) as error:  # a damaged file: name it, whatever the config's own error says
        raise ValueError(f"{file} does not hold a valid adapter config: {error}") from error


def _config_digest(config: AdapterConfig, modules: dict[str, tuple[int, int]]) -> str:
    return document_digest({"config": config.to_dict(), "modules": {k: list(v) for k, v in modules.items()}})


def _check_config_digest(path: Path, config: AdapterConfig, modules: dict[str, tuple[int, int]]) -> None:
    """The weights file records the config it was saved with (when smore wrote it); the config file must match."""
    expected = safetensors_metadata(path / WEIGHTS_NAME).get(CONFIG_DIGEST_KEY)
    if expected is not None and _config_digest(config, modules) != expected:
        raise ValueError(
            f"{path / CONFIG_NAME} does not match the config {path / WEIGHTS_NAME} was saved with: the config file "
            "is corrupted or was edited after saving; restore it from a good copy."
        )


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapt a base ``model`` with the adapter saved in ``path`` and load its weights.

    Checks before touching the model that every saved module exists with the same shape, and afterwards that the
    weights match exactly; any difference is listed in the ``ValueError``.
    """
    path = Path(path)
    config, document = read_adapter_config(path)
    saved_modules = _saved_modules(document, path)
    _check_config_digest(path, config, saved_modules)  # a damaged config file is named before any other check
    problems = []
    present = dict(model.named_modules())
    for name, shape in saved_modules.items():
        module = present.get(name)
        features = None if module is None else module_shape(module)
        if module is None:
            problems.append(f"module {name!r} is missing from the model")
        elif features is None:
            problems.append(f"module {name!r} is a {type(module).__name__}, not a linear layer or gated MLP")
        elif features != shape:
            problems.append(
                f"module {name!r} is {features[0]} -> {features[1]}, the adapter expects {shape[0]} -> {shape[1]}"
            )
    if problems:
        raise ValueError(f"the adapter in {path} does not fit this {type(model).__name__}: " + "; ".join(problems[:20]))
    if getattr(model, "smore_state", None) is None:  # otherwise adapt() below says so
        method = method_of(config)
        selected = set(method.find(model, config) if method.find else find_targets(model, config))
        if saved_modules and selected != set(saved_modules):
            extra, missing = sorted(selected - set(saved_modules)), sorted(set(saved_modules) - selected)
            raise ValueError(
                f"the adapter in {path} was saved for other modules: on this model its config also matches "
                f"{extra[:10]} and misses {missing[:10]}."
            )
    weights_file = path / WEIGHTS_NAME
    tensors = read_safetensors(weights_file)
    adapt(model, config)
    try:
        prior = model.smore_state.context.prior_source
        if prior is not None:
            if PRIOR_KEY not in tensors:
                raise ValueError(f"{weights_file} holds no {PRIOR_KEY}: the {config.method} adapter lacks its prior.")
            prior.centroids = tensors.pop(PRIOR_KEY)
        load_adapter_weights(model, tensors, source=str(weights_file))
    except Exception:
        remove_adapter(model)  # leave the base model as it came
        raise
    return model


def _saved_modules(document: dict, path: Path) -> dict[str, tuple[int, int]]:
    modules = document.get("modules", {})
    shapes_ok = isinstance(modules, dict) and all(
        isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape)
        for shape in modules.values()
    )
    if not shapes_ok:
        raise ValueError(
            f"'modules' in {path / CONFIG_NAME} must map module names to [in, out] shapes; the file is damaged."
        )
    return {name: tuple(shape) for name, shape in modules.items()}


def restore_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights (and semantic prior) saved in ``path`` into a model already adapted with the same config,
    e.g. to resume training."""
    path = Path(path)
    config, document = read_adapter_config(path)
    if config != _state(model).config:
        raise ValueError(f"the adapter in {path} has another config than the model's adapter; it cannot be restored.")
    tensors = read_safetensors(path / WEIGHTS_NAME)
    _check_config_digest(path, config, _saved_modules(document, path))
    prior = _state(model).context.prior_source
    if prior is not None:
        if PRIOR_KEY not in tensors:
            raise ValueError(f"{path / WEIGHTS_NAME} holds no {PRIOR_KEY}: the {config.method} adapter lacks a prior.")
        prior.centroids = tensors.pop(PRIOR_KEY)
    load_adapter_weights(model, tensors, source=str(path / WEIGHTS_NAME))
    return model


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy adapter weights into an adapted model; every key and shape must match exactly."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"adapter weights from {source} do not match the adapted model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape mismatches (file vs model) {wrong[:10]}."
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def fit_prior(model: nn.Module, batches, *, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """Fit the semantic prior of a T-REX adapter on training prompts: ``batches`` yields dicts with ``input_ids``,
    ``attention_mask`` and optionally ``labels`` (-100 marks prompt tokens). Returns the (K, d_e) centroids."""
    prior = _state(model).context.prior_source
    if prior is None:
        raise ValueError(f"method {_state(model).config.method!r} has no semantic prior; only T-REX needs fit_prior.")
    return prior.fit(model, batches, seed=seed, iterations=iterations)


def _prior_source(model: nn.Module):
    prior = _state(model).context.prior_source
    if prior is None:
        raise ValueError(f"method {_state(model).config.method!r} routes without a semantic prior; only T-REX has one.")
    return prior


def compute_prior(model: nn.Module, input_ids: torch.Tensor, attention_mask=None, labels=None) -> torch.Tensor:
    """The T-REX semantic prior (B, K) of each sequence of a batch, as a model call on it computes it (the prompt's
    embedding against the fitted centroids; ``labels`` of -100 mark the prompt)."""
    return _prior_source(model).compute(model, input_ids, attention_mask, labels)


@contextlib.contextmanager
def use_prior(model: nn.Module, prior: torch.Tensor) -> Iterator[nn.Module]:
    """Inside the block every call of the T-REX ``model`` (forward and ``generate``) routes with ``prior`` (B, K),
    one row per sequence, instead of computing it: e.g. a prior from another encoder, or one computed once for many
    calls. Beams and ``num_return_sequences`` take their sequence's row."""
    with _prior_source(model).holding(prior):
        yield model
