"""Injection into HF models, freezing, aux-loss collection, enable/disable, generate, checkpointing, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import smore
from helpers import small_smore, tiny_batch, tiny_llama
from smore.adapters.base import AdaptedLinear
from smore.compat import enable_checkpointing

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(num_key_value_heads=2, **SMALL), ["gate_proj", "up_proj", "down_proj"]),
    "mistral": (MistralForCausalLM, MistralConfig(num_key_value_heads=2, **SMALL), ["q_proj", "v_proj"]),
    "gemma": (GemmaForCausalLM, GemmaConfig(num_key_value_heads=2, head_dim=8, **SMALL), ["up_proj", "o_proj"]),
    "phi": (PhiForCausalLM, PhiConfig(**SMALL), ["fc1", "fc2"]),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4), ["mlp.c_fc", "mlp.c_proj"]),
}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_zero_init_leaves_logits_unchanged_and_freezes_base():
    model, batch = tiny_llama(), tiny_batch()
    before = logits(model, batch)
    smore.adapt(model, small_smore())
    assert torch.equal(logits(model, batch), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".delta." in n for n in trainable)
    wrapped = smore.adapted_modules(model)
    assert sorted(wrapped) == sorted(
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    )
    report = smore.summary(model)
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert "6 modules wrapped" in str(report) and f"{report.trainable:,}" in str(report)


def test_only_adapter_parameters_change_in_training():
    model, batch = tiny_llama(), tiny_batch()
    smore.adapt(model, small_smore(init="normal"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss  # CE + aux (aux_loss_in_output)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == param.requires_grad, name


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_adapts_and_starts_unchanged(arch):
    cls, config, targets = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = cls(config).eval()
    batch = tiny_batch()
    before = logits(model, batch)
    smore.adapt(model, small_smore(target_modules=targets))
    assert len(smore.adapted_modules(model)) == 2 * len(targets)
    assert torch.equal(logits(model, batch), before)
    for module in smore.adapted_modules(model).values():  # a non-zero W_proj must change the output
        torch.nn.init.normal_(module.delta.proj.weight)
    assert not torch.allclose(logits(model, batch), before)


def test_gpt2_conv1d_save_load(tmp_path):
    cls, config, targets = ARCHITECTURES["gpt2"]
    torch.manual_seed(0)
    model = smore.adapt(cls(config).eval(), small_smore(target_modules=targets, init="normal"))
    module = model.transformer.h[0].mlp.c_fc
    assert (module.in_features, module.out_features) == (32, 128)
    smore.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    reloaded = smore.load_adapter(cls(config).eval(), tmp_path)
    batch = tiny_batch()
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"gate": "noisy_topk", "top_k": [1, 2], "activation": "prelu"},
        {"gate": "dense", "activation_position": "child", "alpha": [4.0, 6.0]},
        {"shared_pool": True, "num_experts": [3, 3], "ranks": [2, 2], "activation": "tanh"},
        {"num_experts": [2, 2, 2], "top_k": [1, 2, 1], "ranks": [2, 2, 2], "router_dims": [4, 4, 4]},
    ],
)
def test_save_load_round_trip_gives_identical_logits(tmp_path, overrides):
    model, batch = tiny_llama(), tiny_batch()
    smore.adapt(model, small_smore(init="normal", **overrides))
    smore.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    document = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert document["method"] == "smore" and document["smore_version"] == smore.__version__
    reloaded = smore.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert reloaded.smore_state.config == model.smore_state.config
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    assert smore.summary(reloaded).trainable == smore.summary(model).trainable


def test_saved_file_holds_adapter_weights_only(tmp_path):
    from safetensors.torch import load_file

    model = smore.adapt(tiny_llama(), small_smore())
    smore.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in tensors.values()) == trainable
    wrapped = tuple(f"{name}." for name in smore.adapted_modules(model))
    assert all(key.startswith(wrapped) for key in tensors)


def test_loading_onto_a_mismatched_model_names_the_difference(tmp_path):
    smore.save_adapter(smore.adapt(tiny_llama(), small_smore()), tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj' is 48 -> 64, the adapter expects 32 -> 64"):
        smore.load_adapter(tiny_llama(hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj' is missing"):
        smore.load_adapter(tiny_llama(num_hidden_layers=1), tmp_path)


def test_corrupted_adapter_files_give_clear_errors(tmp_path):
    smore.save_adapter(smore.adapt(tiny_llama(), small_smore()), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors cannot be read"):
        smore.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        smore.load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        smore.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_weights_with_wrong_shapes_are_refused(tmp_path):
    model = smore.adapt(tiny_llama(), small_smore())
    smore.save_adapter(model, tmp_path)
    other = smore.adapt(tiny_llama(), small_smore(ranks=[2, 4]))
    state = smore.inject.adapter_state_dict(other)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="shape mismatches"):
        smore.load_adapter(tiny_llama(), tmp_path)


def test_target_selection_errors_and_filters():
    with pytest.raises(ValueError, match=r"matched no linear layer.*'gate_proj'.*'up_proj'"):
        smore.adapt(tiny_llama(), small_smore(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match=r"matched 'model\.layers\.0\.mlp', a LlamaMLP"):
        smore.adapt(tiny_llama(), small_smore(target_modules=["mlp"]))
    model = smore.adapt(tiny_llama(), small_smore(layers_to_transform=[1], exclude_modules=["down_proj"]))
    assert sorted(smore.adapted_modules(model)) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    model = smore.adapt(tiny_llama(), small_smore(target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"))
    assert sorted(smore.adapted_modules(model)) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    with pytest.raises(ValueError, match="already carries a smore adapter"):
        smore.adapt(model, small_smore())


def test_a_layer_index_the_model_lacks_is_out_of_range_not_a_filter_that_matches_nothing():
    for wanted in ([2], [0, 5]):  # the tiny Llama has layers 0 and 1; counting from 1 is the usual slip
        with pytest.raises(smore.UserError, match=r"out of range; this LlamaForCausalLM has 2 layers, indices 0 to 1"):
            smore.adapt(tiny_llama(), small_smore(layers_to_transform=wanted))
    with pytest.raises(smore.UserError, match=r"\[3, 4\] out of range"):
        smore.adapt(tiny_llama(num_hidden_layers=3), small_smore(layers_to_transform=[3, 0, 4]))


def test_disable_adapters_restores_base_and_aux_loss_reductions():
    model, batch = tiny_llama(), tiny_batch()
    base = logits(model, batch)
    smore.adapt(model, small_smore(init="normal"))
    adapted = logits(model, batch)
    assert not torch.allclose(adapted, base)
    with smore.disable_adapters(model):
        assert torch.equal(logits(model, batch), base)
    assert torch.equal(logits(model, batch), adapted)
    model(**batch)
    losses = [m.delta.aux_loss for m in smore.adapted_modules(model).values()]
    assert torch.allclose(smore.aux_loss(model), torch.stack(losses).sum())
    assert torch.allclose(smore.aux_loss(model, reduction="mean"), torch.stack(losses).mean())
    with pytest.raises(ValueError, match="reduction"):
        smore.aux_loss(model, reduction="max")


def test_generate_with_kv_cache_matches_no_cache():
    model = smore.adapt(tiny_llama(), small_smore(init="normal", gate="noisy_topk", top_k=[1, 2]))
    batch = tiny_batch(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)


def test_padding_mask_reaches_adapters_during_cached_decoding():
    model = smore.adapt(tiny_llama(), small_smore(init="normal"))
    seen = []
    module = model.model.layers[0].mlp.up_proj
    original = module.delta.forward

    def spy(x, valid=None, routing=None):
        seen.append(None if valid is None else valid.clone())
        return original(x, valid=valid, routing=routing)

    module.delta.forward = spy
    batch = tiny_batch(batch=2, length=5)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(seen[0], batch["attention_mask"].reshape(-1).bool())  # prefill: the padding is masked
    assert seen[1].shape == (2,) and seen[1].all()  # one decoded token per row, all real


def test_every_adapter_of_a_call_reads_that_calls_padding_mask():
    """The real-token mask is sliced once per model call and shared by its adapters, yet never outlives the call: a
    mask changed in place before the next call, or another mask set directly, is what the adapters see."""
    model = smore.adapt(tiny_llama(), small_smore(init="normal"))
    seen = {name: [] for name in ("up", "down")}
    for name in seen:
        module = getattr(model.model.layers[0].mlp, f"{name}_proj")

        def spy(x, valid=None, routing=None, original=module.delta.forward, name=name):
            seen[name].append(valid)
            return original(x, valid=valid, routing=routing)

        module.delta.forward = spy
    batch = tiny_batch(batch=2, length=5)
    mask = batch["attention_mask"]
    with torch.no_grad():
        model(**batch)
        assert seen["up"][-1] is seen["down"][-1]  # one slice for the whole call
        assert torch.equal(seen["up"][-1], mask.reshape(-1).bool())
        mask[0, :3] = 0  # the same tensor, changed in place: the next call sees the change
        model(**batch)
        assert torch.equal(seen["down"][-1], mask.reshape(-1).bool())
    context = model.model.layers[0].mlp.up_proj.context
    other = torch.ones_like(mask)
    context.mask = other  # set directly, without a model call
    assert torch.equal(context.valid_for(torch.Size([2, 5])), other.reshape(-1).bool())


@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
def test_gradient_checkpointing_gives_the_same_gradients(gate):
    def gradients(checkpointing: bool):
        model = smore.adapt(tiny_llama(), small_smore(init="normal", gate=gate, top_k=[1, 2]))
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        batch = tiny_batch()
        torch.manual_seed(7)  # the same noise for the noisy gate; checkpointing must replay it on recomputation
        loss = model(**batch, labels=batch["input_ids"], use_cache=False).loss  # CE + aux (aux_loss_in_output)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert plain[name] is not None and torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_adapter_takes_dtype_of_base_layer():
    model = tiny_llama().to(torch.bfloat16)
    smore.adapt(model, small_smore(init="normal"))
    module = model.model.layers[0].mlp.up_proj
    assert isinstance(module, AdaptedLinear)
    assert all(p.dtype == torch.bfloat16 for p in module.delta.parameters())
    out = model(**tiny_batch()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_failed_load_leaves_the_base_model_as_it_was(tmp_path):
    smore.save_adapter(smore.adapt(tiny_llama(), smore.LoRAConfig(target_modules=["q_proj"])), tmp_path)
    bigger, batch = tiny_llama(num_hidden_layers=3), tiny_batch()
    before = logits(bigger, batch)
    with pytest.raises(ValueError, match=r"saved for other modules.*model\.layers\.2\.self_attn\.q_proj"):
        smore.load_adapter(bigger, tmp_path)
    assert getattr(bigger, "smore_state", None) is None and not smore.adapted_modules(bigger)
    assert all(p.requires_grad for p in bigger.parameters())
    assert torch.equal(logits(bigger, batch), before)
    # weights that do not fit are found after wrapping: the wrapping is undone
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = tiny_llama()
    with pytest.raises(ValueError, match="shape mismatches"):
        smore.load_adapter(model, tmp_path)
    assert getattr(model, "smore_state", None) is None and all(p.requires_grad for p in model.parameters())


def test_remove_adapter_restores_the_base_model():
    model, batch = tiny_llama(), tiny_batch()
    before = logits(model, batch)
    model.lm_head.weight.requires_grad_(False)
    smore.adapt(model, small_smore(init="normal"))
    assert not torch.allclose(logits(model, batch), before)
    smore.remove_adapter(model)
    assert torch.equal(logits(model, batch), before) and not smore.adapted_modules(model)
    assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
    smore.adapt(model, small_smore())  # it can be adapted again


def test_damaged_module_list_in_the_config_is_named(tmp_path):
    smore.save_adapter(smore.adapt(tiny_llama(), small_smore()), tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    document["modules"] = ["model.layers.0.mlp.up_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"'modules' in .* must map module names"):
        smore.load_adapter(tiny_llama(), tmp_path)


def test_reentrant_checkpointing_is_refused_when_it_would_drop_the_aux_loss():
    # aux not in the output: the forward itself would refuse (tests/test_trainers.py), here smore.aux_loss does
    model = smore.adapt(tiny_llama(), small_smore(init="normal", balance_weight=0.5), aux_loss_in_output=False)
    enable_checkpointing(model, use_reentrant=True)
    model.train()
    batch = tiny_batch()
    model.model.embed_tokens.weight.requires_grad_(True)  # reentrant checkpointing needs an input with grad
    model(**batch, labels=batch["input_ids"], use_cache=False)
    with pytest.raises(ValueError, match="use_reentrant"):
        smore.aux_loss(model)


def test_adapter_dtype_keeps_adapters_in_float32_on_a_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    smore.adapt(model, small_smore(init="normal"), adapter_dtype=torch.float32)
    delta = model.model.layers[0].mlp.up_proj.delta
    assert all(p.dtype == torch.float32 for p in delta.parameters())
    out = model(**tiny_batch()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
