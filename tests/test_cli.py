"""CLI smoke runs: the demo end to end for a few steps, and clear one-line errors for bad input."""

from __future__ import annotations

import smore
from smore.cli import main
from smore.demo import format_result, run_demo


def test_demo_trains_saves_and_reloads(tmp_path):
    result = run_demo(steps=30, output_dir=tmp_path, batch_size=8)
    assert result.loss_after < result.loss_before - 0.3  # the adapter learns the counting rule
    assert result.reload_max_diff == 0.0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    text = format_result(result)
    assert "with S'MoRE" in text and str(tmp_path / "adapter") in text


def test_demo_command_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "next-token accuracy" in out and "trainable parameters" in out
    config, _ = smore.read_adapter_config(tmp_path / "adapter")
    assert config.method == "smore"
