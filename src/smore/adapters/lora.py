"""LoRA (Hu et al., 2021): ``Δy = (alpha / r) · B A dropout(x)``, A Kaiming-uniform, B = 0 at init.

::

    x ──► dropout ──► A (r × d_in) ──► B (d_out × r) ──► · alpha/r ──► Δy

Parameter names and initialisation follow HF PEFT's ``lora.Linear`` (``lora_A``/``lora_B`` as bias-free
``nn.Linear``), so the same weights give the same outputs as PEFT; ``smore.save_adapter`` writes a LoRA in PEFT's
file layout (:data:`PEFT_FORMAT`), which ``peft.PeftModel.from_pretrained`` loads as it is (:mod:`smore.interop.peft`
reads and writes PEFT folders from the same pieces).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from smore.adapters.base import adapted_modules
from smore.adapters.method import (
    AdapterFileFormat,
    CostModel,
    Counts,
    Method,
    SearchSpace,
    check_config,
    check_features,
    set_rank,
    with_total,
)
from smore.checks import check_int, check_number, is_int, is_number
from smore.config import AdapterConfig
from smore.errors import UserError


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``Δy = (alpha / rank) B A x`` (HF PEFT's LoRA, same weights and outputs)."""

    method: ClassVar[str] = "lora"

    rank: int = 8
    """r: the rank of the update."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in training only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank)
        if self.alpha is not None or not self.alpha_optional:
            check_number("alpha", self.alpha, low=0, open_low=True)
        check_number("dropout", self.dropout, low=0, high=1)

    alpha_optional: ClassVar[bool] = False

    @property
    def scaling(self) -> float:
        """The factor on every update: alpha / rank (1 when alpha is null, where the method allows it)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


def check_lora_arguments(*, rank: int, alpha: float, dropout: float) -> None:
    """The checks every LoRA-style delta shares; ``ValueError`` naming the argument."""
    if not is_int(rank) or rank < 1:
        raise UserError(f"rank={rank!r} must be a positive integer.")
    if not is_number(alpha) or alpha <= 0:
        raise UserError(f"alpha={alpha!r} must be a positive number (the update is scaled by alpha / rank).")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise UserError(f"dropout={dropout!r} must be a number in [0, 1).")


