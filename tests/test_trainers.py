"""An adapted model inside the trainers people already use: HF ``Trainer`` and TRL's ``SFTTrainer`` train the routers'
balance loss with no change of theirs, counted once (``smore.inject.AuxInOutput``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

import smore
from helpers import small_smore, tiny_llama, word_tokenizer

ROWS, LENGTH, STEPS = 4, 8, 3
ROUTER = "model.layers.0.mlp.gate_proj.delta.router.levels.0.mlp.0.weight"


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """HF Trainer and TRL set Accelerate's process-wide state with their own flags; reset it after each test, so that
    a later `smore train` in the same process (any test file that runs after this one) starts from a clean state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _rows() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(4, 20, (ROWS, LENGTH), generator=generator).tolist()  # ids the word tokenizer knows


def _dataset(labels: bool):
    datasets = pytest.importorskip("datasets")
    rows = _rows()
    columns = {"input_ids": rows, "attention_mask": [[1] * LENGTH for _ in rows]}
    if labels:
        columns["labels"] = rows
    return datasets.Dataset.from_dict(columns)


class _Expected(TrainerCallback):
    """Before each step, the cross-entropy and aux loss of the whole data (one batch, no padding) under the weights
    the step starts from, computed apart from the trainer; and the first step's gradient of one router weight."""

    def __init__(self) -> None:
        self.ce: list[float] = []
        self.aux: list[float] = []
        self.router_grad: torch.Tensor | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        ids = torch.tensor(_rows())
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))  # no labels: the loss is not touched
            aux = smore.aux_loss(model)
        logits = out.logits[:, :-1].float()
        self.ce.append(float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())))
        self.aux.append(float(aux))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.router_grad is None:
            self.router_grad = model.get_parameter(ROUTER).grad.detach().clone()


def _arguments(kind, folder: Path, **extra):
    return kind(
        output_dir=str(folder),
        max_steps=STEPS,
        per_device_train_batch_size=ROWS,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        **extra,
    )


def _losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def _hf_run(tmp_path: Path, in_output: bool) -> tuple[list[float], _Expected]:
    model = smore.adapt(tiny_llama(), small_smore(), aux_loss_in_output=in_output)
    expected = _Expected()
    trainer = Trainer(model=model, args=_arguments(TrainingArguments, tmp_path), train_dataset=_dataset(labels=True))
    trainer.add_callback(expected)
    trainer.train()
    return _losses(trainer), expected


def test_hf_trainer_trains_the_balance_loss_counted_once(tmp_path):
    losses, expected = _hf_run(tmp_path / "on", in_output=True)
    assert len(losses) == STEPS and min(expected.aux) > 0
    assert losses == pytest.approx([ce + aux for ce, aux in zip(expected.ce, expected.aux)], rel=1e-4)
    plain, without = _hf_run(tmp_path / "off", in_output=False)
    assert plain == pytest.approx(without.ce, rel=1e-4)  # switched off: cross-entropy only
    assert not torch.allclose(expected.router_grad, without.router_grad)  # the routers get the balance gradient


def test_the_aux_term_of_an_accumulated_batch_is_weighted_by_its_share_of_tokens():
    """HF Trainer passes ``num_items_in_batch`` (the tokens of all accumulated micro-batches): the micro-batch's aux
    loss gets its share, as its cross-entropy does, so accumulating does not multiply the term."""
    model = smore.adapt(tiny_llama(), small_smore()).train()
    ids = torch.tensor(_rows())
    whole = model(input_ids=ids, labels=ids)
    shared = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(2 * ROWS * (LENGTH - 1)))
    assert float(shared.loss) == pytest.approx(float(whole.loss) / 2, rel=1e-5)
    assert float(shared.aux_loss) == pytest.approx(float(whole.aux_loss), rel=1e-5)  # the unweighted term


