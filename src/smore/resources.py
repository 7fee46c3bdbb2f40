"""Can the run start? The model source, and a rough estimate of training memory, checked before any weight loads.

Running out of memory an hour into a run, or getting the process killed by the kernel's OOM killer with no message,
is the worst way to learn that a model is too big. The estimate is deliberately simple and errs high: weights as
stored on disk (upcast to float32 where they are smaller) plus the activations autograd keeps for the largest
micro-batch. Without gradient checkpointing that is 17 values per token, layer and hidden unit (Korthikanti et al.
2022's 34 bytes of 16-bit values without recomputation, here in float32); with it, each decoder layer keeps only its
input (one value per token and hidden unit) and one layer at a time holds its 17 again while it is recomputed. The
micro-batch is sized by the longest tokenised example when the caller has the data (batches are padded to their
longest example, so one batch holding it is the peak), else by ``max_length``. It refuses only when the estimate is
clearly above what the machine has free, and its advice is what its own estimate says would fit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smore.errors import UserError

logger = logging.getLogger(__name__)

ACTIVATION_VALUES = 17
"""Values kept per token, layer and hidden unit during training (no gradient checkpointing)."""
CHECKPOINTED_VALUES = 1
"""Values kept per token, layer and hidden unit with gradient checkpointing: each decoder layer's input."""
MARGIN = 1.5
"""Refuse only when the estimate exceeds the free memory by this factor: the estimate is coarse."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
"""What the Hugging Face hub accepts as a model id: ``name`` or ``namespace/name``."""


@dataclass(frozen=True)
class MemoryKeys:
    """How the caller's user spells the settings the advice names (config keys for ``smore train``, flags for the
    demo); ``checkpointing`` is ``None`` where the caller has no such setting."""

    micro_batch_size: str = "train.micro_batch_size"
    max_length: str = "data.max_length"
    checkpointing: str | None = "train.gradient_checkpointing"


TRAIN_KEYS = MemoryKeys()
DEMO_KEYS = MemoryKeys("--batch-size", "--max-length", None)
"""The demo's flags: it has no gradient checkpointing switch."""


def check_model_source(model: str | os.PathLike) -> None:
    """Raise a ``UserError`` when ``model`` is neither a model folder nor something the hub could resolve.

    Transformers reads a path that does not exist as a hub id and fails with "Repo id must be in the form …", which
    says nothing about the folder the user meant."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model={text}: the folder has no config.json, so it is not a Hugging Face model folder; "
                            "point model at the folder that holds config.json and the weights.")  # fmt: skip
        return
    if path.exists():
        raise UserError(f"model={text} is a file; model must be a Hugging Face model folder (config.json and "
                        "weights) or a hub id such as HuggingFaceTB/SmolLM2-135M.")  # fmt: skip
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise UserError(f"model={text}: the folder does not exist. Give an existing model folder, or a hub id "
                        "(namespace/name, e.g. HuggingFaceTB/SmolLM2-135M), which needs network access or the hub "
                        "cache to download it.")  # fmt: skip


def available_memory() -> int | None:
    """Bytes the system can still give (``MemAvailable`` on Linux, else free pages), or ``None`` if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _model_config(folder: Path) -> dict[str, Any] | None:
    """The text model's ``config.json`` of a local folder, or ``None`` for a hub id (not known before download)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return config.get("text_config", config)


def _weight_bytes(folder: Path, config: dict[str, Any]) -> int:
    weights = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))
    if config.get("torch_dtype", config.get("dtype")) in ("bfloat16", "float16"):
        weights *= 2  # loaded as float32 by default
    return weights


def estimate_training_bytes(
    model_dir: str | os.PathLike, micro_batch_size: int, tokens: int, *, gradient_checkpointing: bool = False
) -> int | None:
    """Weights (float32) plus the activations of one micro-batch of ``micro_batch_size`` examples of ``tokens``
    tokens each, for a local model folder; ``None`` if unknown."""
    folder = Path(model_dir)
    config = _model_config(folder)
    if config is None:
        return None
    weights = _weight_bytes(folder, config)
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    if not hidden or not layers:
        return weights or None
    per_layer = (
        CHECKPOINTED_VALUES * layers + ACTIVATION_VALUES if gradient_checkpointing else ACTIVATION_VALUES * layers
    )
    return weights + per_layer * 4 * micro_batch_size * tokens * hidden


def check_positions(model_dir: str | os.PathLike, max_length: int, key: str = TRAIN_KEYS.max_length) -> None:
    """Raise a ``UserError`` when ``max_length`` exceeds the positions the model was built for."""
    config = _model_config(Path(model_dir))
    limit = None if config is None else config.get("max_position_embeddings")
    if limit and max_length > limit:
        raise UserError(f"{key}={max_length} is beyond the model's max_position_embeddings={limit} (the longest "
                        f"sequence it was built for); set {key} to {limit} or less.")  # fmt: skip


def check_training_memory(
    model_dir: str | os.PathLike,
    micro_batch_size: int,
    max_length: int,
    *,
    lengths: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    keys: MemoryKeys = TRAIN_KEYS,
) -> None:
    """Raise a ``UserError`` before loading when ``max_length`` exceeds the model's positions, or when the run
    clearly cannot fit in the free memory of this machine.

    ``lengths`` are the tokenised lengths of the training examples, when the caller has them: the peak micro-batch is
    then ``micro_batch_size`` examples of the longest one, not of ``max_length``."""
    check_positions(model_dir, max_length, keys.max_length)
    tokens = min(max(lengths), max_length) if lengths else max_length
    needed = estimate_training_bytes(model_dir, micro_batch_size, tokens, gradient_checkpointing=gradient_checkpointing)
    free = available_memory()
    if needed is None or free is None:
        return
    if lengths:
        typical = estimate_training_bytes(model_dir, micro_batch_size, int(statistics.median(lengths)),
                                          gradient_checkpointing=gradient_checkpointing)  # fmt: skip
        logger.info("memory: about %.1f GiB needed at the longest example (%d tokens), %.1f GiB for a typical one, "
                    "%.1f GiB available", needed / 2**30, tokens, typical / 2**30, free / 2**30)  # fmt: skip
    else:
        logger.info("memory: about %.1f GiB needed, %.1f GiB available", needed / 2**30, free / 2**30)
    if needed <= MARGIN * free:
        return
    sized_by = "sized by the longest training example" if lengths else f"sized by {keys.max_length}"
    advice = [f"lower {keys.micro_batch_size} or {keys.max_length}"]
    if keys.checkpointing and not gradient_checkpointing:
        checkpointed = estimate_training_bytes(model_dir, micro_batch_size, tokens, gradient_checkpointing=True)
        if checkpointed is not None and checkpointed <= MARGIN * free:
            advice.insert(0, f"set {keys.checkpointing}: true (about {checkpointed / 2**30:.1f} GiB)")
    raise UserError(
        f"training {model_dir} needs about {needed / 2**30:.1f} GiB of memory, but only {free / 2**30:.1f} GiB are "
        f"available (micro-batches of micro_batch_size={micro_batch_size} examples of {tokens} tokens, "
        f"{sized_by}); {', '.join(advice)}, or use a larger machine."
    )
