"""Speculative decoding with MTP heads gives exactly the tokens of plain greedy decoding.

Plain decoding is `generate(..., mtp_speculate=False)`: transformers' own loop, heads unused. Every
test compares against it, or against the readable reference loop (`peft_mtp.decoding.reference`).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from decoding_utils import EOS, PAD, char_tokenizer, forced_drafts, heads_model, padded_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import ARCHITECTURES
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from peft_mtp import HEAD_TYPES
from peft_mtp.decoding import DraftTree, SpeculationStats, default_chain_tree_paths, reference_generate
from peft_mtp.decoding.loop import SpeculativeDecoder

PARALLEL_HEAD_TYPES = tuple(h for h in HEAD_TYPES if h != "sequential")


def greedy(model, ids, mask=None, **kwargs):
    """Plain and speculative greedy outputs of the same call."""
    common = dict(do_sample=False, pad_token_id=PAD, **{k: v for k, v in kwargs.items() if not k.startswith("mtp_")})
    plain = model.generate(input_ids=ids, attention_mask=mask, mtp_speculate=False, **common)
    ours = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True,
                          **{k: v for k, v in kwargs.items() if k.startswith("mtp_")}, **common)
    return plain, ours.sequences, ours.mtp_stats


# ----------------------------------------------------------------------------------------------
# Identity with plain greedy decoding


# derandomize: the same 30 examples in every run, so that CI fails only for a change, never for a new draw.
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    head_type=st.sampled_from(HEAD_TYPES),
    num_heads=st.integers(1, 3),
    depth=st.one_of(st.integers(0, 3), st.just("auto")),
    tree=st.booleans(),
    lookup=st.sampled_from([None, 0, 1, 4, 10]),
    lookup_ngram=st.integers(1, 3),
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    max_new_tokens=st.integers(1, 24),
    use_eos=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_identical_to_plain_greedy(head_type, num_heads, depth, tree, lookup, lookup_ngram, lengths, max_new_tokens,
                                   use_eos, seed):
    model = heads_model(head_type, num_heads=num_heads, seed=seed % 7, dtype=torch.float32)
    depth = depth if depth == "auto" else min(depth, num_heads)
    ids, mask = padded_batch(lengths, seed=seed)
    plain, ours, stats = greedy(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=EOS if use_eos else None,
                                mtp_depth=depth, mtp_tree=tree or None, mtp_lookup=lookup,
                                mtp_lookup_ngram=lookup_ngram)
    assert torch.equal(plain, ours)
    assert stats.new_tokens <= len(lengths) * max_new_tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture(arch):
    # Position-wise heads with chains and trees (trees take a 4-D mask, and sliding windows where the model has
    # them), and the two head types built from the architecture's own decoder layers.
    ids, mask = padded_batch([4, 6], seed=2)
    for head_type, tree in (("ffn", None), ("ffn", True), ("identical", None), ("sequential", None),
                            ("sequential", True)):
        model = heads_model(head_type, num_heads=2, arch=arch, seed=1)
        plain, ours, _ = greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None, mtp_depth=2, mtp_tree=tree)
        assert torch.equal(plain, ours), (arch, head_type, tree)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_untrained_random_heads_are_still_exact(head_type):
    model = heads_model(head_type, head_init="random", noise=0.0, seed=3)
    ids, mask = padded_batch([7, 3], seed=3)
    plain, ours, _ = greedy(model, ids, mask, max_new_tokens=16, eos_token_id=None, mtp_depth=3)
    assert torch.equal(plain, ours)


def test_drafts_that_are_always_wrong_cost_correctness_nothing():
    model = heads_model("ffn", seed=3)
    ids, mask = padded_batch([7, 3], seed=3)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD, mtp_speculate=False)
    for tree in (None, True):
        with forced_drafts(plain, quality={0: False, 1: False}):
            _, ours, stats = greedy(model, ids, mask, max_new_tokens=16, eos_token_id=None, mtp_depth=3, mtp_tree=tree,
                                    mtp_lookup=0)  # the heads' drafts alone
        assert torch.equal(plain, ours)
        assert stats.acceptance_rate == [0.0, 0.0, 0.0]
        assert stats.tokens_per_step == 1.0


def test_logits_processors_apply_at_every_verified_position():
    model = heads_model("ffn", seed=4)
    ids, mask = padded_batch([5, 8, 2], seed=4)
    kwargs = dict(max_new_tokens=20, eos_token_id=EOS, min_new_tokens=6, repetition_penalty=1.8,
                  no_repeat_ngram_size=2, suppress_tokens=[5, 6])
    for tree in (None, True):
        plain, ours, _ = greedy(model, ids, mask, mtp_depth=3, mtp_tree=tree, **kwargs)
        assert torch.equal(plain, ours)


# ----------------------------------------------------------------------------------------------
# Against the reference loop: same tokens, same number of accepted drafts at every step


TREE = [(0,), (1,), (0, 0), (1, 0), (0, 1), (0, 0, 0)]
CHAIN_TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 1)]  # branches on the best chain only


@pytest.mark.parametrize(
    ("head_type", "tree"),
    [(head_type, None) for head_type in HEAD_TYPES] + [(head_type, TREE) for head_type in ("ffn", "cnn", "identical")]
    + [("sequential", CHAIN_TREE)],
)
@pytest.mark.parametrize("lookup", [0, 10])
def test_matches_reference_loop(head_type, tree, lookup):
    # float64: the two loops round differently, so near-ties could otherwise flip a draft.
    model = heads_model(head_type, seed=5, dtype=torch.float64, noise=0.03)
    prompt = [11, 42, 7, 99, 5, 63, 18]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         mtp_depth=3, mtp_tree=tree, mtp_lookup=lookup, mtp_trace=True, return_dict_in_generate=True)
    tokens, accepted = reference_generate(model.base_model, prompt, 12, depth=3, tree=tree, lookup=lookup)
    assert out.sequences[0, len(prompt):].tolist() == tokens
    assert [step[0][1] for step in out.mtp_stats.trace] == accepted


@pytest.mark.parametrize("lookup", [0, 10])
def test_batched_rows_match_the_reference_row_by_row(lookup):
    model = heads_model("mha_ffn", seed=6, noise=0.03)
    lengths = [3, 8, 5]
    ids, mask = padded_batch(lengths, seed=6)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False, eos_token_id=None,
                         pad_token_id=PAD, mtp_depth=2, mtp_lookup=lookup, mtp_trace=True,
                         return_dict_in_generate=True)
    for row, length in enumerate(lengths):
        prompt = ids[row, ids.shape[1] - length:].tolist()
        tokens, accepted = reference_generate(model.base_model, prompt, 15, depth=2, lookup=lookup)
        assert out.sequences[row, ids.shape[1]:].tolist() == tokens
        assert [a for step in out.mtp_stats.trace for r, a in step if r == row] == accepted


@contextlib.contextmanager
def after_every_step(monkeypatch, check):
    """Call `check(decoder, verified_tokens_of_row_0)` after every decoding step; yields the verified lengths seen."""
    checked = []
    original_step = SpeculativeDecoder._step

    def checked_step(self):
        original_step(self)
        if self.rows.numel():
            verified = self.sequences[0, : int(self.lengths[0])]
            check(self, verified)
            checked.append(verified.numel())

    monkeypatch.setattr(SpeculativeDecoder, "_step", checked_step)
    yield checked


# ----------------------------------------------------------------------------------------------
# Heads that read lower trunk layers (`feature_layers`)


def _feature_heads_model(head_type: str, dtype: torch.dtype = torch.float32):
    """Heads whose input depends strongly on trunk layer 0's output (a large random fusion projection)."""
    model = heads_model(head_type, num_heads=2, seed=9, dtype=dtype, noise=0.03, feature_layers=[0])
    with torch.no_grad():
        fusion = model.base_model.active_heads().fusion
        fusion.proj.weight.copy_(torch.randn_like(fusion.proj.weight) * 0.5)
    return model


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_heads_with_feature_layers_decode_exactly(head_type):
    model = _feature_heads_model(head_type)
    ids, mask = padded_batch([3, 9, 6], seed=9)
    for tree in (None, True):
        plain, ours, _ = greedy(model, ids, mask, max_new_tokens=18, eos_token_id=None, mtp_depth=2, mtp_tree=tree,
                                mtp_lookup=4)
        assert torch.equal(plain, ours)
    model = _feature_heads_model(head_type, dtype=torch.float64)
    prompt = [11, 42, 7, 99, 5, 63, 18]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         mtp_depth=2, mtp_lookup=0, mtp_trace=True, return_dict_in_generate=True)
    tokens, accepted = reference_generate(model.base_model, prompt, 12, depth=2)
    assert out.sequences[0, len(prompt):].tolist() == tokens
    assert [step[0][1] for step in out.mtp_stats.trace] == accepted


