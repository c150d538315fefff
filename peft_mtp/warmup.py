"""Warm-start MTP heads on cached trunk outputs: one trunk pass, then many cheap head epochs.

With a frozen trunk (no trunk LoRA, Medusa-1 style) the trunk output of a training sequence never
changes, yet a trainer recomputes it at every step of every epoch. On a CPU that forward costs about
as much as everything the heads do, so caching it once (`cache_trunk_outputs`) and training the heads
on the cache (`warmup_heads`) buys two to three times more head epochs in the same time. The cache
also records the arguments the trunk gave its last decoder layers (masks, rotary embeddings), so
heads built from decoder layers (`identical`, `sequential`) train on it too.

The warm-up optimises exactly the trainer's MTP loss (`MTPModel.compute_mtp_loss`: the config's head
weights, target source and draft vocabulary), so it hands the trainer heads trained on the same objective.
With a draft vocabulary (`MTPConfig.draft_vocab_size`) each step is several times cheaper, since the
vocabulary projections are the largest cost left once the trunk is cached.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .heads import HeadContext
from .loss import model_predictions


@dataclass
class TrunkOutputBatch:
    """One batch of training sequences with the frozen trunk's output on them.

    Attributes:
        input_ids: `(B, T)` tokens.
        attention_mask: `(B, T)` padding mask (1 = real token).
        labels: `(B, T)` unshifted labels, -100 where no head should learn (prompt, padding). With
            `head_target_source="argmax"` they already hold the model's own greedy predictions.
        hidden: `(B, T, H)` trunk output (the hidden state entering the final norm).
        layer_kwargs: what the trunk passed its last decoder layers (see `Trunk.capture`).
        layer_outputs: `(B, T, n, H)` outputs of the heads' `feature_layers` (in the dtype the trunk produced
            them: bf16 under autocast), or None when the heads read the trunk output alone.
        argmax_labels: whether `labels` were replaced by the model's predictions when caching (the frozen trunk
            predicts the same every epoch, so they are computed once).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    hidden: torch.Tensor
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)
    layer_outputs: torch.Tensor | None = None
    argmax_labels: bool = False

    def head_input(self, heads) -> torch.Tensor:
        """What `heads` (an `MTPHeadStack`) read on this batch: the trunk output, fused with layer outputs if any."""
        return heads.head_input(self.hidden, () if self.layer_outputs is None else self.layer_outputs.unbind(2))

    @property
    def num_tokens(self) -> int:
        """Number of real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def split(self, rows: int) -> list[TrunkOutputBatch]:
        """This batch cut into batches of at most `rows` sequences (views, no copies).

        The trunk runs fastest on large batches and the heads train best on small ones (more steps in the same time),
        so a cache can be taken in large batches and trained on in small ones. The recorded layer arguments are cut
        along with it: the per-row ones (`attention_mask`, `position_ids`, `position_embeddings`) are sliced where
        they have a row per sequence and kept where they are shared (a first dimension of 1); `cache_position` and
        non-tensor arguments are kept.

        Args:
            rows: sequences per batch (>= 1).

        Returns:
            The batches, in order; the last one may be shorter.

        Raises:
            ValueError: `rows` < 1, or a layer argument this method does not know holds tensors with more than one
                row (it cannot tell whether they run over the sequences).
        """
        if rows < 1:
            raise ValueError(f"`rows` must be >= 1, got {rows}.")
        size = self.input_ids.shape[0]

        def cut(value: Any, start: int) -> Any:
            if isinstance(value, torch.Tensor):
                return value[start:start + rows] if value.dim() and value.shape[0] == size else value
            if isinstance(value, (tuple, list)):
                return type(value)(cut(item, start) for item in value)
            return value

        def check(key: str, value: Any) -> None:
            if isinstance(value, (tuple, list)):
                for item in value:
                    check(key, item)
            elif isinstance(value, torch.Tensor) and value.dim() and value.shape[0] > 1:
                raise ValueError(
                    f"Cannot split the cached layer argument {key!r} (shape {tuple(value.shape)}): only "
                    f"{_PER_ROW_ARGUMENTS} are known to run over the sequences. Cache in batches of the size you "
                    "train on instead."
                )

        for kwargs in self.layer_kwargs:
            for key, value in kwargs.items():
                if key not in _PER_ROW_ARGUMENTS and key not in _SHARED_ARGUMENTS:
                    check(key, value)
        return [TrunkOutputBatch(self.input_ids[start:start + rows], self.attention_mask[start:start + rows],
                                 self.labels[start:start + rows], self.hidden[start:start + rows],
                                 [{key: cut(value, start) if key in _PER_ROW_ARGUMENTS else value
                                   for key, value in kwargs.items()} for kwargs in self.layer_kwargs],
                                 cut(self.layer_outputs, start), self.argmax_labels)
                for start in range(0, size, rows)]


# Decoder-layer arguments `TrunkOutputBatch.split` slices (one row per sequence, or shared with a first dimension
# of 1), and ones it keeps whole (positions of the pass, shared by every row).
_PER_ROW_ARGUMENTS = ("attention_mask", "position_ids", "position_embeddings")
_SHARED_ARGUMENTS = ("cache_position",)


def _tuner(model):
    """The `MTPModel` inside a `PeftModel` (or the tuner itself)."""
    tuner = getattr(model, "base_model", model)
    if not hasattr(tuner, "active_heads"):
        raise TypeError(f"Expected a PeftModel with MTP heads (get_peft_model(model, MTPConfig(...))), got "
                        f"{type(model).__name__}.")
    return tuner


def _autocast(device_type: str, dtype: torch.dtype | None):
    """`torch.autocast` in `dtype` on `device_type`, or a no-op context when `dtype` is None."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _check_frozen_trunk(tuner) -> None:
    if tuner.active_config().lora_config is not None:
        raise ValueError(
            "Cached trunk outputs need a frozen trunk, but the MTP config has a `lora_config` (the trunk trains, so "
            "its outputs change every step). Train such adapters with the trainer directly."
        )


