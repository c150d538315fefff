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

Without prompts of the kind the model will serve, `generate_user_requests` has the model write them: it
plays its own user (the Magpie method), and `build_self_distilled_dataset` then answers them.

    from peft_mtp.distill import build_self_distilled_dataset
    data = build_self_distilled_dataset(model, tokenizer, prompts, max_new_tokens=256, batch_size=16)
    SFTTrainer(model=model, train_dataset=data, peft_config=MTPConfig(num_heads=4), ...).train()
"""

from __future__ import annotations

import contextlib
import re
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


def request_prefix(tokenizer: Any) -> str:
    """The chat template's text up to where a user's message begins (system prompt and user-turn header included).

    Raises:
        ValueError: the tokenizer has no chat template, or its template does not write the user's text as given.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("Model-written requests need a tokenizer with a chat template (`tokenizer.chat_template` is "
                         "None).")
    sentinel = "\x00peft_mtp request\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    if sentinel not in text:
        raise ValueError("The chat template does not write a user message as given, so where a request begins "
                         "cannot be found; pass your own prompts instead.")
    return text[: text.index(sentinel)]


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def _near(words: frozenset[str], others: Sequence[frozenset[str]], threshold: float) -> bool:
    """Whether `words` shares at least `threshold` of its union (Jaccard) with one of `others`."""
    return any(len(words & other) >= threshold * len(words | other) for other in others if words | other)


def generate_user_requests(
    model: nn.Module,
    tokenizer: Any,
    num_requests: int,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    temperature: float = 1.0,
    top_p: float = 0.98,
    seed: int = 0,
    exclude: Sequence[str] = (),
    max_batches: int | None = None,
    show_progress: bool = True,
) -> list[str]:
    """Chat requests written by the model itself, playing its user.

    The prompt is the chat template up to the start of a user's message (`request_prefix`), so an instruct
    model writes what users ask it, in their register and on their topics: the Magpie method (Xu et al. 2024,
    "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing", arXiv:2406.08464).
    Answers to these requests, distilled from the same model, teach heads how it answers everyday questions
    when no such prompts are at hand offline. Kept: requests that end (an end-of-turn token within
    `max_new_tokens`), have at least 3 words, and are not near an earlier one or an `exclude` text (same words:
    Jaccard similarity of their word sets >= 0.6).

    Args:
        model: a causal LM or a PeftModel (adapters disabled while generating).
        tokenizer: its tokenizer, with a chat template.
        num_requests: how many requests to return.
        max_new_tokens: longest request, in tokens (longer ones are dropped, not cut).
        batch_size: requests sampled together.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        seed: seed of the sampling (batch i samples with `seed + i`; the global RNG state is left as it was).
        exclude: texts no request may be near, e.g. held-out evaluation prompts.
        max_batches: batches tried before giving up (default: 4x the batches `num_requests` needs).
        show_progress: show a tqdm progress bar.

    Returns:
        Up to `num_requests` requests (fewer if `max_batches` ran out), in the order they were sampled.
    """
    if num_requests < 0 or batch_size < 1:
        raise ValueError(f"`num_requests` must be >= 0 and `batch_size` >= 1, got {num_requests} and {batch_size}.")
    prefix = request_prefix(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    end_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    end_ids = torch.tensor(end_ids if isinstance(end_ids, list) else [end_ids])
    device = next(model.parameters()).device
    encoded = tokenizer([prefix] * batch_size, return_tensors="pt", add_special_tokens=False).to(device)
    max_batches = max_batches if max_batches is not None else 4 * -(-num_requests // batch_size)
    excluded = [_words(text) for text in exclude]
    kept: list[frozenset[str]] = []
    requests: list[str] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=num_requests, desc="Model-written requests", disable=not show_progress)
    try:
        with _base_model(model), torch.inference_mode():
            for index in range(max_batches):
                if len(requests) >= num_requests:
                    break
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed + index)
                    output = model.generate(**encoded, do_sample=True, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, pad_token_id=pad_id)
                for tokens in output[:, encoded["input_ids"].shape[1]:].cpu():
                    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    words = _words(text)
                    if not torch.isin(tokens, end_ids).any() or len(text.split()) < 3:
                        continue  # cut off by max_new_tokens, or no real request
                    if _near(words, excluded, 0.6) or _near(words, kept, 0.6) or len(requests) >= num_requests:
                        continue
                    kept.append(words)
                    requests.append(text)
                    bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return requests


__all__ = ["build_self_distilled_dataset", "generate_responses", "generate_user_requests", "request_prefix"]
