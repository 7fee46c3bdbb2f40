"""The fine-tuning data layer: reading files, record formats, loss masks, truncation and padding.

Tokenizers are built offline from a word-level vocabulary, with and without a chat template.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from helpers import counting_workspace
from smore.cli import main
from smore.constants import IGNORE_INDEX
from smore.data import (
    FORMATS,
    MAX_LISTED,
    Example,
    SFTDataset,
    collate,
    detect_format,
    encode,
    encode_prompt,
    load_records,
    multiple_choice_prompt,
    to_example,
)

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
TEMPLATE_WITHOUT_END = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = """
Please choose the correct answer to the question: What is two plus two? (A) three (B) four (C) five
Name a colour. Answer in one word. red blue green Why is the sky blue? Because of scattering.
Translate to French hello world bonjour le monde You are a helpful assistant. Hi! Hello, how can I help?
Tell me a joke. No thanks. Fine. a b c d e f g h i j k l m n o p q r s t u v w x y z
"""


def make_tokenizer(template: str | None = None, *, whitespace_split: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``CORPUS``; ``whitespace_split`` keeps punctuation attached to words."""
    pre = pre_tokenizers.WhitespaceSplit() if whitespace_split else pre_tokenizers.Whitespace()
    words = [word for word, _ in pre.pre_tokenize_str(CORPUS)]
    if whitespace_split:
        words += ["user:", "assistant:", "system:"]
    vocab = {"[UNK]": 0}
    for word in [*SPECIAL, *words]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def plain() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def templated() -> PreTrainedTokenizerFast:
    return make_tokenizer(TEMPLATE)


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


def trained_runs(tokenizer, features) -> list[list[str]]:
    """The maximal runs of tokens whose label is not -100, as token strings; checks labels equal ids there."""
    runs, current = [], []
    for token, label in zip(features["input_ids"], features["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokens(tokenizer, run) for run in runs]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


MC = {"question": "What is two plus two?", "choices": ["three", "four", "five"], "answer": "B"}
MC_PROMPT = "Please choose the correct answer to the question: What is two plus two? (A) three (B) four (C) five"
INSTRUCTION = {"instruction": "Translate to French", "input": "hello world", "output": "bonjour le monde"}
CHAT = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "No thanks."},
    ]
}


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def test_jsonl_records_skip_blank_lines_and_remember_their_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [MC, "", "   ", INSTRUCTION])
    records = load_records(path)
    assert records == [MC, INSTRUCTION]
    assert [r.location for r in records] == [f"{path}, line 1", f"{path}, line 4"]


@pytest.mark.parametrize("wrap", [lambda items: items, lambda items: {"data": items}], ids=["list", "data"])
def test_json_list_and_data_forms(tmp_path, wrap):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(wrap([MC, INSTRUCTION]), indent=2))
    records = load_records(path)
    assert records == [MC, INSTRUCTION]
    assert records[1].location == f"{path}, record 2"


def test_malformed_jsonl_line_names_file_and_line_and_leaves_file_alone(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [MC, INSTRUCTION, "", '{"question": "broken", ', MC])
    before = path.read_bytes(), path.stat().st_mtime_ns
    with pytest.raises(ValueError, match=rf"{path.name}, line 4: not valid JSON"):
        load_records(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_non_object_records_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [MC, "[1, 2]"])
    with pytest.raises(ValueError, match=r"line 2: a record must be a JSON object, not list"):
        load_records(path)
    path = tmp_path / "train.json"
    path.write_text(json.dumps([MC, "text"]))
    with pytest.raises(ValueError, match=r"record 2: a record must be a JSON object, not str"):
        load_records(path)
    path.write_text(json.dumps({"rows": [MC]}))
    with pytest.raises(ValueError, match=r"list of records or an object \{\"data\": \[...\]\}"):
        load_records(path)


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"question": "x"},\n  {oops}\n]')
    with pytest.raises(ValueError, match=r"train.json, line 3: not valid JSON"):
        load_records(path)
    path.write_text(json.dumps(MC) + "\n" + json.dumps(MC))
    with pytest.raises(ValueError, match=r"name the file .jsonl"):
        load_records(path)


