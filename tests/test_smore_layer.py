"""The S'MoRE layer against SPEC §1: the vectorised forward against the readable reference (outputs and gradients),
the initialisations of §1.5, LoRA as the one-expert case (also against HF PEFT), Proposition 3.2 before and after
training, the variants of §1.4, gradient coverage and a guard that the forward never loops over tokens.

Everything runs in float64 on tiny shapes, seeded, so equalities hold to ~1e-12.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import smore
from helpers import (
    D_IN,
    D_OUT,
    F64,
    GATES,
    POSITIONS,
    assert_close,
    count_torch_calls,
    make_config,
    make_delta,
    randomize_biases_,
)
from smore.adapters.smore import SMoREConfig, SMoREDelta, build_smore
from smore.adapters.smore_reference import reference_forward, reference_route
from smore.routing.types import TreeRouting

ACTIVATIONS = ("identity", "tanh", "relu", "prelu")


# -- fast path against the reference ------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [None, [3.0, 5.0, 2.0]], ids=["gamma1", "alpha"])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shared_pool", [False, True], ids=["own", "pool"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
def test_fast_forward_and_gradients_match_reference(gate, activation, position, shared_pool, levels, alpha):
    # the reference is slow (one token, one node at a time): keep the trees small, the dense one smallest
    num_experts = [2] * levels if gate == "dense" else ([3] * levels if shared_pool else [3, 4, 3][:levels])
    delta = make_delta(
        levels,
        num_experts=num_experts,
        top_k=[[2], [2, 2], [2, 1, 2]][levels - 1],
        gate=gate,
        activation=activation,
        activation_position=position,
        shared_pool=shared_pool,
        alpha=None if alpha is None else alpha[:levels],
    )
    randomize_biases_(delta)
    delta.train()  # the noisy gate draws noise: the same seed gives both paths the same draw
    x = torch.randn(3, D_IN, dtype=F64, requires_grad=True)

    torch.manual_seed(7)
    fast = delta(x)  # routes with its own router
    torch.manual_seed(7)
    slow = reference_forward(delta, x, delta.router(x))

    assert fast.shape == (3, D_OUT)
    assert fast.abs().max() > 1e-3  # init="normal": a non-trivial output
    assert_close(fast, slow)

    names = ["x", *(name for name, _ in delta.named_parameters())]
    params = [x, *delta.parameters()]
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), params, allow_unused=True)
    grads_slow = torch.autograd.grad((slow * weights).sum(), params, allow_unused=True)
    for name, g_fast, g_slow in zip(names, grads_fast, grads_slow):
        assert (g_fast is None) == (g_slow is None), name
        if g_fast is not None:
            assert_close(g_fast, g_slow, msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert grads_fast[0].abs().max() > 0  # the input gradient is not trivially zero


ROUTER_SHAPES = [  # (num_experts, top_k), bottom first; k = 1 exercises the raw-logit weights of the noisy gate
    ([4], [1]),
    ([4], [3]),
    ([3, 4], [2, 1]),
    ([3, 4], [1, 3]),
    ([3, 4, 3], [2, 1, 2]),
]


@pytest.mark.parametrize(("num_experts", "top_k"), ROUTER_SHAPES)
@pytest.mark.parametrize("gate", GATES)
def test_batched_router_matches_reference_route(gate, num_experts, top_k):
    levels = len(num_experts)
    config = make_config(levels, num_experts=num_experts, top_k=top_k, ranks=[2] * levels, gate=gate)
    delta = build_smore(config, D_IN, D_OUT).to(F64).eval()
    x = torch.randn(6, D_IN, dtype=F64)
    fast, slow = delta.router(x), reference_route(delta, x)
    for level in range(levels):
        assert fast.indices[level].shape == (6, config.slots[level])
        assert torch.equal(fast.indices[level], slow.indices[level]), level
        assert_close(fast.weights[level], slow.weights[level])
    # and the weights carry the same gradients to the router parameters
    params = list(delta.router.parameters())
    g = [torch.randn_like(w) for w in fast.weights]
    loss_fast = sum((w * gi).sum() for w, gi in zip(fast.weights, g))
    loss_slow = sum((w * gi).sum() for w, gi in zip(slow.weights, g))
    grads_fast = torch.autograd.grad(loss_fast, params, allow_unused=True)
    grads_slow = torch.autograd.grad(loss_slow, params, allow_unused=True)
    for a, b in zip(grads_fast, grads_slow):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


def test_sigma_is_the_configured_activation_with_per_level_prelu_slopes():
    t = torch.linspace(-2, 2, 9, dtype=F64)
    expected = {"identity": t, "tanh": torch.tanh(t), "relu": t.clamp(min=0)}
    for activation, value in expected.items():
        delta = make_delta(3, activation=activation)
        for level in range(3):
            assert_close(delta.sigma(t, level), value)
    delta = make_delta(3, activation="prelu", prelu_init=0.3)
    assert delta.prelu_slopes.shape == (3,)
    assert_close(delta.prelu_slopes.detach(), torch.full((3,), 0.3, dtype=F64), atol=1e-7, rtol=0)
    with torch.no_grad():
        delta.prelu_slopes.copy_(torch.tensor([0.1, 0.2, 0.4], dtype=F64))
    for level, slope in enumerate([0.1, 0.2, 0.4]):
        assert_close(delta.sigma(t, level), torch.where(t > 0, t, slope * t))


# -- initialisation (SPEC §1.5) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_pool", [False, True], ids=["own", "pool"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("init", ["w_final_zero", "eq_1_layer"])
def test_identity_inits_give_exactly_zero(init, activation, shared_pool):
    delta = make_delta(3, init=init, activation=activation, shared_pool=shared_pool)
    out = delta(torch.randn(8, D_IN, dtype=F64))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)  # σ(0) = 0 for all four
@pytest.mark.parametrize("init", ["b_zero", "bw_zero"])
def test_zero_b_inits_give_zero_when_sigma_of_zero_is_zero(init, activation, position):
    delta = make_delta(3, init=init, activation=activation, activation_position=position)
    assert delta.proj.weight.abs().sum() > 0  # the zero comes from B (and W), not from W_proj
    out = delta(torch.randn(8, D_IN, dtype=F64))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_normal_init_gives_nonzero_output(activation, position):
    delta = make_delta(3, init="normal", activation=activation, activation_position=position)
    assert delta(torch.randn(8, D_IN, dtype=F64)).abs().max() > 1e-3


@pytest.mark.parametrize("init", ["normal", "b_zero", "bw_zero", "w_final_zero", "eq_1_layer"])
def test_init_table(init):
    """SPEC §1.5: A ~ U(±1/√d), biases 0, keys U(0, 1), and B / W_ℓ / W_proj as the table says."""
    config = make_config(3, init=init)
    delta = build_smore(config, D_IN, D_OUT).to(F64)
    widths = config.widths
    assert delta.A.shape == (widths[-1], D_IN)
    assert delta.A.abs().max() <= 1 / math.sqrt(D_IN) and delta.A.abs().max() > 0
    biases = [delta.A_bias, *delta.B_bias, *(w.bias for w in delta.W), delta.proj.bias]
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    for level_router in delta.router.levels:
        assert level_router.keys.min() >= 0 and level_router.keys.max() < 1
    for level, b in enumerate(delta.B):
        s, r = config.num_experts[level], config.ranks[level]
        assert b.shape == (s, widths[level + 1], r)
        if init in ("normal", "w_final_zero"):
            assert 0 < b.abs().max() <= 1 / math.sqrt(r)
        elif init == "eq_1_layer":
            expected = torch.zeros_like(b)
            for i in range(s):
                expected[i, i * r : (i + 1) * r] = torch.eye(r, dtype=F64)
            assert torch.equal(b, expected)
        else:
            assert torch.count_nonzero(b) == 0
    for level, w in enumerate(delta.W, start=1):
        assert w.weight.shape == (widths[level + 1], widths[level])
        if init == "bw_zero":
            assert torch.count_nonzero(w.weight) == 0
        elif init == "eq_1_layer":
            expected = torch.zeros_like(w.weight)
            expected[widths[level + 1] - widths[level] :] = torch.eye(widths[level], dtype=F64)
            assert torch.equal(w.weight, expected)
        else:
            assert 0 < w.weight.abs().max() <= 1 / math.sqrt(widths[level])
    if init in ("w_final_zero", "eq_1_layer"):
        assert torch.count_nonzero(delta.proj.weight) == 0
    else:
        assert 0 < delta.proj.weight.abs().max() <= 1 / math.sqrt(widths[-1])


# -- one level, one expert, top-1, identity σ: LoRA ---------------------------------------------------------------
def one_expert_config(rank: int, alpha: float | None, gate: str = "switch", **overrides) -> SMoREConfig:
    return SMoREConfig(
        num_experts=[1],
        top_k=[1],
        ranks=[rank],
        alpha=None if alpha is None else [alpha],
        router_dims=[4],
        down_proj_dim=4,
        activation="identity",
        gate=gate,
        init="normal",
        **overrides,
    )


@pytest.mark.parametrize("alpha", [None, 8.0])
@pytest.mark.parametrize("gate", ["switch", "dense"])
def test_one_expert_is_lora(gate, alpha):
    rank = 3
    delta = build_smore(one_expert_config(rank, alpha, gate), D_IN, D_OUT).to(F64)
    gamma = 1.0 if alpha is None else alpha / rank
    x = torch.randn(7, D_IN, dtype=F64)
    routing = delta.router(x)
    assert torch.equal(routing.weights[0], torch.ones(7, 1, dtype=F64))  # one expert: α = 1
    # biases 0 at init: Δy = γ (W_proj B) A x, a LoRA with A_eff = A and B_eff = W_proj B
    lora_b = delta.proj.weight @ delta.B[0][0]  # (d_out, r)
    assert_close(delta(x), gamma * x @ (lora_b @ delta.A).t())
    # with biases: Δy = γ W_proj (B (A x + a) + b) + p
    randomize_biases_(delta)
    hidden = x @ delta.A.t() + delta.A_bias
    expected = gamma * (hidden @ delta.B[0][0].t() + delta.B_bias[0][0]) @ delta.proj.weight.t() + delta.proj.bias
    assert_close(delta(x), expected)


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D_IN, 8)
        self.down = nn.Linear(8, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("alpha", [None, 6.0])
def test_one_expert_matches_peft_lora(alpha):
    peft = pytest.importorskip("peft")
    rank = 3
    torch.manual_seed(0)
    base = _TwoLinear().to(F64)
    ours = smore.adapt(copy.deepcopy(base), one_expert_config(rank, alpha, target_modules=["up", "down"]))
    # Mapping: PEFT computes base(x) + (lora_alpha / r) · lora_B(lora_A(x)). Our adapter with one level, one expert,
    # top-1 (α = 1), identity σ and zero biases computes base(x) + γ · W_proj B A x with γ = alpha / r (γ = 1 when
    # alpha is None). So lora_A = A, lora_B = W_proj @ B and lora_alpha = alpha (= r when alpha is None).
    lora_alpha = rank if alpha is None else alpha
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["up", "down"])
    ).to(F64)
    adapted = smore.adapted_modules(ours)
    assert set(adapted) == {"up", "down"}
    with torch.no_grad():
        for name, module in adapted.items():
            delta = module.delta
            assert all(torch.count_nonzero(b) == 0 for b in (delta.A_bias, delta.B_bias[0], delta.proj.bias))
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(delta.A)
            peft_layer.lora_B["default"].weight.copy_(delta.proj.weight @ delta.B[0][0])
    theirs.eval()
    ours.eval()
    x = torch.randn(9, D_IN, dtype=F64)
    with torch.no_grad():
        expected, actual, plain = theirs(x), ours(x), base(x)
    assert (expected - plain).abs().max() > 1e-3  # the LoRA does act
    assert_close(actual, expected)


# -- Proposition 3.2 ----------------------------------------------------------------------------------------------
PROP_CONFIGS = {  # levels → (num_experts, top_k, ranks, alpha); top_k[ℓ+1] ≥ 2 makes some child picked twice
    2: ([3, 2], [2, 2], [2, 3], [2.0, 6.0]),
    3: ([3, 2, 2], [2, 2, 2], [2, 3, 1], [2.0, 6.0, 1.0]),
}


def prop_delta(levels: int, gate: str) -> tuple[SMoREConfig, SMoREDelta]:
    num_experts, top_k, ranks, alpha = PROP_CONFIGS[levels]
    config = SMoREConfig(
        num_experts=num_experts,
        top_k=top_k,
        ranks=ranks,
        alpha=alpha,
        router_dims=[4] * levels,
        down_proj_dim=4,
        gate=gate,
        activation="identity",
        init="eq_1_layer",
    )
    torch.manual_seed(3)
    delta = build_smore(config, D_IN, D_OUT).to(F64)
    with torch.no_grad():  # W_proj is 0 at init: give it values, or every statement is 0 = 0
        delta.proj.weight.normal_()
        delta.proj.bias.normal_()
    return config, delta


def path_products(config: SMoREConfig, routing: TreeRouting) -> list[torch.Tensor]:
    """π_ℓ (N, F_ℓ): product of α along the path from the root to each slot; the parent of slot t is t // f_ℓ."""
    fanouts, levels = config.fanouts, config.num_levels
    tokens = routing.weights[0].shape[0]
    products: list[torch.Tensor] = [None] * levels
    for level in reversed(range(levels)):
        rows = []
        for n in range(tokens):
            row = []
            for slot in range(config.slots[level]):
                parent = 1.0 if level == levels - 1 else products[level + 1][n, slot // fanouts[level]]
                row.append(routing.weights[level][n, slot] * parent)
            rows.append(torch.stack(row))
        products[level] = torch.stack(rows)
    return products


def a_rows(config: SMoREConfig, level: int, expert: int) -> slice:
    """Rows of A_i^ℓ in the stacked A: levels bottom first, experts in order."""
    start = sum(s * r for s, r in zip(config.num_experts[:level], config.ranks[:level])) + expert * config.ranks[level]
    return slice(start, start + config.ranks[level])


def proj_columns(config: SMoREConfig, level: int, expert: int) -> slice:
    """Columns of W_proj that expert (ℓ, i) writes to under eq_1_layer: Σ_{j>ℓ} s_j r_j + i r_ℓ."""
    start = sum(s * r for s, r in zip(config.num_experts[level + 1 :], config.ranks[level + 1 :]))
    start += expert * config.ranks[level]
    return slice(start, start + config.ranks[level])


def carry_to_output(delta: SMoREDelta, level: int) -> torch.Tensor:
    """M_ℓ = W_proj W_{L-1} ⋯ W_{ℓ+1}: what a message written at level ℓ goes through to reach the output."""
    matrix = delta.proj.weight
    for above in reversed(range(level + 1, delta.num_levels)):
        matrix = matrix @ delta.W[above - 1].weight
    return matrix


def mixture_coefficients(config: SMoREConfig, routing: TreeRouting) -> list[torch.Tensor]:
    """c_ℓ (N, s_ℓ): path products accumulated per (level, expert); a child picked by two parents counts twice."""
    products = path_products(config, routing)
    coefficients = []
    for level in range(config.num_levels):
        c = torch.zeros(products[level].shape[0], config.num_experts[level], dtype=F64)
        c.scatter_add_(1, routing.indices[level], products[level])
        coefficients.append(c)
    return coefficients


def one_layer_mixture_at_init(config, delta, x, routing) -> torch.Tensor:
    """Σ_{ℓ,i} c_ℓ,i · γ_ℓ W_proj[:, block(ℓ,i)] (A_i^ℓ x + a_i^ℓ) + p: a flat mixture of Σ s_ℓ LoRA experts."""
    coefficients = mixture_coefficients(config, routing)
    out = delta.proj.bias.expand(x.shape[0], -1).clone()
    for level in range(config.num_levels):
        gamma = config.scalings[level]
        for i in range(config.num_experts[level]):
            rows = a_rows(config, level, i)
            lora_b = gamma * delta.proj.weight[:, proj_columns(config, level, i)]
            lora = (x @ delta.A[rows].t() + delta.A_bias[rows]) @ lora_b.t()  # (N, d_out)
            out = out + coefficients[level][:, i : i + 1] * lora
    return out


def per_path_sum(config, delta, x, routing) -> torch.Tensor:
    """The generalised statement for identity σ, one term per path (routing slot):

    Δy = p + Σ_ℓ Σ_slots π · M_ℓ (γ_ℓ (B_i (A_i x + a_i) + b_i) + [ℓ ≥ 1] w_ℓ),   M_ℓ = W_proj W_{L-1} ⋯ W_{ℓ+1},

    i.e. expert (ℓ, i) is a LoRA with B_eff = γ_ℓ M_ℓ B_i^ℓ and a per-path bias.
    """
    products = path_products(config, routing)
    pool = (lambda level: 0) if config.shared_pool else (lambda level: level)
    outputs = []
    for n in range(x.shape[0]):
        total = delta.proj.bias.clone()
        for level in range(config.num_levels):
            carry, gamma = carry_to_output(delta, level), config.scalings[level]
            for slot in range(config.slots[level]):
                i = int(routing.indices[level][n, slot])
                rows = a_rows(config, level, i)
                b_eff = gamma * carry @ delta.B[pool(level)][i]
                bias = carry @ (gamma * delta.B_bias[pool(level)][i] + (delta.W[level - 1].bias if level else 0.0))
                total = total + products[level][n, slot] * (b_eff @ (delta.A[rows] @ x[n] + delta.A_bias[rows]) + bias)
        outputs.append(total)
    return torch.stack(outputs)


@pytest.mark.parametrize("gate", ["switch", "dense"])
@pytest.mark.parametrize("levels", [2, 3])
def test_proposition_3_2_eq_1_layer_is_a_one_layer_mixture(levels, gate):
    config, delta = prop_delta(levels, gate)
    x = torch.randn(5, D_IN, dtype=F64)
    with torch.no_grad():
        routing = delta.router(x)
        coefficients = mixture_coefficients(config, routing)
        # the case "a child picked by two parents" does occur here (pigeonhole), so the double count is tested
        level0 = routing.indices[0]
        assert any(len(set(row.tolist())) < len(row) for row in level0)
        assert_close(delta(x, routing=routing), one_layer_mixture_at_init(config, delta, x, routing))
        assert_close(delta(x, routing=routing), per_path_sum(config, delta, x, routing))
        # at init B_eff = γ M_ℓ B_i^ℓ reduces to the column block of W_proj
        for level in range(levels):
            carry = carry_to_output(delta, level)
            for i in range(config.num_experts[level]):
                assert_close(carry @ delta.B[level][i], delta.proj.weight[:, proj_columns(config, level, i)])
        assert all(c.sum() > 0 for c in coefficients)

    # train a few steps; σ stays the identity, biases, B, W_ℓ and W_proj all move
    before = {name: p.detach().clone() for name, p in delta.named_parameters()}
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.05)
    target = torch.randn(16, D_OUT, dtype=F64)
    inputs = torch.randn(16, D_IN, dtype=F64)
    delta.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss = (delta(inputs) - target).pow(2).mean() + delta.aux_loss
        loss.backward()
        optimizer.step()
    delta.eval()
    for name in ("A_bias", "B.0", "B_bias.0", "W.0.weight", "W.0.bias", "proj.weight"):
        assert not torch.equal(before[name], dict(delta.named_parameters())[name]), name

    with torch.no_grad():
        routing = delta.router(x)
        actual = delta(x, routing=routing)
        assert_close(actual, per_path_sum(config, delta, x, routing))
        # the plain column-block mixture no longer describes the trained layer: the generalisation is needed
        assert not torch.allclose(actual, one_layer_mixture_at_init(config, delta, x, routing), atol=1e-6)


