"""Heads that can copy: a pointer to the token that followed the last n tokens the previous time they occurred.

Text repeats itself, code above all: an answer restates the function it was asked for, a loop body names the
variables its header introduced. Heads with a single layer predict such tokens poorly. Measured on SmolLM2-135M
with the main job's sequential heads (24 held-out HumanEval prompts, 2,524 positions): the token that followed
the previous occurrence of the current bigram was head 1's target at 47% of positions, and the head missed half
of those; "that token when there is one, else the head's" would have agreed with the model on 0.67 of positions
against the head's 0.49 (0.65 against 0.54 on chat).

`MTPConfig.copy_ngram = n` gives every head k a *copy candidate* and a *copy gate*:

* The candidate (`copy_candidates`) at position t: find the latest earlier occurrence of the last n tokens the
  head knows when it drafts, and take the token at the same distance after it as head k's target is after them.
  A parallel head at t knows tokens up to t+1 (the model's own next token is verified before heads draft; in
  training it is the data's token t+1), a sequential depth k up to t+k (its chain's inputs). The candidate lies
  among those known tokens, so no head reads what it predicts.
* The gate is a logistic probe on the head's own output: from the normalised head state and the head's logit for
  the candidate it estimates g = P(candidate is head k's target). It trains on the heads' output detached (binary
  cross-entropy), so the heads themselves learn exactly what they learn without it.
* Drafts come from the mixture `(1 - g) * p_head + g * [candidate]` (`mix_copy`): greedy drafts take its argmax,
  trees its top-k, sampling samples it (speculative sampling stays exact for any draft distribution). A candidate
  outside a draft vocabulary can still be drafted.

This is a pointer-generator (See et al. 2017, "Get To The Point") with a prompt-lookup style pointer (Saxena 2023,
transformers' `prompt_lookup_num_tokens`); the matching is written here because no library exposes the
per-position, per-head variant training needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NO_CANDIDATE = -1
# Rows of queries compared at once in `latest_match` ((B, rows, T) booleans per n-gram token).
QUERY_CHUNK = 256


def latest_match(ids: torch.Tensor, query: torch.Tensor, ngram: int, offset: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """For each query position L, the latest j < L whose n tokens up to j equal the n tokens up to L.

    Only matches whose continuation `j + offset` is at most L count (the continuation must be known at L).

    Args:
        ids: `(B, T)` token ids.
        query: `(B, Q)` positions L (entries outside 0..T-1, or with fewer than n tokens before, find nothing).
        ngram: n, tokens matched.
        offset: distance from the match's last token to the continuation taken (>= 1).
        valid: optional `(B, T)` real tokens; matches touching a padded position do not count.

    Returns:
        `(B, Q)` long: the matching j, or -1 where none.
    """
    batch, length = ids.shape
    positions = torch.arange(length, device=ids.device)
    # Candidate ends j: their n-gram and continuation lie inside the row and are real tokens.
    usable = (positions >= ngram - 1)[None].expand(batch, -1).clone()
    usable &= positions[None] + offset < length
    window = None
    if valid is not None:
        window = valid.clone()
        for i in range(1, ngram):
            window[:, i:] &= valid[:, :-i]
            window[:, :i] = False
        continuation = torch.zeros_like(valid)
        continuation[:, : length - offset] = valid[:, offset:]
        usable &= window & continuation
    result = torch.full(query.shape, NO_CANDIDATE, dtype=torch.long, device=ids.device)
    for start in range(0, query.shape[1], QUERY_CHUNK):
        q = query[:, start:start + QUERY_CHUNK]
        inside = (q >= ngram - 1) & (q < length)
        if window is not None:  # the query's own n tokens are real
            inside &= window.gather(1, q.clamp(0, length - 1))
        equal = torch.ones(batch, q.shape[1], length, dtype=torch.bool, device=ids.device)
        for i in range(ngram):
            q_tokens = ids.gather(1, (q - i).clamp(0, length - 1))  # (B, Q)
            shifted = torch.full_like(ids, NO_CANDIDATE)
            shifted[:, i:] = ids[:, : length - i]  # shifted[:, j] = ids[:, j - i]
            equal &= shifted[:, None, :] == q_tokens[:, :, None]
        equal &= usable[:, None, :] & (positions[None, None, :] + offset <= q[:, :, None])
        # The latest match: the largest j (positions + 1 so that "none" is 0).
        latest = (equal.long() * (positions + 1)[None, None, :]).amax(dim=-1) - 1
        result[:, start:start + QUERY_CHUNK] = torch.where(inside, latest, NO_CANDIDATE)
    return result


def copy_candidates(input_ids: torch.Tensor, num_heads: int, ngram: int, sequential: bool,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each head's copy candidate at each position of a teacher-forced sequence.

    Head k at position t predicts token t+1+k. It knows tokens up to L = t+k (sequential depth k: its chain's
    inputs) or L = t+1 (parallel heads: the model's own next token). The candidate is the token that followed
    the latest earlier occurrence of tokens L-n+1..L at the distance t+1+k - L.

    Args:
        input_ids: `(B, T)` token ids.
        num_heads: K.
        ngram: n (`MTPConfig.copy_ngram`).
        sequential: whether the heads are a `sequential` chain.
        attention_mask: optional `(B, T)` padding mask (1 = real token).

    Returns:
        `(B, T, K)` long token ids, -1 where a head has no candidate.
    """
    batch, length = input_ids.shape
    valid = None if attention_mask is None else attention_mask.bool()
    t = torch.arange(length, device=input_ids.device)[None].expand(batch, -1)
    if sequential:
        # Every depth copies the token after its last known one (offset 1): depth k at t is depth 1 at t+k-1,
        # so one match per position serves all depths, shifted.
        match = latest_match(input_ids, t, ngram, 1, valid)
        token = torch.where(match >= 0, input_ids.gather(1, (match + 1).clamp(0, length - 1)), NO_CANDIDATE)
        padded = torch.cat([token, token.new_full((batch, num_heads), NO_CANDIDATE)], dim=1)
        return torch.stack([padded[:, k:k + length] for k in range(1, num_heads + 1)], dim=2)
    columns = []
    for k in range(1, num_heads + 1):  # parallel heads all know tokens up to t+1; head k copies k tokens on
        match = latest_match(input_ids, t + 1, ngram, k, valid)
        token = input_ids.gather(1, (match + k).clamp(0, length - 1))
        columns.append(torch.where(match >= 0, token, NO_CANDIDATE))
    return torch.stack(columns, dim=2)


