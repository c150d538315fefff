"""Corpus drafts (`NgramCorpus`): the table's rules, its file, and exact decoding with its drafts."""

from __future__ import annotations

import random

import pytest
import torch
from decoding_utils import EOS, PAD, forced_drafts, heads_model, padded_batch
from safetensors.torch import save_file
from tiny_models import VOCAB_SIZE

import peft_mtp.decoding.loop as loop
from peft_mtp.decoding import NgramCorpus
from peft_mtp.decoding.corpus import UNSURE

# ----------------------------------------------------------------------------------------------
# The table


def test_drafts_follow_the_longest_known_ngram_and_its_favourite_follower():
    corpus = NgramCorpus.from_sequences([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7], [9, 2, 3, 4, 5, 6]], min_ngram=2,
                                        max_ngram=3)
    assert corpus.followers[3][(2, 3, 4)] == 5  # 5, 7, 5: the favourite with 2 of 3
    assert (9, 2, 3) not in corpus.followers[3]  # seen once: below min_count=2
    assert corpus.draft([0, 2, 3], 10) == [4, 5, 6]  # (2, 3) -> 4, (2, 3, 4) -> 5, (3, 4, 5) -> 6, then nothing
    assert corpus.draft([0, 2, 3], 2) == [4, 5]
    assert corpus.draft([8, 8], 5) == []
    assert corpus.draft([3], 5) == []  # shorter than min_ngram


def test_an_evenly_split_ngram_ends_the_draft_instead_of_falling_back():
    # (1, 2, 3) is followed by 4 and by 5 equally often; (2, 3) alone would say 4 (three times against one).
    sequences = [[1, 2, 3, 4], [1, 2, 3, 5], [7, 2, 3, 4], [8, 2, 3, 4]]
    corpus = NgramCorpus.from_sequences(sequences, min_ngram=2, max_ngram=3, min_share=0.6)
    assert corpus.followers[3][(1, 2, 3)] == UNSURE
    assert corpus.followers[2][(2, 3)] == 4
    assert corpus.draft([1, 2, 3], 4) == []
    assert corpus.draft([9, 2, 3], 4) == [4]


@pytest.mark.parametrize("seed", range(3))
def test_table_survives_its_file_exactly(tmp_path, seed):
    rng = random.Random(seed)
    sequences = [[rng.randrange(6) for _ in range(rng.randrange(40))] for _ in range(30)]
    corpus = NgramCorpus.from_sequences(sequences, min_ngram=2, max_ngram=4, min_share=0.4)
    assert len(corpus) > 0
    corpus.save(tmp_path / "corpus.safetensors")
    loaded = NgramCorpus.load(tmp_path / "corpus.safetensors")
    assert loaded.followers == corpus.followers
    assert (loaded.min_ngram, loaded.max_ngram) == (2, 4)
    for sequence in sequences:
        assert loaded.draft(sequence, 6) == corpus.draft(sequence, 6)


