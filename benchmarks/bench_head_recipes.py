# /// script
# requires-python = ">=3.10"
# dependencies = ["peft_mtp[examples]"]
# ///
"""Head-training recipes for SmolLM2-135M compared side by side: same data, same time, same held-out prompts.

The main job's warm-up stage is compute-bound on a CPU, so a recipe is judged by what it reaches in a fixed
number of seconds. This script caches the frozen trunk's outputs once (the main job's distilled answers plus
standard-library source windows, and the greedy answers to the held-out prompts), then trains each recipe from
scratch on that cache for `--seconds` and prints the top-1 agreement of each head with the model's greedy output
on the held-out code and chat prompts (teacher-forced, the main job's "agreement" column).

    python3 benchmarks/bench_head_recipes.py                       # the default comparison (~25 min)
    python3 benchmarks/bench_head_recipes.py --seconds 120 --recipes k2/v2048/lr1e-3/bf16 k2/v2048/lr1e-3

A recipe is a `/`-separated list: `k<K>` heads, `v<N>` draft vocabulary (`v0` = the whole vocabulary), `lr<rate>`,
`feat<weight>` (EAGLE feature regression), `bf16` (bf16 autocast of the forward and loss), `soft` (KL to the
model's distribution over the draft vocabulary instead of its argmax), `b<rows>` (train on batches of that many
rows, split from the cached batches of 8), `data<fraction>` (a random share of the distilled answers' batches:
how held-out agreement grows with data), `nosource` (the distilled answers only,
without the source windows), `fl<i>+<j>...` (`MTPConfig.feature_layers`: the heads also read the outputs of trunk
layers i, j, ..., fused into the trunk output; e.g. `fl2+15`), `copy<n>` (`MTPConfig.copy_ngram`: heads that copy the
token after the previous occurrence of the last n tokens, weighed by a learned gate; the table then gives the heads'
agreement alone and, after "copy:", with their candidates mixed in). Unset parts take the first recipe's defaults:
K=2, v2048, lr 1e-3, feat 0, float32, batches of 8 rows, all the data. All heads are `sequential` (`--head_type` to change).
The training data is cached with the trunk under bf16 autocast where the main job would use it (`--cache_dtype`);
the held-out prompts always in float32, as they are evaluated.

It distils the answers itself when the main job has not (same settings, same cache), which takes ~5 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import main_job  # noqa: E402
from offline_data import prompt_splits  # noqa: E402
from peft import get_peft_model  # noqa: E402
from smollm2 import load_model_and_tokenizer, model_path  # noqa: E402

from peft_mtp import MTPConfig, fit_draft_vocabulary  # noqa: E402
from peft_mtp.alignment import IGNORE_INDEX, head_targets  # noqa: E402
from peft_mtp.heads import HeadContext  # noqa: E402
from peft_mtp.warmup import cache_trunk_outputs, warmup_heads  # noqa: E402

DEFAULT_RECIPES = ["k3/v8192/lr3e-4/feat1", "k2/v2048/lr1e-3", "k3/v2048/lr1e-3/bf16", "k2/v2048/lr1e-3/bf16",
                   "k2/v2048/lr1e-3/bf16/nosource"]


@dataclass
class Recipe:
    """One way to train the heads (see the module docstring for the spelling)."""

    spec: str
    num_heads: int = 2
    draft_vocab_size: int = 2048
    learning_rate: float = 1e-3
    feature_loss_weight: float = 0.0
    bf16: bool = False
    soft: bool = False
    batch_rows: int = 8
    data_fraction: float = 1.0
    source: bool = True
    feature_layers: tuple[int, ...] = ()
    copy_ngram: int = 0

    @classmethod
    def parse(cls, spec: str) -> Recipe:
        recipe = cls(spec)
        for part in spec.split("/"):
            if part == "bf16":
                recipe.bf16 = True
            elif part == "soft":
                recipe.soft = True
            elif part == "nosource":
                recipe.source = False
            elif part.startswith("lr") and _is_number(part[2:]):
                recipe.learning_rate = float(part[2:])
            elif part.startswith("feat") and _is_number(part[4:]):
                recipe.feature_loss_weight = float(part[4:])
            elif part.startswith("fl") and all(i.isdigit() for i in part[2:].split("+")):
                recipe.feature_layers = tuple(sorted(int(i) for i in part[2:].split("+")))
            elif part.startswith("copy") and part[4:].isdigit():
                recipe.copy_ngram = int(part[4:])
            elif part.startswith("data") and _is_number(part[4:]):
                recipe.data_fraction = float(part[4:])
            elif part[:1] == "b" and part[1:].isdigit():
                recipe.batch_rows = int(part[1:])
            elif part[:1] == "k" and part[1:].isdigit():
                recipe.num_heads = int(part[1:])
            elif part[:1] == "v" and part[1:].isdigit():
                recipe.draft_vocab_size = int(part[1:])
            else:
                raise SystemExit(f"Unknown recipe part {part!r} in {spec!r}: expected k<K>, v<N>, lr<rate>, "
                                 "feat<weight>, bf16, soft, b<rows>, data<fraction>, fl<i>+<j>, copy<n> or nosource.")
        if recipe.num_heads < 1 or recipe.batch_rows < 1 or not 0.0 < recipe.data_fraction <= 1.0:
            raise SystemExit(f"Recipe {spec!r}: k<K> and b<rows> must be >= 1 and data<fraction> in (0, 1].")
        return recipe


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def tokenized_rows(job_args, peft_model, tokenizer, data):
    """`(input_ids, labels)` of the distilled answers, tokenized exactly as the main job's SFTTrainer does."""
    trainer = main_job.make_sft_trainer(job_args, peft_model, tokenizer, data, Path("/tmp/bench_head_recipes_sft"),
                                        main_job.Clock(job_args.time_budget_min))
    return list(zip(trainer.train_dataset["input_ids"], trainer.train_dataset["labels"]))


