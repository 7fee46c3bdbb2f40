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
from smore.adapters.lora import (  # PEFT's layout lives with the method: smore.save_adapter writes it too
    PEFT_KEY_PREFIX,
    LoRAConfig,
    LoRADelta,
    check_peft_supported,
    lora_config_from_peft,
    peft_config_document,
)
from smore.checks import is_int, is_number
from smore.errors import UserError
from smore.files import atomic_write, read_json_object, read_safetensors, write_json
from smore.inject import adapt
from smore.targets import find_targets

logger = logging.getLogger(__name__)

__all__ = ["load_peft_lora", "lora_config_from_peft", "peft_lora_state_dict", "save_peft_lora"]

LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = PEFT_KEY_PREFIX

_KEY = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)?(?:\.weight)?"
)

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
    document = peft_config_document(
        model, config, modules, task_type=task_type, base_model_name_or_path=base_model_name_or_path
    )
    tensors = {k: v.detach().contiguous().cpu() for k, v in peft_lora_state_dict(model).items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(path / CONFIG_NAME, document)
    logger.info("saved a PEFT LoRA adapter (%d modules, r=%d) to %s", len(modules), config.rank, path)
    return path


# -- PEFT → smore ------------------------------------------------------------------------------------------------


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
    check_peft_supported(document)
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
