"""Adapter files: ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter weights only, as PEFT writes
them), saved atomically and checked on load: every module must exist with its shape, every tensor must match, and the
weights file records the digest of the config it was saved with, so an edited or damaged config is refused. A
method's model-level state (T-REX's prior) travels in the same weights file through its record's ``state``.

A method whose record has a ``file_format`` is saved in that layout (LoRA: HF PEFT's, which
``PeftModel.from_pretrained`` loads as it is): the config file and the weights' names are the other library's, and
smore's own config and module shapes ride in the weights file's metadata with the digest of the config file.

An adapted model's ``save_pretrained(path)`` writes the same two files (as PEFT's ``PeftModel`` does), so a folder HF
``Trainer`` checkpoints (``checkpoint-N/``) or ``save_model`` writes reloads with :func:`load_adapter`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from smore._version import __version__
from smore.adapters.base import adapted_modules
from smore.config import AdapterConfig
from smore.errors import UserError
from smore.files import (
    document_digest,
    read_json_object,
    read_safetensors,
    safetensors_metadata,
    write_json,
    write_safetensors,
)
from smore.inject import MODEL_CALLS, adapt, adapter_state_dict, module_shape, remove_adapter, state_of
from smore.registry import METHODS, config_from_dict, method_of

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_DIGEST_KEY = "smore_config_sha256"
"""Metadata of the weights file: the digest of the config and module shapes they were saved with, so that a damaged
or edited ``adapter_config.json`` that still parses (a changed rank or alpha) is refused instead of loaded silently."""
SMORE_CONFIG_KEY = "smore_config"
"""Metadata of the weights file of a method saved in another library's layout (its record's ``file_format``; LoRA:
PEFT's): smore's own document (config, version, module shapes), which that library's config file has no place for."""
FILE_CONFIG_DIGEST_KEY = "smore_file_config_sha256"
"""Metadata beside :data:`SMORE_CONFIG_KEY`: the digest of the other library's ``adapter_config.json`` as saved, so
an edit there (a changed ``r``) is refused as an edit of smore's own config is."""