def test_loading_a_file_that_is_not_a_table_names_the_fix(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an NgramCorpus table.*NgramCorpus.save"):
        NgramCorpus.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize(("kwargs", "message"), [({"min_ngram": 0}, "min_ngram"), ({"min_ngram": 4, "max_ngram": 3},
                                                                                     "min_ngram"),
                                                  ({"min_count": 0}, "min_count"), ({"min_share": 0.0}, "min_share")])
def test_invalid_table_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NgramCorpus.from_sequences([[1, 2, 3]], **kwargs)


# ----------------------------------------------------------------------------------------------
# Decoding with corpus drafts


def _plain(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, mtp_speculate=False,
                          **kwargs)


def _ours(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True, **kwargs)


@pytest.fixture
def no_prompt_lookup(monkeypatch):
    """Prompt lookup that never matches, so that every lookup draft comes from the corpus."""
    def never(sequences, starts, lengths, num_tokens, return_ngram=False, **kwargs):
        rows = sequences.shape[0]
        drafts, counts = torch.zeros(rows, num_tokens, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
        return (drafts, counts, counts.clone()) if return_ngram else (drafts, counts)

    monkeypatch.setattr(loop, "prompt_lookup", never)


@pytest.mark.parametrize("tree", [None, True])
def test_corpus_drafts_carry_the_step_when_the_heads_are_wrong(no_prompt_lookup, tree):
    model = heads_model("ffn", seed=6)
    ids, mask = padded_batch([3, 8, 5], seed=6)
    plain = _plain(model, ids, mask, max_new_tokens=30, eos_token_id=None)
    # A corpus that has seen these answers: its drafts are right wherever its n-grams are unambiguous.
    corpus = NgramCorpus.from_sequences(plain[:, ids.shape[1] :].tolist(), min_ngram=2, max_ngram=3, min_count=1)
    with forced_drafts(plain, quality={0: False, 1: False, 2: False}):
        out = _ours(model, ids, mask, max_new_tokens=30, eos_token_id=None, mtp_depth=2, mtp_tree=tree, mtp_lookup=8,
                    mtp_lookup_corpus=corpus)
        without = _ours(model, ids, mask, max_new_tokens=30, eos_token_id=None, mtp_depth=2, mtp_tree=tree,
                        mtp_lookup=8)
    assert torch.equal(out.sequences, plain) and torch.equal(without.sequences, plain)
    assert out.mtp_stats.lookup_won > 0 and out.mtp_stats.tokens_per_step > 1.5
    assert without.mtp_stats.lookup_proposed == 0


def test_wrong_corpus_drafts_leave_the_output_unchanged_eos_and_limits_included(no_prompt_lookup):
    model = heads_model("sequential", num_heads=2, seed=11)
    ids, mask = padded_batch([4, 9, 6, 2], seed=11)
    rng = random.Random(0)
    corpus = NgramCorpus.from_sequences([[rng.randrange(3, 40) for _ in range(400)] for _ in range(8)], min_ngram=1,
                                        max_ngram=2, min_count=1, min_share=0.1)
    generated = _plain(model, ids, mask, max_new_tokens=30, eos_token_id=None)[:, ids.shape[1] :]
    proposed = 0
    for eos in [None, EOS, *sorted(set(generated[:, 5:].flatten().tolist()))[:3]]:
        for max_new_tokens in (7, 30):
            plain = _plain(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos)
            out = _ours(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, mtp_lookup=10,
                        mtp_lookup_corpus=corpus)
            assert torch.equal(out.sequences, plain), (eos, max_new_tokens)
            proposed += out.mtp_stats.lookup_proposed
    assert proposed > 0


def test_the_corpus_fills_only_rows_whose_own_text_gave_no_match(monkeypatch):
    # 2-grams (5, t) go on with 7; every token t goes on with t + 1: a draft after "5, root" is 7, 8, 9.
    corpus = NgramCorpus({1: {(t,): (t + 1) % VOCAB_SIZE for t in range(VOCAB_SIZE)},
                          2: {(5, t): 7 for t in range(VOCAB_SIZE)}}, min_ngram=1, max_ngram=2)
    original = loop.prompt_lookup

    def row_zero_matches(sequences, starts, lengths, num_tokens, **kwargs):
        drafts, counts, ngram = original(sequences, starts, lengths, num_tokens, **kwargs)
        drafts[:], counts[:], ngram[:] = 0, 0, 0
        drafts[0, :2], counts[0], ngram[0] = 9, 2, 2  # row 0 found its own match; row 1 found none
        return drafts, counts, ngram

    calls = []
    original_lookup = loop.SpeculativeDecoder._lookup

    def record(self, *args):
        drafts, counts, strong = original_lookup(self, *args)
        if counts is not None:  # None: no row drafted (the last step has no room)
            calls.append((drafts.clone(), counts.clone()))
        return drafts, counts, strong

    monkeypatch.setattr(loop, "prompt_lookup", row_zero_matches)
    monkeypatch.setattr(loop.SpeculativeDecoder, "_lookup", record)
    model = heads_model("ffn", seed=3)
    ids = torch.tensor([[4, 4, 5], [3, 3, 5]])
    plain = _plain(model, ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=None)
    out = _ours(model, ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=None, mtp_depth=0, mtp_lookup=3,
                mtp_lookup_corpus=corpus)
    assert torch.equal(out.sequences, plain)
    drafts, counts = calls[0]  # the first step reads the prompt and the model's first token
    assert counts[0] == 2 and drafts[0, :2].tolist() == [9, 9]
    assert counts[1] == 3 and drafts[1].tolist() == corpus.draft(plain[1, :4].tolist(), 3)
    if plain[1, 3].item() != 5:  # (5, root) is the 2-gram the draft starts from
        assert drafts[1].tolist() == [7, 8, 9]


def test_an_invalid_corpus_option_names_it():
    model = heads_model("ffn", seed=17)
    with pytest.raises(ValueError, match="mtp_lookup_corpus.*NgramCorpus"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, mtp_lookup_corpus={1: 2})
