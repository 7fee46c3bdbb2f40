"""The S'MoRE authors' weights (ZimpleX/SMoRE-LLM, a fork of peft: tuner ``hier_moe``, layer ``SMoREFFN``) in our
layers, and ours in their layout.

Their names, per adapted module (``{l}`` a level, 0 = bottom, as in our code; ``default`` the peft adapter name,
which peft's ``save_pretrained`` drops from the file's keys; both forms load)::

    moe_A.default.{l}          (s_l, r_l, d)       ↔ delta.A rows [a_offsets[l], + s_l r_l), expert-major
    moe_A_bias.default.{l}     (s_l, r_l)          ↔ delta.A_bias, same rows
    moe_B.default.{l}          (s_l, d_{l+1}, r_l) ↔ delta.B[l]
    moe_B_bias.default.{l}     (s_l, d_{l+1})      ↔ delta.B_bias[l]
    moe_W.default.{l}, l ≥ 1   (d_{l+1}, d_l)      ↔ delta.W[l-1].weight   (moe_W_bias: .bias)
    moe_W_final.default        (d_out, d_L)        ↔ delta.proj.weight     (moe_W_final_bias: .bias)
    moe_downproj_x.default.{weight,bias}           ↔ delta.router.down_proj
    moe_gate.default.{l}.mlp.{0,2}.{weight,bias}   ↔ delta.router.levels[l].mlp[0], mlp[2]
    moe_gate.default.{l}.mlp.1.weight  (1,)        ↔ delta.router.levels[l].mlp[1].weight (prelu router only)
    moe_gate.default.{l}.keys  (s_l, d_g)          ↔ delta.router.levels[l].keys
    moe_gate.default.{l}.weight_noise.weight       ↔ delta.router.levels[l].gate.weight_noise (noisy top-k only)
    moe_expert_act_param.default.{l}  (1,)         ↔ delta.prelu_slopes[l] (prelu only)

With the shared pool (S'MoRE#) every level's A/B key holds the same tensor: level 0's is loaded, the others must be
equal to it or absent.

Their code is not a dependency and none of it is copied here; the mapping was written from the layout above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smore.adapters.base import adapted_modules
from smore.adapters.smore import SMoREDelta
from smore.errors import UserError
from smore.inject import adapt
from smore.interop.authors_config import config_from_reference

logger = logging.getLogger(__name__)

__all__ = ["ReferenceLoadReport", "adapt_from_reference", "export_reference_state_dict", "load_reference_state_dict"]

_PARAM_NAMES = frozenset(
    {
        "moe_A",
        "moe_A_bias",
        "moe_B",
        "moe_B_bias",
        "moe_W",
        "moe_W_bias",
        "moe_W_final",
        "moe_W_final_bias",
        "moe_downproj_x",
        "moe_gate",
        "moe_expert_act_param",
    }
)


@dataclass
class _Slot:
    """One tensor of their layout: its shape there, how to read ours in that shape, how to write theirs into ours."""

    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    write: Callable[[torch.Tensor], None]


def _param_slot(param: torch.Tensor) -> _Slot:
    def write(t: torch.Tensor) -> None:
        param.copy_(t.to(device=param.device, dtype=param.dtype))

    return _Slot(tuple(param.shape), lambda: param, write)


def _rows_slot(param: torch.Tensor, start: int, shape: tuple[int, ...]) -> _Slot:
    """Rows ``[start, start + shape[0] * shape[1])`` of ``param`` (A or A_bias) seen as ``shape`` (expert-major)."""
    stop = start + shape[0] * shape[1]

    def read() -> torch.Tensor:
        return param[start:stop].reshape(shape)

    def write(t: torch.Tensor) -> None:
        param[start:stop].copy_(t.reshape(param[start:stop].shape).to(device=param.device, dtype=param.dtype))

    return _Slot(shape, read, write)


def _module_slots(delta: SMoREDelta) -> tuple[dict[str, _Slot], dict[str, str]]:
    """Their keys (adapter name removed, relative to the module) → slots, and the shared-pool aliases
    (level ≥ 1 A/B keys → the level-0 key they must equal)."""
    slots: dict[str, _Slot] = {}
    aliases: dict[str, str] = {}
    d = delta.in_features
    levels = delta.num_levels
    for level in range(levels):
        s, r = delta.num_experts[level], delta.ranks[level]
        if delta.shared_pool and level > 0:
            for key in ("moe_A", "moe_A_bias", "moe_B", "moe_B_bias"):
                aliases[f"{key}.{level}"] = f"{key}.0"
            continue
        offset = delta.a_offsets[level]
        slots[f"moe_A.{level}"] = _rows_slot(delta.A, offset, (s, r, d))
        slots[f"moe_A_bias.{level}"] = _rows_slot(delta.A_bias, offset, (s, r))
        slots[f"moe_B.{level}"] = _param_slot(delta.B[level])
        slots[f"moe_B_bias.{level}"] = _param_slot(delta.B_bias[level])
    for level in range(1, levels):
        w = delta.W[level - 1]
        slots[f"moe_W.{level}"] = _param_slot(w.weight)
        slots[f"moe_W_bias.{level}"] = _param_slot(w.bias)
    slots["moe_W_final"] = _param_slot(delta.proj.weight)
    slots["moe_W_final_bias"] = _param_slot(delta.proj.bias)
    router = delta.router
    slots["moe_downproj_x.weight"] = _param_slot(router.down_proj.weight)
    slots["moe_downproj_x.bias"] = _param_slot(router.down_proj.bias)
    for level, level_router in enumerate(router.levels):
        prefix = f"moe_gate.{level}"
        for index in (0, 2):
            linear = level_router.mlp[index]
            slots[f"{prefix}.mlp.{index}.weight"] = _param_slot(linear.weight)
            slots[f"{prefix}.mlp.{index}.bias"] = _param_slot(linear.bias)
        if isinstance(level_router.mlp[1], nn.PReLU):  # their nn.PReLU sits at the same index of the same Sequential
            slots[f"{prefix}.mlp.1.weight"] = _param_slot(level_router.mlp[1].weight)
        slots[f"{prefix}.keys"] = _param_slot(level_router.keys)
        noise = getattr(level_router.gate, "weight_noise", None)
        if noise is not None:
            slots[f"{prefix}.weight_noise.weight"] = _param_slot(noise.weight)
    if delta.prelu_slopes is not None:
        slopes = delta.prelu_slopes
        for level in range(levels):
            slots[f"moe_expert_act_param.{level}"] = _slope_slot(slopes, level)
    return slots, aliases


def _slope_slot(slopes: torch.Tensor, level: int) -> _Slot:
    def read() -> torch.Tensor:
        return slopes[level : level + 1]

    def write(t: torch.Tensor) -> None:
        slopes[level : level + 1].copy_(t.reshape(1).to(device=slopes.device, dtype=slopes.dtype))

    return _Slot((1,), read, write)


def _smore_modules(model: nn.Module) -> dict[str, SMoREDelta]:
    modules = adapted_modules(model)
    if not modules:
        raise UserError("the model carries no adapted module; call smore.adapt(model, config) first.")
    deltas = {}
    for name, module in modules.items():
        if not isinstance(module.delta, SMoREDelta):
            raise UserError(
                f"module {name!r} carries a {type(module.delta).__name__}, not an S'MoRE delta; the authors' "
                "checkpoints hold S'MoRE adapters only."
            )
        deltas[name] = module.delta
    return deltas


def _split_key(key: str, adapter_name: str) -> tuple[str, str] | None:
    """``(module path, relative key without the adapter name)``, or ``None`` without an S'MoRE parameter name."""
    parts = key.split(".")
    index = next((i for i in range(len(parts) - 1, -1, -1) if parts[i] in _PARAM_NAMES), None)
    if index is None:
        return None
    tail = parts[index:]
    if len(tail) >= 2 and tail[1] == adapter_name:
        tail = [tail[0], *tail[2:]]
    return ".".join(parts[:index]), ".".join(tail)