@pytest.mark.parametrize("head_type", PARALLEL_HEAD_TYPES)
def test_drafts_from_feature_layers_equal_the_heads_of_a_full_forward(head_type, monkeypatch):
    # While decoding, the heads' input is fused from the verify pass's layer outputs, one step at a time; a full
    # forward over the verified tokens must give the same head logits at the last position the trunk has seen.
    model = _feature_heads_model(head_type, dtype=torch.float64)

    def check(decoder, verified):
        drafted = decoder.drafter.head_logits(2)[0]  # (K, V): heads at the last fed position
        expected = model(input_ids=verified[None, :-1], output_mtp_logits=True).mtp_logits[0, -1]
        torch.testing.assert_close(drafted, expected)

    with torch.no_grad(), after_every_step(monkeypatch, check) as checked:
        model.generate(torch.tensor([[9, 8, 7, 6, 5, 4]]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                       mtp_depth=2, mtp_tree=True, mtp_lookup=0)
    assert len(checked) >= 3


# ----------------------------------------------------------------------------------------------
# Perfect drafts (100% acceptance), eos and max_new_tokens inside an accepted draft


def test_perfect_drafts_are_all_accepted():
    model = heads_model("ffn", seed=7)
    ids, mask = padded_batch([6, 4], seed=7)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=21, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD, mtp_speculate=False)
    with forced_drafts(plain):
        _, ours, stats = greedy(model, ids, mask, max_new_tokens=21, eos_token_id=None, mtp_depth=3, mtp_lookup=0)
    assert torch.equal(plain, ours)
    assert stats.acceptance_rate == [1.0, 1.0, 1.0]
    assert stats.verify_steps == 5  # 1 token from the prefill, then 4 per step
    assert stats.tokens_per_step == 4.0


