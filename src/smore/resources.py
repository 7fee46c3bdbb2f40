"""Will the run fit? A rough estimate of training memory, checked before any weight is loaded.

Running out of memory an hour into a run, or getting the process killed by the kernel's OOM killer with no message,
is the worst way to learn that a model is too big. The estimate is deliberately simple (weights as stored on disk,
upcast to float32 where they are smaller, plus the activations autograd keeps for a micro-batch of ``max_length``
tokens: 17 values per token, layer and hidden unit, Korthikanti et al. 2022's 34 bytes of 16-bit values without
recomputation, here in float32) and errs high, since most examples are shorter than ``max_length``; it refuses only
when even that is clearly above what the machine has free.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from smore.errors import UserError

logger = logging.getLogger(__name__)

ACTIVATION_VALUES = 17
"""Values kept per token, layer and hidden unit during training (no gradient checkpointing)."""
MARGIN = 1.5
"""Refuse only when the estimate exceeds the free memory by this factor: the estimate is coarse."""


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


def estimate_training_bytes(model_dir: str | os.PathLike, micro_batch_size: int, max_length: int) -> int | None:
    """Weights (float32) plus activations of one micro-batch, for a local model folder; ``None`` if unknown."""
    folder = Path(model_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None  # a hub id: its size is not known before the download
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) + sum(
        f.stat().st_size for f in folder.glob("*.bin")
    )
    if config.get("torch_dtype", config.get("dtype")) in ("bfloat16", "float16"):
        weights *= 2  # loaded as float32 by default
    if not hidden or not layers:
        return weights or None
    activations = ACTIVATION_VALUES * 4 * micro_batch_size * max_length * hidden * layers
    return weights + activations


def check_training_memory(model_dir: str | os.PathLike, micro_batch_size: int, max_length: int) -> None:
    """Raise a ``ValueError`` before loading when the run clearly cannot fit in the free memory of this machine."""
    needed = estimate_training_bytes(model_dir, micro_batch_size, max_length)
    free = available_memory()
    if needed is None or free is None:
        return
    logger.info("memory: about %.1f GiB needed, %.1f GiB available", needed / 2**30, free / 2**30)
    if needed > MARGIN * free:
        raise UserError(
            f"training {model_dir} with micro_batch_size={micro_batch_size} and max_length={max_length} needs about "
            f"{needed / 2**30:.1f} GiB of memory, but only {free / 2**30:.1f} GiB are available; lower "
            "micro_batch_size or max_length, set gradient_checkpointing: true, or use a larger machine."
        )
