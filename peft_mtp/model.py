"""`MTPModel`: the PEFT tuner that attaches MTP heads (and optional trunk LoRA) to a causal LM.

One trunk forward feeds both the model's own head and the MTP heads: `Trunk.capture` records the
hidden state entering the final norm while the unchanged base model runs, then the heads run on it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from peft.tuners.tuners_utils import delete_adapter as peft_delete_adapter
from peft.tuners.tuners_utils import set_adapter as peft_set_adapter
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput

from .alignment import IGNORE_INDEX
from .config import MTPConfig
from .distributed import check_base_weights_materialized
from .heads import HeadContext, MTPHeadStack
from .layer import MTPHeadsLayer
from .loss import MTPLossOutput, Unembedding, mtp_loss
from .training import attach_from_caller, fold_mtp_loss, get_link, trunk_is_frozen, warn_if_unlinked
from .trunk import Trunk

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no sharded parameters
    DTensor = ()


@dataclass
class MTPCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus what the MTP heads produced.

    Attributes:
        mtp_logits: `(B, T, K, V)` head logits when `output_mtp_logits=True`; `[:, t, k-1]` predicts
            token t+1+k (only the positions kept by `logits_to_keep`). For heads that copy
            (`MTPConfig.copy_ngram`), the log-probabilities of what they draft: each head's distribution with its
            copy candidate mixed in (`peft_mtp.copying`).
        mtp_head_logits: for heads that copy, the heads' own logits (without the candidates), else None.
        mtp_loss: weighted MTP loss (already added to `loss`), when labels were given.
        mtp_head_losses: `(K,)` mean cross-entropy of each head, when labels were given.
        mtp_head_accuracies: `(K,)` top-1 accuracy of each head, when labels were given.
    """

    mtp_logits: torch.FloatTensor | None = None
    mtp_head_logits: torch.FloatTensor | None = None
    mtp_loss: torch.FloatTensor | None = None
    mtp_head_losses: torch.FloatTensor | None = None
    mtp_head_accuracies: torch.FloatTensor | None = None


