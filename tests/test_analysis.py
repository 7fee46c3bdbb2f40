"""Cost formulas and structural flexibility (SPEC §1.6, §1.7) against brute force on real modules."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

import smore
from helpers import small_smore, tiny_llama, tiny_model_folder
from smore.adapters.smore import build_smore
from smore.analysis import (
    COST_MODELS,
    empirical_gamma,
    enumerate_routing_trees,
    gamma_flat_bound,
    gamma_moe,
    gamma_smore,
    model_report,
    paper_overhead,
    smore_active_parameters,
    smore_flops_per_token,
    smore_parameter_counts,
)
from smore.analysis import cli as analysis_cli

D_IN, D_OUT = 20, 12

LEVELS = {
    1: dict(num_experts=[3], top_k=[2], ranks=[2], router_dims=[4], down_proj_dim=6),
    2: dict(num_experts=[3, 4], top_k=[2, 2], ranks=[2, 3], router_dims=[8, 8], down_proj_dim=8),
    3: dict(num_experts=[2, 3, 4], top_k=[1, 2, 2], ranks=[2, 1, 3], router_dims=[4, 5, 6], down_proj_dim=5),
}
EXTRAS = {
    "plain": {},
    "prelu": dict(activation="prelu"),
    "shared_pool": dict(shared_pool=True),
    "alpha": dict(alpha=None),  # filled per level below: alpha needs one entry per level
    "child": dict(activation_position="child", activation="tanh"),
    "eq_1_layer": dict(init="eq_1_layer", activation="identity"),
    "prelu_router_layer_down": dict(router_activation="prelu", down_proj_dim=None),
}


def make_config(levels: int, gate: str, extra: str) -> smore.SMoREConfig:
    values = dict(LEVELS[levels], gate=gate, **EXTRAS[extra])
    if extra == "shared_pool":  # the pool needs the same s and r in every level
        values.update(num_experts=[3] * levels, ranks=[2] * levels, top_k=[2] * levels)
    if extra == "alpha":
        values["alpha"] = [float(2 * (i + 1)) for i in range(levels)]
    return smore.SMoREConfig(**values)


MATRIX = list(itertools.product(LEVELS, ["dense", "switch", "noisy_topk"], EXTRAS))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- parameters -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("levels", "gate", "extra"), MATRIX)
def test_parameter_counts_equal_module(levels, gate, extra):
    config = make_config(levels, gate, extra)
    delta = build_smore(config, D_IN, D_OUT)
    counts = smore_parameter_counts(config, D_IN, D_OUT)
    assert counts["total"] == n_params(delta)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    # Per component, too: a formula that is only right in sum would hide two compensating mistakes.
    assert counts["A"] == delta.A.numel() + delta.A_bias.numel()
    assert counts["B"] == n_params(delta.B) + n_params(delta.B_bias)
    assert counts["W"] == n_params(delta.W)
    assert counts["proj"] == n_params(delta.proj)
    assert counts["router"] == n_params(delta.router)
    assert counts["prelu"] == (0 if delta.prelu_slopes is None else delta.prelu_slopes.numel())


def test_parameter_counts_follow_spec_example():
    # SPEC §1.7 reading: S'MoRE ≈ a LoRA of rank d_L on the experts side; with d = d_out the A + proj part is that.
    config = smore.SMoREConfig(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8])
    counts = smore_parameter_counts(config, 4096, 4096)
    top = config.widths[-1]
    assert top == 64
    assert counts["A"] + counts["proj"] == 2 * 4096 * top + top + 4096


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_parameter_counts_reject_bad_features(bad):
    with pytest.raises(ValueError, match="in_features"):
        smore_parameter_counts(small_smore(), bad, 8)


# -- active parameters ----------------------------------------------------------------------------------------------


def _widest_tree(config: smore.SMoREConfig) -> list[torch.Tensor]:
    """Forced routing for one token in which the parents of each level pick as many different experts as exist."""
    forced = []
    for level, (s, f) in enumerate(zip(config.num_experts, config.fanouts)):
        parents = config.slots[level + 1]
        rows = [sorted((p * f + j) % s for j in range(f)) for p in range(parents)]
        forced.append(torch.tensor([list(itertools.chain.from_iterable(rows))]))
    return forced


def _used_parameters(delta, config: smore.SMoREConfig, indices: list[torch.Tensor]) -> int:
    """Parameters of the experts a routing actually uses, plus everything every token runs, read off the module."""
    used = n_params(delta.W) + n_params(delta.proj) + n_params(delta.router)
    used += 0 if delta.prelu_slopes is None else delta.prelu_slopes.numel()
    if config.shared_pool:
        experts = {int(i) for level in indices for i in level.reshape(-1)}
        rows = config.ranks[0] * len(experts)
        used += rows * (delta.A.shape[1] + 1) + sum(delta.B[0][i].numel() + delta.B_bias[0][i].numel() for i in experts)
        return used
    for level, chosen in enumerate(indices):
        experts = {int(i) for i in chosen.reshape(-1)}
        used += len(experts) * config.ranks[level] * (delta.A.shape[1] + 1)
        used += sum(delta.B[level][i].numel() + delta.B_bias[level][i].numel() for i in experts)
    return used


@pytest.mark.parametrize(("levels", "gate", "extra"), [m for m in MATRIX if m[2] in ("plain", "shared_pool")])
def test_active_parameters_match_widest_routing(levels, gate, extra):
    config = make_config(levels, gate, extra)
    delta = build_smore(config, D_IN, D_OUT).eval()
    active = smore_active_parameters(config, D_IN, D_OUT)
    assert active["total"] == sum(v for k, v in active.items() if k != "total")
    if gate == "dense":  # the dense gate uses every expert: everything is active
        assert active["total"] == n_params(delta)
        return
    x = torch.randn(1, D_IN)
    widest = delta.router(x, forced=_widest_tree(config))
    assert _used_parameters(delta, config, list(widest.indices)) == active["total"]
    # Real routings of random tokens never use more than the bound.
    routing = delta.router(torch.randn(64, D_IN))
    for token in range(64):
        used = _used_parameters(delta, config, [level[token] for level in routing.indices])
        assert used <= active["total"]
    assert active["total"] <= smore_parameter_counts(config, D_IN, D_OUT)["total"]


# -- FLOPs ----------------------------------------------------------------------------------------------------------

# Ranks >= 2: torch turns an einsum over a size-1 dimension into a broadcast multiply that FlopCounterMode ignores.
FLOP_CASES = [
    dict(),
    dict(gate="dense"),
    dict(gate="noisy_topk", top_k=[1, 2]),
    dict(shared_pool=True, num_experts=[3, 3], ranks=[2, 2]),
    dict(num_experts=[2, 3, 4], top_k=[1, 2, 2], ranks=[2, 3, 2], router_dims=[4, 5, 6], activation="prelu"),
    dict(num_experts=[5], top_k=[3], ranks=[2], router_dims=[8], activation_position="child_v2"),
    dict(num_experts=[16, 16], top_k=[2, 2], ranks=[2, 2]),  # sparse enough for the grouped path
    dict(num_experts=[16, 16], top_k=[1, 2], ranks=[2, 2], shared_pool=True),  # grouped, one pool
]


@pytest.mark.parametrize("overrides", FLOP_CASES)
def test_flops_match_flop_counter(overrides):
    config = small_smore(**overrides)
    delta = build_smore(config, D_IN, D_OUT).eval()
    tokens = 7
    with FlopCounterMode(display=False) as counter:
        delta(torch.randn(tokens, D_IN))
    flops = smore_flops_per_token(config, D_IN, D_OUT)
    assert counter.get_total_flops() == 2 * tokens * flops["total"]  # the counter reports 2 FLOPs per multiply-add
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")


def test_noisy_gate_training_flops_add_the_noise_projection():
    config = small_smore(gate="noisy_topk", top_k=[1, 2])
    eval_flops = smore_flops_per_token(config, D_IN, D_OUT)
    train_flops = smore_flops_per_token(config, D_IN, D_OUT, training=True)
    delta = build_smore(config, D_IN, D_OUT).train()
    with FlopCounterMode(display=False) as counter:
        delta(torch.randn(3, D_IN))
    assert counter.get_total_flops() == 2 * 3 * train_flops["total"]
    assert train_flops["router"] > eval_flops["router"]


def test_paper_overhead_worked_example():
    config = smore.SMoREConfig(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8])
    overhead = paper_overhead(config, 4096)
    assert overhead.top_width == 64
    assert overhead.delta == 5120
    assert overhead.main == 2 * 4096 * 64
    assert round(overhead.main / 1e6, 1) == 0.5
    assert round(100 * overhead.ratio, 1) == 1.0


def test_paper_overhead_differs_from_implementation_count():
    # The paper counts each W_ℓ once; the implementation runs it once per slot, so ours is larger when F_ℓ > 1.
    config = smore.SMoREConfig(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8])
    ours = smore_flops_per_token(config, 4096, 4096)
    paper = paper_overhead(config, 4096)
    assert ours["A"] + ours["proj"] == paper.main
    assert ours["B"] + ours["W"] > paper.delta


# -- model report ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(gate="noisy_topk", activation="prelu", layers_to_transform=[1]),
        dict(target_modules=r".*\.(q_proj|v_proj|down_proj)", shared_pool=True, num_experts=[3, 3], ranks=[2, 2]),
    ],
)
def test_model_report_equals_trainable_after_adapt(overrides):
    model = tiny_llama()
    config = small_smore(**overrides)
    report = model_report(model, config)
    base = sum(p.numel() for p in model.parameters())
    smore.adapt(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable == trainable
    assert report.base_parameters == base
    assert {layer.name for layer in report.layers} == set(model.smore_state.modules)
    per_layer = [smore_flops_per_token(config, la.in_features, la.out_features)["total"] for la in report.layers]
    assert report.flops == sum(per_layer)
    assert report.active <= report.trainable
    assert report.to_dict()["trainable"] == trainable


def test_model_report_handles_conv1d():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    config = small_smore(target_modules=["c_attn", "c_fc"])
    report = model_report(model, config)
    assert {(la.in_features, la.out_features) for la in report.layers} == {(32, 96), (32, 128)}
    smore.adapt(model, config)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_model_report_refuses_unknown_cost_model(monkeypatch):
    monkeypatch.delitem(COST_MODELS, "smore")
    with pytest.raises(ValueError, match="COST_MODELS"):
        model_report(tiny_llama(), small_smore())


# -- flexibility ----------------------------------------------------------------------------------------------------


def test_gamma_paper_example():
    assert gamma_smore([4, 4], [2, 2]) == 216
    assert gamma_flat_bound([4, 4], [2, 2]) == 66
    assert gamma_moe(8, 2) == 28


FLEX_CASES = [([3], [1]), ([2, 3], [1, 2]), ([4, 4], [2, 2]), ([2, 2, 3], [1, 2, 2]), ([3, 4], [1, 3])]


@pytest.mark.parametrize(("num_experts", "top_k"), FLEX_CASES)
def test_routing_trees_are_all_distinct_and_counted_by_theorem_3_4(num_experts, top_k):
    forced = enumerate_routing_trees(num_experts, top_k)
    flat = torch.cat(forced, dim=1)
    assert flat.shape[0] == gamma_smore(num_experts, top_k)
    assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]
    for level, (s, f) in enumerate(zip(num_experts, top_k)):
        groups = forced[level].reshape(flat.shape[0], -1, f)  # (N, parents, f): each parent's children
        assert bool((groups[..., 1:] > groups[..., :-1]).all())  # a sorted subset: no repeats within a parent
        assert int(groups.max()) < s


@pytest.mark.parametrize(("num_experts", "top_k"), FLEX_CASES)
def test_flat_bound_is_the_number_of_active_expert_sets(num_experts, top_k):
    # A flat mixture only sees which experts of each level are active; count those sets over every routing tree.
    forced = enumerate_routing_trees(num_experts, top_k)
    seen = {tuple(frozenset(level[t].tolist()) for level in forced) for t in range(forced[0].shape[0])}
    assert len(seen) == gamma_flat_bound(num_experts, top_k)


def test_gamma_moe_counts_subsets():
    assert gamma_moe(6, 3) == len(list(itertools.combinations(range(6), 3)))


@pytest.mark.parametrize(
    "call",
    [
        lambda: gamma_smore([4, 4], [2]),
        lambda: gamma_smore([4], [5]),
        lambda: gamma_flat_bound([], []),
        lambda: gamma_moe(0, 1),
    ],
)
def test_gamma_validates(call):
    with pytest.raises(ValueError):
        call()


def _delta(num_experts, top_k, activation="tanh", gate="switch", seed=0, **extra):
    levels = len(num_experts)
    config = smore.SMoREConfig(
        num_experts=num_experts,
        top_k=top_k,
        ranks=[2] * levels,
        router_dims=[6] * levels,
        down_proj_dim=6,
        activation=activation,
        gate=gate,
        init=extra.pop("init", "normal"),
        **extra,
    )
    torch.manual_seed(seed)
    return build_smore(config, 12, config.widths[-1] + 4), torch.randn(12)


@pytest.mark.parametrize(("num_experts", "top_k"), FLEX_CASES)
@pytest.mark.parametrize("gate", ["switch", "noisy_topk"])
def test_empirical_gamma_with_tanh_reaches_theorem_3_4(num_experts, top_k, gate):
    if gate == "noisy_topk" and any(f == s for s, f in zip(num_experts, top_k)):
        pytest.skip("noisy_topk needs top_k < num_experts")
    delta, x = _delta(num_experts, top_k, gate=gate)
    assert empirical_gamma(delta, x) == gamma_smore(num_experts, top_k)


def _identity_structural_count(num_experts, top_k) -> int:
    """Two-level S'MoRE, identity σ, equal weights: the output depends on the top set and the multiset of children."""
    forced = enumerate_routing_trees(num_experts, top_k)
    return len(
        {(tuple(forced[1][t].tolist()), tuple(sorted(forced[0][t].tolist()))) for t in range(forced[0].shape[0])}
    )


