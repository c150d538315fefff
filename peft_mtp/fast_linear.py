"""Faster `nn.Linear` for the small row counts of decoding on CPUs.

Why this module exists: a plain decoding step feeds 1 token per row, a verify pass 2-16, and the heads
unembed a few rows at once. CPU BLAS libraries pick their matmul kernel by the shape, and small row
counts often fall on slow paths. On this project's AMD EPYC (2 threads, fp32, torch 2.13 / MKL),
`torch.mm(W, x.T).T` with the rows padded to an even count beats `F.linear` on SmolLM2-135M's weights at 1-2
rows, and oneDNN over weights kept in its blocked layout (`PackedWeights`) at 3-16: a whole forward over
1 / 2 / 4 / 6 / 8 new tokens takes 58 / 58 / 59 / 60 / 72 ms instead of 67 / 110 / 102 / 117 / 126 ms
(`benchmarks/bench_forward_kernels.py`). On the Intel
Sapphire Rapids where this module was first written, `F.linear` was as fast as one row up to 3 rows, then
doubled from 4 to 15, while the product padded to 16 rows cost about the 16-row time.

The fast kernel depends on the CPU, so it is *measured*, and measured the way a forward pass uses it:
the first time a row count meets a group of weights (the model's linear layers), every candidate kernel
runs over the whole group, a few interleaved times, and the fastest is kept for the rest of the process.
Timing one small weight over and over would keep it in the CPU cache and favour kernels that are slow
on weights read from memory. Each row count up to `EXACT_ROWS` gets its own choice, because that is where
the kernels' costs step: on an Intel Xeon here `F.linear` costs the 1-row time up to 3 rows and half as
much again from 4, so a choice measured at 4 rows and reused at 3 (as an earlier bucketed version did)
made a 3-token verify pass 25% slower than stock. Above `EXACT_ROWS`, row counts share the choice of their
power-of-two bucket (17-32, 33-64). A process measures at most 18 times (about a second each on
SmolLM2-135M); `measure_kernels` measures them all up front (benchmarks do, before timing).

Products over weights that are not `nn.Linear` modules (the rows of the unembedding that score the heads'
draft vocabulary) go through `linear`, which uses the choice of the innermost open block.

Every candidate computes the same product (`x @ W.T + b`); they differ only in float rounding order,
so results agree to float tolerance, not bit for bit. Plain decoding speeds up too: benchmarks run plain
and speculative decoding both inside `fast_small_row_linear`, so the gain counts for the baseline as well.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

# Row counts above this use F.linear unmeasured: kernels are efficient there.
MAX_FAST_ROWS = 64  # batched verify passes (8 rows x a 6-token tree = 48) still gain 2x from packed weights here
EXACT_ROWS = 16  # row counts measured one by one; above, per power-of-two bucket
_PAD_ROWS = 16
_SPLIT_ROWS = 3


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _transposed_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # (out, in) @ (in, rows) is a tall-skinny product some BLAS builds run faster than (rows, in) @ (in, out).
    out = torch.mm(weight, x.t()).t().contiguous()
    return out if bias is None else out + bias


def _even_transposed_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The same with an even row count (>= 2): MKL's tall-skinny kernel is slow for 1 and 3 columns on some CPUs.
    rows = x.shape[0]
    if rows % 2:
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return _transposed_mm(x, weight, bias)[:rows]


def _padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Zero rows up to the row count the BLAS blocks for, then drop them.
    rows = x.shape[0]
    padded = torch.cat([x, x.new_zeros(_PAD_ROWS - rows, x.shape[1])]) if rows < _PAD_ROWS else x
    return F.linear(padded, weight, bias)[:rows]


def _split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Products of up to 3 rows run at nearly the 1-row cost on some BLAS builds; 4+ rows can cost twice as much.
    return torch.cat([F.linear(part, weight, bias) for part in x.split(_SPLIT_ROWS)])


class PackedWeights:
    """oneDNN's blocked copy of each weight, made on first use and kept while the weight is unchanged.

    BLAS reorders ("packs") the weight matrix into its blocked layout inside every call; for a few rows that
    reorder costs as much as the product. oneDNN can keep the reordered copy (PyTorch's inductor does the same
    when it freezes a model for CPU), so a call only streams it. On this project's AMD EPYC a SmolLM2-135M
    forward's linear layers then cost about the same for 1 to 6 rows. Packing all of SmolLM2 takes 1-2 s, so
    copies outlive a `generate` call; they cost the weights' size again in memory, freed with the weights or
    by `clear`, and the kernel is not tried for a model whose copies would not fit (`packing_fits`).

    A stale copy would silently compute with old weights, so two checks guard it:

    * every call compares the weight's storage, shape, dtype and version counter (in-place updates through
      the parameter, e.g. an optimizer step or `load_state_dict`, bump the version; `.data = new` changes
      the storage);
    * every `fast_small_row_linear` block, on entry, also compares a sample of `FINGERPRINT_SAMPLES` entries
      spread over the weight (`refresh`). Edits through `.data` (`weight.data += delta`, as PEFT's LoRA merge
      does) bypass the version counter; a dense edit like a merge changes the sample. An edit through `.data`
      that touches none of the sampled entries is not seen: call `clear()` after one.
    """

    BATCH_HINT = 8  # rows oneDNN blocks the copy for; measured fastest across 1-16 rows here
    FINGERPRINT_SAMPLES = 4096

    def __init__(self):
        self._copies = WeakIdKeyDictionary()  # weight -> (stamp, fingerprint, copy); by identity, not ==

    @staticmethod
    def _stamp(weight: torch.Tensor) -> tuple:
        version = None if weight.is_inference() else weight._version  # inference tensors have no version
        return weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape), weight.dtype, version

    def _fingerprint(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.detach().reshape(-1)
        return flat[:: max(1, flat.numel() // self.FINGERPRINT_SAMPLES)].clone()

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of `weight` (2-D, CPU), made now if missing or stale.

        Args:
            weight: an `nn.Linear` weight, float32 or bfloat16.

        Returns:
            The copy, in oneDNN's layout (an opaque tensor for `torch.ops.mkldnn._linear_pointwise`).
        """
        stamp = self._stamp(weight)
        entry = self._copies.get(weight)
        if entry is None or entry[0] != stamp:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.BATCH_HINT)
            entry = self._copies[weight] = (stamp, self._fingerprint(weight), packed)
        return entry[2]

    def holds(self, weight: torch.Tensor) -> bool:
        """Whether a copy of `weight` is kept now (fresh or not)."""
        return weight in self._copies

    def refresh(self, weights: Sequence[torch.Tensor]) -> None:
        """Drop the copies of `weights` whose weight changed (stamp or sampled entries differ)."""
        for weight in weights:
            entry = self._copies.get(weight)
            if entry is not None and (entry[0] != self._stamp(weight)
                                      or not torch.equal(entry[1], self._fingerprint(weight))):
                del self._copies[weight]

    def clear(self, weights: Sequence[torch.Tensor] | None = None) -> None:
        """Free the copies of `weights` (all copies by default)."""
        if weights is None:
            self._copies.clear()
            return
        for weight in weights:
            self._copies.pop(weight, None)


