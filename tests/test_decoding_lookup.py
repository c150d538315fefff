"""Prompt-lookup drafts: the batched matcher, the lookup branch of a draft tree, and exact decoding with it."""

from __future__ import annotations

import random

import pytest
import torch
from decoding_utils import EOS, PAD, forced_drafts, heads_model, padded_batch

from peft_mtp.decoding import DraftTree, default_chain_tree_paths
from peft_mtp.decoding.lookup import prompt_lookup
from peft_mtp.decoding.loop import SpeculativeDecoder
from peft_mtp.decoding.tree import LOOKUP


def naive_lookup(tokens: list[int], num_tokens: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """The longest n-gram's earliest earlier occurrence, and up to `num_tokens` tokens after it."""
    for n in range(max_ngram, min_ngram - 1, -1):
        for i in range(len(tokens) - n):
            if tokens[i : i + n] == tokens[len(tokens) - n :]:
                return tokens[i + n : i + n + num_tokens]
    return []


# ----------------------------------------------------------------------------------------------
# The matcher


@pytest.mark.parametrize("seed", range(6))
def test_batched_matcher_agrees_with_the_obvious_loop(seed):
    rng = random.Random(seed)
    rows = [[rng.randrange(5) for _ in range(rng.randrange(0, 30))] for _ in range(7)]  # a small alphabet: matches
    pads = [rng.randrange(4) for _ in rows]
    width = max(p + len(r) for p, r in zip(pads, rows)) + 3  # columns past each row's end hold junk
    sequences = torch.full((len(rows), width), 9)
    for i, (pad, row) in enumerate(zip(pads, rows)):
        sequences[i, :pad] = PAD
        sequences[i, pad : pad + len(row)] = torch.tensor(row, dtype=torch.long)
    starts = torch.tensor(pads)
    lengths = torch.tensor([p + len(r) for p, r in zip(pads, rows)])
    for num_tokens, max_ngram, min_ngram in ((4, 3, 1), (10, 2, 1), (3, 3, 2), (1, 1, 1)):
        drafts, counts = prompt_lookup(sequences, starts, lengths, num_tokens, max_ngram, min_ngram)
        for i, row in enumerate(rows):
            expected = naive_lookup(row, num_tokens, max_ngram, min_ngram)
            assert drafts[i, : counts[i]].tolist() == expected, (i, row, num_tokens, max_ngram, min_ngram)
            assert drafts[i, counts[i] :].eq(0).all()


def test_matcher_reports_the_length_of_each_rows_match():
    rows = [[1, 2, 3, 7, 1, 2, 3], [1, 2, 3, 7, 5, 2, 3], [1, 2, 3, 7, 5, 6, 9]]  # a 3-gram, a 2-gram, none
    sequences, lengths = torch.tensor(rows), torch.tensor([7, 7, 7])
    drafts, counts, ngram = prompt_lookup(sequences, torch.zeros(3, dtype=torch.long), lengths, 2, 3, 2,
                                          return_ngram=True)
    assert ngram.tolist() == [3, 2, 0] and counts.tolist() == [2, 2, 0]
    assert torch.equal(drafts, prompt_lookup(sequences, torch.zeros(3, dtype=torch.long), lengths, 2, 3, 2)[0])


def test_matcher_prefers_the_longest_ngram_then_the_earliest_place():
    #            0  1  2  3  4  5  6  7  8  9
    row = [1, 2, 3, 7, 2, 3, 8, 9, 2, 3]  # "2 3" occurs at 1 and 4; "9 2 3" nowhere before; "3" at 2 first
    drafts, counts = prompt_lookup(torch.tensor([row]), torch.tensor([0]), torch.tensor([len(row)]), 3, 3)
    assert drafts[0, : counts[0]].tolist() == [7, 2, 3]  # after the first "2 3"
    row = [4, 5, 6, 1, 5, 6, 2, 1, 5, 6]  # now "1 5 6" occurs at 3: the 3-gram wins over the earlier "5 6"
    drafts, counts = prompt_lookup(torch.tensor([row]), torch.tensor([0]), torch.tensor([len(row)]), 3, 3)
    assert drafts[0, : counts[0]].tolist() == [2, 1, 5]


def test_matcher_never_reads_padding_or_past_a_row():
    sequences = torch.tensor([[7, 7, 7, 1, 2, 7], [3, 4, 3, 0, 0, 0]])  # row 0: 3 pads of token 7; row 1 ends at 3
    drafts, counts = prompt_lookup(sequences, torch.tensor([3, 0]), torch.tensor([6, 3]), 4, 2)
    assert counts.tolist() == [0, 2]  # row 0's "7" only occurs in its padding
    assert drafts[1, :2].tolist() == [4, 3]  # row 1: "3" at 0, then 4 3 (never the zeros past its end)


# ----------------------------------------------------------------------------------------------
# The lookup branch of a tree


def test_lookup_branch_comes_after_the_head_nodes_as_a_chain_under_the_root():
    heads = DraftTree.from_paths(default_chain_tree_paths(2), 2)
    tree = heads.with_lookup(3)
    assert tree.num_nodes == heads.num_nodes + 3 and tree.lookup_length == 3
    assert tree.paths[-3:] == [(LOOKUP,), (LOOKUP, LOOKUP), (LOOKUP, LOOKUP, LOOKUP)]
    assert tree.parents[-3:].tolist() == [0, heads.num_nodes, heads.num_nodes + 1]
    assert tree.depths[-3:].tolist() == [1, 2, 3]
    assert tree.topk == heads.topk and tree.depth == 2 and tree.max_node_depth == 3 and not tree.is_chain
    assert torch.equal(tree.ancestor_mask[: heads.num_nodes, : heads.num_nodes], heads.ancestor_mask)
    assert not tree.ancestor_mask[heads.num_nodes :, 1 : heads.num_nodes].any()  # the branch reads no head node
    only_lookup = DraftTree.from_paths([], 2).with_lookup(4)
    assert only_lookup.is_chain and only_lookup.depth == 0 and only_lookup.num_nodes == 5


def test_a_lookup_branch_can_hang_from_the_heads_best_chain():
    heads = DraftTree.from_paths(default_chain_tree_paths(2), 2)  # root, (0,), (1,), (2,), (0, 0), (0, 1)
    tree = heads.with_lookup(3, start=1)
    assert tree.paths[-3:] == [(0, LOOKUP), (0, LOOKUP, LOOKUP), (0, LOOKUP, LOOKUP, LOOKUP)]
    assert tree.parents[-3:].tolist() == [1, heads.num_nodes, heads.num_nodes + 1]
    assert tree.depths[-3:].tolist() == [2, 3, 4] and tree.max_node_depth == 4 and tree.lookup_start == 1
    assert tree.ancestor_mask[-1].nonzero()[:, 0].tolist() == [0, 1, 6, 7, 8]  # root, (0,), then the branch
    # A branch below the end of a chain makes a longer chain, verified with the causal mask.
    chain = DraftTree.from_paths([(0,), (0, 0)], 2).with_lookup(2, start=2)
    assert chain.is_chain and chain.depths.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"no node \(0,\) \(depth 1\)"):
        DraftTree.from_paths([(1,)], 1).with_lookup(2, start=1)


