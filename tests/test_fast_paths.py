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
from smore.adapters import smore_decode
from smore.adapters.base import AdaptedLinear
from smore.adapters.lora import LoRADelta
from smore.adapters.smore import build_smore
from smore.adapters.smore_reference import reference_forward
from smore.routing.gates import DenseGate, SwitchGate

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
    delta = make_delta(3, gate=gate).train()  # training: eval without autograd takes the decode path
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


# -- S'MoRE: the decode path (eval, no autograd, few tokens) against the plain forward -----------------------------
def plain_forward(delta, x, valid=None):
    """The forward every other path takes, with the decode path switched off."""
    old, smore_decode.MAX_TOKENS = smore_decode.MAX_TOKENS, 0
    try:
        return delta(x, valid)
    finally:
        smore_decode.MAX_TOKENS = old


# The router rows are pushed through D (folded) when they are no more than d_down, else applied after it.
ROUTER_ROWS = pytest.mark.parametrize("down_proj_dim", [4, 64], ids=["router_after_D", "router_folded"])


@ROUTER_ROWS
@pytest.mark.parametrize("experts", ["block", "per_level"])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shared_pool", [False, True], ids=["own", "pool"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("gate", GATES)
def test_smore_decode_path_equals_plain_forward(gate, position, shared_pool, levels, experts, down_proj_dim):
    num_experts = [2] * levels if gate == "dense" else ([3] * levels if shared_pool else [3, 4, 3][:levels])
    delta = make_delta(
        levels,
        down_proj_dim=down_proj_dim,
        num_experts=num_experts,
        top_k=[[2], [2, 1], [2, 1, 2]][levels - 1],
        gate=gate,
        activation="prelu",
        activation_position=position,
        shared_pool=shared_pool,
        alpha=[3.0, 5.0, 2.0][:levels],
    )
    assert_decode_equals_plain(delta, block=experts == "block", paths=False)


def assert_decode_equals_plain(delta, block: bool, paths: bool) -> None:
    """The decode path in the given layouts against the plain forward: Δy, aux loss and the selection."""
    randomize_biases_(delta)
    delta.eval()
    x = torch.randn(6, D_IN, dtype=F64)
    valid = torch.tensor([True, True, False, True, True, True])  # padding counts in no statistic
    with torch.no_grad():
        delta.__dict__["_folded"] = smore_decode.fold(delta, block=block, paths=paths)
        folded = delta.__dict__["_folded"]
        assert (folded.paths is not None) == paths
        if delta.router.down_proj.out_features == 64:
            assert folded.router_weight is None, "the router rows were not folded into the token matmul"
        elif delta.num_levels > 1:  # at least 2 · 3 router rows, more than d_down = 4
            assert folded.router_weight is not None, "the router rows were folded into the token matmul"
        fast = delta(x, valid)
        assert "_aux_thunk" in delta.__dict__, "the decode path did not run"
        fast_aux, fast_selection = delta.aux_loss, delta.last_selection
        slow = plain_forward(delta, x, valid)
    assert fast.abs().max() > 1e-3
    assert_close(fast, slow)
    assert_close(fast_aux, delta.aux_loss)
    if not isinstance(delta.router.levels[0].gate, DenseGate):
        assert fast_aux > 0
    assert len(fast_selection.indices) == delta.num_levels
    for fast_indices, slow_indices in zip(fast_selection.indices, delta.last_selection.indices):
        assert torch.equal(fast_indices, slow_indices)


