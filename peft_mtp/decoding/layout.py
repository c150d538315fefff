"""Per-row sequence layout of everything cached while decoding a batch, and how it is rolled back.

Every cached tensor (the model's keys and values, the heads' keys, values and convolution inputs)
has a dimension that runs over positions. Rows are *right-aligned*: each row's real entries are the
last ones, preceded by padding, as with transformers' left padding. A `valid` mask `(B, S)` says
which entries are real.

A decoding step appends a chunk of new positions to every row, then keeps, row by row, a different
subset of them (the accepted draft path). `plan_keep` computes once per step where every kept entry
goes so that rows stay right-aligned without gaps, and `apply_keep` applies the plan to any tensor.
When every row keeps the same leading entries of the chunk (batch 1 with a chain, or rows that
agree), the plan is a crop, which slices instead of copying.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeepPlan:
    """Where the kept entries of `cat(old, chunk)` go (see `plan_keep`).

    Attributes:
        length: width of the new layout.
        valid: `(B, length)` real entries of the new layout.
        index: `(B, length)` source column in `cat(old, chunk)` of each new entry, or None for a crop.
        shared_index: `(length,)` source columns when every row uses the same ones, else None.
    """

    length: int
    valid: torch.Tensor
    index: torch.Tensor | None = None
    shared_index: torch.Tensor | None = None


def plan_keep(
    valid: torch.Tensor, chunk_width: int, keep: torch.Tensor, chunk_index: torch.Tensor | None = None
) -> KeepPlan:
    """Plan keeping every row's real old entries plus `keep[b]` entries of the new chunk, right-aligned.

    Args:
        valid: `(B, S)` real entries of the old layout (right-aligned).
        chunk_width: width W of the chunk appended after the old entries.
        keep: `(B,)` how many chunk entries each row keeps.
        chunk_index: `(B, >= max(keep))` which chunk entries each row keeps, in order; None keeps the
            first `keep[b]` entries.

    Returns:
        A `KeepPlan` over the source `cat(old, chunk)` of width S + W.
    """
    batch, width = valid.shape
    device = valid.device
    max_keep = int(keep.max()) if batch else 0
    if chunk_index is None:
        chunk_index = torch.arange(max(max_keep, 1), device=device).expand(batch, -1)
    real = valid.sum(dim=1)
    total = real + keep
    length = int(total.max()) if batch else width
    leading_entries_kept = bool(
        (keep == max_keep).all()
        and (max_keep == 0 or (chunk_index[:, :max_keep] == torch.arange(max_keep, device=device)).all())
    )
    if leading_entries_kept and length == width + max_keep:
        # Nothing moves: keep the first `width + max_keep` columns as they are.
        new_valid = torch.cat([valid, valid.new_ones(batch, max_keep)], dim=1)
        return KeepPlan(length, new_valid)

    offset = torch.arange(length, device=device)[None, :] - (length - total)[:, None]  # index in the row's real entries
    is_new = offset >= real[:, None]
    old_source = (width - real)[:, None] + offset
    new_position = (offset - real[:, None]).clamp(0, chunk_index.shape[1] - 1)
    new_source = width + chunk_index.gather(1, new_position)
    index = torch.where(is_new, new_source, old_source.clamp(min=0))
    new_valid = offset >= 0
    if batch == 1 or bool((index == index[:1]).all() and (new_valid == new_valid[:1]).all()):
        return KeepPlan(length, new_valid, index=index, shared_index=index[0])
    return KeepPlan(length, new_valid, index=index)


def apply_keep(tensor: torch.Tensor, seq_dim: int, plan: KeepPlan) -> torch.Tensor:
    """Apply a `KeepPlan` to a tensor laid out as `cat(old, chunk)` along `seq_dim` (batch first).

    Args:
        tensor: `(B, ..., S + W, ...)`.
        seq_dim: the dimension that runs over positions.
        plan: from `plan_keep`.

    Returns:
        `(B, ..., plan.length, ...)`.
    """
    if plan.index is None:
        return tensor.narrow(seq_dim, 0, plan.length)
    if plan.shared_index is not None:
        return tensor.index_select(seq_dim, plan.shared_index)
    shape = [1] * tensor.dim()
    shape[0], shape[seq_dim] = plan.index.shape
    expanded = list(tensor.shape)
    expanded[seq_dim] = plan.length
    return tensor.gather(seq_dim, plan.index.view(shape).expand(expanded))


def select_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keep the batch rows `rows` of a batch-first tensor."""
    return tensor.index_select(0, rows)


