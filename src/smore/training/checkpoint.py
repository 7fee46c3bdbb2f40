"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, a manifest of hashes.

A checkpoint is a folder ``checkpoint-{step}`` holding the adapter (``adapter/``, as ``smore.save_adapter`` writes
it), ``optimizer.safetensors`` (optimizer tensors and the RNG states), ``trainer_state.json`` (progress, scheduler,
optimizer hyper-parameters, Python RNG) and ``manifest.json`` (sha256 of every file). It is written under
``checkpoint-{step}.tmp``, flushed to disk and renamed when complete, so a crash or ``kill -9`` at any moment never
leaves a half checkpoint under a final name; loading checks every hash first, and every damaged file is named.

Rewriting a step that exists (the final save of a resumed run) moves the old folder to ``checkpoint-{step}.old``
first; a crash in between is repaired by :func:`checkpoints`, which puts the old one back. Pruning renames a folder
to ``.trash`` before deleting it, so a half-deleted checkpoint never keeps a final name.

Fault injection, for tests only and inert unless the variable is set: ``SMORE_FAULT_INJECT=checkpoint-N:STAGE``
makes the process SIGKILL itself (as ``kill -9`` or a power cut would) when the save of ``checkpoint-N`` reaches
STAGE, one of :data:`FAULT_STAGES`; ``checkpoint-N:prune`` kills it halfway through deleting ``checkpoint-N``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from smore.errors import UserError
from smore.files import (
    fsync_path,
    read_json_object,
    read_safetensors,
    sha256_file,
    write_json,
    write_safetensors,
)

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
REQUIRED = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors")
STATE = "trainer_state.json"
FAULT_ENV = "SMORE_FAULT_INJECT"
FAULT_STAGES = ("begin", "adapter", "optimizer", "state", "manifest", "swap", "renamed", "prune")
"""Moments of a save: temporary folder made; adapter, optimizer state, trainer state, manifest written; old folder
of the same step moved aside; renamed to the final name (before pruning); halfway through deleting a pruned one."""