def _match_module(path: str, names: list[str]) -> str | None:
    """The adapted module whose name ends ``path`` at a dot boundary (longest wins), e.g. ``base_model.model.X`` → X."""
    best = None
    for name in names:
        if (path == name or path.endswith("." + name)) and (best is None or len(name) > len(best)):
            best = name
    return best


@dataclass(frozen=True)
class ReferenceLoadReport:
    """What :func:`load_reference_state_dict` did."""

    modules: int
    """Adapted modules filled."""
    tensors: int
    """Tensors copied into the model."""
    shared_checked: int
    """Shared-pool copies (levels ≥ 1 of S'MoRE#) checked equal to level 0 and skipped."""

    def __str__(self) -> str:
        extra = f", {self.shared_checked} shared-pool copies checked" if self.shared_checked else ""
        return f"loaded {self.tensors} tensors into {self.modules} S'MoRE modules{extra}"


_Plan = dict[str, tuple[dict[str, _Slot], dict[str, str]]]
"""Per adapted module (sorted by name): its slots and its shared-pool aliases, from :func:`_module_slots`."""
_Found = dict[str, dict[str, tuple[str, torch.Tensor]]]
"""Per adapted module: relative key → (the key in the state dict, its tensor)."""


def _sort_keys(state_dict: Mapping[str, torch.Tensor], plan: _Plan, adapter_name: str, problems: list[str]) -> _Found:
    """Each key of ``state_dict`` placed in its module's slot or shared-pool alias; what fits nowhere, or is given
    twice, is added to ``problems``."""
    names = list(plan)
    found: _Found = {name: {} for name in names}
    for key, tensor in state_dict.items():
        split = _split_key(key, adapter_name)
        if split is None:
            problems.append(f"unexpected key {key!r}: not an S'MoRE parameter (no moe_* name)")
            continue
        path, relative = split
        module = _match_module(path, names)
        if module is None:
            problems.append(f"unexpected key {key!r}: no adapted module matches {path!r}")
            continue
        slots, aliases = plan[module]
        if relative not in slots and relative not in aliases:
            hint = f" (is the adapter named {adapter_name!r}?)" if len(relative.split(".")) > 1 else ""
            problems.append(f"unexpected key {key!r} for module {module!r}{hint}")
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{module!r} {relative}: value of {key!r} is a {type(tensor).__name__}, not a tensor")
            continue
        if relative in found[module]:
            problems.append(f"{module!r} {relative}: given twice ({found[module][relative][0]!r} and {key!r})")
            continue
        found[module][relative] = (key, tensor)
    return found


