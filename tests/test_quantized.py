"""Quantized bases (QLoRA-style): every method adapts a bitsandbytes 4-bit (nf4) or 8-bit base, trains with the
base frozen and quantized, and reloads onto a freshly quantized base with identical outputs; ``smore train`` takes
a ``quantization`` key; the cost reports count a packed 4-bit weight as the weight it stands for.

bitsandbytes' CPU 4-bit kernel needs in_features of at least its block size (64), so the model here has hidden 64.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import smore
from helpers import COUNTING_WORDS, counting_records, small_smore, tiny_batch, tiny_llama, word_tokenizer
from smore.analysis.budget import propose_configs
from smore.analysis.params import model_report
from smore.training import train
from smore.training.config import run_config_from_dict

try:
    import bitsandbytes as bnb
except ImportError:  # the tests that quantize are skipped; the one about the missing package still runs
    bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (pip install bitsandbytes)")

SHAPES = dict(hidden_size=64, intermediate_size=128)
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATION = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": dict(load_in_8bit=True),
}
LAYER_CLASS = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}
STORAGE = {"4bit": torch.uint8, "8bit": torch.int8}
CONFIGS = {
    "smore": lambda: small_smore(target_modules=TARGETS),
    "lora": lambda: smore.LoRAConfig(rank=4, target_modules=TARGETS),
    "molora": lambda: smore.MoLoRAConfig(rank=3, num_experts=4, top_k=2, target_modules=TARGETS),
    "hydralora": lambda: smore.HydraLoRAConfig(rank=3, num_experts=3, target_modules=TARGETS),
    "mixlora": lambda: smore.MixLoRAConfig(num_experts=4, top_k=2, rank=3, attention_modules=["q_proj"]),
    "trex": lambda: smore.TREXConfig(rank_in=2, rank_out=3),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized") / "model"
    tiny_llama(**SHAPES).save_pretrained(path)
    return path


def quantized(folder, kind: str):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**QUANTIZATION[kind]))


def prompts():
    return [tiny_batch(batch=4, length=8, seed=i) for i in range(4)]


def adapted(folder, kind: str, method: str, **options):
    model = smore.adapt(quantized(folder, kind), CONFIGS[method](), **options)
    if method == "trex":
        smore.fit_prior(model, prompts())  # runs the frozen quantized base, adapters off
    return model


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def train_steps(model, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = tiny_batch()
    model.train()
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()  # CE + aux (aux_loss_in_output)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("kind", sorted(QUANTIZATION))
@pytest.mark.parametrize("method", sorted(CONFIGS))
@needs_bnb
def test_every_method_trains_on_a_quantized_base_and_reloads_onto_a_fresh_one(folder, tmp_path, kind, method):
    model = adapted(folder, kind, method)
    wrapped = smore.adapted_modules(model)
    bases = [m for w in wrapped.values() for m in w.base_layer.modules() if isinstance(m, torch.nn.Linear)]
    assert bases and all(type(m).__name__ == LAYER_CLASS[kind] and m.weight.dtype == STORAGE[kind] for m in bases)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".delta." in name and p.dtype == torch.float32 for name, p in trainable.items())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    train_steps(model)
    assert any(not torch.equal(p, before[name]) for name, p in trainable.items())
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    batch = tiny_batch()
    expected = logits(model, batch)
    smore.save_adapter(model, tmp_path)
    loaded = smore.load_adapter(quantized(folder, kind), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


@needs_bnb
def test_adapters_may_be_bf16_on_a_quantized_base(folder):
    model = smore.adapt(quantized(folder, "4bit"), CONFIGS["smore"](), adapter_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    train_steps(model, steps=2)
    assert torch.isfinite(logits(model, tiny_batch())).all()


@pytest.mark.parametrize("kind", sorted(QUANTIZATION))
@needs_bnb
def test_mixlora_at_init_computes_the_quantized_ffn(folder, kind):
    """MixLoRA runs the frozen projections itself: its input must reach them as floats, not cast to the storage
    dtype of the quantized weight (uint8 rounds the activations; int8 fails in bitsandbytes)."""
    batch = tiny_batch()
    model = smore.adapt(quantized(folder, kind), smore.MixLoRAConfig(num_experts=4, top_k=2, rank=3))
    with smore.disable_adapters(model):
        expected = logits(model, batch)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-4, atol=1e-4)


@needs_bnb
def test_an_eval_forward_leaves_the_gradients_through_4bit_layers_intact(folder):
    """bitsandbytes repacks a 4-bit weight for a CPU kernel without backward at its first eval forward without
    gradients (a held-out loss, T-REX's prior); the adapters below would then get no gradient through it."""

    def first_layer_gradients(eval_first: bool, before_adapt: bool = False) -> torch.Tensor:
        torch.manual_seed(0)
        model = quantized(folder, "4bit")
        if before_adapt:  # the base already repacked when it is adapted
            logits(model, tiny_batch())
        model = smore.adapt(model, smore.LoRAConfig(rank=4, target_modules=["q_proj"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.1)
        batch = tiny_batch()
        if eval_first:
            logits(model.eval(), batch)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        delta = model.model.layers[0].self_attn.q_proj.delta
        assert all(p.grad is not None for p in delta.parameters())
        return torch.cat([p.grad.flatten() for p in delta.parameters()])

    expected = first_layer_gradients(False)
    torch.testing.assert_close(first_layer_gradients(True), expected)
    # Repacked before adapt: the gradient flows again, through weights whose scales bitsandbytes' repacking rounded
    # to bf16 (its inverse is not exact), so it is close to the other one, not equal.
    repacked = first_layer_gradients(False, before_adapt=True)
    assert torch.nn.functional.cosine_similarity(repacked, expected, dim=0) > 0.99


@needs_bnb
def test_cost_reports_and_the_budget_tool_read_quantized_layers_as_their_full_shapes(folder):
    full, packed = tiny_llama(**SHAPES), quantized(folder, "4bit")
    config = CONFIGS["smore"]()
    assert model_report(packed, config).to_dict() == model_report(full, config).to_dict()
    assert [row.to_dict() for row in propose_configs(packed, 20_000, methods=["lora", "smore"])] == [
        row.to_dict() for row in propose_configs(full, 20_000, methods=["lora", "smore"])
    ]
    assert smore.summary(smore.adapt(packed, config)).total == smore.summary(smore.adapt(full, config)).total


# -- smore train ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized-train")
    tokenizer = word_tokenizer(COUNTING_WORDS)
    model = tiny_llama(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3, **SHAPES)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in counting_records(16)))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in counting_records(4)))
    return root