# -- variants (SPEC §1.4) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_pool", [False, True], ids=["own", "pool"])
@pytest.mark.parametrize("levels", [2, 3])
def test_positions_all_and_child_v2_agree_for_identity_sigma(levels, shared_pool):
    deltas = {
        position: make_delta(levels, activation="identity", activation_position=position, shared_pool=shared_pool)
        for position in POSITIONS
    }
    for delta in deltas.values():
        randomize_biases_(delta)
    reference = deltas["all"].state_dict()
    for delta in deltas.values():  # the same seed and sizes: the same weights
        assert all(torch.equal(reference[k], v) for k, v in delta.state_dict().items())
    x = torch.randn(6, D_IN, dtype=F64)
    with torch.no_grad():
        routing = deltas["all"].router(x)
        out = {position: delta(x, routing=routing) for position, delta in deltas.items()}
    assert_close(out["child_v2"], out["all"])
    assert not torch.allclose(out["child"], out["all"], atol=1e-6)  # child adds W σ(x) + w once per child, unweighted

    # with a non-linear σ the three differ
    tanh = {
        position: make_delta(levels, activation="tanh", activation_position=position, shared_pool=shared_pool)
        for position in POSITIONS
    }
    with torch.no_grad():
        out = {position: delta(x, routing=routing) for position, delta in tanh.items()}
    assert not torch.allclose(out["child_v2"], out["all"], atol=1e-6)


