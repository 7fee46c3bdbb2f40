"""The LoRA-style baselines (SPEC §2): LoRA, MoLoRA, HydraLoRA, with S'MoRE joining the shared checks.

One matrix every method joins (zero init, what trains, save/load, parameter counts), then the variant identities:
MoLoRA with one expert is LoRA, MoLoRA is a one-level S'MoRE, and each fast forward equals a readable loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import smore
from helpers import small_smore, tiny_batch, tiny_llama
from smore.adapters.hydralora import HydraLoRADelta
from smore.adapters.lora import LoRADelta
from smore.adapters.molora import MoLoRADelta
from smore.adapters.smore import build_smore
from smore.analysis.params import COST_MODELS, model_report
from smore.routing.types import TreeRouting

BASELINES = ["lora", "molora", "hydralora"]
ALL_METHODS = [*BASELINES, "smore"]
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def make_config(method: str, **overrides) -> smore.AdapterConfig:
    """A small config of each method on a few attention and FFN projections."""
    if method == "smore":
        return small_smore(target_modules=TARGETS, **overrides)
    values = {
        "lora": dict(rank=4, alpha=8.0),
        "molora": dict(rank=3, alpha=6.0, num_experts=4, top_k=2, balance_weight=0.01),
        "hydralora": dict(rank=3, alpha=6.0, num_experts=3),
    }[method]
    return smore.get_method(method).config_class(target_modules=TARGETS, **{**values, **overrides})


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def perturb_adapters(model, scale: float = 0.2) -> None:
    """Move every adapter weight off its (partly zero) initialisation, so each one reaches the output."""
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn_like(p) * scale)


# -- the shared matrix ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_zero_init_leaves_logits_unchanged(method):
    batch = tiny_batch()
    expected = logits(tiny_llama(), batch)
    model = smore.adapt(tiny_llama(), make_config(method))
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_only_adapter_parameters_train(method):
    model = smore.adapt(tiny_llama(), make_config(method))
    perturb_adapters(model)
    params = trainable(model)
    assert params and all(".delta." in name for name in params)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    batch = tiny_batch()
    model.train()
    for _ in range(2):
        loss = model(**batch, labels=batch["input_ids"]).loss  # CE + aux (aux_loss_in_output)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == p.requires_grad, f"{name}: changed={changed}, requires_grad={p.requires_grad}"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_save_load_round_trip_gives_identical_logits(method, tmp_path):
    model = smore.adapt(tiny_llama(), make_config(method))
    perturb_adapters(model)
    batch = tiny_batch()
    expected = logits(model, batch)
    smore.save_adapter(model, tmp_path)
    loaded = smore.load_adapter(tiny_llama(), tmp_path)
    assert type(loaded.smore_state.config) is type(model.smore_state.config)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_model_report_equals_trainable_after_adapt(method):
    config = make_config(method)
    report = model_report(tiny_llama(), config)
    model = smore.adapt(tiny_llama(), config)
    assert report.trainable == smore.summary(model).trainable == sum(p.numel() for p in trainable(model).values())
    assert len(report.layers) == len(model.smore_state.modules) == 2 * len(TARGETS)
    assert report.active is not None and report.active <= report.trainable
    assert report.flops is not None


# -- cost models ---------------------------------------------------------------------------------------------------


def spec_parameters(config, d_in: int, d_out: int) -> int:
    """SPEC §2's table, written out."""
    r = config.rank
    if config.method == "lora":
        return r * (d_in + d_out)
    e = config.num_experts
    if config.method == "molora":
        return e * r * (d_in + d_out) + d_in * e
    return r * d_in + e * r * d_out + d_in * e


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize(("d_in", "d_out"), [(32, 64), (64, 32), (7, 5)])
@pytest.mark.parametrize("rank", [1, 4])
def test_parameter_counts_equal_built_delta_and_spec(method, d_in, d_out, rank):
    config = make_config(method, rank=rank, alpha=2.0 * rank)
    delta = smore.get_method(method).build(config, d_in, d_out)
    counts = COST_MODELS[method].parameters(config, d_in, d_out)
    assert counts["total"] == sum(p.numel() for p in delta.parameters()) == spec_parameters(config, d_in, d_out)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_active_parameters_per_method():
    d_in, d_out = 32, 48
    lora = make_config("lora")
    assert COST_MODELS["lora"].active(lora, d_in, d_out)["total"] == lora.rank * (d_in + d_out)
    hydra = make_config("hydralora")
    dense = COST_MODELS["hydralora"]
    assert dense.active(hydra, d_in, d_out) == dense.parameters(hydra, d_in, d_out)  # dense router: every head
    molora = make_config("molora", num_experts=5, top_k=2)
    delta = smore.get_method("molora").build(molora, d_in, d_out)
    r, k = molora.rank, molora.top_k
    selected = [0, 3]  # any k experts: their A rows, B columns, and the whole router
    by_hand = sum(
        delta.lora_A[i * r : (i + 1) * r].numel() + delta.lora_B[:, i * r : (i + 1) * r].numel() for i in selected
    )
    by_hand += delta.router.weight.numel()
    assert COST_MODELS["molora"].active(molora, d_in, d_out)["total"] == by_hand == k * r * (d_in + d_out) + d_in * 5


