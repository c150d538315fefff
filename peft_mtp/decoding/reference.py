"""A short, readable reference of greedy self-speculative decoding: no cache, no batching, no tricks.

It recomputes everything with full forward passes over the whole sequence, so it is slow, but each
step reads like the algorithm. The tests check that the optimised loop (`loop.py`) emits the same
tokens and accepts the same number of drafts at every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .options import MIN_LOOKUP_NGRAM
from .tree import DraftTree, chain_paths

if TYPE_CHECKING:
    from ..model import MTPModel


@torch.no_grad()
def reference_generate(
    mtp_model: MTPModel,
    prompt: list[int],
    max_new_tokens: int,
    depth: int,
    tree: list[tuple[int, ...]] | None = None,
    eos_token_id: int | list[int] | None = None,
    lookup: int = 0,
    lookup_ngram: int = 3,
) -> tuple[list[int], list[int]]:
    """Greedy speculative decoding of one unpadded prompt, the slow and obvious way.

    Args:
        mtp_model: the `MTPModel` with active heads.
        prompt: the prompt's token ids.
        max_new_tokens: how many tokens to generate at most.
        depth: drafts per step (0..K).
        tree: the draft tree as a list of paths (None: a chain of `depth` drafts).
        eos_token_id: token id(s) that end the generation.
        lookup: prompt-lookup drafts per step (0: none), verified beside the heads' drafts.
        lookup_ngram: the longest n-gram the lookup matches.

    Returns:
        The generated ids (without the prompt), and how many drafts each step accepted.
    """
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    shape = DraftTree.from_paths(tree or chain_paths(max(depth, 1)), max(depth, 1))
    paths = [p for p in shape.paths[1:] if len(p) <= depth]

    def next_token(ids: list[int]) -> int:  # the model's own greedy choice after `ids`
        return int(mtp_model.model(torch.tensor([ids])).logits[0, -1].argmax())

    ids = list(prompt) + [next_token(prompt)]  # the first token needs no draft (prefill)
    accepted_per_step = []
    while len(ids) - len(prompt) < max_new_tokens and ids[-1] not in eos:
        # 1. Draft: head k at the last position with a verified successor (T) proposes token T+1+k.
        #    Sequential heads read the chain, so each depth sees the drafts before it.
        last = len(ids) - 2
        step_depth = min(depth, max_new_tokens - (len(ids) - len(prompt)) - 1)  # no drafts past the budget
        candidates, chain = [], []
        for k in range(1, step_depth + 1):
            head_logits = mtp_model(input_ids=torch.tensor([ids + chain]), output_mtp_logits=True).mtp_logits
            ranked = head_logits[0, last, k - 1].argsort(descending=True).tolist()
            candidates.append(ranked)
            chain.append(ranked[0])
        # 1b. Prompt lookup: what followed the first earlier occurrence of the last n tokens (longest n first,
        #     down to 2 tokens unless `lookup_ngram` is 1).
        copied = []
        room = max_new_tokens - (len(ids) - len(prompt)) - 1
        if lookup and room > 0:
            for n in range(lookup_ngram, min(MIN_LOOKUP_NGRAM, lookup_ngram) - 1, -1):
                starts = [i for i in range(len(ids) - n) if ids[i : i + n] == ids[len(ids) - n :]]
                if starts:
                    copied = ids[starts[0] + n :][: min(lookup, room)]
                    break
        # 2. Verify: what the model itself would emit next, one token at a time.
        greedy = []
        for _ in range(max(step_depth, len(copied)) + 1):
            greedy.append(next_token(ids + greedy))
        # 3. Accept the deepest tree path (or lookup prefix) made of the model's own tokens, then its next token.
        accepted = max([len(p) for p in paths if len(p) <= step_depth
                        and [candidates[k][r] for k, r in enumerate(p)] == greedy[: len(p)]], default=0)
        accepted = max([accepted] + [a for a in range(1, len(copied) + 1) if copied[:a] == greedy[:a]])
        new = greedy[: accepted + 1]
        # 4. Stop at eos or at the token budget, even in the middle of the accepted drafts.
        for i, token in enumerate(new):
            if token in eos:
                new = new[: i + 1]
                break
        ids += new[: max_new_tokens - (len(ids) - len(prompt))]
        accepted_per_step.append(accepted)
    return ids[len(prompt):], accepted_per_step
