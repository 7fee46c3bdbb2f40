"""PEFT's habits on an adapted model: ``save_pretrained`` writes the adapter (not the base), HF ``Trainer``
checkpoints reload with ``smore.load_adapter``, ``print_trainable_parameters`` prints smore.summary's counts, and
``remove_adapter`` gives the class its own behaviour back."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import smore
from helpers import small_smore, tiny_batch, tiny_llama, word_tokenizer
from smore.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from smore.data import encode, prompt_for, to_example
from smore.inject import adapter_state_dict

ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def trained_like(config: smore.AdapterConfig, seed: int = 4):
    """An adapted tiny Llama whose adapter weights are off their (partly zero) initialisation."""
    model = smore.adapt(tiny_llama(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def saved_keys(folder) -> set[str]:
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as file:
        return set(file.keys())


CONFIGS = {
    "smore": small_smore,
    "lora": lambda: smore.LoRAConfig(rank=4, target_modules=["q_proj", "up_proj"]),
    "mixlora": lambda: smore.MixLoRAConfig(rank=2, num_experts=3, top_k=2),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_save_pretrained_writes_the_adapter_and_reloads_to_the_same_logits(method, tmp_path):
    model = trained_like(CONFIGS[method]())
    model.save_pretrained(tmp_path / "pretrained")
    smore.save_adapter(model, tmp_path / "adapter")

    assert {p.name for p in (tmp_path / "pretrained").iterdir()} == ADAPTER_FILES
    # Only the adapter's tensors: no base weight (embed_tokens, q_proj.weight, ...) travels with it. A LoRA is saved in
    # PEFT's layout, whose names carry PEFT's prefix (PeftModel.from_pretrained loads the folder as it is).
    prefix = "base_model.model." if method == "lora" else ""
    expected = {prefix + key for key in adapter_state_dict(model)}
    assert saved_keys(tmp_path / "pretrained") == expected == saved_keys(tmp_path / "adapter")
    assert (tmp_path / "pretrained" / CONFIG_NAME).read_text() == (tmp_path / "adapter" / CONFIG_NAME).read_text()
    batch = tiny_batch()
    reloaded = smore.load_adapter(tiny_llama(), tmp_path / "pretrained")
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)


def test_save_pretrained_takes_the_state_dict_trainer_passes(tmp_path):
    model = trained_like(small_smore())
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    name = next(key for key in state_dict if ".delta." in key)
    state_dict[name] += 1.0  # the gathered copy, not the model's own tensors, is what is written
    model.save_pretrained(tmp_path, state_dict=state_dict, is_main_process=True, safe_serialization=True)
    reloaded = smore.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(reloaded.state_dict()[name], state_dict[name])

    with pytest.raises(smore.UserError, match=r"lacks \d+ adapter tensors"):
        model.save_pretrained(tmp_path / "other", state_dict={})
    model.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    with pytest.raises(smore.UserError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_other_models_and_removed_adapters_keep_the_class_save_pretrained(tmp_path):
    model = smore.adapt(tiny_llama(), small_smore())
    plain = tiny_llama()
    plain.save_pretrained(tmp_path / "plain")  # another model of the same class still writes the whole model
    assert (tmp_path / "plain" / "model.safetensors").exists()

    copied = copy.deepcopy(model)  # the copy's save_pretrained saves the copy, not the original
    name, param = next((n, p) for n, p in copied.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.add_(1.0)
    copied.save_pretrained(tmp_path / "copy")
    assert torch.equal(smore.load_adapter(tiny_llama(), tmp_path / "copy").get_parameter(name), param)

    smore.remove_adapter(model)
    assert "save_pretrained" not in vars(model) and not hasattr(model, "print_trainable_parameters")
    model.save_pretrained(tmp_path / "removed")
    assert (tmp_path / "removed" / "model.safetensors").exists()
    assert not (tmp_path / "removed" / CONFIG_NAME).exists()


def test_print_trainable_parameters_prints_the_summary_counts(capsys):
    model = smore.adapt(tiny_llama(), small_smore())
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    report = smore.summary(model)
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", line)
    assert match, line
    assert int(match[1].replace(",", "")) == report.trainable
    assert int(match[2].replace(",", "")) == report.total
    assert float(match[3]) == pytest.approx(100 * report.trainable / report.total, abs=1e-4)
    assert line == str(report).splitlines()[-1]


# -- a real HF Trainer run -----------------------------------------------------------------------------------------


def _examples(count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        for ids in torch.randint(4, 128, (count, 8), generator=generator)
    ]


def test_a_trainer_checkpoint_reloads_with_load_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = smore.adapt(tiny_llama(), small_smore())
    model.train()
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=_examples())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))  # Trainer's own save_model -> _save -> model.save_pretrained

    model.eval()
    batch = tiny_batch()
    expected = logits(model, batch)
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        names = {p.name for p in folder.iterdir()}
        assert ADAPTER_FILES <= names and not any(name.startswith("model") for name in names), names
        reloaded = smore.load_adapter(tiny_llama(), folder)
        torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=0)
    untrained = logits(smore.adapt(tiny_llama(), small_smore()), batch)
    assert not torch.allclose(expected, untrained)  # two steps moved the adapter, and the checkpoint holds that


# -- the README's "Using a trained adapter" runs as written ----------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
README_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
README_ADAPTER = "runs/smollm2-135m/smore-4-4/adapter"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = "Translate to French . The cat sleeps Name a colour Le chat dort rouge".split()


def readme_snippet() -> str:
    section = README.read_text().split("## Using a trained adapter", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the section holds one python block"
    assert README_MODEL in blocks[0] and README_ADAPTER in blocks[0]
    return blocks[0]


def trained_folder(root: Path, template: str | None) -> tuple[Path, Path]:
    """A tiny model folder (its tokenizer with or without a chat template) and an adapter trained on it."""
    tokenizer = word_tokenizer(WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = template
    model = tiny_llama(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapted = trained_like(small_smore())  # a vocabulary-128 adapter fits: the adapted layers do not see the vocabulary
    smore.save_adapter(adapted, root / "adapter")
    return root / "model", root / "adapter"


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["plain", "chat_template"])
def test_the_readme_generation_snippet_runs_and_prompts_as_training(template, tmp_path, capsys):
    model_folder, adapter_folder = trained_folder(tmp_path, template)
    code = readme_snippet().replace(README_MODEL, str(model_folder)).replace(README_ADAPTER, str(adapter_folder))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + len(namespace["records"])

    # The prompt is the tokens training puts before the response: the same template, instruction and input joined.
    tokenizer, model = namespace["tokenizer"], namespace["model"]
    for record in namespace["records"]:
        answered = {**record, "output": "Le chat dort ."} if "instruction" in record else record
        if "messages" in record:
            answered = {"messages": [*record["messages"], {"role": "assistant", "content": "rouge"}]}
        trained = encode(to_example(answered), tokenizer, max_length=64)
        prompt = prompt_for(record, tokenizer)["input_ids"]
        start = trained["labels"].index(next(label for label in trained["labels"] if label != -100))
        assert prompt == trained["input_ids"][:start]
    # Left padding: each row of the batch continues from its own last prompt token, as the single prompt does.
    batch, inputs = namespace["batch"], namespace["inputs"]
    torch.testing.assert_close(logits(model, batch)[0, -1], logits(model, inputs)[0, -1], rtol=1e-4, atol=1e-5)


def test_prompt_for_takes_training_records_with_or_without_their_response():
    tokenizer = word_tokenizer([*WORDS, "Please", "choose", "the", "correct", "answer", "question", ":", "(", ")"])
    pairs = [
        ({"instruction": "Translate to French.", "input": "The cat sleeps."}, {"output": "Le chat dort ."}),
        ({"instruction": "Name a colour.", "output": ""}, {"output": "rouge"}),
        ({"question": "Name a colour", "choices": ["rouge", "cat"]}, {"answer": "B"}),
    ]
    for record, response in pairs:
        assert prompt_for(record, tokenizer) == prompt_for({**record, **response}, tokenizer)
    question = prompt_for(pairs[2][0], tokenizer)["input_ids"]
    assert tokenizer.decode(question, skip_special_tokens=True).startswith("Please choose the correct answer")
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "rouge"}]
    assert prompt_for({"messages": chat}, tokenizer) == prompt_for({"messages": chat[:1]}, tokenizer)
    with pytest.raises(ValueError, match="missing field 'instruction'"):
        prompt_for({"instruction": None, "input": "x"}, tokenizer, format="instruction")


def test_a_folder_of_whole_model_weights_is_named_as_such(tmp_path):
    tiny_llama().save_pretrained(tmp_path)  # what save_pretrained wrote before it saved the adapter
    with pytest.raises(smore.UserError, match=r"whole model's weights .* not a smore adapter"):
        smore.load_adapter(tiny_llama(), tmp_path)


def test_merge_and_unload_folds_a_lora_into_the_base_and_returns_the_base_model():
    model, batch = trained_like(smore.LoRAConfig(rank=4, target_modules=["q_proj", "up_proj"])), tiny_batch()
    adapted = logits(model, batch)
    merged = model.merge_and_unload()
    assert merged is model and getattr(merged, "smore_state", None) is None and not smore.adapted_modules(merged)
    assert "merge_and_unload" not in vars(merged)
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(merged, batch), logits(tiny_llama(), batch))


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_model_as_it_was():
    model = trained_like(smore.LoRAConfig(rank=4, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("lora_B.weight")).fill_(float("inf"))
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(smore.UserError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert model.smore_state is not None
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["smore", "mixlora"])
@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter"])
def test_merging_a_routed_adapter_says_why_it_cannot(method, call):
    model = trained_like(CONFIGS[method]())
    with pytest.raises(smore.UserError, match=r"routed, so it depends on each token's input.*W0"):
        getattr(model, call)()
    assert model.smore_state is not None and smore.adapted_modules(model)


def test_merge_adapter_on_a_lora_points_to_merge_and_unload():
    model = trained_like(CONFIGS["lora"]())
    with pytest.raises(smore.UserError, match=r"merge_and_unload\(\)"):
        model.merge_adapter()
