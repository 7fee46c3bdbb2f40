"""T-REX: the rank-one mixture formula, the semantic prior (fit, per-sample, reproduced after reload, kept during
cached decoding), costs, and clear errors."""

from __future__ import annotations

import pytest
import torch

import smore
from helpers import tiny_batch, tiny_llama
from smore.adapters.trex import trex_parameter_counts
from smore.adapters.trex_prior import kmeans, prompt_mask
from smore.analysis.params import model_report

CONFIG = dict(rank_in=2, rank_out=3)


def prompts(count: int = 4, seed: int = 0):
    return [tiny_batch(batch=4, length=8, seed=seed + i) for i in range(count)]


def fitted_model(seed: int = 0, **overrides):
    model = smore.adapt(tiny_llama(), smore.TREXConfig(**{**CONFIG, **overrides}))
    smore.fit_prior(model, prompts(), seed=seed)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move away from init: non-zero B, router and gates
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or "router" in name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif param.requires_grad and name.endswith(("gate_logit", "mix_logit")):
                param.fill_(0.004)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_zero_init_leaves_the_model_unchanged_and_all_linear_skips_the_head():
    model, batch = tiny_llama(), tiny_batch()
    base = logits(model, batch)
    smore.adapt(model, smore.TREXConfig(**CONFIG))
    smore.fit_prior(model, prompts())
    assert torch.equal(logits(model, batch), base)
    wrapped = smore.adapted_modules(model)
    assert len(wrapped) == 2 * 7 and "lm_head" not in wrapped  # q k v o gate up down in two layers


def test_delta_equals_the_sum_over_rank_one_experts():
    model = fitted_model()
    delta = model.model.layers[0].self_attn.q_proj.delta
    x, prior = torch.randn(5, 32), torch.randn(5, 6)
    fast = delta(x, prior=prior)
    omega, gate = torch.sigmoid(100 * delta.mix_logit), torch.sigmoid(100 * delta.gate_logit)
    scores = 32 * omega * (x @ delta.router.weight.t()).softmax(-1) + 4 * (1 - omega) * prior
    expected = torch.zeros(5, delta.lora_B.weight.shape[0])
    for n in range(5):
        for i in range(2):
            for j in range(3):
                a_i, b_j = delta.lora_A.weight[i], delta.lora_B.weight[:, j]
                expected[n] += scores[n, i * 3 + j] * (a_i @ x[n]) * b_j  # expert e = i·r2 + j
    assert torch.allclose(fast, gate * expected, atol=1e-5)


def test_prior_is_per_sample_and_differs_between_clusters():
    model = fitted_model()
    context = model.smore_state.context
    batch = tiny_batch(batch=4, length=8, seed=11)
    model(**batch)
    prior = context.state.prior
    assert prior.shape == (4, 6)
    embedding = context.state.embed(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(prior, embedding @ context.state.centroids.t())
    clusters = torch.cdist(embedding, context.state.centroids).argmin(dim=1)
    assert len(set(clusters.tolist())) > 1  # the batch spans several clusters ...
    assert not torch.allclose(prior[0], prior[1])  # ... so samples route differently
    delta = model.model.layers[0].mlp.up_proj.delta
    x = torch.randn(1, 32).expand(2, -1)  # the same token in two samples
    routing = delta.routing(x, prior[:2])
    assert not torch.allclose(routing[0], routing[1])
    assert torch.equal(
        context.state.prior_for(torch.Size([4, 8]))[:8], prior[0].expand(8, -1)
    )  # one row for all tokens


def test_prior_reads_the_prompt_only():
    model = fitted_model()
    batch = tiny_batch(batch=2, length=8)
    labels = batch["input_ids"].clone()
    labels[:, :5] = -100  # the first five tokens are the prompt
    model(**batch, labels=labels)
    first = model.smore_state.context.state.prior.clone()
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, 6:] = 3  # another response
    model(**changed, labels=labels)
    assert torch.allclose(model.smore_state.context.state.prior, first, atol=1e-6)
    assert torch.equal(prompt_mask(batch["attention_mask"], labels)[1], torch.arange(8) < 5)
    assert torch.equal(prompt_mask(batch["attention_mask"], None), batch["attention_mask"].bool())


def test_save_load_reproduces_outputs_and_prior(tmp_path):
    model, batch = fitted_model(), tiny_batch()
    smore.save_adapter(model, tmp_path)
    reloaded = smore.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(reloaded.smore_state.context.state.centroids, model.smore_state.context.state.centroids)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    assert torch.equal(reloaded.smore_state.context.state.prior, model.smore_state.context.state.prior)


def test_generation_keeps_the_prompt_prior_while_decoding():
    """The case that broke on transformers 5.24 (the KV cache passed as ``cache``): a cached decoding step must keep
    the prompt's prior instead of re-embedding its one new token against the full-length mask."""
    model = fitted_model()
    batch = tiny_batch(batch=2, length=5)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = smore.compute_prior(model, **batch)
        cached = model.generate(**batch, use_cache=True, **kwargs)
        model(**batch)
        assert torch.allclose(
            expected, model.smore_state.context.state.prior
        )  # a plain forward computes the same prior
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached[:, :5], batch["input_ids"]) and cached.shape == (2, 10)
    # The prior is the prompt's in both: with or without a cache, decoding routes alike and gives the same tokens.
    assert torch.equal(cached, uncached)


