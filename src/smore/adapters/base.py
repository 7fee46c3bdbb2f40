"""One wrapper, many deltas: :class:`AdaptedLinear` owns the frozen base layer, dtype casting and enable/disable;
each method only computes ``delta(x)`` in its own file.

A delta is an ``nn.Module`` whose ``forward(x, valid=None)`` maps tokens ``x`` (N, d_in) to ``Δy`` (N, d_out);
``valid`` (N,) bool marks real (non-padding) tokens for routing statistics. Routed deltas keep the auxiliary loss of
their last forward in ``aux_loss`` (a scalar tensor, or ``None``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator

import torch
from torch import nn

from smore.errors import UserError

try:  # GPT-2 style models store their projections as Conv1D (weight of shape (in, out)).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the wrapper works without it
    Conv1D = None


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a supported linear layer, ``None`` for any other module. Read from the
    layer's attributes, not its weight: a bitsandbytes ``Linear4bit`` (an ``nn.Linear``) stores its weight packed,
    two 4-bit values per byte in one column."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def input_dtype(module: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype to feed ``module``'s frozen projection with: its weight's, or ``dtype`` (the activations') when the
    weight is quantized (bitsandbytes' uint8/int8 storage): such a layer casts its input to its own compute dtype,
    and a cast to the storage dtype would round the activations to integers."""
    weight = getattr(module, "weight", None)
    return weight.dtype if weight is not None and weight.dtype.is_floating_point else dtype