@torch.no_grad()
def cache_trunk_outputs(model, batches: Iterable[dict[str, torch.Tensor]], progress: bool = True,
                        autocast_dtype: torch.dtype | None = None) -> list[TrunkOutputBatch]:
    """Run the frozen trunk once over training batches and keep its output.

    Args:
        model: a `PeftModel` with MTP heads and no trunk LoRA.
        batches: dicts with `input_ids`, `attention_mask` and `labels` (`(B, T)` each, right-padded).
        progress: show a progress bar.
        autocast_dtype: run the trunk's forward under `torch.autocast` in this dtype (e.g. `torch.bfloat16`: a
            forward over 8 x 512 tokens of SmolLM2-135M ran 2.1x faster on a CPU with AVX512-BF16; the whole
            caching, float32 argmax included, about 1.5x). The argmax targets are still taken in the
            model's own dtype from the hidden states it produced; on SmolLM2 they differ from a float32 trunk's at
            0.6-0.8% of positions (near-ties), against 1-1.9% with the argmax in bf16 too.

    Returns:
        One `TrunkOutputBatch` per input batch, on the model's device. With `head_target_source="argmax"` their
        labels are the model's own greedy predictions, computed here once.
    """
    from tqdm.auto import tqdm

    tuner = _tuner(model)
    _check_frozen_trunk(tuner)
    trunk, heads = tuner.get_trunk(), tuner.active_heads()
    argmax = tuner.active_config().head_target_source == "argmax"
    device = trunk.unembedding.weight.device
    autocast = _autocast(device.type, autocast_dtype)
    batches = list(batches)
    cached = []
    for batch in tqdm(batches, desc="Caching trunk outputs", unit="batch", disable=not progress):
        batch = {key: value.to(device) for key, value in batch.items()}
        with trunk.capture(**heads.capture_kwargs) as captured, autocast:
            # logits_to_keep=1: the model's own logits are not needed, only the trunk output.
            tuner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                        use_cache=False)
        hidden = captured.hidden.to(trunk.unembedding.weight.dtype)  # a trunk under autocast may hand back bf16
        labels = batch["labels"]
        if argmax:
            labels = model_predictions(labels, hidden, tuner.head_unembedding(0))
        # Layer outputs stay in the trunk's dtype (bf16 under autocast: half the memory); heads cast them.
        layer_outputs = torch.stack(captured.layer_outputs, dim=2) if captured.layer_outputs else None
        cached.append(TrunkOutputBatch(batch["input_ids"], batch["attention_mask"], labels, hidden,
                                       captured.layer_kwargs, layer_outputs, argmax_labels=argmax))
    return cached


@dataclass
class WarmupResult:
    """What `warmup_heads` did.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall time of the training loop.
        head_losses: mean loss of each head over the last pass over the batches (the full pass before it when
            the last one, cut by the time limit or a fractional `epochs`, covered under half the batches).
        head_accuracies: top-1 accuracy of each head over the same batches (a target outside a draft vocabulary
            is a miss).
    """

    steps: int
    seconds: float
    head_losses: list[float]
    head_accuracies: list[float]


