"""Training MTP heads with TRL's plain `SFTTrainer`: how the MTP loss reaches the optimizer, and the metrics.

    trainer = SFTTrainer(model=base_model, args=SFTConfig(...), train_dataset=ds, peft_config=MTPConfig(num_heads=4))
    trainer.train()                               # or model=get_peft_model(base_model, MTPConfig(...))

No subclass and no callback to pass. This module holds everything that makes that work.

## How the loss reaches the optimizer

TRL 1.16's `SFTTrainer.compute_loss` calls `model(**inputs, fused_lm_head=True)` and computes

    loss = -outputs.log_probs.sum() / num_tokens,    num_tokens = num_items_in_batch or outputs.label_mask.sum()

itself; `outputs.loss` is ignored. So `MTPModel.forward`, when it sees `fused_lm_head=True`, runs the heads
on the trunk output captured in the same (single) trunk pass, computes the weighted head loss `L` (chunked,
see `loss.py`), and `fold_mtp_loss` subtracts `w * L * n` from `log_probs` at one trained position, where
`n = label_mask.sum()` is the micro-batch's count of next-token targets and `w` the current MTP weight.
TRL's own formula then gives

    loss = -sum(log_probs) / num_tokens + w * L * n / num_tokens

that is `NLL + w * L` exactly for one micro-batch (`num_tokens = n`). Under gradient accumulation or DDP,
TRL divides by the step's target count, so each micro-batch's `w * L` is weighted by its share of the
step's next-token targets, the way TRL weights its own loss (the same contract `_share_of_step` follows
on the model's plain path). An all-masked micro-batch has `n = 0` and contributes an exact zero.

What else reads `log_probs` element-wise would see the folded position, so these settings are refused
when the trainer is built (`check_trainer_settings`), never trained wrongly:

* `loss_type="dft"` multiplies each log-prob by its probability;
* `compute_loss_func` and `label_smoothing_factor > 0` take the loss from a second forward without labels,
  so the heads would get none;
* context / sequence parallelism split a sequence across ranks (a head reading t+1+k would miss it);
* packing or padding-free batches with `cnn` / `mha_ffn` heads, whose own convolution / attention reads
  earlier positions without knowing where a packed document starts;
* trainers other than `SFTTrainer` (DPO, GRPO, ...), whose losses read `log_probs` per sequence.

TRL's metrics keep their meaning: `entropy` and `mean_token_accuracy` come from `entropy`, `is_top1` and
`label_mask`, which the fold leaves untouched. The logged `loss` is the total (next-token + MTP).

With a frozen trunk (no trainable parameter in the base model), the trunk runs under `torch.no_grad()`:
nothing upstream of it can learn, and with gradient checkpointing PEFT makes the embeddings' output
require grad, which would otherwise cost a full trunk backward for nothing.

## How the model finds its trainer

TRL gives a model no handle on its trainer. The one call `SFTTrainer.__init__` makes on the finished model
is `self.model.add_model_tags(self._tag_names)`, its last line. `MTPModel.add_model_tags` passes the tags
on and, when its caller is a `transformers.Trainer`, calls `attach_trainer(caller)`, which:

1. checks the settings above (so they raise at construction);
2. links the tuner to the trainer (a weak reference) so that metrics reach `trainer._metrics`;
3. adds `MTPTrainingCallback`, which moves the MTP-weight schedule along with `state.global_step`;
4. applies `MTPConfig.head_lr_multiplier` through `optimizer_cls_and_kwargs`.

`attach_trainer` is public and idempotent: call it yourself for a trainer built some other way.

## Metrics

While linked, every forward with labels appends, per micro-batch, to `trainer._metrics["train" | "eval"]`:
`mtp/head{k}_loss`, `mtp/head{k}_acc` (top-1 accuracy of head k), `mtp/acceptance_length` (expected tokens
per verification step of greedy chained drafting, `1 + sum_k prod_{j<=k} acc_j`), `mtp/loss` (the weighted
head loss `L`), `mtp/weight` (`w`) and `mtp/next_token_loss`. TRL's `log()` averages each list over the
logging window, prefixes `eval_` in evaluation, and merges them into `logs` *before* calling
`Trainer.log`, which appends to `state.log_history` and then calls every reporting integration
(TensorBoard, W&B, trackio, ...). They are handled exactly like TRL's own `entropy`. Losses and
accuracies are summed across processes before they are divided.
"""

from __future__ import annotations

import types
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.trainer_callback import TrainerCallback

from .config import CONTEXTUAL_HEAD_TYPES
from .distributed import check_distributed_setup
from .draft_vocab import fit_on_dataset

