"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with 2 CPU processes over gloo, on the tiny Llama adapted with
S'MoRE (top-1 routing, so some expert gets no token on a rank): a few steps of the trainer's loss normalisation,
then the full adapter state dict and the full optimizer state gathered from the shards
(``torch.distributed.checkpoint.state_dict``) equal one process trained on the whole batch.

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


def _train(model, rows: slice, processes: int, total_tokens: int) -> torch.optim.Optimizer:
    """``STEPS`` AdamW steps on ``rows`` of the batch, the loss weighted as the trainer weights it (this share of the
    step's response tokens, times the processes the gradient reduction averages over)."""
    from smore.training.loss import response_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    batch = {key: value[rows] for key, value in _batch().items()}
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    for _ in range(STEPS):
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


def _worker(output: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = int((_batch()["labels"][:, 1:] != -100).sum())
    model = _model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    per = 4 // world
    optimizer = _train(model, slice(rank * per, (rank + 1) * per), world, total)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    adapter = {k: v for k, v in get_model_state_dict(model, options=options).items() if ".delta." in k}
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if rank == 0:
        state = optim["state"]
        gathered = {f"state.{name}.{key}": value for name, values in state.items() for key, value in values.items()}
        single = _model()
        single_optimizer = _train(single, slice(0, 4), 1, total)
        reference = {k: v.detach().clone() for k, v in single.state_dict().items() if ".delta." in k}
        torch.save(
            {
                "adapter": adapter,
                "optimizer": gathered,
                "reference_adapter": reference,
                "reference_optimizer": _named_state(single, single_optimizer),
                "initial": {k: v for k, v in _model().state_dict().items() if ".delta." in k},
            },
            output,
        )
    dist.destroy_process_group()


def _probe(tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    output = tmp_path / "gathered.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    completed = subprocess.run([*command, str(output)], env=env, capture_output=True, text=True, timeout=600)
    return completed, output


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_gathers_the_one_process_adapter_and_optimizer_state(tmp_path):
    completed, output = _probe(tmp_path)
    if completed.returncode != 0 and not torch.cuda.is_available():
        error = [line for line in completed.stderr.splitlines() if "Error" in line]
        pytest.skip(f"FSDP2 does not run on CPU with gloo in torch {torch.__version__}: {error[-1:]}")
    assert completed.returncode == 0, completed.stderr[-4000:]
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


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py
    _worker(Path(sys.argv[1]))