@pytest.mark.parametrize("method", BASELINES)
def test_flops_match_flop_counter(method):
    d_in, d_out, tokens = 24, 40, 6
    config = make_config(method)
    delta = smore.get_method(method).build(config, d_in, d_out)
    x = torch.randn(tokens, d_in)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        delta(x)
    assert counter.get_total_flops() == 2 * tokens * COST_MODELS[method].flops(config, d_in, d_out)["total"]


def test_baseline_cost_functions_refuse_other_configs():
    with pytest.raises(ValueError, match="MoLoRAConfig"):
        COST_MODELS["molora"].parameters(make_config("lora"), 8, 8)
    with pytest.raises(ValueError, match="LoRAConfig"):
        COST_MODELS["lora"].parameters(make_config("hydralora"), 8, 8)
    with pytest.raises(ValueError, match="in_features"):
        COST_MODELS["lora"].parameters(make_config("lora"), 0, 8)


# -- variants as parameters ----------------------------------------------------------------------------------------


def test_molora_with_one_expert_and_top1_is_lora():
    rank, alpha = 4, 8.0
    batch = tiny_batch()
    lora = smore.adapt(tiny_llama(), make_config("lora", rank=rank, alpha=alpha))
    molora = smore.adapt(tiny_llama(), make_config("molora", rank=rank, alpha=alpha, num_experts=1, top_k=1))
    perturb_adapters(lora)
    molora_modules = smore.adapted_modules(molora)
    with torch.no_grad():
        for name, module in smore.adapted_modules(lora).items():
            molora_modules[name].delta.lora_A.copy_(module.delta.lora_A.weight)
            molora_modules[name].delta.lora_B.copy_(module.delta.lora_B.weight)
    torch.testing.assert_close(logits(molora, batch), logits(lora, batch), rtol=1e-6, atol=1e-6)