def _fault_point(directory: Path, stage: str) -> None:
    if os.environ.get(FAULT_ENV) == f"{directory.name}:{stage}":
        logger.warning("%s=%s: killing this process", FAULT_ENV, os.environ[FAULT_ENV])
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _optimizer_parts(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if key.startswith("state."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    *,
    save_adapter,
    optimizer,
    scheduler,
    progress: dict[str, Any],
    run_config: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint to ``directory`` (atomically: a temporary folder renamed at the end).

    ``optimizer_state`` replaces ``optimizer.state_dict()`` when given: the state gathered from every process's shards
    under FSDP (:func:`smore.training.engines.gathered_optimizer_state`). Refuses (``ValueError``, nothing written) an
    optimizer state that is not finite: it could not be resumed from.
    """
    tensors, optimizer_meta = _optimizer_parts(optimizer.state_dict() if optimizer_state is None else optimizer_state)
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise UserError(f"{directory.name}: optimizer state {bad[:3]} is not finite; no checkpoint written.")
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():  # left by a crash: never complete, never used
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _fault_point(directory, "begin")
    save_adapter(tmp / "adapter")
    _fault_point(directory, "adapter")
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    write_safetensors(tmp / "optimizer.safetensors", tensors)
    _fault_point(directory, "optimizer")
    python_state = random.getstate()
    write_json(
        tmp / STATE,
        {
            "progress": progress,
            "scheduler": scheduler.state_dict(),
            "optimizer": optimizer_meta,
            "rng_python": [python_state[0], list(python_state[1]), python_state[2]],
            "run_config": run_config,
        },
    )
    _fault_point(directory, "state")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    write_json(tmp / MANIFEST, {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files})
    for folder in (tmp / "adapter", tmp):
        fsync_path(folder)
    _fault_point(directory, "manifest")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():  # the same step again: keep the old one until the new one has its name
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        _fault_point(directory, "swap")
    os.replace(tmp, directory)
    fsync_path(directory.parent)
    _fault_point(directory, "renamed")
    if old.exists():
        shutil.rmtree(old)
    return directory


def verify_checkpoint(directory: Path) -> None:
    """The manifest lists the checkpoint's files and each is present with its hash; a ``ValueError`` names the first
    file that is not (a missing, damaged or tampered manifest included)."""
    manifest_file = directory / MANIFEST
    manifest = read_json_object(manifest_file, "a complete checkpoint folder holds manifest.json")
    for relative, expected in manifest.items():
        parts = PurePosixPath(relative).parts
        if not isinstance(expected, str) or not parts or parts[0] == "/" or ".." in parts:
            raise UserError(f"{manifest_file} is damaged: entry {relative!r}: {expected!r} is not a file and its hash.")
    missing = [name for name in (*REQUIRED, STATE) if name not in manifest]
    if missing:
        raise UserError(f"{manifest_file} is damaged or incomplete: it does not list {missing}.")
    for relative, expected in manifest.items():
        file = directory / relative
        if not file.is_file():
            raise UserError(f"checkpoint {directory} is incomplete: {file} is missing.")
        if sha256_file(file) != expected:
            raise UserError(
                f"checkpoint file {file} does not match its hash in {manifest_file}: one of them is corrupted; "
                f"delete {directory} to resume from the checkpoint before it."
            )


def load_checkpoint(
    directory: Path, *, load_adapter_weights, optimizer, scheduler, restore_optimizer=None
) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from a checkpoint; returns its progress record.

    ``restore_optimizer(state)``, when given, loads the optimizer's state instead of ``optimizer.load_state_dict``
    (under FSDP: each process's shards, :func:`smore.training.engines.restore_optimizer_state`). Every hash is
    checked before anything is restored; a damaged file raises a ``ValueError`` naming it."""
    verify_checkpoint(directory)
    load_adapter_weights(directory / "adapter")
    state_file, tensors_file = directory / STATE, directory / "optimizer.safetensors"
    state = read_json_object(state_file, "a checkpoint folder holds trainer_state.json")
    tensors = read_safetensors(tensors_file)
    try:
        rng = tensors.pop("rng.torch")
        cuda = [tensors.pop(key) for key in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=_index)]
        (restore_optimizer or optimizer.load_state_dict)(_optimizer_state(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        version, internal, gauss = state["rng_python"]
        python_rng = (version, tuple(internal), gauss)
        progress = state["progress"]
        if not isinstance(progress.get("step"), int) or not isinstance(progress.get("history"), list):
            raise UserError("progress needs an integer step and a history list")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        raise UserError(
            f"checkpoint {directory} cannot be restored ({type(error).__name__}: {error}): {state_file} or "
            f"{tensors_file} does not fit this run's optimizer."
        ) from error
    torch.set_rng_state(rng)
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python_rng)
    return progress


def _index(key: str) -> int:
    return int(key.rsplit(".", 1)[1])


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first. Temporary folders of an interrupted save are never
    listed; a checkpoint moved aside by a save of the same step that was interrupted is put back first."""
    for old in output_dir.glob("checkpoint-*.old"):
        final = old.with_name(old.name.removesuffix(".old"))
        if _NAME.match(final.name) and not final.exists():
            try:
                os.replace(old, final)
                logger.warning("restored %s from %s (a save of the same step was interrupted)", final, old.name)
            except OSError:  # another process did it first
                pass
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints, and what interrupted saves and deletions left behind."""
    for old in checkpoints(output_dir)[:-keep]:
        trash = old.with_name(old.name + ".trash")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(old, trash)  # one step: never a half-deleted folder under a checkpoint's name
        if os.environ.get(FAULT_ENV) == f"{old.name}:prune":
            next(p for p in trash.rglob("*") if p.is_file()).unlink()
            _fault_point(old, "prune")
        shutil.rmtree(trash)
        logger.debug("removed old checkpoint %s", old)
    checkpoints(output_dir)  # puts back any .old whose checkpoint is missing: what is left below is stale
    for left in output_dir.glob("checkpoint-*.*"):  # called right after a complete save, so no save is under way
        stem, _, suffix = left.name.rpartition(".")
        if _NAME.match(stem) and suffix in ("tmp", "old", "trash") and left.is_dir():
            shutil.rmtree(left, ignore_errors=True)


def read_run_config(directory: Path) -> dict[str, Any]:
    """The run config a checkpoint was written by; a damaged state file raises a ``ValueError`` naming it."""
    file = directory / STATE
    config = read_json_object(file, "a checkpoint folder holds trainer_state.json").get("run_config")
    if not isinstance(config, dict):
        raise UserError(f"{file} holds no run_config mapping; the file is damaged.")
    return config


def read_progress(directory: Path) -> dict[str, Any]:
    """A checkpoint's progress record (its step, history, and the number of processes and the engine that wrote
    it), read without restoring anything: what ``--resume`` checks before it writes or loads; a damaged state file
    raises a ``ValueError`` naming it."""
    file = directory / STATE
    progress = read_json_object(file, "a checkpoint folder holds trainer_state.json").get("progress")
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        raise UserError(f"{file} holds no progress mapping with an integer step; the file is damaged.")
    return progress
