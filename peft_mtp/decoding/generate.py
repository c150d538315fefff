"""`MTPModel.generate`: speculate with the active heads when the request allows it, else defer to transformers.

Speculation covers greedy decoding and multinomial sampling (one or several sequences per prompt,
batched, left-padded), with transformers' own logits processors, stopping criteria and streamers.
Everything else (beam search, contrastive search, prompt lookup, assistant models, a cache passed
in, per-step scores or attentions in the output) goes to transformers' `generate` unchanged, with
the heads unused.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any

from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

from .loop import speculative_generate
from .options import SpeculationOptions

if TYPE_CHECKING:
    from ..model import MTPModel

logger = logging.getLogger(__name__)

# `generate` parameters that are not generation-config fields or model inputs.
_GENERATE_ARGUMENTS = (
    "generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
    "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate",
    "tokenizer", "assistant_tokenizer", "trust_remote_code",
)


def generate_with_heads(mtp_model: MTPModel, *args: Any, **kwargs: Any):
    """`generate` of a model carrying MTP heads: speculative by default, same tokens as plain decoding.

    Args:
        mtp_model: the `MTPModel` tuner (what `PeftModel.generate` calls into).
        *args, **kwargs: transformers `generate` arguments, plus the `mtp_*` options of
            `SpeculationOptions` (`mtp_speculate`, `mtp_depth`, `mtp_tree`, `mtp_trace`).

    Returns:
        What transformers' `generate` returns; with `return_dict_in_generate=True` and speculation, an
        `MTPGenerateOutput` whose `mtp_stats` holds a `SpeculationStats`.
    """
    options = SpeculationOptions.pop_from(kwargs)
    model = mtp_model.model
    args, kwargs = _as_keywords(model.generate, args, kwargs)
    generation_config, reason = _reason_not_to_speculate(mtp_model, options, kwargs)
    if reason is not None:
        if options.speculate and mtp_model.active_heads() is not None:
            logger.info("generate: not speculating with the MTP heads (%s); running transformers' generate.", reason)
        return model.generate(*args, **kwargs)

    if generation_config.stop_strings is not None:
        # transformers drops `tokenizer` for callable `custom_generate`s, so it could not build the stop-string
        # criterion itself: build it here, pass it in with the other criteria, and clear the stop strings from
        # what transformers sees (given as an argument, in a `generation_config`, or the model's default).
        tokenizer = kwargs.pop("tokenizer", None)
        if tokenizer is None:
            raise ValueError("`stop_strings` needs the model's tokenizer: pass `tokenizer=...` to `generate`.")
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        if not any(type(criterion) is StopStringCriteria for criterion in criteria):
            # As in transformers, a StopStringCriteria of the caller's own replaces the one the config asks for.
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=generation_config.stop_strings))
        kwargs["stopping_criteria"] = criteria
        kwargs.pop("stop_strings", None)
        if kwargs.get("generation_config") is not None:
            kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
            kwargs["generation_config"].stop_strings = None
        if kwargs.get("generation_config") is None or model.generation_config.stop_strings is not None:
            # An unset field would take the model's default back. Beside a `generation_config`, transformers logs
            # that passing both is deprecated: the price of a model whose default config holds stop strings.
            kwargs["stop_strings"] = None

    # transformers does not pass the streamer to callable `custom_generate`s (it only sends it the prompt):
    # bind it, with the heads and the options.
    decode = functools.partial(speculative_generate, mtp_model=mtp_model, options=options,
                               streamer=kwargs.get("streamer"))
    return model.generate(*args, custom_generate=decode, **kwargs)


def _as_keywords(generate, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Arguments of transformers' `generate` given by position (`inputs`, `generation_config`, ...), as keywords.

    The checks below read keywords only; a `GenerationConfig` passed second must not skip them. A `generate` that
    takes `*args` (a few speech models override it so) names no positions: its arguments stay as they came.

    Returns:
        The positional arguments left (none when all could be named) and the keywords.
    """
    signature = inspect.signature(generate)
    kinds = {parameter.kind for parameter in signature.parameters.values()}
    if not args or inspect.Parameter.VAR_POSITIONAL in kinds:
        return args, kwargs
    bound = signature.bind_partial(*args, **kwargs)  # TypeError for an argument given twice
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return (), arguments


def _reason_not_to_speculate(mtp_model: MTPModel, options: SpeculationOptions,
                             kwargs: dict[str, Any]) -> tuple[Any, str | None]:
    """The request's resolved `GenerationConfig` (None when not needed), and why it goes to transformers' own
    decoding (None to speculate)."""
    if not options.speculate:
        return None, "mtp_speculate=False"
    heads = mtp_model.active_heads()
    if heads is None:
        return None, "no active MTP adapter"
    options.max_depth(heads.num_heads)  # validates mtp_depth against the heads
    if kwargs.get("custom_generate") is not None:
        return None, "a custom_generate was given"
    if kwargs.get("assistant_model") is not None:
        return None, "an assistant model was given"
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        return None, "a cache was passed in"
    if kwargs.get("inputs_embeds") is not None:
        return None, "inputs_embeds (drafts are token ids)"
    if kwargs.get("synced_gpus"):
        return None, "synced_gpus"
    model = mtp_model.model
    if model.config.is_encoder_decoder:
        return None, "encoder-decoder model"
    config_kwargs = {k: v for k, v in kwargs.items() if k not in _GENERATE_ARGUMENTS}
    generation_config, _ = model._prepare_generation_config(kwargs.get("generation_config"), **config_kwargs)
    mode = generation_config.get_generation_mode(kwargs.get("assistant_model"))
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return generation_config, f"generation mode {mode.value}"
    if generation_config.return_dict_in_generate and any(
        getattr(generation_config, name, False)
        for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
    ):
        return generation_config, "per-step scores, logits, attentions or hidden states were requested"
    if generation_config.prefill_chunk_size is not None:
        return generation_config, "chunked prefill"
    # These processors keep state across calls (their own model cache, a watermark key stream), so they
    # must see exactly one call per generated token.
    if generation_config.guidance_scale not in (None, 1.0) or generation_config.watermarking_config is not None:
        return generation_config, "classifier-free guidance or watermarking"
    if generation_config.token_healing:
        # Healing rewrites the prompt with the tokenizer, which transformers does not hand a custom loop.
        return generation_config, "token healing"
    return generation_config, None