class LoRADelta(nn.Module):
    """``d_in → r → d_out`` low-rank update, scaled by ``alpha / rank``.

    Parameters: ``lora_A`` (``nn.Linear(d_in, r)``, weight (r, d_in)), ``lora_B`` (``nn.Linear(r, d_out)``, weight
    (d_out, r), zero at init). ``r (d_in + d_out)`` parameters in all.
    """

    def __init__(self, *, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        check_lora_arguments(rank=rank, alpha=alpha, dropout=dropout)
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.aux_loss = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``Δy`` (N, d_out) for tokens ``x`` (N, d_in); ``valid`` is unused (no routing)."""
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # (N, r) -> (N, d_out)


def build_lora(config, in_features: int, out_features: int) -> LoRADelta:
    """Builder: a :class:`LoRAConfig` to the keyword arguments of :class:`LoRADelta`."""
    return LoRADelta(
        in_features=in_features, out_features=out_features, rank=config.rank, alpha=config.alpha, dropout=config.dropout
    )


def lora_parameter_counts(config: LoRAConfig, in_features: int, out_features: int) -> Counts:
    """LoRA: ``{"A": r d_in, "B": r d_out, "total": r (d_in + d_out)}``. Every token uses all of them."""
    config = check_config(config, LoRAConfig)
    check_features(in_features, out_features)
    return with_total({"A": config.rank * in_features, "B": config.rank * out_features})


def lora_flops_per_token(config: LoRAConfig, in_features: int, out_features: int) -> Counts:
    """LoRA multiply-adds per token: ``{"A": d_in r, "B": r d_out, "total"}`` (the same numbers as its parameters)."""
    return lora_parameter_counts(config, in_features, out_features)


def merge_lora(wrapper: nn.Module) -> None:
    """Fold ``(alpha / r) B A`` into the base weight of ``wrapper`` (an ``AdaptedLinear``), in the base's dtype;
    transformers' ``Conv1D`` stores its weight as (d_in, d_out), the transpose of ``nn.Linear``'s."""
    base, delta = wrapper.base_layer, wrapper.delta
    with torch.no_grad():
        update = (delta.lora_B.weight.float() @ delta.lora_A.weight.float()) * delta.scaling  # (d_out, d_in)
        if not isinstance(base, nn.Linear):  # Conv1D, the only other layer AdaptedLinear wraps
            update = update.T
        base.weight.add_(update.to(device=base.weight.device, dtype=base.weight.dtype))


# -- HF PEFT's file layout -----------------------------------------------------------------------------------------
# ``smore.save_adapter`` writes a LoRA as PEFT does, so ``PeftModel.from_pretrained`` loads it as it is; the PEFT
# interop (smore.interop.peft) reads and writes the same layout from these pieces.

PEFT_KEY_PREFIX = "base_model.model."
"""PEFT's prefix of every saved key: ``PeftModel.base_model`` (the LoRA tuner), then its wrapped ``model``."""

# PEFT LoraConfig fields that do not change what a loaded LoRA computes: metadata, the matching fields (read
# below) and options that only shape the initialisation of fresh weights.
_IGNORED = set(
    "peft_type task_type peft_version auto_mapping base_model_name_or_path revision inference_mode r lora_alpha "
    "lora_dropout target_modules exclude_modules layers_to_transform layers_pattern fan_in_fan_out init_lora_weights "
    "loftq_config eva_config corda_config lora_ga_config megatron_core qalora_group_size ensure_weight_tying "
    "runtime_config".split()
)

# PEFT options smore's LoRA cannot reproduce, with what they are. Refused when set (non-empty, true, not "none").
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA) adds a magnitude vector",
    "use_rslora": "rank-stabilised LoRA scales by lora_alpha/sqrt(r); smore's LoRA scales by alpha/r",
    "use_qalora": "QALoRA pools the input of quantised layers",
    "lora_bias": "a bias on lora_B",
    "bias": "trained biases of the base model",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained copies of whole modules",
    "trainable_token_indices": "trainable embedding rows",
    "target_parameters": "LoRA on raw parameters (e.g. MoE expert weights)",
    "layer_replication": "replicated decoder layers",
    "alora_invocation_tokens": "activated LoRA (the update starts at invocation tokens)",
    "use_bdlora": "BD-LoRA block-diagonal factors",
    "arrow_config": "Arrow routing between LoRA experts",
    "kasa_config": "KaSA singular-value adaptation",
    "monteclora_config": "MonteCLoRA stochastic factors",
    "velora_config": "VeLoRA compressed activations",
    "megatron_config": "Megatron parallel linear layers",
}


def _is_set(key: str, value: Any) -> bool:
    if key == "bias":
        return value != "none"
    return value not in (None, False, "", {}, [], ())


def check_peft_supported(document: dict[str, Any]) -> None:
    """A PEFT ``adapter_config.json`` smore's LoRA computes exactly: ``peft_type`` LORA and no option that changes
    the computation; ``UserError`` naming the option otherwise."""
    peft_type = document.get("peft_type")
    if peft_type != "LORA":
        raise UserError(f"peft_type={peft_type!r} is not supported; smore reads PEFT adapters with peft_type 'LORA'.")
    for key, value in document.items():
        if key in _UNSUPPORTED and _is_set(key, value):
            raise UserError(
                f"the PEFT adapter sets {key}={value!r} ({_UNSUPPORTED[key]}), which smore's LoRA does not support."
            )
        if key not in _UNSUPPORTED and key not in _IGNORED and _is_set(key, value):
            raise UserError(
                f"the PEFT adapter sets {key}={value!r}, an option smore does not know; it may change the LoRA "
                "computation, so the adapter is not loaded."
            )