def tree_routing_from_molora(delta: MoLoRADelta, x: torch.Tensor) -> TreeRouting:
    """MoLoRA's gate decision as a one-level S'MoRE routing: one parent (the root) per token, k slots."""
    out = delta.gate(delta.router(x))
    return TreeRouting(
        indices=(out.indices,), weights=(out.weights,), probs=(out.probs.unsqueeze(1),), aux_loss=out.aux_loss
    )


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (3, 1), (4, 4)])
def test_molora_equals_one_level_smore_with_the_same_routing(num_experts, top_k):
    """Mapping (Proposition 3.2 with L = 1). One-level S'MoRE with identity σ, zero biases and ``eq_1_layer``
    computes ``Δy = W_proj Σ_slots α_i γ B_i A_i x`` with ``B_i`` writing ``I_r`` into rows ``[i r, (i+1) r)``, so
    ``W_proj B_i A_i = W_proj[:, i r:(i+1) r] A_i``. MoLoRA computes ``Σ p_i (alpha/r) B_i^MoLoRA A_i x``. Hence:
    S'MoRE ``A`` (rows ``[i r, (i+1) r)``) = MoLoRA ``lora_A`` (same expert-major layout), ``W_proj`` = MoLoRA
    ``lora_B`` (column block i = ``B_i``), ``alpha=[alpha]`` so ``γ = alpha / r`` equals MoLoRA's scaling, and
    ``α`` = MoLoRA's gate weights, handed over as a :class:`TreeRouting`."""
    d_in, d_out, rank, alpha = 16, 12, 3, 5.0
    molora = MoLoRADelta(
        in_features=d_in, out_features=d_out, num_experts=num_experts, top_k=top_k, rank=rank, alpha=alpha
    )
    with torch.no_grad():
        molora.lora_B.normal_()
        molora.router.weight.normal_()
    config = smore.SMoREConfig(
        num_experts=[num_experts],
        top_k=[top_k],
        ranks=[rank],
        alpha=[alpha],
        activation="identity",
        init="eq_1_layer",
        router_dims=[8],
        down_proj_dim=8,
    )
    tree = build_smore(config, d_in, d_out)
    assert tree.scalings == [molora.scaling]
    with torch.no_grad():
        tree.A.copy_(molora.lora_A)  # A_bias, B_bias and the W_proj bias are zero by the init
        tree.proj.weight.copy_(molora.lora_B)
    x = torch.randn(10, d_in)
    routing = tree_routing_from_molora(molora, x)
    torch.testing.assert_close(tree(x, routing=routing), molora(x), rtol=1e-5, atol=1e-6)


def test_molora_switch_aux_loss_is_w_E_sum_f_P():
    num_experts, top_k, weight = 4, 2, 0.05
    delta = MoLoRADelta(
        in_features=16, out_features=8, num_experts=num_experts, top_k=top_k, rank=2, alpha=2.0, balance_weight=weight
    )
    x = torch.randn(12, 16)
    valid = torch.ones(12, dtype=torch.bool)
    valid[:3] = False  # padding never counts
    delta(x, valid=valid)
    probs = (x[valid] @ delta.router.weight.t()).softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices
    share = torch.stack([(chosen == j).sum() for j in range(num_experts)]).float() / chosen.shape[0]  # f_j, Σ = k
    expected = weight * num_experts * (share * probs.mean(dim=0)).sum()  # w · E · Σ f_j P_j
    torch.testing.assert_close(delta.aux_loss, expected)
    assert delta.aux_loss > 0
    quiet = MoLoRADelta(in_features=16, out_features=8, num_experts=4, top_k=2, rank=2, alpha=2.0)  # no weight
    quiet(x)
    assert float(quiet.aux_loss) == 0.0


def test_molora_aux_loss_reaches_the_model_total():
    model = smore.adapt(tiny_llama(), make_config("molora", balance_weight=0.1))
    model(**tiny_batch())
    per_module = [m.delta.aux_loss for m in smore.adapted_modules(model).values()]
    torch.testing.assert_close(smore.aux_loss(model), torch.stack(per_module).sum())
    assert smore.aux_loss(model) > 0


def test_hydralora_router_has_no_bias_and_dense_softmax_weights():
    delta = HydraLoRADelta(in_features=16, out_features=8, num_experts=3, rank=2, alpha=4.0)
    assert delta.router.bias is None
    x = torch.randn(5, 16)
    weights = delta.expert_weights(x)
    torch.testing.assert_close(weights, torch.softmax(x @ delta.router.weight.t(), dim=-1))
    assert (weights > 0).all()  # dense: every head for every token
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(5))
    assert delta.aux_loss is None


# -- fast paths against readable loops -----------------------------------------------------------------------------


def molora_loop(delta: MoLoRADelta, x: torch.Tensor) -> torch.Tensor:
    """MoLoRA token by token and expert by expert, straight from SPEC §2."""
    r = delta.rank
    rows = []
    for token in x:
        probs = torch.softmax(delta.router.weight @ token, dim=-1)
        chosen = torch.topk(probs, delta.top_k).indices
        weights = probs[chosen] / probs[chosen].sum() if delta.top_k > 1 else probs[chosen]
        out = torch.zeros(delta.lora_B.shape[0])
        for weight, i in zip(weights, chosen.tolist()):
            a_i, b_i = delta.lora_A[i * r : (i + 1) * r], delta.lora_B[:, i * r : (i + 1) * r]
            out = out + weight * delta.scaling * (b_i @ (a_i @ token))
        rows.append(out)
    return torch.stack(rows)


