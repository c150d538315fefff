"""Prompt lookup drafts: continue the text from where its last few tokens occurred before.

Answers often copy their prompt or themselves (a function's signature and docstring, a name, a
quoted phrase). Prompt lookup (Saxena, 2023; transformers' `prompt_lookup_num_tokens`) drafts such
copies without a model: find the last n tokens earlier in the sequence and propose what followed
them there. The decoding loop verifies these drafts in the same pass as the heads' drafts, as one
more branch of the draft tree (`DraftTree.with_lookup`), so each step keeps whichever is longer.

transformers' own candidate generator works on one row at a time inside its assisted-decoding loop,
which refuses batches; this module matches every row of a batch at once, and is written here for
that reason. Like transformers, it takes the earliest match of the longest n-gram that has one.
"""

from __future__ import annotations

import torch


def prompt_lookup(
    sequences: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    num_tokens: int,
    max_ngram: int = 3,
    min_ngram: int = 1,
    return_ngram: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draft up to `num_tokens` tokens per row by matching the row's last n-gram earlier in the row.

    For n from `max_ngram` down to `min_ngram`, row r looks for the first earlier occurrence of its
    last n tokens within `sequences[r, starts[r]:lengths[r]]`; the tokens that followed it (up to
    `num_tokens`, and never past the row's end) are the draft. A row whose longer n-gram matches keeps
    that match.

    Args:
        sequences: `(R, T)` token ids (padding outside each row's span is ignored).
        starts: `(R,)` first real position of each row (after left padding).
        lengths: `(R,)` end of each row's tokens (exclusive).
        num_tokens: most tokens to draft per row (>= 1).
        max_ngram: longest n-gram to match.
        min_ngram: shortest n-gram to match (>= 1).
        return_ngram: also return the n of each row's match.

    Returns:
        `(R, num_tokens)` drafted tokens (entries past a row's count are 0) and `(R,)` how many tokens
        each row drafted (0: no match); with `return_ngram`, also `(R,)` the n of each row's match (0: none).
    """
    rows = sequences.shape[0]
    device = sequences.device
    end = int(lengths.max())
    sequences = sequences[:, :end]
    counts = torch.zeros(rows, dtype=torch.long, device=device)
    sources = torch.zeros(rows, dtype=torch.long, device=device)  # where each row's draft starts
    matched = torch.zeros(rows, dtype=torch.long, device=device)  # the n of each row's match
    for n in range(max_ngram, min_ngram - 1, -1):
        if end <= n:
            continue
        # The last n tokens of each row, then every window of n tokens that ends before them.
        ngram = sequences.gather(1, (lengths[:, None] - n + torch.arange(n, device=device)[None]).clamp(min=0))
        windows = sequences.unfold(1, n, 1)  # (R, end - n + 1, n): window i covers positions i..i+n-1
        position = torch.arange(windows.shape[1], device=device)[None]
        valid = (position >= starts[:, None]) & (position + n < lengths[:, None])  # a successor inside the row
        match = (windows == ngram[:, None, :]).all(dim=-1) & valid
        found = match.any(dim=1) & (counts == 0)
        if bool(found.any()):
            first = match.float().argmax(dim=1)  # earliest match
            sources = torch.where(found, first + n, sources)
            counts = torch.where(found, (lengths - (first + n)).clamp(max=num_tokens), counts)
            matched = torch.where(found, n, matched)
    offsets = torch.arange(num_tokens, device=device)[None]
    columns = (sources[:, None] + offsets).clamp(max=end - 1)
    drafts = torch.where(offsets < counts[:, None], sequences.gather(1, columns), torch.zeros_like(columns))
    return (drafts, counts, matched) if return_ngram else (drafts, counts)