if TYPE_CHECKING:
    from transformers import Trainer

    from .loss import MTPLossOutput
    from .model import MTPModel

METRIC_PREFIX = "mtp/"
# Head types whose own layers read earlier positions without knowing where a packed document starts.
PACKING_UNSAFE_HEAD_TYPES = tuple(t for t in CONTEXTUAL_HEAD_TYPES if t not in ("identical", "sequential"))


# ----------------------------------------------------------------------------------------------
# The loss hook


def fold_mtp_loss(outputs: Any, mtp_term: torch.Tensor) -> Any:
    """Fold `mtp_term` into TRL's fused output so that TRL's own loss formula includes it exactly.

    TRL computes `loss = -log_probs.sum() / num_tokens`. Subtracting `mtp_term * n` (n = `label_mask.sum()`)
    from one element of `log_probs` adds `mtp_term * n / num_tokens` to that loss: `mtp_term` itself when
    `num_tokens = n`, this micro-batch's share of it under gradient accumulation (see the module docstring).

    Args:
        outputs: TRL's `FusedCausalLMOutput` (`log_probs`, `label_mask`, `loss`, ...).
        mtp_term: scalar `w * L` with grad.

    Returns:
        `outputs`, with `log_probs` and `loss` updated in the output object (not in place on tensors).
    """
    label_mask = outputs["label_mask"]
    count = label_mask.sum()
    flat = outputs["log_probs"].reshape(-1)
    # The first trained position, or position 0 when there is none (then count = 0 and the fold adds 0). A trained
    # position keeps the sum right also for code that sums `log_probs[label_mask]`.
    index = label_mask.reshape(-1).to(torch.int32).argmax().reshape(1)
    folded = mtp_term.to(flat.dtype) * count.to(flat.dtype)
    outputs["log_probs"] = flat.index_add(0, index, -folded.reshape(1)).view_as(outputs["log_probs"])
    if outputs.get("loss") is not None:
        outputs["loss"] = outputs["loss"] + folded / count.clamp(min=1).to(flat.dtype)
    return outputs


def trunk_is_frozen(model: nn.Module, inputs_embeds: torch.Tensor | None = None) -> bool:
    """Whether nothing upstream of the trunk output can learn: no base-model parameter requires grad.

    Args:
        model: the base model (the tuner's `model`, with its LoRA layers if any).
        inputs_embeds: embeddings passed instead of ids (a caller may want their gradient).

    Returns:
        True when the trunk can run without autograd (MTPModel.forward then runs it under `torch.no_grad()`).
    """
    if inputs_embeds is not None and inputs_embeds.requires_grad:
        return False
    return not any(parameter.requires_grad for parameter in model.parameters())


# ----------------------------------------------------------------------------------------------
# Metrics


def expected_acceptance_length(accuracies: list[float]) -> float:
    """Expected tokens per verification step when K heads draft a greedy chain and the model verifies it.

    Head k's draft counts only if heads 1..k-1 were all right, so with per-head top-1 accuracies `a_k`
    (taken as independent) the expected length is `1 + sum_k prod_{j<=k} a_j`; the 1 is the token the
    verifying pass always yields. With dataset labels, `a_k` measures agreement with the data, which
    matches acceptance only as far as the model itself would produce the data; with
    `head_target_source="argmax"` it measures agreement with the model's own greedy choice.

    Args:
        accuracies: `[a_1, ..., a_K]`.

    Returns:
        A float in `[1, K + 1]`.
    """
    length, survive = 1.0, 1.0
    for accuracy in accuracies:
        survive *= accuracy
        length += survive
    return length


def step_metrics(result: MTPLossOutput, weight: float, next_token_loss: float | None = None) -> dict[str, float]:
    """The metrics of one forward pass, from (already summed across processes) head statistics.

    Args:
        result: the `MTPLossOutput` (its sums and counts).
        weight: the MTP weight `w` used.
        next_token_loss: the model's own next-token loss of the pass, if known.

    Returns:
        Flat metric names (`mtp/head1_loss`, ...) to floats. A head without targets in this pass reports
        nothing, so that it does not drag the window's average to 0.
    """
    sums, correct, counts, scored = (
        t.tolist() for t in (result.head_loss_sums, result.head_correct, result.head_counts, result.head_scored)
    )
    metrics: dict[str, float] = {}
    accuracies = []
    for k, (loss_sum, hits, count, num_scored) in enumerate(zip(sums, correct, counts, scored), start=1):
        if count > 0:
            # Loss over the targets the loss scored; accuracy over all (a draft vocabulary misses the others).
            if num_scored > 0:
                metrics[f"{METRIC_PREFIX}head{k}_loss"] = loss_sum / num_scored
            metrics[f"{METRIC_PREFIX}head{k}_acc"] = hits / count
        accuracies.append(hits / count if count > 0 else 0.0)
    if any(count > 0 for count in counts):
        metrics[f"{METRIC_PREFIX}acceptance_length"] = expected_acceptance_length(accuracies)
        metrics[f"{METRIC_PREFIX}loss"] = float(result.loss.detach())
    metrics[f"{METRIC_PREFIX}weight"] = float(weight)
    if next_token_loss is not None:
        metrics[f"{METRIC_PREFIX}next_token_loss"] = next_token_loss
    return metrics