class MTPModel(BaseTuner):
    """Attaches Multi-Token Prediction heads to a causal LM. Created by `get_peft_model(model, MTPConfig(...))`.

    Args:
        model: the base causal LM.
        config: the `MTPConfig` (or a dict of adapter name to config).
        adapter_name: name of the first adapter.

    Example:

        ```py
        >>> from peft import get_peft_model
        >>> from peft_mtp import MTPConfig
        >>> model = get_peft_model(base_model, MTPConfig(num_heads=4, head_type="ffn"))
        >>> out = model(input_ids, labels=input_ids, output_mtp_logits=True)
        >>> out.mtp_logits.shape  # (batch, seq, 4, vocab)
        ```
    """

    prefix: str = "mtp_"
    tuner_layer_cls = MTPHeadsLayer
    target_module_mapping: dict[str, list[str]] = {}
    # The heads live on the tuner, not inside the model's layers: transformers' `load_adapter` must go
    # through PEFT's full path, or it would drop them.
    uses_shared_state: bool = True

    # ------------------------------------------------------------------------------------------
    # Injection

    def _prepare_adapter_config(self, peft_config: MTPConfig, model_config: dict) -> MTPConfig:
        return peft_config

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise RuntimeError("MTP replaces no module of the base model; this is a bug in peft_mtp.")

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Build the heads of `adapter_name` (and inject its trunk LoRA, if configured)."""
        config: MTPConfig = self.peft_config[adapter_name]
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict=None)
        check_base_weights_materialized(model)  # not partitioned by ZeRO-3 / FSDP loading: heads are built from them
        trunk = self.get_trunk()
        _check_base_model_fits(config, trunk)
        if "mtp" not in self._modules:
            self.mtp = MTPHeadsLayer()
        # Heads are built before the trunk LoRA, so decoder layers copied into heads carry no LoRA.
        self.mtp.update_layer(adapter_name, config, trunk)
        if config.lora_config is not None:
            _inject_trunk_lora(model, config.lora_config, adapter_name, low_cpu_mem_usage)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_trunk(self) -> Trunk:
        """The base model's trunk view (found once, on first use)."""
        # A method, not a property: BaseTuner.__getattr__ would turn an AttributeError raised while
        # probing the model into a misleading "no attribute 'trunk'".
        trunk = self.__dict__.get("_trunk")
        if trunk is None:
            trunk = Trunk(self.model)
            self.__dict__["_trunk"] = trunk  # a plain attribute: the trunk's modules belong to the model
        return trunk

    # ------------------------------------------------------------------------------------------
    # Adapter bookkeeping: the head container sits beside the model, so PEFT's model-wide walks
    # over `self.model` are extended to it.

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if "mtp" in self._modules:
            self.mtp.enable_adapters(enabled)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name!r} not found; available adapters: {sorted(self.peft_config)}.")
        peft_set_adapter(self.model, names, inference_mode=inference_mode, layer_cls=BaseTunerLayer)
        if "mtp" in self._modules:
            self.mtp.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}.")
        del self.peft_config[adapter_name]
        peft_delete_adapter(self.model, adapter_name=adapter_name, prefix=self.prefix, layer_cls=BaseTunerLayer)
        self.mtp.delete_adapter(adapter_name)
        self.active_adapter = self.mtp.active_adapters[:] or []

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for parameter in model.parameters():
            parameter.requires_grad = False
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(module.active_adapters)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Head keys carry the adapter name in the middle: `base_model.mtp.mtp_heads.<name>.heads.0...`.
        marker = f".mtp_heads.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".mtp_heads.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # PEFT's default mapping takes every key under the tuner's `mtp` container, which holds the
        # heads of all adapters; map only this adapter's keys, and refuse any mismatch.
        model_keys = _adapter_model_keys(model, adapter_name)
        checkpoint_to_model = {cls._remove_adapter_name_from_key(key, adapter_name): key for key in model_keys}
        remapped = {checkpoint_to_model.get(key, key): value for key, value in state_dict.items()}
        missing, unexpected = sorted(set(model_keys) - set(remapped)), sorted(set(remapped) - set(model_keys))
        if missing or unexpected:
            raise ValueError(
                f"The checkpoint of adapter {adapter_name!r} does not match its MTP config: {len(missing)} missing "
                f"keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}. Check that "
                "adapter_config.json belongs to adapter_model.safetensors (same num_heads, head_type, num_layers, "
                "share_unembedding, lora_config)."
            )
        return remapped

    # ------------------------------------------------------------------------------------------
    # Forward

    def active_heads(self) -> MTPHeadStack | None:
        """The active adapter's head stack, or None when adapters are disabled."""
        return self.mtp.active_stack() if "mtp" in self._modules else None

    def active_config(self) -> MTPConfig:
        """The `MTPConfig` of the active adapter."""
        return self.peft_config[self.active_adapters[0]]

    def run_heads(self, hidden: torch.Tensor, context: HeadContext,
                  layer_outputs: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Run the active heads on a trunk output: `(B, T, H)` -> `(B, T, K, H)`.

        Args:
            hidden: `(B, T, H)` trunk output.
            context: what heads may read besides it.
            layer_outputs: outputs of the heads' `feature_layers` (see `MTPHeadStack.head_input`).
        """
        heads = self.active_heads()
        return heads(heads.head_input(hidden, layer_outputs), context)

    def generate(self, *args: Any, **kwargs: Any):
        """Generate with the model, speculating with the active MTP heads: same tokens, fewer forward passes.

        `PeftModel.generate` calls this. Greedy decoding and sampling speculate by default (the output
        is what the base model alone gives; see docs/decoding.md); other generation modes, disabled
        adapters and `mtp_speculate=False` run transformers' `generate` unchanged.

        Args:
            *args, **kwargs: transformers `generate` arguments, plus `mtp_speculate` (bool),
                `mtp_depth` (int or "auto"), `mtp_tree` (None, True or a list of paths) and
                `mtp_trace` (bool); see `peft_mtp.decoding.SpeculationOptions`.

        Returns:
            What transformers' `generate` returns; with `return_dict_in_generate=True` while
            speculating, an `MTPGenerateOutput` whose `mtp_stats` describes the call.
        """
        from .decoding import generate_with_heads  # decoding imports this module

        return generate_with_heads(self, *args, **kwargs)

    def forward(self, *args: Any, output_mtp_logits: bool = False, **kwargs: Any):
        """Run the base model once and the MTP heads on its trunk output.

        Args:
            *args, **kwargs: the base model's forward arguments (`input_ids`, `attention_mask`,
                `labels`, `position_ids`, `logits_to_keep`, ...).
            output_mtp_logits: also return `(B, T, K, V)` head logits as `mtp_logits`.

        Returns:
            `MTPCausalLMOutputWithPast`: the model's output; with labels, `loss` is the next-token loss
            plus the current MTP weight times the weighted head losses. With `fused_lm_head=True` (TRL's
            SFTTrainer), TRL's `FusedCausalLMOutput` with the MTP loss folded into `log_probs` (see
            `peft_mtp.training`). With adapters disabled, the base model's own output, untouched.
        """
        heads = self.active_heads()
        if heads is None:
            return self.model(*args, **kwargs)
        labels = kwargs.get("labels")
        fused = bool(kwargs.get("fused_lm_head"))  # TRL's SFTTrainer: the loss is computed from `log_probs`
        # A frozen trunk cannot learn: skip its graph (see peft_mtp.training, "frozen trunk").
        frozen = torch.is_grad_enabled() and trunk_is_frozen(self.model, kwargs.get("inputs_embeds"))
        with self.get_trunk().capture(**heads.capture_kwargs) as captured, \
                (torch.no_grad() if frozen else contextlib.nullcontext()):
            outputs = self.model(*args, **kwargs)
        if captured.hidden is None:
            raise RuntimeError("The trunk's final norm did not run; MTP heads have no input.")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        context = HeadContext(
            input_ids=input_ids,
            attention_mask=attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None,
            layer_kwargs=captured.layer_kwargs,
            embed=self.get_trunk().embed,
        )
        head_hidden = self.run_heads(captured.hidden, context, captured.layer_outputs)  # (B, T, K, H)

        extra: dict[str, Any] = {}
        if output_mtp_logits:
            keep = kwargs.get("logits_to_keep", 0)
            kept = _keep_positions(head_hidden, keep)
            extra["mtp_logits"] = heads.logits(kept, self.get_trunk())
            if heads.copy_gates is not None:
                # What the heads draft: their distributions with the copy candidates mixed in (log-probabilities).
                extra["mtp_head_logits"] = extra["mtp_logits"]
                candidates = _keep_positions(self._copy_candidates(input_ids, context.attention_mask), keep)
                extra["mtp_logits"] = heads.copy_log_probs(kept, self.get_trunk(), candidates,
                                                           logits=extra["mtp_head_logits"])
        if labels is not None:
            result = self.compute_mtp_loss(head_hidden, labels, kwargs.get("position_ids"),
                                           trunk_hidden=captured.hidden, input_ids=input_ids,
                                           attention_mask=context.attention_mask)
            extra.update(mtp_loss=result.loss, mtp_head_losses=result.head_losses,
                         mtp_head_accuracies=result.head_accuracies)
            weight = self.current_mtp_loss_weight()
            weighted = weight * result.loss
            link = get_link(self)
            if fused:
                # TRL ignores `loss` on this path: fold the MTP loss into `log_probs` (see peft_mtp.training).
                next_token = (-outputs["log_probs"].detach().sum(), outputs["label_mask"].sum())
                if link is not None:
                    link.record(result, weight, self.training, next_token)
                else:
                    warn_if_unlinked(self)
                return fold_mtp_loss(_with_mtp_outputs(outputs, extra), weighted)
            if link is not None:
                link.record(result, weight, self.training)
            if kwargs.get("num_items_in_batch") is not None:
                # Trainer's contract for the model's own loss; without it DDP / grad accumulation multiply the MTP loss.
                weighted = weighted * _share_of_step(labels, kwargs["num_items_in_batch"])
            extra["loss"] = weighted if outputs.get("loss") is None else outputs["loss"] + weighted
        if isinstance(outputs, CausalLMOutputWithPast):
            return MTPCausalLMOutputWithPast(**{**outputs, **extra})
        return _with_mtp_outputs(outputs, extra)  # another output class (e.g. a trainer's fused head)

    def compute_mtp_loss(
        self, head_hidden: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
        trunk_hidden: torch.Tensor | None = None,
        target_source: str | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> MTPLossOutput:
        """Weighted, chunked loss of the active heads against tokens t+1+k (see `peft_mtp.loss`).

        Args:
            head_hidden: `(B, T, K, H)` head outputs.
            labels: `(B, T)` unshifted labels (-100 = ignored).
            position_ids: position ids of packed sequences (no target crosses a document).
            trunk_hidden: `(B, T, H)` trunk output, the teacher of `head_target_source="argmax"` / `"soft"`.
            target_source: overrides the config's `head_target_source` (e.g. `"labels"` for labels that already
                hold the model's predictions).
            input_ids: `(B, T)` tokens of the pass; heads that copy (`MTPConfig.copy_ngram`) need them to find
                their candidates and train their gates.
            attention_mask: optional `(B, T)` padding mask of those tokens.

        Returns:
            An `MTPLossOutput` (weighted loss, per-head losses and accuracies).
        """
        config = self.active_config()
        # Sampling targets is a training-time saving: evaluation scores every target.
        sample_rate = config.head_loss_sample_rate if self.training else 1.0
        heads = self.active_heads()
        vocabulary = heads.draft_vocab
        candidates = gates = None
        if heads.copy_gates is not None:
            candidates = self._copy_candidates(input_ids, attention_mask)
            # The gates are probes of the heads' outputs: their loss does not move the heads (peft_mtp.copying).
            gates = heads.copy_gate_logits(head_hidden.detach(), self.get_trunk(), candidates)
        return mtp_loss(head_hidden, labels, self.head_unembedding, config.head_loss_weights(), position_ids,
                        target_source=target_source or config.head_target_source, trunk_hidden=trunk_hidden,
                        sample_rate=sample_rate, feature_weight=config.head_feature_loss_weight,
                        target_slots=None if vocabulary is None else vocabulary.to_slots,
                        copy_candidates=candidates, copy_gate_logits=gates)

    def _copy_candidates(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(
                f"These heads copy (`copy_ngram`={self.active_config().copy_ngram}) and need `input_ids` to find "
                "their candidates; pass `input_ids` instead of `inputs_embeds`."
            )
        return self.active_heads().copy_candidates(input_ids, attention_mask)

    def head_unembedding(self, k: int) -> Unembedding:
        """Final norm, unembedding and logit transform of head k (k = 0: the model's own head).

        A head with a draft vocabulary scores its N tokens only: the unembedding's rows of those tokens.
        """
        trunk = self.get_trunk()
        linear = (self.active_heads().unembedding_of(k) if k > 0 else None) or trunk.unembedding
        weight, bias = _unsharded(linear.weight), _unsharded(getattr(linear, "bias", None))
        if k > 0:
            weight, bias = self.active_heads().draft_unembedding(weight, bias)
        return Unembedding(norm=trunk.final_norm, weight=weight, bias=bias,
                           logit_scale=trunk.logit_multiplier, softcap=trunk.softcap)

    # Fraction of training done (0..1): moves the MTP-weight schedule. Set by the trainer hook
    # (`peft_mtp.training.MTPTrainingCallback`), or by hand in a custom loop.
    training_progress: float = 0.0

    def current_mtp_loss_weight(self) -> float:
        """The active adapter's MTP weight at `training_progress` (see `MTPConfig.mtp_loss_weight_final`)."""
        return self.active_config().mtp_loss_weight_at(self.training_progress)

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Add tags to the base model's card, and attach to the trainer when a trainer is the caller.

        TRL's `SFTTrainer.__init__` ends with `self.model.add_model_tags(...)`: the one point where a model
        can meet its finished trainer. See `peft_mtp.training` for what attaching does.
        """
        self.model.add_model_tags(tags)
        attach_from_caller(self, inspect.currentframe().f_back)


def _inject_trunk_lora(model: nn.Module, lora_config, adapter_name: str, low_cpu_mem_usage: bool) -> None:
    """Inject the adapter's trunk LoRA with PEFT's public `inject_adapter_in_model`."""
    # A LoraModel built over a model that already carries `peft_config` writes its LoraConfig into that
    # dict, which is the MTP tuner's own: hide it for the duration, then restore it untouched.
    saved = model.__dict__.pop("peft_config", None)
    try:
        inject_adapter_in_model(copy.deepcopy(lora_config), model, adapter_name=adapter_name,
                                low_cpu_mem_usage=low_cpu_mem_usage)
    finally:
        model.__dict__.pop("peft_config", None)
        if saved is not None:
            model.peft_config = saved


def _share_of_step(labels: torch.Tensor, num_items_in_batch: int | torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the next-token targets of the whole optimizer step.

    When transformers' Trainer passes `num_items_in_batch`, it expects the model's loss to be a sum over
    this micro-batch divided by the target count of the whole step (every gradient-accumulation
    micro-batch, and every process when `average_tokens_across_devices`); it then skips the division by
    the accumulation steps and multiplies the loss by the number of processes (DDP averages gradients).
    The MTP loss is a mean over this micro-batch: weighted by this share, its sum over micro-batches and
    processes is the step's mean (exactly when every micro-batch has as many targets per head), instead
    of `num_processes * gradient_accumulation_steps` times it. With one process and no accumulation the
    share is 1.

    Args:
        labels: `(B, T)` unshifted labels of this micro-batch (-100 = ignored).
        num_items_in_batch: next-token targets of the step, as the Trainer counted them (`labels[..., 1:]`).

    Returns:
        A float32 scalar tensor.
    """
    local = (labels[..., 1:] != IGNORE_INDEX).sum().to(torch.float32)
    return local / torch.as_tensor(num_items_in_batch, device=local.device).clamp(min=1)


# Subclasses of foreign output classes that declare the MTP keys, by (class, keys); see `_with_mtp_outputs`.
_MTP_OUTPUT_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _with_mtp_outputs(outputs: Any, extra: dict[str, Any]) -> Any:
    """`outputs` (any output class, e.g. TRL's `FusedCausalLMOutput`) with the MTP keys of `extra` added.

    DDP rebuilds a `ModelOutput` from its class's declared fields after every forward (pytree unflatten:
    `output_type(**fields)`), so a key merely set on an instance fails there with "unexpected keyword
    argument 'mtp_loss'". Keys the class does not declare are therefore added through a dataclass subclass
    that declares them (built once per class; `ModelOutput` registers it with pytree itself).

    Args:
        outputs: the base model's output.
        extra: MTP outputs to add (`mtp_loss`, `mtp_logits`, ...).

    Returns:
        `outputs` itself, or an instance of the subclass with the same values, with `extra` set.
    """
    cls = type(outputs)
    if isinstance(outputs, ModelOutput) and dataclasses.is_dataclass(cls):
        declared = {f.name for f in dataclasses.fields(cls)}
        missing = tuple(sorted(key for key in extra if key not in declared))
        if missing:
            subclass = _MTP_OUTPUT_CLASSES.get((cls, missing))
            if subclass is None:
                fields = [(key, torch.Tensor | None, dataclasses.field(default=None)) for key in missing]
                subclass = dataclasses.make_dataclass(f"MTP{cls.__name__}", fields, bases=(cls,))
                _MTP_OUTPUT_CLASSES[(cls, missing)] = subclass
            outputs = subclass(**outputs)
    for key, value in extra.items():
        outputs[key] = value
    return outputs


def _unsharded(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The whole of an FSDP2-sharded parameter (a `DTensor`), else `tensor` itself.

    FSDP2 gathers a module's parameters only around that module's own forward. The heads read the
    unembedding's weight directly, and under TRL's fused head nothing calls the unembedding as a module,
    so they can meet its shards ("mixed torch.Tensor and DTensor"). Gathering it here is what TRL does for
    its own head; it is a collective, which every rank reaches in the same order (same heads, same steps).
    """
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def _keep_positions(head_hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Select the positions transformers' `logits_to_keep` keeps (an int keeps the last n; 0 keeps all)."""
    if isinstance(logits_to_keep, int):
        return head_hidden if logits_to_keep == 0 else head_hidden[:, -logits_to_keep:]
    return head_hidden[:, logits_to_keep]


def _check_base_model_fits(config: MTPConfig, trunk: Trunk) -> None:
    """Fill in what the heads are built for, or check it against the model they are loaded onto."""
    actual = {
        "base_architecture": type(trunk.model).__name__,
        "base_hidden_size": trunk.hidden_size,
        "base_vocab_size": trunk.vocab_size,
    }
    mismatches = [
        f"{name}: heads built for {getattr(config, name)!r}, model has {value!r}"
        for name, value in actual.items()
        if getattr(config, name) is not None and getattr(config, name) != value
    ]
    if mismatches:
        raise ValueError(
            "These MTP heads do not fit this base model (" + "; ".join(mismatches) + "). Load them onto the model "
            f"they were trained for ({config.base_model_name_or_path or 'see base_model_name_or_path'})."
        )
    for name, value in actual.items():
        setattr(config, name, value)


def _adapter_model_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """State-dict keys of one adapter's weights in a PeftModel: its heads and its trunk LoRA."""
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    keys = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
    own_heads = f".mtp_heads.{adapter_name}."
    return [key for key in keys if ".mtp_heads." not in key or own_heads in key]
