"""smore's LoRA against HF PEFT's: same weights, same outputs; adapters saved by one load in the other."""

from __future__ import annotations

import json

import pytest
import torch

import smore
from helpers import tiny_batch, tiny_llama
from smore.interop.peft import load_peft_lora, lora_config_from_peft, peft_lora_state_dict, save_peft_lora

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
LAYER_1_TARGETS = [
    "model.layers.1.mlp.down_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
]


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def smore_lora(rank=4, alpha=8, dropout=0.0, **overrides):
    """A tiny Llama with smore's LoRA whose B is random (A is random from its init)."""
    config = smore.LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, **{"target_modules": TARGETS, **overrides})
    model = smore.adapt(tiny_llama(), config)
    with torch.no_grad():
        for module in smore.adapted_modules(model).values():
            module.delta.lora_B.weight.normal_(std=0.3)
    return model


def peft_lora(rank=4, alpha=8, dropout=0.0, **overrides):
    """The same tiny Llama (same seed) with PEFT's LoRA, B random."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        task_type="CAUSAL_LM",
        **{"target_modules": TARGETS, **overrides},
    )
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return model


def peft_lora_layers(model) -> dict:
    """PEFT's LoRA layers by their name in the base model."""
    return {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def copy_into_peft(source, target) -> None:
    layers = peft_lora_layers(target)
    assert set(layers) == set(smore.adapted_modules(source))
    with torch.no_grad():
        for name, module in smore.adapted_modules(source).items():
            layers[name].lora_A["default"].weight.copy_(module.delta.lora_A.weight)
            layers[name].lora_B["default"].weight.copy_(module.delta.lora_B.weight)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_smore_lora_equals_peft_lora_with_the_same_weights(dropout):
    ours = smore_lora(dropout=dropout)
    theirs = peft_lora(dropout=dropout)
    copy_into_peft(ours, theirs)
    batch = tiny_batch()
    ours.eval(), theirs.eval()
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=1e-6, atol=1e-6)
    # In training the dropout masks come from the same random stream, so outputs and gradients agree too.
    ours.train(), theirs.train()
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(7)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    layers = peft_lora_layers(theirs)
    for name, module in smore.adapted_modules(ours).items():
        torch.testing.assert_close(module.delta.lora_A.weight.grad, layers[name].lora_A["default"].weight.grad)
        torch.testing.assert_close(module.delta.lora_B.weight.grad, layers[name].lora_B["default"].weight.grad)


@pytest.mark.parametrize(
    ("overrides", "expected_targets"),
    [
        ({}, sorted(TARGETS)),
        ({"layers_to_transform": [1]}, LAYER_1_TARGETS),
    ],
    ids=["suffixes", "full-names"],
)
def test_smore_saved_lora_loads_in_peft(tmp_path, overrides, expected_targets):
    ours = smore_lora(rank=3, alpha=5, dropout=0.05, **overrides)
    save_peft_lora(ours, tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert document["peft_type"] == "LORA" and document["task_type"] == "CAUSAL_LM"
    assert (document["r"], document["lora_alpha"], document["lora_dropout"]) == (3, 5, 0.05)
    assert document["bias"] == "none" and document["target_modules"] == expected_targets
    assert not list(tmp_path.glob("*.tmp"))
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert set(peft_lora_layers(theirs)) == set(smore.adapted_modules(ours))
    batch = tiny_batch()
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"layers_to_transform": [0]}, {"target_modules": r".*\.(q|v)_proj"}])
def test_peft_saved_lora_loads_in_smore(tmp_path, overrides):
    theirs = peft_lora(rank=2, alpha=6, dropout=0.1, **overrides)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_lora(tiny_llama(), tmp_path)
    config = ours.smore_state.config
    assert (config.method, config.rank, config.alpha, config.dropout) == ("lora", 2, 6, 0.1)
    assert set(smore.adapted_modules(ours)) == set(peft_lora_layers(theirs))
    theirs.eval()
    batch = tiny_batch()
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=1e-6, atol=1e-6)
    # ... and back again: the round trip keeps every weight
    for key, tensor in peft_lora_state_dict(ours).items():
        assert torch.equal(tensor, theirs.get_parameter(key.replace(".weight", ".default.weight")))


