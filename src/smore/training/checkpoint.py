"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, a manifest of hashes.

A checkpoint is a folder ``checkpoint-{step}`` holding the adapter (``adapter/``, as ``smore.save_adapter`` writes
it), ``optimizer.safetensors`` (optimizer tensors and the torch RNG state), ``trainer_state.json`` (progress,
scheduler, optimizer hyper-parameters, Python RNG) and ``manifest.json`` (sha256 of every file). It is written under
``checkpoint-{step}.tmp`` and renamed when complete, so a crash mid-write never leaves a half checkpoint under the
final name; loading checks every hash first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from smore.files import read_json_object, read_safetensors, write_json

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
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
    directory: Path, *, save_adapter, optimizer, scheduler, progress: dict[str, Any], run_config: dict[str, Any]
) -> Path:
    """Write a complete checkpoint to ``directory`` (atomically: a temporary folder renamed at the end)."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(tmp / "adapter")
    tensors, optimizer_meta = _optimizer_parts(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    python_state = random.getstate()
    write_json(
        tmp / "trainer_state.json",
        {
            "progress": progress,
            "scheduler": scheduler.state_dict(),
            "optimizer": optimizer_meta,
            "rng_python": [python_state[0], list(python_state[1]), python_state[2]],
            "run_config": run_config,
        },
    )
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    write_json(tmp / "manifest.json", {str(p.relative_to(tmp)): _sha256(p) for p in files})
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def verify_checkpoint(directory: Path) -> None:
    """Every file listed in the manifest is present with its hash; a ValueError names the first that is not."""
    manifest = read_json_object(directory / "manifest.json", "a checkpoint folder holds manifest.json")
    for relative, expected in manifest.items():
        file = directory / relative
        if not file.is_file():
            raise ValueError(f"checkpoint {directory} is incomplete: {relative} is missing.")
        if _sha256(file) != expected:
            raise ValueError(f"checkpoint file {file} does not match its hash in the manifest: it is corrupted.")


def load_checkpoint(directory: Path, *, load_adapter_weights, optimizer, scheduler) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from a checkpoint; returns its progress record."""
    verify_checkpoint(directory)
    load_adapter_weights(directory / "adapter")
    state = read_json_object(directory / "trainer_state.json", "a checkpoint folder holds trainer_state.json")
    tensors = read_safetensors(directory / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return state["progress"]


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders of an interrupted save excluded)."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
        logger.debug("removed old checkpoint %s", old)


def read_run_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "trainer_state.json").read_text())["run_config"]
