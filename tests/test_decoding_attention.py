"""Verify passes on CPU read a grouped-query model's keys and values in place, with the same numbers."""

from __future__ import annotations

import os

import pytest
import torch
from decoding_utils import PAD, heads_model, padded_batch
from tiny_models import make_config
from transformers import AutoModelForCausalLM
from transformers.integrations import sdpa_attention

from peft_mtp.decoding.attention import SDPA_FORCE_GQA_ENV, grouped_query_sdpa, uses_sdpa
from peft_mtp.decoding.layout import additive_mask


@pytest.fixture
def repeat_kv_calls(monkeypatch):
    """Counts transformers' copies of the keys and values per query head."""
    calls = []
    original = sdpa_attention.repeat_kv

    def counting(hidden_states, n_rep):
        calls.append(n_rep)
        return original(hidden_states, n_rep)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", counting)
    monkeypatch.delenv(SDPA_FORCE_GQA_ENV, raising=False)
    return calls


def test_a_masked_pass_gives_the_same_logits_without_copying_keys_and_values(repeat_kv_calls):
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(make_config("llama"), attn_implementation="sdpa").eval()
    assert uses_sdpa(model) and model.config.num_key_value_heads < model.config.num_attention_heads  # 4 and 2
    prompt = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    # A small tree: node 0 the root, 1 and 2 its children, 3 under 1, 4 under 3.
    ancestors = torch.eye(5, dtype=torch.bool)
    for node, parent in [(1, 0), (2, 0), (3, 1), (4, 3)]:
        ancestors[node] |= ancestors[parent]
    allowed = torch.cat([torch.ones(5, 12, dtype=torch.bool), ancestors], dim=1)[None, None]
    mask = additive_mask(allowed, torch.float32)
    positions = torch.tensor([[12, 13, 13, 14, 15]])

    def verify_pass():
        with torch.no_grad():
            cache = model(input_ids=prompt, use_cache=True).cache
            return model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache).logits

    stock = verify_pass()
    copies = len(repeat_kv_calls)
    assert copies > 0  # transformers copies them for a masked multi-token pass
    with grouped_query_sdpa():
        in_place = verify_pass()
    assert len(repeat_kv_calls) == copies  # no copy inside the block
    assert torch.equal(in_place, stock)


def test_the_switch_is_put_back_as_it_was(monkeypatch):
    monkeypatch.delenv(SDPA_FORCE_GQA_ENV, raising=False)
    with grouped_query_sdpa():
        assert os.environ[SDPA_FORCE_GQA_ENV] == "1"
    assert SDPA_FORCE_GQA_ENV not in os.environ
    with pytest.raises(RuntimeError), grouped_query_sdpa():
        raise RuntimeError("a failing forward")
    assert SDPA_FORCE_GQA_ENV not in os.environ
    with grouped_query_sdpa(enabled=False):
        assert SDPA_FORCE_GQA_ENV not in os.environ


def test_overlapping_blocks_share_the_switch_until_the_last_one_closes(monkeypatch):
    # Two generate calls in two threads: the first to finish must not switch it off under the other.
    monkeypatch.delenv(SDPA_FORCE_GQA_ENV, raising=False)
    first, second = grouped_query_sdpa(), grouped_query_sdpa()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert os.environ[SDPA_FORCE_GQA_ENV] == "1"
    second.__exit__(None, None, None)
    assert SDPA_FORCE_GQA_ENV not in os.environ


@pytest.mark.parametrize("value", ["0", "1"])
def test_a_value_the_user_set_is_left_alone(monkeypatch, value):
    monkeypatch.setenv(SDPA_FORCE_GQA_ENV, value)
    with grouped_query_sdpa():
        assert os.environ[SDPA_FORCE_GQA_ENV] == value
    assert os.environ[SDPA_FORCE_GQA_ENV] == value


@pytest.mark.parametrize("tree", [None, True], ids=["chain", "tree"])
def test_speculative_decoding_verifies_without_copies_and_matches_plain_greedy(repeat_kv_calls, tree):
    model = heads_model("ffn", seed=5, attn_implementation="sdpa")  # position-wise heads: no attention of their own
    ids, mask = padded_batch([4, 9, 6], seed=5)
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, max_new_tokens=24,
                  eos_token_id=None)
    plain = model.generate(**kwargs, mtp_speculate=False)
    per_prefill = len(repeat_kv_calls)  # keys and values of every layer for the padded prompt; 1-token steps pack
    assert per_prefill == 2 * model.get_base_model().config.num_hidden_layers
    out = model.generate(**kwargs, mtp_depth=2, mtp_tree=tree, mtp_lookup=4, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.mtp_stats.verify_steps > 0
    assert len(repeat_kv_calls) == 2 * per_prefill  # the speculative prefill copies too; its verify passes never
