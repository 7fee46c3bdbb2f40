"""Shapes of known models, for sizing adapters without downloading a model: a catalogue of configs
(:data:`MODEL_SHAPES`), a causal LM built on the meta device from one (:func:`meta_model`), and bare layer shapes
(:class:`TargetShapes`) when there is no model at all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smore.errors import UserError

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
}
"""Built-in Llama shapes, by name: ``tiny`` (the tests' 2-layer, hidden-32 model), ``smollm2-135m``
(HuggingFaceTB/SmolLM2-135M) and ``llama-3.2-1b`` (meta-llama/Llama-3.2-1B). Only what the adapters' sizes and the
base parameter count depend on."""


def model_config(spec: str):
    """A ``transformers`` config from a built-in name (:data:`MODEL_SHAPES`), a ``config.json`` or a model folder.

    Nothing is downloaded: a path must exist locally.
    """
    from transformers import AutoConfig, LlamaConfig

    if spec in MODEL_SHAPES:
        return LlamaConfig(**MODEL_SHAPES[spec])
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"model config {spec!r} is neither a built-in name ({sorted(MODEL_SHAPES)}) nor an existing config.json "
            "or model folder; download the model's config.json and pass its path."
        )
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"model config {spec!r}: cannot read a transformers config there ({error}).") from error


def meta_model(spec: Any) -> nn.Module:
    """A causal LM built from ``spec`` (see :func:`model_config`, or a ``transformers`` config) on the meta device:
    every module and shape, no weights allocated, so a 1B model takes a fraction of a second."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec) if isinstance(spec, str) else spec
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class TargetShapes:
    """The layers to size adapters for, when there is no model at hand."""

    linear: tuple[tuple[int, int], ...] = ()
    """``(in_features, out_features)`` of every linear layer a linear-level method adapts (one adapter each)."""
    blocks: tuple[tuple[int, int], ...] = ()
    """``(hidden_size, intermediate_size)`` of every gated MLP block a block-level method (MixLoRA) adapts."""

    @classmethod
    def ffn(cls, hidden_size: int, intermediate_size: int, num_layers: int) -> TargetShapes:
        """The paper's placement (SPEC §1.8): gate/up/down projections of every layer, and the MLP blocks."""
        d, d_ff = hidden_size, intermediate_size
        return cls(linear=((d, d_ff), (d, d_ff), (d_ff, d)) * num_layers, blocks=((d, d_ff),) * num_layers)