@ROUTER_ROWS
@pytest.mark.parametrize("experts", ["block", "per_level"])
@pytest.mark.parametrize("activation", ["prelu", "tanh", "identity"])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shared_pool", [False, True], ids=["own", "pool"])
@pytest.mark.parametrize("gate, top_k", [("dense", 3), ("switch", 1), ("switch", 2), ("noisy_topk", 2)])
def test_smore_decode_every_path_layout_equals_plain_forward(
    gate, top_k, shared_pool, levels, activation, experts, down_proj_dim
):
    """Routing every path of the tree, α = 0 off the selected ones, is the slot-by-slot forward."""
    delta = make_delta(
        levels,
        down_proj_dim=down_proj_dim,
        num_experts=[3] * levels,
        top_k=[top_k] * levels,
        router_dims=[4] * levels,
        gate=gate,
        activation=activation,
        shared_pool=shared_pool,
        alpha=[3.0, 5.0, 2.0][:levels],
    )
    assert_decode_equals_plain(delta, block=experts == "block", paths=True)  # forced: these shapes are tiny


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"num_experts": [4, 4]}, True),
        ({"num_experts": [3, 3], "gate": "noisy_topk"}, True),
        ({"num_experts": [3, 4]}, False),  # the rows of the levels would not stack
        ({"top_k": [2, 1]}, False),
        ({"router_dims": [32, 16]}, False),
        ({"activation_position": "child"}, False),  # α multiplies u, not σ(u + W x)
        ({"num_experts": [8, 8, 8]}, False),  # 512 leaves: more work than the slot-by-slot calls it saves
        ({"num_experts": [2] * 6, "top_k": [1] * 6}, False),  # 63 router rows: a block-diagonal router larger than A
        ({"router_activation": "prelu"}, False),  # a learnable slope per level
    ],
)
def test_smore_decode_takes_every_path_only_for_small_uniform_trees(overrides, expected):
    delta = build_smore(smore.SMoREConfig(**overrides), 576, 1536).eval()  # SmolLM2's up_proj
    assert smore_decode.use_paths(delta) == expected
    with torch.no_grad():
        delta(torch.randn(2, 576))
    assert (delta.__dict__["_folded"].paths is not None) == expected


def test_smore_decode_tables_follow_updates_loads_and_casts():
    delta = make_delta(2)
    randomize_biases_(delta)
    x = torch.randn(3, D_IN, dtype=F64)
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    for _ in range(2):  # an optimizer step changes the parameters in place
        delta.train()
        (delta(x).square().sum() + delta.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        delta.eval()
        with torch.no_grad():
            assert_close(delta(x), plain_forward(delta, x))
    other = make_delta(2, seed=5)
    randomize_biases_(other)
    delta.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_close(delta(x), other.eval()(x))
        delta.float()
        assert delta(x.float()).dtype == torch.float32
        torch.testing.assert_close(delta(x.float()), plain_forward(delta, x.float()))


def test_smore_decode_path_only_without_autograd_in_eval():
    delta = make_delta(2)
    x = torch.randn(3, D_IN, dtype=F64)
    for training, grad in ((True, False), (False, True), (True, True)):
        delta.train(training)
        with torch.set_grad_enabled(grad):
            delta(x)
        assert "_aux_thunk" not in delta.__dict__ and "_folded" not in delta.__dict__
    delta.eval()
    with torch.no_grad():
        delta(torch.randn(smore_decode.MAX_TOKENS + 1, D_IN, dtype=F64))  # prefill: the plain forward
        assert "_folded" not in delta.__dict__
        delta(x)
        assert "_folded" in delta.__dict__


@pytest.mark.parametrize("config", [smore.SMoREConfig(num_experts=[4, 4]), smore.SMoREConfig(gate="noisy_topk")])
def test_smore_decode_path_makes_fewer_torch_calls(config):
    delta = build_smore(config, 48, 64).eval()
    x = torch.randn(1, 48)
    with torch.no_grad():
        delta(x)  # builds the tables once
    fast = count_torch_calls(lambda: delta(x), attributes=False)
    slow = count_torch_calls(lambda: plain_forward(delta, x), attributes=False)
    assert fast <= 0.75 * slow, f"{fast} torch calls on the decode path, {slow} on the plain one"


def test_smore_decode_generation_and_labelled_loss_equal_the_plain_forward(monkeypatch):
    model = smore.adapt(tiny_llama(), smore.SMoREConfig(num_experts=[3, 3], top_k=[2, 1], init="normal"))
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        loss = model(input_ids=ids, labels=ids).loss
        monkeypatch.setattr(smore_decode, "MAX_TOKENS", 0)
        plain_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        plain_loss = model(input_ids=ids, labels=ids).loss
    assert torch.equal(tokens, plain_tokens)
    torch.testing.assert_close(loss, plain_loss)