def test_a_branch_under_the_chain_counts_lookup_drafts_from_the_root():
    tree = DraftTree.from_paths([(0,), (1,), (0, 0)], 2).with_lookup(2, start=1)
    # nodes: root 10, (0,) 11, (1,) 12, (0, 0) 20, then the branch 12, 13 under (0,): lookup drafts 11, 12, 13
    tokens = torch.tensor([[10, 11, 12, 20, 12, 13]] * 2)
    choices = torch.tensor([[11, 12, 0, 0, 13, 14]] * 2)
    node, heads, lookup = tree.accept_by_source(tokens, choices, lookup_counts=torch.tensor([3, 2]))
    assert node.tolist() == [5, 4] and heads.tolist() == [1, 1] and lookup.tolist() == [3, 2]
    path, keep = tree.path_to(node)
    assert path[0].tolist() == [0, 1, 4, 5] and keep.tolist() == [4, 3]


def test_a_tree_takes_one_lookup_branch_only():
    with pytest.raises(ValueError, match="already has a lookup branch"):
        DraftTree.from_paths([(0,)], 1).with_lookup(2).with_lookup(2)


def test_nodes_past_a_rows_room_are_never_accepted():
    tree = DraftTree.from_paths([(0,), (0, 0)], 2).with_lookup(3)
    tokens = torch.tensor([[10, 11, 12, 11, 12, 13]] * 2)
    choices = torch.tensor([[11, 12, 13, 12, 13, 14]] * 2)  # every draft is right
    node, heads, lookup = tree.accept_by_source(tokens, choices, depth_limit=torch.tensor([3, 1]))
    assert heads.tolist() == [2, 1] and lookup.tolist() == [3, 1]


