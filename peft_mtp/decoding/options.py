"""The speculation options of `generate`, and the controller that picks the draft depth automatically."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .corpus import NgramCorpus
from .tree import (
    DraftTree,
    Path,
    chain_paths,
    check_branches_on_best_chain,
    default_chain_tree_paths,
    default_tree_paths,
)

# The `generate` keyword arguments this package reads (and removes before transformers sees them).
OPTION_KWARGS = ("mtp_speculate", "mtp_depth", "mtp_tree", "mtp_lookup", "mtp_lookup_ngram", "mtp_lookup_corpus",
                 "mtp_trace", "mtp_fast_linear")

# Prompt-lookup drafts per step by default, and the longest n-gram matched (transformers' docs use
# `prompt_lookup_num_tokens=10`). Matches of a single token are not used: on the main job's held-out
# answers a 1-token match led to 0.48 accepted drafts per proposal on code (0.67 on chat), a 2-gram to
# 2.33 (2.14) and a 3-gram to 5.67 (3.95) (benchmarks/lookup_ngram_yield.py), and each proposal widens
# the verify pass by up to 10 tokens.
DEFAULT_LOOKUP_TOKENS = 10
DEFAULT_LOOKUP_NGRAM = 3
MIN_LOOKUP_NGRAM = 2
# A lookup branch from a match of at least this many tokens is verified beside the heads' best chain only, without
# their runner-up candidates: such a branch is usually right (5.67 accepted drafts per proposal above, against
# 2.33 for a 2-gram), and on a CPU the runner-ups widen an already wide pass. Ad hoc A/B, 2026-12-04, 12 prompts,
# tree+lookup: 1.511x -> 1.583x on code, 1.284x -> 1.287x on everyday chat; dropping them beside every branch,
# 2-grams included, gave 1.605x on code but 1.248x on chat (docs/decoding.md).
STRONG_LOOKUP_NGRAM = 3


@dataclass
class SpeculationOptions:
    """How `generate` speculates with the MTP heads (given as `mtp_*` keyword arguments of `generate`).

    Args:
        speculate (`bool`, defaults to `True`): `mtp_speculate`. False runs transformers' own
            decoding, heads unused.
        depth (`int` or `"auto"`, defaults to `"auto"`): `mtp_depth`. Drafts per step (0..K, 0 = no
            drafting), or `"auto"`: start at the deepest and keep the depth with the best measured
            tokens per second, re-probing deeper now and then.
        tree (`None`, `True` or a list of paths, defaults to `None`): `mtp_tree`. None drafts a chain
            (each head's best token). True drafts a small default tree (`default_tree_paths`;
            `default_chain_tree_paths` for `sequential` heads, whose trees branch on the best chain
            only); a list of paths gives the tree's shape (see `peft_mtp.decoding.tree`). With
            `"auto"` depth, the tree is cut at the chosen depth.
        lookup (`int` or `None`, defaults to `None`): `mtp_lookup`. Prompt-lookup drafts per step,
            verified in the same pass as the heads' drafts as one more branch of the draft tree
            (`peft_mtp.decoding.lookup`): the step keeps whichever branch the model agrees with
            longer. None (automatic) drafts up to 10 in greedy decoding while one row is decoding,
            where the model's attention takes the tree mask this needs (eager or SDPA): a batch
            widens the verify pass for every row, which cost more than it gained on a CPU; a number
            drafts up to that many at every step, batches and sampling included; 0 turns it off.
        lookup_ngram (`int`, defaults to 3): `mtp_lookup_ngram`. Longest n-gram the lookup matches
            (it tries shorter ones down to 2 tokens; 1 matches single tokens too).
        lookup_corpus (`NgramCorpus` or `None`, defaults to `None`): `mtp_lookup_corpus`. A table of a
            corpus's n-grams (`peft_mtp.decoding.corpus`) that drafts the lookup branch for rows whose own
            text gave no match; used whenever lookup drafts are (see `lookup`).
        trace (`bool`, defaults to `False`): `mtp_trace`. Record, per verify pass, how many drafts
            each row accepted (`output.mtp_stats.trace`).
        fast_linear (`bool`, defaults to `True`): `mtp_fast_linear`. On CPU, run the model's and the
            heads' linear layers through the matmul kernel measured fastest for each row count
            (`peft_mtp.fast_linear`); results agree with stock kernels to float tolerance.
    """

    speculate: bool = True
    depth: int | str = "auto"
    tree: None | bool | list = None
    lookup: int | None = None
    lookup_ngram: int = DEFAULT_LOOKUP_NGRAM
    lookup_corpus: NgramCorpus | None = None
    trace: bool = False
    fast_linear: bool = True

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> SpeculationOptions:
        """Remove the `mtp_*` options from `generate` keyword arguments and validate them.

        Raises:
            ValueError: an option has a value it cannot take (the message names it and the fix).
        """
        options = cls(
            speculate=kwargs.pop("mtp_speculate", True),
            depth=kwargs.pop("mtp_depth", "auto"),
            tree=kwargs.pop("mtp_tree", None),
            lookup=kwargs.pop("mtp_lookup", None),
            lookup_ngram=kwargs.pop("mtp_lookup_ngram", DEFAULT_LOOKUP_NGRAM),
            lookup_corpus=kwargs.pop("mtp_lookup_corpus", None),
            trace=kwargs.pop("mtp_trace", False),
            fast_linear=kwargs.pop("mtp_fast_linear", True),
        )
        for name in ("speculate", "trace", "fast_linear"):
            if not isinstance(getattr(options, name), bool):
                raise ValueError(f"`mtp_{name}` must be True or False, got {getattr(options, name)!r}.")
        depth = options.depth
        if not (depth == "auto" or (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0)):
            raise ValueError(f"`mtp_depth` must be an integer >= 0 (drafts per step) or 'auto', got {depth!r}.")
        lookup = options.lookup
        if not (lookup is None or (isinstance(lookup, int) and not isinstance(lookup, bool) and lookup >= 0)):
            raise ValueError(f"`mtp_lookup` must be an integer >= 0 (prompt-lookup drafts per step; 0 = off) or None "
                             f"(the default), got {lookup!r}.")
        ngram = options.lookup_ngram
        if not (isinstance(ngram, int) and not isinstance(ngram, bool) and ngram >= 1):
            raise ValueError(f"`mtp_lookup_ngram` must be an integer >= 1 (the longest n-gram to match), "
                             f"got {ngram!r}.")
        if not (options.lookup_corpus is None or isinstance(options.lookup_corpus, NgramCorpus)):
            raise ValueError(f"`mtp_lookup_corpus` must be None or a peft_mtp.decoding.NgramCorpus (build one with "
                             f"NgramCorpus.from_sequences or NgramCorpus.load), got {type(options.lookup_corpus)}.")
        if not (options.tree is None or isinstance(options.tree, (bool, list, tuple))):
            raise ValueError(
                f"`mtp_tree` must be None (chain), True (default tree) or a list of paths such as "
                f"[(0,), (1,), (0, 0)], got {options.tree!r}."
            )
        return options

    def max_depth(self, num_heads: int) -> int:
        """The deepest drafts these options allow with `num_heads` heads.

        Raises:
            ValueError: `mtp_depth` is larger than the number of heads.
        """
        if isinstance(self.depth, int):
            if self.depth > num_heads:
                raise ValueError(
                    f"`mtp_depth`={self.depth} asks for more drafts than the adapter has heads ({num_heads}); use "
                    f"0..{num_heads} or 'auto'."
                )
            return self.depth
        return num_heads

    def lookup_tokens(self, tree_masks_supported: bool) -> int:
        """The most prompt-lookup drafts per step these options allow.

        Args:
            tree_masks_supported: whether the model's attention takes the 4-D mask of a tree verify pass.

        Returns:
            `mtp_lookup`, or for the automatic setting 10 where tree masks work and 0 elsewhere.

        Raises:
            ValueError: `mtp_lookup` was set above 0 for a model whose attention cannot verify it.
        """
        if self.lookup is None:
            return DEFAULT_LOOKUP_TOKENS if tree_masks_supported else 0
        if self.lookup and not tree_masks_supported:
            raise ValueError(
                "`mtp_lookup` drafts are verified as a branch of a draft tree, which needs a 4-D attention mask; load "
                "the model with attn_implementation='sdpa' or 'eager', or pass `mtp_lookup=0`."
            )
        return self.lookup

    def tree_paths(self, depth: int, sequential: bool = False) -> list[Path]:
        """The full draft shape (before any cut by the automatic depth) for `depth` heads.

        Args:
            depth: heads to draft with.
            sequential: the heads are `sequential` (a chain: only the best drafts may have children).

        Returns:
            The paths (see `peft_mtp.decoding.tree`); `chain_paths(depth)` without a tree.

        Raises:
            ValueError: `sequential` heads and a tree that branches off the chain of best drafts.
        """
        if self.tree is None or self.tree is False:
            return chain_paths(depth)
        if self.tree is True:
            if not depth:
                return []
            return default_chain_tree_paths(depth) if sequential else default_tree_paths(depth)
        paths = [tuple(p) if not isinstance(p, int) else (p,) for p in self.tree]
        if sequential:
            check_branches_on_best_chain(paths)
        return paths


class DraftShapes:
    """The draft tree to use at each depth, built once per `generate` call.

    Args:
        paths: the full shape (list of paths; empty for no drafting).
        max_depth: heads available.
    """

    def __init__(self, paths: list[Path], max_depth: int):
        self.trees: dict[int, DraftTree] = {}  # the heads' tree cut at each depth
        self.chains: dict[int, DraftTree] = {}  # its best chain (paths of rank 0 only)
        self.chain_nodes: dict[int, list[int]] = {}  # the chain's nodes in the tree, root first
        self._with_lookup: dict[tuple[int, int, bool, int], DraftTree] = {}
        full = DraftTree.from_paths(paths, max_depth)
        self.max_depth = full.depth
        for depth in range(self.max_depth + 1):
            cut = [p for p in paths if len(p) <= depth]
            self.trees[depth] = DraftTree.from_paths(cut, max_depth)
            self.chains[depth] = DraftTree.from_paths([p for p in cut if not any(p)], max_depth)
            self.chain_nodes[depth] = [self.trees[depth].paths.index(p) for p in self.chains[depth].paths]
        self.is_chain = full.is_chain

    def tree(self, depth: int, lookup: int = 0, chain_only: bool = False, lookup_start: int = 0) -> DraftTree:
        """The heads' tree cut at `depth` (depth 0: the root only), with a lookup branch of `lookup` nodes.

        Args:
            depth: the draft depth.
            lookup: lookup-branch nodes (0: none).
            chain_only: keep only the heads' best chain, without their runner-up candidates (the nodes
                `chain_nodes[depth]` of the heads' tree, root first); the loop asks for it beside a strong
                lookup branch (`STRONG_LOOKUP_NGRAM`).
            lookup_start: depth of the heads' best-chain node the branch hangs from (`DraftTree.with_lookup`).

        Returns:
            The `DraftTree` (built once per key, then reused).
        """
        key = (depth, lookup, chain_only, lookup_start)
        if key not in self._with_lookup:
            heads = self.chains[depth] if chain_only else self.trees[depth]
            self._with_lookup[key] = heads.with_lookup(lookup, start=lookup_start)
        return self._with_lookup[key]


class DepthController:
    """Picks the draft depth per step: fixed, or the one with the best measured tokens per second.

    The automatic mode keeps, per depth d, the chance r_d that draft d is accepted given that drafts
    1..d-1 were (decayed counts, so it follows the text as it changes, over a prior of r = 0.5 that does
    not decay: `acceptance`), and the measured time of a step at each depth used (an exponential
    average). It picks argmax_d E[tokens | d] / time(d), with E[tokens | d] = 1 + sum_{k<=d} prod_{j<=k} r_j.

    What it measures: the first two steps draft at the deepest depth (every head's acceptance), the
    third drafts nothing (depth 0, the baseline); every `probe_every` steps it tries a neighbour of the
    best depth, one deeper and one shallower in turn (twice as long after each probe that leaves the
    best depth where it was, up to `MAX_PROBE_INTERVAL`), and every `4 * probe_every` steps it re-measures
    depth 0 while depth 0 is within reach of the best (a rate at least `BASELINE_REACH` of it). Depths
    not measured yet are extrapolated from the drafting depths that were, assuming a step grows
    linearly with the tokens it verifies per row (a tree cut at depth d verifies `sizes[d]` of them).
    Depth 0 is measured, never extrapolated: it runs no head and verifies one token per row, so on a
    CPU batch of 8 its step took 100 ms where drafting steps took 220-235 ms, far below any line
    through the drafting depths (which put it at ~205 ms and kept a batch at depth 1-2, 0.82x plain).

    A step that drafts deeper than the step before pays for catching up: `sequential` depths that sat
    idle run over every position they skipped (the first step, over the prompt). Its drafting time is
    not what that depth costs step after step, so such a step counts the depth's average drafting time in
    steps that did not catch up instead (scaled from the nearest drafting depth measured where it has
    none: a probe one deeper than the best depth always catches up); the first step, before any such
    measurement, stands in only until the next step at its depth. Counting whole steps charged the first
    step's pass over the prompt, and every probe's catching up, to the deeper depth: on code the
    controller spent ~40% of its steps at depth 1, where a fixed depth 2 was faster (docs/decoding.md).

    Args:
        max_depth: deepest drafts allowed.
        fixed: a fixed depth, or None for the automatic mode.
        sizes: tokens verified per row at each depth 0..max_depth (default: depth + 1, a chain).
        probe_every: steps before the first probe of a neighbouring depth, and after the best depth
            changes (automatic mode).
        decay: weight kept by past counts at each step (automatic mode).
    """

    # Depth 0 is re-measured while its rate is at least this share of the best depth's: where drafting wins by
    # far (a single row on a CPU) a step without drafts would only cost tokens.
    BASELINE_REACH = 0.8
    # Longest wait between two probes: each probe that confirms the best depth doubles the wait, up to this (a
    # probe of a losing depth costs a step: at a CPU batch of 8, probing depth 1 every 8 steps cost ~6%).
    MAX_PROBE_INTERVAL = 64

    # Prior cost of one more verified token, as a share of a one-token step, until two depths are
    # measured (CPU measurement on SmolLM2-135M: ~10% per token up to 5 tokens; GPUs are cheaper).
    PRIOR_COST_PER_TOKEN = 0.1

    def __init__(self, max_depth: int, fixed: int | None, sizes: list[int] | None = None, probe_every: int = 8,
                 decay: float = 0.97):
        self.max_depth = max_depth
        self.fixed = fixed
        self.sizes = sizes or list(range(1, max_depth + 2))
        self.probe_every = probe_every
        self.decay = decay
        # Decayed counts; `acceptance` adds a prior of one accepted and one rejected draft (r = 0.5) when it reads
        # them, so nothing is ruled out unseen.
        self.hits = [0.0] * max_depth
        self.tries = [0.0] * max_depth
        self.times: dict[int, float] = {}  # whole step
        self.draft_times: dict[int, float] = {}  # its drafting part, in steps that did not catch up
        self.stand_ins: set[int] = set()  # depths whose time is a catching-up step's, replaced by the next one
        self.steps = 0
        self.probes = 0
        self.best = max_depth
        self.interval = probe_every  # steps from one probe to the next
        self.next_probe: int | None = None

    def choose(self) -> int:
        """The depth to draft at this step."""
        if self.fixed is not None:
            return min(self.fixed, self.max_depth)
        self.steps += 1
        if self.steps <= 2 or not self.times:
            return self.max_depth  # measure every head first
        if 0 not in self.times:
            return 0  # then the baseline: no drafts
        best = max(range(self.max_depth + 1), key=self._rate)
        if best != self.best or self.next_probe is None:
            self.interval, self.next_probe = self.probe_every, self.steps + self.probe_every
        self.best = best
        if (best > 0 and self.steps % (4 * self.probe_every) == 0
                and self._rate(0) >= self.BASELINE_REACH * self._rate(best)):
            return 0
        if self.steps >= self.next_probe:
            # A probe that leaves the best depth where it was doubles the wait for the next one.
            self.interval = min(2 * self.interval, self.MAX_PROBE_INTERVAL)
            self.next_probe = self.steps + self.interval
            self.probes += 1
            neighbours = [d for d in (self.best + 1, self.best - 1) if 0 <= d <= self.max_depth]
            if neighbours:
                return neighbours[self.probes % len(neighbours)]
        return self.best

    def record(self, depth: int, accepted: list[int], seconds: float, *, draft_seconds: float | None = None,
               caught_up: bool = False) -> None:
        """Feed back one step.

        Args:
            depth: its draft depth.
            accepted: drafts accepted per row.
            seconds: its wall time.
            draft_seconds: the part of it spent drafting (needed when `caught_up`).
            caught_up: whether drafting also ran heads over positions they had skipped (see the class
                docstring); its `draft_seconds` then stand for this step only.

        Raises:
            ValueError: `caught_up` without `draft_seconds`.
        """
        if caught_up and draft_seconds is None:
            raise ValueError("`DepthController.record(caught_up=True)` needs the step's `draft_seconds`, the part to "
                             "replace by the depth's usual drafting time.")
        if self.fixed is not None:
            return
        self.hits = [h * self.decay for h in self.hits]
        self.tries = [t * self.decay for t in self.tries]
        for count in accepted:
            for k in range(min(depth, count + 1)):  # draft k+1 was tried iff drafts 1..k were accepted
                self.tries[k] += 1.0
                if count > k:
                    self.hits[k] += 1.0
        if caught_up:
            usual = self._usual_draft_seconds(depth)
            if usual is None:
                # No step has drafted without catching up yet (the first step): this one stands in until the next.
                if depth not in self.times:
                    self.times[depth] = seconds
                    self.stand_ins.add(depth)
                return
            seconds += usual - draft_seconds
        elif draft_seconds is not None:
            self.draft_times[depth] = _average(self.draft_times.get(depth), draft_seconds)
        previous = None if depth in self.stand_ins else self.times.get(depth)
        self.stand_ins.discard(depth)
        self.times[depth] = _average(previous, seconds)

    def _usual_draft_seconds(self, depth: int) -> float | None:
        """Drafting time of a step at `depth` that does not catch up: its average, or, for a depth only ever
        reached by catching up (a probe one deeper than the best depth always is), the nearest measured
        drafting depth's scaled by depth (each `sequential` depth runs the same layers). None before any."""
        if depth in self.draft_times:
            return self.draft_times[depth]
        measured = [d for d in self.draft_times if d > 0]
        if not measured:
            return None
        nearest = min(measured, key=lambda d: (abs(d - depth), d))
        return self.draft_times[nearest] * depth / nearest

    def acceptance(self, k: int) -> float:
        """The estimated chance r_k that draft k is accepted once drafts 1..k-1 were.

        The prior, one accepted and one rejected draft (r = 0.5), never decays: counts of a depth that is no
        longer drafted fade back to it, so a depth judged on a few unlucky steps is tried again later
        instead of being ruled out for the rest of the call. Against the ~33 steps the decayed counts
        hold at most, it pulls a well-measured r = 0.8 to ~0.78.

        Args:
            k: the draft (1..max_depth).

        Returns:
            (decayed hits + 1) / (decayed tries + 2).
        """
        return (self.hits[k - 1] + 1.0) / (self.tries[k - 1] + 2.0)

    def expected_tokens(self, depth: int) -> float:
        """Expected tokens per row per step when drafting `depth` tokens."""
        total, chance = 1.0, 1.0
        for k in range(depth):
            chance *= self.acceptance(k + 1)
            total += chance
        return total

    def _time(self, depth: int) -> float:
        if depth in self.times:
            return self.times[depth]
        # Lines run through drafting depths where two are measured: a step without drafts is not on them.
        known = sorted(d for d in self.times if d > 0) or sorted(self.times)
        size = self.sizes[depth]
        if len(known) >= 2:
            (s0, t0), (s1, t1) = ((self.sizes[known[0]], self.times[known[0]]),
                                  (self.sizes[known[-1]], self.times[known[-1]]))
            per_token = max((t1 - t0) / max(s1 - s0, 1), 0.0)
        else:
            s0, t0 = self.sizes[known[0]], self.times[known[0]]
            per_token = self.PRIOR_COST_PER_TOKEN * t0 / (1 + self.PRIOR_COST_PER_TOKEN * (s0 - 1))
        return max(t0 + per_token * (size - s0), 1e-9)

    def _rate(self, depth: int) -> float:
        rate = self.expected_tokens(depth) / self._time(depth)
        return rate if math.isfinite(rate) else 0.0


def _average(previous: float | None, value: float) -> float:
    """The controller's running time average: recent steps weigh most, as the context grows."""
    return value if previous is None else 0.7 * previous + 0.3 * value