@pytest.mark.parametrize(
    ("name", "content"), [("a.jsonl", ""), ("b.jsonl", "\n  \n"), ("c.json", "[]"), ("d.json", '{"data": []}')]
)
def test_empty_files_are_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=r"holds no records; the dataset is empty"):
        load_records(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_records(tmp_path / "nothing.jsonl")
    (tmp_path / "train.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"use .jsonl .* or .json"):
        load_records(tmp_path / "train.csv")


# ---------------------------------------------------------------------------------------------------------------
# Record formats


def test_multiple_choice_prompt_is_the_papers():
    example = to_example(MC)
    assert example.messages == (
        {"role": "user", "content": MC_PROMPT},
        {"role": "assistant", "content": "B"},
    )
    assert multiple_choice_prompt("What is two plus two?", ["three", "four", "five"]) == MC_PROMPT


@pytest.mark.parametrize(
    ("choices", "answer", "letter"),
    [
        (["three", "four", "five"], "B", "B"),
        (["three", "four", "five"], 2, "C"),
        (["three", "four", "five"], 0, "A"),
        (["three", "four", "five"], "four", "B"),
        (["three", "four", "five"], " C ", "C"),
        ([{"label": "1", "text": "three"}, {"label": "2", "text": "four"}], "2", "B"),
        ({"label": ["A", "B", "C"], "text": ["three", "four", "five"]}, "C", "C"),  # Hugging Face ARC layout
    ],
)
def test_multiple_choice_answer_as_letter_index_text_or_label(choices, answer, letter):
    example = to_example({"question": "What is two plus two?", "choices": choices, "answer": answer})
    assert example.messages[1]["content"] == letter
    assert example.messages[0]["content"].startswith(MC_PROMPT[: -len(" (C) five")])


def test_instruction_prompt_joins_input_only_when_present():
    assert to_example(INSTRUCTION).messages == (
        {"role": "user", "content": "Translate to French\n\nhello world"},
        {"role": "assistant", "content": "bonjour le monde"},
    )
    for extra in ({}, {"input": ""}, {"input": None}, {"input": "  "}):
        record = {"instruction": "Name a colour.", "output": "red", **extra}
        assert to_example(record).messages[0]["content"] == "Name a colour."


def test_chat_keeps_roles_and_contents():
    record = {"messages": [{**m, "name": "x"} for m in CHAT["messages"]]}
    assert to_example(record).messages == tuple(CHAT["messages"])


def test_format_detection_and_override():
    assert detect_format(MC) == "multiple_choice"
    assert detect_format(INSTRUCTION) == "instruction"
    assert detect_format(CHAT) == "chat"
    both = {**INSTRUCTION, **CHAT}
    with pytest.raises(ValueError, match=r"fits several formats .*pass format="):
        to_example(both)
    assert to_example(both, format="chat").messages == tuple(CHAT["messages"])
    with pytest.raises(ValueError, match=r"cannot tell the format of a record with keys \['prompt'\]"):
        to_example({"prompt": "x"})
    with pytest.raises(ValueError, match=r"format='alpaca' is not a known record format"):
        to_example(INSTRUCTION, format="alpaca")
    assert set(FORMATS) == {"instruction", "chat", "multiple_choice", "sharegpt", "prompt_completion", "text"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "Name a colour."}, r"missing field 'output'; the instruction format is \{instruction"),
        ({"instruction": 3, "output": "red"}, r"field 'instruction' must be a string, not int; the instruction format"),
        ({"instruction": "Name a colour.", "output": " "}, r"field 'output' is empty"),
        ({"question": "q", "choices": ["a", "b"]}, r"missing field 'answer'; the multiple_choice format"),
        ({"question": "q", "answer": "A"}, r"missing field 'choices'"),
        ({"question": "q", "choices": ["a"], "answer": "A"}, r"'choices' must be a list of 2 to 26 choices"),
        ({"question": "q", "choices": ["a", 3], "answer": "A"}, r"choices\[1\] must be a non-empty string"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"answer=2 is out of range for 2 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, r"answer='C' is neither a label, a letter A-B"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, r"'answer' must be a letter, a 0-based index"),
        ({"messages": []}, r"'messages' must be a non-empty list; the chat format"),
        ({"messages": [{"role": "human", "content": "Hi"}]}, r"messages\[0\].role='human' is not one of"),
        ({"messages": [{"role": "user", "content": ["Hi"]}]}, r"messages\[0\].content must be a string"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, r"no assistant turn"),
    ],
)
def test_bad_fields_name_location_field_and_format(tmp_path, record, message):
    path = write_jsonl(tmp_path / "train.jsonl", [MC, record])
    records = load_records(path)
    to_example(records[0])
    with pytest.raises(ValueError, match=rf"{path.name}, line 2: .*{message}"):
        to_example(records[1])


