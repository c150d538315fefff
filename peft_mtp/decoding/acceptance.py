"""Deciding which drafted tokens the model accepts, so that the output is what the model alone would give.

Greedy: the model's choice after each node is its argmax; a node is accepted when its token is the
choice at its parent (`DraftTree.accept`). The accepted path plus the choice after its last node is
exactly what greedy decoding would produce, token by token.

Sampling, chain drafts: standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023).
Draft k was sampled from the head's distribution q_k; it is accepted with probability
min(1, p_k(x) / q_k(x)), where p_k is the model's distribution at that point. At the first rejection
the token is resampled from the residual max(0, p_k - q_k) (normalised); if every draft is accepted,
a bonus token is sampled from the model's distribution after the last one. Each emitted token is
then distributed exactly as the model's own sampling would distribute it.

Sampling, tree drafts: the candidates are deterministic (each head's top-k), i.e. point-mass drafts.
Recursive rejection with point masses reduces to: sample the model's token at a node, descend into
the child holding that token if there is one, and stop otherwise (the sample is the emitted token).
Every emitted token is a fresh sample from the model's distribution, so this is exact as well.
"""

from __future__ import annotations

import torch


def sample(scores: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of `(..., V)` processed scores (logits after temperature, top-k, top-p...)."""
    probs = torch.softmax(scores.float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, num_samples=1).view(probs.shape[:-1])


def speculative_sample_chain(
    target_scores: torch.Tensor, draft_probs: torch.Tensor, drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of sampled chain drafts and draw the next token, preserving the model's distribution.

    Args:
        target_scores: `(B, m + 1, V)` the model's processed scores after the root and after each draft.
        draft_probs: `(B, m, V)` the distribution each draft was sampled from.
        drafts: `(B, m)` the drafted tokens.

    Returns:
        `(B,)` number of accepted drafts a, and `(B,)` the token that follows them (resampled from the
        residual where draft a+1 was rejected, sampled from the model after a full acceptance).
    """
    batch, num_drafts = drafts.shape
    target = torch.softmax(target_scores.float(), dim=-1)  # (B, m + 1, V)
    if num_drafts == 0:
        return torch.zeros(batch, dtype=torch.long, device=drafts.device), sample(target_scores[:, 0])
    p = target[:, :num_drafts].gather(2, drafts[..., None])[..., 0]  # (B, m): p_k(draft k)
    q = draft_probs.gather(2, drafts[..., None])[..., 0]
    # accept iff u < p / q, written without the division (q > 0 for every sampled draft)
    accepted_each = torch.rand_like(p) * q < p
    accepted = (accepted_each.long().cumprod(dim=1)).sum(dim=1)  # (B,): leading acceptances
    rows = torch.arange(batch, device=drafts.device)
    at = target[rows, accepted]  # (B, V): the model's distribution where the next token goes
    rejected = accepted < num_drafts
    residual = at.clone()
    if rejected.any():
        q_next = draft_probs[rows, accepted.clamp(max=num_drafts - 1)]
        difference = (at - q_next).clamp(min=0)
        mass = difference.sum(dim=1, keepdim=True)
        # p == q leaves no residual mass, but then rejection has probability 0; keep p for safety.
        difference = torch.where(mass > 0, difference / mass.clamp(min=1e-30), at)
        residual = torch.where(rejected[:, None], difference, at)
    next_token = torch.multinomial(residual, num_samples=1)[:, 0]
    return accepted, next_token