def test_peft_target_modules_none_fall_back_to_the_saved_modules(tmp_path):
    theirs = peft_lora()
    theirs.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    document = json.loads(config_file.read_text())
    document["target_modules"] = None  # PEFT's per-architecture default: the weights tell which modules
    config_file.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="target_modules"):
        lora_config_from_peft(document)
    ours = load_peft_lora(tiny_llama(), tmp_path)
    assert set(smore.adapted_modules(ours)) == set(peft_lora_layers(theirs))
    torch.testing.assert_close(logits(ours, tiny_batch()), logits(theirs.eval(), tiny_batch()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("use_dora", True),
        ("use_rslora", True),
        ("rank_pattern", {"up_proj": 2}),
        ("alpha_pattern", {"up_proj": 4}),
        ("bias", "lora_only"),
        ("lora_bias", True),
        ("modules_to_save", ["lm_head"]),
        ("trainable_token_indices", [1, 2]),
        ("peft_type", "IA3"),
        ("some_future_option", 0.5),
    ],
)
def test_unsupported_peft_options_are_refused(tmp_path, option, value):
    peft_lora().save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    document = json.loads(config_file.read_text())
    document[option] = value
    config_file.write_text(json.dumps(document))
    model = tiny_llama()
    with pytest.raises(ValueError, match=option):
        load_peft_lora(model, tmp_path)
    assert getattr(model, "smore_state", None) is None  # refused before the model is touched


def test_peft_lora_on_embeddings_is_refused(tmp_path):
    peft_lora(target_modules=["embed_tokens", "up_proj"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embedding"):
        load_peft_lora(tiny_llama(), tmp_path)


def test_peft_weights_of_another_shape_are_refused(tmp_path):
    peft_lora().save_pretrained(tmp_path)
    model = tiny_llama(intermediate_size=48)
    with pytest.raises(ValueError, match=r"up_proj\.lora_B"):
        load_peft_lora(model, tmp_path)
    assert getattr(model, "smore_state", None) is None


def test_save_peft_lora_refuses_other_methods(tmp_path):
    model = smore.adapt(tiny_llama(), smore.MoLoRAConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="molora"):
        save_peft_lora(model, tmp_path)
    with pytest.raises(ValueError, match="no smore adapter"):
        save_peft_lora(tiny_llama(), tmp_path)


def test_conv1d_lora_round_trips_through_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def tiny_gpt2():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        return GPT2LMHeadModel(config).eval()

    ours = smore.adapt(tiny_gpt2(), smore.LoRAConfig(rank=2, alpha=4, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for module in smore.adapted_modules(ours).values():
            module.delta.lora_B.weight.normal_(std=0.3)
    save_peft_lora(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    back = load_peft_lora(tiny_gpt2(), tmp_path)
    batch = {"input_ids": tiny_batch()["input_ids"]}
    expected = logits(ours, batch)
    torch.testing.assert_close(logits(theirs, batch), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(back, batch), expected, rtol=0, atol=0)


def test_pickled_peft_weights_need_an_explicit_flag(tmp_path):
    from peft import LoraConfig, get_peft_model

    from helpers import tiny_batch, tiny_llama
    from smore.interop.peft import load_peft_lora

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="pickle file, which can run code"):
        load_peft_lora(tiny_llama(), tmp_path)
    model = load_peft_lora(tiny_llama(), tmp_path, allow_pickle=True)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, peft_model(**batch).logits, atol=1e-6)


@pytest.mark.parametrize("save", ["save_adapter", "save_pretrained"])
def test_a_lora_saved_by_smore_loads_in_peft_as_it_is_and_back_in_smore_exactly(tmp_path, save):
    ours = smore_lora(rank=3, alpha=5, layers_to_transform=[1])
    smore.save_adapter(ours, tmp_path) if save == "save_adapter" else ours.save_pretrained(tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert document["peft_type"] == "LORA" and (document["r"], document["lora_alpha"]) == (3, 5)
    assert document["target_modules"] == LAYER_1_TARGETS and "method" not in document
    config, _ = smore.read_adapter_config(tmp_path)
    assert config == ours.smore_state.config  # smore's own config (layers_to_transform), not the PEFT rewrite
    batch = tiny_batch()
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), rtol=1e-6, atol=1e-6)
    back = smore.load_adapter(tiny_llama(), tmp_path)
    assert back.smore_state.config == ours.smore_state.config
    torch.testing.assert_close(logits(back, batch), logits(ours, batch), rtol=0, atol=0)
    smore.restore_adapter(smore_lora(rank=3, alpha=5, layers_to_transform=[1]), tmp_path)


def test_an_edited_r_in_a_smore_saved_peft_config_is_refused(tmp_path):
    smore.save_adapter(smore_lora(rank=3, alpha=5), tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    document["r"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    model = tiny_llama()
    with pytest.raises(smore.UserError, match="edited after saving"):
        smore.load_adapter(model, tmp_path)
    assert getattr(model, "smore_state", None) is None


def test_a_folder_peft_saved_loads_with_load_adapter(tmp_path):
    theirs = peft_lora()
    theirs.save_pretrained(tmp_path)
    config, _ = smore.read_adapter_config(tmp_path)
    assert (config.rank, config.alpha, sorted(config.target_modules)) == (4, 8, sorted(TARGETS))
    batch = tiny_batch()
    ours = smore.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=1e-6, atol=1e-6)
