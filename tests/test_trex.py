"""T-REX: the rank-one mixture formula, the semantic prior (fit, per-sample, reproduced after reload, kept during
cached decoding), costs, and clear errors."""

from __future__ import annotations

import pytest
import torch

import smore
from conftest import tiny_batch, tiny_llama
from smore.analysis.params import model_report, trex_parameter_counts
from smore.prior import kmeans, prompt_mask

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
    prior = context.prior
    assert prior.shape == (4, 6)
    embedding = context.prior_source.embed(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(prior, embedding @ context.prior_source.centroids.t())
    clusters = torch.cdist(embedding, context.prior_source.centroids).argmin(dim=1)
    assert len(set(clusters.tolist())) > 1  # the batch spans several clusters ...
    assert not torch.allclose(prior[0], prior[1])  # ... so samples route differently
    delta = model.model.layers[0].mlp.up_proj.delta
    x = torch.randn(1, 32).expand(2, -1)  # the same token in two samples
    routing = delta.routing(x, prior[:2])
    assert not torch.allclose(routing[0], routing[1])
    assert torch.equal(context.prior_for(torch.Size([4, 8]))[:8], prior[0].expand(8, -1))  # one row for all tokens


def test_prior_reads_the_prompt_only():
    model = fitted_model()
    batch = tiny_batch(batch=2, length=8)
    labels = batch["input_ids"].clone()
    labels[:, :5] = -100  # the first five tokens are the prompt
    model(**batch, labels=labels)
    first = model.smore_state.context.prior.clone()
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, 6:] = 3  # another response
    model(**changed, labels=labels)
    assert torch.allclose(model.smore_state.context.prior, first, atol=1e-6)
    assert torch.equal(prompt_mask(batch["attention_mask"], labels)[1], torch.arange(8) < 5)
    assert torch.equal(prompt_mask(batch["attention_mask"], None), batch["attention_mask"].bool())


def test_save_load_reproduces_outputs_and_prior(tmp_path):
    model, batch = fitted_model(), tiny_batch()
    smore.save_adapter(model, tmp_path)
    reloaded = smore.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(
        reloaded.smore_state.context.prior_source.centroids, model.smore_state.context.prior_source.centroids
    )
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    assert torch.equal(reloaded.smore_state.context.prior, model.smore_state.context.prior)


def test_generation_keeps_the_prompt_prior_while_decoding():
    model = fitted_model()
    batch = tiny_batch(batch=2, length=5)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        prompt_prior = model.smore_state.context.prior.clone()
        model(**batch)
        assert torch.allclose(prompt_prior, model.smore_state.context.prior)  # decoding kept the prefill's prior
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached[:, :5], batch["input_ids"]) and cached.shape == (2, 10)
    # Without a cache every step re-embeds the grown sequence, so only the first new token must agree.
    assert torch.equal(cached[:, 5], uncached[:, 5])


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
