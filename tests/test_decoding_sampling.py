"""Speculative sampling draws from exactly the model's distribution (chi-square test against exact probabilities).

Many identical prompts are sampled in one batch (every row accepts or rejects on its own), and the
joint distribution of the first three new tokens is compared with the one computed exactly from the
model: p(t1) p(t2 | t1) p(t3 | t1, t2) after the same temperature and top-k. Seeds are fixed, so the
test is deterministic; a correct sampler fails it with probability 1e-3 over seeds.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from decoding_utils import PAD, heads_model
from tiny_models import VOCAB_SIZE
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from peft_mtp.decoding.loop import SpeculativeDecoder

PROMPT = [5, 9, 33, 71]
TEMPERATURE, TOP_K, SAMPLES = 1.3, 5, 2500


def exact_distribution(base, new_tokens: int = 3, prompt: list[int] = PROMPT):
    """Exact probabilities after `prompt` under temperature and top-k.

    Returns:
        The probability of every sequence of `new_tokens` tokens, and the next-token distribution
        `(V,)` after every shorter sequence (keyed by the new tokens so far).
    """
    warp = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K)])
    sequences, conditionals = {(): 1.0}, {}
    for _ in range(new_tokens):
        contexts = list(sequences)
        ids = torch.tensor([prompt + list(c) for c in contexts])
        with torch.no_grad():
            logits = base(ids).logits[:, -1].float()
        probs = torch.softmax(warp(ids, logits), dim=-1)
        conditionals.update(zip(contexts, probs))
        sequences = {
            context + (token,): sequences[context] * float(probs[i, token])
            for i, context in enumerate(contexts)
            for token in probs[i].nonzero()[:, 0].tolist()
        }
    return sequences, conditionals


def chi_square_p_value(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> float:
    """p-value of Pearson's chi-square test; cells expected fewer than 5 times are pooled."""
    counts = Counter(samples)
    assert set(counts) <= set(exact), "sampled a sequence the model gives probability 0"
    observed, expected, pooled_observed, pooled_expected = [], [], 0, 0.0
    for cell, probability in exact.items():
        if probability * len(samples) >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(probability * len(samples))
        else:
            pooled_observed += counts.get(cell, 0)
            pooled_expected += probability * len(samples)
    if pooled_expected > 0:
        observed.append(pooled_observed)
        expected.append(pooled_expected)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    # Chi-square survival function with k degrees of freedom: the regularised upper incomplete gamma Q(k/2, x/2).
    dof = torch.tensor(float(len(observed) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, torch.tensor(statistic, dtype=torch.float64) / 2))


def model_with_heads(head_type: str, **config):
    """A tiny model whose next-token distributions are peaked (scaled unembedding), so temperature matters."""
    model = heads_model(head_type, num_heads=2, seed=3, noise=0.05, **config)
    with torch.no_grad():
        model.base_model.model.get_output_embeddings().weight.mul_(20.0)  # logits of std ~2 instead of ~0.1
    return model


@contextlib.contextmanager
def drafts_near_the_model(conditionals):
    """Drafts from q = 0.6 p + 0.4 u (p: the model's exact next-token distribution, u: uniform on 8 tokens).

    Trained heads are close to the model but not equal to it; this gives such a q on a tiny model,
    so that drafts are often accepted and often rejected. Tree drafts take q's top candidates.
    """
    uniform = torch.zeros(VOCAB_SIZE)
    uniform[:8] = 1 / 8
    original = SpeculativeDecoder._draft

    def q(context):
        p = conditionals.get(context)
        return uniform if p is None else 0.6 * p + 0.4 * uniform

    def draft(self, tree, depth):
        if depth == 0:
            return original(self, tree, depth)
        contexts = [tuple(self.sequences[r, len(PROMPT): int(self.lengths[r])].tolist()) for r in self.rows.tolist()]
        if tree.is_chain:
            drafts, probs = [[] for _ in contexts], []
            for _ in range(depth):
                step = torch.stack([q(c + tuple(d)) for c, d in zip(contexts, drafts)])
                tokens = torch.multinomial(step, 1)[:, 0].tolist()
                for d, token in zip(drafts, tokens):
                    d.append(token)
                probs.append(step)
            return torch.cat([self.root[:, None], torch.tensor(drafts)], dim=1), torch.stack(probs, dim=1)
        first = torch.stack([q(c) for c in contexts])
        candidates = [first.topk(tree.topk[0]).indices]
        for k in range(1, tree.depth):  # deeper candidates follow the best candidate of the depth above
            best = candidates[-1][:, 0].tolist()
            candidates.append(torch.stack([q(c + (b,)) for c, b in zip(contexts, best)]).topk(tree.topk[k]).indices)
        return tree.node_tokens(self.root, candidates), None

    SpeculativeDecoder._draft = draft
    try:
        yield
    finally:
        SpeculativeDecoder._draft = original


def sample(model, temperature=TEMPERATURE, prompt=PROMPT, **kwargs):
    """The first three new tokens of SAMPLES rows, and the call's statistics.

    Four tokens are generated so that the first verify step has room for two drafts (the prefill emits one
    token); the first three tokens' joint distribution is still exactly the model's.
    """
    torch.manual_seed(1234)
    out = model.generate(torch.tensor([prompt]).expand(SAMPLES, -1), do_sample=True, temperature=temperature,
                         top_k=TOP_K, max_new_tokens=4, eos_token_id=None, pad_token_id=PAD, mtp_depth=2,
                         return_dict_in_generate=True, **kwargs)
    assert out.mtp_stats.depth_steps.get(2, 0) > 0  # depth-2 drafts were verified
    return [tuple(row[:3]) for row in out.sequences[:, len(prompt):].tolist()], out.mtp_stats


