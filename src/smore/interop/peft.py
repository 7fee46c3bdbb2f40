"""HF PEFT LoRA adapters, both ways: a LoRA trained with ``smore`` loads in PEFT, and a PEFT LoRA loads in ``smore``.

::

    smore.adapt(model, smore.LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    ...                                                          # train
    save_peft_lora(model, "run/peft")                            # PEFT's folder layout
    PeftModel.from_pretrained(base_model, "run/peft")            # loads in PEFT, same outputs

    model = load_peft_lora(base_model, "someone/peft-adapter")   # a PEFT LoRA folder, as smore's LoRA

PEFT's folder holds ``adapter_config.json`` (its ``LoraConfig``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``, …) and ``adapter_model.safetensors`` (older versions: ``adapter_model.bin``),
whose keys are, per adapted module (name relative to the base model, ``default`` adapter name dropped)::

    base_model.model.{module}.lora_A.weight   (r, d_in)    ↔ {module}.delta.lora_A.weight
    base_model.model.{module}.lora_B.weight   (d_out, r)   ↔ {module}.delta.lora_B.weight

Both compute ``Δy = (lora_alpha / r) · B A dropout(x)`` (:class:`~smore.adapters.lora.LoRADelta`). PEFT options
that change that computation or add weights smore's LoRA has no place for (DoRA, rsLoRA, per-module rank or alpha
patterns, a LoRA bias, LoRA on embeddings or convolutions, ``modules_to_save``, …) are refused with a
``ValueError`` naming the option; options that only shape the initialisation (``init_lora_weights``, LoftQ, EVA,
…) are irrelevant once the weights exist and are ignored. PEFT is not needed by this module.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from smore.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter_weights  # PEFT's file names are ours
from smore.adapters.base import adapted_modules, linear_features
from smore.adapters.lora import LoRAConfig, LoRADelta
from smore.checks import is_int, is_number
from smore.errors import UserError
from smore.files import atomic_write, read_json_object, read_safetensors, write_json
from smore.inject import adapt
from smore.targets import find_targets

try:  # GPT-2 style projections: PEFT marks them with fan_in_fan_out=True
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

logger = logging.getLogger(__name__)

__all__ = ["load_peft_lora", "lora_config_from_peft", "peft_lora_state_dict", "save_peft_lora"]

LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
"""PEFT's prefix of every saved key: ``PeftModel.base_model`` (the LoRA tuner), then its wrapped ``model``."""

_KEY = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)?(?:\.weight)?"
)

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


# -- smore → PEFT ------------------------------------------------------------------------------------------------


def _lora_modules(model: nn.Module) -> dict[str, LoRADelta]:
    state = getattr(model, "smore_state", None)
    if state is None:
        raise UserError("this model carries no smore adapter; call smore.adapt(model, smore.LoRAConfig(...)) first.")
    if state.config.method != "lora":
        raise UserError(
            f"PEFT's LORA format holds plain LoRA only; this model carries a {state.config.method!r} adapter. "
            "Save it with smore.save_adapter instead."
        )
    modules = {name: m.delta for name, m in adapted_modules(model).items()}
    for name, delta in modules.items():
        if not isinstance(delta, LoRADelta):
            raise UserError(f"module {name!r} holds a {type(delta).__name__}, not a LoRADelta.")
    return modules


def peft_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of a smore-adapted model under PEFT's saved names (``base_model.model.{module}.lora_A.weight``
    and ``.lora_B.weight``)."""
    tensors = {}
    for name, delta in _lora_modules(model).items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = delta.lora_A.weight
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = delta.lora_B.weight
    return tensors


def _unadapted_names(model: nn.Module) -> list[str]:
    """Module names as the base model has them: the adapted layers, not the wrappers' insides."""
    inside = tuple(f"{name}." for name in adapted_modules(model))
    return [name for name, _ in model.named_modules() if name and not name.startswith(inside)]


