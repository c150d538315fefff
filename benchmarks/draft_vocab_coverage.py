# /// script
# requires-python = ">=3.10"
# dependencies = ["peft_mtp[examples]"]
# ///
"""How much of the model's own answers a fitted draft vocabulary covers (the figures in docs/head_types.md).

Reads the main job's distilled answers (run `python3 examples/main_job.py` first; its cache holds them), fits
`DraftVocabulary` on the first 80% of the answers and reports the share of tokens of the other 20% it holds, for
several sizes. Nothing runs the model.

    python3 benchmarks/draft_vocab_coverage.py
"""

from __future__ import annotations

import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from smollm2 import cache_root, model_path  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from peft_mtp.draft_vocab import DraftVocabulary, count_tokens  # noqa: E402


def main() -> None:
    # The newest distillation folder (older ones hold other settings' answers, or the same chunks again).
    folders = sorted(glob.glob(str(cache_root() / "main_job" / "distill-*")), key=os.path.getmtime)
    files = sorted(glob.glob(os.path.join(folders[-1], "chunk-*.jsonl"))) if folders else []
    if not files:
        raise SystemExit("No distilled answers found: run `python3 examples/main_job.py` first.")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path()))
    rows = [json.loads(line) for path in files for line in open(path, encoding="utf-8")]
    answers = [tokenizer(row["completion"][0]["content"], add_special_tokens=False)["input_ids"] for row in rows]
    split = int(0.8 * len(answers))
    fit_on, held_out = answers[:split], answers[split:]
    vocab_size = len(tokenizer)
    counts = count_tokens(fit_on, vocab_size)
    held = torch.cat([torch.tensor(ids) for ids in held_out])
    print(f"{len(answers)} answers, {sum(map(len, answers)):,} tokens, "
          f"{int((count_tokens(answers, vocab_size) > 0).sum()):,} distinct; fit on {split}, measured on the rest")
    print(f"held-out tokens seen in the fitting answers: {(counts[held] > 0).float().mean():.1%}")
    for size in (2048, 4096, 8192, 16384):
        vocabulary = DraftVocabulary(size, vocab_size)
        vocabulary.fit(counts)
        print(f"draft_vocab_size={size:>6}: covers {(vocabulary.to_slots(held) >= 0).float().mean():.1%} of held-out tokens")


if __name__ == "__main__":
    main()