@pytest.mark.parametrize(("num_experts", "top_k"), [([4, 4], [2, 2]), ([3, 3], [2, 2]), ([3, 2], [2, 2])])
def test_identity_sigma_merges_trees(num_experts, top_k):
    delta, x = _delta(num_experts, top_k, activation="identity")
    count = empirical_gamma(delta, x, weights="uniform")
    assert count == _identity_structural_count(num_experts, top_k)
    assert count < gamma_smore(num_experts, top_k)
    tanh_delta, x = _delta(num_experts, top_k, activation="tanh")
    assert empirical_gamma(tanh_delta, x, weights="uniform") == gamma_smore(num_experts, top_k)


def test_identity_sigma_with_router_weights_still_separates_trees():
    # Each child's α depends on its parent's key, so even a linear tree tells every routing apart (see the report).
    delta, x = _delta([4, 4], [2, 2], activation="identity")
    assert empirical_gamma(delta, x) == 216


def test_empirical_gamma_leaves_delta_untouched_and_sees_zero_projection():
    delta, x = _delta([3, 3], [1, 2])
    delta.train()
    before = {k: v.clone() for k, v in delta.state_dict().items()}
    empirical_gamma(delta, x)
    assert delta.training and delta.A.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in delta.state_dict().items())
    zero, x = _delta([3, 3], [1, 2], init="w_final_zero")
    assert empirical_gamma(zero, x) == 1  # W_proj = 0: every tree gives Δy = 0