def test_in_memory_records_are_numbered(plain):
    with pytest.raises(ValueError, match=r"^record 2: missing field 'output'"):
        SFTDataset([INSTRUCTION, {"instruction": "x"}], plain, max_length=64)


# ---------------------------------------------------------------------------------------------------------------
# Loss masks


def test_plain_format_trains_on_response_and_eos_only(plain):
    features = encode(to_example(MC), plain, max_length=128)
    assert tokens(plain, features["input_ids"]) == ["<s>", *plain.tokenize(MC_PROMPT), "B", "</s>"]
    assert trained_runs(plain, features) == [["B", "</s>"]]
    assert features["attention_mask"] == [1] * len(features["input_ids"])
    assert "[UNK]" not in tokens(plain, features["input_ids"])


def test_chat_template_trains_on_response_and_end_of_turn_only(templated):
    example = to_example(INSTRUCTION)
    features = encode(example, templated, max_length=128)
    rendered = templated.apply_chat_template(list(example.messages), tokenize=False)
    assert features["input_ids"] == templated(rendered, add_special_tokens=False)["input_ids"]
    assert trained_runs(templated, features) == [["bonjour", "le", "monde", "<|end|>"]]
    assert "</s>" not in tokens(templated, features["input_ids"])  # the template's <|end|> ends the turn


def test_chat_template_without_end_marker_gets_eos(caplog):
    tokenizer = make_tokenizer(TEMPLATE_WITHOUT_END)
    with caplog.at_level(logging.WARNING):
        features = encode(to_example(MC), tokenizer, max_length=128)
    assert trained_runs(tokenizer, features) == [["B", "</s>"]]
    assert tokens(tokenizer, features["input_ids"])[-3:] == ["<|assistant|>", "B", "</s>"]
    assert not caplog.records


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["plain", "template"])
def test_multi_turn_chat_trains_on_every_assistant_turn(template):
    tokenizer = make_tokenizer(template)
    features = encode(to_example(CHAT), tokenizer, max_length=256)
    end = "<|end|>" if template else "</s>"
    assert trained_runs(tokenizer, features) == [
        [*tokenizer.tokenize("Hello, how can I help?"), end],
        [*tokenizer.tokenize("No thanks."), end],
    ]
    if template:  # the system and user turns are in the ids, with no loss
        ids = tokens(tokenizer, features["input_ids"])
        assert ids[:2] == ["<|system|>", "You"] and ids.count("<|user|>") == 2


def test_template_whose_tokens_merge_at_the_boundary_falls_back_to_separate_parts(caplog):
    # With whitespace splitting, "assistant:" + "red" renders as one word "assistant:red" (unknown), so the tokens
    # of the generation prompt are not a prefix of the full rendering; the text still is.
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tokenizer = make_tokenizer(template, whitespace_split=True)
    example = to_example({"instruction": "Name a colour.", "output": "red"})
    with caplog.at_level(logging.WARNING):
        features = encode(example, tokenizer, max_length=64)
    assert "tokenised separately" in caplog.text
    assert trained_runs(tokenizer, features) == [["red", "</s>"]]
    assert tokens(tokenizer, features["input_ids"]) == ["[UNK]", "a", "colour.", "assistant:", "red", "</s>"]


