"""smore: S'MoRE (Structural Mixture of Residual Experts) and the adapters it is compared with, on one code base.

Entry points::

    model = smore.adapt(model, smore.SMoREConfig(num_experts=[4, 4], top_k=[2, 2], ranks=[8, 8]))
    loss = model(**batch).loss + smore.aux_loss(model)
    print(smore.summary(model))
    with smore.disable_adapters(model): ...
    smore.save_adapter(model, "run/adapter"); smore.load_adapter(base_model, "run/adapter")
"""

from smore.config import (
    AdapterConfig,
    HydraLoRAConfig,
    LoRAConfig,
    MixLoRAConfig,
    MoLoRAConfig,
    SMoREConfig,
    TREXConfig,
)
from smore.inject import (
    adapt,
    adapted_modules,
    aux_loss,
    compute_prior,
    disable_adapters,
    fit_prior,
    load_adapter,
    read_adapter_config,
    remove_adapter,
    save_adapter,
    summary,
    use_prior,
)
from smore.registry import METHODS, config_from_dict, get_method

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdapterConfig",
    "HydraLoRAConfig",
    "LoRAConfig",
    "MixLoRAConfig",
    "MoLoRAConfig",
    "SMoREConfig",
    "TREXConfig",
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
    "save_adapter",
    "summary",
    "use_prior",
]
