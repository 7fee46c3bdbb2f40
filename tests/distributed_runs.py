"""Launched by tests/test_distributed.py as ``torchrun --nproc_per_node 2 tests/distributed_runs.py JOBS.json``:
trains each job's run config in turn within one process group (one launch for every method, not one each), and
records, per rank, whether some expert got no token on that rank in some step (the case DDP trips on)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

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


def main(jobs_file: str) -> None:
    torch.set_num_threads(1)
    trainer.RoutingTracker = _Recording
    rank = int(os.environ.get("RANK", "0"))
    for job in json.loads(Path(jobs_file).read_text()):
        _Recording.starved = False
        trainer.train(run_config_from_dict(job["config"]), resume=job.get("resume", False))
        record = Path(job["config"]["output_dir"]) / f"starved.rank{rank}.json"
        record.write_text(json.dumps(_Recording.starved))


if __name__ == "__main__":
    main(sys.argv[1])
