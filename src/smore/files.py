"""File helpers shared by every reader and writer of adapters and checkpoints: atomic, durable writes and checked
reads, so that an interrupted save never leaves a torn file and a damaged one is named in the error.

Safetensors files written by :func:`write_safetensors` carry the sha256 of their tensors (names, dtypes, shapes and
bytes) in their metadata; :func:`read_safetensors` checks it when present, so a flipped bit in the tensor data, which
the format itself cannot notice, is refused with the file named. Files without it (written by other tools) load as
they are. Nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smore.errors import UserError

DIGEST_KEY = "smore_sha256"
"""Metadata key of a safetensors file holding :func:`tensors_digest` of its tensors."""


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries: a rename in it) to disk; a no-op where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary name beside ``target``, flush it to disk, then rename it over ``target`` in one
    step: a reader sees the old file or the new one, never a torn one, even after a crash or power cut."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        write(tmp)
        fsync_path(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    fsync_path(target.parent)


def write_json(target: Path, document: dict) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))


def read_json_object(file: Path, hint: str) -> dict:
    """The JSON object in ``file``; a missing, malformed or non-object file raises a ``ValueError`` naming it.
    ``hint`` says what the folder should hold."""
    if not file.is_file():
        raise UserError(f"{file} does not exist; {hint}.")
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{file} is not valid JSON ({error}); the file is corrupted.") from error
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{file} cannot be read ({error}).") from error
    if not isinstance(document, dict):
        raise UserError(f"{file} must hold a JSON object, not {type(document).__name__}.")
    return document


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_safetensors(
    target: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` atomically, with their digest in the metadata for :func:`read_safetensors` to check."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": "pt", **(metadata or {}), DIGEST_KEY: tensors_digest(tensors)}
    atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in memory aligned as torch allocates it. A tensor read from a file's buffer may start at any byte;
    kernels then take other code paths and results differ in the last bit (a reloaded T-REX prior did)."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, corrupted or truncated file raises a ``ValueError`` naming it
    (a file that records its digest is also checked against it)."""
    if not file.is_file():
        raise UserError(f"{file} does not exist; the adapter folder is incomplete.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: _aligned(handle.get_tensor(key)) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as error:
        raise UserError(f"{file} cannot be read ({error}); the file is corrupted or truncated.") from error
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise UserError(
            f"{file} does not match the sha256 recorded in it: its tensor data is corrupted (or was changed after "
            "saving); restore it from a good copy."
        )
    return tensors


def safetensors_metadata(file: Path) -> dict[str, str]:
    """The metadata of a safetensors file (its header only); a damaged file raises a ``ValueError`` naming it."""
    if not file.is_file():
        raise UserError(f"{file} does not exist; the adapter folder is incomplete.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as error:
        raise UserError(f"{file} cannot be read ({error}); the file is corrupted or truncated.") from error


def document_digest(document: Any) -> str:
    """sha256 of a JSON-serialisable document in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(file: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks (files here reach gigabytes)."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
