"""peft_mtp: Multi-Token Prediction heads for Hugging Face causal LMs, as a PEFT method.

`import peft_mtp` registers the method, after which PEFT's own API works with it:

    from peft import get_peft_model, PeftModel
    from peft_mtp import MTPConfig
    model = get_peft_model(base_model, MTPConfig(num_heads=4, head_type="ffn"))
"""

from ._peft_registration import register_mtp_method
from .alignment import head_targets, target_offset
from .config import HEAD_TYPES, MTPConfig
from .draft_vocab import fit_draft_vocabulary
from .hub import install_hub_fix
from .model import MTPCausalLMOutputWithPast, MTPModel

__version__ = "0.1.0"

register_mtp_method(MTPConfig, MTPModel)
# push_to_hub would otherwise upload a `library_name: transformers` card for MTP adapters (see hub.py).
install_hub_fix()

__all__ = [
    "HEAD_TYPES",
    "MTPCausalLMOutputWithPast",
    "MTPConfig",
    "MTPModel",
    "fit_draft_vocabulary",
    "head_targets",
    "target_offset",
]
