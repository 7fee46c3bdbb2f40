"""Shared fixtures: tiny models built from a config in-process (no hub, no download), seeded."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import smore
from smore.analysis.budget import MODEL_SHAPES


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama with random weights, the same for the same seed."""
    torch.manual_seed(seed)
    values = dict(MODEL_SHAPES["tiny"])  # the same tiny Llama `smore analyze budget --model-config tiny` uses
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


def word_tokenizer(words: list[str]):
    """A word-level tokenizer over ``words`` with <s>, </s>, <pad>: offline and tiny, for end-to-end runs."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]"
    )


COUNTING_WORDS = "Please choose the correct answer to the question : What comes after ? ( A ) ( B )".split()
COUNTING_WORDS += [str(i) for i in range(12)]


def counting_records(count: int = 16) -> list[dict]:
    """Multiple-choice records with a rule to learn: the answer is the number after the one asked about."""
    records = []
    for i in range(count):
        n = i % 10
        right, wrong = str(n + 1), str((n + 5) % 12)
        choices, answer = ([right, wrong], "A") if i % 2 == 0 else ([wrong, right], "B")
        records.append({"question": f"What comes after {n} ?", "choices": choices, "answer": answer})
    return records


def counting_workspace(root, eval_records: int = 0):
    """``root/model`` (a tiny Llama folder), ``root/train.jsonl`` (16 counting records) and, when asked,
    ``root/eval.jsonl``: what a training run in the tests reads."""
    tiny_model_folder(root / "model")
    files = {"train.jsonl": 16, **({"eval.jsonl": eval_records} if eval_records else {})}
    for name, count in files.items():
        (root / name).write_text("".join(json.dumps(record) + "\n" for record in counting_records(count)))
    return root


def tiny_model_folder(path, seed: int = 0):
    """A tiny Llama and its word-level tokenizer saved as an HF folder, like a downloaded model."""
    tokenizer = word_tokenizer(COUNTING_WORDS)
    model = tiny_llama(seed, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["all-linear", "(", "up_proj", "relu", "dense", "mlp"]),
    st.lists(st.one_of(st.integers(-2, 6), st.floats(allow_nan=True), st.text(max_size=3), st.none()), max_size=4),
    st.lists(st.sampled_from(["q_proj", "up_proj", "down_proj", "mlp", ""]), max_size=3),
    st.tuples(st.integers(-1, 4), st.integers(-1, 4)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
"""Values of every wrong kind for a config field (the fuzz tests of test_config and test_fuzz share it)."""
