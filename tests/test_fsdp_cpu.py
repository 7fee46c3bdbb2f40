"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with 2 CPU processes over gloo, on the tiny Llama adapted with
S'MoRE (top-1 routing, so some expert gets no token on a rank): a few steps of the trainer's loss normalisation,
then the full adapter state dict and the full optimizer state gathered from the shards
(``torch.distributed.checkpoint.state_dict``) equal one process trained on the whole batch; a checkpoint written from
them holds one process's optimizer file, and a resume into fresh shards continues as one process does.

The test launches this file itself with ``torch.distributed.run`` (2 processes); run as a script, rank 0 writes
what it gathered and what one process reaches for the test to compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 3
SMORE = {"num_experts": [3, 3], "top_k": [1, 1], "ranks": [2, 2], "router_dims": [8, 8], "init": "normal"}


def _model():
    """The adapted tiny Llama, with no aux loss in its output: the comparison is of the cross-entropy's gradient,
    which the split of the batch leaves unchanged (the trainer adds aux per micro-batch itself)."""
    import smore
    from helpers import randomise, tiny_llama

    model = smore.adapt(tiny_llama(), smore.SMoREConfig(**SMORE), aux_loss_in_output=False)
    randomise(model)
    return model.train()


def _batch() -> dict[str, torch.Tensor]:
    from helpers import tiny_batch
    from smore.constants import IGNORE_INDEX

    batch = tiny_batch(batch=4, length=8)
    labels = batch["input_ids"].clone()
    labels[0, :4] = IGNORE_INDEX  # different response lengths per rank: the token weighting matters
    labels[3, :2] = IGNORE_INDEX
    return {**batch, "labels": labels}


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def _train(model, rows: slice, processes: int, total_tokens: int, optimizer=None, steps: int = STEPS):
    """``steps`` AdamW steps on ``rows`` of the batch, the loss weighted as the trainer weights it (this share of the
    step's response tokens, times the processes the gradient reduction averages over)."""
    from smore.training.loss import response_loss

    optimizer = optimizer or _optimizer(model)
    batch = {key: value[rows] for key, value in _batch().items()}
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    for _ in range(steps):
        (response_loss(model, batch) * tokens / total_tokens * processes).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def _named_state(model, optimizer) -> dict[str, torch.Tensor]:
    """One process's optimizer state keyed as the gathered one: ``state.<parameter name>.<key>``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        f"state.{names[id(p)]}.{key}": value.detach().clone()
        for group in optimizer.param_groups
        for p in group["params"]
        for key, value in optimizer.state[p].items()
    }


def _checkpoint(folder: Path, model, optimizer, adapter: dict | None, optimizer_state: dict | None) -> None:
    """A checkpoint as the trainer writes it (``save_checkpoint``), from the gathered state when given."""
    import smore
    from smore.training.checkpoint import save_checkpoint

    save_checkpoint(
        folder,
        save_adapter=lambda path: smore.save_adapter(model, path, state_dict=adapter),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0),
        progress={"step": STEPS, "history": []},
        run_config={},
        optimizer_state=optimizer_state,
    )


def _sharded(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _worker(output: Path) -> None:
    """Train sharded, gather and checkpoint (as the trainer's ``_save`` under FSDP), resume a fresh sharded model from
    the checkpoint (as ``_start``: the adapter before sharding, the optimizer into the shards) and train one step
    more; rank 0 also trains one process on the whole batch, for the test to compare."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import smore
    from smore.training.checkpoint import load_checkpoint
    from smore.training.engines import gathered_optimizer_state, restore_optimizer_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    total = int((_batch()["labels"][:, 1:] != -100).sum())
    per = 4 // world
    mine = slice(rank * per, (rank + 1) * per)
    model = _sharded(_model())
    optimizer = _train(model, mine, world, total)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    whole = get_model_state_dict(model, options=options)  # on every rank: a collective (as the following two)
    gathered = _gathered_named_state(model, optimizer, options)
    optimizer_state = gathered_optimizer_state(fsdp, model, optimizer)
    folder = output.parent / "checkpoint-fsdp"
    if rank == 0:
        _checkpoint(folder, model, optimizer, whole, optimizer_state)
    dist.barrier()

    resumed = _model()
    smore.restore_adapter(resumed, folder / "adapter")
    resumed = _sharded(resumed)
    resumed_optimizer = _optimizer(resumed)
    load_checkpoint(
        folder,
        load_adapter_weights=lambda path: None,
        optimizer=resumed_optimizer,
        scheduler=torch.optim.lr_scheduler.ConstantLR(resumed_optimizer, factor=1.0, total_iters=0),
        restore_optimizer=lambda state: restore_optimizer_state(fsdp, resumed, resumed_optimizer, state),
    )
    _train(resumed, mine, world, total, optimizer=resumed_optimizer, steps=1)
    after = {k: v for k, v in get_model_state_dict(resumed, options=options).items() if ".delta." in k}
    if rank == 0:
        single = _model()
        single_optimizer = _train(single, slice(0, 4), 1, total)
        _checkpoint(output.parent / "checkpoint-single", single, single_optimizer, None, None)
        reference = {k: v.detach().clone() for k, v in single.state_dict().items() if ".delta." in k}
        reference_optimizer = _named_state(single, single_optimizer)
        _train(single, slice(0, 4), 1, total, optimizer=single_optimizer, steps=1)
        torch.save(
            {
                "adapter": {k: v for k, v in whole.items() if ".delta." in k},
                "optimizer": gathered,
                "reference_adapter": reference,
                "reference_optimizer": reference_optimizer,
                "initial": {k: v for k, v in _model().state_dict().items() if ".delta." in k},
                "resumed": after,
                "reference_resumed": {k: v.detach().clone() for k, v in single.state_dict().items() if ".delta." in k},
            },
            output,
        )
    dist.destroy_process_group()


def _nonfinite_worker(output: Path) -> None:
    """The trainer's own optimizer step (``_optimizer_step``, over a real Accelerate process group) on an FSDP2
    model whose gradients are DTensor shards: a clean step, a step whose loss is NaN on rank 1 only, a step whose
    gradient is NaN in rank 0's shard only, a clean step, then the NaN loss again under ``on_nonfinite=stop``. Each
    rank writes what each step did and whether its shards moved."""
    import json
    import time
    from types import SimpleNamespace

    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from smore.errors import UserError
    from smore.training import trainer
    from smore.training.config import OptimConfig

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)  # a gloo group of 2 (MULTI_CPU): the one fully_shard uses
    rank = accelerator.process_index
    model = _sharded(_model())
    mine = {key: value[rank * 2 : (rank + 1) * 2] for key, value in _batch().items()}
    trainer._micro_batches = lambda run, step: [mine]
    poison = {"loss": (1, 4), "grad": (2,)}  # steps: a NaN loss on rank 1, a NaN in rank 0's gradient shard
    model.lm_head.register_forward_hook(
        lambda module, args, out: out * float("nan") if rank == 1 and state["step"] in poison["loss"] else out
    )
    accumulate = trainer._accumulate

    def poisoned(run, step, micro):
        result = accumulate(run, step, micro)
        if rank == 0 and step in poison["grad"]:
            shard = next(p.grad.to_local() for p in run.trainable if p.grad.to_local().numel())
            shard.view(-1)[0] = float("nan")
        return result

    trainer._accumulate = poisoned
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(hasattr(p, "to_local") for p in trainable)  # the case under test: sharded DTensor parameters
    optimizer = _optimizer(model)
    opt = OptimConfig(global_batch_size=4, micro_batch_size=2, max_grad_norm=None, learning_rate=1e-2)
    run = SimpleNamespace(
        opt=opt,
        accelerator=accelerator,
        processes=2,
        model=model,
        unwrapped=model,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0),
        skipped=0,
        bar=tqdm(disable=True),
        window=[],
        tokens_seen=0,
        started=time.perf_counter(),
        grad_norm=None,
    )
    state, record = {"step": 0}, []
    for step in range(5):
        state["step"] = step
        if step == 4:
            run.opt = OptimConfig(global_batch_size=4, micro_batch_size=2, max_grad_norm=None, on_nonfinite="stop")
        before = [p.to_local().detach().clone() for p in trainable]
        try:
            stepped = trainer._optimizer_step(run, step)
        except UserError as error:
            stepped = str(error)
        moved = any(not torch.equal(a, p.to_local()) for a, p in zip(before, trainable, strict=True))
        record.append({"stepped": stepped, "moved": moved, "skipped": run.skipped})
    Path(f"{output}.rank{rank}.json").write_text(json.dumps(record))
    accelerator.end_training()


