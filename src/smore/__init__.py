"""smore: S'MoRE (Structural Mixture of Residual Experts) and the adapters it is compared with, on one code base.

Entry points::

    model = smore.adapt(model, smore.SMoREConfig(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8]))
    loss = model(**batch, labels=labels).loss       # includes the routers' balance losses (outputs.aux_loss)
    print(smore.summary(model))
    with smore.disable_adapters(model): ...
    smore.save_adapter(model, "run/adapter"); smore.load_adapter(base_model, "run/adapter")
"""

from smore._version import __version__
from smore.adapter_io import load_adapter, read_adapter_config, restore_adapter, save_adapter
from smore.adapters.base import adapted_modules, disable_adapters
from smore.adapters.hydralora import HydraLoRAConfig
from smore.adapters.lora import LoRAConfig
from smore.adapters.mixlora import MixLoRAConfig
from smore.adapters.molora import MoLoRAConfig
from smore.adapters.smore import SMoREConfig
from smore.adapters.trex import TREXConfig, compute_prior, fit_prior, use_prior
from smore.config import AdapterConfig
from smore.errors import UserError
from smore.inject import adapt, aux_loss, remove_adapter, set_aux_loss_in_output, summary
from smore.registry import METHODS, config_from_dict, get_method

__all__ = [
    "METHODS",
    "AdapterConfig",
    "HydraLoRAConfig",
    "LoRAConfig",
    "MixLoRAConfig",
    "MoLoRAConfig",
    "SMoREConfig",
    "TREXConfig",
    "UserError",
    "__version__",
    "adapt",
    "adapted_modules",
    "aux_loss",
    "compute_prior",
    "config_from_dict",
    "disable_adapters",
    "fit_prior",
    "get_method",
    "load_adapter",
    "read_adapter_config",
    "remove_adapter",
    "restore_adapter",
    "save_adapter",
    "set_aux_loss_in_output",
    "summary",
    "use_prior",
]