def top_level_calls(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    return calls, handle


def test_generation_embeds_the_prompt_once_and_never_re_enters_the_model():
    model = fitted_model()
    batch = tiny_batch(batch=2, length=6)
    calls, handle = top_level_calls(model)
    embeds = []
    source = model.smore_state.context.state
    original = source.encoder
    source.encoder = lambda *args: embeds.append(1) or original(*args)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    handle.remove()
    assert len(embeds) == 1  # the prompt, once, before the first step
    assert len(calls) == 4  # one top-level call per new token: the prior's pass never calls the model itself


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_of_different_lengths_generates_as_each_prompt_alone(use_cache):
    model = fitted_model()
    short, long = torch.tensor([[5, 9, 17]]), torch.tensor([[3, 44, 8, 21, 60, 7]])
    pad = 0
    input_ids = torch.cat([torch.cat([torch.full((1, 3), pad), short], dim=1), long])
    attention_mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()  # left padding on the short prompt
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=pad, use_cache=use_cache)
    with torch.no_grad():
        together = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        alone = model.generate(input_ids=long, attention_mask=torch.ones_like(long), **kwargs)
        prior = smore.compute_prior(model, input_ids, attention_mask)
        short_prior = smore.compute_prior(model, short, torch.ones_like(short))
    assert together.shape == (2, 10)
    assert torch.equal(together[1], alone[0])
    torch.testing.assert_close(prior[0], short_prior[0], rtol=1e-4, atol=1e-5)  # padding does not enter the prior


def test_a_given_prior_routes_every_call_and_beams_take_their_sequence_row():
    model = fitted_model()
    batch = tiny_batch(batch=2, length=5)
    prior = torch.randn(2, 6)
    with torch.no_grad():
        with smore.use_prior(model, prior):
            given = model(**batch).logits
            assert torch.equal(model.smore_state.context.state.prior, prior)
            beams = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
        computed = model(**batch).logits
    assert not torch.allclose(given, computed)  # the given prior was used, not the computed one
    assert beams.shape == (2, 8)
    with pytest.raises(ValueError, match=r"\(batch, 6\) tensor"):
        with smore.use_prior(model, torch.zeros(2, 5)):
            pass
    with pytest.raises(ValueError, match="holds 2 sequences"):
        with smore.use_prior(model, prior), torch.no_grad():
            model(**tiny_batch(batch=3))
    with pytest.raises(ValueError, match="only T-REX has one"):
        smore.use_prior(smore.adapt(tiny_llama(), smore.LoRAConfig()), prior).__enter__()


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cached_step_is_recognised_by_either_cache_argument(name):
    from transformers import DynamicCache

    from smore.adapters.trex_prior import continues_sequence
    from smore.compat import output_cache

    model = tiny_llama()
    batch = tiny_batch(batch=2, length=5)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    cache = output_cache(out)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5
    step = {"input_ids": batch["input_ids"][:, -1:], "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    assert continues_sequence({**step, name: cache})
    assert continues_sequence(step)  # fewer new tokens than mask columns: a cache holds the rest
    assert not continues_sequence({**batch, name: DynamicCache()})  # an empty cache begins a sequence
    assert not continues_sequence(batch)


def test_remove_adapter_restores_generate():
    model = fitted_model()
    assert "generate" in model.__dict__
    smore.remove_adapter(model)
    assert "generate" not in model.__dict__
    out = model.generate(**tiny_batch(batch=1, length=4), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


def test_training_moves_the_adapter_and_the_gates():
    model = fitted_model()
    model.train()
    batch = tiny_batch()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    delta = model.model.layers[1].mlp.down_proj.delta
    for name in ("gate_logit", "mix_logit", "router.weight", "lora_A.weight", "lora_B.weight"):
        grad = delta.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if ".delta." not in n)


def test_costs_equal_the_built_model():
    config = smore.TREXConfig(**CONFIG)
    assert trex_parameter_counts(config, 32, 64)["total"] == 2 * 32 + 3 * 64 + 32 * 6 + 2  # SPEC §2
    report = model_report(tiny_llama(), config)
    assert report.trainable == smore.summary(smore.adapt(tiny_llama(), config)).trainable


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=generator) for c in centres])
    found = kmeans(points, 3, seed=1)
    assert torch.equal(found, kmeans(points, 3, seed=1))
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.2


def test_clear_errors():
    model = smore.adapt(tiny_llama(), smore.TREXConfig(**CONFIG))
    with pytest.raises(ValueError, match=r"call smore\.fit_prior"):
        model(**tiny_batch())
    with pytest.raises(ValueError, match="fit_prior"):
        smore.save_adapter(model, "unused")
    with pytest.raises(ValueError, match="needs at least 6 prompts"):
        smore.fit_prior(model, [tiny_batch(batch=2)])
    with pytest.raises(ValueError, match="got no batches"):
        smore.fit_prior(model, [])
    lora = smore.adapt(tiny_llama(), smore.LoRAConfig())
    with pytest.raises(ValueError, match="only T-REX needs fit_prior"):
        smore.fit_prior(lora, prompts())
    with pytest.raises(ValueError, match="rank_in"):
        smore.TREXConfig(rank_in=0)


def test_fit_prior_names_a_bad_batch():
    model = smore.adapt(tiny_llama(), smore.TREXConfig(**CONFIG))
    with pytest.raises(ValueError, match="batch 0 must be a dict with an input_ids tensor"):
        smore.fit_prior(model, [{"ids": torch.zeros(2, 3)}])
    centroids = smore.fit_prior(model, tiny_batch(batch=8))  # one batch given as a dict is accepted
    assert centroids.shape == (6, 32)