def warmup_heads(
    model,
    batches: Sequence[TrunkOutputBatch],
    epochs: float = 4.0,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.05,
    max_grad_norm: float = 1.0,
    time_limit_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> WarmupResult:
    """Train the active MTP heads on cached trunk outputs (AdamW, linear warm-up then cosine decay).

    The loss is the trainer's own MTP loss (`MTPModel.compute_mtp_loss`) on the cached trunk outputs.

    Args:
        model: the `PeftModel` whose heads the batches were cached for.
        batches: output of `cache_trunk_outputs`.
        epochs: passes over the batches (fractions allowed).
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the run (steps, or time under a time limit) spent warming the learning rate up.
        max_grad_norm: gradient clipping norm.
        time_limit_s: stop before a step that, at the average pace so far, would end past this many seconds. The
            schedule then runs on whichever of steps and time is further along (`max(step / steps, elapsed /
            time_limit_s)`), so the learning rate decays to zero by the deadline however the step times vary
            (batches of different lengths). The first step is always taken.
        seed: seed of the batch order.
        progress: show a progress bar.
        autocast_dtype: run the heads' forward and loss under `torch.autocast` in this dtype (e.g.
            `torch.bfloat16`; the backward pass follows the dtypes it chose); parameters, gradients and the optimizer
            stay in their own dtype. On CPUs with AVX512-BF16 or AMX a bf16 matmul runs about 2.5x faster than
            fp32. The optimizer step runs outside autocast: inside it, training diverged (measured on SmolLM2).

    Returns:
        A `WarmupResult`. The heads are left in the train / eval mode they were in.
    """
    from tqdm.auto import tqdm

    tuner = _tuner(model)
    _check_frozen_trunk(tuner)
    if not batches:
        raise ValueError("`batches` is empty: pass the output of `cache_trunk_outputs` on at least one batch.")
    if time_limit_s is not None and time_limit_s <= 0:
        raise ValueError(f"`time_limit_s` must be > 0 seconds (or None for no limit), got {time_limit_s}.")
    trunk, heads = tuner.get_trunk(), tuner.active_heads()
    num_heads = heads.num_heads

    # Soft targets come from the cached trunk output itself; a cache taken for argmax targets serves them too (its
    # labels then only mark which positions train).
    soft = tuner.active_config().head_target_source == "soft"
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95))
    total = max(1, int(round(epochs * len(batches))))

    def learning_rate_at(step: int, elapsed: float) -> float:
        """Linear warm-up over the first `warmup_ratio` of the run, then cosine decay to zero at its end.

        Progress is counted in steps, or in time when a time limit is set and the clock is further along.
        """
        done, ramp_done = step / total, (step + 1) / total
        if time_limit_s is not None:
            by_time = elapsed / time_limit_s
            done, ramp_done = max(done, by_time), max(ramp_done, by_time)
        ramp = min(1.0, ramp_done / warmup_ratio) if warmup_ratio > 0 else 1.0
        return learning_rate * ramp * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

    autocast = _autocast(trunk.unembedding.weight.device.type, autocast_dtype)
    rng = random.Random(seed)
    was_training = heads.training
    losses, scored, hits, counts = (torch.zeros(num_heads) for _ in range(4))
    heads.train()
    start, step, elapsed = time.perf_counter(), 0, 0.0
    bar = tqdm(total=total, desc="Warming up heads on cached trunk outputs", unit="step", disable=not progress)
    while step < total:
        order = list(range(len(batches)))
        rng.shuffle(order)
        # Metrics per epoch: each pass starts from zero, and the previous full pass is kept to report.
        previous = (losses.clone(), scored.clone(), hits.clone(), counts.clone()) if step else None
        losses.zero_(), scored.zero_(), hits.zero_(), counts.zero_()
        epoch_start = step
        for index in order[: total - step]:
            batch = batches[index]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, elapsed)
            context = HeadContext(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  layer_kwargs=batch.layer_kwargs, embed=trunk.embed)
            with autocast:  # the forward and the loss only: backward reuses the dtypes autocast chose (torch's advice)
                head_hidden = heads(batch.head_input(heads), context)  # (B, T, K, H)
                target_source = "soft" if soft else "labels" if batch.argmax_labels else None
                result = tuner.compute_mtp_loss(head_hidden, batch.labels, trunk_hidden=batch.hidden,
                                                target_source=target_source, input_ids=batch.input_ids,
                                                attention_mask=batch.attention_mask)
            loss = result.loss
            loss.backward()
            losses += result.head_loss_sums.float().cpu()
            scored += result.head_scored.float().cpu()
            hits += result.head_correct.float().cpu()
            counts += result.head_counts.float().cpu()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", head1_acc=f"{hits[0] / max(counts[0], 1):.2f}")
            if time_limit_s is not None:
                elapsed = time.perf_counter() - start
                if elapsed + elapsed / step > time_limit_s:
                    total = bar.total = step  # another step of the average length would end past the deadline
            if step >= total:
                break
    bar.close()
    heads.train(was_training)
    if previous is not None and 2 * (step - epoch_start) < len(batches):
        losses, scored, hits, counts = previous  # the last pass was cut short (time limit or fractional epochs)
    return WarmupResult(step, time.perf_counter() - start, (losses / scored.clamp(min=1)).tolist(),
                        (hits / counts.clamp(min=1)).tolist())
