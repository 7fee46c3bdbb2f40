"""The budget tool: every proposal within ±5 %, counted exactly (model report = real trainable count after adapt)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import smore
from helpers import tiny_llama
from smore.analysis import budget as budget_module
from smore.analysis import cli as analysis_cli
from smore.analysis.budget import (
    MODEL_SHAPES,
    SEARCH_SPACES,
    TargetShapes,
    budget_methods,
    meta_model,
    propose_configs,
    resolve_budget,
)
from smore.analysis.params import COST_MODELS, model_report

TOLERANCE = 0.05
TINY_BUDGETS = [20_000, 50_000, 120_000]
SMOLLM_BUDGETS = [5_000_000, 16_000_000, 40_000_000]


@pytest.fixture(scope="module")
def tiny_meta():
    return meta_model("tiny")


@pytest.fixture(scope="module")
def smollm_meta():
    return meta_model("smollm2-135m")


def trainable_after_adapt(config: smore.AdapterConfig) -> int:
    model = smore.adapt(tiny_llama(), config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_rows(rows, model, budget):
    assert [row.method for row in rows] == budget_methods()
    for row in rows:
        assert row.missing is None
        assert abs(row.trainable - budget) <= TOLERANCE * budget, row
        assert row.deviation == pytest.approx((row.trainable - budget) / budget)
        report = model_report(model, row.config)
        assert (row.trainable, row.active, row.flops) == (report.trainable, report.active, report.flops)
        assert row.to_dict()["config"] == row.config.to_dict()


# -- proposals ------------------------------------------------------------------------------------------------------


def test_meta_model_allocates_nothing(tiny_meta, smollm_meta):
    assert all(p.device.type == "meta" for p in smollm_meta.parameters())
    shapes = MODEL_SHAPES["smollm2-135m"]
    mlp = smollm_meta.model.layers[0].mlp
    assert (mlp.gate_proj.in_features, mlp.gate_proj.out_features) == (576, 1536)
    assert len(smollm_meta.model.layers) == shapes["num_hidden_layers"]
    # The built-in tiny shapes are the tests' tiny Llama: the same parameter count.
    assert sum(p.numel() for p in tiny_meta.parameters()) == sum(p.numel() for p in tiny_llama().parameters())


def test_every_method_with_a_cost_model_and_search_space_is_proposed():
    methods = budget_methods()
    assert {"smore", "lora", "molora", "hydralora", "mixlora"} <= set(methods)
    assert methods == [m for m in COST_MODELS if m in SEARCH_SPACES]


@pytest.mark.parametrize("budget", TINY_BUDGETS)
def test_tiny_proposals_within_budget_and_equal_real_trainable(budget, tiny_meta):
    rows = propose_configs(tiny_meta, budget)
    check_rows(rows, tiny_meta, budget)
    for row in rows:
        assert trainable_after_adapt(row.config) == row.trainable, row.method


@pytest.mark.parametrize("budget", SMOLLM_BUDGETS)
def test_smollm2_proposals_within_budget(budget, smollm_meta):
    rows = propose_configs(smollm_meta, budget)
    check_rows(rows, smollm_meta, budget)
    # The same search on the layer shapes alone gives the same configs and counts.
    shapes = TargetShapes.ffn(576, 1536, 30)
    from_shapes = propose_configs(shapes, budget)
    assert [(r.config, r.trainable, r.active, r.flops) for r in from_shapes] == [
        (r.config, r.trainable, r.active, r.flops) for r in rows
    ]


def test_rows_report_gamma_and_keep_structure(smollm_meta):
    starts = [smore.SMoREConfig(num_experts=[2, 2], top_k=[1, 1]), smore.SMoREConfig(num_experts=[4, 4])]
    rows = propose_configs(smollm_meta, 16_000_000, configs=starts)
    by_summary = {row.summary.split(" r=")[0]: row for row in rows}
    assert by_summary["s=2,2 f=1,1"].gamma == 4  # C(2,1) · C(2,1)^1
    assert by_summary["s=4,4 f=2,2"].gamma == 216  # Theorem 3.4, the paper's example
    gammas = {row.method: row.gamma for row in rows if row.method != "smore"}
    assert gammas == {"lora": 1, "molora": 6, "hydralora": 1, "mixlora": 28, "trex": 1}
    smore_rows = [row for row in rows if row.method == "smore"]
    assert [r.config.num_experts for r in smore_rows] == [[2, 2], [4, 4]]
    for row in smore_rows:
        assert row.config.ranks[0] == row.config.ranks[1]  # equal ranks per level
        assert row.config.gate == "switch"
    mixlora = next(row for row in rows if row.method == "mixlora")
    assert mixlora.config.target_modules == ["mlp"]
    assert next(row for row in rows if row.method == "lora").config.target_modules == [
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def test_structure_variants_only_when_ranks_cannot_meet_the_budget(tiny_meta):
    # At 20k on the tiny model no S'MoRE (4-4) rank fits; the router's down-projection moves, the tree does not.
    rows = {row.method: row for row in propose_configs(tiny_meta, 20_000)}
    config = rows["smore"].config
    assert (config.num_experts, config.top_k) == ([4, 4], [2, 2])
    assert config.down_proj_dim != smore.SMoREConfig().down_proj_dim
    assert rows["mixlora"].config.num_experts != 8 and rows["mixlora"].config.top_k == 2
    # Where a rank fits, the defaults stay.
    rows = {row.method: row for row in propose_configs(tiny_meta, 120_000)}
    assert rows["molora"].config.num_experts == 4 and rows["mixlora"].config.num_experts == 8


def test_target_modules_apply_to_linear_level_methods(tiny_meta):
    rows = propose_configs(tiny_meta, 20_000, target_modules=["q_proj", "v_proj"], methods=["lora", "mixlora"])
    assert rows[0].config.target_modules == ["q_proj", "v_proj"]
    assert rows[1].config.target_modules == ["mlp"]
    assert trainable_after_adapt(rows[0].config) == rows[0].trainable


# -- matching a config ----------------------------------------------------------------------------------------------


def test_match_uses_the_config_count_as_budget(tiny_meta):
    match = smore.LoRAConfig(rank=40, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    budget = model_report(tiny_meta, match).trainable
    assert resolve_budget(tiny_meta, match) == budget == trainable_after_adapt(match)
    rows = propose_configs(tiny_meta, match, strict=False)
    lora = next(row for row in rows if row.method == "lora")
    assert lora.config == match and lora.deviation == 0
    for row in rows:
        assert row.config.layers_to_transform == [1]
        if row.method != "mixlora":
            assert row.config.target_modules == ["q_proj", "v_proj"]


def test_match_smore_reproduces_it(smollm_meta):
    match = smore.SMoREConfig(num_experts=[2, 2], top_k=[1, 1], ranks=[16, 16])
    rows = propose_configs(smollm_meta, match)
    budget = model_report(smollm_meta, match).trainable
    row = next(row for row in rows if row.method == "smore")
    assert row.config == match and row.trainable == budget
    check_rows(rows, smollm_meta, budget)


# -- impossible budgets and bad input -------------------------------------------------------------------------------


def test_impossible_budget_names_every_method(tiny_meta):
    with pytest.raises(ValueError) as error:
        propose_configs(tiny_meta, 10)
    message = str(error.value)
    for method in budget_methods():
        assert f"{method}: no config within ±5%" in message
    assert "raise the budget to at least" in message


def test_budget_between_two_sizes_says_what_to_change(tiny_meta):
    with pytest.raises(ValueError, match=r"molora: .*closest is E=2 k=2 r=2 .*between sizes.*num_experts"):
        propose_configs(tiny_meta, 3_000, methods=["molora"])


def test_not_strict_marks_missing_rows(tiny_meta):
    rows = propose_configs(tiny_meta, 3_000, strict=False)
    missing = {row.method: row.missing for row in rows if row.missing}
    assert set(missing) == {"smore", "molora", "mixlora"}
    assert all(reason.startswith(method) for method, reason in missing.items())
    ok = [row for row in rows if not row.missing]
    assert {row.method for row in ok} == {"lora", "hydralora", "trex"}
    assert all(abs(row.deviation) <= TOLERANCE for row in ok)


def test_shapes_list_and_missing_blocks():
    rows = propose_configs([(32, 64), (32, 64), (64, 32)], 5_000, methods=["lora", "hydralora"])
    assert rows[0].trainable == rows[0].config.rank * 3 * 96
    with pytest.raises(ValueError, match=r"mixlora.*TargetShapes"):
        propose_configs([(32, 64)], 5_000, methods=["mixlora"])
    with pytest.raises(ValueError, match="target_modules"):
        propose_configs([(32, 64)], 5_000, methods=["lora"], target_modules=["q_proj"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(budget=0), "budget"),
        (dict(budget=True), "budget"),
        (dict(budget=5_000, methods=["nope"]), "nope"),
        (dict(budget=5_000, tolerance=0), "tolerance"),
        (dict(budget=5_000, methods=["lora"], configs=[smore.SMoREConfig()]), "smore"),
    ],
)
def test_bad_input(kwargs, match, tiny_meta):
    budget = kwargs.pop("budget")
    with pytest.raises(ValueError, match=match):
        propose_configs(tiny_meta, budget, **kwargs)


def test_a_method_joins_with_its_search_space(tiny_meta, monkeypatch):
    monkeypatch.delitem(SEARCH_SPACES, "hydralora")
    assert "hydralora" not in {row.method for row in propose_configs(tiny_meta, 50_000)}
    with pytest.raises(ValueError, match="SEARCH_SPACES"):
        propose_configs(tiny_meta, 50_000, methods=["hydralora"])


def test_model_config_refuses_unknown_names():
    with pytest.raises(ValueError, match="smollm2-135m"):
        budget_module.model_config("no-such-model")


# -- CLI ------------------------------------------------------------------------------------------------------------


def run_cli(argv, capsys):
    args = analysis_cli.build_parser().parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_budget_json(capsys):
    code, out, _ = run_cli(["analyze", "budget", "--model-config", "tiny", "--budget", "50000", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["budget"] == 50_000 and result["match"] is None
    assert [row["method"] for row in result["rows"]] == budget_methods()
    model = meta_model("tiny")
    for row in result["rows"]:
        assert abs(row["deviation"]) <= TOLERANCE
        assert row["trainable"] == model_report(model, smore.config_from_dict(row["config"])).trainable


def test_cli_budget_match_table_and_config_path(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": "x", "adapter": {"method": "molora", "rank": 12, "num_experts": 4}}))
    folder = tmp_path / "model"
    meta_model("tiny").config.save_pretrained(folder)
    argv = ["analyze", "budget", "--model-config", str(folder / "config.json"), "--match", str(recipe)]
    code, out, _ = run_cli([*argv, "--methods", "molora,lora,smore", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    expected = model_report(meta_model("tiny"), smore.MoLoRAConfig(rank=12, num_experts=4)).trainable
    assert result["budget"] == expected
    assert result["rows"][0]["config"]["rank"] == 12 and result["rows"][0]["deviation"] == 0
    code, text, _ = run_cli(argv, capsys)
    assert code == 0
    assert f"budget {expected:,}" in text
    for method in budget_methods():
        assert any(line.startswith(method) for line in text.splitlines())


def test_cli_budget_errors_exit_2(capsys):
    code, out, err = run_cli(["analyze", "budget", "--model-config", "tiny", "--budget", "10"], capsys)
    assert code == 2 and out == "" and "lora: no config within" in err
    code, out, err = run_cli(["analyze", "budget", "--model-config", "nope", "--budget", "10"], capsys)
    assert code == 2 and "built-in name" in err
    argv = ["analyze", "budget", "--model-config", "tiny", "--budget", "3000", "--no-strict"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "molora (missing)" in out and "missing: molora:" in out


def test_main_cli_runs_budget(capsys):
    from smore.cli import main

    assert main(["analyze", "budget", "--model-config", "tiny", "--budget", "120000", "--methods", "lora"]) == 0
    assert "lora" in capsys.readouterr().out
    assert torch.get_default_device().type == "cpu"  # the meta-device context does not leak
