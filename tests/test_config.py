"""SMoREConfig against SPEC §1.1: every validation raises a ValueError naming the field, the derived quantities
(d_ℓ, F_ℓ, fanouts, γ_ℓ) on the SPEC's examples, the JSON round trip, the registry's errors, and two properties:
random valid configs build a working delta, random bad values only ever raise ValueError."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import smore
from helpers import JUNK
from smore.adapters.smore import SMoREConfig, build_smore
from smore.registry import config_from_dict

# -- validation -----------------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
INVALID = [  # (overrides of the default two-level config, regex the message must contain)
    # per-level lists of different lengths
    ({"num_experts": [4, 4], "top_k": [2]}, "top_k"),
    ({"num_experts": [4, 4], "ranks": [8, 8, 8]}, "ranks"),
    ({"top_k": [2, 2], "router_dims": [32]}, "router_dims"),
    ({"ranks": [8, 8], "alpha": [16.0]}, "alpha"),
    # top_k against num_experts
    ({"top_k": [5, 2]}, r"top_k\[0\]"),
    ({"top_k": [2, 9]}, r"top_k\[1\]"),
    ({"gate": "noisy_topk", "top_k": [2, 4]}, r"top_k\[1\]"),
    ({"gate": "noisy_topk", "num_experts": [2, 4], "top_k": [2, 1]}, r"top_k\[0\]"),
    # the shared pool needs equal levels
    ({"shared_pool": True, "num_experts": [4, 2], "top_k": [1, 1]}, "shared_pool"),
    ({"shared_pool": True, "ranks": [8, 4]}, "shared_pool"),
    ({"shared_pool": "yes"}, "shared_pool"),
    # recompute is a switch
    ({"recompute": "yes"}, "recompute"),
    ({"recompute": 1}, "recompute"),
    ({"recompute": None}, "recompute"),
    # unknown choices
    ({"activation": "gelu"}, "activation"),
    ({"gate": "top2"}, "gate"),
    ({"init": "zeros"}, "init"),
    ({"activation_position": "parent"}, "activation_position"),
    ({"router_activation": "sigmoid"}, "router_activation"),
    # non-positive or non-integer sizes
    ({"ranks": [0, 8]}, r"ranks\[0\]"),
    ({"ranks": [8, -1]}, r"ranks\[1\]"),
    ({"ranks": [8, 2.5]}, r"ranks\[1\]"),
    ({"ranks": [True, 8]}, r"ranks\[0\]"),
    ({"num_experts": [0, 4]}, r"num_experts\[0\]"),
    ({"top_k": [0, 2]}, r"top_k\[0\]"),
    ({"router_dims": [32, 0]}, r"router_dims\[1\]"),
    ({"router_dims": 0}, "router_dims"),
    ({"down_proj_dim": 0}, "down_proj_dim"),
    ({"down_proj_dim": 2.5}, "down_proj_dim"),
    ({"down_proj_dim": True}, "down_proj_dim"),
    # bad alpha
    ({"alpha": [0.0, 16.0]}, r"alpha\[0\]"),
    ({"alpha": [16.0, -1.0]}, r"alpha\[1\]"),
    ({"alpha": [NAN, 16.0]}, r"alpha\[0\]"),
    ({"alpha": [16.0, INF]}, r"alpha\[1\]"),
    ({"alpha": ["16", 16.0]}, r"alpha\[0\]"),
    ({"alpha": [True, 16.0]}, r"alpha\[0\]"),
    ({"alpha": "16"}, "alpha"),
    # lists that are not lists
    ({"num_experts": "4,4"}, "num_experts"),
    ({"num_experts": []}, "num_experts"),
    ({"top_k": True}, "top_k"),
    ({"ranks": {"0": 8}}, "ranks"),
    ({"down_proj_dim": -1}, "down_proj_dim"),
    ({"router_activation": "prelu", "router_prelu_init": NAN}, "router_prelu_init"),
    # other scalars
    ({"balance_weight": -0.1}, "balance_weight"),
    ({"balance_weight": NAN}, "balance_weight"),
    ({"balance_weight": "0.01"}, "balance_weight"),
    ({"prelu_init": INF}, "prelu_init"),
    ({"prelu_init": None}, "prelu_init"),
    # where the adapters go
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": None}, "target_modules"),
    ({"target_modules": ["up_proj", ""]}, "target_modules"),
    ({"exclude_modules": 5}, "exclude_modules"),
    ({"layers_to_transform": [-1]}, "layers_to_transform"),
    ({"layers_to_transform": "0"}, "layers_to_transform"),
]


@pytest.mark.parametrize(("overrides", "field_name"), INVALID, ids=[str(o) for o, _ in INVALID])
def test_invalid_values_raise_value_error_naming_the_field(overrides, field_name):
    with pytest.raises(ValueError, match=field_name):
        SMoREConfig(**overrides)


def test_tuples_are_accepted_as_lists():
    config = SMoREConfig(num_experts=(4, 4), top_k=(2, 2), ranks=(8, 8), alpha=(16, 16), target_modules=("up_proj",))
    assert config.num_experts == [4, 4] and config.alpha == [16, 16] and config.target_modules == ["up_proj"]


def test_exclude_modules_entries_must_be_strings():
    """As for target_modules: a non-string entry must be refused here, not fail later at injection."""
    with pytest.raises(ValueError, match="exclude_modules"):
        SMoREConfig(exclude_modules=[5])


def test_target_modules_regex_must_compile():
    """A string target is a regular expression: an invalid one should be refused by the config, not at injection."""
    with pytest.raises(ValueError, match="target_modules"):
        SMoREConfig(target_modules="(up_proj")


# -- derived quantities (SPEC §1.1) ---------------------------------------------------------------------------------
def test_widths_follow_d_next_equals_d_plus_s_times_r():
    spec = SMoREConfig(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8])  # SPEC §1.7: d_L = 64
    assert spec.widths == [0, 32, 64]
    mixed = SMoREConfig(num_experts=[2, 3, 4], top_k=[1, 2, 2], ranks=[4, 2, 1], router_dims=8)
    assert mixed.widths == [0, 8, 14, 18]
    assert mixed.num_levels == 3
    assert build_smore(mixed, 10, 7).widths == mixed.widths


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_shared_pool_widths_are_s_times_r(levels):
    config = SMoREConfig(
        num_experts=[4] * levels, top_k=[2] * levels, ranks=[8] * levels, router_dims=8, shared_pool=True
    )
    assert config.widths == [0] + [32] * levels
    delta = build_smore(config, 10, 7)
    assert delta.widths == config.widths
    assert delta.A.shape == (32, 10) and len(delta.B) == 1 and delta.B[0].shape == (4, 32, 8)


def test_slots_and_fanouts():
    assert SMoREConfig(num_experts=[4, 4], top_k=[2, 2]).slots == [4, 2, 1]
    config = SMoREConfig(num_experts=[4, 2, 5], top_k=[2, 1, 3], ranks=[1, 1, 1], router_dims=4)
    assert config.fanouts == [2, 1, 3]
    assert config.slots == [6, 3, 3, 1]  # F_ℓ = Π_{j ≥ ℓ} f_j, F_L = 1
    dense = SMoREConfig(num_experts=[4, 3], top_k=[2, 1], gate="dense")
    assert dense.fanouts == [4, 3]  # the dense gate picks every expert, top_k is ignored
    assert dense.slots == [12, 3, 1]


def test_scalings():
    assert SMoREConfig(ranks=[8, 4]).scalings == [1.0, 1.0]  # no alpha: γ = 1 (the paper's runs)
    assert SMoREConfig(ranks=[8, 4], alpha=[16, 2.0]).scalings == [2.0, 0.5]


def test_router_dims_int_is_broadcast():
    assert SMoREConfig(num_experts=[4, 4, 4], top_k=[1, 1, 1], ranks=[2, 2, 2], router_dims=16).router_dims == [16] * 3


def test_per_level_defaults_follow_the_number_of_levels():
    three = SMoREConfig(num_experts=[4, 4, 4], top_k=[2, 2, 2], ranks=[8, 8, 8])
    assert three.router_dims == [32, 32, 32] and three.num_levels == 3
    assert SMoREConfig(num_experts=[4, 4, 4]).top_k == [2, 2, 2]  # every default follows the levels given
    one = SMoREConfig(ranks=[16])
    assert (one.num_experts, one.top_k, one.router_dims) == ([4], [2], [32])
    default = SMoREConfig()
    assert (default.num_experts, default.top_k, default.ranks, default.router_dims) == (
        [4, 4],
        [2, 2],
        [8, 8],
        [32] * 2,
    )


def test_a_single_number_applies_to_every_level():
    config = SMoREConfig(num_experts=[8, 4, 4], top_k=1, ranks=4, alpha=8, router_dims=16)
    assert config.top_k == [1] * 3 and config.ranks == [4] * 3 and config.alpha == [8] * 3
    assert config.router_dims == [16] * 3 and config.scalings == [2.0] * 3
    assert SMoREConfig(num_experts=6, top_k=3).num_experts == [6, 6]  # no list given: the default two levels
    assert config_from_dict(config.to_dict()) == config  # saved resolved: a reload needs no defaults


def test_layer_width_down_projection_and_router_prelu():
    config = SMoREConfig(down_proj_dim=None, router_activation="prelu", router_prelu_init=0.1)
    delta = build_smore(config, 20, 12)
    assert delta.router.down_proj.out_features == 20 and config.down_width(48) == 48
    slopes = [level.mlp[1].weight for level in delta.router.levels]
    assert all(isinstance(level.mlp[1], torch.nn.PReLU) for level in delta.router.levels)
    assert all(torch.equal(slope, torch.tensor([0.1])) for slope in slopes)


# -- serialisation and the registry ---------------------------------------------------------------------------------
ROUND_TRIP = [
    SMoREConfig(),
    SMoREConfig(
        num_experts=[3, 5, 2],
        top_k=[1, 2, 1],
        ranks=[4, 2, 8],
        alpha=[8.0, 4.0, 16.0],
        router_dims=[8, 4, 6],
        down_proj_dim=12,
        router_activation="gelu",
        gate="noisy_topk",
        balance_weight=0.5,
        activation="prelu",
        prelu_init=0.1,
        activation_position="child_v2",
        init="eq_1_layer",
        target_modules=r".*\.mlp\.(up|down)_proj",
        exclude_modules=["lm_head"],
        layers_to_transform=[0, 3],
    ),
    SMoREConfig(num_experts=[4, 4], ranks=[2, 2], shared_pool=True, gate="dense"),
]


@pytest.mark.parametrize("config", ROUND_TRIP)
def test_to_dict_from_dict_round_trip(config):
    document = config.to_dict()
    assert document["method"] == "smore"
    assert SMoREConfig.from_dict(document) == config
    assert config_from_dict(json.loads(json.dumps(document))) == config
    assert smore.config_from_dict(document).to_dict() == document


def test_from_dict_refuses_unknown_keys_by_name():
    with pytest.raises(ValueError, match="num_expert"):
        SMoREConfig.from_dict({"num_expert": [4, 4]})
    with pytest.raises(ValueError, match="fanout"):
        config_from_dict({"method": "smore", "fanout": [2, 2]})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_experts": [4, 4]}, "method"),
        ({"method": "lora_plus_plus"}, "lora_plus_plus"),
        ({"method": ["smore"]}, "method"),
        ([("method", "smore")], "mapping"),
    ],
)
def test_config_from_dict_errors_for_missing_or_unknown_method(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values)


# -- properties -----------------------------------------------------------------------------------------------------
@st.composite
def valid_configs(draw) -> SMoREConfig:
    levels = draw(st.integers(1, 3))
    gate = draw(st.sampled_from(["dense", "switch", "noisy_topk"]))
    shared_pool = draw(st.booleans())
    low = 2 if gate == "noisy_topk" else 1  # the noisy gate needs top_k < num_experts
    if shared_pool:
        num_experts = [draw(st.integers(low, 3))] * levels
        ranks = [draw(st.integers(1, 3))] * levels
    else:
        num_experts = [draw(st.integers(low, 3)) for _ in range(levels)]
        ranks = [draw(st.integers(1, 3)) for _ in range(levels)]
    top_k = [draw(st.integers(1, s - 1 if gate == "noisy_topk" else s)) for s in num_experts]
    alpha = draw(st.none() | st.lists(st.floats(0.25, 16.0), min_size=levels, max_size=levels))
    return SMoREConfig(
        num_experts=num_experts,
        top_k=top_k,
        ranks=ranks,
        alpha=alpha,
        router_dims=[draw(st.integers(1, 5)) for _ in range(levels)],
        down_proj_dim=draw(st.integers(1, 5)),
        router_activation=draw(st.sampled_from(["relu", "gelu", "silu", "tanh"])),
        gate=gate,
        balance_weight=draw(st.floats(0.0, 1.0)),
        activation=draw(st.sampled_from(["identity", "tanh", "relu", "prelu"])),
        activation_position=draw(st.sampled_from(["all", "child", "child_v2"])),
        shared_pool=shared_pool,
        init=draw(st.sampled_from(["normal", "b_zero", "bw_zero", "w_final_zero", "eq_1_layer"])),
    )


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    config=valid_configs(),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    tokens=st.integers(1, 5),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_valid_configs_build_a_working_delta(config, d_in, d_out, tokens, training, seed):
    torch.manual_seed(seed)
    delta = build_smore(config, d_in, d_out).train(training)
    x = torch.randn(tokens, d_in, requires_grad=True)
    out = delta(x)
    assert out.shape == (tokens, d_out)
    assert torch.isfinite(out).all()
    assert delta.aux_loss is not None and torch.isfinite(delta.aux_loss)
    (out.square().sum() + delta.aux_loss).backward()
    assert torch.isfinite(x.grad).all()
    for name, param in delta.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    assert SMoREConfig.from_dict(config.to_dict()) == config


FIELDS = [f.name for f in dataclasses.fields(SMoREConfig)]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(values=st.dictionaries(st.sampled_from(FIELDS), JUNK, min_size=1, max_size=3))
def test_bad_values_raise_only_value_error(values):
    try:
        config = SMoREConfig(**values)
    except ValueError:
        return  # refused with the right exception type
    # accepted: then it must be a usable config, not a crash waiting for the model
    delta = build_smore(config, 4, 3)
    out = delta(torch.randn(3, 4))
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    assert math.isfinite(float(delta.aux_loss.detach()))
    assert SMoREConfig.from_dict(config.to_dict()) == config