def next_copy_candidate(tokens: torch.Tensor, lengths: torch.Tensor, ngram: int, offset: int,
                        starts: torch.Tensor | None = None) -> torch.Tensor:
    """Decode time: each row's candidate `offset` tokens after its last known token.

    Args:
        tokens: `(R, S)` known tokens of each row (a row's tokens are `starts[r] .. lengths[r]-1`).
        lengths: `(R,)` end of each row's tokens.
        ngram: n.
        offset: distance from the last known token to the token drafted (1 for a sequential depth, k for
            parallel head k).
        starts: `(R,)` first real token of each row (left padding before it); zeros by default.

    Returns:
        `(R,)` candidate token ids, -1 where none.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
    valid = positions < lengths[:, None]
    if starts is not None:
        valid &= positions >= starts[:, None]
    match = latest_match(tokens, (lengths - 1)[:, None], ngram, offset, valid)[:, 0]
    token = tokens.gather(1, (match + offset).clamp(0, tokens.shape[1] - 1)[:, None])[:, 0]
    return torch.where(match >= 0, token, NO_CANDIDATE)


class CopyGate(nn.Module):
    """Logit of g = P(the copy candidate is the head's target), from the head's state and its view of the candidate.

    `gate = w . h_norm + a * z_candidate + b`, where `h_norm` is the head output after the model's final norm and
    `z_candidate` the head's logit for the candidate (its unembedding row times `h_norm`). Starts at zero
    (g = 1/2) and learns from `copy_gate_loss`.

    Args:
        hidden_size: H.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.state = nn.Linear(hidden_size, 1)
        self.candidate_scale = nn.Parameter(torch.zeros(1))
        nn.init.zeros_(self.state.weight)
        nn.init.zeros_(self.state.bias)

    def forward(self, normed_hidden: torch.Tensor, candidate_logit: torch.Tensor) -> torch.Tensor:
        """`(..., H)` normalised head outputs and `(...)` candidate logits -> `(...)` gate logits (float32)."""
        state = self.state(normed_hidden.to(self.state.weight.dtype))[..., 0]
        return (state + self.candidate_scale * candidate_logit.to(state.dtype)).float()


def mix_copy(log_probs: torch.Tensor, candidates: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the mixture `(1 - g) * p_head + g * [token = candidate]` over the whole vocabulary.

    Args:
        log_probs: `(..., V)` the head's log-probabilities (`-inf` outside a draft vocabulary).
        candidates: `(...)` candidate token ids, -1 where none (the head's distribution is kept there).
        gate_logits: `(...)` gate logits.

    Returns:
        `(..., V)` float32 log-probabilities.
    """
    log_probs = log_probs.float()
    has = candidates >= 0
    gate = torch.where(has, gate_logits.float(), torch.full_like(gate_logits, float("-inf"), dtype=torch.float32))
    mixed = log_probs + nn.functional.logsigmoid(-gate)[..., None]  # log(1 - g)
    index = candidates.clamp(min=0)[..., None]
    at_candidate = torch.logaddexp(mixed.gather(-1, index)[..., 0], nn.functional.logsigmoid(gate))
    return mixed.scatter(-1, index, torch.where(has, at_candidate, mixed.gather(-1, index)[..., 0])[..., None])


def mixture_topk(slot_logits: torch.Tensor, candidates: torch.Tensor, gate_logits: torch.Tensor, k: int,
                 token_ids: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 to_slots: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The k most likely tokens of the mixture `(1 - g) * p_head + g * [candidate]`, from the head's top k + 1.

    The same ranking as `mix_copy(...).topk(k)`, without a whole-vocabulary tensor.

    Args:
        slot_logits: `(..., N)` head logits over its own vocabulary (draft-vocabulary slots, or all tokens).
        candidates: `(...)` candidate token ids, -1 where none.
        gate_logits: `(...)` gate logits (`-inf` where there is no candidate).
        k: how many tokens.
        token_ids: maps slots to token ids (None: slots are token ids).
        to_slots: maps token ids to slots, -1 outside the head's vocabulary (None: the identity).

    Returns:
        `(..., k)` token ids, most likely first.
    """
    log_probs = torch.log_softmax(slot_logits.float(), dim=-1)
    top, slots = log_probs.topk(k, dim=-1)
    tokens = slots if token_ids is None else token_ids(slots)
    keep = nn.functional.logsigmoid(-gate_logits.float()).masked_fill(candidates < 0, 0.0)[..., None]  # log(1 - g)
    candidate_slot = candidates if to_slots is None else to_slots(candidates.clamp(min=0))
    candidate_slot = torch.where(candidates >= 0, candidate_slot, -1)
    own = log_probs.gather(-1, candidate_slot.clamp(min=0)[..., None])[..., 0]
    own = torch.where(candidate_slot >= 0, own, float("-inf"))
    candidate_score = torch.logaddexp(own + keep[..., 0], nn.functional.logsigmoid(gate_logits.float()))
    candidate_score = candidate_score.masked_fill(candidates < 0, float("-inf"))
    scores = torch.cat([(top + keep).masked_fill(tokens == candidates[..., None], float("-inf")),
                        candidate_score[..., None]], dim=-1)
    order = scores.topk(k, dim=-1).indices
    return torch.cat([tokens, candidates[..., None]], dim=-1).gather(-1, order)


def copy_gate_loss(gate_logits: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                   valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of the gate against "the candidate is the target", over positions with both.

    Args:
        gate_logits: `(B, T)` one head's gate logits.
        candidates: `(B, T)` its candidates (-1: none).
        targets: `(B, T)` its targets.
        valid: `(B, T)` positions with a target.

    Returns:
        `(loss_sum, scored, correct)`: summed float32 loss, the number of positions scored and how many of them had
        the right candidate.
    """
    scored = valid & (candidates >= 0)
    right = (candidates == targets)[scored].float()
    loss = nn.functional.binary_cross_entropy_with_logits(gate_logits[scored].float(), right, reduction="sum")
    return loss, scored.sum(), right.sum().long()