def run_document(workspace, output, method: str, quantization) -> dict:
    adapters = {"smore": {"method": "smore", "num_experts": [2, 2], "top_k": [1, 1], "ranks": [2, 2]}}
    adapters["trex"] = {"method": "trex", "rank_in": 2, "rank_out": 2, "target_modules": ["up_proj", "down_proj"]}
    return {
        "model": str(workspace / "model"),
        "output_dir": str(output),
        "adapter": adapters[method],
        "data": {
            "train_file": str(workspace / "train.jsonl"),
            "eval_file": str(workspace / "eval.jsonl"),
            "max_length": 48,
        },
        "train": {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 4, "eval_every": 1, "log_every": 1},
        "quantization": quantization,
    }


@pytest.mark.parametrize("method", ["smore", "trex"])
@needs_bnb
def test_smore_train_quantizes_the_base_from_its_config_key(workspace, tmp_path, method):
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    config = run_config_from_dict(run_document(workspace, tmp_path / "run", method, quantization))
    assert config.to_dict()["quantization"] == quantization
    result = train(config)
    assert result.steps == 3
    loaded = smore.load_adapter(quantized(workspace / "model", "4bit"), tmp_path / "run" / "adapter")
    assert type(loaded.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"


def test_quantization_null_is_the_full_precision_base_and_leaves_the_saved_config_as_before(workspace, tmp_path):
    config = run_config_from_dict(run_document(workspace, tmp_path / "run", "smore", None))
    assert config.quantization is None and "quantization" not in config.to_dict()


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"load_in_4bit": True, "bits": 4}, "quantization.bits"),
        ({"bnb_4bit_quant_type": "nf4"}, "exactly one of load_in_4bit"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "exactly one of load_in_4bit"),
        ("4bit", "must be a mapping"),
    ],
)
def test_bad_quantization_keys_are_refused_with_the_key_named(workspace, tmp_path, quantization, message):
    with pytest.raises(smore.UserError, match=message):
        run_config_from_dict(run_document(workspace, tmp_path / "run", "smore", quantization))


def test_quantization_without_bitsandbytes_names_the_install_command(workspace, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(smore.UserError, match="pip install bitsandbytes"):
        run_config_from_dict(run_document(workspace, tmp_path / "run", "smore", {"load_in_8bit": True}))