def held_out_rows(model, tokenizer, prompts, max_new_tokens: int):
    """Prompt + greedy answer of each held-out prompt, labels -100 on the prompt."""
    rows = []
    answers = main_job.greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size=24)
    for messages, answer in zip(prompts["messages"], answers):
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    return rows


def with_layers(batch, cached_layers: list[int], wanted: tuple[int, ...]):
    """`batch` with its cached layer outputs cut down to the layers `wanted` (the batch itself when it holds just those)."""
    index = [cached_layers.index(layer) for layer in wanted]
    if index == list(range(len(cached_layers))):
        return batch
    outputs = batch.layer_outputs[:, :, index] if index else None
    return dataclasses.replace(batch, layer_outputs=outputs)


@torch.no_grad()
def agreement(peft_model, cached) -> tuple[list[float], list[float] | None]:
    """Teacher-forced top-1 agreement of each head with the labels (the greedy answers) of cached batches.

    Returns:
        The heads' own agreement, and for heads that copy (`copy_ngram`) the agreement of their drafts with the
        copy candidates mixed in (else None).
    """
    tuner = peft_model.base_model
    trunk, heads = tuner.get_trunk(), tuner.active_heads()
    was_training = heads.training
    heads.eval()
    hits = counts = 0
    copy_hits = torch.zeros(heads.num_heads)
    for batch in cached:
        context = HeadContext(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              layer_kwargs=batch.layer_kwargs, embed=trunk.embed)
        head_hidden = heads(batch.head_input(heads), context)
        result = tuner.compute_mtp_loss(head_hidden, batch.labels, trunk_hidden=batch.hidden, target_source="labels",
                                        input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        hits, counts = hits + result.head_correct.float(), counts + result.head_counts.float()
        if heads.copy_gates is not None:
            drafts = heads.copy_topk(head_hidden, trunk, heads.copy_candidates(batch.input_ids, batch.attention_mask))
            for k in range(1, heads.num_heads + 1):
                targets = head_targets(batch.labels, k)
                copy_hits[k - 1] += (drafts[..., k - 1, 0] == targets)[targets != IGNORE_INDEX].sum()
    heads.train(was_training)
    with_copy = None if heads.copy_gates is None else (copy_hits / counts.clamp(min=1)).tolist()
    return (hits / counts.clamp(min=1)).tolist(), with_copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--seconds", type=float, default=180.0, help="Training time of each recipe.")
    parser.add_argument("--head_type", default="sequential")
    parser.add_argument("--num_text_tokens", type=int, default=65_536)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache_dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="Trunk dtype when caching the training data (auto: the main job's choice); held-out "
                             "prompts are always cached in float32, as they are evaluated.")
    args = parser.parse_args()
    recipes = [Recipe.parse(spec) for spec in args.recipes]
    if args.threads:
        torch.set_num_threads(args.threads)

    job_args = main_job.JobArguments(mixed_precision="no").resolve()
    model, tokenizer = load_model_and_tokenizer(str(model_path()), device="cpu")
    model_key = main_job.settings_key(os.path.abspath(str(model_path())), str(model.dtype))
    splits = prompt_splits(num_eval_code=job_args.num_eval_code, num_eval_chat=job_args.num_eval_chat)
    train_prompts = splits["train"].select(range(job_args.num_train_prompts))
    # The main job's distilled answers (bf16 generation, as its default on a CPU with native bf16).
    job_args.mixed_precision = "bf16" if main_job.bf16_matmul_is_faster() else "no"
    cache_bf16 = args.cache_dtype == "bf16" or (args.cache_dtype == "auto" and job_args.mixed_precision == "bf16")
    cache_dtype = torch.bfloat16 if cache_bf16 else None
    data, _ = main_job.distill(job_args, model, tokenizer, train_prompts, model_key, main_job.Clock(10_000))

    # One cache for every recipe: the trunk is frozen, and argmax targets do not depend on the heads. It holds the
    # outputs of every layer some recipe fuses; each recipe takes its own (`with_layers`).
    cached_layers = sorted({index for recipe in recipes for index in recipe.feature_layers})
    cache_model = get_peft_model(model, MTPConfig(num_heads=1, head_type=args.head_type, head_target_source="argmax",
                                                  feature_layers=cached_layers or None))
    rows = tokenized_rows(job_args, cache_model, tokenizer, data)
    windows = main_job.text_windows(tokenizer, args.num_text_tokens, 512, seed=0)
    pad = tokenizer.pad_token_id
    start = time.perf_counter()
    answers = cache_trunk_outputs(cache_model, main_job.warmup_batches(rows, 8, pad), autocast_dtype=cache_dtype)
    source = cache_trunk_outputs(cache_model, main_job.warmup_batches([(w, w) for w in windows], 8, pad),
                                 autocast_dtype=cache_dtype)
    cache_seconds = time.perf_counter() - start
    held_out = {kind: cache_trunk_outputs(cache_model, main_job.warmup_batches(
        held_out_rows(cache_model, tokenizer, splits[f"eval_{kind}"], job_args.eval_max_new_tokens), 8, pad))
        for kind in ("code", "chat")}
    print(f"Cached {sum(b.num_tokens for b in answers):,} answer tokens (with prompts) and "
          f"{sum(b.num_tokens for b in source):,} source tokens in {cache_seconds:.0f} s "
          f"({'bf16' if cache_bf16 else 'float32'} trunk), and the held-out answers.")
    del cache_model, model

    lines = ["| recipe | steps | train acc. (last epoch) | held-out code, heads 1/2 | held-out chat, heads 1/2 |",
             "|---|---|---|---|---|"]
    for recipe in recipes:
        torch.manual_seed(0)
        config = MTPConfig(num_heads=recipe.num_heads, head_type=args.head_type, head_weight_schedule="uniform",
                           draft_vocab_size=recipe.draft_vocab_size or None,
                           head_target_source="soft" if recipe.soft else "argmax",
                           head_feature_loss_weight=recipe.feature_loss_weight,
                           feature_layers=list(recipe.feature_layers) or None, copy_ngram=recipe.copy_ngram)
        base, _ = load_model_and_tokenizer(str(model_path()), device="cpu")  # a fresh model for each recipe
        peft_model = get_peft_model(base, config)
        main_job.start_decoder_layers_as_identity(peft_model)
        used = answers
        if recipe.data_fraction < 1.0:
            used = random.Random(0).sample(answers, max(1, round(recipe.data_fraction * len(answers))))
        batches = [part for batch in used + (source if recipe.source else []) for part in batch.split(recipe.batch_rows)]
        batches = [with_layers(batch, cached_layers, recipe.feature_layers) for batch in batches]
        if recipe.draft_vocab_size:
            fit_draft_vocabulary(peft_model, [row.tolist() for batch in batches for row in batch.labels])
        result = warmup_heads(peft_model, batches, epochs=1000, learning_rate=recipe.learning_rate,
                              time_limit_s=args.seconds, progress=False,
                              autocast_dtype=torch.bfloat16 if recipe.bf16 else None)
        code, chat = (agreement(peft_model, [with_layers(batch, cached_layers, recipe.feature_layers)
                                             for batch in held_out[kind]])
                      for kind in ("code", "chat"))

        def show(values):
            own, with_copy = values if isinstance(values, tuple) else (values, None)
            text = " / ".join(f"{v:.3f}" for v in own[:2])
            return text if with_copy is None else f"{text} (copy: {' / '.join(f'{v:.3f}' for v in with_copy[:2])})"

        lines.append(f"| {recipe.spec} | {result.steps} | {show(result.head_accuracies)} | {show(code)} | "
                     f"{show(chat)} |")
        print(lines[-1], flush=True)
    print(f"\nEach recipe trained for {args.seconds:.0f} s on the same cache ({torch.get_num_threads()} threads).\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