class TrainerLink:
    """The tuner's weak link to the trainer it trains under: where metrics go.

    Args:
        trainer: a TRL `SFTTrainer` (anything with `_metrics` and `accelerator`).
    """

    def __init__(self, trainer: Trainer):
        self._trainer = weakref.ref(trainer)

    @property
    def trainer(self) -> Trainer | None:
        return self._trainer()

    def record(self, result: MTPLossOutput, weight: float, training: bool,
               next_token: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Append one forward pass's metrics to `trainer._metrics[mode]` (summed across processes first).

        Args:
            result: the pass's `MTPLossOutput`.
            weight: the MTP weight used.
            training: the model's mode (`train` or `eval` metrics, as TRL decides them).
            next_token: `(nll_sum, count)` of the model's own next-token loss in this pass, if known.
        """
        trainer = self.trainer
        if trainer is None or not hasattr(trainer, "_metrics"):
            return
        num_heads = result.head_counts.numel()
        stats = [result.head_loss_sums.float(), result.head_correct.float(), result.head_counts.float(),
                 result.head_scored.float()]
        if next_token is not None:
            stats.append(torch.stack([t.detach().float().reshape(()) for t in next_token]))
        # The weighted loss rides along (last) so that every process's enters its mean, not rank 0's alone.
        flat = torch.cat([*stats, result.loss.detach().float().reshape(1)])
        if trainer.accelerator.num_processes > 1:
            flat = trainer.accelerator.reduce(flat, reduction="sum")
        mean_loss, flat = flat[-1] / trainer.accelerator.num_processes, flat[:-1]
        sums, correct, counts, scored = (flat[i * num_heads:(i + 1) * num_heads] for i in range(4))
        next_token_loss = None
        if next_token is not None and flat[-1] > 0:
            next_token_loss = float(flat[-2] / flat[-1])
        summed = types.SimpleNamespace(head_loss_sums=sums, head_correct=correct, head_counts=counts,
                                       head_scored=scored, loss=mean_loss)
        mode = "train" if training else "eval"
        for name, value in step_metrics(summed, weight, next_token_loss).items():
            trainer._metrics[mode][name].append(value)


def get_link(tuner: MTPModel) -> TrainerLink | None:
    """The tuner's `TrainerLink`, or None when no trainer is attached."""
    return tuner.__dict__.get("_mtp_trainer_link")


# ----------------------------------------------------------------------------------------------
# Attaching to a trainer


class MTPTrainingCallback(TrainerCallback):
    """Moves the MTP-weight schedule along with training: `tuner.training_progress = global_step / max_steps`.

    Added by `attach_trainer`. The progress is a pure function of the step, so a resumed run continues
    the schedule where it stopped.

    Args:
        tuner: the `MTPModel` whose weight follows the schedule.
    """

    def __init__(self, tuner: MTPModel):
        self._tuner = weakref.ref(tuner)

    def _update(self, state) -> None:
        tuner = self._tuner()
        if tuner is not None:
            tuner.training_progress = min(1.0, state.global_step / state.max_steps) if state.max_steps else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._update(state)


def check_trainer_settings(trainer: Trainer, tuner: MTPModel) -> None:
    """Raise if the trainer's settings would train the heads wrongly with the loss fold.

    Args:
        trainer: the trainer.
        tuner: the `MTPModel`.

    Raises:
        ValueError: naming the setting, its value and the fix.
    """
    from trl import SFTTrainer

    if not isinstance(trainer, SFTTrainer):
        raise ValueError(
            f"MTP heads train with TRL's SFTTrainer (or a subclass), got {type(trainer).__name__}: its loss reads "
            "`log_probs` in a way the MTP loss hook would corrupt. Train the heads with SFTTrainer, or call the model "
            "without `fused_lm_head` (its `loss` then includes the MTP loss)."
        )
    args, config = trainer.args, tuner.active_config()
    if getattr(args, "loss_type", "nll") != "nll":
        raise ValueError(
            f"`loss_type`={args.loss_type!r} is not supported with MTP heads: the MTP loss enters TRL's loss through "
            "`log_probs`, which this loss type reweights per token. Use `loss_type='nll'`."
        )
    if trainer.compute_loss_func is not None:
        raise ValueError(
            "`compute_loss_func` is not supported with MTP heads: SFTTrainer then computes the loss from a forward "
            "without labels, so the heads would get no loss. Remove `compute_loss_func`."
        )
    if getattr(args, "label_smoothing_factor", 0.0) > 0:
        raise ValueError(
            f"`label_smoothing_factor`={args.label_smoothing_factor} is not supported with MTP heads: SFTTrainer then "
            "computes the loss from a forward without labels, so the heads would get no loss. Set it to 0."
        )
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    if parallelism is not None and (getattr(parallelism, "cp_enabled", False) or getattr(parallelism, "sp_enabled", False)):
        raise ValueError(
            "Context / sequence parallelism is not supported with MTP heads: it splits each sequence across ranks, "
            "and head k at position t needs token t+1+k. Set `cp_size` / `sp_size` to 1."
        )
    packed = bool(getattr(args, "packing", False) or getattr(args, "padding_free", False))
    if packed and config.head_type in PACKING_UNSAFE_HEAD_TYPES:
        raise ValueError(
            f"`head_type`={config.head_type!r} does not support packed or padding-free batches (`packing`="
            f"{args.packing}, `padding_free`={args.padding_free}): its own layers read earlier positions without "
            "knowing where a packed document starts. Set `packing=False` and `padding_free=False`, or use "
            f"a head type among {('linear', 'ffn', 'identical', 'sequential')}."
        )
    # Distributed settings that cannot work (FSDP on CPU, FSDP1, sharded checkpoints): see peft_mtp.distributed.
    check_distributed_setup(args, trainer.accelerator.state)


def mtp_param_groups(
    model: nn.Module, learning_rate: float, head_lr_multiplier: float = 1.0, weight_decay: float = 0.0,
    decay_parameter_names: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with a separate learning rate for MTP head parameters.

    Use it to build your own optimizer: `torch.optim.AdamW(mtp_param_groups(model, 1e-4, 4.0))`.

    Args:
        model: the PeftModel (or any module whose head parameters have `.mtp_heads.` in their names).
        learning_rate: learning rate of the other trainable parameters (trunk LoRA).
        head_lr_multiplier: head learning rate = `learning_rate * head_lr_multiplier`.
        weight_decay: weight decay of the parameters in `decay_parameter_names` (all, if None).
        decay_parameter_names: names that get weight decay (e.g. `Trainer.get_decay_parameter_names`).

    Returns:
        Up to four groups: (heads, other) x (decay, no decay), each with `lr` and `weight_decay`, empty ones left out.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = decay_parameter_names is None or name in decay_parameter_names
        groups.setdefault((_is_head_parameter(name), decays), []).append(parameter)
    return [
        {"params": params, "lr": learning_rate * (head_lr_multiplier if is_head else 1.0),
         "weight_decay": weight_decay if decays else 0.0}
        for (is_head, decays), params in sorted(groups.items())
    ]


def _is_head_parameter(name: str) -> bool:
    return ".mtp_heads." in name or name.startswith("mtp_heads.")


def _with_head_lr(optimizer_cls: type, head_parameter_ids: set[int], multiplier: float) -> type:
    """A subclass of `optimizer_cls` that moves head parameters into groups with `lr * multiplier`.

    `Trainer.create_optimizer` builds its (decay, no decay) groups and calls `optimizer_cls(groups, lr=...)`;
    it treats anything that is not an Optimizer subclass as a factory with another signature, hence a subclass.
    """

    def __init__(self, params, *args, **kwargs):
        base_lr = kwargs.get("lr", args[0] if args else None)
        split = []
        for group in params if isinstance(params, (list, tuple)) else [{"params": list(params)}]:
            group = group if isinstance(group, dict) else {"params": [group]}
            members = list(group["params"])
            heads = [p for p in members if id(p) in head_parameter_ids]
            others = [p for p in members if id(p) not in head_parameter_ids]
            if others:
                split.append({**group, "params": others})
            if heads:
                lr = group.get("lr", base_lr)
                split.append({**group, "params": heads, "lr": lr * multiplier})
        optimizer_cls.__init__(self, split, *args, **kwargs)

    subclass = type(optimizer_cls.__name__, (optimizer_cls,), {"__init__": __init__})
    subclass.__module__ = optimizer_cls.__module__  # `Trainer` recognises some optimizers by module name
    subclass.__qualname__ = optimizer_cls.__qualname__
    return subclass


def _apply_head_lr(trainer: Trainer, multiplier: float) -> None:
    from transformers.trainer_optimizer import is_optimizer_factory

    if trainer.optimizer is not None:
        raise ValueError(
            f"`head_lr_multiplier`={multiplier} cannot be applied: the trainer was given a ready optimizer. Build its "
            "groups with `peft_mtp.training.mtp_param_groups(model, lr, head_lr_multiplier)`, or set "
            "`head_lr_multiplier=1.0`."
        )
    if trainer.optimizer_cls_and_kwargs is not None:
        optimizer_cls, optimizer_kwargs = trainer.optimizer_cls_and_kwargs
    else:
        optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
        raise ValueError(
            f"`head_lr_multiplier`={multiplier} cannot be applied to the optimizer `optim`={trainer.args.optim!r}, "
            "which builds its own parameter groups. Use an AdamW-style optimizer, or set `head_lr_multiplier=1.0`."
        )
    head_ids = {id(p) for name, p in trainer.model.named_parameters() if _is_head_parameter(name)}
    trainer.optimizer_cls_and_kwargs = (_with_head_lr(optimizer_cls, head_ids, multiplier), dict(optimizer_kwargs))


def attach_trainer(trainer: Trainer, tuner: MTPModel | None = None) -> None:
    """Connect MTP training to a trainer: check settings, link metrics, add the schedule callback, head LR.

    Called automatically at the end of `SFTTrainer.__init__` (see the module docstring); idempotent.

    Args:
        trainer: the trainer (a TRL `SFTTrainer`).
        tuner: the `MTPModel`; found in `trainer.model` when omitted.

    Raises:
        ValueError: a setting the MTP loss hook cannot train correctly (see `check_trainer_settings`).
    """
    tuner = tuner if tuner is not None else _find_tuner(trainer.model)
    check_trainer_settings(trainer, tuner)
    link = get_link(tuner)
    if link is not None and link.trainer is trainer:
        return
    tuner.__dict__["_mtp_trainer_link"] = TrainerLink(trainer)
    # Heads with an unfitted draft vocabulary predict over the training set's most frequent tokens.
    fit_on_dataset(tuner, getattr(trainer, "train_dataset", None))
    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, MTPTrainingCallback):
            trainer.callback_handler.remove_callback(callback)
    trainer.add_callback(MTPTrainingCallback(tuner))
    multiplier = tuner.active_config().head_lr_multiplier
    if multiplier != 1.0:
        _apply_head_lr(trainer, multiplier)


def attach_from_caller(tuner: MTPModel, frame: types.FrameType | None) -> None:
    """`attach_trainer` to the object whose method made the call in `frame`, when it is a `Trainer`.

    Args:
        tuner: the `MTPModel`.
        frame: the caller's frame (`MTPModel.add_model_tags` passes its own caller's).
    """
    from transformers import Trainer  # imported here: `import peft_mtp` stays light

    caller = frame.f_locals.get("self") if frame is not None else None
    if isinstance(caller, Trainer) and hasattr(caller, "callback_handler"):
        attach_trainer(caller, tuner)


def warn_if_unlinked(tuner: MTPModel) -> None:
    """Warn once when the fused path runs without a trainer link (metrics and schedule would be missing)."""
    if get_link(tuner) is None and not tuner.__dict__.get("_mtp_warned_unlinked"):
        tuner.__dict__["_mtp_warned_unlinked"] = True
        warnings.warn(
            "MTP heads are training through a fused LM head without a linked trainer, so per-head metrics are not "
            "logged and the MTP-weight schedule does not move. Call `peft_mtp.training.attach_trainer(trainer)`.",
            UserWarning,
            stacklevel=3,
        )


def _find_tuner(model: nn.Module) -> MTPModel:
    from .model import MTPModel

    for module in (model, getattr(model, "base_model", None), getattr(model, "module", None)):
        if isinstance(module, MTPModel):
            return module
        inner = getattr(module, "base_model", None)
        if isinstance(inner, MTPModel):
            return inner
    raise ValueError(f"No MTP heads found in {type(model).__name__}: wrap the model with get_peft_model(model, MTPConfig(...)).")


__all__ = [
    "MTPTrainingCallback",
    "TrainerLink",
    "attach_trainer",
    "check_trainer_settings",
    "expected_acceptance_length",
    "fold_mtp_loss",
    "mtp_param_groups",
    "step_metrics",
    "trunk_is_frozen",
]
