"""What a speculative `generate` call did: tokens per verify step, acceptance per head, forwards, time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpeculationStats:
    """Counters of one speculative `generate` call (returned as `output.mtp_stats`).

    Row-steps count one row in one verify pass: a batch of 8 rows verified once is 8 row-steps.

    Attributes:
        new_tokens: tokens generated over all rows (pads after a row finished not counted).
        model_forwards: forward passes of the model (1 prefill + `verify_steps`).
        verify_steps: verify passes (each verifies every active row's drafts at once).
        row_steps: sum over verify passes of the rows in them.
        proposed: per head k (index k-1), row-steps in which a draft of depth k was verified.
        reached: per head k, row-steps in which draft k was verified and drafts 1..k-1 were all accepted.
        accepted: per head k, row-steps in which drafts 1..k were all accepted.
        depth_steps: verify passes per draft depth used (`{depth: count}`).
        lookup_proposed: row-steps in which a prompt-lookup branch was verified (`mtp_lookup`).
        lookup_won: row-steps whose emitted drafts came from the lookup branch (it beat the heads' drafts).
        lookup_tokens: drafts accepted from the lookup branch in those row-steps (before a stopping criterion
            cuts them).
        wall_time_s: time of the whole call (prefill included).
        prefill_time_s: time of the prefill pass.
        draft_time_s: time spent in the heads (drafting), prefill excluded.
        verify_time_s: time spent in verify passes and acceptance.
        trace: per verify pass, `(original row index, tokens accepted from the drafts)` pairs, when
            `mtp_trace=True` was passed (for tests and debugging).
        prefill_tokens: tokens emitted by the prefill pass (one per row, no drafts involved).
    """

    num_heads: int = 0
    new_tokens: int = 0
    model_forwards: int = 0
    verify_steps: int = 0
    row_steps: int = 0
    proposed: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    depth_steps: dict[int, int] = field(default_factory=dict)
    lookup_proposed: int = 0
    lookup_won: int = 0
    lookup_tokens: int = 0
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    trace: list[list[tuple[int, int]]] | None = None
    prefill_tokens: int = 0

    def __post_init__(self):
        if not self.proposed:
            self.proposed = [0] * self.num_heads
            self.reached = [0] * self.num_heads
            self.accepted = [0] * self.num_heads

    def record_step(self, depth: int, accepted: list[int]) -> None:
        """Count one verify pass that drafted `depth` tokens per row and accepted `accepted[r]` in row r."""
        self.verify_steps += 1
        self.model_forwards += 1
        self.row_steps += len(accepted)
        self.depth_steps[depth] = self.depth_steps.get(depth, 0) + 1
        for count in accepted:
            for k in range(depth):
                self.proposed[k] += 1
                if count >= k:
                    self.reached[k] += 1
                if count > k:
                    self.accepted[k] += 1

    def record_lookup(self, proposed: list[int], head_accepted: list[int], lookup_accepted: list[int]) -> None:
        """Count one verify pass's lookup branch.

        Args:
            proposed: per row, the lookup drafts proposed (0: none for that row), those verified as nodes of
                the heads' chain included.
            head_accepted: per row, drafts accepted on the heads' nodes.
            lookup_accepted: per row, drafts accepted on the lookup branch.
        """
        for count, heads, lookup in zip(proposed, head_accepted, lookup_accepted):
            self.lookup_proposed += count > 0
            if lookup > heads:
                self.lookup_won += 1
                self.lookup_tokens += lookup

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a row gains per verify pass (1 = no draft accepted; 1 + the deepest branch at most)."""
        if not self.row_steps:
            return 0.0
        return (self.new_tokens - self.prefill_tokens) / self.row_steps

    @property
    def acceptance_rate(self) -> list[float]:
        """Per head k: share of its drafts that were accepted (drafts 1..k all agreed with the model)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def conditional_acceptance_rate(self) -> list[float]:
        """Per head k: share of its drafts accepted among those whose drafts 1..k-1 were accepted."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted, self.reached)]

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all rows) per second of the whole call."""
        return self.new_tokens / self.wall_time_s if self.wall_time_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Flat, loggable summary."""
        summary: dict[str, Any] = {
            "new_tokens": self.new_tokens,
            "model_forwards": self.model_forwards,
            "verify_steps": self.verify_steps,
            "tokens_per_step": round(self.tokens_per_step, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "wall_time_s": round(self.wall_time_s, 4),
            "prefill_time_s": round(self.prefill_time_s, 4),
            "draft_time_s": round(self.draft_time_s, 4),
            "verify_time_s": round(self.verify_time_s, 4),
            "depth_steps": dict(sorted(self.depth_steps.items())),
            "lookup_proposed": self.lookup_proposed,
            "lookup_won": self.lookup_won,
            "lookup_tokens": self.lookup_tokens,
        }
        for k, (rate, conditional) in enumerate(zip(self.acceptance_rate, self.conditional_acceptance_rate), start=1):
            summary[f"head{k}_acceptance"] = round(rate, 4)
            summary[f"head{k}_conditional_acceptance"] = round(conditional, 4)
        return summary