PACKED_WEIGHTS = PackedWeights()


def available_memory_bytes() -> int | None:
    """Memory the process can still take, in bytes: the OS's estimate, capped by a cgroup limit if one is set.

    Returns:
        `MemAvailable` (free memory plus reclaimable page cache) or the room left under the cgroup (v2)
        memory limit, whichever is smaller; None where neither can be read.
    """
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as handle:
            limit = handle.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as handle:
                room = int(limit) - int(handle.read().strip())
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def packing_fits(weights: Sequence[torch.Tensor], share: float = 0.5) -> bool:
    """Whether packed copies of the `weights` not yet packed fit in `share` of the available memory.

    Args:
        weights: the weights a kernel would pack.
        share: the largest share of `available_memory_bytes()` the new copies may take.

    Returns:
        True if they fit, or if the available memory is unknown.
    """
    available = available_memory_bytes()
    needed = sum(w.numel() * w.element_size() for w in weights if not PACKED_WEIGHTS.holds(w))
    return available is None or needed <= share * available


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes the packed kernel takes here: float32, and bfloat16 where the CPU has oneDNN's bf16 path."""
    if not torch.backends.mkldnn.is_available():
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def _onednn_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # oneDNN's inner product over a weight copy kept in its blocked layout (see `PackedWeights`). It does not
    # cast as autocast would, and refuses float64, so anything else takes the stock path.
    if x.dtype != weight.dtype or x.dtype not in onednn_dtypes() or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, PACKED_WEIGHTS.get(weight), bias, "none", [], "")


CANDIDATES = {"linear": _linear, "transposed_mm": _transposed_mm, "even_transposed_mm": _even_transposed_mm,
              "padded": _padded, "split": _split}
if onednn_dtypes():
    CANDIDATES["onednn_packed"] = _onednn_packed