def test_template_that_rewrites_turns_falls_back_to_plain_format(caplog):
    tokenizer = make_tokenizer("{{ messages[-1].content }}{% if add_generation_prompt %} go{% endif %}")
    with caplog.at_level(logging.WARNING):
        features = encode(to_example(MC), tokenizer, max_length=128)
    assert "plain format" in caplog.text
    assert features == encode(to_example(MC), make_tokenizer(), max_length=128)


def test_tokenizer_without_bos_or_eos():
    tokenizer = make_tokenizer()
    tokenizer.bos_token = None
    tokenizer.eos_token = None
    features = encode(to_example(MC), tokenizer, max_length=128)
    assert tokens(tokenizer, features["input_ids"]) == [*tokenizer.tokenize(MC_PROMPT), "B"]
    assert trained_runs(tokenizer, features) == [["B"]]


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["plain", "template"])
def test_encode_prompt_matches_training_ids_before_the_response(template):
    tokenizer = make_tokenizer(template)
    for record in (MC, CHAT):
        example = to_example(record)
        features = encode(example, tokenizer, max_length=256)
        prompt = encode_prompt(example, tokenizer)
        last_start = max(
            i
            for i, label in enumerate(features["labels"])
            if label != IGNORE_INDEX and (i == 0 or features["labels"][i - 1] == IGNORE_INDEX)
        )
        assert prompt["input_ids"] == features["input_ids"][:last_start]
        assert prompt["attention_mask"] == [1] * last_start
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_prompt(Example(({"role": "user", "content": "Hi!"},)), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Truncation and the dataset


def test_truncation_keeps_the_start_and_warns(plain, caplog):
    full = encode(to_example(INSTRUCTION), plain, max_length=128)
    n = len(full["input_ids"])
    with caplog.at_level(logging.WARNING):
        cut = encode(to_example(INSTRUCTION), plain, max_length=n - 2)
    assert cut["input_ids"] == full["input_ids"][: n - 2]
    assert cut["labels"] == full["labels"][: n - 2]
    assert trained_runs(plain, cut) == [["bonjour", "le"]]
    assert "longer than max_length" in caplog.text


def test_dataset_drops_examples_without_response_and_warns_once(plain, caplog):
    short = {"instruction": "Name a colour.", "output": "red"}  # <s> Name a colour . red </s>: 7 tokens
    records = [short, MC, short, MC]
    with caplog.at_level(logging.WARNING):
        dataset = SFTDataset(records, plain, max_length=7)
    assert len(dataset) == 2
    assert all(trained_runs(plain, features) == [["red", "</s>"]] for features in dataset)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "2 of 4 examples are longer than max_length=7" in warnings[0]
    assert "dropped 2 of 4 examples" in warnings[1]
    with pytest.raises(ValueError, match=r"every one of the 2 examples was dropped"):
        SFTDataset([MC, MC], plain, max_length=5)


def test_dataset_from_mixed_format_file_feeds_a_dataloader(tmp_path, templated):
    path = write_jsonl(tmp_path / "train.jsonl", [MC, INSTRUCTION, CHAT])
    dataset = SFTDataset.from_file(path, templated, max_length=64)
    assert len(dataset) == 3
    loader = DataLoader(dataset, batch_size=3, collate_fn=lambda b: collate(b, templated.pad_token_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 3
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        len(run) for features in dataset for run in trained_runs(templated, features)
    )


def test_dataset_checks_every_record_before_tokenising(tmp_path, plain):
    path = write_jsonl(tmp_path / "train.jsonl", [MC] * 3 + [{"question": "q"}])
    with pytest.raises(ValueError, match=r"line 4: missing field 'choices'"):
        SFTDataset.from_file(path, plain, max_length=64)


def test_dataset_argument_errors(plain):
    with pytest.raises(ValueError, match="the dataset is empty"):
        SFTDataset([], plain, max_length=64)
    with pytest.raises(ValueError, match=r"max_length=0 must be a positive integer"):
        SFTDataset([MC], plain, max_length=0)
    with pytest.raises(ValueError, match=r"^record 1: missing field 'question'"):
        SFTDataset([INSTRUCTION], plain, max_length=64, format="multiple_choice")


# ---------------------------------------------------------------------------------------------------------------
# Padding


def test_collate_pads_right_and_left():
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    right = collate(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in right.values())
    left = collate(examples, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


def test_collate_generation_prompts_and_errors(templated):
    prompts = [encode_prompt(to_example(r), templated) for r in (MC, INSTRUCTION)]
    batch = collate(prompts, templated.pad_token_id, padding_side="left")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"][:, -1].tolist() == [templated.convert_tokens_to_ids("<|assistant|>")] * 2
    with pytest.raises(ValueError, match="no padding token"):
        collate(prompts, None)
    with pytest.raises(ValueError, match="padding_side='middle'"):
        collate(prompts, 0, padding_side="middle")
    with pytest.raises(ValueError, match="no examples"):
        collate([], 0)
    with pytest.raises(ValueError, match="labels has 1 entries but input_ids has 2"):
        collate([{"input_ids": [1, 2], "labels": [1]}], 0)


# ---------------------------------------------------------------------------------------------------------------
# The formats of other tools: TRL's prompt/completion, ShareGPT, plain text

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "Hi!"},
        {"from": "gpt", "value": "Hello, how can I help?"},
        {"from": "human", "value": "Tell me a joke."},
        {"from": "gpt", "value": "No thanks."},
    ]
}
PROMPT_COMPLETION = {"prompt": "Translate to French hello world", "completion": " bonjour le monde"}
CONVERSATIONAL_PC = {"prompt": CHAT["messages"][:4], "completion": [CHAT["messages"][4]]}
TEXT = {"text": "Why is the sky blue? Because of scattering."}