def _fit_problems(plan: _Plan, found: _Found) -> list[str]:
    """Slots with no tensor or a tensor of the wrong shape, and shared-pool copies that differ from level 0's."""
    problems = []
    for module, (slots, aliases) in plan.items():
        given = found[module]
        for relative, slot in slots.items():
            if relative not in given:
                problems.append(f"{module!r} {relative}: missing (expected shape {slot.shape})")
            elif tuple(given[relative][1].shape) != slot.shape:
                problems.append(
                    f"{module!r} {relative}: shape {tuple(given[relative][1].shape)} in the state dict, "
                    f"{slot.shape} expected"
                )
        for relative, target in aliases.items():
            if relative not in given or target not in given:
                continue
            tensor, reference = given[relative][1], given[target][1]
            if tensor.shape != reference.shape:
                problems.append(
                    f"{module!r} {relative}: shape {tuple(tensor.shape)}, but the shared pool needs the shape of "
                    f"{target} {tuple(reference.shape)}"
                )
            elif not torch.equal(tensor.to(reference.device, reference.dtype), reference):
                problems.append(f"{module!r} {relative}: differs from {target}, but the shared pool shares one tensor")
    return problems


def load_reference_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> ReferenceLoadReport:
    """Copy a state dict in the authors' layout into ``model``, adapted with ``smore.adapt(model, config)``.

    Keys may carry any prefix before the module name (``base_model.model.`` from peft) and may include the peft
    adapter name (``moe_A.default.0``, the in-memory form) or not (``moe_A.0``, what peft's ``save_pretrained``
    writes). Every key is checked before anything is copied: all missing, unexpected and wrong-shaped keys are listed
    in one ``ValueError``.
    """
    deltas = _smore_modules(model)
    plan: _Plan = {name: _module_slots(deltas[name]) for name in sorted(deltas)}
    problems: list[str] = []
    found = _sort_keys(state_dict, plan, adapter_name, problems)
    problems += _fit_problems(plan, found)
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise UserError(
            f"the state dict does not fit the adapted model ({len(problems)} problem(s); the model's S'MoRE "
            f"config must match the checkpoint's, see config_from_reference):\n  " + "\n  ".join(shown) + more
        )
    copies = checked = 0
    with torch.no_grad():
        for module, (slots, aliases) in plan.items():
            for relative, slot in slots.items():
                slot.write(found[module][relative][1])
                copies += 1
            checked += sum(1 for relative in aliases if relative in found[module])
    logger.info("load_reference_state_dict: %d tensors into %d modules", copies, len(plan))
    return ReferenceLoadReport(modules=len(plan), tensors=copies, shared_checked=checked)


def export_reference_state_dict(
    model: nn.Module, adapter_name: str | None = "default", prefix: str = "base_model.model."
) -> dict[str, torch.Tensor]:
    """Our S'MoRE weights in the authors' layout (the inverse of :func:`load_reference_state_dict`).

    Keys are ``{prefix}{module name}.{their key}``; ``adapter_name=None`` leaves the adapter name out, as peft's
    ``save_pretrained`` writes files. Tensors are detached copies (shared-pool levels get separate copies of the
    same values, so the dict can be saved with safetensors).
    """
    out: dict[str, torch.Tensor] = {}
    for name, delta in _smore_modules(model).items():
        slots, aliases = _module_slots(delta)
        everything = {**{k: slots[k] for k in slots}, **{alias: slots[target] for alias, target in aliases.items()}}
        for relative, slot in everything.items():
            head, _, rest = relative.partition(".")
            parts = [head] + ([adapter_name] if adapter_name else []) + ([rest] if rest else [])
            out[f"{prefix}{name}." + ".".join(parts)] = slot.read().detach().clone()
    return out


def adapt_from_reference(
    model: nn.Module,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    adapter_name: str = "default",
) -> tuple[nn.Module, ReferenceLoadReport]:
    """Adapt a base ``model`` with the authors' ``config`` and load their ``state_dict`` into it, in one call.

    The config is translated before the model is touched; if the weights then do not fit, the ``ValueError`` comes
    after ``adapt`` changed the model, so start again from a fresh base model.
    """
    smore_config = config_from_reference(config)
    adapt(model, smore_config)
    report = load_reference_state_dict(model, state_dict, adapter_name=adapter_name)
    return model, report
