"""The fast paths added for speed (issue 6) against readable references, outputs and gradients: S'MoRE's grouped
expert path (each expert computes only its own routed slots) for every gate and variant, the MixLoRA grouped path,
the Switch gate's top-k shortcut and the wrapper's cached adapter dtype. Timings are never asserted here.
"""

from __future__ import annotations

import pytest
import torch

import smore
from helpers import (
    D_IN,
    GATES,
    POSITIONS,
    assert_close,
    count_torch_calls,
    make_delta,
    randomise,
    randomize_biases_,
    readable_mixlora,
    tiny_llama,
)
from smore.adapters.base import AdaptedLinear
from smore.adapters.lora import LoRADelta
from smore.adapters.smore import build_smore
from smore.adapters.smore_reference import reference_forward
from smore.routing.gates import SwitchGate

F64 = torch.float64


def gradients(output: torch.Tensor, inputs: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad((output * upstream).sum(), inputs, allow_unused=True))


def assert_same_gradients(fast, slow, names, **tolerance) -> None:
    for name, g_fast, g_slow in zip(names, fast, slow):
        assert (g_fast is None) == (g_slow is None), name
        if g_fast is not None:
            assert_close(g_fast, g_slow, msg=lambda m, name=name: f"gradient of {name}: {m}", **tolerance)


# -- S'MoRE: grouped experts against the readable reference ---------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shared_pool", [False, True], ids=["own", "pool"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("gate", GATES)
def test_smore_grouped_path_matches_reference(gate, position, shared_pool, levels):
    num_experts = [2] * levels if gate == "dense" else ([3] * levels if shared_pool else [3, 4, 3][:levels])
    delta = make_delta(
        levels,
        num_experts=num_experts,
        top_k=[[2], [2, 1], [2, 1, 2]][levels - 1],
        gate=gate,
        activation="prelu",
        activation_position=position,
        shared_pool=shared_pool,
        alpha=[3.0, 5.0, 2.0][:levels],
    )
    randomize_biases_(delta)
    delta.expert_path = "grouped"
    delta.train()  # the noisy gate draws noise: the same seed gives both paths the same draw
    x = torch.randn(5, D_IN, dtype=F64, requires_grad=True)
    torch.manual_seed(7)
    fast = delta(x)
    torch.manual_seed(7)
    slow = reference_forward(delta, x, delta.router(x))
    assert fast.abs().max() > 1e-3
    assert_close(fast, slow)
    names = ["x", *(name for name, _ in delta.named_parameters())]
    params = [x, *delta.parameters()]
    upstream = torch.randn_like(fast)
    assert_same_gradients(gradients(fast, params, upstream), gradients(slow, params, upstream), names)


@pytest.mark.parametrize("gate", GATES)
def test_smore_sparse_config_takes_the_grouped_path_and_equals_the_dense_one(gate):
    """s = [16, 16], f = [2, 2]: 6 of 32 experts' rows per token, so the grouped path is chosen; both paths agree."""
    config = smore.SMoREConfig(
        num_experts=[16, 16], top_k=[2, 2], ranks=[2, 2], router_dims=[4, 4], down_proj_dim=4, gate=gate, init="normal"
    )
    torch.manual_seed(0)
    delta = build_smore(config, 12, 10).to(F64).train()
    assert delta.expert_path == ("dense" if gate == "dense" else "grouped")
    assert build_smore(smore.SMoREConfig(), 12, 10).expert_path == "dense"  # (4-4): 6 of 8 rows, dense pays
    x = torch.randn(40, 12, dtype=F64, requires_grad=True)
    params = [x, *delta.parameters()]
    names = ["x", *(name for name, _ in delta.named_parameters())]
    outputs, grads = {}, {}
    upstream = torch.randn(40, 10, dtype=F64)
    for path in ("dense", "grouped"):
        delta.expert_path = path
        torch.manual_seed(3)
        outputs[path] = delta(x)
        grads[path] = gradients(outputs[path], params, upstream)
    assert_close(outputs["grouped"], outputs["dense"])
    assert_same_gradients(grads["grouped"], grads["dense"], names)