@pytest.mark.parametrize("rank", [0, 1])
def test_perfect_tree_drafts_follow_the_right_branch(rank):
    model = heads_model("ffn", seed=8)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    plain = model.generate(ids, max_new_tokens=17, do_sample=False, eos_token_id=None, mtp_speculate=False)
    tree = [(0,), (1,), (0, 0), (1, 1), (0, 0, 0), (1, 1, 1)]  # rank-1 candidates have their own chain
    with forced_drafts(plain, rank=rank):
        _, ours, stats = greedy(model, ids, max_new_tokens=17, eos_token_id=None, mtp_depth=3, mtp_tree=tree,
                                mtp_lookup=0)
    assert torch.equal(plain, ours)
    assert stats.acceptance_rate == [1.0, 1.0, 1.0]


def test_eos_inside_an_accepted_draft():
    model = heads_model("ffn", seed=9)
    ids = torch.tensor([[8, 21, 34, 55, 89]])
    plain = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, mtp_speculate=False)
    new = plain[0, ids.shape[1]:].tolist()
    # The prefill emits token 0, step 1 tokens 1-4, step 2 tokens 5-8: an eos at token 6 sits mid-draft.
    eos = next(token for index, token in enumerate(new) if index >= 6 and token not in new[:index])
    stop_at = new.index(eos)
    with forced_drafts(plain):
        expected, ours, stats = greedy(model, ids, max_new_tokens=30, eos_token_id=[eos, 127], mtp_depth=3)
    assert torch.equal(expected, ours)
    assert ours.shape[1] == ids.shape[1] + stop_at + 1
    assert stop_at % 4 != 0  # the stop really was inside a step's accepted tokens