def test_new_formats_are_detected_and_chosen_by_name():
    assert detect_format(SHAREGPT) == "sharegpt"
    assert detect_format(PROMPT_COMPLETION) == detect_format(CONVERSATIONAL_PC) == "prompt_completion"
    assert detect_format(TEXT) == "text"
    # Alpaca's rows also hold the rendered "text": the structured format wins; "text" is the fallback.
    assert detect_format({**INSTRUCTION, "text": "### Instruction: ..."}) == "instruction"
    # UltraChat's rows hold the first user turn as "prompt" besides "messages": only "completion" means TRL's format.
    assert detect_format({"prompt": "Hi!", **CHAT}) == "chat"
    assert to_example({**INSTRUCTION, "text": "x y"}, format="text").messages[0]["content"] == "x y"


def test_sharegpt_trains_like_the_same_chat(templated, plain):
    assert to_example(SHAREGPT).messages == tuple(CHAT["messages"])
    for tokenizer in (templated, plain):
        assert encode(to_example(SHAREGPT), tokenizer, 128) == encode(to_example(CHAT), tokenizer, 128)
    with pytest.raises(ValueError, match=r"conversations\[0\].from='bot' is not one of .*the sharegpt format"):
        to_example({"conversations": [{"from": "bot", "value": "x"}]})