def save_adapter(
    model: nn.Module, path: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter weights only) into ``path``.

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a torn file.
    ``state_dict``: the whole model's, to take the adapter weights from instead of the model (see
    :func:`~smore.inject.adapter_state_dict`).
    """
    state = state_of(model)
    path = Path(path)
    method = method_of(state.config)
    layout = method.file_format  # e.g. LoRA: PEFT's, so PeftModel.from_pretrained loads the folder as it is
    tensors = {
        (layout.key_to_file(k) if layout else k): v.detach().contiguous().cpu()
        for k, v in adapter_state_dict(model, state_dict).items()
    }
    if method.state is not None:  # e.g. T-REX's centroids, checked before anything is written
        tensors.update(method.state.tensors(state.context))
    path.mkdir(parents=True, exist_ok=True)
    base_name = getattr(getattr(model, "config", None), "name_or_path", None)
    document = {
        **state.config.to_dict(),
        "smore_version": __version__,
        "base_model": base_name or None,
        "modules": {name: list(shape) for name, shape in state.modules.items()},
    }
    metadata = {CONFIG_DIGEST_KEY: _config_digest(state.config, state.modules)}
    if layout is not None:  # smore's own document rides in the weights file; the other library's is the config file
        metadata[SMORE_CONFIG_KEY] = json.dumps(document, sort_keys=True)
        document = json.loads(json.dumps(layout.config_document(model, state.config, state.modules)))
        metadata[FILE_CONFIG_DIGEST_KEY] = document_digest(document)
    write_safetensors(path / WEIGHTS_NAME, tensors, metadata)  # with the digest of its tensors (smore.files)
    write_json(path / CONFIG_NAME, document)
    logger.info("saved %s adapter (%d tensors) to %s", state.config.method, len(tensors), path)
    return path


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **ignored,
) -> None:
    """``model.save_pretrained(path)`` of an adapted model: :func:`save_adapter`, as PEFT saves a ``PeftModel``.

    Takes the arguments HF ``Trainer`` passes (``state_dict``, ``is_main_process``: only the main process writes).
    Options about the shards and serialisation of a whole model (``safe_serialization``, ``max_shard_size``, ...)
    have no meaning for one small safetensors file and are ignored. The base model is not written (it is unchanged;
    ``smore.remove_adapter(model).save_pretrained(path)`` writes it).
    """
    if push_to_hub:
        raise UserError(
            "save_pretrained(push_to_hub=True) is not supported for a smore adapter; save it to a folder and upload "
            "that folder with huggingface_hub.upload_folder."
        )
    if is_main_process:
        save_adapter(model, save_directory, state_dict=state_dict)


def merge_and_unload(model: nn.Module, progressbar: bool = False, safe_merge: bool = False, **ignored) -> nn.Module:
    """``model.merge_and_unload()`` of an adapted model, as PEFT's: fold each adapter into its base weight and return
    the base model (the wrappers removed), which computes what the adapted model did without the adapter's cost.

    Only a method whose record has a ``merge`` (plain LoRA) can; a routed adapter raises a ``UserError`` saying why.
    ``safe_merge``: refuse a merge that gives non-finite weights (PEFT's check) and put the weights back.
    """
    merge = _merge_of(state_of(model).config, "merge_and_unload()")
    wrappers = adapted_modules(model)
    originals = {name: w.base_layer.weight.detach().clone() for name, w in wrappers.items()} if safe_merge else {}
    for wrapper in wrappers.values():
        merge(wrapper)
    broken = [name for name in originals if not torch.isfinite(wrappers[name].base_layer.weight).all()]
    if broken:
        with torch.no_grad():
            for name, weight in originals.items():
                wrappers[name].base_layer.weight.copy_(weight)
        raise UserError(f"merging the adapter gives non-finite weights in {broken[:5]}; the model is unchanged.")
    return remove_adapter(model)


def merge_adapter(model: nn.Module, *args, **kwargs) -> None:
    """``model.merge_adapter()``: PEFT keeps merged weights and the adapter side by side (to unmerge later); smore
    does not, so this names the call that does what can be done."""
    _merge_of(state_of(model).config, "merge_adapter()")
    raise UserError(
        "merge_adapter() is not supported: smore keeps no merged-but-attached state to unmerge later. Call "
        "model.merge_and_unload() to fold the LoRA into the base weights and get the base model back."
    )


def _merge_of(config: AdapterConfig, call: str):
    merge = method_of(config).merge
    if merge is None:
        raise UserError(
            f"{call} has no meaning for a {config.method!r} adapter: its delta is routed, so it depends on each "
            "token's input and cannot be folded into the frozen weight W0. Keep the adapter attached (or save it "
            "with smore.save_adapter); only a plain LoRA (smore.LoRAConfig) merges."
        )
    return merge


MODEL_CALLS["save_pretrained"] = save_pretrained
MODEL_CALLS["merge_and_unload"] = merge_and_unload
MODEL_CALLS["merge_adapter"] = merge_adapter


def read_adapter_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict]:
    """The config saved in an adapter folder and smore's document of it: ``adapter_config.json``, or for a folder in
    another library's layout (a LoRA in PEFT's) the document in the weights' metadata, checked against the config
    file; a folder that library wrote itself (no smore metadata) gives its config as the method reads it and the raw
    document."""
    file = Path(path) / CONFIG_NAME
    if not file.exists() and any(Path(path).glob("model*.safetensors")):
        raise UserError(
            f"{path} holds a whole model's weights (model.safetensors) and no {CONFIG_NAME}: it is not a smore "
            "adapter. An adapted model's save_pretrained, HF Trainer's checkpoints and save_model write the adapter; "
            "for a model HF Trainer does not know (not a PreTrainedModel) call smore.save_adapter(model, folder)."
        )
    document = read_json_object(file, f"an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    source = file  # the file the document came from, named if it is damaged
    if "method" not in document:  # another library's layout: smore's document is in the weights file, or none is
        saved = _document_in_weights(Path(path), document)
        config = _config_in_other_layout(document, file) if saved is None else None
        if config is not None:
            return config, document
        if saved is not None:
            document, source = saved, Path(path) / WEIGHTS_NAME
    fields = {k: v for k, v in document.items() if k not in ("smore_version", "base_model", "modules")}
    try:
        return config_from_dict(fields), document
    except (TypeError, ValueError) as error:  # a damaged file: name it, whatever the config's own error says
        where = f"the metadata of {source}" if source != file else str(file)
        raise UserError(f"{where} does not hold a valid adapter config: {error}") from error


def _document_in_weights(path: Path, document: dict) -> dict | None:
    """smore's document saved in the weights file's metadata (``None`` when another library wrote the folder); the
    config file must be the one saved with it."""
    weights = path / WEIGHTS_NAME
    metadata = safetensors_metadata(weights) if weights.is_file() else {}
    if SMORE_CONFIG_KEY not in metadata:
        return None
    if document_digest(document) != metadata.get(FILE_CONFIG_DIGEST_KEY):
        raise UserError(
            f"{path / CONFIG_NAME} does not match the config {weights} was saved with: the config file is corrupted "
            "or was edited after saving; restore it from a good copy."
        )
    try:
        saved = json.loads(metadata[SMORE_CONFIG_KEY])
    except json.JSONDecodeError as error:
        raise UserError(f"{weights} holds a damaged {SMORE_CONFIG_KEY} in its metadata ({error}).") from error
    if not isinstance(saved, dict) or "method" not in saved:
        raise UserError(f"{weights} holds a damaged {SMORE_CONFIG_KEY} in its metadata (no 'method').")
    return saved


def _config_in_other_layout(document: dict, file: Path) -> AdapterConfig | None:
    """The config of an ``adapter_config.json`` another library wrote (PEFT's LoRA), read by the method whose
    ``file_format`` knows that layout; ``None`` when none does."""
    for method in METHODS.values():
        if method.file_format is not None:
            try:
                config = method.file_format.config_from_document(document)
            except (TypeError, ValueError) as error:
                raise UserError(f"{file} does not hold an adapter config smore can load: {error}") from error
            if config is not None:
                return config
    return None


def _config_digest(config: AdapterConfig, modules: dict[str, tuple[int, int]]) -> str:
    return document_digest({"config": config.to_dict(), "modules": {k: list(v) for k, v in modules.items()}})


def _check_config_digest(path: Path, config: AdapterConfig, modules: dict[str, tuple[int, int]]) -> None:
    """The weights file records the config it was saved with (when smore wrote it); the config file must match."""
    expected = safetensors_metadata(path / WEIGHTS_NAME).get(CONFIG_DIGEST_KEY)
    if expected is not None and _config_digest(config, modules) != expected:
        raise UserError(
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
        raise UserError(f"the adapter in {path} does not fit this {type(model).__name__}: " + "; ".join(problems[:20]))
    if getattr(model, "smore_state", None) is None:  # otherwise adapt() below says so
        method = method_of(config)
        selected = set(method.find(model, config))
        if saved_modules and selected != set(saved_modules):
            extra, missing = sorted(selected - set(saved_modules)), sorted(set(saved_modules) - selected)
            raise UserError(
                f"the adapter in {path} was saved for other modules: on this model its config also matches "
                f"{extra[:10]} and misses {missing[:10]}."
            )
    weights_file = path / WEIGHTS_NAME
    tensors = _read_tensors(weights_file, config)
    adapt(model, config)
    try:
        _restore_state(model, tensors, weights_file)
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
        raise UserError(
            f"'modules' in {path / CONFIG_NAME} must map module names to [in, out] shapes; the file is damaged."
        )
    return {name: tuple(shape) for name, shape in modules.items()}


def restore_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights (and the method's model-level state) saved in ``path`` into a model already adapted with the
    same config, e.g. to resume training."""
    path = Path(path)
    config, document = read_adapter_config(path)
    if config != state_of(model).config:
        raise UserError(f"the adapter in {path} has another config than the model's adapter; it cannot be restored.")
    tensors = _read_tensors(path / WEIGHTS_NAME, config)
    _check_config_digest(path, config, _saved_modules(document, path))
    _restore_state(model, tensors, path / WEIGHTS_NAME)
    load_adapter_weights(model, tensors, source=str(path / WEIGHTS_NAME))
    return model


def _read_tensors(file: Path, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The saved tensors under smore's names (``adapter_state_dict``'s), whatever layout the method saves in."""
    tensors = read_safetensors(file)
    layout = method_of(config).file_format
    return {layout.key_from_file(k): v for k, v in tensors.items()} if layout else tensors


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
        raise UserError(
            f"adapter weights from {source} do not match the adapted model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape mismatches (file vs model) {wrong[:10]}."
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def _restore_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Hand the method's model-level tensors (T-REX's centroids) back to its state; they leave ``tensors``."""
    state = state_of(model)
    method = method_of(state.config)
    if method.state is not None:
        try:
            method.state.restore(state.context, tensors)
        except UserError as error:
            raise UserError(f"{source}: {error}") from error
