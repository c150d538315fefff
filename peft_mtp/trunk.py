"""A structural view of a Hugging Face causal LM: the parts MTP heads read from and share.

Heads need four things from the base model: the hidden state that enters its final norm (the
trunk output), the final norm itself, the unembedding, and whatever the model does to logits after
the unembedding (soft-capping, scaling). They are found through the model's own accessors
(`get_decoder()`, `get_output_embeddings()`, `get_input_embeddings()`, `_no_split_modules`) and one
probe forward pass, never by guessing attribute names, and the probe checks that recomputing the
model's logits from the captured hidden state gives the model's own logits.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# Config fields that change logits after the unembedding, by the architectures that use them.
_SOFTCAP_FIELD = "final_logit_softcapping"  # Gemma 2 and 3: cap * tanh(logits / cap)
_MULTIPLY_FIELD = "logit_scale"  # Cohere: logits * scale
_DIVIDE_FIELD = "logits_scaling"  # Granite: logits / scaling
# Arguments of a decoder layer that tie it to the trunk's own KV cache; heads run without it.
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class TrunkCapture:
    """What one trunk forward pass exposed to the heads.

    Attributes:
        hidden: `(B, T, H)` hidden state entering the final norm (the trunk output, before the norm).
        layer_kwargs: keyword arguments the trunk passed to each of its last decoder layers (masks,
            rotary embeddings, position ids), cache arguments removed; the last layer comes last.
        layer_outputs: `(B, T, H)` outputs of the decoder layers asked for (`feature_layers`), in their order.
    """

    hidden: torch.Tensor | None = None
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)
    layer_outputs: list[torch.Tensor] = field(default_factory=list)


class Trunk:
    """The base model's trunk, final norm, unembedding and logit transform, as the heads use them.

    Args:
        model: a Hugging Face causal LM (`PreTrainedModel` with a decoder and an unembedding).

    Raises:
        ValueError: the model lacks an accessor the heads need, or its logits are not
            `transform(unembedding(final_norm(hidden)))` for a transform this class knows.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.decoder = _require(model, "get_decoder")
        self.unembedding = _require(model, "get_output_embeddings")
        self.embedding = _require(model, "get_input_embeddings")
        self.layers = _find_decoder_layers(model, self.decoder)
        self.hidden_size = self.unembedding.weight.shape[1]
        self.vocab_size = self.unembedding.weight.shape[0]
        self.softcap = getattr(self.config, _SOFTCAP_FIELD, None)
        self.logit_multiplier = float(getattr(self.config, _MULTIPLY_FIELD, None) or 1.0)
        divisor = getattr(self.config, _DIVIDE_FIELD, None)
        if divisor:
            self.logit_multiplier /= float(divisor)
        self.final_norm = self._probe_final_norm()

    # ----------------------------------------------------------------------------------------
    # Running the heads' share of the model

    def logits(self, hidden: torch.Tensor, unembedding: nn.Module | None = None) -> torch.Tensor:
        """Logits of pre-norm hidden states, exactly as the model computes its own.

        Args:
            hidden: `(..., H)` hidden states in the trunk-output space (before the final norm).
            unembedding: a head's own unembedding; defaults to the model's.

        Returns:
            `(..., V)` logits: final norm, unembedding, then soft-capping or scaling if the model has them.
        """
        logits = (unembedding or self.unembedding)(self.final_norm(hidden))
        return self.transform_logits(logits)

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply what the model does to logits after its unembedding (scaling, then soft-capping)."""
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings from the model's own input embedding (`(B, T)` -> `(B, T, H)`)."""
        return self.embedding(input_ids)

    @contextlib.contextmanager
    def capture(self, num_layer_kwargs: int = 0, feature_layers: Sequence[int] = ()) -> Iterator[TrunkCapture]:
        """Record the trunk output (and the last layers' arguments) of the forward passes run inside.

        Args:
            num_layer_kwargs: how many of the last decoder layers to record arguments of (decoder-layer
                heads call copies of them with the same masks and rotary embeddings).
            feature_layers: indices of decoder layers whose outputs to record (`MTPConfig.feature_layers`).

        Yields:
            A `TrunkCapture` filled in by the first trunk pass inside the block.
        """
        captured = TrunkCapture()
        layers = list(self.layers)[len(self.layers) - num_layer_kwargs:] if num_layer_kwargs else []
        recorded_kwargs: dict[int, dict[str, Any]] = {}
        recorded_outputs: dict[int, torch.Tensor] = {}

        def on_final_norm(module, args, output):
            if captured.hidden is None:
                captured.hidden = args[0]

        def make_layer_hook(index: int):
            def on_layer(module, args, kwargs):
                if index not in recorded_kwargs:
                    recorded_kwargs[index] = layer_call_kwargs(module, args, kwargs)

            return on_layer

        def make_output_hook(index: int):
            def on_output(module, args, output):
                if index not in recorded_outputs:
                    recorded_outputs[index] = output[0] if isinstance(output, tuple) else output

            return on_output

        handles = [self.final_norm.register_forward_hook(on_final_norm)]
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make_layer_hook(index), with_kwargs=True))
        for index in feature_layers:
            handles.append(self.layers[index].register_forward_hook(make_output_hook(index)))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()
            captured.layer_kwargs = [recorded_kwargs[i] for i in sorted(recorded_kwargs)]
            captured.layer_outputs = [recorded_outputs[i] for i in feature_layers if i in recorded_outputs]

    def copy_last_layers(self, num_layers: int) -> list[nn.Module]:
        """Independent copies of the trunk's last `num_layers` decoder layers, without any adapters.

        Raises:
            ValueError: the trunk has fewer layers than asked for.
        """
        if num_layers > len(self.layers):
            raise ValueError(
                f"`num_layers`={num_layers} asks for more decoder layers than the base model has "
                f"({len(self.layers)}); use at most {len(self.layers)}."
            )
        return [_copy_without_adapters(layer) for layer in list(self.layers)[-num_layers:]]

    # ----------------------------------------------------------------------------------------
    # Finding the final norm

    def _probe_final_norm(self) -> nn.Module:
        """Find the decoder child whose output is the decoder's output, and check the logits it implies."""
        candidates = [(name, child) for name, child in self.decoder.named_children() if not isinstance(child, nn.ModuleList)]
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        decoder_output: list[torch.Tensor] = []

        def record(name):
            def hook(module, args, output):
                if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                    outputs[name] = (args[0], output)

            return hook

        def on_decoder(module, args, output):
            decoder_output.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handles = [child.register_forward_hook(record(name)) for name, child in candidates]
        handles.append(self.decoder.register_forward_hook(on_decoder))
        probe_ids = torch.arange(3, 7, device=self.unembedding.weight.device).clamp(max=self.vocab_size - 1)[None]
        try:
            with torch.no_grad(), _adapters_disabled(self.model):
                model_logits = self.model(input_ids=probe_ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()

        last_hidden = decoder_output[0]
        matches = [
            name for name, (_, out) in outputs.items()
            if out.numel() == last_hidden.numel() and torch.equal(out.reshape(last_hidden.shape), last_hidden)
        ]
        if not matches:
            raise ValueError(
                f"Cannot find the final norm of {type(self.model).__name__}: no direct child of its decoder "
                f"({type(self.decoder).__name__}) produces the decoder's output. MTP heads need the hidden state "
                "that enters the model's last module before the unembedding."
            )
        self.final_norm = final_norm = getattr(self.decoder, matches[-1])
        hidden_in = outputs[matches[-1]][0]
        with torch.no_grad():
            recomputed = self.logits(hidden_in).reshape(model_logits.shape)
        tolerance = 1e-4 if model_logits.dtype == torch.float32 else 3e-2
        if not torch.allclose(recomputed.float(), model_logits.float(), atol=tolerance, rtol=tolerance):
            raise ValueError(
                f"{type(self.model).__name__}'s logits are not transform(unembedding(final_norm(hidden))) for the "
                "transforms peft_mtp knows (soft-capping, logit scaling), so heads would not see what the model's "
                "own head sees. This architecture is not supported yet."
            )
        return final_norm


def layer_signature(layer: nn.Module) -> inspect.Signature:
    """The signature of a decoder layer's `forward` as called on the layer (without `self`), read once per class."""
    return _forward_signature(type(layer))


@functools.cache
def _forward_signature(layer_class: type) -> inspect.Signature:
    # Decoding asks at every draft depth of every step, where `inspect.signature` cost ~0.1 ms a call in a profile.
    signature = inspect.signature(layer_class.forward)
    parameters = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if parameters and parameters[0].kind in positional:
        parameters = parameters[1:]  # `self`, which binding removes (a bare `*args` stays, as it does when bound)
    return signature.replace(parameters=parameters)


def cache_argument_name(layer: nn.Module) -> str:
    """The name under which a transformers decoder layer takes its cache (`cache` in most 5.x models)."""
    parameters = layer_signature(layer).parameters
    return next((name for name in _CACHE_ARGUMENTS if name in parameters), "cache")


def layer_call_kwargs(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name every argument of a decoder-layer call except the hidden state, with cache arguments removed."""
    signature = layer_signature(layer)
    named = dict(signature.bind_partial(*args, **kwargs).arguments)
    named.pop(next(iter(signature.parameters)))  # the hidden state
    for key, value in list(named.items()):
        param = signature.parameters[key]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.pop(key)
            named.update(value)
    for key in _CACHE_ARGUMENTS:
        named.pop(key, None)
    if "use_cache" in named:
        named["use_cache"] = False
    return named


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run a decoder layer on `hidden` with arguments recorded by `Trunk.capture`; return its hidden state."""
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _require(model: nn.Module, accessor: str) -> nn.Module:
    module = getattr(model, accessor)() if hasattr(model, accessor) else None
    if module is None:
        raise ValueError(
            f"{type(model).__name__}.{accessor}() returned nothing; MTP heads need a causal LM with a decoder, "
            "input embeddings and an unembedding (e.g. AutoModelForCausalLM)."
        )
    return module


def _find_decoder_layers(model: nn.Module, decoder: nn.Module) -> nn.ModuleList:
    """The ModuleList of the decoder that holds the model's own decoder-layer class (`_no_split_modules`)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in decoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in layer_classes:
            return module
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: none of its decoder's ModuleLists holds "
        f"the layer classes it declares in `_no_split_modules` ({sorted(layer_classes)})."
    )


def _copy_without_adapters(module: nn.Module) -> nn.Module:
    """Deep-copy a module, replacing every PEFT tuner layer inside it (e.g. LoRA) by its base layer."""
    copied = copy.deepcopy(module)
    for name, child in list(copied.named_modules()):
        if isinstance(child, BaseTunerLayer) and name:
            parent_name, _, attr = name.rpartition(".")
            parent = copied.get_submodule(parent_name) if parent_name else copied
            setattr(parent, attr, child.get_base_layer())
    for parameter in copied.parameters():
        parameter.requires_grad_(True)
    return copied


@contextlib.contextmanager
def _adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run with every PEFT tuner layer inside `model` disabled (the probe must see the bare model)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False
