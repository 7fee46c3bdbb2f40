"""Adapters to and from other tools.

- :mod:`smore.interop.peft`: smore's LoRA to and from HF PEFT's LoRA (``save_peft_lora``, ``load_peft_lora``).
- the checkpoints of the S'MoRE authors (ZimpleX/SMoRE-LLM, a fork of peft: tuner ``hier_moe``, layer ``SMoREFFN``):
  :mod:`smore.interop.authors_config` translates their config, :mod:`smore.interop.authors_weights` their
  state-dict layout, both ways. Their entry points are re-exported here::

    config = config_from_reference(json.load(open("adapter_config.json")))   # their peft config, or the moe_* keys
    model = smore.adapt(base_model, config)                                  # of their LLaMA-Factory YAML
    load_reference_state_dict(model, safetensors.torch.load_file("adapter_model.safetensors"))

    export_reference_state_dict(model)   # the inverse: our weights in their names and shapes
"""

from smore.interop.authors_config import config_from_reference
from smore.interop.authors_weights import (
    ReferenceLoadReport,
    adapt_from_reference,
    export_reference_state_dict,
    load_reference_state_dict,
)

__all__ = [
    "ReferenceLoadReport",
    "adapt_from_reference",
    "config_from_reference",
    "export_reference_state_dict",
    "load_reference_state_dict",
]