def _gathered_named_state(model, optimizer, options) -> dict[str, torch.Tensor]:
    """The gathered optimizer state keyed ``state.<parameter name>.<key>`` (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=options).get("state", {})
    return {f"state.{name}.{key}": value for name, values in state.items() for key, value in values.items()}


def _probe(tmp_path: Path, mode: str = "gather") -> tuple[subprocess.CompletedProcess, Path]:
    output = tmp_path / "gathered.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    completed = subprocess.run([*command, str(output), mode], env=env, capture_output=True, text=True, timeout=600)
    return completed, output


@pytest.mark.slow
def test_a_non_finite_step_under_fsdp2_is_skipped_or_stopped_on_both_processes_alike(tmp_path):
    """The non-finite check reads each process's gradient shards (DTensor.to_local): a NaN on one process only, in
    its loss or in its gradient shard, skips the step on both (neither shard moves), and under stop ends both with
    the same message. Before: the check mixed DTensor gradients with a plain tensor and failed."""
    import json

    completed, output = _probe(tmp_path, "nonfinite")
    assert completed.returncode == 0, completed.stderr[-4000:]
    records = [json.loads(Path(f"{output}.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0] == records[1], records
    steps = records[0]
    assert [(s["stepped"], s["moved"]) for s in steps[:4]] == [
        (True, True),
        (False, False),
        (False, False),
        (True, True),
    ]
    assert steps[3]["skipped"] == 2
    assert (
        steps[4]["stepped"].startswith("step 5: the loss or a gradient is not finite; stopped")
        and not steps[4]["moved"]
    )


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_gathers_the_one_process_adapter_and_optimizer_state(tmp_path):
    completed, output = _probe(tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]  # FSDP2 runs on CPU over gloo in torch 2.13
    result = torch.load(output)
    adapter, reference = result["adapter"], result["reference_adapter"]
    assert adapter.keys() == reference.keys() and len(adapter) > 10
    for key, value in adapter.items():
        assert value.shape == reference[key].shape, key  # whole tensors, not shards
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)
    moved = sum(float((adapter[k] - result["initial"][k]).abs().max()) > 1e-4 for k in adapter)
    assert moved > len(adapter) // 2  # the steps trained the adapter: the comparison is not of initial weights
    optimizer, reference_optimizer = result["optimizer"], result["reference_optimizer"]
    assert optimizer.keys() == reference_optimizer.keys()
    assert {k.rsplit(".", 1)[1] for k in optimizer} == {"step", "exp_avg", "exp_avg_sq"}
    for key, value in optimizer.items():
        torch.testing.assert_close(value, reference_optimizer[key], rtol=1e-4, atol=1e-6, msg=key)
    # The checkpoint's optimizer file holds the gathered state in one process's layout, and resuming from it into
    # fresh shards continues like the one-process run.
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-fsdp" / "optimizer.safetensors"))
    single = load_file(str(tmp_path / "checkpoint-single" / "optimizer.safetensors"))
    assert saved.keys() == single.keys() and len(saved) > 10
    for key in saved:
        if key.startswith("state."):
            assert saved[key].shape == single[key].shape, key
            torch.testing.assert_close(saved[key], single[key], rtol=1e-4, atol=1e-6, msg=key)
    resumed, reference_resumed = result["resumed"], result["reference_resumed"]
    assert resumed.keys() == reference_resumed.keys()
    # 1e-4: an Adam step of 1e-2 on a gradient near zero amplifies the summation order (2e-5 seen); a resume without
    # the optimizer state misses by more than 1e-3 on every tensor.
    for key, value in resumed.items():
        torch.testing.assert_close(value, reference_resumed[key], rtol=1e-4, atol=1e-4, msg=key)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py
    (_nonfinite_worker if sys.argv[2:] == ["nonfinite"] else _worker)(Path(sys.argv[1]))