@pytest.mark.parametrize("fixture", ["plain", "templated"])
def test_string_prompt_completion_is_text_trained_on_the_completion_only(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    features = encode(to_example(PROMPT_COMPLETION), tokenizer, max_length=128)
    # No chat template even when the tokenizer has one, no separator: the completion continues the prompt's text.
    words = ["Translate", "to", "French", "hello", "world", "bonjour", "le", "monde"]
    assert tokens(tokenizer, features["input_ids"]) == ["<s>", *words, "</s>"]
    assert trained_runs(tokenizer, features) == [["bonjour", "le", "monde", "</s>"]]


def test_conversational_prompt_completion_trains_on_the_completion_only(templated):
    features = encode(to_example(CONVERSATIONAL_PC), templated, max_length=128)
    # The same text as the chat record, but the prompt's own assistant turn is context, not a target.
    assert features["input_ids"] == encode(to_example(CHAT), templated, 128)["input_ids"]
    assert trained_runs(templated, features) == [["No", "thanks", ".", "<|end|>"]]
    prompt = encode_prompt(to_example(CONVERSATIONAL_PC), templated)["input_ids"]
    assert prompt == encode_prompt(to_example(CHAT), templated)["input_ids"]
    with pytest.raises(ValueError, match=r"must both be strings or both lists of messages \(prompt is str"):
        to_example({"prompt": "Hi", "completion": [CHAT["messages"][2]]})
    with pytest.raises(ValueError, match=r"missing field 'prompt'; the prompt_completion format is"):
        to_example({"completion": "Hi"})


@pytest.mark.parametrize("fixture", ["plain", "templated"])
def test_text_trains_on_every_token(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    features = encode(to_example(TEXT), tokenizer, max_length=128)
    words = tokenizer.tokenize(TEXT["text"])
    assert tokens(tokenizer, features["input_ids"]) == ["<s>", *words, "</s>"]
    # Every token after BOS is a target (BOS itself is never predicted: nothing comes before it).
    assert trained_runs(tokenizer, features) == [[*words, "</s>"]]


def test_every_bad_line_of_a_file_is_reported_in_one_error(tmp_path, plain):
    lines = [MC, "{not json", INSTRUCTION, "[1, 2]", '{"question": 3}']
    path = write_jsonl(tmp_path / "broken.jsonl", lines)
    with pytest.raises(ValueError) as error:
        load_records(path)
    message = str(error.value)
    assert message.startswith("2 of 5 records are bad")
    assert f"{path}, line 2: not valid JSON" in message and f"{path}, line 4: a record must be a JSON object" in message
    # The records that parse are checked against their formats, every one of them, in one error too.
    path = write_jsonl(tmp_path / "fields.jsonl", [MC, {"question": "q"}, INSTRUCTION, {"instruction": "x"}, {"a": 1}])
    with pytest.raises(ValueError) as error:
        SFTDataset.from_file(path, plain, max_length=64)
    message = str(error.value)
    assert message.startswith("3 of 5 records are bad; fix or remove them:")
    for line, problem in ((2, "missing field 'choices'"), (4, "missing field 'output'"), (5, "cannot tell the format")):
        assert f"{path}, line {line}: {problem}" in message
    # Each format's schema is given once, after the list.
    assert message.count("the instruction format is") == 1 and message.count("the multiple_choice format is") == 1


def test_many_bad_lines_are_listed_up_to_a_limit_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", ["{"] * (MAX_LISTED + 5))
    with pytest.raises(ValueError) as error:
        load_records(path)
    message = str(error.value)
    assert f"line {MAX_LISTED}: not valid JSON" in message and f"line {MAX_LISTED + 1}:" not in message
    assert "... and 5 more" in message
    assert message.count("fix or remove that line") == 1


RECORD_FORMATS = {
    "sharegpt": lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
    "prompt_completion": lambda q, a: {"prompt": q, "completion": " " + a},
    "conversational": lambda q, a: {"prompt": [{"role": "user", "content": q}],
                                    "completion": [{"role": "assistant", "content": a}]},
    "chat": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    "text": lambda q, a: {"text": f"{q} {a}"},
}  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return counting_workspace(tmp_path_factory.mktemp("formats"))


@pytest.mark.parametrize("name", sorted(RECORD_FORMATS))
def test_smore_train_runs_a_step_on_each_format(workspace, tmp_path, name):
    records = [RECORD_FORMATS[name](f"What comes after {n} ?", str(n + 1)) for n in range(8)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    format = {"conversational": "prompt_completion"}.get(name, name)
    document = {
        "model": str(workspace / "model"),
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "lora", "rank": 2},
        "data": {"train_file": str(data), "format": format, "max_length": 32},
        "train": {"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 4, "log_every": 1},
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(document))  # JSON is YAML
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
