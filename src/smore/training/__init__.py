"""Fine-tuning: a YAML run config (:mod:`~smore.training.config`) → :func:`train` → a saved adapter.

The data it reads (records, formats, tokenisation with a loss on the responses only) are :mod:`smore.data`'s.
"""

from smore.training.config import DataConfig, OptimConfig, RunConfig, load_run_config, run_config_from_dict
from smore.training.loss import response_loss
from smore.training.trainer import TrainResult, train

__all__ = [
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "TrainResult",
    "load_run_config",
    "response_loss",
    "run_config_from_dict",
    "train",
]
