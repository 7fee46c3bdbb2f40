"""The checks before a run loads anything: the model source (a missing folder is not a hub id) and the memory
estimate (sized by the data's real lengths, with and without gradient checkpointing, positions checked apart)."""

from __future__ import annotations

import re

import pytest

from helpers import counting_workspace, tiny_model_folder
from smore.errors import UserError
from smore.resources import (
    DEMO_KEYS,
    MARGIN,
    check_model_source,
    check_training_memory,
    estimate_training_bytes,
)
from smore.training.config import run_config_from_dict
from smore.training.trainer import train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("resources") / "model")  # 64 positions


def _free(monkeypatch, free: float) -> None:
    monkeypatch.setattr("smore.resources.available_memory", lambda: int(free))


def test_the_estimate_is_sized_by_the_longest_real_example_not_by_max_length(model_dir, monkeypatch):
    at_max, at_data = (estimate_training_bytes(model_dir, 4, n) for n in (64, 12))
    assert at_data < at_max
    _free(monkeypatch, (at_data + at_max) / 2 / MARGIN)  # the real data fits, max_length-sized batches would not
    with pytest.raises(UserError, match=r"examples of 64 tokens, sized by data\.max_length"):
        check_training_memory(model_dir, 4, 64)
    check_training_memory(model_dir, 4, 64, lengths=[5, 8, 12, 9])  # fits: no error
    longer = [5, 8, 40]  # one long example makes a padded micro-batch of 40 tokens: the peak
    with pytest.raises(UserError, match=r"examples of 40 tokens, sized by the longest training example"):
        check_training_memory(model_dir, 4, 64, lengths=longer)


def test_checkpointing_lowers_the_estimate_and_is_advised_only_when_it_would_fit(model_dir, monkeypatch):
    plain = estimate_training_bytes(model_dir, 4, 64)
    checkpointed = estimate_training_bytes(model_dir, 4, 64, gradient_checkpointing=True)
    weights = estimate_training_bytes(model_dir, 4, 0)
    # 2 layers: 17 × 2 values per token and hidden unit without, 1 × 2 + 17 with (one layer recomputed at a time).
    assert (checkpointed - weights) * 34 == (plain - weights) * 19
    _free(monkeypatch, (plain + checkpointed) / 2 / MARGIN)
    with pytest.raises(UserError, match=r"set train\.gradient_checkpointing: true \(about") as refused:
        check_training_memory(model_dir, 4, 64)
    assert "lower train.micro_batch_size or data.max_length" in str(refused.value)
    check_training_memory(model_dir, 4, 64, gradient_checkpointing=True)  # the advice was true: it fits now
    _free(monkeypatch, weights / MARGIN)  # nothing fits: checkpointing is not advised
    for checkpointing in (False, True):
        with pytest.raises(UserError) as refused:
            check_training_memory(model_dir, 4, 64, gradient_checkpointing=checkpointing)
        assert "gradient_checkpointing" not in str(refused.value)
    with pytest.raises(UserError, match=r"lower --batch-size or --max-length, or use") as refused:
        check_training_memory(model_dir, 4, 64, keys=DEMO_KEYS)  # the demo's flags, no checkpointing switch


def test_max_length_beyond_the_models_positions_is_named_as_such(model_dir, monkeypatch):
    _free(monkeypatch, 2**50)  # plenty of memory: the error is not about memory
    with pytest.raises(UserError, match=r"data\.max_length=65 is beyond the model's max_position_embeddings=64"):
        check_training_memory(model_dir, 1, 65, lengths=[10])
    with pytest.raises(UserError, match=r"--max-length=4096 .* max_position_embeddings=64"):
        check_training_memory(model_dir, 1, 4096, keys=DEMO_KEYS)
    check_training_memory(model_dir, 1, 64)


def test_a_model_source_that_cannot_be_loaded_is_named(model_dir, tmp_path):
    check_model_source(model_dir)
    check_model_source("HuggingFaceTB/SmolLM2-135M")  # a hub id: left to transformers (download or cache)
    for missing in (tmp_path / "nope", "./nope", "~/no/such/model", "a/b/c"):
        with pytest.raises(UserError, match=r"the folder does not exist.*hub id.*network"):
            check_model_source(missing)
    with pytest.raises(UserError, match=r"no config\.json"):
        check_model_source(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        check_model_source(tmp_path / "weights.bin")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return counting_workspace(tmp_path_factory.mktemp("train"))


def _run(workspace, output, **values):
    document = {
        "model": str(workspace / "model"),
        "output_dir": str(output),
        "adapter": {"method": "lora", "rank": 2},
        "data": {"train_file": str(workspace / "train.jsonl"), "max_length": 48},
        "train": {"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 2, "log_every": 1},
    }
    document.update(values)
    return run_config_from_dict(document)


def test_train_names_a_missing_model_folder_and_a_too_long_max_length(workspace, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match=re.escape(f"model={missing}: the folder does not exist")):
        train(_run(workspace, tmp_path / "a", model=missing))
    data = {"train_file": str(workspace / "train.jsonl"), "max_length": 100}
    with pytest.raises(UserError, match=r"data\.max_length=100 .* max_position_embeddings=64"):
        train(_run(workspace, tmp_path / "b", data=data))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