def parameter_count(param: torch.Tensor) -> int:
    """Elements of the weight ``param`` stands for: a bitsandbytes 4-bit weight packs two per byte, and its
    ``quant_state`` keeps the original shape."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


def keep_quantized_differentiable(model: nn.Module) -> None:
    """Keep gradients flowing through the frozen 4-bit layers of ``model`` on CPU.

    bitsandbytes repacks a ``Linear4bit`` weight for its CPU inference kernel at the first eval-mode forward
    without gradients (a held-out loss, T-REX's prior, generation) and then computes every later call, training
    ones included, with that kernel, which has no backward: the adapters below the layer would silently receive no
    gradient through it. The repacking is turned off, and undone where it already happened (bitsandbytes' inverse
    keeps the bf16 scales the repacking rounded to, so such a base computes slightly differently than before).
    """
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )


@torch.compiler.disable  # eager even inside a compiled model: it compares parameter versions and builds tables
def _prepare_inference(deltas: list[nn.Module], arguments: dict) -> None:
    ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
    if isinstance(ids, torch.Tensor):
        tokens = ids.numel()
    elif isinstance(embeds, torch.Tensor):
        tokens = embeds.shape[:-1].numel()
    else:
        tokens = None  # unknown: the delta prepares as if it were few
    for delta in deltas:
        if not delta.training:
            delta.prepare_inference(tokens)


class ForwardContext:
    """What the adapters of one model need to know about the model call in flight, beyond their own input.

    A forward pre-hook on the adapted model reads the call's arguments: the 2-D ``attention_mask``, so padding never
    counts in routing statistics (each adapter takes the last T mask columns during cached decoding), and hands them
    to the method's model-level ``state`` when it has one (T-REX's semantic prior: see its ``on_call``). Both stay
    until the next model call, so a gradient-checkpointing recomputation during backward sees what the forward saw.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self._valid: tuple = (None, 0, None)  # valid_for's answer in this call: (mask, steps, valid)
        self.state = None  # the method's model-level state (its Method.state attaches it), or None
        self._signatures: dict[int, inspect.Signature] = {}
        # Deltas with inference tables to keep current (``prepare_inference()``: S'MoRE's decode tables), refreshed
        # here before each call without autograd: a compiled forward reads the tables as they are, since the check
        # of their parameters' versions cannot be traced.
        self.inference: list[nn.Module] = []

    def arguments(self, module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name, positional ones included."""
        if not args:
            return kwargs
        signature = self._signatures.get(id(module))
        if signature is None:  # once per model: inspect.signature costs more than a decoding step's adapter
            signature = self._signatures[id(module)] = inspect.signature(module.forward)
        try:
            return signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return kwargs

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if getattr(self.state, "busy", False):
            return  # the state's own pass through this model (T-REX's embedding): leave the context as it is
        arguments = self.arguments(module, args, kwargs)
        mask = arguments.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._valid = (None, 0, None)  # a new call: even the same mask object may have changed in place
        if self.state is not None:
            self.state.on_call(module, arguments)
        if self.inference and not torch.is_grad_enabled():
            _prepare_inference(self.inference, arguments)

    def valid_for(self, leading_shape: torch.Size) -> torch.Tensor | None:
        """(N,) bool of real tokens for an input whose leading dims are (batch, time), or ``None`` if unknown."""
        mask = self.mask
        if mask is None or len(leading_shape) != 2 or leading_shape[0] != mask.shape[0]:
            return None
        steps = leading_shape[1]
        if steps > mask.shape[1]:
            return None
        if torch.compiler.is_compiling():  # the graph computes it once anyway; a Python cache would only add guards
            return mask[:, mask.shape[1] - steps :].reshape(-1).bool()
        # Every adapter of the call asks with the same shape: slice the mask once per call, not once per adapter
        # (three torch calls each, which is what a decoding step costs LoRA for a whole adapter).
        cached_mask, cached_steps, valid = self._valid
        if cached_mask is not mask or cached_steps != steps:
            valid = mask[:, mask.shape[1] - steps :].reshape(-1).bool()
            self._valid = (mask, steps, valid)
        return valid


class AdapterWrapper(nn.Module):
    """What every wrapper shares: the frozen base module, the adapter (``delta``), an on/off switch and the
    token mask. ``shape`` is what a saved adapter records to check that it fits a model."""

    def __init__(self, base_layer: nn.Module, delta: nn.Module, context: ForwardContext | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.delta = delta
        self.enabled = True
        self.context = context
        self._dtype_source: tuple[torch.Tensor] | None = None  # (a parameter of delta,): see delta_dtype
        # A delta that reads more of the model call than its tokens (T-REX: each token's prior) says so by defining
        # ``call_inputs(context, leading_shape, dtype) -> dict`` of extra keyword arguments for its forward.
        self._call_inputs = getattr(delta, "call_inputs", None)
        if context is not None and hasattr(delta, "prepare_inference"):
            context.inference.append(delta)
        # Whether the last forward ran with autograd on: ``smore.aux_loss`` asks it before it reads a loss's value, so
        # a training step never waits for the device to tell whether a loss without a graph is 0.
        self.ran_with_grad = True

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def delta_dtype(self) -> torch.dtype:
        """The adapter's dtype, read from one of its parameters. The parameter is found once, not on every call:
        ``.to()`` converts parameters in place, and the lookup is redone after ``_apply`` or a state-dict load
        (which may assign new parameter objects)."""
        if self._dtype_source is None:  # held in a tuple: a bare Parameter attribute would be registered
            self._dtype_source = (next(self.delta.parameters()),)
        return self._dtype_source[0].dtype

    def _apply(self, fn, recurse=True):
        self._dtype_source = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dtype_source = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _flat_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Tokens as (N, d) in the adapter's dtype, and the context the delta takes: which tokens are real (not
        padding) and whatever else the delta reads from the model call (its ``call_inputs``, e.g. T-REX's prior)."""
        grad = torch.is_grad_enabled()
        if grad is not self.ran_with_grad:  # nn.Module.__setattr__ is slow, and this runs per adapter and call
            self.ran_with_grad = grad
        context: dict = {"valid": None if self.context is None else self.context.valid_for(x.shape[:-1])}
        delta_dtype = self.delta_dtype
        if self._call_inputs is not None:
            context.update(self._call_inputs(self.context, x.shape[:-1], delta_dtype))
        tokens = x.reshape(-1, x.shape[-1])
        # A cast only when needed: even a no-op .to() is a torch call, and decoding pays each call per adapter.
        return (tokens if tokens.dtype == delta_dtype else tokens.to(delta_dtype)), context


class AdaptedLinear(AdapterWrapper):
    """``y = base(x) + delta(x)``: the frozen base layer plus one adapter's contribution."""

    def __init__(self, base_layer: nn.Module, delta: nn.Module, context: ForwardContext | None = None) -> None:
        features = linear_features(base_layer)
        if features is None:
            raise UserError(
                f"AdaptedLinear wraps nn.Linear or transformers Conv1D layers, not {type(base_layer).__name__}."
            )
        super().__init__(base_layer, delta, context)
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
        tokens, context = self._flat_inputs(x)
        dy = self.delta(tokens, **context).reshape(*x.shape[:-1], -1)  # (…, d_out)
        return y + (dy if dy.dtype == y.dtype else dy.to(y.dtype))

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

    def __init__(self, base_layer: nn.Module, delta: nn.Module, context: ForwardContext | None = None) -> None:
        features = ffn_features(base_layer)
        if features is None:
            raise UserError(
                f"AdaptedFFN wraps gated MLPs with gate_proj, up_proj, down_proj and act_fn, not "
                f"{type(base_layer).__name__}."
            )
        super().__init__(base_layer, delta, context)
        self.hidden_size, self.intermediate_size = features

    @property
    def shape(self) -> tuple[int, int]:
        return self.hidden_size, self.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        tokens, context = self._flat_inputs(x)
        y = self.delta(tokens, self.base_layer, **context)  # (N, d)
        return y.reshape(x.shape).to(x.dtype)


def adapted_modules(model: nn.Module) -> dict[str, AdapterWrapper]:
    """Every adapter wrapper (:class:`AdaptedLinear`, :class:`AdaptedFFN`) in ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterWrapper)}


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


class ExpertGroups:
    """Routed slots sorted by expert, so that each expert computes for its own slots only (the grouped paths of
    S'MoRE and MixLoRA).

    ``experts`` (M,) long names the expert of each of M slots. :meth:`sort` puts per-slot rows in expert order,
    :meth:`linear` applies each expert's own weight to its rows, :meth:`unsort` restores the slots' order. The
    counts per expert stay on the device (``index_add_``: ``bincount`` asks the device for the largest index).

    On CUDA with bf16 and widths that are multiples of 8, :meth:`linear` is one ``torch._grouped_mm`` over the
    groups, which reads the group ends from the device: no host sync. Elsewhere the rows are split per expert with
    ``torch.split``, which needs the group sizes as Python ints: :meth:`sizes` reads them once per grouping, the
    grouped path's one host sync (the dense paths have none; :func:`torch.compiler.is_compiling` callers take those).
    """

    def __init__(self, experts: torch.Tensor, num_experts: int) -> None:
        self.num_experts = num_experts
        self.order = experts.argsort(stable=True)  # (M,): slots grouped by expert, slot order kept within a group
        self.sorted_experts = experts.index_select(0, self.order)  # (M,): the expert of each sorted slot
        self.counts = torch.zeros(num_experts, dtype=torch.long, device=experts.device)
        self.counts.index_add_(0, experts, torch.ones_like(experts))  # (E,): slots per expert
        self._sizes: list[int] | None = None

    def sort(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-slot rows (M, …) in expert order."""
        return rows.index_select(0, self.order)

    def unsort(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (M, …) in expert order back in slot order."""
        positions = torch.arange(len(self.order), device=self.order.device)
        inverse = torch.empty_like(self.order).scatter_(0, self.order, positions)  # the inverse permutation
        return rows.index_select(0, inverse)

    def sizes(self) -> list[int]:
        """Slots per expert as Python ints: the one host sync of the split path (``torch.split`` needs the sizes on
        the host), read once per grouping however many projections use it."""
        if self._sizes is None:
            self._sizes = self.counts.tolist()
        return self._sizes

    def linear(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``weight[e] @ row + bias[e]`` for each sorted row (M, d_in) of expert e; ``weight`` (E, d_out, d_in),
        ``bias`` (E, d_out). Returns (M, d_out)."""
        if _grouped_mm_fits(rows, weight):
            ends = self.counts.cumsum(0).to(torch.int32)  # group ends, read on the device by the kernel
            out = torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)
            if out.requires_grad:  # its backward refuses a broadcast gradient (a stride of 0, as .sum() gives)
                out.register_hook(lambda grad: grad.contiguous())
        else:
            chunks = rows.split(self.sizes())
            out = torch.cat([chunk @ weight[e].t() for e, chunk in enumerate(chunks)])
        if bias is not None:
            out = out + bias.index_select(0, self.sorted_experts)
        return out


GROUPED_MM_ALIGNMENT = 8
"""``torch._grouped_mm`` needs bf16 widths that are multiples of 8 (16-byte rows)."""


def _grouped_mm_fits(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether one ``torch._grouped_mm`` can compute every group: CUDA, bf16, aligned widths."""
    return (
        hasattr(torch, "_grouped_mm")
        and rows.is_cuda
        and rows.dtype == weight.dtype == torch.bfloat16
        and rows.shape[-1] % GROUPED_MM_ALIGNMENT == 0
        and weight.shape[1] % GROUPED_MM_ALIGNMENT == 0
    )
