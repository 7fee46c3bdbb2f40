"""Launched by tests/test_distributed.py as ``torchrun --nproc_per_node 2 tests/distributed_runs.py JOBS.json``:
trains each job's run config in turn within one process group (one launch for every method, not one each), and
records, per rank, whether some expert got no token on that rank in some step (the case DDP trips on).

A job may also hold, for the bad-input tests: ``rank_config`` (rank → sections of the run config that this rank
alone reads differently, e.g. a data file only one machine lacks) and ``refuse_save_on_rank`` (that rank's checkpoint
writer raises a UserError, as a refusal found on one process only). A UserError ends the process as ``smore train``
does: its message on one line and exit code 2; the process also writes the message to ``refused.rank{R}.txt`` beside
the jobs file, so a test sees which processes got it (the launcher stops the others once one exits)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from smore.cli import _leave_process_group
from smore.errors import UserError
from smore.routing.stats import RoutingTracker
from smore.training import trainer
from smore.training.config import run_config_from_dict


class _Recording(RoutingTracker):
    """A tracker that remembers, before each log window's reset, whether an expert of a top-k level got no token
    from this rank's micro-batches (log_every=1: one window per step)."""

    starved = False

    def reset(self) -> None:
        for levels in self.counts.values():
            for counts in levels:
                if counts.dtype == torch.long and bool((counts == 0).any()):
                    _Recording.starved = True
        super().reset()


def _refusing_save(*args, **kwargs):
    raise UserError("checkpoint refused on this process only (test)")


def _config(job: dict, rank: int) -> dict:
    config = json.loads(json.dumps(job["config"]))
    for section, values in job.get("rank_config", {}).get(str(rank), {}).items():
        config[section] = {**config.get(section, {}), **values}
    return config


def main(jobs_file: str) -> int:
    torch.set_num_threads(1)
    trainer.RoutingTracker = _Recording
    rank = int(os.environ.get("RANK", "0"))
    save_checkpoint = trainer.save_checkpoint
    for job in json.loads(Path(jobs_file).read_text()):
        _Recording.starved = False
        trainer.save_checkpoint = _refusing_save if job.get("refuse_save_on_rank") == rank else save_checkpoint
        try:
            trainer.train(run_config_from_dict(_config(job, rank)), resume=job.get("resume", False))
        except UserError as error:  # as smore.cli does
            (Path(jobs_file).parent / f"refused.rank{rank}.txt").write_text(str(error))
            logging.getLogger("smore").error("%s", error)
            return 2
        record = Path(job["config"]["output_dir"]) / f"starved.rank{rank}.json"
        record.write_text(json.dumps(_Recording.starved))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = main(sys.argv[1])
    finally:  # as smore.cli does: a process group left to the interpreter's exit can abort a process (SIGABRT)
        _leave_process_group()
    sys.exit(code)