def hydralora_loop(delta: HydraLoRADelta, x: torch.Tensor) -> torch.Tensor:
    """HydraLoRA token by token and head by head."""
    r = delta.rank
    rows = []
    for token in x:
        probs = torch.softmax(delta.router.weight @ token, dim=-1)
        shared = delta.lora_A.weight @ token
        heads = [probs[i] * delta.scaling * (delta.lora_B[:, i * r : (i + 1) * r] @ shared) for i in range(len(probs))]
        rows.append(torch.stack(heads).sum(dim=0))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("build", "loop"),
    [
        (lambda: MoLoRADelta(in_features=12, out_features=10, num_experts=5, top_k=2, rank=3, alpha=6.0), molora_loop),
        (lambda: MoLoRADelta(in_features=12, out_features=10, num_experts=3, top_k=1, rank=2, alpha=2.0), molora_loop),
        (lambda: HydraLoRADelta(in_features=12, out_features=10, num_experts=4, rank=3, alpha=6.0), hydralora_loop),
    ],
    ids=["molora-top2", "molora-top1", "hydralora"],
)
def test_fast_forward_equals_loop_outputs_and_gradients(build, loop):
    delta = build()
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_(std=0.5)
    x = torch.randn(7, 12, requires_grad=True)
    upstream = torch.randn(7, 10)
    grads = []
    outputs = []
    for forward in (delta, lambda t: loop(delta, t)):
        delta.zero_grad()
        x.grad = None
        out = forward(x)
        (out * upstream).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in delta.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


# -- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "field", "value", "extra"),
    [
        (smore.LoRAConfig, "rank", 0, {}),
        (smore.LoRAConfig, "alpha", 0.0, {}),
        (smore.LoRAConfig, "alpha", -2.0, {}),
        (smore.LoRAConfig, "dropout", 1.0, {}),
        (smore.MoLoRAConfig, "top_k", 5, {"num_experts": 4}),
        (smore.MoLoRAConfig, "num_experts", 0, {}),
        (smore.MoLoRAConfig, "rank", 0, {}),
        (smore.HydraLoRAConfig, "num_experts", 0, {}),
        (smore.HydraLoRAConfig, "dropout", 1.0, {}),
    ],
)
def test_bad_config_values_name_the_field(config_class, field, value, extra):
    with pytest.raises(ValueError, match=field):
        config_class(**{field: value}, **extra)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: LoRADelta(in_features=4, out_features=4, rank=0, alpha=1.0), "rank"),
        (lambda: LoRADelta(in_features=4, out_features=4, rank=2, alpha=0.0), "alpha"),
        (lambda: LoRADelta(in_features=4, out_features=4, rank=2, alpha=1.0, dropout=1.0), "dropout"),
        (lambda: MoLoRADelta(in_features=4, out_features=4, num_experts=2, top_k=3, rank=2, alpha=1.0), "top_k"),
        (lambda: HydraLoRADelta(in_features=4, out_features=4, num_experts=0, rank=2, alpha=1.0), "num_experts"),
    ],
)
def test_deltas_check_their_arguments(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_lora_scaling_and_init_follow_peft():
    delta = LoRADelta(in_features=64, out_features=8, rank=4, alpha=10.0)
    assert delta.scaling == 2.5
    assert torch.count_nonzero(delta.lora_B.weight) == 0
    assert delta.lora_A.weight.abs().max() <= 1 / math.sqrt(64)


def test_molora_without_alpha_is_the_unscaled_mixture_of_spec():
    config = smore.MoLoRAConfig(num_experts=3, top_k=2, rank=4)
    assert config.alpha is None and config.scaling == 1.0
    delta = smore.get_method("molora").build(config, 8, 6)
    assert delta.scaling == 1.0
    assert smore.get_method("molora").build(smore.MoLoRAConfig(rank=4, alpha=8.0), 8, 6).scaling == 2.0
