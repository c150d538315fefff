"""The MTP loss: per-head cross-entropy, computed in chunks so that K x B x T x V logits never exist.

For each head k, only positions with a valid target (`alignment.head_targets`) are scored. Their
hidden states are gathered, then unembedded and scored a chunk of rows at a time under activation
checkpointing: the forward keeps no logits, and the backward recomputes one chunk's logits at a
time. Peak extra memory is one chunk of logits, not K x B x T x V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .alignment import IGNORE_INDEX, head_targets

DEFAULT_CHUNK_ROWS = 1024


@dataclass
class MTPLossOutput:
    """Result of `mtp_loss`.

    Attributes:
        loss: weighted sum of the head losses (`sum_k w_k * loss_k`), a scalar with grad.
        head_losses: `(K,)` mean cross-entropy of each head over its valid targets (0 where it has none).
        head_correct: `(K,)` number of valid targets each head ranked first (top-1 hits).
        head_counts: `(K,)` number of valid targets of each head.
    """

    loss: torch.Tensor
    head_losses: torch.Tensor
    head_correct: torch.Tensor
    head_counts: torch.Tensor

    @property
    def head_accuracies(self) -> torch.Tensor:
        """`(K,)` top-1 accuracy of each head (0 where it has no valid target)."""
        return self.head_correct / self.head_counts.clamp(min=1)


def _chunk_loss_sum(
    hidden: torch.Tensor, targets: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    logits = logits_fn(hidden).float()  # (N, V); float32 for a stable log-softmax
    return F.cross_entropy(logits, targets, reduction="sum")


def _chunk_hits(hidden: torch.Tensor, targets: torch.Tensor, logits_fn) -> torch.Tensor:
    with torch.no_grad():
        return (logits_fn(hidden).argmax(dim=-1) == targets).sum()


def head_loss_sums(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    with_hits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (and top-1 hits) of rows of hidden states, one chunk of logits at a time.

    Args:
        hidden: `(N, H)` hidden states, each with a valid target.
        targets: `(N,)` target token ids.
        logits_fn: maps `(n, H)` hidden states to `(n, V)` logits.
        chunk_rows: rows unembedded at once; bounds the peak logits memory to `chunk_rows x V`.
        with_hits: also count top-1 hits (costs one more unembedding per chunk, without grad).

    Returns:
        `(loss_sum, hits)`: a scalar with grad and a scalar count.
    """
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    hits = torch.zeros((), dtype=torch.long, device=hidden.device)
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_rows):
        h, y = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if needs_grad:
            # Recompute this chunk's logits in backward instead of keeping them.
            loss_sum = loss_sum + checkpoint(_chunk_loss_sum, h, y, logits_fn, use_reentrant=False)
        else:
            loss_sum = loss_sum + _chunk_loss_sum(h, y, logits_fn)
        if with_hits:
            hits = hits + _chunk_hits(h.detach(), y, logits_fn)
    return loss_sum, hits


def mtp_loss(
    head_hidden: torch.Tensor,
    labels: torch.Tensor,
    head_logits_fn: Callable[[torch.Tensor, int], torch.Tensor],
    weights: Sequence[float],
    position_ids: Optional[torch.Tensor] = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> MTPLossOutput:
    """Weighted cross-entropy of K heads against tokens t+1+k, without materialising their logits.

    Args:
        head_hidden: `(B, T, K, H)` head outputs (before the final norm).
        labels: `(B, T)` unshifted labels, -100 where no loss is wanted.
        head_logits_fn: `(hidden (n, H), k) -> logits (n, V)` for head k = 1..K.
        weights: K weights w_k (normalised by the config).
        position_ids: `(B, T)` position ids of packed sequences, so no target crosses a document.
        chunk_rows: rows unembedded at once.

    Returns:
        An `MTPLossOutput`. A head with no valid target contributes 0 (never NaN).
    """
    num_heads = head_hidden.shape[2]
    losses, hits, counts = [], [], []
    total = head_hidden.new_zeros((), dtype=torch.float32)
    for k in range(1, num_heads + 1):
        targets = head_targets(labels, k, position_ids)  # (B, T)
        valid = targets != IGNORE_INDEX
        hidden_k = head_hidden[:, :, k - 1][valid]  # (N, H)
        count = valid.sum()
        loss_sum, hit = head_loss_sums(hidden_k, targets[valid], lambda h, k=k: head_logits_fn(h, k), chunk_rows)
        mean = loss_sum / count.clamp(min=1)
        total = total + weights[k - 1] * mean
        losses.append(mean.detach())
        hits.append(hit)
        counts.append(count)
    if not total.requires_grad and head_hidden.requires_grad:
        # No valid target anywhere: keep the graph connected so backward() runs (with zero gradients).
        total = total + 0.0 * head_hidden.sum()
    return MTPLossOutput(
        loss=total, head_losses=torch.stack(losses), head_correct=torch.stack(hits), head_counts=torch.stack(counts)
    )