def test_empirical_gamma_refuses_dense_and_bad_input():
    delta, x = _delta([3, 3], [2, 2], gate="dense")
    with pytest.raises(ValueError, match="dense"):
        empirical_gamma(delta, x)
    delta, x = _delta([3, 3], [2, 2])
    with pytest.raises(ValueError, match="shape"):
        empirical_gamma(delta, x.unsqueeze(0))
    with pytest.raises(ValueError, match="max_trees"):
        empirical_gamma(delta, x, max_trees=10)
    with pytest.raises(ValueError, match="weights"):
        empirical_gamma(delta, x, weights="equal")


# -- CLI ------------------------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """What the command writes, without what the test printed before it (saving a model, which imports DeepSpeed
    where it is installed, may log to stdout)."""
    capsys.readouterr()
    args = analysis_cli.build_parser().parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_params_json_matches_formulas(tmp_path, capsys):
    file = tmp_path / "adapter.yaml"
    file.write_text("method: smore\nnum_experts: [3, 4]\ntop_k: [2, 2]\nranks: [2, 3]\ngate: noisy_topk\n")
    argv = ["analyze", "params", "--config", str(file), "--set", "router_dims=[8, 8]", "--in-features", "20"]
    code, out, _ = run_cli([*argv, "--out-features", "12", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    config = smore.SMoREConfig(num_experts=[3, 4], top_k=[2, 2], ranks=[2, 3], gate="noisy_topk", router_dims=[8, 8])
    assert result["parameters"] == smore_parameter_counts(config, 20, 12)
    assert result["active"] == smore_active_parameters(config, 20, 12)
    assert result["flops_per_token"] == smore_flops_per_token(config, 20, 12)
    assert result["config"] == config.to_dict()
    code, text, _ = run_cli(argv, capsys)  # the table prints the same total; out_features defaults to in_features
    assert code == 0
    total = smore_parameter_counts(config, 20, 20)["total"]
    assert f"{total:,}" in text.splitlines()[-1]


def test_cli_params_json_config_file_and_handler(tmp_path):
    file = tmp_path / "adapter.json"
    file.write_text(json.dumps({"adapter": {"method": "smore", "num_experts": [2], "top_k": [1], "ranks": [4]}}))
    args = argparse.Namespace(config=str(file), set=[("router_dims", [4])], in_features=16, out_features=None)
    result = analysis_cli.params_command(args)
    config = smore.SMoREConfig(num_experts=[2], top_k=[1], ranks=[4], router_dims=[4])
    assert result["parameters"]["total"] == n_params(build_smore(config, 16, 16))


def test_cli_flexibility(capsys):
    code, out, _ = run_cli(["analyze", "flexibility", "--num-experts", "4,4", "--top-k", "2,2", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert (result["gamma_smore"], result["gamma_flat_bound"], result["gamma_moe"]) == (216, 66, 28)
    assert (result["moe_experts"], result["moe_top_k"]) == (8, 2)
    argv = ["analyze", "flexibility", "--num-experts", "2,3", "--top-k", "1,2", "--empirical", "--json"]
    code, out, _ = run_cli(argv, capsys)
    result = json.loads(out)
    assert result["empirical"]["gamma"] == result["gamma_smore"] == gamma_smore([2, 3], [1, 2])
    code, out, _ = run_cli([*argv[:-1], "--activation", "identity", "--weights", "uniform"], capsys)
    assert code == 0 and "empirical.gamma" in out


def test_cli_overhead(capsys):
    argv = ["analyze", "overhead", "--set", "num_experts=[4,4]", "--set", "ranks=[8,8]", "--in-features", "4096"]
    code, out, _ = run_cli([*argv, "--json"], capsys)
    result = json.loads(out)
    assert code == 0
    assert (result["top_width"], result["delta"], result["main"]) == (64, 5120, 2 * 4096 * 64)
    assert math.isclose(result["percent"], 100 * 5120 / (2 * 4096 * 64))


def test_cli_params_takes_the_shapes_from_the_model_of_a_run_config(tmp_path, capsys):
    """``analyze params --config RUN.yaml`` without ``--in-features``: every layer the adapter selects in the run's
    model, as many trainable parameters as ``smore.adapt`` gives it."""
    model_dir = tiny_model_folder(tmp_path / "model")
    adapter = {"method": "smore", "num_experts": [2, 2], "top_k": [1, 1], "ranks": [2, 2], "router_dims": [8, 8]}
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps({"model": str(model_dir), "output_dir": "out", "adapter": adapter}))
    code, out, err = run_cli(["analyze", "params", "--config", str(run), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    adapted = smore.adapt(tiny_llama(), smore.config_from_dict(adapter))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert result["trainable"] == trainable and result["modules"] == 6  # gate, up, down of 2 layers
    assert {(s["in_features"], s["out_features"], s["modules"]) for s in result["shapes"]} == {(32, 64, 4), (64, 32, 2)}
    code, text, _ = run_cli(["analyze", "params", "--config", str(run)], capsys)
    assert code == 0 and text.splitlines()[-1].split()[:2] == ["total", f"{trainable:,}"]
    code, out, _ = run_cli(
        ["analyze", "params", "--set", "num_experts=[2,2]", "--model-config", "tiny", "--json"], capsys
    )
    assert code == 0 and json.loads(out)["modules"] == 6
    code, out, err = run_cli(["analyze", "params", "--set", "num_experts=[2,2]"], capsys)  # no layer, no model
    assert code == 2 and "--in-features" in err and "--model-config" in err


def test_cli_overhead_table_is_aligned_and_labelled(capsys):
    argv = ["analyze", "overhead", "--set", "num_experts=[4,4]", "--set", "ranks=[8,8]", "--in-features", "4096"]
    code, out, _ = run_cli(argv, capsys)
    head, *table = out.rstrip("\n").splitlines()
    assert code == 0 and "d=4,096" in head and "4×r8, 4×r8" in head
    assert len({len(line) for line in table}) == 1  # header, rule and rows end in the same column
    assert table[0].split() == ["quantity", "value"] and set(table[1]) == {"-", " "}
    values = {line[: table[1].index(" ")].strip(): line.split("  ")[-1].strip() for line in table[2:]}
    assert values == {
        "top width d_L": "64",
        "main cost 2·d·d_L": "524,288",
        "overhead Δ": "5,120",
        "Δ / main": "0.98 %",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "params", "--set", "top_k=[9,9]", "--in-features", "8"],
        ["analyze", "params", "--set", "method=nope", "--in-features", "8"],
        ["analyze", "params", "--config", "/nonexistent/adapter.yaml", "--in-features", "8"],
        ["analyze", "flexibility", "--num-experts", "4,4", "--top-k", "2"],
    ],
)
def test_cli_errors_exit_2_with_message(argv, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == "" and err.startswith("error: ")


def test_cli_rejects_malformed_lists():
    with pytest.raises(SystemExit):
        analysis_cli.build_parser().parse_args(["analyze", "flexibility", "--num-experts", "a,b", "--top-k", "1"])
