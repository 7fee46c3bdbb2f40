"""Faults, proved by injecting them: ``kill -9`` at many moments of a real ``smore train`` process (in the middle of
writing a checkpoint included), corrupted or truncated adapters and checkpoints, pickles, non-finite losses,
gradients and weights, invalid configs and data, and the protection of an existing output folder."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import smore
from helpers import counting_records, counting_workspace, tiny_batch, tiny_llama
from smore.cli import main
from smore.errors import UserError
from smore.files import read_safetensors
from smore.training import trainer as trainer_module
from smore.training.checkpoint import FAULT_ENV, checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint
from smore.training.config import run_config_from_dict
from smore.training.trainer import _prepare_output, train

STEPS = 8
ADAPTER = {  # noisy top-k: the gate draws from the RNG, so an exact resume needs the RNG state back too
    "method": "smore",
    "num_experts": [2, 2],
    "top_k": [1, 1],
    "ranks": [2, 2],
    "router_dims": [4, 4],
    "down_proj_dim": 4,
    "gate": "noisy_topk",
    "init": "normal",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return counting_workspace(tmp_path_factory.mktemp("faults"))


def run_document(workspace: Path, output: Path, **train) -> dict:
    return {
        "model": str(workspace / "model"),
        "output_dir": str(output),
        "adapter": dict(ADAPTER),
        "data": {"train_file": str(workspace / "train.jsonl"), "max_length": 48},
        "train": {
            "learning_rate": 1e-2,
            "max_steps": STEPS,
            "global_batch_size": 4,  # 4 steps an epoch: resumes cross an epoch boundary
            "micro_batch_size": 2,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "save_every": 1,
            "keep_checkpoints": 2,
            "lr_scheduler": "linear",
            **train,
        },
    }


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def check_checkpoints(output: Path) -> list[int]:
    """Every checkpoint under a final name is complete (every hash checks) with finite tensors; returns the steps."""
    found = checkpoints(output)
    for folder in found:
        verify_checkpoint(folder)
        assert all_finite(read_safetensors(folder / "adapter" / "adapter_model.safetensors")), folder
        assert all_finite(read_safetensors(folder / "optimizer.safetensors")), folder
    assert not [p for p in found if "." in p.name]  # never a .tmp, .old or .trash folder
    return [int(p.name.split("-")[1]) for p in found]


# -- kill -9 at many moments -------------------------------------------------------------------------------------
ZYGOTE = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import smore.cli, smore.training.trainer
# the heavy imports and lazy first uses, once: each run is a forked copy of this warm process
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
AutoTokenizer.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_pretrained(sys.argv[1])
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        # tqdm's write lock, made while the zygote loaded, is a semaphore shared by every forked sibling: a run
        # killed while holding it would block the next one forever. Each run takes a lock of its own.
        import threading, tqdm.std, tqdm.auto
        for bar in {tqdm.std.tqdm, tqdm.auto.tqdm}:
            bar.set_lock(threading.RLock())
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.pop("SMORE_FAULT_INJECT", None)
        os.environ.update(request["env"])
        try:
            code = smore.cli.main(request["argv"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Trainer:
    """``smore train`` in child processes forked from one warm interpreter (imports paid once), each killable."""

    def __init__(self, folder: Path, model: Path) -> None:
        self.log = folder / "train.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(model)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(self, argv: list[str], env: dict[str, str] | None = None, kill_when=None) -> int:
        """Run ``smore ARGV`` to its end; ``kill_when()`` true: SIGKILL it from here. Returns the exit code."""
        request = {"argv": argv, "env": env or {}, "log": str(self.log)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self.process.stdout.readline())["pid"]
        if kill_when is not None:
            deadline = time.monotonic() + 120
            while not kill_when():
                assert time.monotonic() < deadline, "the moment to kill never came"
                time.sleep(0.0005)
            os.kill(pid, signal.SIGKILL)  # (a child that has just exited is a zombie until reaped: no error)
        return json.loads(self.process.stdout.readline())["exit"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(folder / "adapter_model.safetensors")


def test_kill_9_at_any_moment_loses_nothing_and_resume_reaches_the_same_weights(workspace, tmp_path):
    """Ten SIGKILLs of one run: eight in the checkpoint writer at each of its stages (SMORE_FAULT_INJECT) and two sent
    from outside at moments the run does not choose. After each: the complete checkpoints all verify, none is lost, no
    partial folder is listed; ``--resume`` then goes on, and the final adapter equals an uninterrupted run's."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_document(workspace, tmp_path / "run")))
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(run_document(workspace, tmp_path / "ref")))
    out = tmp_path / "run"
    train_argv = ["train", str(tmp_path / "run.yaml")]
    resume = [*train_argv, "--resume"]

    trainer = Trainer(tmp_path, workspace / "model")  # warms up meanwhile
    # 1. a plain `python -m smore.cli train` process kills itself halfway through writing checkpoint-2
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: "checkpoint-2:adapter"}
    completed = subprocess.run(
        [sys.executable, "-m", "smore.cli", *train_argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
    assert (out / "checkpoint-2.tmp" / "adapter").is_dir()  # the half-written one is there ...
    assert check_checkpoints(out) == [1]  # ... and never taken for a checkpoint
    with pytest.raises(ValueError, match=r"manifest\.json does not exist"):  # it could not pass for complete
        verify_checkpoint(out / "checkpoint-2.tmp")

    try:
        assert trainer.run(["train", str(tmp_path / "ref.yaml")]) == 0  # the uninterrupted reference
        expected = adapter_tensors(tmp_path / "ref" / "adapter")

        def lines() -> int:
            return len((out / "logs" / "metrics.jsonl").read_text().splitlines())

        def appears(step):  # the save of checkpoint-`step` has begun (or is over)
            return lambda: (out / f"checkpoint-{step}.tmp").exists() or (out / f"checkpoint-{step}").exists()

        # (the kill, the latest complete checkpoint after it): the checkpoint writer's stages, then kills sent from
        # here at moments the run does not choose, then the last checkpoint (of a finished run) and its rewrite
        kills = [
            ({FAULT_ENV: "checkpoint-3:optimizer"}, None, 2),
            ({FAULT_ENV: "checkpoint-4:state"}, None, 3),
            ({FAULT_ENV: "checkpoint-4:manifest"}, None, 3),  # everything written, not yet renamed
            ({FAULT_ENV: "checkpoint-4:renamed"}, None, 4),  # renamed, older ones not yet pruned
            ({FAULT_ENV: "checkpoint-3:prune"}, None, 5),  # halfway through deleting checkpoint-3
            ({FAULT_ENV: "checkpoint-6:begin"}, None, 5),  # its temporary folder just made
            (None, appears(7), None),  # from here, as soon as the save of checkpoint-7 shows
            (None, "one more log line", None),  # from here, mid-step
            ({FAULT_ENV: f"checkpoint-{STEPS}:renamed"}, None, STEPS),  # the last checkpoint, before adapter/
            ({FAULT_ENV: f"checkpoint-{STEPS}:swap"}, None, STEPS),  # rewriting it on resume: old one moved aside
        ]
        latest = 1
        for env, kill_when, expect_latest in kills:
            if kill_when == "one more log line":
                kill_when = (lambda base: lambda: lines() > base)(lines())
            assert trainer.run(resume, env, kill_when) == -signal.SIGKILL, trainer.log.read_text()[-3000:]
            if env == {FAULT_ENV: f"checkpoint-{STEPS}:swap"}:  # the only copy is under .old for now
                assert not (out / f"checkpoint-{STEPS}").exists() and (out / f"checkpoint-{STEPS}.old").is_dir()
            steps = check_checkpoints(out)  # (puts a checkpoint moved aside back)
            assert steps and steps[-1] >= latest  # no complete checkpoint is ever lost
            assert expect_latest is None or steps[-1] == expect_latest, (env, steps)
            latest = steps[-1]
        assert trainer.run(resume) == 0, trainer.log.read_text()[-3000:]
    finally:
        trainer.close()
    got = adapter_tensors(out / "adapter")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), key
    assert check_checkpoints(out) == [STEPS - 1, STEPS]
    assert not [p.name for p in out.iterdir() if p.name.startswith("checkpoint-") and "." in p.name]  # cleaned up
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert [record["step"] for record in state["progress"]["history"]] == list(range(1, STEPS + 1))
    logged = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))  # each resume cut the logs back to its checkpoint: no step twice
    from transformers import AutoModelForCausalLM

    loaded = smore.load_adapter(AutoModelForCausalLM.from_pretrained(workspace / "model"), out / "adapter")
    assert smore.summary(loaded).trainable > 0