def row_bucket(rows: int) -> int:
    """The row count measured for `rows`: `rows` itself up to `EXACT_ROWS`, else the next power of two (32, 64).

    Small counts are where decoding lives (a plain step, a verify pass, the heads) and where kernel costs step
    from one count to the next; batched passes meet many larger counts, which share the choice of their bucket
    so that a process measures at most 18 times.
    """
    return rows if rows <= EXACT_ROWS else 1 << (rows - 1).bit_length()


class KernelChoice:
    """Which candidate kernel is fastest per (group of weights, row-count bucket, threads), measured once.

    Args:
        repeats: timed passes per candidate (interleaved); the minimum is kept, being the least disturbed by
            other processes.
        margin: a candidate must beat `F.linear` by this fraction to replace it.
    """

    def __init__(self, repeats: int = 3, margin: float = 0.1):
        self.repeats = repeats
        self.margin = margin
        self.table: dict[tuple, str] = {}

    def kernel(self, x: torch.Tensor, group: LinearGroup):
        """The kernel to use for `x` (2-D) against any weight of `group` (the modules switched together)."""
        rows = x.shape[0]
        if rows > MAX_FAST_ROWS or x.device.type != "cpu" or torch.is_grad_enabled():
            return _linear
        bucket = row_bucket(rows)
        key = (group.key, x.dtype, bucket, torch.get_num_threads())
        name = self.table.get(key)
        if name is None:
            name = self.table[key] = self._measure(group, bucket, x.dtype)
        return CANDIDATES[name]

    @torch.no_grad()
    def _measure(self, group: LinearGroup, rows: int, dtype: torch.dtype) -> str:
        inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in group.modules}

        def run(fn) -> float:
            start = time.perf_counter()
            for module in group.modules:  # every weight once, as a forward pass reads them
                fn(inputs[module.in_features], module.weight, module.bias)
            return time.perf_counter() - start

        weights = [m.weight for m in group.modules]
        packable = all(w.dtype == dtype for w in weights) and dtype in onednn_dtypes() and packing_fits(weights)
        candidates = {name: fn for name, fn in CANDIDATES.items() if name != "onednn_packed" or packable}
        for name, fn in list(candidates.items()):  # warm up every kernel once; one this CPU refuses drops out
            try:
                run(fn)
            except RuntimeError:
                del candidates[name]
                if name == "onednn_packed":
                    PACKED_WEIGHTS.clear(weights)
        best: dict[str, float] = {}
        for _ in range(self.repeats):
            for name, fn in candidates.items():
                best[name] = min(best.get(name, float("inf")), run(fn))
        fastest = min(best, key=best.get)
        fastest = fastest if best[fastest] < (1 - self.margin) * best["linear"] else "linear"
        uses_packed = fastest == "onednn_packed" or any(
            name == "onednn_packed" for key, name in self.table.items() if key[0] == group.key
        )
        if not uses_packed:  # the warm-up packed every weight; keep that memory only for a kernel that reads it
            PACKED_WEIGHTS.clear(weights)
        return fastest


class LinearGroup:
    """The linear layers switched together (a model's), and what their timing depends on: their shapes.

    Args:
        modules: the `nn.Linear` modules.
    """

    def __init__(self, modules: Sequence[nn.Linear]):
        self.modules = list(modules)
        self.key = hash(tuple(sorted((tuple(m.weight.shape), str(m.weight.dtype)) for m in self.modules)))


DEFAULT_CHOICE = KernelChoice()

# Set on the `forward` a `fast_small_row_linear` block installs, so that `measure_kernels` knows the layer is one of ours.
_SWITCHED_MARK = "_peft_mtp_fast_linear"

# The (group, choice) of each open `fast_small_row_linear` block, innermost last: `linear` reads the innermost.
_OPEN_BLOCKS: list[tuple[LinearGroup, KernelChoice]] = []


def fast_forward(module: nn.Linear, x: torch.Tensor, group: LinearGroup,
                 choice: KernelChoice = DEFAULT_CHOICE) -> torch.Tensor:
    """`module(x)` through the kernel `choice` found fastest for x's row count over `group`."""
    return _through_kernel(x, module.weight, module.bias, group, choice)


