"""File helpers shared by every reader and writer of adapters: atomic writes and checked reads, so that an
interrupted save never leaves a torn file and a damaged one is named in the error."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


def atomic_write(target: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary name beside ``target``, then rename it over ``target`` in one step."""
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)


def write_json(target: Path, document: dict) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))


def read_json_object(file: Path, hint: str) -> dict:
    """The JSON object in ``file``; a missing, malformed or non-object file raises a ``ValueError`` naming it.
    ``hint`` says what the folder should hold."""
    if not file.is_file():
        raise ValueError(f"{file} does not exist; {hint}.")
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); the file is corrupted.") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} cannot be read ({error}).") from error
    if not isinstance(document, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(document).__name__}.")
    return document


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, corrupted or truncated file raises a ``ValueError`` naming it."""
    if not file.is_file():
        raise ValueError(f"{file} does not exist; the adapter folder is incomplete.")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{file} cannot be read ({error}); the file is corrupted or truncated.") from error
