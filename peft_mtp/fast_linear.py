"""Faster `nn.Linear` for the small row counts of speculative decoding on CPUs.

Why this module exists: a verify pass feeds 2-16 tokens per row, and the heads unembed K rows at
once. CPU BLAS libraries pick their matmul kernel by the number of rows, and some row counts fall on
slow kernels. Measured with fp32 and the 49,152 x 576 unembedding of SmolLM2-135M (torch 2.13, MKL):
on the AMD EPYC of issue 4, `F.linear` at 2 rows took 24.7 ms where `torch.mm(W, x.T).T` took
8.4 ms; on the Intel Sapphire Rapids this module was written on, `F.linear` was as fast as one row
up to 3 rows, then doubled from 4 to 15 rows, while the same product padded to 16 rows (the size
MKL blocks for) cost about the 16-row time. The fast kernel depends on the CPU, so it is *measured*:
the first time a weight shape meets a row count, each candidate kernel runs a few interleaved times
and the fastest is kept for the rest of the process.

Every candidate computes the same product (`x @ W.T + b`); they differ only in float rounding order,
so results agree to float tolerance, not bit for bit. Plain decoding at one row per step always uses
`F.linear`. Benchmarks compare speculative and plain decoding both inside `fast_small_row_linear`,
so any gain it gives plain batched decoding counts for the baseline too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Row counts above this use F.linear unmeasured: kernels are efficient there.
MAX_FAST_ROWS = 16
_PAD_ROWS = 16


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _transposed_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # (out, in) @ (in, rows) is a tall-skinny product some BLAS builds run faster than (rows, in) @ (in, out).
    out = torch.mm(weight, x.t()).t().contiguous()
    return out if bias is None else out + bias


def _padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Zero rows up to the row count the BLAS blocks for, then drop them.
    rows = x.shape[0]
    padded = torch.cat([x, x.new_zeros(_PAD_ROWS - rows, x.shape[1])]) if rows < _PAD_ROWS else x
    return F.linear(padded, weight, bias)[:rows]


def _split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Products of up to 3 rows run at nearly the 1-row cost on some BLAS builds; 4+ rows can cost twice as much.
    return torch.cat([F.linear(part, weight, bias) for part in x.split(_SPLIT_ROWS)])


_SPLIT_ROWS = 3
CANDIDATES = {"linear": _linear, "transposed_mm": _transposed_mm, "padded": _padded, "split": _split}


class KernelChoice:
    """Which candidate kernel is fastest per (weight shape, dtype, row count, threads), measured once.

    Args:
        repeats: least timed calls per candidate (interleaved); the minimum is kept, being the least
            disturbed by other processes.
        margin: a candidate must beat `F.linear` by this fraction to replace it.
        budget_s: cheap products are timed more often, up to about this many seconds per shape and row count.
    """

    def __init__(self, repeats: int = 3, margin: float = 0.1, budget_s: float = 0.02):
        self.repeats = repeats
        self.budget_s = budget_s
        self.margin = margin
        self.table: dict[tuple, str] = {}

    def kernel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """The kernel to use for `x` (2-D) against `weight`."""
        rows = x.shape[0]
        if rows <= 1 or rows > MAX_FAST_ROWS or x.device.type != "cpu":
            return _linear
        key = (tuple(weight.shape), weight.dtype, rows, torch.get_num_threads())
        name = self.table.get(key)
        if name is None:
            name = self.table[key] = self._measure(x, weight, bias)
        return CANDIDATES[name]

    def _measure(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
        best: dict[str, float] = {}
        start = time.perf_counter()
        for fn in CANDIDATES.values():  # warm up every kernel once
            fn(x, weight, bias)
        per_round = time.perf_counter() - start
        # Small products are cheap to time and noisy: time them more often (within `budget_s`).
        repeats = max(self.repeats, min(25, int(self.budget_s / max(per_round, 1e-9))))
        for _ in range(repeats):
            for name, fn in CANDIDATES.items():
                start = time.perf_counter()
                fn(x, weight, bias)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        fastest = min(best, key=best.get)
        return fastest if best[fastest] < (1 - self.margin) * best["linear"] else "linear"


DEFAULT_CHOICE = KernelChoice()


def fast_forward(module: nn.Linear, x: torch.Tensor, choice: KernelChoice = DEFAULT_CHOICE) -> torch.Tensor:
    """`module(x)` through the kernel `choice` found fastest for x's row count."""
    flat = x.reshape(-1, x.shape[-1])
    out = choice.kernel(flat, module.weight, module.bias)(flat, module.weight, module.bias)
    return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def fast_small_row_linear(model: nn.Module, choice: KernelChoice = DEFAULT_CHOICE) -> Iterator[None]:
    """Run every `nn.Linear` inside `model` through the measured fastest kernel while the block runs.

    Nested uses are harmless (modules already switched stay switched until the outer block ends).

    Args:
        model: any module (the base model, a PeftModel...).
        choice: the measured kernel table (the process-wide one by default).

    Example:
        ```py
        >>> with fast_small_row_linear(model):
        ...     out = model.generate(**inputs)
        ```
    """
    switched = []
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in module.__dict__:
            module.forward = lambda x, module=module: fast_forward(module, x, choice)
            switched.append(module)
    try:
        yield
    finally:
        for module in switched:
            del module.forward