def test_max_new_tokens_reached_mid_draft_and_rows_finishing_at_different_steps():
    model = heads_model("ffn", seed=10)
    ids, mask = padded_batch([5, 5, 3], seed=10)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD, mtp_speculate=False)
    # Row 0 races ahead with perfect drafts and hits the budget mid-draft while row 1 still drafts 3 deep.
    with forced_drafts(plain, quality={0: True, 1: False, 2: True}):
        _, ours, stats = greedy(model, ids, mask, max_new_tokens=14, eos_token_id=None, mtp_depth=3)
    assert torch.equal(plain, ours)
    assert stats.row_steps < 3 * stats.verify_steps  # row 0 left the batch before the others


def test_rows_finish_at_different_steps_with_eos():
    model = heads_model("cnn", seed=11)
    ids, mask = padded_batch([6, 2, 9, 4], seed=11)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=25, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD, mtp_speculate=False)
    # An eos that each row reaches at a different point (or never): its 4th, 9th... new token.
    eos = [int(plain[0, ids.shape[1] + 3]), int(plain[2, ids.shape[1] + 9])]
    with forced_drafts(plain, quality={0: True, 1: False, 2: True, 3: False}):
        expected, ours, _ = greedy(model, ids, mask, max_new_tokens=25, eos_token_id=eos, mtp_depth=3)
    assert torch.equal(expected, ours)
    assert (expected[:, -1] == PAD).any()  # some row stopped early and was padded


# ----------------------------------------------------------------------------------------------
# Stopping criteria and streamers


