"""The one place that defines which token each head predicts.

Head k (k = 1..K) at position t predicts token t + 1 + k. The model's own next-token head is
"head 0" in this convention: at position t it predicts token t + 1. Every other module asks this
one for offsets and targets instead of writing `t + 1 + k` itself.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def target_offset(k: int) -> int:
    """How far ahead of position t the token that head k predicts lies (head 0 = next-token head).

    Args:
        k: head number, 0 for the model's own head, 1..K for MTP heads.

    Returns:
        `1 + k`.
    """
    if k < 0:
        raise ValueError(f"head number `k` must be >= 0, got {k}.")
    return 1 + k


def head_targets(
    labels: torch.Tensor,
    k: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets of head k at every position: `labels[:, t + 1 + k]`, or -100 where there is none.

    A target is valid only if its label is not -100, it lies inside the sequence, and it belongs to
    the same document as position t. With packed or padding-free batches, documents are told apart
    by `position_ids`: token t + 1 + k is in t's document iff its position id is exactly
    `position_ids[t] + 1 + k` (positions restart at every document).

    Args:
        labels: `(B, T)` token ids with -100 where no loss is wanted. Labels are *unshifted*, as
            transformers' CausalLM models take them (`labels[t]` is the token at t).
        k: head number, 0..K.
        position_ids: optional `(B, T)` or `(1, T)` position ids of packed sequences.

    Returns:
        `(B, T)` long tensor of targets, -100 where position t has no valid target.
    """
    offset = target_offset(k)
    targets = torch.full_like(labels, IGNORE_INDEX)
    if offset >= labels.shape[1]:
        return targets
    targets[:, :-offset] = labels[:, offset:]
    if position_ids is not None:
        position_ids = position_ids.expand_as(labels)
        same_document = (position_ids[:, offset:] - position_ids[:, :-offset]) == offset
        targets[:, :-offset] = targets[:, :-offset].masked_fill(~same_document, IGNORE_INDEX)
    return targets


def future_tokens(input_ids: torch.Tensor, k: int, fill_value: int = 0) -> torch.Tensor:
    """Token t + k at every position t (what a `sequential` head at depth k reads), `fill_value` past the end.

    Head k may read tokens up to t + k (the chain it drafts) but never t + 1 + k, the one it predicts.

    Args:
        input_ids: `(B, T)` token ids.
        k: head number, 1..K.
        fill_value: id used where t + k lies past the end of the sequence (those positions have no target).

    Returns:
        `(B, T)` token ids.
    """
    shifted = torch.full_like(input_ids, fill_value)
    if k < input_ids.shape[1]:
        shifted[:, : input_ids.shape[1] - k] = input_ids[:, k:]
    return shifted
