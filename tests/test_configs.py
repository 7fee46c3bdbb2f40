"""The YAML recipes under configs/: they load, build their adapter config, and match budgets within each folder."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

import smore
from smore.analysis.budget import MODEL_SHAPES, meta_model
from smore.analysis.params import model_report
from smore.training.config import run_config_from_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# configs/accelerate/ holds Accelerate launch configs (tests/test_distributed.py), not training recipes.
RECIPES = sorted(path for path in CONFIGS.rglob("*.yaml") if "accelerate" not in path.relative_to(CONFIGS).parts)
FOLDERS = sorted({path.parent for path in RECIPES})
METHOD_FILES = {"smore-2-2", "smore-4-4", "lora", "molora", "hydralora", "mixlora", "trex"}
TOLERANCE = 0.05
TRAIN_KEYS = {
    "learning_rate": 1e-4,
    "epochs": 2,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "global_batch_size": 32,
    "precision": "bf16",
    "max_grad_norm": 1.0,
    "save_every": "auto",  # a killed run can --resume
}


def _number(text: str, key: str) -> int:
    found = re.search(rf"^# {key}: ([\d,]+)", text, flags=re.MULTILINE)
    assert found, f"no '# {key}: N' comment"
    return int(found.group(1).replace(",", ""))


def test_recipes_exist():
    names = {str(folder.relative_to(CONFIGS)) for folder in FOLDERS}
    assert names == {"paper/llama-3.2-1b", "smollm2-135m"}
    for folder in FOLDERS:
        assert {path.stem for path in folder.glob("*.yaml")} == METHOD_FILES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_loads(path):
    document = yaml.safe_load(path.read_text())
    assert set(document) == {"model", "output_dir", "adapter", "train", "data"}
    run = run_config_from_dict(document)  # a recipe is a valid `smore train` run config
    assert run.train.global_batch_size == 32 and run.data.max_length == 2048
    config = smore.config_from_dict(document["adapter"])
    assert config.to_dict() == document["adapter"]
    for key, value in TRAIN_KEYS.items():
        assert document["train"][key] == value, key
    if config.method == "smore":
        expected = {"smore-2-2": ([2, 2], [1, 1]), "smore-4-4": ([4, 4], [2, 2])}[path.stem]
        assert (config.num_experts, config.top_k, config.gate) == (*expected, "switch")
    else:
        assert path.stem == config.method
    if config.method != "mixlora":
        assert config.target_modules == ["gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_folder_budgets_match(folder):
    model = meta_model(folder.name)
    assert folder.name in MODEL_SHAPES
    counts = {}
    for path in sorted(folder.glob("*.yaml")):
        text = path.read_text()
        config = smore.config_from_dict(yaml.safe_load(text)["adapter"])
        counts[path.stem] = model_report(model, config).trainable
        assert _number(text, "trainable") == counts[path.stem], path.name  # the comment is the measured count
        budget = _number(text, "budget")
        assert abs(counts[path.stem] - budget) <= TOLERANCE * budget, (path.name, counts[path.stem], budget)
    mean = sum(counts.values()) / len(counts)
    assert all(abs(count - mean) <= TOLERANCE * mean for count in counts.values()), counts


def test_recipes_are_what_generate_writes():
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    files = generate.render_all()
    assert set(files) == set(RECIPES)
    stale = [path.name for path, text in files.items() if path.read_text() != text]
    assert not stale, f"out of date, run python configs/generate.py: {stale}"