def test_the_output_carries_the_aux_loss_as_attribute_and_item_and_leaves_inference_alone():
    model = smore.adapt(tiny_llama(), small_smore()).train()
    ids = torch.tensor(_rows())
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is out["aux_loss"] and float(out.aux_loss) == pytest.approx(float(smore.aux_loss(model)))
    smore.set_aux_loss_in_output(model, False)
    plain = model(input_ids=ids, labels=ids)
    assert "aux_loss" not in plain and float(out.loss) == pytest.approx(float(plain.loss + out.aux_loss), rel=1e-5)
    smore.set_aux_loss_in_output(model, True, reduction="mean")
    mean = model(input_ids=ids, labels=ids)
    assert float(mean.aux_loss) == pytest.approx(float(smore.aux_loss(model, reduction="mean")))
    model.eval()
    assert "aux_loss" not in model(input_ids=ids) and "loss" not in model(input_ids=ids)  # generation untouched
    with pytest.raises(ValueError, match="reduction"):
        smore.set_aux_loss_in_output(model, True, reduction="max")
    with pytest.raises(ValueError, match="aux_loss_in_output"):
        smore.adapt(tiny_llama(), small_smore(), aux_loss_in_output="yes")
    smore.remove_adapter(model)
    assert not hasattr(model.config, "output_router_logits") and not model._forward_hooks


def test_reentrant_checkpointing_is_refused_at_the_forward_that_would_drop_the_aux_loss():
    from smore.compat import enable_checkpointing

    model = smore.adapt(tiny_llama(), small_smore(init="normal", balance_weight=0.5))
    enable_checkpointing(model, use_reentrant=True)
    model.train()
    model.model.embed_tokens.weight.requires_grad_(True)  # reentrant checkpointing needs an input with grad
    ids = torch.tensor(_rows())
    with pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids=ids, labels=ids, use_cache=False)


# -- TRL ---------------------------------------------------------------------------------------------------------
def _trl_run(tmp_path: Path, *, coef: float | None, in_output: bool = True) -> tuple[list[float], _Expected]:
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl==1.16.0)")
    model = smore.adapt(tiny_llama(), small_smore(), aux_loss_in_output=in_output)
    expected = _Expected()
    extra = {"activation_checkpointing": True}  # TRL's default, under the name transformers 5 reads without a warning
    if coef is not None:
        extra["router_aux_loss_coef"] = coef
    trainer = trl.SFTTrainer(
        model=model,
        args=_arguments(trl.SFTConfig, tmp_path, **extra),
        train_dataset=_dataset(labels=False),
        processing_class=word_tokenizer([str(i) for i in range(20)]),
    )
    trainer.add_callback(expected)
    trainer.train()
    return _losses(trainer), expected


def test_trl_sft_trainer_adds_the_balance_loss_once(tmp_path):
    """TRL computes its loss from its fused head, not ``outputs.loss``, and adds ``coef * outputs.aux_loss`` for a
    config that declares ``output_router_logits``: with ``router_aux_loss_coef=1.0`` the term is in, once."""
    losses, expected = _trl_run(tmp_path / "on", coef=1.0)
    assert len(losses) == STEPS and min(expected.aux) > 0
    assert losses == pytest.approx([ce + aux for ce, aux in zip(expected.ce, expected.aux)], rel=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain, without = _trl_run(tmp_path / "default", coef=None)
    assert plain == pytest.approx(without.ce, rel=1e-4)  # TRL's default: its own loss, and a warning that says so
    assert any("router_aux_loss_coef=1.0" in str(w.message) for w in caught)
    assert not torch.allclose(expected.router_grad, without.router_grad)


def test_trl_asking_for_an_aux_loss_that_was_switched_off_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set_aux_loss_in_output"):
        _trl_run(tmp_path, coef=1.0, in_output=False)


# -- the README's "With HF Trainer / TRL" runs as written ------------------------------------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_trainer_section_runs_on_the_tiny_model(tmp_path):
    pytest.importorskip("trl", reason="trl is not installed (pip install trl==1.16.0)")
    section = README.read_text().split("## With HF Trainer / TRL", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    tokenizer = word_tokenizer("The cat sleeps . Le chat dort".split())
    model = tiny_llama(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    code = code.replace("HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "m")).replace('"run/', f'"{tmp_path}/')
    code = code.replace("report_to=[]", "report_to=[], use_cpu=True")  # this machine has no GPU for TRL's bf16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL's own default (gradient_checkpointing) on transformers 5
        exec(compile(code, "README.md", "exec"), {})
    for run in ("hf", "trl"):
        assert (tmp_path / run / "adapter" / "adapter_model.safetensors").is_file()