class StopAfterToken(StoppingCriteria):
    """Stops a row right after `token` appears among its last two ids (a criterion transformers does not know)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, -2:] == self.token).any(dim=1)


def test_custom_stopping_criteria_with_and_without_eos():
    model = heads_model("ffn", seed=12)
    ids, mask = padded_batch([4, 7], seed=12)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD, mtp_speculate=False)
    token = int(plain[1, ids.shape[1] + 5])
    for eos in (None, EOS):  # without eos, transformers lets stopped rows run on until every row stopped
        criteria = StoppingCriteriaList([StopAfterToken(token)])
        with forced_drafts(plain):
            expected, ours, _ = greedy(model, ids, mask, max_new_tokens=20, eos_token_id=eos,
                                       stopping_criteria=criteria, mtp_depth=3)
        assert torch.equal(expected, ours), eos


class StopAtNewTokens(StoppingCriteria):
    """Stops each row after its own number of new tokens (rows are told apart by their prompts)."""

    def __init__(self, prompts: torch.Tensor, new_tokens: list[int]):
        self.prompts, self.new_tokens = prompts, new_tokens

    def __call__(self, input_ids, scores, **kwargs):
        width = self.prompts.shape[1]
        rows = [int((self.prompts == ids[:width]).all(dim=1).nonzero()[0, 0]) for ids in input_ids]
        return torch.tensor([input_ids.shape[1] - width >= self.new_tokens[row] for row in rows])


def test_rows_that_stop_first_run_on_as_in_plain_decoding_and_statistics_count_what_is_returned():
    # Without an eos criterion transformers stops every row when the last one stops. Row 0 (perfect drafts, 4
    # tokens a step) stops first and runs far past where row 1 (wrong drafts, 1 token a step) stops the batch: the
    # step that stops row 1 takes row 0 back to that length, in its tokens and in the statistics.
    model = heads_model("ffn", seed=12)
    ids, mask = padded_batch([4, 7], seed=12)
    criteria = StoppingCriteriaList([StopAtNewTokens(ids, [3, 6])])
    common = dict(max_new_tokens=20, eos_token_id=None, stopping_criteria=criteria, mtp_depth=3, mtp_lookup=0)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD, mtp_speculate=False)
    with forced_drafts(plain, quality={0: True, 1: False}):
        expected, ours, stats = greedy(model, ids, mask, **common)
    assert expected.shape[1] == ids.shape[1] + 6
    assert torch.equal(expected, ours)
    assert stats.new_tokens == 2 * 6


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("lengths", [[5], [5, 3]])
def test_streamer_receives_what_plain_decoding_sends(lengths):
    model = heads_model("ffn", seed=13)
    ids, mask = padded_batch(lengths, seed=13)
    plain_streamer, ours_streamer = RecordingStreamer(), RecordingStreamer()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    plain = model.generate(**kwargs, eos_token_id=None, streamer=plain_streamer, mtp_speculate=False)
    with forced_drafts(plain):
        model.generate(**kwargs, eos_token_id=None, streamer=ours_streamer, mtp_depth=3)
    assert ours_streamer.puts == plain_streamer.puts
    assert ours_streamer.ended


# ----------------------------------------------------------------------------------------------
# The cache after each step: exactly the verified positions, with the values a fresh pass computes


def test_cache_rollback_leaves_no_stale_entries(monkeypatch):
    model = heads_model("identical", seed=14, dtype=torch.float64)
    ids = torch.tensor([[9, 8, 7, 6, 5, 4]])

    def check(decoder, verified):
        # The cache holds every verified token but the last one, which the next step feeds.
        assert decoder.cache_valid.shape[1] == decoder.cache.layers[0].keys.shape[2] == verified.numel() - 1
        fresh = model.base_model.model(verified[None, :-1], use_cache=True).cache
        for layer, fresh_layer in zip(decoder.cache.layers, fresh.layers):
            torch.testing.assert_close(layer.keys, fresh_layer.keys)
            torch.testing.assert_close(layer.values, fresh_layer.values)
        # Decoder-layer heads keep one cache entry per verified trunk position as well.
        assert all(cache.get("key.1").shape[2] == verified.numel() - 1 for cache in decoder.drafter.caches)

    with after_every_step(monkeypatch, check) as checked:
        model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, mtp_depth=3, mtp_tree=True)
    assert len(checked) >= 3


# ----------------------------------------------------------------------------------------------
# Options, statistics, and what goes to transformers unchanged


def test_statistics_add_up():
    model = heads_model("ffn", seed=15)
    ids, mask = padded_batch([5, 3], seed=15)
    _, ours, stats = greedy(model, ids, mask, max_new_tokens=12, eos_token_id=None, mtp_depth=2, mtp_lookup=0)
    assert isinstance(stats, SpeculationStats)
    assert stats.model_forwards == stats.verify_steps + 1
    assert stats.new_tokens == 2 * 12
    assert sum(stats.depth_steps.values()) == stats.verify_steps and max(stats.depth_steps) == 2
    assert 1.0 <= stats.tokens_per_step <= 3.0
    assert stats.wall_time_s >= stats.prefill_time_s > 0
    summary = stats.as_dict()
    assert {"tokens_per_step", "head1_acceptance", "head2_conditional_acceptance", "wall_time_s"} <= set(summary)


def test_other_generation_modes_and_disabled_adapters_go_to_transformers():
    model = heads_model("ffn", seed=16)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    kwargs = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=PAD)
    beams = model.generate(ids, num_beams=2, do_sample=False, **kwargs)
    assert torch.equal(beams, model.generate(ids, num_beams=2, do_sample=False, mtp_speculate=False, **kwargs))
    lookup = model.generate(ids, prompt_lookup_num_tokens=3, do_sample=False, **kwargs)
    assert torch.equal(lookup, model.generate(ids, do_sample=False, mtp_speculate=False, **kwargs))
    scored = model.generate(ids, do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs)
    assert scored.scores is not None and not hasattr(scored, "mtp_stats")
    with model.disable_adapter():
        out = model.generate(ids, do_sample=False, return_dict_in_generate=True, **kwargs)
    assert not hasattr(out, "mtp_stats")


def test_a_generation_config_passed_by_position_is_honoured():
    # transformers' `generate(inputs, generation_config, ...)`: a positional config must choose the mode too.
    model = heads_model("ffn", seed=16)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    beam_config = GenerationConfig(num_beams=2, do_sample=False, max_new_tokens=8, eos_token_id=None,
                                   pad_token_id=PAD)
    beams = model.generate(ids, beam_config)
    assert beams.shape[0] == 1  # beam search, not a speculative loop over the expanded beams
    assert torch.equal(beams, model.generate(ids, beam_config, mtp_speculate=False))
    greedy_config = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=PAD,
                                     return_dict_in_generate=True)
    ours = model.generate(ids, greedy_config)
    assert ours.mtp_stats.verify_steps > 0
    assert torch.equal(ours.sequences, model.generate(ids, greedy_config, mtp_speculate=False).sequences)


def test_positional_arguments_are_named_unless_generate_takes_star_args():
    from peft_mtp.decoding.generate import _as_keywords

    def generate(inputs=None, generation_config=None, **kwargs):
        pass

    def speech_generate(*args, **kwargs):  # a few speech models override `generate` so
        pass

    assert _as_keywords(generate, (1, 2), {"a": 3}) == ((), {"inputs": 1, "generation_config": 2, "a": 3})
    assert _as_keywords(speech_generate, (1, 2), {"a": 3}) == ((1, 2), {"a": 3})
    with pytest.raises(TypeError, match="generation_config"):
        _as_keywords(generate, (1, 2), {"generation_config": 3})


@pytest.mark.parametrize("where", ["argument", "generation_config", "model_default", "own_criterion"])
def test_stop_strings_stop_where_plain_decoding_stops(where):
    model = heads_model("ffn", seed=18)
    tokenizer = char_tokenizer()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    common = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    free = model.generate(ids, mtp_speculate=False, **common)
    stop = tokenizer.decode(free[0, ids.shape[1] + 6])  # the 7th new token's character
    if where == "argument":
        calls = dict(stop_strings=stop, **common)
    elif where == "generation_config":
        calls = dict(generation_config=GenerationConfig(stop_strings=stop, **common))
    elif where == "model_default":
        model.base_model.model.generation_config.stop_strings = stop
        calls = dict(common)
    else:  # the caller's own StopStringCriteria replaces the one `stop_strings` asks for, as in transformers
        early = tokenizer.decode(free[0, ids.shape[1] + 2])
        calls = dict(stop_strings=early, stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, stop)]),
                     **common)
    expected = model.generate(ids, tokenizer=tokenizer, mtp_speculate=False, **calls)
    assert expected.shape[1] <= ids.shape[1] + 7  # the stop string did stop plain decoding
    with forced_drafts(free):
        ours = model.generate(ids, tokenizer=tokenizer, mtp_depth=3, return_dict_in_generate=True, **calls)
    assert torch.equal(ours.sequences, expected)
    assert ours.mtp_stats.verify_steps > 0
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, **calls)


def test_token_healing_goes_to_transformers():
    model = heads_model("ffn", seed=19)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, token_healing=True, tokenizer=char_tokenizer(),
                         pad_token_id=PAD, return_dict_in_generate=True)
    assert not hasattr(out, "mtp_stats")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mtp_depth": 4}, "mtp_depth"),
        ({"mtp_depth": -1}, "mtp_depth"),
        ({"mtp_depth": "deep"}, "mtp_depth"),
        ({"mtp_speculate": "yes"}, "mtp_speculate"),
        ({"mtp_tree": [(0, 1)]}, "lacks its parent"),
        ({"mtp_tree": [(0,), (0,)]}, "repeats"),
        ({"mtp_tree": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]}, "depth 4"),
        ({"mtp_tree": "wide"}, "mtp_tree"),
    ],
)
def test_invalid_options_name_the_option(kwargs, message):
    model = heads_model("ffn", seed=17)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, **kwargs)


def test_sequential_heads_refuse_trees_that_branch_off_the_best_chain():
    model = heads_model("sequential", seed=18)
    with pytest.raises(ValueError, match=r"path \(1, 0\) extends a runner-up candidate.*sequential"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, mtp_tree=TREE)


def test_sequential_tree_drafts_accept_runner_ups_and_keep_the_heads_in_step(monkeypatch):
    """Runner-up candidates get accepted, and the heads' state after them matches the reference loop's."""
    model = heads_model("sequential", seed=20, dtype=torch.float64, noise=0.03)
    accepted_nodes = []
    original = DraftTree.accept_by_source

    def accept(self, tokens, choices, lookup_counts=None, depth_limit=None):
        result = original(self, tokens, choices, lookup_counts, depth_limit)
        accepted_nodes.extend(self.paths[i] for i in result[0].tolist())
        return result

    monkeypatch.setattr(DraftTree, "accept_by_source", accept)
    for prompt in ([11, 42, 7, 99, 5, 63, 18], [3, 1, 4, 1, 5, 9, 2, 6]):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             mtp_depth=3, mtp_tree=True, mtp_lookup=0, mtp_trace=True, return_dict_in_generate=True)
        tokens, accepted = reference_generate(model.base_model, prompt, 24, depth=3,
                                              tree=default_chain_tree_paths(3))
        assert out.sequences[0, len(prompt):].tolist() == tokens
        assert [step[0][1] for step in out.mtp_stats.trace] == accepted
    assert any(path and path[-1] > 0 for path in accepted_nodes), accepted_nodes  # a runner-up won
    assert any(len(path) >= 2 for path in accepted_nodes), accepted_nodes  # and chains went on


def test_the_loop_refuses_to_run_without_a_length_limit():
    # `generate` always passes a MaxLengthCriteria; a direct caller of the loop must too.
    from peft_mtp.decoding.loop import speculative_generate
    from peft_mtp.decoding.options import SpeculationOptions

    model = heads_model("ffn", seed=20)
    with pytest.raises(ValueError, match="MaxLengthCriteria"):
        speculative_generate(model.base_model.model, torch.tensor([[3, 4, 5]]), None, StoppingCriteriaList(),
                             GenerationConfig(do_sample=False, pad_token_id=PAD), mtp_model=model.base_model,
                             options=SpeculationOptions())


def test_right_padding_is_refused_with_a_fix():
    model = heads_model("ffn", seed=19)
    ids = torch.tensor([[5, 6, PAD], [7, 8, 9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD)


def test_automatic_depth_settles_below_the_maximum_for_useless_heads():
    model = heads_model("ffn", head_init="random", noise=0.0, seed=20)
    ids = torch.tensor([[31, 41, 59, 26, 53]])
    plain, ours, stats = greedy(model, ids, max_new_tokens=40, eos_token_id=None, mtp_depth="auto")
    assert torch.equal(plain, ours)
    assert len(stats.depth_steps) > 1  # it measured the deepest drafts, then moved


@pytest.mark.parametrize("head_type", ["sequential", "mha_ffn"])
def test_automatic_depth_is_told_which_steps_caught_up(monkeypatch, head_type):
    # Sequential depths that sat idle run over the positions they skipped at the next step that drafts with them
    # (the first step, over the prompt): the controller must know, or it charges that to the deeper depth.
    from peft_mtp.decoding.options import DepthController

    records = []
    record = DepthController.record

    def spy(self, depth, accepted, seconds, **kwargs):
        records.append((depth, kwargs["caught_up"], kwargs["draft_seconds"]))
        return record(self, depth, accepted, seconds, **kwargs)

    monkeypatch.setattr(DepthController, "record", spy)
    model = heads_model(head_type, num_heads=2, seed=23)
    plain, ours, _ = greedy(model, torch.tensor([[31, 41, 59, 26, 53]]), max_new_tokens=60, eos_token_id=None,
                            mtp_depth="auto")
    assert torch.equal(plain, ours)
    depths = [depth for depth, _, _ in records]
    assert len(set(depths)) > 1 and all(seconds is not None and seconds >= 0 for _, _, seconds in records)
    expected = [head_type == "sequential" and depth > previous for previous, depth in zip([0] + depths, depths)]
    assert [caught_up for _, caught_up, _ in records] == expected
    if head_type == "sequential":
        assert expected[0] and any(expected[1:]) and not all(expected)


def test_speculation_stays_exact_under_the_fast_linear_kernels():
    from peft_mtp.fast_linear import fast_small_row_linear

    model = heads_model("ffn", seed=21)
    ids, mask = padded_batch([6, 2, 4], seed=21)
    with fast_small_row_linear(model):
        plain, ours, _ = greedy(model, ids, mask, max_new_tokens=15, eos_token_id=None, mtp_depth=3, mtp_tree=True)
    assert torch.equal(plain, ours)
