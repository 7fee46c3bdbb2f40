"""``smore train`` end to end on a tiny model saved as an HF folder: every method, resume, accumulation, DDP,
output-folder protection and config errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import counting_workspace
from smore.cli import main
from smore.training import trainer as trainer_module
from smore.training.config import apply_overrides, load_run_config, run_config_from_dict
from smore.training.trainer import train

ADAPTERS = {
    "smore": {
        "method": "smore",
        "num_experts": [2, 2],
        "top_k": [1, 1],
        "ranks": [2, 2],
        "router_dims": [8, 8],
        "down_proj_dim": 8,
    },
    "lora": {"method": "lora", "rank": 4},
    "molora": {"method": "molora", "num_experts": 3, "top_k": 2, "rank": 2, "balance_weight": 0.01},
    "hydralora": {"method": "hydralora", "num_experts": 3, "rank": 2},
    "mixlora": {"method": "mixlora", "num_experts": 3, "top_k": 2, "rank": 2},
    "trex": {"method": "trex", "rank_in": 2, "rank_out": 2, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return counting_workspace(tmp_path_factory.mktemp("train"), eval_records=4)


def run_document(workspace, output, adapter="lora", **train):
    return {
        "model": str(workspace / "model"),
        "output_dir": str(output),
        "adapter": dict(ADAPTERS[adapter]),
        "data": {
            "train_file": str(workspace / "train.jsonl"),
            "eval_file": str(workspace / "eval.jsonl"),
            "max_length": 48,
        },
        "train": {
            "learning_rate": 1e-2,
            "max_steps": 4,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "lr_scheduler": "constant",
            **train,
        },
    }


def adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_every_method_trains_and_writes_its_files(workspace, tmp_path, method):
    result = train(run_config_from_dict(run_document(workspace, tmp_path / "run", method, max_steps=12)))
    files = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "run_config.yaml",
        "logs/metrics.jsonl",
        "logs/metrics.csv",
        "checkpoint-12/manifest.json",
    } <= files
    losses = [record["loss"] for record in result.history]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the overfit set is being learned
    assert result.eval_loss is not None and result.history[-1]["eval_loss"] == result.eval_loss
    assert "logs/loss.png" in files
    if method != "lora":  # routed (top-k, or dense as HydraLoRA and T-REX): routing health is logged and plotted
        assert "logs/expert_load.png" in files
        lines = [json.loads(line) for line in (tmp_path / "run" / "logs" / "routing.jsonl").read_text().splitlines()]
        assert {line["step"] for line in lines} == set(range(1, 13))
        assert all(abs(sum(line["load"]) - 1) < 1e-6 and 0 <= line["entropy"] <= 1 for line in lines)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(workspace, tmp_path):
    document = run_document(workspace, tmp_path / "run", "smore", max_steps=6, save_every=3)
    whole = train(run_config_from_dict(document))
    expected = adapter_weights(whole.adapter_dir)
    # the same run, killed after its step-3 checkpoint: drop what came after it
    document["output_dir"] = str(tmp_path / "again")
    config = run_config_from_dict(document)
    train(config)
    import shutil

    shutil.rmtree(tmp_path / "again" / "checkpoint-6")
    shutil.rmtree(tmp_path / "again" / "adapter")
    logs = tmp_path / "again" / "logs"
    with (logs / "metrics.jsonl").open("a") as handle:  # a line a kill cut in half
        handle.write('{"step": 7, "lo')
    with (logs / "metrics.csv").open("a") as handle:  # step 12 cut to "1": a line the step filter would keep
        handle.write("1")
    resumed = train(config, resume=True)
    got = adapter_weights(resumed.adapter_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-6), key
    assert [r["step"] for r in resumed.history] == list(range(1, 7))
    # the logs hold each step once, as the uninterrupted run's: steps 4-6 were cut back before being trained again
    lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    with (logs / "metrics.csv").open(newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 7))
    whole_routing = (tmp_path / "run" / "logs" / "routing.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in (logs / "routing.jsonl").read_text().splitlines()] == [
        json.loads(x)["step"] for x in whole_routing
    ]


def test_accumulation_gives_the_same_step_as_one_big_batch(workspace, tmp_path):
    common = dict(max_steps=1, learning_rate=1e-3, max_grad_norm=None)
    one = train(run_config_from_dict(run_document(workspace, tmp_path / "one", micro_batch_size=8, **common)))
    two = train(run_config_from_dict(run_document(workspace, tmp_path / "two", micro_batch_size=2, **common)))
    a, b = adapter_weights(one.adapter_dir), adapter_weights(two.adapter_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert one.history[0]["loss"] == pytest.approx(two.history[0]["loss"], rel=1e-5)


def test_output_folder_of_another_run_is_protected(workspace, tmp_path):
    config = run_config_from_dict(run_document(workspace, tmp_path / "run", max_steps=1))
    train(config)
    with pytest.raises(ValueError, match="already holds files of another run"):
        train(config)
    # a larger max_steps alone may resume (it extends the run); a new learning rate may not
    other = run_config_from_dict(run_document(workspace, tmp_path / "run", max_steps=2, learning_rate=5e-3))
    with pytest.raises(ValueError, match="different run config"):
        train(other, resume=True)
    assert train(other, overwrite=True).steps == 2


def test_a_run_that_cannot_fit_in_memory_is_refused_before_overwriting(workspace, tmp_path, monkeypatch):
    config = run_config_from_dict(run_document(workspace, tmp_path / "run", max_steps=1))
    train(config)
    adapter = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr("smore.resources.available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"GiB of memory.*micro_batch_size"):
        train(config, overwrite=True)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_config_errors_name_the_key(workspace, tmp_path):
    document = run_document(workspace, tmp_path / "run")
    cases = [
        (apply_overrides(document, ["train.learning_rat=1"]), r"train\.learning_rat"),
        (apply_overrides(document, ["train.max_steps=two"]), r"train\.max_steps"),
        (apply_overrides(document, ["train.precision=fp8"]), r"train\.precision"),
        (apply_overrides(document, ["adapter.rank=0"]), "rank"),
        (apply_overrides(document, ["train.global_batch_size=6"]), "multiple of"),
        (apply_overrides(document, ["data.train_file="]), r"data\.train_file"),
        ({**document, "extra": 1}, "extra"),
    ]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            run_config_from_dict(bad)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    assert load_run_config(path, ["train.learning_rate=3e-4"]).train.learning_rate == 3e-4
    assert main(["train", str(path), "train.nothing=1"]) == 2  # one clear line, exit code 2


def test_cli_trains_from_yaml(workspace, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_document(workspace, tmp_path / "run", max_steps=2)))
    assert main(["train", str(path), "train.max_steps=3"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed installed")
def test_a_cpu_run_does_not_import_deepspeed(workspace, tmp_path):
    """Importing deepspeed logs "Setting accelerator to CPU" on a CPU machine; a run without a ZeRO engine has no
    use for it (Accelerate's unwrap_model imported it). A fresh process, since this one may have imported it."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_document(workspace, tmp_path / "run", "smore", max_steps=1)))
    script = (
        f"import sys; from smore.cli import main; assert main(['train', {str(path)!r}]) == 0; "
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'deepspeed'))"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.splitlines()[-1] == "[]"
    assert "Setting accelerator" not in completed.stdout + completed.stderr


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(workspace, tmp_path):
    document = run_document(workspace, tmp_path / "single", max_steps=2, learning_rate=1e-3, max_grad_norm=None)
    single = train(run_config_from_dict(document))
    document["output_dir"] = str(tmp_path / "ddp")
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(document))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own: no clash with other runs
        "--nproc_per_node",
        "2",
        "-m",
        "smore.cli",
        "train",
        str(path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    a, b = adapter_weights(single.adapter_dir), adapter_weights(tmp_path / "ddp" / "adapter")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # and the two processes really split the batch: each saw half of the global batch's tokens
    assert "processes=2" in completed.stdout + completed.stderr


def test_trained_adapter_is_evaluated_on_held_out_questions(workspace, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import smore
    from smore.evaluation import evaluate

    result = train(run_config_from_dict(run_document(workspace, tmp_path / "run", "smore", max_steps=3)))
    model = smore.load_adapter(AutoModelForCausalLM.from_pretrained(workspace / "model"), result.adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    metrics = evaluate(model, tokenizer, [f"file:{workspace / 'eval.jsonl'}"], max_new_tokens=2, progress=False)
    scores = next(iter(metrics.values()))
    assert scores["n"] == 4 and {"acc", "acc_norm", "acc_gen"} <= set(scores)
    assert all(0 <= scores[key] <= 1 for key in ("acc", "acc_norm", "acc_gen"))


def test_aux_loss_is_weighted_like_the_cross_entropy_under_accumulation(workspace, tmp_path):
    """The logged aux loss of a step is the token-weighted mean of its micro-batches' aux losses, as the CE is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import smore
    from smore.data import SFTDataset, collate, load_training_records

    document = run_document(workspace, tmp_path / "run", "molora", max_steps=1, micro_batch_size=2)
    config = run_config_from_dict(document)
    result = train(config)
    # the same step by hand: same seed, same initial adapter, same data order
    torch.manual_seed(config.train.seed)
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    smore.adapt(model, config.adapter, aux_loss_in_output=False)  # as the trainer does: out.loss is the CE alone
    model.train()
    dataset = SFTDataset(load_training_records(config.data.train_file), tokenizer, config.data.max_length)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.train.seed * 100003))
    indices = order[:8].tolist()
    micro = [collate([dataset[i] for i in indices[k : k + 2]], tokenizer.pad_token_id) for k in range(0, 8, 2)]
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    ce, aux = 0.0, 0.0
    for batch, count in zip(micro, tokens):
        out = model(**batch)
        ce += out.loss.item() * count / sum(tokens)
        aux += smore.aux_loss(model).item() * count / sum(tokens)
    assert aux > 0
    assert result.history[0]["loss"] == pytest.approx(ce, rel=1e-5)
    assert result.history[0]["aux_loss"] == pytest.approx(aux, rel=1e-5)


def test_benchmark_splits_are_training_sources():
    pytest.importorskip("pyarrow")
    from smore.data import load_task, load_training_records

    try:
        records = load_training_records("task:arc_easy[2:5]")
    except ValueError as error:
        pytest.skip(f"benchmark data not installed: {error}")
    examples = load_task("arc_easy", limit=5)[2:5]
    assert [r["answer"] for r in records] == [e.answer_index for e in examples]
    assert [r["question"] for r in records] == [e.question for e in examples]
    with pytest.raises(ValueError, match=r"task:NAME\[start:stop\]"):
        load_training_records("task:arc_easy[x]")
    with pytest.raises(ValueError, match="hf:NAME"):
        load_training_records("hf:no-split")


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_steps_are_skipped_or_stop_without_touching_the_weights(workspace, tmp_path, monkeypatch, policy):
    import smore

    real, calls = smore.aux_loss, []

    def poisoned(model, reduction="sum"):  # the micro-batches of step 2 (two per step) get a NaN aux loss
        calls.append(1)
        value = real(model, reduction=reduction)
        return value * float("nan") if len(calls) in (3, 4) else value

    monkeypatch.setattr(trainer_module, "aux_loss", poisoned)  # the trainer adds the aux loss through this name
    document = run_document(workspace, tmp_path / "run", "molora", max_steps=4, save_every=1, on_nonfinite=policy)
    if policy == "stop":
        with pytest.raises(ValueError, match="step 2: the loss or a gradient is not finite"):
            train(run_config_from_dict(document))
        assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint-*"))] == ["checkpoint-1"]
        return
    result = train(run_config_from_dict(document))
    assert [record["step"] for record in result.history] == [1, 3, 4]  # step 2 was skipped, not logged
    weights = adapter_weights(result.adapter_dir)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


@pytest.mark.parametrize("method", ["smore", "lora"])
def test_response_loss_equals_the_models_own_loss_and_gradients(method):
    """The LM head runs only where a next token carries loss; the loss and every gradient stay the model's."""
    import smore
    from helpers import tiny_llama
    from smore.training.loss import response_loss

    config = {"smore": smore.SMoREConfig(num_experts=[2, 3], top_k=[1, 2], ranks=[2, 2], router_dims=[8, 8],
                                         down_proj_dim=8, init="normal"),
              "lora": smore.LoRAConfig(rank=4)}[method]  # fmt: skip
    model = smore.adapt(tiny_llama(0), config, aux_loss_in_output=False).train()  # the model's loss: its CE alone
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 128, (3, 12), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[0, 5:9] = input_ids[0, 5:9]  # responses at different places in each row
    labels[1, 10:] = input_ids[1, 10:]
    labels[2, 3] = input_ids[2, 3]
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def loss_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference, reference_grads = loss_and_grads(lambda: model(**batch).loss)
    fast, fast_grads = loss_and_grads(lambda: response_loss(model, batch))
    torch.testing.assert_close(fast, reference)
    assert reference_grads.keys() == fast_grads.keys() and reference_grads
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, msg=name)


def test_save_every_auto_checkpoints_a_few_times_a_run(workspace, tmp_path):
    """The default saves about five times a run (at most every 500 steps, HF Trainer's habit): a killed run resumes."""
    from smore.training.config import OptimConfig

    assert OptimConfig().save_every == "auto"
    assert [OptimConfig().save_interval(n) for n in (1, 4, 12, 100, 10_000)] == [1, 1, 3, 20, 500]
    assert OptimConfig(save_every=0).save_interval(100) == 0 and OptimConfig(save_every=7).save_interval(100) == 7
    train(run_config_from_dict(run_document(workspace, tmp_path / "run", max_steps=10, keep_checkpoints=10)))
    assert sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*")) == [2, 4, 6, 8, 10]


def test_resume_extends_a_finished_run_and_names_the_keys_that_may_not_change(workspace, tmp_path):
    whole = train(run_config_from_dict(run_document(workspace, tmp_path / "whole", max_steps=6)))
    document = run_document(workspace, tmp_path / "run", max_steps=4)
    train(run_config_from_dict(document))
    longer = run_config_from_dict(apply_overrides(document, ["train.max_steps=6", "train.log_every=2"]))
    with pytest.raises(ValueError, match=r"continue it from checkpoint-4 \(step 4\).*--overwrite"):
        train(longer)  # a fresh start on the folder says what to type
    changed = apply_overrides(document, ["train.max_steps=6", "train.learning_rate=5e-3", "adapter.rank=2"])
    with pytest.raises(ValueError, match=r"adapter\.rank: 4 -> 2; train\.learning_rate: 0\.01 -> 0\.005") as error:
        train(run_config_from_dict(changed), resume=True)
    assert "train.max_steps: 4 -> 6" not in str(error.value) and "--overwrite" in str(error.value)  # allowed
    with pytest.raises(ValueError, match=r"set train\.max_steps to at least 4"):
        train(run_config_from_dict(apply_overrides(document, ["train.max_steps=3"])), resume=True)
    extended = train(longer, resume=True)  # a constant learning rate: the same as six steps in one go
    assert extended.steps == 6 and [r["step"] for r in extended.history] == [1, 2, 3, 4, 6]
    a, b = adapter_weights(whole.adapter_dir), adapter_weights(extended.adapter_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match=r"that run is complete \(checkpoint-6\).*raise train\.max_steps above 6"):
        train(longer)


def test_a_run_killed_before_its_first_checkpoint_says_to_overwrite(workspace, tmp_path):
    output = tmp_path / "run"
    (output / "logs").mkdir(parents=True)  # what a run killed before its first save leaves
    (output / "run_config.yaml").write_text("model: x\n")
    config = run_config_from_dict(run_document(workspace, output, max_steps=1))
    with pytest.raises(ValueError, match=r"no complete checkpoint.*rerun the same command with --overwrite instead"):
        train(config, resume=True)
    with pytest.raises(ValueError, match="holds no complete checkpoint, so it cannot be resumed: pass --overwrite"):
        train(config)
    assert train(config, overwrite=True).steps == 1


def test_a_short_run_logs_and_plots_its_last_step(workspace, tmp_path, monkeypatch):
    """max_steps below log_every: one log line, at the last step; the final loss is that step's, not the window's
    mean; the one point of the loss curve is drawn as a marker (a line through one point draws nothing)."""
    from matplotlib.axes import Axes

    drawn, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append(k.get("marker")) or plot(self, *a, **k))
    short = train(run_config_from_dict(run_document(workspace, tmp_path / "short", max_steps=4, log_every=10)))
    every = train(run_config_from_dict(run_document(workspace, tmp_path / "every", max_steps=4, log_every=1)))
    assert [r["step"] for r in short.history] == [4]
    assert short.final_loss == pytest.approx(every.history[-1]["loss"], rel=1e-6)  # the loss of step 4 alone
    assert short.history[0]["loss"] == pytest.approx(sum(r["loss"] for r in every.history) / 4, rel=1e-6)
    assert short.final_loss != pytest.approx(short.history[0]["loss"])
    assert drawn[0] == "o" and (tmp_path / "short" / "logs" / "loss.png").is_file()


def test_recipe_problems_of_the_machine_and_the_data_are_said(workspace, tmp_path, caplog):
    """A global batch that leaves records out of every epoch, and bf16 on a CPU, each get a warning saying so."""
    caplog.set_level(logging.WARNING, logger="smore.training.trainer")
    train(run_config_from_dict(run_document(workspace, tmp_path / "run", max_steps=1, global_batch_size=12)))
    assert "global_batch_size=12 on 16 examples" in caplog.text and "4 examples are left out" in caplog.text
    assert "train.global_batch_size=8 uses them all" in caplog.text
    with pytest.raises(ValueError, match=r"16 examples, fewer than .*; set train\.global_batch_size=16"):
        train(run_config_from_dict(run_document(workspace, tmp_path / "big", max_steps=1, global_batch_size=20)))
    if not torch.cuda.is_available():
        from accelerate.state import AcceleratorState

        caplog.clear()
        AcceleratorState._reset_state(reset_partial_state=True)  # Accelerate keeps one precision per process
        try:
            train(run_config_from_dict(run_document(workspace, tmp_path / "bf16", max_steps=1, precision="bf16")))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        assert "train.precision=bf16 on a CPU" in caplog.text and "train.precision=fp32" in caplog.text