def _peft_selects(names: list[str], target_modules: list[str] | str) -> set[str]:
    """The names PEFT's matching selects: ``re.fullmatch`` for a string, else an exact name or a ``.``-suffix."""
    if isinstance(target_modules, str):
        return {n for n in names if re.fullmatch(target_modules, n)}
    return {n for n in names if n in target_modules or any(n.endswith("." + t) for t in target_modules)}


def _peft_target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """A PEFT ``target_modules`` that selects exactly the wrapped layers of ``model``: their last name
    parts when that is exact, else their full names, else a regular expression of the full names."""
    names = _unadapted_names(model)
    for candidate in (sorted({n.rsplit(".", 1)[-1] for n in wrapped}), sorted(wrapped)):
        if _peft_selects(names, candidate) == set(wrapped):
            return candidate
    return "|".join(re.escape(n) for n in sorted(wrapped))  # exact, whatever the other names are


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def save_peft_lora(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    task_type: str | None = "CAUSAL_LM",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the smore LoRA on ``model`` as a PEFT LoRA adapter folder (``adapter_config.json`` and
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base_model, path)`` loads.

    ``target_modules`` is written as the wrapped layers' last name parts when those select exactly the same layers
    under PEFT's matching, otherwise as their full names (or, if even those select more, an exact regex).
    ``base_model_name_or_path`` defaults to ``model.config.name_or_path``. Each file is written under a temporary
    name and renamed, so an interrupted save never leaves a torn file.
    """
    modules = _lora_modules(model)
    config: LoRAConfig = model.smore_state.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    conv1d = Conv1D is not None and any(isinstance(m.base_layer, Conv1D) for m in adapted_modules(model).values())
    document = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": _number(config.alpha),
        "lora_dropout": config.dropout,
        "target_modules": _peft_target_modules(model, list(modules)),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in peft_lora_state_dict(model).items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(path / CONFIG_NAME, document)
    logger.info("saved a PEFT LoRA adapter (%d modules, r=%d) to %s", len(modules), config.rank, path)
    return path


# -- PEFT → smore ------------------------------------------------------------------------------------------------


def _check_supported(document: dict[str, Any]) -> None:
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
    """A smore :class:`~smore.config.LoRAConfig` from the contents of a PEFT ``adapter_config.json``.

    ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``exclude_modules`` and ``layers_to_transform`` map
    one to one (PEFT matches module names as smore does: a regex is full-matched, a list entry matches a name or a
    ``.``-suffix). Unsupported options raise a ``ValueError`` naming them.
    """
    if not isinstance(document, dict):
        raise UserError(f"a PEFT adapter config must be a JSON object, not {type(document).__name__}.")
    _check_supported(document)
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


def _read_weights(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    file = path / WEIGHTS_NAME
    if file.is_file():
        return read_safetensors(file), str(file)
    try:
        legacy = path / LEGACY_WEIGHTS_NAME
        if legacy.is_file():
            if not allow_pickle:  # a pickle can run code when read: only on the user's explicit word
                raise PermissionError(
                    f"{legacy} is a pickle file, which can run code when loaded; convert it to safetensors, or pass "
                    "allow_pickle=True if you trust its source."
                )
            return torch.load(legacy, map_location="cpu", weights_only=True), str(legacy)
    except PermissionError as error:
        raise UserError(str(error)) from None
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        # (weights_only=True: a pickle that would run code is refused by torch with an UnpicklingError)
        raise UserError(f"{legacy} cannot be read ({error}); the file is corrupted or not plain weights.") from error
    raise UserError(f"{path} holds neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}; it is not a PEFT adapter folder.")


def _split_weights(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"lora_A": (r, d_in), "lora_B": (d_out, r)}}`` from PEFT's keys; refuses anything else."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    embeddings, magnitudes, unknown = set(), [], []
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(KEY_PREFIX))
        if match is None:
            unknown.append(key)
        elif match["kind"].startswith("lora_embedding"):
            embeddings.add(match["module"])
        elif match["kind"] == "lora_magnitude_vector":
            magnitudes.append(key)
        else:
            modules.setdefault(match["module"], {})[match["kind"]] = tensor
    if embeddings:
        raise UserError(
            f"{source} puts LoRA on the embedding(s) {sorted(embeddings)}; LoRA on embeddings is not supported."
        )
    if magnitudes:
        raise UserError(f"{source} holds DoRA magnitudes ({magnitudes[0]!r}); use_dora is not supported.")
    if unknown:
        raise UserError(f"{source} holds {unknown[:5]}, which are not LoRA weights smore's LoRA can load.")
    for module, parts in modules.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise UserError(f"{source} holds {sorted(parts)} for {module!r}; a LoRA module needs lora_A and lora_B.")
    if not modules:
        raise UserError(f"{source} holds no LoRA weights.")
    return modules


def _check_shapes(model: nn.Module, modules: dict[str, dict[str, torch.Tensor]], rank: int, source: str) -> None:
    present = dict(model.named_modules())
    problems = []
    for name, parts in sorted(modules.items()):
        module = present.get(name)
        if module is None:
            problems.append(f"module {name!r} is missing from the model")
            continue
        if isinstance(module, nn.Embedding):
            raise UserError(f"{source} puts LoRA on the embedding {name!r}; LoRA on embeddings is not supported.")
        features = linear_features(module)
        if features is None:
            problems.append(f"module {name!r} is a {type(module).__name__}; smore's LoRA adapts linear layers only")
            continue
        expected = {"lora_A": (rank, features[0]), "lora_B": (features[1], rank)}
        for kind, shape in expected.items():
            if tuple(parts[kind].shape) != shape:
                problems.append(f"{name}.{kind} is {tuple(parts[kind].shape)}, the model needs {shape}")
    if problems:
        raise UserError(f"the PEFT adapter {source} does not fit this {type(model).__name__}: " + "; ".join(problems))


def _fitting_config(model: nn.Module, document: dict[str, Any], module_names: set[str]) -> LoRAConfig:
    """PEFT's own target selection when smore's matching selects exactly the saved modules, else those names."""
    try:
        config = lora_config_from_peft(document)
        if set(find_targets(model, config)) == module_names:
            return config
    except ValueError:  # no target_modules, an unknown layers_pattern, or a selection smore cannot adapt
        pass
    logger.info("the PEFT target_modules do not select the saved modules exactly; targeting them by name.")
    return LoRAConfig(
        rank=document["r"],
        alpha=document["lora_alpha"],
        dropout=document.get("lora_dropout", 0.0),
        target_modules=sorted(module_names),
    )


def load_peft_lora(model: nn.Module, path: str | os.PathLike, *, allow_pickle: bool = False) -> nn.Module:
    """Adapt a base ``model`` with smore's LoRA from a PEFT LoRA adapter folder and load its weights.

    Weights are read from ``adapter_model.safetensors``; an older ``adapter_model.bin`` (a pickle, which can run
    code when loaded) is refused unless ``allow_pickle=True``.

    The config is read with :func:`lora_config_from_peft` (unsupported options raise ``ValueError`` naming them);
    every saved module must exist with matching shapes before the model is touched. When PEFT's
    ``target_modules`` select other layers under smore's matching than the file holds, the layers named in the
    file are adapted. Returns the model (changed in place), whose outputs equal ``PeftModel``'s.
    """
    path = Path(path)
    file = path / CONFIG_NAME
    document = read_json_object(file, f"a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    _check_supported(document)
    rank = document.get("r")
    if not is_int(rank) or rank < 1:
        raise UserError(f"r={rank!r} in {file} must be a positive integer.")
    alpha = document.get("lora_alpha")
    if not is_number(alpha) or alpha <= 0:
        raise UserError(f"lora_alpha={alpha!r} in {file} must be a positive number.")
    tensors, source = _read_weights(path, allow_pickle)
    modules = _split_weights(tensors, source)
    _check_shapes(model, modules, rank, source)
    config = _fitting_config(model, document, set(modules))
    adapt(model, config)
    weights = {f"{name}.{kind}.weight": tensor for name, parts in modules.items() for kind, tensor in parts.items()}
    load_adapter_weights(model, weights, source=source)
    logger.info("loaded a PEFT LoRA adapter (%d modules, r=%d) from %s", len(modules), rank, path)
    return model
