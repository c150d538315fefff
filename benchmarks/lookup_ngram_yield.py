# /// script
# requires-python = ">=3.10"
# dependencies = ["peft_mtp[examples]"]
# ///
"""How many prompt-lookup drafts the model would accept, by the length of the n-gram that matched.

The decoding loop drafts copies of earlier text (`mtp_lookup`, docs/decoding.md): the tokens that followed the
first earlier occurrence of the row's last n tokens, longest n first. A short match is cheap to find and often
wrong, and every proposal widens the verify pass. This script takes the model's plain greedy answers to the main
job's held-out prompts and, at every position of every answer, asks what the lookup would propose from the
tokens before it (prompt included) and how many of those tokens the answer really continues with. No timing:
the figures are counts, the same on any machine.

    python3 benchmarks/lookup_ngram_yield.py                  # held-out code and chat prompts, 128 tokens
    python3 benchmarks/lookup_ngram_yield.py --max-ngram 4 --num-tokens 6
    python3 benchmarks/lookup_ngram_yield.py --corpus <main job heads>/final/ngram_corpus.safetensors

With `--corpus` (an `NgramCorpus` file, which the main job saves beside its heads) it also counts the corpus's
drafts at the positions where the prompt lookup found nothing (rows "corpus"), as `mtp_lookup_corpus` drafts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import main_job  # noqa: E402
from offline_data import prompt_splits  # noqa: E402
from peft import get_peft_model  # noqa: E402
from smollm2 import load_model_and_tokenizer, model_path  # noqa: E402

from peft_mtp import MTPConfig  # noqa: E402
from peft_mtp.decoding import NgramCorpus, prompt_lookup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-ngram", type=int, default=3)
    parser.add_argument("--num-tokens", type=int, default=10, help="Most tokens one proposal drafts.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--corpus", default=None, help="An NgramCorpus file (peft_mtp.decoding.NgramCorpus.save).")
    args = parser.parse_args()
    corpus = NgramCorpus.load(args.corpus) if args.corpus else None

    model, tokenizer = load_model_and_tokenizer(str(model_path()), device="cpu")
    # Heads are not used; `greedy_answers` calls `generate` with `mtp_speculate=False` on a model that has them.
    peft_model = get_peft_model(model, MTPConfig(num_heads=1)).eval()
    splits = prompt_splits()
    print(f"Longest n-gram first, the earliest match; up to {args.num_tokens} tokens per proposal.\n")
    print("| prompts | matched n-gram | proposals | tokens per proposal | accepted drafts per proposal | "
          "share accepting >= 1 |")
    print("|---|---|---|---|---|---|")
    for kind in ("code", "chat"):
        prompts = splits[f"eval_{kind}"]
        answers = main_job.greedy_answers(peft_model, tokenizer, prompts, args.max_new_tokens, batch_size=24)
        counts = defaultdict(lambda: [0, 0, 0, 0])  # n -> proposals, accepted, proposals with >= 1, drafted
        for messages, answer in zip(prompts["messages"], answers):
            prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
            tokens = torch.tensor(prompt + answer)
            for end in range(len(prompt) + 1, len(tokens)):  # the lookup sees tokens[:end], drafts tokens[end:]
                previous = 0
                for n in range(args.max_ngram, 0, -1):  # the longest n that matches is the one the loop uses
                    drafts, found = prompt_lookup(tokens[None, :end], torch.tensor([0]), torch.tensor([end]),
                                                  args.num_tokens, max_ngram=n, min_ngram=n)
                    if found.item():
                        previous = n
                        break
                if previous:
                    source, proposed = previous, drafts[0, : found.item()]
                elif corpus is not None:
                    source, proposed = "corpus", torch.tensor(corpus.draft(tokens[:end].tolist(), args.num_tokens))
                    if not len(proposed):
                        continue
                else:
                    continue
                truth = tokens[end : end + len(proposed)]
                agree = (proposed[: len(truth)] == truth).long().cumprod(dim=0).sum().item()
                entry = counts[source]
                entry[0], entry[1], entry[2], entry[3] = (entry[0] + 1, entry[1] + agree, entry[2] + (agree > 0),
                                                          entry[3] + len(proposed))
        positions = sum(len(answer) - 1 for answer in answers)
        for n in sorted(counts, key=str):
            proposals, accepted, any_accepted, drafted = counts[n]
            print(f"| {kind} | {n} | {proposals} of {positions} positions | {drafted / proposals:.1f} | "
                  f"{accepted / proposals:.2f} | {any_accepted / proposals:.2f} |")


if __name__ == "__main__":
    main()
