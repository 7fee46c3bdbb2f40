"""Shared fixtures: tiny models built from a config in-process (no hub, no download), seeded."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import smore


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama with random weights, the same for the same seed."""
    torch.manual_seed(seed)
    values = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    values.update(overrides)
    config = LlamaConfig(**values)
    return LlamaForCausalLM(config).eval()


def tiny_batch(batch: int = 2, length: int = 8, seed: int = 1, vocab: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding on the first row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def small_smore(**overrides) -> smore.SMoREConfig:
    values = dict(num_experts=[3, 4], top_k=[2, 2], ranks=[2, 3], router_dims=[8, 8], down_proj_dim=8)
    values.update(overrides)
    return smore.SMoREConfig(**values)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add overhead (10x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
