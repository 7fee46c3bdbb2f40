"""bench/paper_comparison.py (issue 17): the learning-rate sweep on a development slice, per-question results, paired
statistics on synthetic rows whose answer is known, the accuracy plot, and S'MoRE (2-2) and (4-4) side by side."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import smore
from smore.data import load_task
from smore.demo import demo_adapter
from test_demo import package  # noqa: F401 (the fixture: the stand-in embedded model)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import comparison_stats
import paper_comparison

PNG = b"\x89PNG\r\n\x1a\n"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_chooses_per_method_resumes_and_refuses_changes(package, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "cmp"
    args = ["--tasks", "arc_easy", "--methods", "lora,smore_2_2", "--seeds", "0", "--steps", "1", "--limit", "2",
            "--holdout", "2", "--batch-size", "2", "--micro-batch-size", "2", "--learning-rates", "1e-3,3e-3",
            "--dev-size", "3", "--output-dir", str(out)]  # fmt: skip
    assert paper_comparison.main(args) == 0
    sweep = _lines(out / "lr_sweep.jsonl")
    assert {(r["method"], r["learning_rate"]) for r in sweep} == {(m, lr) for m in ("lora", "smore_2_2")
                                                                  for lr in (1e-3, 3e-3)}  # fmt: skip
    assert all(r["task"] == "arc_easy" and r["seed"] == 0 and r["metrics"]["n"] == 3 for r in sweep)
    # The sweep trains on the training questions less the development slice, which the grid never scores.
    training = load_task("arc_easy")
    swept = _lines(out / "data" / "arc_easy_lr_sweep_answer.jsonl")
    assert len(swept) == len(training) - 3
    assert not {r["instruction"] for r in swept} & {ex.question for ex in training[:3]}
    assert len(_lines(out / "data" / "arc_easy_answer.jsonl")) == len(training)  # the grid: all of them
    # Each method's grid runs use its best development `acc` (ties: the smaller learning rate).
    rows = _lines(out / "results.jsonl")
    for method in ("lora", "smore_2_2"):
        scores = {r["learning_rate"]: r["metrics"]["acc"] for r in sweep if r["method"] == method}
        best = min(lr for lr, acc in scores.items() if acc == max(scores.values()))
        assert [r["learning_rate"] for r in rows if r["method"] == method] == [best]
    # Per-question correctness in question order: its mean is the metric, for every accuracy scored.
    for row in [*rows, *sweep]:
        assert row["correct"], row
        for metric, bits in row["correct"].items():
            assert set(bits) <= {"0", "1"} and len(bits) == row["metrics"]["n"]
            assert bits.count("1") / len(bits) == pytest.approx(row["metrics"][metric])
    assert set(rows[-1]["correct"]) == {"acc", "acc_norm", "acc_answer"}
    assert rows[-1]["description"].startswith("S'MoRE (2-2), top-k [1, 1]")
    table = (out / "table.md").read_text()
    assert "**Learning rate per method**" in table and "| lora | " in table and "| smore_2_2 | " in table
    assert "**Paired differences in `acc`**" in table and "| smore_2_2 | lora | " in table
    assert comparison_stats.READING in table
    assert (out / "accuracy.png").read_bytes().startswith(PNG)

    # Resumed: nothing trains again, neither file changes.
    before = {name: (out / name).read_text() for name in ("lr_sweep.jsonl", "results.jsonl")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(paper_comparison, "train", no_training)
    assert paper_comparison.main(args) == 0
    # Another sweep or development slice would choose on other evidence: refused, nothing written.
    assert paper_comparison.main([*args, "--learning-rates", "1e-3,1e-2"]) == 2
    assert paper_comparison.main([*args, "--dev-size", "4"]) == 2
    assert paper_comparison.main([*args, "--lr-seed", "1"]) == 2
    assert {name: (out / name).read_text() for name in before} == before

    # --report tabulates the folder's finished runs with its saved settings, training nothing: the same table, and a
    # partial grid's table says which runs are missing and gives no average over the tasks a method lacks.
    (out / "table.md").unlink()
    assert paper_comparison.main(["--report", "--output-dir", str(out)]) == 0
    assert (out / "table.md").read_text() == table
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # S'MoRE (2-2)'s run, the last, unfinished
    assert paper_comparison.main(["--report", "--output-dir", str(out)]) == 0
    partial = (out / "table.md").read_text()
    assert partial.startswith(f"**Partial**: {len(lines) - 1} of {len(lines)} runs finished; missing: "
                              "arc_easy/smore_2_2/seed 0")  # fmt: skip
    assert "| smore_2_2 | lora | " not in partial and "| lora (r " in partial
    assert paper_comparison.main(["--report", "--output-dir", str(tmp_path / "none")]) == 2


def test_a_partial_average_is_left_blank():
    rows = [{"task": t, "method": m, "seed": 0, "trainable": 0, "metrics": {"acc": 0.5}}
            for t, m in [("a", "base"), ("b", "base"), ("a", "lora"), ("b", "lora"), ("a", "smore_2_2")]]  # fmt: skip
    config = paper_comparison.ComparisonConfig(tasks=["a", "b"], methods=["lora", "smore_2_2"], scoring=["loglik"],
                                               limit=1, holdout=1)  # fmt: skip
    table = paper_comparison.format_table(rows, config, "m")
    assert "| lora | 0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 |" in table
    assert "| smore_2_2 | 0 | 50.0 ± 0.0 |  |  |" in table


def test_too_few_questions_say_how_many(monkeypatch):
    config = paper_comparison.ComparisonConfig(tasks=["arc_easy"], learning_rates=[1e-3], dev_size=10_000, limit=2,
                                               holdout=2, output_dir="unused")  # fmt: skip
    assert config.lr_task == "arc_easy"  # the first task unless given
    with pytest.raises(ValueError, match=rf"has {len(load_task('arc_easy'))} training questions; dev_size=10000"):
        paper_comparison.run(config)
    monkeypatch.setattr(paper_comparison, "load_task", lambda name, limit=None: load_task(name, 3 if limit else None))
    with pytest.raises(ValueError, match=r"arc_easy_test has 3 questions, fewer than limit=5"):
        paper_comparison.task_split("arc_easy", holdout=10, limit=5)
    with pytest.raises(ValueError, match="learning_rates"):
        paper_comparison.ComparisonConfig(learning_rates=[])
    with pytest.raises(ValueError, match="methods="):
        paper_comparison.ComparisonConfig(methods=["lora", "smore_3_3"])


def test_old_settings_and_lines_are_tolerated(tmp_path, caplog):
    """A comparison folder from before issue 17 resumes: its settings lack the new keys (their defaults are what it
    did) and its lines lack per-question results (they give accuracy, no paired statistics)."""
    config = paper_comparison.ComparisonConfig(tasks=["arc_easy"], methods=["lora", "smore"], seeds=[0, 1])
    old = {k: v for k, v in vars(config).items() if k not in ("learning_rates", "lr_task", "lr_seed", "dev_size")}
    (tmp_path / "comparison_config.yaml").write_text(yaml.safe_dump(old))
    paper_comparison._check_same_settings(tmp_path / "comparison_config.yaml", config)  # accepted
    swept = paper_comparison.ComparisonConfig(tasks=["arc_easy"], methods=["lora", "smore"], seeds=[0, 1],
                                              learning_rates=[1e-3])  # fmt: skip
    with pytest.raises(ValueError, match=r"learning_rates: None -> \[0.001\]"):
        paper_comparison._check_same_settings(tmp_path / "comparison_config.yaml", swept)
    rows = [{"task": "arc_easy", "method": m, "seed": s, "trainable": 10, "metrics": {"n": 4, "acc": a}}
            for m, s, a in [("base", 0, 0.25), ("lora", 0, 0.5), ("lora", 1, 0.75), ("smore", 0, 0.5),
                            ("smore", 1, 1.0)]]  # fmt: skip
    table = paper_comparison.format_table(rows, config, "tiny")
    assert "| lora | 10 | 62.5 ± 17.7 | 62.5 |" in table and "Paired" not in table
    bars, bootstrap = comparison_stats.accuracy_bars(rows, "acc")
    assert not bootstrap and bars["smore", "arc_easy"].mean == 75.0
    assert bars["smore", "arc_easy"].high - 75.0 == pytest.approx(1.96 * np.std([50, 100], ddof=1) / np.sqrt(2))
    path = comparison_stats.plot_accuracy(rows, "acc", tmp_path / "accuracy.png")
    assert path.read_bytes().startswith(PNG)


def _rows(correct: dict[tuple[str, str, int], str]) -> list[dict]:
    return [{"task": t, "method": m, "seed": s, "metrics": {"acc": bits.count("1") / len(bits)},
             "correct": {"acc": bits}} for (t, m, s), bits in correct.items()]  # fmt: skip


def _random_bits(rng, n, p=0.5):
    return "".join("1" if x else "0" for x in rng.random(n) < p)


def test_paired_statistics_known_answers():
    rng = np.random.default_rng(1)
    same = {(t, "lora", s): _random_bits(rng, 50) for t in ("arc_easy", "obqa") for s in (0, 1, 2)}
    rows = _rows({**same, **{(t, "smore", s): bits for (t, _, s), bits in same.items()}})
    (result,) = comparison_stats.paired_statistics(rows)
    assert (result.treatment, result.baseline) == ("smore", "lora")
    for difference in [*result.tasks.values(), result.overall]:
        assert difference.mean == 0 and difference.low <= 0 <= difference.high
        assert (difference.wins, difference.losses) == (0, 0)
    assert result.overall.ties == 6

    # S'MoRE always right, the baseline always wrong: +100 points, every (task, seed) pair won.
    rows = _rows({**{(t, "smore_4_4", s): "1" * 40 for t in ("a", "b") for s in (0, 1)},
                  **{(t, "mixlora", s): "0" * 40 for t in ("a", "b") for s in (0, 1)},
                  **{(t, "base", 0): "0" * 40 for t in ("a", "b")}})  # fmt: skip
    (result,) = comparison_stats.paired_statistics(rows)  # base is not a baseline of the paired table
    assert result.overall == comparison_stats.Difference(100.0, 100.0, 100.0, 4, 0, 0)
    assert result.tasks["a"] == comparison_stats.Difference(100.0, 100.0, 100.0, 2, 0, 0)


def test_paired_means_weigh_tasks_equally_and_intervals_cover():
    # Task a: S'MoRE gains 1 of 4 questions on seed 0, loses 1 on seed 1; task b (8 questions): gains 4 on one seed.
    rows = _rows({("a", "smore", 0): "1100", ("a", "lora", 0): "1000", ("a", "smore", 1): "0000",
                  ("a", "lora", 1): "0001", ("b", "smore", 0): "11110000", ("b", "lora", 0): "00000000"})  # fmt: skip
    (result,) = comparison_stats.paired_statistics(rows)
    assert result.tasks["a"].mean == 0.0 and (result.tasks["a"].wins, result.tasks["a"].losses) == (1, 1)
    assert result.tasks["b"].mean == 50.0
    overall = result.overall
    assert overall.mean == 25.0 and (overall.wins, overall.ties, overall.losses) == (2, 0, 1)
    # A real gap (80 % vs 40 % right) is found with an interval around it; reproducible from the fixed seed.
    rng = np.random.default_rng(2)
    rows = _rows({**{("t", "smore", s): _random_bits(rng, 300, 0.8) for s in range(3)},
                  **{("t", "lora", s): _random_bits(rng, 300, 0.4) for s in range(3)}})  # fmt: skip
    first, again = comparison_stats.paired_statistics(rows), comparison_stats.paired_statistics(rows)
    assert first == again
    assert 0 < first[0].overall.low < first[0].overall.mean < first[0].overall.high
    assert first[0].overall.low < 40 < first[0].overall.high
    table = comparison_stats.format_paired_table(first, ["t"])
    assert f"| smore | lora | {first[0].tasks['t'].cell()} | {first[0].overall.cell()} | 3 / 0 / 0 |" in table


def test_resampled_means_equal_the_explicit_resampling():
    matrix = np.arange(12, dtype=float).reshape(3, 4) % 5
    fast = comparison_stats.resampled_means(matrix, 20, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    seeds, questions = rng.integers(0, 3, (20, 3)), rng.integers(0, 4, (20, 4))
    slow = [matrix[seeds[b]][:, questions[b]].mean() for b in range(20)]
    np.testing.assert_allclose(fast, slow)


def test_plot_has_bootstrap_intervals(tmp_path):
    rng = np.random.default_rng(3)
    methods = ["base", "lora", "molora", "hydralora", "mixlora", "smore_2_2", "smore_4_4"]
    rows = _rows({(t, m, s): _random_bits(rng, 100, 0.4 + 0.03 * i) for t in ("arc_easy", "obqa", "csqa")
                  for i, m in enumerate(methods) for s in ((0,) if m == "base" else (0, 1, 2))})  # fmt: skip
    bars, bootstrap = comparison_stats.accuracy_bars(rows, "acc")
    assert bootstrap and all(bar.low <= bar.mean <= bar.high for bar in bars.values())
    path = comparison_stats.plot_accuracy(rows, "acc", tmp_path / "accuracy.png", title="synthetic")
    assert path.read_bytes().startswith(PNG)


def test_smore_shapes_side_by_side_at_one_budget(tmp_path, caplog):
    """S'MoRE (2-2) and (4-4) in one comparison, each sized to the demo S'MoRE's budget on SmolLM2-135M's shapes."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152).save_pretrained(tmp_path)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="paper_comparison"):
        adapters = paper_comparison.resolve_methods(tmp_path, ["lora", "smore_2_2", "smore_4_4", "smore"])
    assert adapters["smore_4_4"] == adapters["smore"] == demo_adapter()
    two = adapters["smore_2_2"]
    assert (two.num_experts, two.top_k) == ([2, 2], [1, 1]) and two.target_modules == demo_adapter().target_modules
    deviations = dict(re.findall(r"(\w+): [\d,]+ trainable parameters \(([-+.\d]+) % of the budget\)", caplog.text))
    assert set(deviations) == set(adapters) and deviations["smore"] == "+0.00"
    assert all(abs(float(d)) <= 5 for d in deviations.values())
    assert isinstance(adapters["lora"], smore.LoRAConfig)