def _through_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: LinearGroup,
                    choice: KernelChoice) -> torch.Tensor:
    # `choice.kernel` itself falls back to F.linear with autograd, off the CPU and for many rows.
    flat = x.reshape(-1, x.shape[-1])
    out = choice.kernel(flat, group)(flat, weight, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a weight that is not an `nn.Linear` (e.g. rows gathered from one).

    Inside a `fast_small_row_linear` block it runs through the kernel measured for x's row count on that block's
    layers (a property of the CPU and the row count more than of the exact shape); elsewhere it is `F.linear`.
    The heads' draft-vocabulary unembedding uses it: at one row `F.linear` took 0.6 ms over its 2,048 x 576 rows
    on this project's AMD EPYC, several times what reading them from memory takes.

    Args:
        x: `(..., in)` inputs.
        weight: `(out, in)`.
        bias: `(out,)` or None.

    Returns:
        `(..., out)`.
    """
    if not _OPEN_BLOCKS or x.device.type != "cpu" or torch.is_grad_enabled():
        return F.linear(x, weight, bias)  # training reads no kernel table
    return _through_kernel(x, weight, bias, *_OPEN_BLOCKS[-1])


def _switched_linears(model: nn.Module, include_switched: bool = False) -> LinearGroup:
    """The `nn.Linear` layers of `model` that `fast_small_row_linear` switches.

    Args:
        model: any module.
        include_switched: also the layers an open `fast_small_row_linear` block has switched already (what that
            block measures for); by default only those no block has switched yet.

    Returns:
        The layers, in module order.
    """
    def switchable(module: nn.Module) -> bool:
        forward = module.__dict__.get("forward")
        return forward is None or (include_switched and getattr(forward, _SWITCHED_MARK, False))

    return LinearGroup(m for m in model.modules() if type(m) is nn.Linear and switchable(m))


@torch.no_grad()
def measure_kernels(model: nn.Module, dtype: torch.dtype | None = None, choice: KernelChoice = DEFAULT_CHOICE
                    ) -> dict[int, str]:
    """Measure the kernel of every row bucket (1, 2, ..., 16, 32, 64) for `model`'s linear layers now.

    Decoding measures a bucket the first time it meets it (about a second each on SmolLM2-135M). A speculative decoder
    that changes depth meets new buckets mid-generation (heads catching up on the positions a shallower step left
    them), and a timed generation then pays those measurements. Benchmarks call this first so that they time the
    steady state a long-running process reaches; the choice is per process, so later `generate` calls reuse it.
    It may be called inside an open `fast_small_row_linear(model)` block: it measures for that block's layers.

    Args:
        model: the module whose layers `fast_small_row_linear(model)` would switch (e.g. a PeftModel).
        dtype: input dtype to measure for (default: the dtype of the first linear layer's weight).
        choice: the kernel table to fill (the process-wide one by default).

    Returns:
        The kernel name chosen for each bucket.
    """
    # Inside an open block the layers are switched already; the block measures for the same layers.
    group = _switched_linears(model, include_switched=True)
    if not group.modules:
        return {}
    first = group.modules[0]
    dtype = dtype or first.weight.dtype
    chosen = {}
    for rows in sorted({row_bucket(rows) for rows in range(1, MAX_FAST_ROWS + 1)}):
        kernel = choice.kernel(torch.empty(rows, first.in_features, dtype=dtype, device=first.weight.device), group)
        chosen[rows] = next(name for name, fn in CANDIDATES.items() if fn is kernel)
    return chosen


@contextlib.contextmanager
def fast_small_row_linear(model: nn.Module, choice: KernelChoice = DEFAULT_CHOICE) -> Iterator[None]:
    """Run every `nn.Linear` inside `model` through the measured fastest kernel while the block runs.

    Only without autograd (decoding): under `torch.is_grad_enabled()` the layers keep `F.linear`. Nested uses are
    harmless (modules already switched stay switched until the outer block ends). On entry, packed weight copies
    whose weights changed since they were made are dropped (`PackedWeights.refresh`).

    Args:
        model: any module (the base model, a PeftModel...).
        choice: the measured kernel table (the process-wide one by default).

    Example:
        ```py
        >>> with fast_small_row_linear(model):
        ...     out = model.generate(**inputs)
        ```
    """
    group = _switched_linears(model)
    PACKED_WEIGHTS.refresh([m.weight for m in group.modules])  # weights edited since the last block repack
    # A nested block switches (and later restores) only what no enclosing block switched already.
    switched = [module for module in group.modules if "forward" not in vars(module)]
    for module in switched:
        forward = functools.partial(fast_forward, module, group=group, choice=choice)
        setattr(forward, _SWITCHED_MARK, True)
        module.forward = forward
    # A nested block over the same model switched nothing new: `linear` keeps the enclosing block's measurements.
    _OPEN_BLOCKS.append((group, choice) if group.modules or not _OPEN_BLOCKS else _OPEN_BLOCKS[-1])
    try:
        yield
    finally:
        _OPEN_BLOCKS.pop()
        for module in switched:
            del module.forward
