"""Self-distilled training data: the base model's own responses to your prompts.

Heads are judged by how often they guess what the model will generate. When the training data was
written by someone else (another model, people), the dataset's tokens t+1+k often differ from what the
model itself would write, and heads learn to predict text the model never produces. Two remedies,
usable together:

* `build_self_distilled_dataset` (this module): generate the responses with the base model, batched,
  and train on those (`prompt` / `completion` rows that TRL's SFTTrainer takes as they are, with the
  loss on the completion only).
* `MTPConfig(head_target_source="argmax" | "soft")` (see `peft_mtp.loss`): keep any data, but score
  heads against the model's own predictions of each token instead of the dataset's.

    from peft_mtp.distill import build_self_distilled_dataset
    data = build_self_distilled_dataset(model, tokenizer, prompts, max_new_tokens=256, batch_size=16)
    SFTTrainer(model=model, train_dataset=data, peft_config=MTPConfig(num_heads=4), ...).train()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm

Messages = list[dict[str, Any]]
Prompt = str | Messages


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def _prompt_of(row: Any, prompt_column: str | None) -> Prompt:
    """The prompt of one row: a string, a list of chat messages, or a dict row's `prompt_column`."""
    if isinstance(row, dict):
        if prompt_column is None:
            raise ValueError("Rows are dicts: pass `prompt_column` (e.g. 'prompt' or 'messages').")
        row = row[prompt_column]
    if isinstance(row, str):
        return row
    if _is_conversation(row):
        # A conversation that already ends with the assistant's answer: regenerate that answer.
        return row[:-1] if row and row[-1]["role"] == "assistant" else row
    raise ValueError(f"A prompt must be a string or a list of {{'role', 'content'}} messages, got {type(row).__name__}.")


def _render(prompt: Prompt, tokenizer: Any) -> tuple[str, bool]:
    """Prompt text for generation, and whether the tokenizer should add special tokens to it."""
    if isinstance(prompt, str):
        return prompt, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Chat prompts need a tokenizer with a chat template (`tokenizer.chat_template` is None). Set one, or "
            "pass plain-text prompts."
        )
    # The template writes the special tokens itself (BOS, turn markers): do not add them twice.
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), False


@contextlib.contextmanager
def _base_model(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every PEFT adapter (MTP heads, trunk LoRA) disabled: the base model generates."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


@contextlib.contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    # Decoder-only generation pads on the left, so every row's last prompt token sits at the same position.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    show_progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate one response per prompt with the base model, in batches with left padding.

    Prompts are sorted by length before batching (less padding), and answers come back in input order.

    Args:
        model: a causal LM or a PeftModel (its adapters are disabled while generating).
        tokenizer: its tokenizer (with a chat template for chat prompts; a pad token, else EOS is used).
        prompts: strings or lists of chat messages.
        max_new_tokens: longest response, in tokens.
        batch_size: prompts generated together.
        do_sample: sample instead of greedy decoding (greedy matches what the heads will be verified against).
        temperature: sampling temperature (with `do_sample`).
        top_p: nucleus sampling threshold (with `do_sample`).
        show_progress: show a tqdm progress bar.
        **generate_kwargs: passed to `model.generate`.

    Returns:
        The decoded responses, special tokens removed.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    rendered = [_render(prompt, tokenizer) for prompt in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = [len(tokenizer(text, add_special_tokens=special)["input_ids"]) for text, special in rendered]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    responses: list[str] = [""] * len(prompts)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        with _base_model(model), _left_padding(tokenizer), torch.inference_mode():
            for batch in tqdm(batches, desc="Generating responses", disable=not show_progress):
                texts = [rendered[i][0] for i in batch]
                # A batch mixes prompts only of one kind in practice; add special tokens if any plain prompt asks.
                add_special = any(rendered[i][1] for i in batch)
                encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
                output = model.generate(
                    **encoded, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling, **generate_kwargs
                )
                new_tokens = output[:, encoded["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
                for i, tokens in zip(batch, new_tokens):
                    responses[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return responses


def build_self_distilled_dataset(
    model: nn.Module,
    tokenizer: Any,
    prompts: datasets.Dataset | Sequence[Prompt],
    prompt_column: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    show_progress: bool = True,
    **generate_kwargs: Any,
) -> datasets.Dataset:
    """Build a prompt-completion dataset whose completions the base model generated itself.

    Chat prompts (lists of `{"role", "content"}` messages) go through the tokenizer's chat template with
    the generation prompt; a conversation that ends with an assistant turn has that turn regenerated.
    The result is in TRL's prompt-completion format, so `SFTTrainer` trains on the completions only:
    `{"prompt": messages, "completion": [{"role": "assistant", "content": text}]}` for chats,
    `{"prompt": text, "completion": text}` for plain prompts (the completion starts with a space).

    Args:
        model: a causal LM or a PeftModel (adapters disabled while generating).
        tokenizer: its tokenizer.
        prompts: a `datasets.Dataset` (its other columns are kept) or a sequence of prompts.
        prompt_column: the column holding prompts; by default `"messages"`, else `"prompt"`.
        max_new_tokens: longest completion, in tokens.
        batch_size: prompts generated together.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (with `do_sample`).
        top_p: nucleus sampling threshold (with `do_sample`).
        show_progress: show a tqdm progress bar.
        **generate_kwargs: passed to `model.generate`.

    Returns:
        A `datasets.Dataset` with `prompt` and `completion` columns (and the input's other columns).
    """
    extra_columns: dict[str, list[Any]] = {}
    if isinstance(prompts, datasets.Dataset):
        if prompt_column is None:
            prompt_column = "messages" if "messages" in prompts.column_names else "prompt"
        if prompt_column not in prompts.column_names:
            raise ValueError(f"`prompt_column`={prompt_column!r} is not a column of the dataset: {prompts.column_names}.")
        extra_columns = {name: prompts[name] for name in prompts.column_names
                         if name not in (prompt_column, "prompt", "completion")}
        rows = list(prompts[prompt_column])
    else:
        rows = list(prompts)
    parsed = [_prompt_of(row, prompt_column if isinstance(row, dict) else None) for row in rows]
    responses = generate_responses(
        model, tokenizer, parsed, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
        temperature=temperature, top_p=top_p, show_progress=show_progress, **generate_kwargs,
    )
    completions = [
        [{"role": "assistant", "content": text}] if _is_conversation(prompt) else " " + text
        for prompt, text in zip(parsed, responses)
    ]
    return datasets.Dataset.from_dict({"prompt": parsed, "completion": completions, **extra_columns})


__all__ = ["build_self_distilled_dataset", "generate_responses"]
