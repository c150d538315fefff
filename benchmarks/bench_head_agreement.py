"""How well MTP heads predict the model's own greedy answers on the decoding benchmark's prompts.

`bench_decoding.py` times generation; this script explains its figures. For every `--heads` adapter, on the
same prompts (`bench_decoding.WORKLOADS`: held-out HumanEval problems, everyday requests, the main job's held-out
library questions), it reports:

* **draft-vocabulary coverage**: the share of answer tokens the heads can draft at all (heads trained with
  `MTPConfig.draft_vocab_size` predict over the training answers' most frequent tokens; a token outside can only
  come from a copy candidate);
* **agreement**: teacher-forced top-1 agreement of head k with the greedy answer, with copy candidates mixed in
  and (for heads that copy) the heads alone, as the main job scores its held-out prompts
  (`main_job.agreement_on_token_ids`);
* **simulated tokens per step** of greedy chain drafting on those answers.

Greedy answers are computed once with the base model and shared by every adapter, so adapters compare on the same
tokens. Nothing is timed: figures are exact for the given answers and do not depend on the machine's load.

    python3 benchmarks/bench_head_agreement.py --heads <run A>/final <run B>/final
    python3 benchmarks/bench_head_agreement.py --heads <heads> --workloads chat --num-prompts 16
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent / "examples"))


def format_row(label: str, result: dict) -> str:
    """One markdown row: adapter, coverage, agreement per head (heads alone), simulated tokens per step."""
    agreement = " / ".join(f"{a:.3f}" for a in result["head_agreement"])
    if "head_agreement_alone" in result:
        agreement += " (" + " / ".join(f"{a:.3f}" for a in result["head_agreement_alone"]) + ")"
    coverage = result.get("draft_vocab_coverage")
    return (f"| {label} | {'-' if coverage is None else f'{coverage:.3f}'} | {agreement} | "
            f"{result['tokens_per_step_simulated']:.2f} |")


def main(args: argparse.Namespace) -> dict:
    from bench_decoding import WORKLOADS, adapter_labels, load_model
    from main_job import agreement_on_token_ids, greedy_answers_to_texts
    from peft import PeftModel

    import peft_mtp  # noqa: F401  (registers the MTP method with PEFT)
    from peft_mtp.fast_linear import fast_small_row_linear

    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(args.model)
    models = {label: PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
              for path, label in zip(args.heads, adapter_labels(args.heads))}
    report = {}
    for workload in args.workloads:
        texts = list(dict.fromkeys(WORKLOADS[workload](tokenizer, args.num_prompts)))  # `chat` cycles its 16
        any_model = next(iter(models.values()))  # plain greedy: the heads stay unused
        with fast_small_row_linear(any_model):
            answers = greedy_answers_to_texts(any_model, tokenizer, texts, args.max_new_tokens, args.batch_size)
        prompt_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
        num_tokens = sum(len(answer) for answer in answers)
        print(f"\n{workload}: {len(texts)} prompts, {num_tokens} answer tokens (greedy, up to {args.max_new_tokens})")
        print("| heads | draft-vocabulary coverage | agreement, heads 1..K (alone) | simulated tokens/step |")
        print("|---|---:|---|---:|")
        report[workload] = {}
        for label, model in models.items():
            result = agreement_on_token_ids(model, prompt_ids, answers)
            report[workload][label] = result
            print(format_row(label, result), flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", required=True, help="Adapter folders (PeftModel.from_pretrained).")
    parser.add_argument("--workloads", nargs="*", default=["code", "chat", "library"],
                        choices=["code", "chat", "library"])
    parser.add_argument("--num-prompts", type=int, default=24,
                        help="Prompts per workload (everyday chat has 16 distinct ones).")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts answered together (left padding).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="Model folder (default: SmolLM2-135M-Instruct).")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
