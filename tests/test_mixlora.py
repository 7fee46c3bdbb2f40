"""MixLoRA: equal to the ``mixlora`` package given the same weights, vectorised forward equal to a per-expert loop,
costs equal to the built modules, clear errors on unsupported models."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PhiConfig, PhiForCausalLM

import smore
from helpers import randomise, readable_mixlora, tiny_batch, tiny_llama
from smore.adapters.base import AdaptedFFN
from smore.adapters.mixlora import GROUPED_MIN_TOKENS, mixlora_flops_per_token, mixlora_parameter_counts
from smore.analysis.params import model_report


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def mixlora_weights(model, config: smore.MixLoRAConfig) -> dict[str, torch.Tensor]:
    """Our weights in the ``mixlora`` package's key layout (expert e owns block e of the stacked A and B)."""
    weights, r = {}, config.rank
    for name, module in smore.adapted_modules(model).items():
        layer = name.split(".")[2]
        if isinstance(module, AdaptedFFN):
            delta = module.delta
            weights[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = delta.router.weight.detach().clone()
            for proj in delta.lora_A:
                for e in range(config.num_experts):
                    prefix = f"mixlora.layers.{layer}.mlp.{proj}.experts.{e}"
                    weights[f"{prefix}.lora_A.weight"] = delta.lora_A[proj][e * r : (e + 1) * r].detach().clone()
                    weights[f"{prefix}.lora_B.weight"] = delta.lora_B[proj][:, e * r : (e + 1) * r].detach().clone()
        else:
            prefix = f"mixlora.layers.{layer}.self_attn.{name.rsplit('.', 1)[-1]}"
            weights[f"{prefix}.lora_A.weight"] = module.delta.lora_A.weight.detach().clone()
            weights[f"{prefix}.lora_B.weight"] = module.delta.lora_B.weight.detach().clone()
    return weights


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"top_k": 1, "attention_modules": ["q_proj", "v_proj"]},
        {"num_experts": 3, "top_k": 3, "expert_modules": ["up_proj", "down_proj"]},
    ],
)
def test_equals_the_mixlora_package_given_the_same_weights(overrides):
    mixlora = pytest.importorskip("mixlora")
    config = smore.MixLoRAConfig(**{"num_experts": 4, "top_k": 2, "rank": 4, "alpha": 8.0, **overrides})
    ours = smore.adapt(tiny_llama(), config)
    randomise(ours)
    theirs = tiny_llama()
    targets = list(config.expert_modules) + list(config.attention_modules or [])
    their_config = mixlora.MixLoraConfig.from_config(
        {
            "base_model_name_or_path": "tiny",
            "task_type": "CAUSAL_LM",
            "peft_type": "MIXLORA",
            "routing_strategy": "mixlora",
            "r": config.rank,
            "lora_alpha": int(config.alpha),
            "lora_dropout": 0.05,  # the package refuses 0; eval mode turns it off
            "target_modules": targets,
            "num_experts": config.num_experts,
            "top_k": config.top_k,
            "act_fn": "silu",
        }
    )
    their_config.adapter_name_ = "default"
    their_config.dtype_ = torch.float32
    mixlora.inject_adapter_in_model(theirs, their_config, mixlora_weights(ours, config))
    theirs.eval()
    for layer in theirs.model.layers:  # the package keeps its expert LoRAs in plain dicts, out of reach of .eval()
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    batch = tiny_batch()
    assert torch.allclose(logits(ours, batch), logits(theirs, batch), atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_vectorised_forward_equals_readable_loop(top_k):
    model = smore.adapt(tiny_llama(), smore.MixLoRAConfig(num_experts=4, top_k=top_k, rank=3))
    randomise(model)
    module = model.model.layers[0].mlp
    x = torch.randn(7, 32, requires_grad=True)
    fast = module(x.unsqueeze(0)).squeeze(0)
    slow = readable_mixlora(module, x)
    assert torch.allclose(fast, slow, atol=1e-5)
    params = [p for p in module.delta.parameters() if p.requires_grad]
    fast_grads = torch.autograd.grad(fast.square().sum(), [x, *params])
    slow_grads = torch.autograd.grad(slow.square().sum(), [x, *params])
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_zero_init_is_the_base_model_and_training_moves_only_the_adapter(tmp_path):
    model, batch = tiny_llama(), tiny_batch()
    base = logits(model, batch)
    smore.adapt(model, smore.MixLoRAConfig(num_experts=4, attention_modules=["q_proj"]))
    assert torch.allclose(logits(model, batch), base, atol=1e-6)
    assert sorted(smore.summary(model).kinds.values()) == ["Linear", "Linear", "LlamaMLP", "LlamaMLP"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss  # CE + aux (aux_loss_in_output)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.allclose(logits(model, batch), base)
    with smore.disable_adapters(model):
        assert torch.equal(logits(model, batch), base)
    smore.save_adapter(model, tmp_path)
    reloaded = smore.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


def test_aux_loss_is_the_switch_loss_with_coefficient_0_001():
    model = smore.adapt(tiny_llama(), smore.MixLoRAConfig(num_experts=4, top_k=2))
    batch = tiny_batch()
    module = model.model.layers[1].mlp
    captured = {}

    def capture(module, args, output):
        captured["x"] = args[0].reshape(-1, 32)

    module.register_forward_hook(capture)
    model(**batch)
    x = captured["x"][batch["attention_mask"].reshape(-1).bool()]  # padding is left out of the statistics
    probs = module.delta.router(x).softmax(-1)
    chosen = probs.topk(2).indices
    share = torch.stack([(chosen == e).sum() for e in range(4)]).float() / chosen.shape[0]  # HF Mixtral's: Σ = k
    expected = 0.001 * 4 * (share * probs.mean(0)).sum()
    assert torch.allclose(module.delta.aux_loss, expected)


def test_costs_equal_the_built_modules():
    config = smore.MixLoRAConfig(num_experts=4, top_k=2, rank=3, attention_modules=["q_proj", "v_proj"])
    report = model_report(tiny_llama(), config)
    model = smore.adapt(tiny_llama(), config)
    assert report.trainable == smore.summary(model).trainable
    block = model.model.layers[0].mlp
    assert mixlora_parameter_counts(config, 32, 64)["total"] == sum(p.numel() for p in block.delta.parameters())
    assert mixlora_parameter_counts(config, 32, 64)["total"] == 4 * 3 * 3 * (32 + 64) + 32 * 4  # SPEC §2
    for tokens, path in ((5, "masked"), (GROUPED_MIN_TOKENS, "grouped")):  # the path auto picks at each length
        x = torch.randn(tokens, 32)
        with torch.no_grad():
            base_counter, counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with base_counter:
                block.base_layer(x)
            with counter:
                block(x.unsqueeze(0))
        adapter_macs = (counter.get_total_flops() - base_counter.get_total_flops()) // 2
        assert adapter_macs == tokens * mixlora_flops_per_token(config, 32, 64, path=path)["total"], path


def test_unsupported_models_and_bad_configs_give_clear_errors():
    phi = PhiForCausalLM(
        PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match=r"matched 'model\.layers\.0\.mlp', a PhiMLP, which is not a gated MLP"):
        smore.adapt(phi, smore.MixLoRAConfig())
    with pytest.raises(ValueError, match="inside the MLP blocks"):
        smore.adapt(tiny_llama(), smore.MixLoRAConfig(attention_modules=["up_proj"]))
    with pytest.raises(ValueError, match="top_k=3 exceeds num_experts=2"):
        smore.MixLoRAConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="expert_modules"):
        smore.MixLoRAConfig(expert_modules=["q_proj"])


def test_exclude_modules_reaches_the_attention_lora():
    config = smore.MixLoRAConfig(num_experts=2, attention_modules=["q_proj", "v_proj"], exclude_modules=["q_proj"])
    model = smore.adapt(tiny_llama(), config)
    attention = [name for name in smore.adapted_modules(model) if "self_attn" in name]
    assert attention == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