@pytest.mark.parametrize("gate", GATES)
def test_smore_grouped_path_does_not_loop_over_tokens(gate):
    delta = make_delta(3, gate=gate).eval()
    delta.expert_path = "grouped"
    small, large = torch.randn(2, D_IN, dtype=F64), torch.randn(40, D_IN, dtype=F64)
    assert count_torch_calls(lambda: delta(small)) == count_torch_calls(lambda: delta(large))


# -- MixLoRA: grouped and masked paths against the readable loop ---------------------------------------------------
@pytest.mark.parametrize("expert_modules", [["gate_proj", "up_proj", "down_proj"], ["up_proj"], ["down_proj"]])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("path", ["grouped", "masked"])
def test_mixlora_paths_equal_readable_loop(path, top_k, expert_modules):
    config = smore.MixLoRAConfig(num_experts=4, top_k=top_k, rank=3, expert_modules=expert_modules)
    model = smore.adapt(tiny_llama(), config)
    randomise(model)
    module = model.model.layers[0].mlp
    module.delta.expert_path = path
    x = torch.randn(9, 32, requires_grad=True)
    fast = module(x.unsqueeze(0)).squeeze(0)
    slow = readable_mixlora(module, x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    params = [x, *(p for p in module.delta.parameters() if p.requires_grad)]
    upstream = torch.randn_like(fast)
    for a, b in zip(gradients(fast, params, upstream), gradients(slow, params, upstream)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_mixlora_auto_path_follows_the_token_count():
    model = smore.adapt(tiny_llama(), smore.MixLoRAConfig(num_experts=4, top_k=2, rank=3))
    randomise(model)
    module = model.model.layers[0].mlp
    x = torch.randn(1, 70, 32)  # enough tokens for the grouped path
    outputs = {}
    for path in ("auto", "grouped", "masked"):
        module.delta.expert_path = path
        with torch.no_grad():
            outputs[path] = module(x)
    torch.testing.assert_close(outputs["auto"], outputs["grouped"], atol=0, rtol=0)
    torch.testing.assert_close(outputs["grouped"], outputs["masked"], atol=1e-5, rtol=1e-5)


# -- gates and wrapper ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_gate_top_k_shortcut_equals_forced_selection(k):
    gate = SwitchGate(num_experts=5, top_k=k, balance_weight=0.01)
    logits = torch.randn(11, 5, requires_grad=True)
    free = gate(logits)
    forced = gate(logits, forced=free.indices)
    assert torch.equal(free.indices, forced.indices)
    torch.testing.assert_close(free.weights, forced.weights, atol=0, rtol=0)
    torch.testing.assert_close(free.aux_loss, forced.aux_loss, atol=0, rtol=0)
    grad_free = torch.autograd.grad(free.weights.sum() + free.aux_loss, logits)[0]
    grad_forced = torch.autograd.grad(forced.weights.sum() + forced.aux_loss, logits)[0]
    torch.testing.assert_close(grad_free, grad_forced)


def test_wrapper_dtype_follows_conversions_and_loads():
    base = torch.nn.Linear(6, 4)
    wrapper = AdaptedLinear(base, LoRADelta(in_features=6, out_features=4, rank=2, alpha=2.0))
    x = torch.randn(3, 6)
    assert wrapper(x).dtype == torch.float32 and wrapper.delta_dtype == torch.float32
    wrapper.to(F64)
    assert wrapper.delta_dtype == F64 and wrapper(x.to(F64)).dtype == F64
    state = {name: value.to(torch.float32) for name, value in wrapper.state_dict().items()}
    wrapper.load_state_dict(state, assign=True)  # new parameter objects, in float32
    assert wrapper.delta_dtype == torch.float32
    assert "_dtype_source" not in dict(wrapper.named_parameters())
