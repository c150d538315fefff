"""`MTPConfig`: the configuration of Multi-Token Prediction heads as a PEFT method."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig, PeftConfig
from peft.utils import PeftType
from peft.utils.constants import DUMMY_TARGET_MODULES

HEAD_TYPES = ("linear", "ffn", "mha_ffn", "cnn", "identical", "sequential")
# Head types whose output at position t reads earlier positions (attention, convolution or decoder
# layers), and therefore keep their own state when decoding.
CONTEXTUAL_HEAD_TYPES = ("mha_ffn", "cnn", "identical", "sequential")
HEAD_WEIGHT_SCHEDULES = ("uniform", "harmonic", "geometric")
HEAD_INITS = ("base", "random")
MTP_WEIGHT_SCHEDULES = ("linear", "cosine", "step")
# Where head targets come from (see peft_mtp.loss): the data, or the model's own predictions.
HEAD_TARGET_SOURCES = ("labels", "argmax", "soft")


@dataclass
class MTPConfig(PeftConfig):
    """Configuration of Multi-Token Prediction (MTP) heads, a PEFT method.

    K extra heads sit beside the model's next-token head. Head k (k = 1..K) at position t predicts
    token t+1+k from the trunk's hidden state at t (see `peft_mtp.alignment`). The heads share the
    model's final norm and unembedding (by default), train with the model's loss plus a weighted
    MTP loss, and draft tokens for self-speculative decoding.

    > Parameters that control the heads

    Args:
        num_heads (`int`, *optional*, defaults to `4`):
            Number of extra heads K. Head k predicts k tokens beyond the next one.
        head_type (`str`, *optional*, defaults to `"ffn"`):
            Architecture of each head, one of `"linear"`, `"ffn"`, `"mha_ffn"`, `"cnn"`, `"identical"`,
            `"sequential"`. See docs/head_types.md for what each costs and when to use it.
        num_layers (`int`, *optional*, defaults to `1`):
            Layers per head: residual blocks for `ffn`, `mha_ffn` and `cnn`, stacked maps for `linear`,
            decoder layers of the base model's own class for `identical` and `sequential`.
        head_init (`str`, *optional*, defaults to `"base"`):
            `"base"` starts every head from the base model: residual blocks are zero-initialised and
            linear maps start at the identity (so a new head predicts what the next-token head
            predicts), and decoder layers are copied from the trunk's last layers. `"random"` uses the
            base model's `initializer_range` for every head weight.
        share_unembedding (`bool`, *optional*, defaults to `True`):
            Whether heads use the base model's frozen unembedding (`lm_head`). If `False`, every head
            gets its own trainable copy of it, which is saved with the adapter (vocab x hidden
            parameters per head).
        draft_vocab_size (`int`, *optional*):
            If set, heads predict over this many tokens only, the most frequent ones of the training data
            (a reduced draft vocabulary, as in EAGLE-3 and FR-Spec): a head then costs about
            `draft_vocab_size / vocab_size` of the vocabulary projections a full-vocabulary head costs, in
            training and in drafting. Targets outside it give no loss and count as misses; decoding stays
            exact (the model verifies with its full vocabulary). The SFTTrainer hook picks the tokens from the
            training set; elsewhere call `peft_mtp.fit_draft_vocabulary`. `None`: the whole vocabulary. See
            docs/head_types.md for the coverage and cost on SmolLM2.
        head_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the input of each head's blocks during training.
        cnn_kernel_size (`int`, *optional*, defaults to `4`):
            Width of the causal convolution of `cnn` heads (how many positions up to t it reads).
        mha_num_attention_heads (`int`, *optional*):
            Attention heads of `mha_ffn` heads. Defaults to the base model's `num_attention_heads`
            when it divides the hidden size, else 1.
        feature_layers (`list[int]`, *optional*):
            Decoder layers of the trunk (0-based, the last excluded) whose outputs the heads read beside the
            trunk output, fused into it position by position by a learned projection that starts at zero
            (EAGLE-3's multi-layer features). Low layers still carry the current token's identity, which the
            last layer has traded for the next token's, so a head can match the current token against earlier
            text and copy what followed it. Costs one `(n x hidden) -> hidden` projection per new position.
            `None`: the trunk output alone.
        copy_ngram (`int`, *optional*, defaults to `0`):
            Heads that can copy (`peft_mtp.copying`): with n > 0 each head also proposes the token that followed
            the latest earlier occurrence of the last n tokens it knows, and a learned gate weighs that candidate
            against the head's own distribution. Code and chat repeat their prompt and themselves, which
            one-layer heads predict poorly: on SmolLM2 the main job's head 1 agreed with the model on 0.49 of
            held-out code positions, the bigram candidate alone was right on 0.47. 2 is a good start; 0 turns
            copying off.

    > Parameters that control the loss

    Args:
        mtp_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the MTP loss next to the next-token loss: `loss = lm_loss + mtp_loss_weight *
            sum_k w_k * loss_k`. DeepSeek-V3 uses 0.3, then 0.1, when training the trunk jointly.
        head_weight_schedule (`str` or `list[float]`, *optional*, defaults to `"geometric"`):
            Relative weight w_k of head k: `"uniform"` (1), `"harmonic"` (1/k), `"geometric"`
            (`head_weight_ratio ** k`, Medusa's choice), or an explicit list of K positive floats.
            Weights are normalised to sum to 1.
        head_weight_ratio (`float`, *optional*, defaults to `0.8`):
            Ratio of the `"geometric"` schedule.
        mtp_loss_weight_final (`float`, *optional*):
            If set, the MTP weight moves from `mtp_loss_weight` at the first step to this value at the last
            step of training, following `mtp_loss_weight_schedule` (DeepSeek-V3: 0.3, then 0.1). The
            trainer hook moves it (`peft_mtp.training.MTPTrainingCallback`); outside a trainer, set
            `model.base_model.training_progress` (0 to 1) yourself. `None` keeps the weight constant.
        mtp_loss_weight_schedule (`str`, *optional*, defaults to `"linear"`):
            How the weight moves to `mtp_loss_weight_final`: `"linear"`, `"cosine"`, or `"step"` (jumps
            at `mtp_loss_weight_step_at`).
        mtp_loss_weight_step_at (`float`, *optional*, defaults to `0.7`):
            Fraction of training after which the `"step"` schedule switches to the final weight.
        head_target_source (`str`, *optional*, defaults to `"labels"`):
            What heads learn to predict: `"labels"` (the dataset's token t+1+k), `"argmax"` (the model's own
            greedy prediction of that token, i.e. the argmax of its next-token distribution at t+k:
            self-distillation, so heads match what the model will generate even when the data does not)
            or `"soft"` (KL to the model's whole distribution at t+k). Targets exist where labels do, so
            completion-only masks still apply. The self-distillation modes cost one extra vocabulary
            projection per position (`"argmax"`) or per head and position (`"soft"`).
        head_feature_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of a feature-regression term (EAGLE, Li et al. 2024): head k at position t also learns to
            output the trunk's hidden state at t+k, the state whose logits predict token t+1+k (smooth L1,
            averaged over the hidden size and the head's targets). A dense target of `hidden_size` numbers per
            position instead of one token, so heads learn from fewer tokens. Needs no extra vocabulary
            projection. 0 turns it off.
        head_loss_sample_rate (`float`, *optional*, defaults to `1.0`):
            Fraction of each head's targets scored per training step, drawn at random for each head
            (evaluation always scores all of them). Below 1 the head loss is an unbiased estimate, cheaper in
            proportion: scoring a target takes two projections onto the whole vocabulary, which dominates
            the cost of a head on small models (on SmolLM2-135M one head costs about a sixth of a LoRA-SFT
            step in FLOPs). 1.0 scores every target.

    > Parameters that control training

    Args:
        head_lr_multiplier (`float`, *optional*, defaults to `1.0`):
            Learning rate of head parameters = the trainer's `learning_rate` times this (Medusa-2 trains
            heads with a larger rate than the trunk LoRA). Applied by the SFTTrainer hook; for your own
            optimizer, use `peft_mtp.training.mtp_param_groups`.

    > Parameters that control the trunk

    Args:
        lora_config (`LoraConfig` or `dict`, *optional*):
            LoRA on the trunk, trained jointly with the heads (Medusa-2 style). Without it the trunk is
            frozen and only heads train (Medusa-1 style). Stored as a JSON-safe dict in
            adapter_config.json and rebuilt on load.

    > Filled in when the heads are attached (checked again when they are loaded)

    Args:
        base_architecture (`str`): class name of the model the heads were built for.
        base_hidden_size (`int`): its hidden size.
        base_vocab_size (`int`): its vocabulary size.
    """

    num_heads: int = field(default=4, metadata={"help": "Number of extra heads K; head k predicts token t+1+k."})
    head_type: str = field(
        default="ffn",
        metadata={"help": "Head architecture. `sequential` and `identical` accept most drafts, `ffn` is cheapest.",
                  "choices": list(HEAD_TYPES)},
    )
    num_layers: int = field(default=1, metadata={"help": "Blocks or decoder layers per head. More costs more per draft."})
    head_init: str = field(
        default="base",
        metadata={"help": "`base`: heads start as the model's own next-token predictor (or copies of its last "
                          "layers). `random`: fresh weights.", "choices": list(HEAD_INITS)},
    )
    share_unembedding: bool = field(
        default=True,
        metadata={"help": "Use the base model's frozen unembedding. False gives each head a trainable copy (large)."},
    )
    draft_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Heads predict over this many most frequent training tokens only (cheaper heads; "
                          "decoding stays exact). None: the whole vocabulary."},
    )
    head_dropout: float = field(default=0.0, metadata={"help": "Dropout on head inputs during training."})
    cnn_kernel_size: int = field(default=4, metadata={"help": "Width of the causal convolution of `cnn` heads."})
    mha_num_attention_heads: int | None = field(
        default=None, metadata={"help": "Attention heads of `mha_ffn` heads (default: the base model's)."}
    )
    feature_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Trunk decoder layers (0-based) whose outputs heads read beside the trunk output, fused "
                          "by a learned projection (EAGLE-3). E.g. [2, 15] on a 30-layer model. None: trunk "
                          "output only."},
    )
    copy_ngram: int = field(
        default=0,
        metadata={"help": "Heads also propose the token that followed the last n tokens' previous occurrence, "
                          "weighed by a learned gate (peft_mtp.copying). 0: off; 2 is a good start."},
    )
    mtp_loss_weight: float = field(
        default=1.0, metadata={"help": "loss = lm_loss + mtp_loss_weight * weighted mean of the head losses."}
    )
    head_weight_schedule: str | list[float] = field(
        default="geometric",
        metadata={"help": "Relative weight of head k: uniform, harmonic (1/k), geometric (ratio**k) or a list of K "
                          "floats."},
    )
    head_weight_ratio: float = field(default=0.8, metadata={"help": "Ratio of the geometric head weight schedule."})
    mtp_loss_weight_final: float | None = field(
        default=None,
        metadata={"help": "If set, the MTP weight moves from mtp_loss_weight to this value over training (e.g. "
                          "0.3 -> 0.1). None keeps it constant."},
    )
    mtp_loss_weight_schedule: str = field(
        default="linear",
        metadata={"help": "How the MTP weight moves to mtp_loss_weight_final.",
                  "choices": list(MTP_WEIGHT_SCHEDULES)},
    )
    mtp_loss_weight_step_at: float = field(
        default=0.7, metadata={"help": "Fraction of training after which the `step` schedule switches weight."}
    )
    head_target_source: str = field(
        default="labels",
        metadata={"help": "Head targets: dataset tokens (`labels`), or self-distillation from the model's own "
                          "greedy predictions (`argmax`) or distributions (`soft`), which cost extra vocabulary "
                          "projections.", "choices": list(HEAD_TARGET_SOURCES)},
    )
    head_feature_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the EAGLE-style term: head k at t regresses the trunk's hidden state at t+k "
                          "(dense target; 0 = off)."},
    )
    head_loss_sample_rate: float = field(
        default=1.0,
        metadata={"help": "Fraction of each head's targets scored per training step (random; eval scores all). "
                          "Below 1: an unbiased, cheaper, noisier head loss."},
    )
    head_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "Head learning rate = learning_rate x this (e.g. 4 to train heads faster than a trunk "
                          "LoRA). Applied by the SFTTrainer hook."},
    )
    lora_config: LoraConfig | dict | None = field(
        default=None, metadata={"help": "LoRA config for the trunk, trained jointly with the heads (optional)."}
    )
    base_architecture: str | None = field(default=None, metadata={"help": "Filled in when heads are attached."})
    base_hidden_size: int | None = field(default=None, metadata={"help": "Filled in when heads are attached."})
    base_vocab_size: int | None = field(default=None, metadata={"help": "Filled in when heads are attached."})
    target_modules: list[str] | str | None = field(
        default=DUMMY_TARGET_MODULES,
        metadata={"help": "Internal: MTP adds modules beside the model and replaces none of its layers."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.MTP
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        self._validate()
        if self.lora_config is not None:
            self.lora_config = _as_lora_config(self.lora_config)

    def _validate(self) -> None:
        # `TaskType.CAUSAL_LM` is a str enum whose str() is "TaskType.CAUSAL_LM": compare its value.
        if getattr(self.task_type, "value", self.task_type) != "CAUSAL_LM":
            raise ValueError(f"`task_type` must be 'CAUSAL_LM' for MTP heads, got {self.task_type!r}.")
        if not isinstance(self.num_heads, int) or isinstance(self.num_heads, bool) or self.num_heads < 1:
            raise ValueError(f"`num_heads` must be an integer >= 1, got {self.num_heads!r}.")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"`head_type` must be one of {HEAD_TYPES}, got {self.head_type!r}.")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"`num_layers` must be an integer >= 1, got {self.num_layers!r}.")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"`head_init` must be one of {HEAD_INITS}, got {self.head_init!r}.")
        if self.draft_vocab_size is not None and (
            not isinstance(self.draft_vocab_size, int) or isinstance(self.draft_vocab_size, bool)
            or self.draft_vocab_size < 1
        ):
            raise ValueError(
                f"`draft_vocab_size` must be an integer >= 1 (tokens heads predict over) or None (the whole "
                f"vocabulary), got {self.draft_vocab_size!r}."
            )
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"`head_dropout` must be in [0, 1), got {self.head_dropout!r}.")
        if not isinstance(self.cnn_kernel_size, int) or self.cnn_kernel_size < 1:
            raise ValueError(f"`cnn_kernel_size` must be an integer >= 1, got {self.cnn_kernel_size!r}.")
        if self.mha_num_attention_heads is not None and (
            not isinstance(self.mha_num_attention_heads, int) or self.mha_num_attention_heads < 1
        ):
            raise ValueError(
                f"`mha_num_attention_heads` must be an integer >= 1 or None, got {self.mha_num_attention_heads!r}."
            )
        if self.feature_layers is not None:
            layers = self.feature_layers
            if (not isinstance(layers, (list, tuple)) or not layers
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
                raise ValueError(
                    f"`feature_layers` must be a non-empty list of decoder-layer indices >= 0 (e.g. [2, 15]) or "
                    f"None, got {layers!r}."
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"`feature_layers` names a layer twice: {list(layers)!r}; list each layer once.")
            self.feature_layers = sorted(layers)
        if not isinstance(self.copy_ngram, int) or isinstance(self.copy_ngram, bool) or self.copy_ngram < 0:
            raise ValueError(
                f"`copy_ngram` must be an integer >= 0 (0 = heads do not copy; 2 matches the last two tokens), got "
                f"{self.copy_ngram!r}."
            )
        if not (isinstance(self.mtp_loss_weight, (int, float)) and math.isfinite(self.mtp_loss_weight)
                and self.mtp_loss_weight >= 0):
            raise ValueError(f"`mtp_loss_weight` must be a finite float >= 0, got {self.mtp_loss_weight!r}.")
        if not 0.0 < self.head_weight_ratio <= 1.0 and self.head_weight_schedule == "geometric":
            raise ValueError(
                f"`head_weight_ratio` must be in (0, 1] for the geometric schedule, got {self.head_weight_ratio!r}."
            )
        if self.mtp_loss_weight_final is not None and not (
            isinstance(self.mtp_loss_weight_final, (int, float)) and math.isfinite(self.mtp_loss_weight_final)
            and self.mtp_loss_weight_final >= 0
        ):
            raise ValueError(
                f"`mtp_loss_weight_final` must be a finite float >= 0 or None, got {self.mtp_loss_weight_final!r}."
            )
        if self.mtp_loss_weight_schedule not in MTP_WEIGHT_SCHEDULES:
            raise ValueError(
                f"`mtp_loss_weight_schedule` must be one of {MTP_WEIGHT_SCHEDULES}, got {self.mtp_loss_weight_schedule!r}."
            )
        if not 0.0 <= self.mtp_loss_weight_step_at <= 1.0:
            raise ValueError(f"`mtp_loss_weight_step_at` must be in [0, 1], got {self.mtp_loss_weight_step_at!r}.")
        if self.head_target_source not in HEAD_TARGET_SOURCES:
            raise ValueError(
                f"`head_target_source` must be one of {HEAD_TARGET_SOURCES}, got {self.head_target_source!r}."
            )
        if not (isinstance(self.head_feature_loss_weight, (int, float)) and math.isfinite(self.head_feature_loss_weight)
                and self.head_feature_loss_weight >= 0):
            raise ValueError(
                f"`head_feature_loss_weight` must be a finite float >= 0, got {self.head_feature_loss_weight!r}."
            )
        if not (isinstance(self.head_loss_sample_rate, (int, float)) and 0.0 < self.head_loss_sample_rate <= 1.0):
            raise ValueError(f"`head_loss_sample_rate` must be in (0, 1], got {self.head_loss_sample_rate!r}.")
        if not (isinstance(self.head_lr_multiplier, (int, float)) and math.isfinite(self.head_lr_multiplier)
                and self.head_lr_multiplier > 0):
            raise ValueError(f"`head_lr_multiplier` must be a finite float > 0, got {self.head_lr_multiplier!r}.")
        self.head_loss_weights()  # validates head_weight_schedule

    def mtp_loss_weight_at(self, progress: float) -> float:
        """The MTP weight at a point of training (see `mtp_loss_weight_final`).

        Args:
            progress: fraction of training done, from 0 (first step) to 1 (end).

        Returns:
            `mtp_loss_weight` moved towards `mtp_loss_weight_final` by the schedule.
        """
        start, end = float(self.mtp_loss_weight), self.mtp_loss_weight_final
        if end is None:
            return start
        progress = min(max(float(progress), 0.0), 1.0)
        if self.mtp_loss_weight_schedule == "step":
            return start if progress < self.mtp_loss_weight_step_at else float(end)
        if self.mtp_loss_weight_schedule == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return start + (float(end) - start) * progress

    def head_loss_weights(self) -> list[float]:
        """Return the normalised weight w_k of each head's loss, for k = 1..K.

        Returns:
            K positive floats that sum to 1.

        Raises:
            ValueError: `head_weight_schedule` is unknown, or a list of the wrong length or with
                non-positive values.
        """
        schedule = self.head_weight_schedule
        ks = range(1, self.num_heads + 1)
        if isinstance(schedule, (list, tuple)):
            if len(schedule) != self.num_heads or not all(
                isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in schedule
            ):
                raise ValueError(
                    f"`head_weight_schedule` as a list must hold {self.num_heads} positive floats (one per head), "
                    f"got {schedule!r}."
                )
            raw = [float(w) for w in schedule]
        elif schedule == "uniform":
            raw = [1.0 for _ in ks]
        elif schedule == "harmonic":
            raw = [1.0 / k for k in ks]
        elif schedule == "geometric":
            raw = [self.head_weight_ratio**k for k in ks]
        else:
            raise ValueError(
                f"`head_weight_schedule` must be one of {HEAD_WEIGHT_SCHEDULES} or a list of {self.num_heads} "
                f"floats, got {schedule!r}."
            )
        total = sum(raw)
        return [w / total for w in raw]

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-safe dict (the nested LoRA config becomes a plain dict)."""
        output = super().to_dict()
        if self.lora_config is not None:
            output["lora_config"] = _lora_config_to_json(self.lora_config)
        return output


def _as_lora_config(value: LoraConfig | dict) -> LoraConfig:
    if isinstance(value, LoraConfig):
        return value
    if isinstance(value, dict):
        kwargs = {k: v for k, v in value.items() if k not in ("peft_type", "peft_version")}
        return LoraConfig(**kwargs)
    raise ValueError(
        f"`lora_config` must be a peft.LoraConfig, a dict of its fields, or None, got {type(value).__name__}."
    )


def _lora_config_to_json(lora_config: LoraConfig) -> dict[str, Any]:
    # LoraConfig.to_dict holds sets (target_modules) and enums; adapter_config.json needs plain JSON.
    output = {}
    for key, value in lora_config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value") and isinstance(value, str):
            value = value.value
        output[key] = value
    return output