@pytest.mark.parametrize("tree", [None, True], ids=["chain", "tree"])
def test_sampling_with_drafts_near_the_model_is_exact(tree):
    model = model_with_heads("ffn")
    exact, conditionals = exact_distribution(model.base_model.model)
    with drafts_near_the_model(conditionals):
        samples, stats = sample(model, mtp_tree=tree)
    assert chi_square_p_value(samples, exact) > 1e-3
    # Both branches ran: drafts were often accepted and often rejected.
    assert 0.2 < stats.acceptance_rate[0] < 0.9


@pytest.mark.parametrize(("head_type", "tree"), [("ffn", None), ("sequential", None), ("sequential", True)],
                         ids=["ffn", "sequential", "sequential-tree"])
def test_sampling_with_real_heads_is_exact(head_type, tree):
    model = model_with_heads(head_type)
    exact, _ = exact_distribution(model.base_model.model)
    samples, stats = sample(model, mtp_tree=tree)
    assert chi_square_p_value(samples, exact) > 1e-3
    assert stats.proposed[0] > 0


def test_sampling_with_lookup_drafts_is_exact():
    # A prompt that repeats itself, so that lookup drafts are proposed at every step and sometimes sampled.
    prompt = [5, 9, 33, 5, 9, 33, 5, 9]
    model = model_with_heads("ffn")
    exact, _ = exact_distribution(model.base_model.model, prompt=prompt)
    samples, stats = sample(model, prompt=prompt, mtp_lookup=3, mtp_lookup_ngram=1)  # single-token matches too
    assert chi_square_p_value(samples, exact) > 1e-3
    assert stats.lookup_proposed > 0 and stats.lookup_won > 0


def test_sampling_stays_exact_when_a_lookup_draft_repeats_a_head_draft(monkeypatch):
    # Every step's lookup branch starts with head 1's own draft, then a likely token other than head 2's draft:
    # two nodes with the same token under the root, where following the deeper accepted path after sampling
    # below both would favour the branch's second token as the third token.
    import peft_mtp.decoding.loop as loop

    model = model_with_heads("ffn")
    exact, conditionals = exact_distribution(model.base_model.model)
    heads = {}

    def draft(self, tree, depth):
        tokens, probs = near_the_model(self, tree, depth)
        heads["tokens"] = None
        if depth >= 2:
            # Point-mass drafts (exact under speculative sampling too): head 1 the model's likeliest token, so
            # that it is often accepted; head 2 the likeliest token after it, so that the lookup branch's own
            # second token (a different one) can win.
            tokens, probs = tokens.clone(), torch.zeros_like(probs)
            for r, first in enumerate(tokens[:, 0].tolist()):
                d1 = int(conditionals[(first,)].argmax())
                tokens[r, 1], tokens[r, 2] = d1, int(conditionals[(first, d1)].argmax())
            probs[:, 0] = torch.nn.functional.one_hot(tokens[:, 1], probs.shape[-1]).to(probs.dtype)
            probs[:, 1] = torch.nn.functional.one_hot(tokens[:, 2], probs.shape[-1]).to(probs.dtype)
            heads["tokens"] = tokens
        return tokens, probs

    def lookup(sequences, starts, lengths, num_tokens, max_ngram, min_ngram, return_ngram=False):
        found = find(sequences, lengths, num_tokens)
        return (*found, torch.where(found[1] > 0, 2, 0)) if return_ngram else found  # 2-token matches

    def find(sequences, lengths, num_tokens):
        rows = sequences.shape[0]
        drafts, counts = torch.zeros(rows, num_tokens, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
        if heads["tokens"] is None or num_tokens < 2:
            return drafts, counts
        for r in range(rows):
            first = sequences[r, lengths[r] - 1].item()  # the root: the first new token
            d1, d2 = heads["tokens"][r, 1].item(), heads["tokens"][r, 2].item()
            if (first, d1) not in conditionals:  # a draft the model cannot sample: no duplicate to make
                continue
            ranked = conditionals[(first, d1)].argsort(descending=True).tolist()
            drafts[r, 0], drafts[r, 1] = d1, next(t for t in ranked if t != d2)
            counts[r] = 2
        return drafts, counts

    monkeypatch.setattr(loop, "prompt_lookup", lookup)
    with drafts_near_the_model(conditionals):  # head drafts the model often samples: duplicates get accepted
        near_the_model = SpeculativeDecoder._draft
        SpeculativeDecoder._draft = draft
        try:
            samples, stats = sample(model, mtp_lookup=3)
        finally:
            SpeculativeDecoder._draft = near_the_model
    assert chi_square_p_value(samples, exact) > 1e-3


def test_a_biased_sampler_fails_the_test():
    """The test has power: sampling at a slightly wrong temperature is caught."""
    model = model_with_heads("ffn")
    exact, _ = exact_distribution(model.base_model.model)
    samples, _ = sample(model, temperature=TEMPERATURE * 0.8)
    assert chi_square_p_value(samples, exact) < 1e-3
