"""Distribution: the shipped Accelerate configs load, engines that cannot form here are refused (not silently
replaced), every trainable parameter gets a gradient even when an expert gets no token (so DDP never waits for an
unused one), a user error found on the main process ends every process with the same message, and a checkpoint
records its launch."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import smore
from helpers import counting_workspace, randomise, tiny_batch, tiny_llama
from smore.errors import UserError
from smore.registry import config_from_dict, get_method
from smore.routing.stats import RoutingTracker
from smore.training.engines import ENGINES, check_engine_device, gathered_state_dict, requested_engine

ROOT = Path(__file__).resolve().parents[1]

ROUTED = {
    "smore-dense": {"method": "smore", "num_experts": [3, 3], "top_k": [1, 1], "ranks": [2, 2], "router_dims": [8, 8]},
    "smore-grouped": {
        "method": "smore",
        "num_experts": [8, 8],
        "top_k": [1, 1],
        "ranks": [4, 4],
        "router_dims": [8, 8],
    },
    "lora": {"method": "lora", "rank": 2},
    "molora": {"method": "molora", "num_experts": 8, "top_k": 1, "rank": 2},
    "hydralora": {"method": "hydralora", "num_experts": 4, "rank": 2},
    "mixlora": {"method": "mixlora", "num_experts": 8, "top_k": 1, "rank": 2},
    "trex": {"method": "trex", "rank_in": 2, "rank_out": 2, "target_modules": ["up_proj", "down_proj"]},
}
"""The seven variants, with many experts and top-1 routing so that a short batch leaves some expert without a
token."""


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_the_shipped_accelerate_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    engine = ENGINES[name]
    config = load_config_from_file(str(ROOT / engine.config_file))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    assert str(config.distributed_type).endswith(expected)
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        # smore train sets DeepSpeed's accumulation itself (and "auto" here would break Accelerate's int() of it)
        assert "gradient_accumulation_steps" not in config.deepspeed_config


def test_engines_that_need_gpus_are_refused_on_a_cpu_machine_by_name():
    assert requested_engine({}).name == "ddp"
    assert requested_engine({"ACCELERATE_USE_FSDP": "true"}).name == "fsdp"
    zero3 = requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert zero3.name == "deepspeed-zero3"
    for engine in (requested_engine({"ACCELERATE_USE_FSDP": "true"}), zero3):
        with pytest.raises(UserError, match=rf"{engine.name}, which needs CUDA GPUs.*configs/accelerate/ddp.yaml"):
            check_engine_device(engine, cuda=False)
        check_engine_device(engine, cuda=True)
    check_engine_device(ENGINES["ddp"], cuda=False)
    with pytest.raises(UserError, match="stage 1"):
        requested_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})


class _Accelerator:
    """What gathered_state_dict reads of an Accelerator: the engine it formed and its gathering call."""

    def __init__(self, kind: str, gathered: dict | None = None) -> None:
        from accelerate.utils import DistributedType

        self.distributed_type = getattr(DistributedType, kind)
        self.gathered, self.calls = gathered, 0

    def get_state_dict(self, model):
        self.calls += 1
        return self.gathered


@pytest.mark.parametrize("kind", ["FSDP", "MULTI_CPU", "NO"])
def test_sharded_engines_save_the_adapter_from_the_gathered_state_dict(tmp_path, kind):
    """Under FSDP (and ZeRO-3) a process's own tensors are shards: the adapter file must come from the gathered
    state dict, the same file one process writes; elsewhere the model's own tensors are whole and nothing gathers."""
    model = smore.adapt(tiny_llama(), smore.SMoREConfig(num_experts=[2, 2], top_k=[1, 1], init="normal"))
    whole = {key: value + 1.0 for key, value in model.state_dict().items()}  # what the shards gather into
    accelerator = _Accelerator(kind, whole)
    gathered = gathered_state_dict(accelerator, model)
    assert accelerator.calls == (1 if kind == "FSDP" else 0)
    smore.save_adapter(model, tmp_path / "adapter", state_dict=gathered)
    loaded = smore.load_adapter(tiny_llama(), tmp_path / "adapter")
    source = whole if kind == "FSDP" else model.state_dict()
    adapter = {key: value for key, value in loaded.state_dict().items() if ".delta." in key}
    assert len(adapter) > 10
    for key, value in adapter.items():
        torch.testing.assert_close(value, source[key], atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_every_trainable_parameter_gets_a_gradient_when_an_expert_gets_no_token(name):
    """DDP raises "parameters that were not used" for a parameter without a gradient; stacked experts give the
    unused ones zeros instead."""
    model = smore.adapt(tiny_llama(), config_from_dict(dict(ROUTED[name])))
    batch = tiny_batch(batch=1, length=3)
    state = get_method(ROUTED[name]["method"]).state
    if state is not None and state.prepare is not None:  # T-REX's prior, fitted as the trainer does
        state.prepare(model, [tiny_batch(batch=4, length=6)], 0)
    model.train()
    tracker = RoutingTracker(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    tracker.close()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    counts = [c for levels in tracker.counts.values() for c in levels if c.dtype == torch.long]
    if name in ("smore-dense", "smore-grouped", "molora", "mixlora"):
        assert any((c == 0).any() for c in counts)  # the case under test did happen: an expert got no token


def test_the_grouped_and_dense_smore_variants_take_their_paths():
    for name, path in (("smore-dense", "dense"), ("smore-grouped", "grouped")):
        model = smore.adapt(tiny_llama(), config_from_dict(dict(ROUTED[name])))
        paths = {m.delta.expert_path for m in model.modules() if hasattr(getattr(m, "delta", None), "expert_path")}
        assert paths == {path}, name


def _launch(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _every_process_refused(completed: subprocess.CompletedProcess, expected: str) -> str:
    """The launch ended on a UserError that every process raised with the same message: exit code 2, the message
    (which contains ``expected``), no other refusal, no process left behind with the process group's "Connection
    closed by peer" and no smore traceback. Returns the message."""
    log = completed.stdout + completed.stderr
    assert completed.returncode != 0, log[-3000:]
    refusals = [line for line in log.splitlines() if line.startswith("ERROR smore")]
    # Both ranks raise the same refusal; the launcher stops the slower one as soon as the first exits, so its line
    # may not get out: at least one, and never a different one.
    assert refusals and len(set(refusals)) == 1, log[-3000:]
    assert expected in refusals[0], log[-3000:]
    assert "Connection closed" not in log, log[-3000:]
    frames = [line for line in log.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "/smore/" in f], log[-3000:]  # only the launcher's own report, no smore traceback
    assert "exitcode: 2" in log and "exitcode: 1" not in log, log[-3000:]
    return refusals[0]


def _refused_on_every_rank(tmp_path, message: str) -> None:
    """Each process of a distributed_runs.py launch wrote the same refusal (not killed by the launcher on the way)."""
    written = [(tmp_path / f"refused.rank{rank}.txt") for rank in (0, 1)]
    assert [f.read_text() if f.exists() else None for f in written] == [message.removeprefix("ERROR smore: ")] * 2


def _run_file(tmp_path, document: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.slow
def test_a_refusal_on_the_main_process_ends_every_process_with_its_message(tmp_path):
    workspace = counting_workspace(tmp_path / "ws")
    output = tmp_path / "run"
    output.mkdir()
    (output / "run_config.yaml").write_text("model: another\n")  # a folder of another run, no checkpoint
    document = _document(workspace, output, {"method": "lora", "rank": 2}, max_steps=1, micro_batch_size=2)
    completed = _launch(["-m", "smore.cli", "train", str(_run_file(tmp_path, document))], tmp_path)
    _every_process_refused(completed, "already holds files of another run")
    assert (output / "run_config.yaml").read_text() == "model: another\n"


@pytest.mark.slow
def test_a_bad_data_file_ends_every_process_with_its_message(tmp_path):
    """Found by every process (a malformed file), and found by one only (a file that one machine lacks): every
    process ends with the same message, which names the process that found it."""
    workspace = counting_workspace(tmp_path / "ws")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "count", "output": "one two"}\nnot json\n')
    document = _document(workspace, tmp_path / "run", {"method": "lora", "rank": 2}, max_steps=1)
    document["data"]["train_file"] = str(bad)
    completed = _launch(["-m", "smore.cli", "train", str(_run_file(tmp_path, document))], tmp_path)
    message = _every_process_refused(completed, "data.train_file")
    assert "process 1" not in message
    assert not (tmp_path / "run").exists()

    missing = str(tmp_path / "only-on-rank-0.jsonl")
    document = _document(workspace, tmp_path / "run1", {"method": "lora", "rank": 2}, max_steps=1)
    jobs = [{"config": document, "rank_config": {"1": {"data": {"train_file": missing}}}}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    completed = _launch([str(ROOT / "tests" / "distributed_runs.py"), str(tmp_path / "jobs.json")], tmp_path)
    message = _every_process_refused(completed, f"process 1 of 2: data.train_file={missing!r}: no such file")
    _refused_on_every_rank(tmp_path, message)
    assert not (tmp_path / "run1").exists()  # refused before the output folder was claimed


@pytest.mark.slow
def test_a_refusal_while_the_main_process_saves_ends_every_process(tmp_path):
    """The main process writes checkpoints alone while the others wait: a refusal there reaches them too."""
    workspace = counting_workspace(tmp_path / "ws")
    document = _document(workspace, tmp_path / "run", {"method": "lora", "rank": 2}, max_steps=2, save_every=1)
    (tmp_path / "jobs.json").write_text(json.dumps([{"config": document, "refuse_save_on_rank": 0}]))
    completed = _launch([str(ROOT / "tests" / "distributed_runs.py"), str(tmp_path / "jobs.json")], tmp_path)
    _refused_on_every_rank(tmp_path, _every_process_refused(completed, "checkpoint refused on this process only"))


@pytest.mark.slow
def test_a_world_size_that_does_not_divide_the_global_batch_is_refused_by_every_process(tmp_path):
    workspace = counting_workspace(tmp_path / "ws")
    document = _document(workspace, tmp_path / "run", {"method": "lora", "rank": 2}, global_batch_size=3)
    completed = _launch(["-m", "smore.cli", "train", str(_run_file(tmp_path, document))], tmp_path)
    message = _every_process_refused(completed, "train.global_batch_size=3 must be a multiple of")
    assert "micro_batch_size × processes = 1 × 2" in message and "launch 1, 3 processes" in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_engine_is_refused_by_every_process_and_nothing_is_lost(tmp_path):
    """A --resume of a checkpoint written under FSDP by a DDP launch: refused before anything is written or loaded,
    the checkpoint and the run's files unchanged."""
    import hashlib

    from smore.training.config import run_config_from_dict
    from smore.training.trainer import train

    workspace = counting_workspace(tmp_path / "ws")
    output = tmp_path / "run"
    document = _document(workspace, output, {"method": "lora", "rank": 2}, max_steps=2, save_every=1)
    train(run_config_from_dict(document))
    checkpoint = output / "checkpoint-2"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["progress"]["engine"] = "fsdp"  # as a GPU FSDP run writes it; its manifest kept consistent
    state_file.write_text(json.dumps(state))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["trainer_state.json"] = hashlib.sha256(state_file.read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}
    document["train"]["max_steps"] = 4
    command = ["-m", "smore.cli", "train", str(_run_file(tmp_path, document)), "--resume"]
    message = _every_process_refused(_launch(command, tmp_path), "was written under fsdp, this launch runs ddp")
    assert "--overwrite" in message
    assert {p: p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()} == before


def test_the_data_order_of_a_step_does_not_depend_on_the_number_of_processes(monkeypatch):
    """Why a resume with another number of processes continues the run: step k takes the same global batch (the
    seed's order of its epoch), only split otherwise; across an epoch boundary too."""
    from types import SimpleNamespace

    from smore.training import trainer
    from smore.training.config import OptimConfig

    monkeypatch.setattr(trainer, "_batches", lambda dataset, indices, size, pad: indices)
    opt = OptimConfig(global_batch_size=4, micro_batch_size=1, seed=7)

    def step_examples(processes: int, step: int) -> list[list[int]]:
        def mine(rank: int) -> list[int]:
            accelerator = SimpleNamespace(process_index=rank)
            run = SimpleNamespace(
                opt=opt, steps_per_epoch=3, dataset=range(13), pad=0, processes=processes, accelerator=accelerator
            )
            return trainer._micro_batches(run, step)

        return [mine(rank) for rank in range(processes)]

    seen = []
    for step in range(2, 7):  # the steps after a checkpoint at step 2: the rest of epoch 0, then epoch 1
        one, (first, second) = step_examples(1, step), step_examples(2, step)
        assert one[0] == first + second and len(set(first) | set(second)) == 4, step
        seen.append(one[0])
    assert seen[0] != seen[1] and set(seen[1]) != set(seen[4])  # the steps differ; epoch 1 is reshuffled


def _document(workspace, output, adapter: dict, **train) -> dict:
    return {
        "model": str(workspace / "model"),
        "output_dir": str(output),
        "adapter": dict(adapter),
        "data": {"train_file": str(workspace / "train.jsonl"), "max_length": 48},
        "train": {
            "learning_rate": 1e-2,
            "max_steps": 2,
            "global_batch_size": 4,
            "micro_batch_size": 1,  # two micro-batches per rank and step: accumulation under DDP too
            "warmup_ratio": 0.0,
            "log_every": 1,
            "lr_scheduler": "constant",
            "max_grad_norm": None,
            **train,
        },
    }


@pytest.mark.slow
def test_every_method_under_two_process_ddp_equals_one_process(tmp_path, caplog):
    """Every variant trained by 2 gloo processes (one launch) reaches the adapter of one process with the same global
    batch, on data where some expert gets no token on a rank; and a 1-process checkpoint resumed by 2 processes, and
    a 2-process checkpoint resumed by 1 process, continue like the uninterrupted 1-process run (the same step, the
    same remaining examples)."""
    from safetensors.torch import load_file

    from smore.training.config import run_config_from_dict
    from smore.training.trainer import train

    workspace = counting_workspace(tmp_path / "ws")
    jobs = [{"config": _document(workspace, tmp_path / "ddp" / name, adapter)} for name, adapter in ROUTED.items()]
    resumed = _document(workspace, tmp_path / "resumed", ROUTED["smore-grouped"], save_every=1)
    train(run_config_from_dict(resumed))  # 2 steps in one process, then 2 more in two
    resumed["train"]["max_steps"] = 4
    jobs.append({"config": resumed, "resume": True})
    shrunk = _document(workspace, tmp_path / "shrunk", ROUTED["smore-grouped"], save_every=1)
    jobs.append({"config": shrunk})  # 2 steps in two processes, then 2 more in one
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    completed = _launch([str(ROOT / "tests" / "distributed_runs.py"), str(jobs_file)], tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "written by 1 process(es), this launch has 2" in completed.stderr

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / "adapter" / "adapter_model.safetensors"))

    worst = {}
    for name, adapter in ROUTED.items():
        single = train(run_config_from_dict(_document(workspace, tmp_path / "single" / name, adapter)))
        a, b = weights(single.output_dir), weights(tmp_path / "ddp" / name)
        assert a.keys() == b.keys()
        worst[name] = max(float((a[k] - b[k]).abs().max()) for k in a)
        starved = [json.loads((tmp_path / "ddp" / name / f"starved.rank{r}.json").read_text()) for r in (0, 1)]
        if name in ("smore-dense", "smore-grouped", "molora", "mixlora"):
            assert any(starved), name  # the case under test happened: an expert without a token on a rank
    uninterrupted = train(
        run_config_from_dict(_document(workspace, tmp_path / "single4", ROUTED["smore-grouped"], max_steps=4))
    )
    a, b = weights(uninterrupted.output_dir), weights(tmp_path / "resumed")
    worst["resumed"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert (
        json.loads((tmp_path / "shrunk" / "checkpoint-2" / "trainer_state.json").read_text())["progress"]["processes"]
        == 2
    )
    shrunk["train"]["max_steps"] = 4
    with caplog.at_level("WARNING"):
        continued = train(run_config_from_dict(shrunk), resume=True)
    assert "written by 2 process(es), this launch has 1" in caplog.text and "step 3" in caplog.text
    assert [row["step"] for row in continued.history] == [1, 2, 3, 4]
    c = weights(tmp_path / "shrunk")
    worst["shrunk"] = max(float((a[k] - c[k]).abs().max()) for k in a)
    # steps 3 and 4 took the examples of the uninterrupted run's steps 3 and 4: the same losses
    for row, expected in zip(continued.history[2:], uninterrupted.history[2:], strict=True):
        assert abs(row["step_loss"] - expected["step_loss"]) < 1e-4, (row, expected)
    assert max(worst.values()) < 1e-4, worst


def test_a_checkpoint_of_another_engine_is_refused_and_another_world_size_is_logged(caplog):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from smore.training.trainer import _check_launch_of

    alone = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    with pytest.raises(UserError, match=r"written under deepspeed-zero3, this launch runs ddp.*--overwrite"):
        _check_launch_of(Path("checkpoint-2"), {"engine": "deepspeed-zero3", "processes": 2}, alone, 2)
    with caplog.at_level("WARNING"):
        _check_launch_of(Path("checkpoint-2"), {"engine": "ddp", "processes": 2}, alone, 2)
    assert "written by 2 process(es), this launch has 1" in caplog.text and "step 3" in caplog.text
    _check_launch_of(Path("checkpoint-2"), {}, alone, 2)  # written before the keys existed: plain DDP


class _RecordingEngine:
    """DeepSpeed's engine as Accelerate's wrapper drives it, after deepspeed 0.19.8 (runtime/engine.py): ``backward``
    divides the loss by ``gradient_accumulation_steps`` unless ``scale_wrt_gas=False``, ``step`` updates (and zeroes
    the gradients) only at the accumulation boundary the wrapper set. Records every call and each update's
    gradients."""

    def __init__(self, module: torch.nn.Module, accumulation: int) -> None:
        self.module, self.accumulation = module, accumulation
        self.boundary: bool | None = None
        self.calls: list[tuple] = []
        self.updates: list[dict[str, torch.Tensor]] = []

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self.boundary = is_boundary

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        self.calls.append(("backward", self.boundary, scale_wrt_gas))
        (loss / self.accumulation if scale_wrt_gas else loss).backward(retain_graph=retain_graph)

    def step(self):
        self.calls.append(("step", self.boundary))
        if self.boundary:
            grads = {n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None}
            self.updates.append(grads)
            self.module.zero_grad(set_to_none=True)


class _DeepSpeedAccelerator:
    """An Accelerator as formed under ZeRO-2 with one process, as far as the trainer's accumulation reads it: its
    ``backward`` and ``no_sync`` are Accelerate's own code, its engine wrapper Accelerate's, over the recording
    engine; the gradient state is Accelerate's."""

    from accelerate import Accelerator as _Real

    use_distributed, is_fsdp2, num_processes, process_index = True, False, 1, 0
    device = torch.device("cpu")
    backward, no_sync = _Real.backward, _Real.no_sync

    def __init__(self, engine: _RecordingEngine) -> None:
        from types import SimpleNamespace

        from accelerate.state import GradientState
        from accelerate.utils import DistributedType
        from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

        self.distributed_type = DistributedType.DEEPSPEED
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))
        self.gradient_state = GradientState()
        self.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)
        self.gradient_accumulation_steps = engine.accumulation  # prepare() takes DeepSpeed's value

    @property
    def sync_gradients(self) -> bool:
        return self.gradient_state.sync_gradients

    def reduce(self, tensor, reduction):
        return tensor

    def autocast(self):
        return contextlib.nullcontext()


def _accumulation_case():
    """A LoRA-adapted tiny Llama, three micro-batches of one step (different response lengths), and the step's
    gradient computed on their concatenation: the mean cross-entropy over all their response tokens."""
    from smore.constants import IGNORE_INDEX
    from smore.training.loss import response_loss

    model = smore.adapt(tiny_llama(), smore.LoRAConfig(rank=2))
    randomise(model)  # B non-zero, so that A gets a gradient too
    model.train()
    micro = []
    for seed, prompt in ((1, 2), (2, 5), (3, 4)):
        batch = tiny_batch(batch=1, length=8, seed=seed)
        labels = batch["input_ids"].clone()
        labels[:, :prompt] = IGNORE_INDEX
        micro.append({**batch, "labels": labels})
    whole = {key: torch.cat([b[key] for b in micro]) for key in micro[0]}
    response_loss(model, whole).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return model, micro, expected


def _accumulation_run(accelerator, model):
    from types import SimpleNamespace

    from smore.training.config import OptimConfig

    opt = OptimConfig(global_batch_size=3, micro_batch_size=1)
    return SimpleNamespace(accelerator=accelerator, processes=1, model=model, unwrapped=model, opt=opt)


def test_deepspeed_takes_one_unscaled_update_per_step_at_the_last_micro_batch():
    """Through Accelerate's own backward and DeepSpeed engine wrapper: DeepSpeed must update once per optimizer
    step, after the last micro-batch, with the gradient of the whole step (the loss is already normalised by the
    step's tokens, so not divided again by DeepSpeed's accumulation steps); and Accelerate's sync flag is left set.
    Before: the flag stayed True, so the wrapper called engine.step() after every micro-batch, each update with a
    third of a micro-batch's share."""
    from smore.training.trainer import _accumulate

    model, micro, expected = _accumulation_case()
    engine = _RecordingEngine(model, accumulation=len(micro))
    accelerator = _DeepSpeedAccelerator(engine)
    _accumulate(_accumulation_run(accelerator, model), 0, micro)
    assert engine.calls == [
        ("backward", False, False),
        ("backward", False, False),
        ("backward", True, False),
        ("step", True),
    ]
    assert len(engine.updates) == 1 and engine.updates[0].keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(engine.updates[0][name], grad, rtol=1e-5, atol=1e-7)
    assert accelerator.sync_gradients


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_under_deepspeed_a_non_finite_loss_stops_before_the_engine_updates(monkeypatch, policy):
    """DeepSpeed updates inside the step's last backward and releases the gradients, so the trainer's check after
    it would come too late: the step's loss is checked before that backward, and the engine never steps on it."""
    from smore.training import trainer

    model, micro, _ = _accumulation_case()
    engine = _RecordingEngine(model, accumulation=len(micro))
    accelerator = _DeepSpeedAccelerator(engine)
    calls = []
    real = trainer.response_loss

    def nan_on_the_second(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(trainer, "response_loss", nan_on_the_second)
    run = _accumulation_run(accelerator, model)
    run.opt = run.opt.__class__(global_batch_size=3, micro_batch_size=1, on_nonfinite=policy)
    with pytest.raises(UserError, match=r"step 1: .*not finite; stopped \(under deepspeed-zero2 a step cannot be"):
        trainer._accumulate(run, 0, micro)
    assert engine.calls == [("backward", False, False), ("backward", False, False)]  # no boundary, no update
    assert not engine.updates and accelerator.sync_gradients


def test_plain_accumulation_keeps_its_gradient_and_leaves_the_sync_flag_set():
    """Without DeepSpeed nothing extra reaches ``loss.backward`` and the accumulated gradient is the step's."""
    from accelerate import Accelerator

    from smore.training.engines import backward_options
    from smore.training.trainer import _accumulate

    model, micro, expected = _accumulation_case()
    accelerator = Accelerator(cpu=True)
    assert backward_options(accelerator) == {}
    _accumulate(_accumulation_run(accelerator, model), 0, micro)
    assert accelerator.sync_gradients
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP and DeepSpeed form only on CUDA GPUs")
@pytest.mark.parametrize("name", ["fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_gpu_engines_train_and_save_the_full_adapter(tmp_path, name):
    """For the GPU machine (not yet run): each engine trains S'MoRE and saves the gathered adapter (the shapes of a
    one-process run), not a shard."""
    from safetensors.torch import load_file

    from smore.training.config import run_config_from_dict
    from smore.training.trainer import train

    workspace = counting_workspace(tmp_path / "ws")
    single = train(run_config_from_dict(_document(workspace, tmp_path / "single", ROUTED["smore-grouped"])))
    document = _document(workspace, tmp_path / name, ROUTED["smore-grouped"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    processes = str(min(2, torch.cuda.device_count()))
    flags = ["--config_file", str(ROOT / ENGINES[name].config_file), "--num_processes", processes]
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--main_process_port", "0"]
    completed = subprocess.run(
        [*command, "-m", "smore.cli", "train", str(path)], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    a = load_file(str(single.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