def chunk_attention_mask(
    past_valid: torch.Tensor, chunk_valid: torch.Tensor, intra: torch.Tensor | None = None
) -> torch.Tensor:
    """What each new position may read: the real cached positions and, within the chunk, `intra`.

    Args:
        past_valid: `(B, S)` real cached positions.
        chunk_valid: `(B, W)` real new positions.
        intra: `(W, W)` bool, which chunk positions each chunk position may read (default: causal).
            A position always reads itself, so no row of the mask is empty.

    Returns:
        `(B, 1, W, S + W)` bool mask (True = may read).
    """
    batch, width = chunk_valid.shape
    eye = torch.eye(width, dtype=torch.bool, device=chunk_valid.device)
    if intra is None:
        intra = torch.ones(width, width, dtype=torch.bool, device=chunk_valid.device).tril()
    within = (intra[None] & chunk_valid[:, None, :]) | eye[None]  # (B, W, W)
    past = past_valid[:, None, :].expand(batch, width, past_valid.shape[1])
    return torch.cat([past, within], dim=2)[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = may read) as the additive float mask transformers' eager and SDPA attention take."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def front_align(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real entries to the front (keeping their order).

    Args:
        values: `(B, W, ...)`.
        valid: `(B, W)` real entries.

    Returns:
        The moved values `(B, W, ...)` and the number of real entries per row `(B,)`.
    """
    # Stable sort of "is padding" puts real entries first, in their original order.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    shape = list(order.shape) + [1] * (values.dim() - 2)
    moved = values.gather(1, order.view(shape).expand_as(values)) if values.dim() > 2 else values.gather(1, order)
    return moved, valid.sum(dim=1)


def ragged_cat(
    first: torch.Tensor, first_len: torch.Tensor, second: torch.Tensor, second_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate two front-aligned ragged batches row by row.

    Args:
        first: `(B, W1, ...)` with `first_len[b]` real leading entries.
        first_len: `(B,)`.
        second: `(B, W2, ...)` with `second_len[b]` real leading entries.
        second_len: `(B,)`.

    Returns:
        `(B, max(first_len + second_len), ...)` front-aligned (entries past a row's length are
        arbitrary), and the lengths `(B,)`.
    """
    lengths = first_len + second_len
    width = max(int(lengths.max()), 1)
    both = torch.cat([first, second], dim=1)
    columns = torch.arange(width, device=first.device)[None, :]
    index = torch.where(columns < first_len[:, None], columns, first.shape[1] + columns - first_len[:, None])
    index = index.clamp(0, both.shape[1] - 1)
    shape = list(index.shape) + [1] * (both.dim() - 2)
    expanded = list(index.shape) + list(both.shape[2:])
    return both.gather(1, index.view(shape).expand(expanded)), lengths


def take_columns(values: torch.Tensor, start: torch.Tensor, count: int) -> torch.Tensor:
    """`values[b, start[b] : start[b] + count]` for every row (indices past the end are clamped).

    Args:
        values: `(B, W, ...)`.
        start: `(B,)` first column of each row.
        count: number of columns to take.

    Returns:
        `(B, count, ...)`.
    """
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0], count, *values.shape[2:])
    index = (start[:, None] + torch.arange(count, device=values.device)[None, :]).clamp(0, values.shape[1] - 1)
    shape = list(index.shape) + [1] * (values.dim() - 2)
    expanded = list(index.shape) + list(values.shape[2:])
    return values.gather(1, index.view(shape).expand(expanded))