# -- untrusted and damaged files ---------------------------------------------------------------------------------
def damaged_versions(data: bytes, positions: int = 24) -> list[tuple[str, bytes]]:
    """Truncations and one-bit flips spread over the whole file (a different bit at each position)."""
    out = [(f"truncated to {n}", data[:n]) for n in sorted({0, 1, 7, 8, 9, 64, len(data) // 2, len(data) - 1})]
    for i in range(positions):
        position = (len(data) - 1) * i // (positions - 1)
        flipped = bytearray(data)
        flipped[position] ^= 1 << (i % 8)
        out.append((f"bit {i % 8} of byte {position} flipped", bytes(flipped)))
    return out


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", ["smore", "lora", "trex"])
def test_damaged_adapter_files_are_refused_naming_the_file_or_load_unchanged(tmp_path, method):
    """Every truncation and bit flip of either adapter file is a ValueError naming that file; a flip that changes
    nothing the adapter means (a version string, the format tag) may load, and then gives the same outputs."""
    configs = {
        "smore": smore.SMoREConfig(
            num_experts=[2, 2], top_k=[1, 1], ranks=[2, 2], router_dims=[4, 4], down_proj_dim=4, init="normal"
        ),
        "lora": smore.LoRAConfig(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"]),
        "trex": smore.TREXConfig(rank_in=2, rank_out=2, target_modules=["up_proj"]),
    }
    model, batch = smore.adapt(tiny_llama(), configs[method]), tiny_batch()
    if method == "trex":
        smore.fit_prior(model, [tiny_batch(batch=4, seed=s) for s in range(3)])
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    folder = tmp_path / "adapter"
    smore.save_adapter(model.eval(), folder)
    expected = logits(model, batch)
    detected = 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        file = folder / name
        good = file.read_bytes()
        for what, data in damaged_versions(good, positions=40 if name.endswith("json") else 24):
            file.write_bytes(data)
            try:
                loaded = smore.load_adapter(tiny_llama(), folder)
            except ValueError as error:
                assert str(file) in str(error), (what, str(error))
                detected += 1
            else:
                assert torch.equal(logits(loaded.eval(), batch), expected), f"{name}: {what} loaded different weights"
        file.write_bytes(good)
        # every flip inside the tensor data is caught (by the digest smore records in the file's header)
        if name.endswith("safetensors"):
            start = 8 + int.from_bytes(good[:8], "little")
            for position in range(start, len(good), max(1, (len(good) - start) // 16)):
                flipped = bytearray(good)
                flipped[position] ^= 0x10
                file.write_bytes(bytes(flipped))
                with pytest.raises(ValueError, match="does not match the sha256") as error:
                    smore.load_adapter(tiny_llama(), folder)
                assert str(file) in str(error.value)
            file.write_bytes(good)
    assert detected >= 40
    assert torch.equal(logits(smore.load_adapter(tiny_llama(), folder).eval(), batch), expected)


class _Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_never_unpickled(tmp_path):
    """An adapter folder holding a code-running pickle, under the safetensors name or the legacy .bin name: refused
    with a ValueError naming it, and the payload never runs (not even with allow_pickle, which loads weights only)."""
    from smore.interop.peft import load_peft_lora, save_peft_lora

    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"weight": _Payload(marker)})
    folder = tmp_path / "adapter"
    smore.save_adapter(smore.adapt(tiny_llama(), smore.LoRAConfig(rank=2)), folder)
    (folder / "adapter_model.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors cannot be read"):
        smore.load_adapter(tiny_llama(), folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors does not exist"):
        smore.load_adapter(tiny_llama(), folder)

    peft = tmp_path / "peft"
    save_peft_lora(smore.adapt(tiny_llama(), smore.LoRAConfig(rank=2)), peft)
    (peft / "adapter_model.safetensors").unlink()
    torch.save({"x": _Payload(marker)}, peft / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin is a pickle file"):
        load_peft_lora(tiny_llama(), peft)
    with pytest.raises(ValueError, match=r"adapter_model\.bin cannot be read"):
        load_peft_lora(tiny_llama(), peft, allow_pickle=True)  # weights_only: the payload is refused, not run
    assert not marker.exists()


def make_checkpoint(tmp_path: Path) -> tuple[Path, callable]:
    """A real checkpoint of a model after one optimizer step, and a function that loads it into a fresh copy."""

    def fresh():
        torch.manual_seed(0)
        model = smore.adapt(tiny_llama(), smore.LoRAConfig(rank=2, target_modules=["up_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return model, optimizer, scheduler

    model, optimizer, scheduler = fresh()
    model(**tiny_batch(), labels=tiny_batch()["input_ids"]).loss.backward()
    optimizer.step()
    scheduler.step()
    folder = save_checkpoint(
        tmp_path / "checkpoint-1",
        save_adapter=lambda path: smore.save_adapter(model, path),
        optimizer=optimizer,
        scheduler=scheduler,
        progress={"step": 1, "history": []},
        run_config={"model": "tiny"},
    )

    def load():
        model, optimizer, scheduler = fresh()
        return load_checkpoint(
            folder,
            load_adapter_weights=lambda path: smore.adapter_io.restore_adapter(model, path),
            optimizer=optimizer,
            scheduler=scheduler,
        )

    return folder, load


def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path):
    """Truncations and bit flips of each file of a checkpoint (manifest included), a manifest emptied, one that lists
    a path outside the folder, and a trainer state that no longer fits: each a ValueError naming a file."""
    folder, load = make_checkpoint(tmp_path)
    assert load()["step"] == 1
    names = [
        "optimizer.safetensors",
        "trainer_state.json",
        "manifest.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ]
    cases = refused = 0
    for name in names:
        file = folder / name
        good = file.read_bytes()
        for what, data in damaged_versions(good, positions=12):
            file.write_bytes(data)
            cases += 1
            try:
                progress = load()
            except ValueError as error:
                assert str(file) in str(error) or str(folder / "manifest.json") in str(error), (name, what, str(error))
                refused += 1
            else:  # only a change that means nothing: the manifest's final newline cut off
                assert (name, data) == ("manifest.json", good[:-1]) and progress["step"] == 1, (name, what)
        file.write_bytes(good)
    manifest = folder / "manifest.json"
    good = manifest.read_text()
    entries = json.loads(good)
    for bad in (
        {},
        {**entries, "../../etc/passwd": entries["trainer_state.json"]},
        {**entries, "optimizer.safetensors": 3},
    ):
        manifest.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=re.escape(str(manifest))):
            load()
        cases += 1
        refused += 1
    manifest.write_text(good)
    assert load()["step"] == 1
    assert cases == len(names) * 20 + 3 and refused == cases - 1
    # a trainer state that parses but does not fit: named too (the resume check reads it first)
    (folder / "trainer_state.json").write_text("[]")
    with pytest.raises(ValueError, match=re.escape(str(folder / "trainer_state.json"))):
        from smore.training.checkpoint import read_run_config

        read_run_config(folder)


# -- numerical faults --------------------------------------------------------------------------------------------
def poison_gradients_of_step(monkeypatch, step: int) -> None:
    """The first micro-batch of optimizer step ``step`` gets a NaN gradient on one adapter weight (the loss stays
    finite: only the gradient check can see it)."""
    real = smore.adapt

    def adapt(model, config, **kwargs):
        model = real(model, config, **kwargs)
        first = next(p for p in model.parameters() if p.requires_grad)
        calls = []

        def hook(grad):
            calls.append(1)
            return grad * float("nan") if len(calls) == 2 * step - 1 else grad  # two micro-batches per step

        first.register_hook(hook)
        return model

    monkeypatch.setattr(trainer_module, "adapt", adapt)  # the trainer adapts its model through this name


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_nan_gradient_never_reaches_a_checkpoint(workspace, tmp_path, monkeypatch, policy):
    poison_gradients_of_step(monkeypatch, 3)
    config = run_config_from_dict(
        run_document(workspace, tmp_path / "run", max_steps=5, keep_checkpoints=10, on_nonfinite=policy)
    )
    if policy == "stop":
        with pytest.raises(ValueError, match="step 3: the loss or a gradient is not finite"):
            train(config)
        assert check_checkpoints(tmp_path / "run") == [1, 2]
        return
    result = train(config)
    assert [record["step"] for record in result.history] == [1, 2, 4, 5]
    assert check_checkpoints(tmp_path / "run") == [1, 2, 4, 5]  # no checkpoint for the skipped step
    assert all_finite(adapter_tensors(result.adapter_dir))


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_weights_are_never_checkpointed(workspace, tmp_path, monkeypatch, policy):
    """An update that leaves a weight infinite (finite loss and gradients before it): the run stops at the next save
    with the step named, and every checkpoint on disk is the finite one before."""
    real, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    config = run_config_from_dict(
        run_document(workspace, tmp_path / "run", max_steps=5, keep_checkpoints=10, on_nonfinite=policy)
    )
    with pytest.raises(ValueError, match="step 3: adapter weights are not finite"):
        train(config)
    assert check_checkpoints(tmp_path / "run") == [1, 2]
    assert not (tmp_path / "run" / "checkpoint-3.tmp").exists()


def test_a_non_finite_optimizer_state_is_not_written(tmp_path):
    make_checkpoint(tmp_path)
    model = smore.adapt(tiny_llama(), smore.LoRAConfig(rank=2, target_modules=["up_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(**tiny_batch(), labels=tiny_batch()["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.state[params[0]]["exp_avg_sq"].fill_(float("nan"))
    with pytest.raises(ValueError, match=r"optimizer state .* is not finite; no checkpoint written"):
        save_checkpoint(
            tmp_path / "checkpoint-2",
            save_adapter=lambda path: smore.save_adapter(model, path),
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            progress={"step": 2, "history": []},
            run_config={},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


# -- configs, data and the output folder -------------------------------------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load the model fails the test: errors must come before it."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_invalid_configs_and_data_fail_before_the_model_loads(workspace, tmp_path, no_model_loading):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(counting_records(1)[0]) + "\n" + '{"question": "cut off' + "\n")
    bad_record = tmp_path / "bad_record.jsonl"
    bad_record.write_text("\n".join(json.dumps(r) for r in counting_records(8)) + '\n{"question": "x", "choices": 3}\n')
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps(counting_records(1)[0]) + "\n")
    cases = [
        ({"data": {"train_file": str(bad_line)}}, rf"{bad_line}, line 2: not valid JSON"),
        ({"data": {"train_file": str(bad_record)}}, rf"{bad_record}, line 9: .*choices"),
        ({"data": {"eval_file": str(bad_line)}}, rf"{bad_line}, line 2"),
        ({"data": {"train_file": str(few)}}, r"fewer than train\.global_batch_size"),
        ({"train": {"precision": "fp16"}}, r"train\.precision=fp16 needs a CUDA GPU"),
    ]
    for change, message in cases:
        document = run_document(workspace, tmp_path / "run")
        for section, values in change.items():
            document[section].update(values)
        with pytest.raises(ValueError, match=message):
            train(run_config_from_dict(document))
        assert not (tmp_path / "run").exists()  # the output folder is not even created
    # through the command line: one clear line, exit code 2, and still no model loaded
    for override in ("train.learning_rate=-1", "adapter.ranks=[2]", "data.max_length=2", "train.on_nonfinite=maybe"):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(run_document(workspace, tmp_path / "run")))
        assert main(["train", str(path), override]) == 2
    assert main(["train", str(tmp_path / "run.yaml"), f"data.train_file={bad_line}"]) == 2


def test_a_failed_run_never_changes_an_existing_output_folder(workspace, tmp_path, monkeypatch):
    output = tmp_path / "run"
    document = run_document(workspace, output, max_steps=2)
    train(run_config_from_dict(document))
    before = snapshot(output)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    other = run_document(workspace, output, max_steps=3, learning_rate=5e-3)  # the learning rate may not change
    broken = run_document(workspace, output, max_steps=2)
    broken["data"]["train_file"] = str(bad)
    attempts = [
        (document, {}, "already holds files of another run"),
        (other, {"resume": True}, "different run config"),
        (broken, {"resume": True}, "line 1: not valid JSON"),
        (broken, {"overwrite": True}, "line 1: not valid JSON"),  # even --overwrite deletes nothing for a bad run
    ]
    for values, flags, message in attempts:
        with pytest.raises(ValueError, match=message):
            train(run_config_from_dict(values), **flags)
        assert snapshot(output) == before
    # a damaged checkpoint named on --resume, nothing changed
    state = output / "checkpoint-2" / "trainer_state.json"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=re.escape(str(state))):
        train(run_config_from_dict(document), resume=True)
    # well-formed JSON that its manifest vouches for, but a progress without a step: named, nothing changed
    manifest_file = state.parent / "manifest.json"
    good_manifest = manifest_file.read_bytes()
    damaged = json.loads(good)
    del damaged["progress"]["step"]
    state.write_text(json.dumps(damaged))
    manifest = json.loads(good_manifest)
    manifest["trainer_state.json"] = hashlib.sha256(state.read_bytes()).hexdigest()
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(str(state)) + ".*integer step"):
        train(run_config_from_dict(document), resume=True)
    state.write_bytes(good)
    manifest_file.write_bytes(good_manifest)
    assert snapshot(output) == before


def test_overwrite_only_replaces_a_runs_own_files(workspace, tmp_path):
    """--overwrite pointed at a folder with anything else in it (data, code, a home folder) deletes nothing."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "logs").mkdir()
    config = run_config_from_dict(run_document(workspace, folder, max_steps=1))
    with pytest.raises(ValueError, match=r"holds files no run writes \(\['notes\.txt'\]\)"):
        _prepare_output(config, resume=False, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "logs").is_dir()
    run = tmp_path / "run"
    train(run_config_from_dict(run_document(workspace, run, max_steps=1)))
    assert train(run_config_from_dict(run_document(workspace, run, max_steps=2)), overwrite=True).steps == 2


def test_data_and_method_problems_name_the_fix_before_the_model_loads(workspace, tmp_path, no_model_loading):
    """A missing held-out file is named by its key; T-REX on fewer records than its prior's clusters says which
    config change fits the data. Both before the model loads, and no output folder is left behind."""
    trex = {"method": "trex", "rank_in": 4, "rank_out": 8, "target_modules": ["gate_proj", "up_proj", "down_proj"]}
    cases = [
        ({"data": {"eval_file": str(tmp_path / "eval.jsonl")}}, r"data\.eval_file=.*eval\.jsonl'?: no such file.*"
         r"data\.eval_file=null"),
        ({"data": {"train_file": str(tmp_path / "none.jsonl")}}, r"data\.train_file=.*none\.jsonl'?: no such file"),
        ({"adapter": trex}, r"rank_in=4 × rank_out=8 = 32 experts.* 16 records; use fewer experts, e\.g\. "
         r"adapter\.rank_out=4 \(rank_in=4\), or train on at least 32 records"),
    ]  # fmt: skip
    for change, message in cases:
        document = run_document(workspace, tmp_path / "run")
        for section, values in change.items():
            document[section] = values if section == "adapter" else {**document[section], **values}
        with pytest.raises(ValueError, match=message):
            train(run_config_from_dict(document))
        assert not (tmp_path / "run").exists()


def test_a_fresh_start_that_fails_while_setting_up_leaves_nothing_behind(workspace, tmp_path, monkeypatch):
    """The model (or the method's state) failing to load after the folder was claimed: the next attempt needs no
    --overwrite."""
    real = trainer_module._load_model

    def broken(config):
        raise UserError("the model cannot be loaded")

    monkeypatch.setattr(trainer_module, "_load_model", broken)
    document = run_document(workspace, tmp_path / "run", max_steps=1)
    with pytest.raises(ValueError, match="cannot be loaded"):
        train(run_config_from_dict(document))
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()  # an empty folder given as output_dir stays, empty
    with pytest.raises(ValueError, match="cannot be loaded"):
        train(run_config_from_dict(run_document(workspace, tmp_path / "empty", max_steps=1)))
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    monkeypatch.setattr(trainer_module, "_load_model", real)
    assert train(run_config_from_dict(document)).steps == 1
