"""Builders the tests share: tiny models built from a config in-process (no hub, no download), batches, configs,
records, and the readable references some fast paths are checked against. Tests import them from here; conftest.py
holds only fixtures."""

from __future__ import annotations

import json

import torch
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from transformers import LlamaConfig, LlamaForCausalLM

import smore
from smore.adapters.base import AdaptedFFN
from smore.adapters.smore import SMoREConfig, SMoREDelta, build_smore

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
"""The tests' tiny Llama (2 layers, hidden 32); the budget tool's catalogue has a model of the same shapes."""


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama with random weights, the same for the same seed."""
    torch.manual_seed(seed)
    values = dict(TINY_LLAMA)
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


D_IN, D_OUT = 6, 5


GATES = ("dense", "switch", "noisy_topk")


POSITIONS = ("all", "child", "child_v2")


F64 = torch.float64


def make_config(levels: int = 2, *, shared_pool: bool = False, **overrides) -> SMoREConfig:
    """A small config; without the shared pool the levels differ in size so that every offset matters."""
    if shared_pool:
        num_experts, ranks = [3] * levels, [2] * levels
    else:
        num_experts, ranks = [3, 4, 3][:levels], [2, 3, 1][:levels]
    values = dict(
        num_experts=num_experts,
        top_k=[2, 2, 2][:levels],
        ranks=ranks,
        router_dims=[4, 5, 3][:levels],
        down_proj_dim=4,
        shared_pool=shared_pool,
        init="normal",
    )
    values.update(overrides)
    return SMoREConfig(**values)


def make_delta(levels: int = 2, *, seed: int = 0, d_in: int = D_IN, d_out: int = D_OUT, **overrides) -> SMoREDelta:
    config = make_config(levels, **overrides)
    torch.manual_seed(seed)
    return build_smore(config, d_in, d_out).to(F64)


def randomize_biases_(delta: SMoREDelta, seed: int = 5) -> None:
    """All biases are 0 at init; give them values so that the bias paths are tested too, and distinct prelu slopes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in delta.named_parameters():
            if name.endswith("bias") or name == "A_bias" or name.startswith("B_bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
        if delta.prelu_slopes is not None:
            delta.prelu_slopes.copy_(torch.linspace(0.1, 0.6, delta.num_levels, dtype=F64))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **kwargs) -> None:
    kwargs.setdefault("atol", 1e-12)
    kwargs.setdefault("rtol", 1e-10)
    torch.testing.assert_close(actual, expected, **kwargs)


class _CountTorchCalls(TorchFunctionMode):
    """Counts every torch function and tensor method called (nested calls are not counted twice); with
    ``attributes=False`` reads of tensor attributes (``.shape``, ``._version``), which launch nothing, are left out."""

    def __init__(self, attributes: bool = True) -> None:
        super().__init__()
        self.calls = 0
        self.attributes = attributes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.attributes or not _is_attribute(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _is_attribute(func) -> bool:
    return getattr(func, "__name__", "") == "__get__"


def count_torch_calls(fn, *, attributes: bool = True) -> int:
    with torch.no_grad(), _CountTorchCalls(attributes) as counter:
        fn()
    return counter.calls


def randomise(model, seed: int = 3) -> None:
    """Non-zero B so the experts differ (B is zero at init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def readable_mixlora(module: AdaptedFFN, x: torch.Tensor) -> torch.Tensor:
    """Token by token, selected expert by selected expert, the MixLoRA formula written out."""
    delta, base, r = module.delta, module.base_layer, module.delta.rank
    probs = delta.router(x).softmax(-1)
    outputs = []
    for token in range(x.shape[0]):
        top = probs[token].topk(delta.gate.top_k)
        weights = top.values / top.values.sum()
        total = 0
        for weight, expert in zip(weights, top.indices.tolist()):
            rows = slice(expert * r, (expert + 1) * r)

            def project(name, inp, rows=rows):
                out = getattr(base, name)(inp)
                if name in delta.lora_A:
                    out = out + delta.scaling * delta.lora_B[name][:, rows] @ (delta.lora_A[name][rows] @ inp)
                return out

            hidden = base.act_fn(project("gate_proj", x[token])) * project("up_proj", x[token])
            total = total + weight * project("down_proj", hidden)
        outputs.append(total)
    return torch.stack(outputs)


def _adapter_cases() -> dict:
    """One config per method (and per S'MoRE gate), named; values are (config, expert_path or None)."""
    return {
        "lora": (smore.LoRAConfig(rank=4), None),
        "molora": (smore.MoLoRAConfig(num_experts=4, top_k=2, rank=2), None),
        "hydralora": (smore.HydraLoRAConfig(num_experts=3, rank=2), None),
        "mixlora": (smore.MixLoRAConfig(num_experts=4, top_k=2, rank=2), "masked"),
        "mixlora-grouped": (smore.MixLoRAConfig(num_experts=4, top_k=2, rank=2), "grouped"),
        "trex": (smore.TREXConfig(rank_in=2, rank_out=2), None),
        "smore-switch": (small_smore(init="normal"), "dense"),
        "smore-noisy": (small_smore(init="normal", gate="noisy_topk"), "dense"),
        "smore-dense-gate": (small_smore(init="normal", gate="dense"), "dense"),
        "smore-pool": (small_smore(init="normal", num_experts=3, ranks=2, shared_pool=True), "dense"),
        "smore-grouped": (small_smore(init="normal"), "grouped"),
    }


ADAPTER_CASES = tuple(_adapter_cases())
"""Names of the adapted-model cases :func:`adapted_tiny_llama` builds: every method, every S'MoRE gate, both expert
paths of the grouped methods."""


def adapted_tiny_llama(case: str, *, seed: int = 0, train: bool = True):
    """The tiny Llama adapted as ``case`` (one of :data:`ADAPTER_CASES`), B randomised so the adapters matter, T-REX's
    prior fitted; in training mode unless ``train=False``."""
    config, path = _adapter_cases()[case]
    model = smore.adapt(tiny_llama(seed), config)
    randomise(model, seed)
    if isinstance(config, smore.TREXConfig):
        smore.fit_prior(model, [tiny_batch(batch=4, seed=s) for s in range(2)])
    if path is not None:
        for module in model.modules():
            if hasattr(module, "expert_path"):
                module.expert_path = path
    return model.train(train)