def test_lookup_nodes_win_when_deeper_and_filler_never_counts():
    tree = DraftTree.from_paths([(0,), (1,)], 1).with_lookup(3)  # nodes: root, (0,), (1,), L1, L2, L3
    tokens = torch.tensor([[10, 11, 12, 12, 13, 14], [10, 11, 12, 12, 13, 14]])
    choices = torch.tensor([[12, 0, 13, 13, 14, 0], [12, 0, 13, 13, 14, 0]])  # the model: 12, 13, 14 after the root
    node, heads, lookup = tree.accept_by_source(tokens, choices, lookup_counts=torch.tensor([3, 1]))
    assert heads.tolist() == [1, 1]  # head candidate (1,) = 12 was right in both rows
    assert lookup.tolist() == [3, 1]  # row 1 has one real lookup draft: its branch stops there
    assert node.tolist() == [5, 2]  # row 0: the branch's end; row 1: the head node (a tie goes to node order)
    path, keep = tree.path_to(node)
    assert keep.tolist() == [4, 2] and path[0].tolist() == [0, 3, 4, 5]


# ----------------------------------------------------------------------------------------------
# Decoding with lookup drafts


def _plain(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, mtp_speculate=False,
                          **kwargs)


def _ours(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True, **kwargs)


def test_lookup_drafts_carry_the_step_when_the_heads_are_wrong():
    # Tiny random models fall into loops, which lookup drafts copy; the heads here never draft a right token.
    model = heads_model("ffn", seed=6)
    ids, mask = padded_batch([3, 8, 5], seed=6)
    plain = _plain(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    with forced_drafts(plain, quality={0: False, 1: False, 2: False}):
        out = _ours(model, ids, mask, max_new_tokens=40, eos_token_id=None, mtp_depth=2, mtp_lookup=6)
    stats = out.mtp_stats
    assert torch.equal(out.sequences, plain)
    assert stats.acceptance_rate == [0.0, 0.0, 0.0]
    assert stats.lookup_won > 0 and stats.lookup_tokens >= stats.lookup_won
    assert stats.tokens_per_step == pytest.approx(1 + stats.lookup_tokens / stats.row_steps)
    off = _ours(model, ids, mask, max_new_tokens=40, eos_token_id=None, mtp_depth=2, mtp_lookup=0).mtp_stats
    assert off.lookup_proposed == 0 and off.lookup_won == 0


def _record_passes(monkeypatch) -> list:
    """Record every verify pass of the decodes that follow: (what `_lookup` returned, tokens fed, tree)."""
    passes, found = [], []
    original_lookup, original_verify = SpeculativeDecoder._lookup, SpeculativeDecoder._verify

    def lookup(self, *args):
        found.append(original_lookup(self, *args))
        return found[-1]

    def verify(self, tokens, tree):
        assert tokens.shape[1] == tree.num_nodes
        passes.append((found.pop() if found else (None, None, False), tokens, tree))
        return original_verify(self, tokens, tree)

    monkeypatch.setattr(SpeculativeDecoder, "_lookup", lookup)
    monkeypatch.setattr(SpeculativeDecoder, "_verify", verify)
    return passes


def test_a_strong_lookup_branch_is_verified_beside_the_heads_best_chain_only(monkeypatch):
    # Beside a branch from a 3-gram match the heads' runner-up candidates are left out of the pass; beside a
    # 2-gram one the whole tree is verified. Either way the output is plain greedy's.
    model = heads_model("sequential", seed=6)
    ids, mask = padded_batch([3, 8, 5], seed=6)
    passes = _record_passes(monkeypatch)
    for row in range(3):
        plain = _plain(model, ids[row:row + 1], mask[row:row + 1], max_new_tokens=40, eos_token_id=None)
        out = _ours(model, ids[row:row + 1], mask[row:row + 1], max_new_tokens=40, eos_token_id=None, mtp_depth=2,
                    mtp_tree=True)
        assert torch.equal(out.sequences, plain)
    whole_tree = {0: 1, 1: 4, 2: 6}  # nodes of the default tree of 2 sequential heads at each depth, root included
    kinds = set()
    for (_, counts, is_strong), _, tree in passes:
        head_nodes = tree.num_nodes - tree.lookup_length
        branch = counts is not None
        assert head_nodes == (tree.depth + 1 if is_strong and branch else whole_tree[tree.depth])  # chain: root + drafts
        if branch:
            kinds.add((is_strong, tree.depth))
    assert {(True, 2), (False, 2)} <= kinds  # both kinds of branch met at full depth


def _branch_starts(passes) -> list[int]:
    """Check every recorded pass's lookup branch against its drafts; return the depth each branch hung from.

    The drafts every row shares with the heads' best chain sit on the chain, the rest on the branch, and
    the branch hangs as deep as every row with drafts allows (the shortest shared prefix among them).
    """
    starts = []
    for (drafts, counts, _), tokens, tree in passes:
        if counts is None:
            continue
        start, length = tree.lookup_start, tree.lookup_length
        chain = [i for i, path in enumerate(tree.paths) if path and not any(path)]  # the heads' best chain
        shared = []
        for row in (counts > 0).nonzero()[:, 0].tolist():
            count = int(counts[row])
            same = 0
            while same < min(len(chain), count) and int(tokens[row, chain[same]]) == int(drafts[row, same]):
                same += 1
            shared.append(same)
            if length:
                assert tokens[row, tree.num_nodes - length :].tolist() == drafts[row, start : start + length].tolist()
        start = start if length else int(counts.max())  # a branch wholly on the chain leaves no node of its own
        assert start == min(shared)
        starts.append(start)
    return starts


def test_lookup_drafts_that_repeat_the_heads_chain_are_verified_once(monkeypatch):
    # With perfect heads the lookup branch, when right, starts with the heads' own drafts: it hangs from the
    # chain node that holds its last shared draft, and no token is fed twice at the same place.
    model = heads_model("sequential", seed=6)
    ids, mask = padded_batch([3, 8, 5], seed=6)
    passes = _record_passes(monkeypatch)
    plain = _plain(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    for row in range(3):
        with forced_drafts(plain[row:row + 1]):
            out = _ours(model, ids[row:row + 1], mask[row:row + 1], max_new_tokens=40, eos_token_id=None,
                        mtp_depth=2, mtp_tree=True)
        assert torch.equal(out.sequences, plain[row:row + 1])
    starts = _branch_starts(passes)
    assert max(starts) >= 1 and 0 in starts


def test_in_a_batch_the_branch_hangs_as_deep_as_every_row_allows(monkeypatch):
    # Rows with right and wrong heads, and rows whose lookup finds nothing, share one tree per pass.
    model = heads_model("ffn", seed=6)
    ids, mask = padded_batch([3, 8, 5, 6], seed=6)
    passes = _record_passes(monkeypatch)
    plain = _plain(model, ids, mask, max_new_tokens=40, eos_token_id=None)
    for quality in ({0: True, 1: True, 2: True, 3: True}, {0: True, 1: False, 2: True, 3: False}):
        with forced_drafts(plain, quality=quality):
            out = _ours(model, ids, mask, max_new_tokens=40, eos_token_id=None, mtp_depth=3, mtp_tree=True,
                        mtp_lookup=6)
        assert torch.equal(out.sequences, plain)
    starts = _branch_starts(passes)
    assert max(starts) >= 1 and 0 in starts
    assert any(len(counts) > 1 and (counts == 0).any() for (_, counts, _), _, _ in passes if counts is not None)


def test_eos_and_max_new_tokens_inside_an_accepted_lookup_draft():
    model = heads_model("ffn", seed=6)
    ids, mask = padded_batch([3, 8, 5], seed=6)
    generated = _plain(model, ids, mask, max_new_tokens=40, eos_token_id=None)[:, ids.shape[1] :]
    won = 0
    for eos in sorted(set(generated[:, 10:].flatten().tolist()))[:6]:  # tokens that also occur late in a row
        for max_new_tokens in (13, 17, 40):
            plain = _plain(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos)
            out = _ours(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, mtp_depth=2, mtp_lookup=10)
            assert torch.equal(out.sequences, plain), (eos, max_new_tokens)
            won += out.mtp_stats.lookup_won
    assert won > 0


def test_automatic_lookup_drafts_for_a_single_greedy_row_only(monkeypatch):
    model = heads_model("ffn", seed=6)
    ids, mask = padded_batch([3, 8, 5], seed=6)
    rows_when_matching = []
    original = SpeculativeDecoder._lookup

    def lookup(self, *args):
        rows_when_matching.append(self.rows.numel())
        return original(self, *args)

    monkeypatch.setattr(SpeculativeDecoder, "_lookup", lookup)
    for eos in (None, EOS):  # rows stop together, or one by one (the last one alone)
        plain = _plain(model, ids, mask, max_new_tokens=30, eos_token_id=eos)
        batched = _ours(model, ids, mask, max_new_tokens=30, eos_token_id=eos, mtp_depth=2)
        assert torch.equal(batched.sequences, plain)
        assert set(rows_when_matching) <= {1}
    forced = _ours(model, ids, mask, max_new_tokens=30, eos_token_id=EOS, mtp_depth=2, mtp_lookup=10)
    assert torch.equal(forced.sequences, plain) and forced.mtp_stats.lookup_proposed > 0
    assert max(rows_when_matching) == 3
    plain = _plain(model, ids[1:2], mask[1:2], max_new_tokens=30, eos_token_id=None)
    alone = _ours(model, ids[1:2], mask[1:2], max_new_tokens=30, eos_token_id=None, mtp_depth=2)
    assert torch.equal(alone.sequences, plain) and alone.mtp_stats.lookup_proposed > 0
    torch.manual_seed(0)
    sampled = model.generate(input_ids=ids[1:2], attention_mask=mask[1:2], do_sample=True, max_new_tokens=30,
                             pad_token_id=PAD, return_dict_in_generate=True)
    assert sampled.mtp_stats.lookup_proposed == 0  # sampling: only with `mtp_lookup` set


def test_lookup_alone_without_heads_drafting():
    model = heads_model("sequential", seed=6)
    ids, mask = padded_batch([3, 8, 5], seed=6)
    plain = _plain(model, ids, mask, max_new_tokens=30, eos_token_id=EOS)
    out = _ours(model, ids, mask, max_new_tokens=30, eos_token_id=EOS, mtp_depth=0, mtp_lookup=10)
    assert torch.equal(out.sequences, plain)
    assert out.mtp_stats.proposed == [0, 0, 0] and out.mtp_stats.lookup_won > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mtp_lookup": -1}, "mtp_lookup"),
        ({"mtp_lookup": True}, "mtp_lookup"),
        ({"mtp_lookup": "10"}, "mtp_lookup"),
        ({"mtp_lookup_ngram": 0}, "mtp_lookup_ngram"),
        ({"mtp_lookup_ngram": True}, "mtp_lookup_ngram"),
        ({"mtp_lookup_ngram": "3"}, "mtp_lookup_ngram"),
    ],
)
def test_invalid_lookup_options_name_the_option(kwargs, message):
    model = heads_model("ffn", seed=17)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, **kwargs)


def test_attention_without_tree_masks_turns_the_default_lookup_off_and_refuses_an_explicit_one(monkeypatch):
    import peft_mtp.decoding.loop as loop

    model = heads_model("ffn", seed=6)
    ids, mask = padded_batch([3, 8, 5], seed=6)
    plain = _plain(model, ids, mask, max_new_tokens=30, eos_token_id=None)
    monkeypatch.setattr(loop, "_takes_tree_masks", lambda model: False)  # as for flash or flex attention
    out = _ours(model, ids, mask, max_new_tokens=30, eos_token_id=None, mtp_depth=2)
    assert torch.equal(out.sequences, plain)
    assert out.mtp_stats.lookup_proposed == 0
    with pytest.raises(ValueError, match="mtp_lookup=0"):
        _ours(model, ids, mask, max_new_tokens=30, eos_token_id=None, mtp_lookup=4)
