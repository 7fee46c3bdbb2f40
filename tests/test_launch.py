"""Launching ``smore train`` as several processes with Accelerate, for real, on CPU: the command the README gives
starts two processes, and the one that would silently start one (``--cpu --num_processes 2``) is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from helpers import counting_workspace
from smore.cli import check_launch
from smore.errors import UserError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return counting_workspace(tmp_path_factory.mktemp("launch"))


def _run_file(workspace, tmp_path) -> str:
    document = {
        "model": str(workspace / "model"),
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "lora", "rank": 2},
        "data": {"train_file": str(workspace / "train.jsonl"), "max_length": 48},
        "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "log_every": 1},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def _accelerate_launch(flags: list[str], run_file: str, tmp_path) -> subprocess.CompletedProcess:
    # HF_HOME of its own: a default `accelerate config` file on this machine must not change the launch.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "smore.cli", "train", run_file]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_readmes_accelerate_command_runs_two_cpu_processes(workspace, tmp_path):
    flags = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]  # port 0: a free one
    completed = _accelerate_launch(flags, _run_file(workspace, tmp_path), tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "processes=2" in completed.stderr  # the trainer's group: two processes, each half of the batch
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert completed.stdout.count("trained 2 steps") == 1  # one summary, from the main process


@pytest.mark.slow
def test_accelerate_cpu_launch_of_several_processes_is_refused_not_run_as_one(workspace, tmp_path):
    completed = _accelerate_launch(["--cpu", "--num_processes", "2"], _run_file(workspace, tmp_path), tmp_path)
    assert completed.returncode != 0  # smore exits 2; accelerate reports it as its own failure (1)
    assert "starts ONE process" in completed.stderr and "--multi_gpu --num_processes N" in completed.stderr
    assert not (tmp_path / "run").exists()


def test_check_launch_tells_a_cpu_launch_of_one_from_a_group():
    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(UserError, match="torchrun --nproc_per_node N"):
        check_launch(simple)
    check_launch({"ACCELERATE_USE_CPU": "True"})  # --cpu with one process: nothing asked for more
    check_launch({**simple, "WORLD_SIZE": "2", "RANK": "0"})  # torchrun / --multi_gpu: a real group
    check_launch({**simple, "PMI_SIZE": "2"})  # Accelerate's MPI launch (--mpirun_hostfile)
    check_launch({})
