"""Head behaviour, per head type and architecture: causality, target alignment, identity at init, no shared weights.

Head k (k = 1..K) at position t predicts token t+1+k. Its output at t must not depend on token t+1+k or later: parallel
heads read positions <= t, `sequential` heads also read tokens t+1..t+k, the chain they draft.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from testing_common import (
    COPY_TEST_CASES,
    FEATURE_TEST_CASES,
    IDENTITY_AT_INIT_HEAD_TYPES,
    SEQ_LEN,
    TEST_CASES,
    case_params,
    make_mtp_model,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    random_ids,
    run,
)
from tiny_models import VOCAB_SIZE, make_model

from peft_mtp import MTPConfig, head_targets, target_offset
from peft_mtp.alignment import IGNORE_INDEX, future_tokens

# --------------------------------------------------------------------------------------------------------------------
# The convention itself, on hand-written examples


def test_target_offset_is_one_plus_k():
    assert [target_offset(k) for k in range(4)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=re.escape("head number `k` must be >= 0, got -1.")):
        target_offset(-1)


def test_head_targets_pick_token_t_plus_1_plus_k():
    labels = torch.arange(10, 16)[None]  # token at position t is 10 + t
    assert head_targets(labels, 0).tolist() == [[11, 12, 13, 14, 15, IGNORE_INDEX]]
    assert head_targets(labels, 2).tolist() == [[13, 14, 15] + [IGNORE_INDEX] * 3]
    assert head_targets(labels, 6).tolist() == [[IGNORE_INDEX] * 6]  # no target inside the sequence


def test_head_targets_keep_ignored_labels_and_stay_inside_packed_documents():
    labels = torch.tensor([[10, 11, IGNORE_INDEX, 13, 14, 15, 16]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # two packed documents: positions 0-2 and 3-6
    # Head 1: target of t is token t+2, kept only when t and t+2 are in the same document.
    assert head_targets(labels, 1, position_ids).tolist() == [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 15, 16,
                                                               IGNORE_INDEX, IGNORE_INDEX]]
    assert head_targets(labels, 1).tolist() == [[IGNORE_INDEX, 13, 14, 15, 16, IGNORE_INDEX, IGNORE_INDEX]]


def test_future_tokens_of_depth_k_is_token_t_plus_k():
    input_ids = torch.arange(10, 15)[None]
    assert future_tokens(input_ids, 2).tolist() == [[12, 13, 14, 0, 0]]


# --------------------------------------------------------------------------------------------------------------------
# Every head type on every architecture


@pytest.mark.parametrize(**case_params(TEST_CASES + FEATURE_TEST_CASES + COPY_TEST_CASES))
def test_head_is_causal(arch, config_cls, config_kwargs):
    _check_causality(arch, config_cls, config_kwargs)


@pytest.mark.parametrize(**case_params(TEST_CASES + FEATURE_TEST_CASES))
def test_head_k_loss_at_t_is_scored_against_token_t_plus_1_plus_k(arch, config_cls, config_kwargs):
    _check_target_alignment(arch, config_cls, config_kwargs)


@pytest.mark.parametrize(**case_params([case for case in TEST_CASES + FEATURE_TEST_CASES if case[3]["head_type"] in
                                        IDENTITY_AT_INIT_HEAD_TYPES]))
def test_fresh_heads_reproduce_next_token_logits(arch, config_cls, config_kwargs):
    _check_identity_at_init(arch, config_cls, config_kwargs)


@pytest.mark.parametrize(**case_params(TEST_CASES + FEATURE_TEST_CASES + COPY_TEST_CASES))
def test_no_two_heads_share_a_module_or_parameter(arch, config_cls, config_kwargs):
    _check_no_sharing(arch, config_cls, config_kwargs)


@pytest.mark.parametrize("head_type", ["ffn", "sequential"])
def test_logits_to_keep_keeps_the_last_positions_of_head_logits(head_type):
    model = make_mtp_model("llama", head_type=head_type, num_heads=2, head_init="random")
    input_ids = random_ids()
    full, last = run(model, input_ids).mtp_logits, run(model, input_ids, logits_to_keep=1).mtp_logits
    assert last.shape == (2, 1, 2, VOCAB_SIZE)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)


def test_fresh_heads_with_their_own_unembedding_reproduce_next_token_logits():
    _check_identity_at_init("gemma2", MTPConfig, {"head_type": "ffn", "num_heads": 2, "share_unembedding": False})


# --------------------------------------------------------------------------------------------------------------------
# Build errors


def test_mha_heads_that_do_not_divide_the_hidden_size_raise():
    with pytest.raises(ValueError, match=re.escape("`mha_num_attention_heads`=5 must divide the base model's hidden "
                                                   "size 32.")):
        get_peft_model(make_model("llama"), MTPConfig(head_type="mha_ffn", mha_num_attention_heads=5))


def test_feature_layers_the_trunk_does_not_have_raise():
    # The tiny models have 2 decoder layers: layer 1's output is the trunk output the heads read anyway.
    with pytest.raises(ValueError, match=re.escape("`feature_layers`=[0, 1] names layer(s) [1], but the base model's "
                                                   "decoder layers are 0..1 and heads already read layer 1's output")):
        get_peft_model(make_model("llama"), MTPConfig(num_heads=2, feature_layers=[0, 1]))


@torch.no_grad()
def test_feature_layers_feed_the_heads_what_the_trunk_layers_output():
    # The fused input is exactly trunk output + W [norm(layer outputs)]: recompute it from the model's hidden states.
    model = make_mtp_model("llama", head_type="linear", num_heads=1, head_init="random", feature_layers=[0])
    heads = model.base_model.active_heads()
    heads.heads[0].maps[0].weight.copy_(torch.eye(heads.heads[0].maps[0].weight.shape[0]))
    heads.heads[0].maps[0].bias.zero_()
    input_ids = random_ids()
    states = model.base_model.model(input_ids=input_ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is layer i's output, except the last entry, which transformers returns after the final
    # norm; the trunk output is the last layer's output before it.
    with model.base_model.get_trunk().capture() as captured:
        model.base_model.model(input_ids=input_ids)
    expected_input = captured.hidden + heads.fusion.proj(heads.fusion.norms[0](states[1]))
    expected = model.base_model.get_trunk().logits(expected_input)
    torch.testing.assert_close(run(model, input_ids).mtp_logits[:, :, 0], expected, rtol=1e-5, atol=1e-5)
    assert heads.fusion.proj.weight.abs().sum() > 0  # random init: the layer output really moved the input


@pytest.mark.parametrize("head_type", ["identical", "sequential"])
def test_decoder_layer_heads_deeper_than_the_trunk_raise(head_type):
    with pytest.raises(ValueError, match=re.escape("`num_layers`=3 asks for more decoder layers than the base model "
                                                   "has (2); use at most 2.")):
        get_peft_model(make_model("llama"), MTPConfig(head_type=head_type, num_layers=3))


# --------------------------------------------------------------------------------------------------------------------
# Checkers


def _check_causality(arch, config_cls, config_kwargs):
    """Change every token from position `cut` on; outputs at positions that may not read token `cut` must not move.

    Parallel heads read tokens <= t (what the next-token head reads), so their outputs at t <= cut-1 are fixed;
    `sequential` head k also reads t+1..t+k, so its outputs at t <= cut-1-k are fixed. Heads that copy
    (`copy_ngram`) draft from the mixture with their candidate, which parallel heads take from tokens up to t+1 (the
    model's own next token, known when they draft). Either way token t+1+k, the one head k predicts, is never read. Row `cut` of one batch holds the sequence changed from `cut` on (row 0 is
    unchanged), so every row runs through the same kernels and fixed positions must match bit for bit. The control:
    the first position allowed to read token `cut` must move, so a head that reads one token too many, or one that
    does not read the chain it drafts, fails.
    """
    model = make_mtp_model(arch, config_cls, head_init="random", **config_kwargs)
    sequential = config_kwargs["head_type"] == "sequential"
    copying = bool(config_kwargs.get("copy_ngram"))
    original = random_ids(batch=1)
    rows = [original[0]]
    for cut in range(1, SEQ_LEN):
        changed = original[0].clone()
        changed[cut:] = 3 + (changed[cut:] - 3 + 1 + torch.arange(SEQ_LEN - cut)) % (VOCAB_SIZE - 3)
        rows.append(changed)
    mtp_logits = run(model, torch.stack(rows)).mtp_logits  # (SEQ_LEN, T, K, V); row `cut` changed from `cut` on

    for k in range(1, config_kwargs["num_heads"] + 1):
        reads_ahead = k if sequential else int(copying)  # head k at t reads up to t + reads_ahead < t + target_offset(k)
        assert reads_ahead < target_offset(k)
        for cut in range(1, SEQ_LEN):
            first_reader = cut - reads_ahead  # the first position allowed to read token `cut`
            if first_reader > 0:
                assert torch.equal(mtp_logits[cut, :first_reader, k - 1], mtp_logits[0, :first_reader, k - 1]), (
                    f"head {k} at a position t < {first_reader} reads token {cut} > t+{reads_ahead}")
            if first_reader >= 0 and (sequential or not copying):  # a copy reads token t+1 only where it repeats
                assert not torch.equal(mtp_logits[cut, first_reader, k - 1], mtp_logits[0, first_reader, k - 1]), (
                    f"head {k} at t={first_reader} should read token {cut} but its output did not change")


def _check_target_alignment(arch, config_cls, config_kwargs):
    """Per-head losses equal a cross-entropy of `mtp_logits[:, t, k-1]` against `labels[:, t+1+k]`, written out."""
    model = make_mtp_model(arch, config_cls, head_init="random", **config_kwargs)
    input_ids = random_ids()
    labels = input_ids.clone()
    labels[0, 5] = IGNORE_INDEX  # an ignored label is skipped by every head whose target it is
    out = run(model, input_ids, labels=labels)
    config = model.peft_config["default"]
    T = SEQ_LEN
    expected_losses, expected_hits = [], []
    for k in range(1, config.num_heads + 1):
        logits = out.mtp_logits[:, : T - 1 - k, k - 1]  # positions t = 0 .. T-2-k
        targets = labels[:, 1 + k:]  # token t+1+k of each of them
        expected_losses.append(F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1),
                                               ignore_index=IGNORE_INDEX))
        valid = targets != IGNORE_INDEX
        expected_hits.append((logits.argmax(-1)[valid] == targets[valid]).float().mean())
    torch.testing.assert_close(out.mtp_head_losses, torch.stack(expected_losses), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mtp_head_accuracies.float(), torch.stack(expected_hits), rtol=0, atol=1e-6)

    weights = torch.tensor(config.head_loss_weights())
    torch.testing.assert_close(out.mtp_loss, (weights * torch.stack(expected_losses)).sum(), rtol=1e-5, atol=1e-5)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB_SIZE), labels[:, 1:].reshape(-1),
                              ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, lm_loss + config.mtp_loss_weight * out.mtp_loss, rtol=1e-5, atol=1e-5)


def _check_identity_at_init(arch, config_cls, config_kwargs):
    """With head_init="base", every head's logits are the model's own next-token logits."""
    base_logits = run_base(arch)
    model = make_mtp_model(arch, config_cls, head_init="base", **config_kwargs)
    mtp_logits = run(model, random_ids()).mtp_logits
    for k in range(config_kwargs["num_heads"]):
        torch.testing.assert_close(mtp_logits[:, :, k], base_logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def run_base(arch):
    """Logits of the bare base model (the same seed as `make_mtp_model`'s) on `random_ids()`."""
    return make_model(arch)(input_ids=random_ids()).logits


def _check_no_sharing(arch, config_cls, config_kwargs):
    """Heads (and blocks inside a head, and unembedding copies) are separate modules with separate storage."""
    model = make_mtp_model(arch, config_cls, num_layers=2, share_unembedding=False, **config_kwargs)
    stack = model.base_model.mtp.mtp_heads["default"]
    parts = list(stack.heads) + list(stack.unembeddings)
    assert len(parts) == 2 * config_kwargs["num_heads"]
    base_storage = {p.untyped_storage().data_ptr() for p in model.get_base_model().parameters()}
    seen_modules, seen_storage = set(), set(base_storage)
    for part in parts:
        modules = [id(m) for _, m in part.named_modules(remove_duplicate=False)]
        storage = [p.untyped_storage().data_ptr() for _, p in part.named_parameters(remove_duplicate=False)]
        assert len(set(modules)) == len(modules), "a module is used twice inside one head"
        assert len(set(storage)) == len(storage), "a parameter is used twice inside one head"
        assert not seen_modules & set(modules), "two heads share a module"
        assert not seen_storage & set(storage), "a head shares a parameter with another head or the base model"
        seen_modules.update(modules)
        seen_storage.update(storage)
