"""`MTPHeadsLayer`: the PEFT tuner layer that holds every adapter's head stack.

MTP adds modules beside the model rather than wrapping its layers, so this layer has no base layer.
It exists so that PEFT's adapter bookkeeping (active adapter, enable/disable, delete, status,
requires_grad) treats the heads like any other adapter weights.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import MTPConfig
from .heads import MTPHeadStack
from .trunk import Trunk


class MTPHeadsLayer(nn.Module, BaseTunerLayer):
    """Container of one `MTPHeadStack` per adapter name (`mtp_heads[adapter_name]`)."""

    adapter_layer_names = ("mtp_heads",)

    def __init__(self):
        super().__init__()
        self.mtp_heads = nn.ModuleDict()
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: MTPConfig, trunk: Trunk) -> None:
        """Build the head stack of `adapter_name` on the trunk's device and dtype.

        Args:
            adapter_name: name of the adapter.
            config: its `MTPConfig`.
            trunk: the base model's trunk.
        """
        weight = trunk.unembedding.weight
        self.mtp_heads[adapter_name] = MTPHeadStack(config, trunk).to(device=weight.device, dtype=weight.dtype)

    def get_base_layer(self) -> nn.Module:
        # MTP heads wrap no base layer; PEFT's generic helpers treat the container as its own base.
        return self

    def active_stack(self) -> MTPHeadStack | None:
        """The head stack of the active adapter, or None when adapters are disabled or none is active."""
        if self.disable_adapters:
            return None
        active = [name for name in self.active_adapters if name in self.mtp_heads]
        if len(active) > 1:
            raise ValueError(
                f"MTP heads run one adapter at a time, but {active} are active; call `set_adapter(name)` with one."
            )
        return self.mtp_heads[active[0]] if active else None
