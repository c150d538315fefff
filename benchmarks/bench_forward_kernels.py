# /// script
# requires-python = ">=3.10"
# dependencies = ["peft_mtp", "gguf>=0.19"]
# ///
"""Time of one model forward over n new tokens with a KV cache: stock `F.linear` vs `peft_mtp.fast_linear`.

This is the cost of a plain decoding step (n = 1) and of a verify pass (n = 2..8), the numbers that decide what
speculative decoding can gain on a CPU. The variants run in the same process, alternating round by round; each
figure is the median over the rounds. The kernel choice is measured before timing (its one-off cost is not a step).
The third variant adds what verify passes also do on CPU: SDPA reads grouped key/value heads in place
(`peft_mtp.decoding.attention.grouped_query_sdpa`) instead of copying them per query head.

    python benchmarks/bench_forward_kernels.py                  # SmolLM2-135M-Instruct, 200 cached tokens
    python benchmarks/bench_forward_kernels.py --context 600 --rounds 15
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Local HF model folder or .gguf (default: SmolLM2-135M).")
    parser.add_argument("--context", type=int, default=200, help="cached tokens before the timed forward")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from smollm2 import load_model_and_tokenizer, model_path  # noqa: E402  (examples/ is not a package)

    from peft_mtp.decoding.attention import grouped_query_sdpa
    from peft_mtp.fast_linear import fast_small_row_linear, measure_kernels

    torch.set_num_threads(args.threads)
    path = args.model if args.model and not args.model.endswith(".gguf") else str(model_path(args.model))
    model, _ = load_model_and_tokenizer(path, device="cpu", dtype=torch.float32)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 1000, (1, args.context), generator=generator)
    with torch.no_grad():
        cached = model(input_ids=prompt, use_cache=True).cache

    def forward(n: int) -> float:
        cache = copy.deepcopy(cached)
        ids = torch.randint(100, 1000, (1, n), generator=generator)
        positions = torch.arange(args.context, args.context + n)[None]
        start = time.perf_counter()
        model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
        return time.perf_counter() - start

    @contextlib.contextmanager
    def verify_pass_setup():
        with fast_small_row_linear(model), grouped_query_sdpa():
            yield

    variants = {"stock F.linear": contextlib.nullcontext, "fast_small_row_linear": lambda: fast_small_row_linear(model),
                "+ grouped_query_sdpa": verify_pass_setup}
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in args.new_tokens} for name in variants}
    with torch.no_grad():
        # The kernel choice of every row bucket, measured first (it can differ from process to process where two
        # kernels measure close), then one untimed pass per row count.
        print("kernel per row bucket:", measure_kernels(model))
        with fast_small_row_linear(model):
            for n in args.new_tokens:
                forward(n)
        for round_index in range(args.rounds):
            names = list(variants) if round_index % 2 == 0 else list(variants)[::-1]
            for name in names:
                with variants[name]():
                    for n in args.new_tokens:
                        times[name][n].append(forward(n))

    print(f"forward over n new tokens, {args.context} cached, {args.threads} threads, median of {args.rounds} (ms)")
    print(f"{'n':>3} " + " ".join(f"{name:>22}" for name in variants)
          + f" {'fast / stock':>13} {'x n=1 (fast)':>13} {'+ gqa / fast':>13}")
    one = statistics.median(times["fast_small_row_linear"][args.new_tokens[0]])
    for n in args.new_tokens:
        stock, fast, in_place = (statistics.median(times[name][n]) for name in variants)
        print(f"{n:>3} {1000 * stock:22.1f} {1000 * fast:22.1f} {1000 * in_place:22.1f} {fast / stock:13.2f} "
              f"{fast / one:13.2f} {in_place / fast:13.2f}")


if __name__ == "__main__":
    main()