# -- gradients reach every parameter ------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_pool", [False, True], ids=["own", "pool"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("gate", GATES)
def test_every_parameter_receives_a_gradient(gate, position, shared_pool):
    delta = make_delta(3, gate=gate, activation="prelu", activation_position=position, shared_pool=shared_pool)
    delta.train()
    x = torch.randn(64, D_IN, dtype=F64)
    delta(x).pow(2).sum().backward()  # the output only: the routers learn through the weights α
    for name, param in delta.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# -- vectorisation guard ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("gate", GATES)
def test_forward_does_not_loop_over_tokens(gate, training):
    delta = make_delta(3, gate=gate).train(training)
    small, large = torch.randn(2, D_IN, dtype=F64), torch.randn(40, D_IN, dtype=F64)
    count_torch_calls(lambda: delta(small))  # eval: the decode path builds its tables on the first call
    small_calls = count_torch_calls(lambda: delta(small))
    large_calls = count_torch_calls(lambda: delta(large))
    assert small_calls == large_calls, f"{small_calls} torch calls for 2 tokens, {large_calls} for 40"
    # the probe does see a loop over tokens: the readable reference's count grows with N
    delta.eval()
    few = large[:8]
    small_routing, few_routing = delta.router(small), delta.router(few)
    reference_small = count_torch_calls(lambda: reference_forward(delta, small, small_routing))
    reference_few = count_torch_calls(lambda: reference_forward(delta, few, few_routing))
    assert reference_few > 3 * reference_small
