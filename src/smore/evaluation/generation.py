"""Greedy generation from token-id prompts, batched and left-padded, cut at stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from smore.data import collate

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's padding token, else its EOS (padded positions are masked out, so any token works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens and cut at the first ``stop``
    string. Prompts run longest first in left-padded batches (every row's last position is its last real token);
    the answers come back in prompt order. Generation ends at the model's EOS ids or the tokenizer's."""
    from transformers import GenerationConfig

    pad = pad_id(tokenizer)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos_ids or None
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        batch = collate([{"input_ids": prompts[i]} for i in rows], pad, "left")
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            generation_config=config,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]  # (rows, generated)
        for row, i in enumerate(rows):
            text = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
            cut = min((j for j in (text.find(s) for s in stop) if j >= 0), default=len(text))
            answers[i] = text[:cut]
    return answers
