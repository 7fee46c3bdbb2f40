"""Properties over every method (hypothesis): random valid adapter configs on random small Llamas give finite outputs
and gradients of the parameters' shapes and survive save/load exactly; random invalid configs raise ValueError and
nothing else, and whatever a config accepts works on a model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import smore
from helpers import JUNK, tiny_llama
from smore.registry import METHODS, config_from_dict

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD_NAMES = ["smore", "lora", "molora", "hydralora", "mixlora", "trex"]
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def test_every_registered_method_is_fuzzed():
    assert sorted(METHODS) == sorted(METHOD_NAMES)


@st.composite
def model_shapes(draw) -> dict:
    heads = draw(st.sampled_from([1, 2]))
    return {
        "hidden_size": heads * draw(st.sampled_from([4, 8])),
        "intermediate_size": draw(st.integers(3, 20)),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from([1, heads])),
        "vocab_size": 40,
    }


def targets(draw) -> list[str] | str:
    return draw(
        st.sampled_from(["all-linear"]) | st.lists(st.sampled_from(LINEAR), min_size=1, max_size=4, unique=True)
    )


@st.composite
def adapter_documents(draw, method: str) -> dict:
    """A valid config of ``method`` as its JSON document (so the registry's own parsing is exercised)."""
    rank = draw(st.integers(1, 4))
    alpha = draw(st.floats(0.5, 16.0))
    if method == "smore":
        levels = draw(st.integers(1, 3))
        gate = draw(st.sampled_from(["dense", "switch", "noisy_topk"]))
        low = 2 if gate == "noisy_topk" else 1
        experts = [draw(st.integers(low, 3)) for _ in range(levels)]
        shared = draw(st.booleans())
        ranks = [draw(st.integers(1, 3)) for _ in range(levels)]
        if shared:
            experts, ranks = [experts[0]] * levels, [ranks[0]] * levels
        document = {
            "num_experts": experts,
            "top_k": [draw(st.integers(1, s - 1 if gate == "noisy_topk" else s)) for s in experts],
            "ranks": ranks,
            "alpha": draw(st.none() | st.lists(st.floats(0.5, 8.0), min_size=levels, max_size=levels)),
            "router_dims": [draw(st.integers(1, 4)) for _ in range(levels)],
            "down_proj_dim": draw(st.integers(1, 4)),
            "gate": gate,
            "shared_pool": shared,
            "activation": draw(st.sampled_from(["identity", "tanh", "relu", "prelu"])),
            "activation_position": draw(st.sampled_from(["all", "child", "child_v2"])),
            "init": draw(st.sampled_from(["normal", "b_zero", "bw_zero", "w_final_zero", "eq_1_layer"])),
            "target_modules": targets(draw),
        }
    elif method == "lora":
        document = {
            "rank": rank,
            "alpha": alpha,
            "dropout": draw(st.sampled_from([0.0, 0.1])),
            "target_modules": targets(draw),
        }
    elif method in ("molora", "hydralora"):
        experts = draw(st.integers(1, 4))
        document = {"rank": rank, "num_experts": experts, "target_modules": targets(draw)}
        if method == "molora":
            document.update(top_k=draw(st.integers(1, experts)), alpha=draw(st.none() | st.just(alpha)))
            document["balance_weight"] = draw(st.sampled_from([0.0, 0.01]))
    elif method == "mixlora":
        experts = draw(st.integers(1, 4))
        document = {
            "rank": rank,
            "alpha": alpha,
            "num_experts": experts,
            "top_k": draw(st.integers(1, experts)),
            "attention_modules": draw(st.none() | st.lists(st.sampled_from(LINEAR[:4]), min_size=1, unique=True)),
        }
    else:
        document = {"rank_in": rank, "rank_out": draw(st.integers(1, 4)), "target_modules": targets(draw)}
    return {"method": method, **document}


def batch(generator: torch.Generator, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(4, 40, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 0] = 0  # left padding on one row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : length // 3] = -100  # a prompt that carries no loss (T-REX's prior reads it)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@st.composite
def cases(draw):
    method = draw(st.sampled_from(METHOD_NAMES))
    return draw(adapter_documents(method)), draw(model_shapes()), draw(st.integers(0, 2**16))


@settings(max_examples=120, **SETTINGS)
@given(case=cases(), batch_size=st.integers(1, 3), length=st.integers(4, 7))
def test_valid_configs_train_and_survive_save_and_load_exactly(tmp_path_factory, case, batch_size, length):
    document, shape, seed = case
    event(document["method"])
    config = config_from_dict(document)
    assert config_from_dict(config.to_dict()) == config
    torch.manual_seed(seed)
    model = smore.adapt(tiny_llama(seed, **shape), config)
    generator = torch.Generator().manual_seed(seed)
    inputs = batch(generator, batch_size, length)
    if config.method == "trex":
        smore.fit_prior(model, [batch(generator, 8, length) for _ in range(2)], seed=seed)
    with torch.no_grad():  # away from the zero init, so the adapter changes the outputs
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    model.train()
    out = model(**inputs)
    assert out.logits.shape == (batch_size, length, 40)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    aux = smore.aux_loss(model)
    assert aux.shape == () and torch.isfinite(aux)
    (out.loss + aux).backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not name.startswith("model.embed") for name in trainable)
    for name, param in trainable.items():
        assert param.grad is None or (param.grad.shape == param.shape and torch.isfinite(param.grad).all()), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    for param in model.parameters():
        assert param.requires_grad or param.grad is None  # the base stays frozen

    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    folder = tmp_path_factory.mktemp("adapter")
    smore.save_adapter(model, folder)
    reloaded = smore.load_adapter(tiny_llama(seed, **shape), folder).eval()
    assert reloaded.smore_state.config == config
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)


# -- invalid configs ------------------------------------------------------------------------------------------------


@st.composite
def junk_documents(draw) -> dict:
    method = draw(st.sampled_from(METHOD_NAMES))
    fields = [f.name for f in dataclasses.fields(METHODS[method].config_class)] + ["not_a_field"]
    values = draw(st.dictionaries(st.sampled_from(fields), JUNK, min_size=1, max_size=3))
    return {"method": method, **values}


@settings(max_examples=400, **SETTINGS)
@given(document=junk_documents() | st.dictionaries(st.sampled_from(["method", "rank"]), JUNK, max_size=2))
def test_invalid_configs_raise_only_value_error_and_accepted_ones_work(document):
    try:
        config = config_from_dict(document)
    except ValueError:
        event("refused by the config")
        return  # refused, with the right exception type
    # accepted: then it must work on a model, or be refused there with a ValueError (e.g. targets nothing)
    assert config_from_dict(config.to_dict()) == config
    model = tiny_llama(0, hidden_size=8, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2)
    try:
        smore.adapt(model, config)
    except ValueError:
        event("accepted, refused by adapt")
        return
    event(f"accepted and trained: {config.method}")
    inputs = batch(torch.Generator().manual_seed(0), 2, 5)
    if config.method == "trex":  # at least one prompt per cluster (rank_in·rank_out of them)
        smore.fit_prior(model, [batch(torch.Generator().manual_seed(1), 40, 5)])
    out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()  # CE + the adapters' aux losses (aux_loss_in_output)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_wrong_types_of_the_whole_document_are_value_errors(method):
    for document in (None, [], "lora", 3, {"method": method, "target_modules": {"a": 1}}):
        with pytest.raises(ValueError):
            config_from_dict(document)