def lora_config_from_peft(document: dict[str, Any]) -> LoRAConfig:
    """A smore :class:`LoRAConfig` from the contents of a PEFT ``adapter_config.json``.

    ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``exclude_modules`` and ``layers_to_transform`` map
    one to one (PEFT matches module names as smore does: a regex is full-matched, a list entry matches a name or a
    ``.``-suffix). Unsupported options raise a ``ValueError`` naming them.
    """
    if not isinstance(document, dict):
        raise UserError(f"a PEFT adapter config must be a JSON object, not {type(document).__name__}.")
    check_peft_supported(document)
    for key in ("r", "lora_alpha"):
        if key not in document:
            raise UserError(f"the PEFT adapter config has no {key!r}; it is not a LoRA adapter config.")
    target_modules = document.get("target_modules")
    if target_modules is None:
        raise UserError(
            "the PEFT adapter config has target_modules=None (PEFT's per-architecture default); "
            "load it with load_peft_lora, which reads the adapted modules from the weights."
        )
    if isinstance(target_modules, (set, tuple)):
        target_modules = sorted(target_modules)
    layers = document.get("layers_to_transform")
    if layers is not None and document.get("layers_pattern") not in (None, "layers", "layer", "h", "blocks", "block"):
        raise UserError(
            f"layers_pattern={document['layers_pattern']!r} is not one smore recognises for layers_to_transform; "
            "load it with load_peft_lora, which reads the adapted modules from the weights."
        )
    return LoRAConfig(
        rank=document["r"],
        alpha=document["lora_alpha"],
        dropout=document.get("lora_dropout", 0.0),
        target_modules=target_modules,
        exclude_modules=document.get("exclude_modules"),
        layers_to_transform=layers,
    )


def _unadapted_names(model: nn.Module) -> list[str]:
    """Module names as the base model has them: the adapted layers, not the wrappers' insides."""
    inside = tuple(f"{name}." for name in adapted_modules(model))
    return [name for name, _ in model.named_modules() if name and not name.startswith(inside)]


def _peft_selects(names: list[str], target_modules: list[str] | str) -> set[str]:
    """The names PEFT's matching selects: ``re.fullmatch`` for a string, else an exact name or a ``.``-suffix."""
    if isinstance(target_modules, str):
        return {n for n in names if re.fullmatch(target_modules, n)}
    return {n for n in names if n in target_modules or any(n.endswith("." + t) for t in target_modules)}


def peft_target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """A PEFT ``target_modules`` that selects exactly the wrapped layers of ``model``: their last name
    parts when that is exact, else their full names, else a regular expression of the full names."""
    names = _unadapted_names(model)
    for candidate in (sorted({n.rsplit(".", 1)[-1] for n in wrapped}), sorted(wrapped)):
        if _peft_selects(names, candidate) == set(wrapped):
            return candidate
    return "|".join(re.escape(n) for n in sorted(wrapped))  # exact, whatever the other names are


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def peft_config_document(
    model: nn.Module,
    config: LoRAConfig,
    modules: Iterable[str],
    *,
    task_type: str | None = "CAUSAL_LM",
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` (its ``LoraConfig``) for the LoRA ``config`` on ``modules`` of ``model``.

    ``base_model_name_or_path`` defaults to ``model.config.name_or_path``; ``fan_in_fan_out`` is set for
    transformers' ``Conv1D`` (GPT-2), which stores its weight transposed and is the only other layer smore wraps.
    """
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    wrappers = adapted_modules(model)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": _number(config.alpha),
        "lora_dropout": config.dropout,
        "target_modules": peft_target_modules(model, list(modules)),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": any(not isinstance(wrappers[name].base_layer, nn.Linear) for name in modules),
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _lora_from_document(document: dict[str, Any]) -> LoRAConfig | None:
    """The config of an ``adapter_config.json`` PEFT wrote (``None`` for another kind of document)."""
    if "method" in document or document.get("peft_type") != "LORA":
        return None
    return lora_config_from_peft(document)


PEFT_FORMAT = AdapterFileFormat(
    config_document=lambda model, config, modules: peft_config_document(model, config, modules),
    key_to_file=lambda key: PEFT_KEY_PREFIX + key,
    key_from_file=lambda key: key.removeprefix(PEFT_KEY_PREFIX),
    config_from_document=_lora_from_document,
)
"""HF PEFT's layout: ``adapter_config.json`` holds PEFT's ``LoraConfig`` and the weights are keyed
``base_model.model.{module}.lora_A.weight`` / ``.lora_B.weight`` (``default`` adapter name dropped), as
``PeftModel.save_pretrained`` writes them."""


METHOD = Method(
    name="lora",
    config_class=LoRAConfig,
    build=build_lora,
    costs=CostModel(lora_parameter_counts, lora_parameter_counts, lora_flops_per_token),
    search=SearchSpace(
        default=LoRAConfig,
        resize=set_rank,
        describe=lambda c: f"r={c.rank}",
        gamma=lambda c: 1,
    ),
    merge=merge_lora,
    file_format=PEFT_FORMAT,
)
