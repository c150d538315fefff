"""Heads that copy (`MTPConfig.copy_ngram`, `peft_mtp.copying`): candidates, the gate's loss, the mixture, and
exact decoding with drafts drawn from it."""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F
from decoding_utils import EOS, PAD, heads_model, padded_batch
from peft import PeftModel
from test_decoding_sampling import chi_square_p_value, exact_distribution, model_with_heads, sample
from testing_common import make_mtp_model, one_torch_thread  # noqa: F401 (one_torch_thread: autouse fixture)
from tiny_models import VOCAB_SIZE, make_model

from peft_mtp import MTPConfig
from peft_mtp.alignment import IGNORE_INDEX
from peft_mtp.copying import copy_candidates, mix_copy, mixture_topk, next_copy_candidate
from peft_mtp.decoding.reference import reference_generate
from peft_mtp.draft_vocab import DraftVocabulary
from peft_mtp.heads import HeadContext
from peft_mtp.warmup import cache_trunk_outputs, warmup_heads

HEAD_TYPES = ("linear", "ffn", "mha_ffn", "cnn", "identical", "sequential")


def brute_force_candidates(ids: torch.Tensor, num_heads: int, ngram: int, sequential: bool,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, written out: head k at t knows tokens up to L (t+k or t+1) and copies what followed the latest
    earlier occurrence of tokens L-n+1..L, at the distance its target is from L."""
    batch, length = ids.shape
    real = (lambda b, i: True) if mask is None else (lambda b, i: bool(mask[b, i]))
    out = torch.full((batch, length, num_heads), -1)
    for b in range(batch):
        for t in range(length):
            for k in range(1, num_heads + 1):
                last = t + (k if sequential else 1)
                offset = t + 1 + k - last
                first = last - ngram + 1
                if last >= length or first < 0 or not all(real(b, i) for i in range(first, last + 1)):
                    continue
                for j in range(last - 1, ngram - 2, -1):
                    if j + offset > last or not (all(real(b, i) for i in range(j - ngram + 1, j + 1))
                                                 and real(b, j + offset)):
                        continue
                    if all(ids[b, j - i] == ids[b, last - i] for i in range(ngram)):
                        out[b, t, k - 1] = ids[b, j + offset]
                        break
    return out


# ----------------------------------------------------------------------------------------------
# Candidates


def test_candidates_follow_their_definition_on_random_sequences():
    rng = random.Random(0)
    for trial in range(120):
        batch, length, heads, ngram = rng.randint(1, 3), rng.randint(1, 24), rng.randint(1, 3), rng.randint(1, 3)
        ids = torch.randint(0, 3, (batch, length), generator=torch.Generator().manual_seed(trial))
        mask = (torch.rand(batch, length, generator=torch.Generator().manual_seed(trial)) > 0.2).long()
        mask = mask if trial % 2 else None
        sequential = trial % 3 == 0
        assert torch.equal(copy_candidates(ids, heads, ngram, sequential, mask),
                           brute_force_candidates(ids, heads, ngram, sequential, mask)), (trial, ids, mask)


def test_candidates_of_a_repeated_phrase():
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9]])
    parallel = copy_candidates(ids, num_heads=2, ngram=2, sequential=False)
    # At t=5 (the second 5) the parallel heads know tokens up to index 6; the bigram (5, 6) occurred at indices 0-1,
    # so head 1 (target: index 7) copies index 2, and head 2 (target: index 8) copies index 3: exactly the targets.
    assert parallel[0, 5].tolist() == [7, 8]
    assert parallel[0, :5].tolist() == [[-1, -1]] * 5  # nothing before has repeated yet
    chain = copy_candidates(ids, num_heads=2, ngram=2, sequential=True)
    # Depth 2 knows up to index 7: the bigram (6, 7) at indices 1-2 gives index 3.
    assert chain[0, 5].tolist() == [7, 8]
    assert parallel[0, 4].tolist() == [-1, -1]  # t=4 knows (9, 5): never seen before


def test_candidates_never_read_the_token_they_predict():
    # Changing the target of head k at t (and all later tokens) leaves its candidate at t unchanged.
    ids = torch.randint(3, 6, (1, 30), generator=torch.Generator().manual_seed(1))
    for sequential in (False, True):
        base = copy_candidates(ids, 3, 2, sequential)
        for t in range(26):
            for k in range(1, 4):
                changed = ids.clone()
                changed[0, t + 1 + k:] = 99
                assert base[0, t, k - 1] == copy_candidates(changed, 3, 2, sequential)[0, t, k - 1]


def test_decode_time_candidate_equals_the_training_candidate_at_the_last_position():
    ids, mask = padded_batch([4, 11, 7, 9], seed=3)
    ids = torch.where(mask.bool(), ids % 5 + 3, ids)  # few distinct tokens: many matches
    lengths = torch.full((ids.shape[0],), ids.shape[1])
    starts = (mask == 0).sum(dim=1)
    for ngram in (1, 2):
        for k in (1, 2, 3):
            # Parallel head k at the second-to-last position knows the last token and predicts k past it.
            expected = torch.stack([copy_candidates(ids[r:r + 1, starts[r]:], k, ngram, sequential=False)[0, -2, k - 1]
                                    for r in range(ids.shape[0])])
            assert torch.equal(next_copy_candidate(ids, lengths, ngram, k, starts), expected)


# ----------------------------------------------------------------------------------------------
# The mixture


def test_mixture_is_a_distribution_that_moves_mass_to_the_candidate():
    log_probs = torch.log_softmax(torch.randn(4, 10), dim=-1)
    candidates = torch.tensor([3, -1, 7, 0])
    gates = torch.tensor([0.0, 5.0, 2.0, -1.0])
    mixed = mix_copy(log_probs, candidates, gates).exp()
    torch.testing.assert_close(mixed.sum(-1), torch.ones(4))
    g = torch.sigmoid(gates)
    for row, candidate in enumerate(candidates.tolist()):
        expected = log_probs[row].exp() * (1 - g[row]) if candidate >= 0 else log_probs[row].exp()
        if candidate >= 0:
            expected[candidate] += g[row]
        torch.testing.assert_close(mixed[row], expected)


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_mixture_topk_ranks_like_the_whole_vocabulary_mixture(draft_vocab):
    generator = torch.Generator().manual_seed(0)
    vocab, size = 50, 20 if draft_vocab else 50
    vocabulary = DraftVocabulary(size, vocab)
    vocabulary.fit(torch.rand(vocab, generator=generator))
    for k in (1, 3):
        logits = torch.randn(64, size, generator=generator) * 3
        candidates = torch.randint(-1, vocab, (64,), generator=generator)
        gates = torch.randn(64, generator=generator) * 3
        if draft_vocab:
            full = torch.full((64, vocab), float("-inf")).index_copy_(-1, vocabulary.token_ids, logits)
            maps = dict(token_ids=vocabulary.to_token_ids, to_slots=vocabulary.to_slots)
        else:
            full, maps = logits, {}
        expected = mix_copy(torch.log_softmax(full, -1), candidates, gates).topk(k, dim=-1).indices
        assert torch.equal(mixture_topk(logits, candidates, gates, k, **maps), expected)
    # A candidate outside the draft vocabulary can still be drafted.
    if draft_vocab:
        outside = next(i for i in range(vocab) if vocabulary.to_slots(torch.tensor(i)) < 0)
        drafted = mixture_topk(torch.zeros(1, size), torch.tensor([outside]), torch.tensor([3.0]), 1, **maps)
        assert drafted.item() == outside


# ----------------------------------------------------------------------------------------------
# Training


def _recover_gates(mixed: torch.Tensor, own: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """g from the mixture's log-probabilities: at any token but the candidate, log p_mix = log(1 - g) + log p_head."""
    other = (candidates + 1) % mixed.shape[-1]
    log_keep = (mixed.gather(-1, other[..., None]) - own.gather(-1, other[..., None]))[..., 0]
    return -torch.expm1(log_keep)


@pytest.mark.parametrize("head_type", ["ffn", "sequential"])
def test_loss_adds_each_gates_cross_entropy_on_positions_with_a_candidate(head_type):
    model = make_mtp_model("llama", head_type=head_type, num_heads=2, head_init="random", copy_ngram=1)
    with torch.no_grad():
        for gate in model.base_model.active_heads().copy_gates:
            gate.state.weight.normal_(0, 0.5)
            gate.candidate_scale.fill_(0.3)
    ids = torch.randint(3, 7, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 9] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels, output_mtp_logits=True)
    own = torch.log_softmax(out.mtp_head_logits.float(), dim=-1)
    candidates = copy_candidates(ids, 2, 1, head_type == "sequential")
    weights = model.peft_config["default"].head_loss_weights()
    expected = 0.0
    for k in (1, 2):
        length = ids.shape[1] - 1 - k
        targets = labels[:, 1 + k:]
        logits, cands = out.mtp_head_logits[:, :length, k - 1], candidates[:, :length, k - 1]
        ce = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        scored = (targets != IGNORE_INDEX) & (cands >= 0)
        assert scored.sum() > 4  # few distinct tokens: most positions have a candidate
        g = _recover_gates(out.mtp_logits[:, :length, k - 1].float(), own[:, :length, k - 1], cands)
        bce = F.binary_cross_entropy(g[scored], (cands == targets)[scored].float())
        expected += weights[k - 1] * (ce + bce)
        # Where there is no candidate, the mixture is the head's own distribution.
        none = cands < 0
        torch.testing.assert_close(out.mtp_logits[:, :length, k - 1][none].float(), own[:, :length, k - 1][none])
    torch.testing.assert_close(out.mtp_loss, torch.as_tensor(expected), rtol=1e-4, atol=1e-5)


def test_gates_learn_without_changing_what_the_heads_learn():
    # The gate's loss trains the gate on detached head outputs: the heads' gradients are those of heads without it.
    ids = torch.randint(3, 9, (2, 20), generator=torch.Generator().manual_seed(2))
    grads = {}
    for copy_ngram in (0, 2):
        model = make_mtp_model("llama", head_type="sequential", num_heads=2, head_init="random", copy_ngram=copy_ngram)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[copy_ngram] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    gate_names = {n for n in grads[2] if "copy_gates" in n}
    assert gate_names and all(grads[2][n].abs().sum() > 0 for n in gate_names)
    assert grads[2].keys() - gate_names == grads[0].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[2][name], grads[0][name])


def test_warmup_trains_the_gates_toward_the_candidates_that_are_right():
    # On a text that repeats itself, the candidate is right almost everywhere: the gate must learn to trust it.
    torch.manual_seed(0)
    model = make_mtp_model("llama", head_type="ffn", num_heads=2, head_init="random", copy_ngram=2,
                           head_target_source="labels")
    phrase = torch.randint(3, VOCAB_SIZE, (12,), generator=torch.Generator().manual_seed(4))
    ids = phrase.repeat(4)[None].repeat(2, 1)
    batches = cache_trunk_outputs(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}],
                                  progress=False)
    heads, trunk = model.base_model.active_heads(), model.base_model.get_trunk()

    def mean_gate():
        with torch.no_grad():
            context = HeadContext(input_ids=ids, attention_mask=None, layer_kwargs=[], embed=trunk.embed)
            candidates = heads.copy_candidates(ids)
            gates = heads.copy_gate_logits(heads(batches[0].hidden, context), trunk, candidates)
            return torch.sigmoid(gates[candidates >= 0]).mean().item()

    before = mean_gate()
    warmup_heads(model, batches, epochs=40, learning_rate=1e-2, progress=False)
    assert before == pytest.approx(0.5) and mean_gate() > 0.75


def test_gates_save_and_load_exactly(tmp_path):
    model = make_mtp_model("llama", head_type="sequential", num_heads=2, head_init="random", copy_ngram=1)
    with torch.no_grad():
        for parameter in model.base_model.active_heads().copy_gates.parameters():
            parameter.normal_()
    ids = torch.randint(3, 7, (2, 12), generator=torch.Generator().manual_seed(1))  # few tokens: many candidates
    before = model(input_ids=ids, output_mtp_logits=True)
    assert not torch.allclose(before.mtp_logits, torch.log_softmax(before.mtp_head_logits, -1))  # the gates matter
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].copy_ngram == 1
    after = loaded(input_ids=ids, output_mtp_logits=True)
    assert after.mtp_logits.equal(before.mtp_logits) and after.mtp_head_logits.equal(before.mtp_head_logits)


def test_heads_that_copy_need_input_ids():
    model = make_mtp_model("llama", head_type="ffn", num_heads=2, copy_ngram=2)
    embeds = model.get_base_model().get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match=r"These heads copy \(`copy_ngram`=2\) and need `input_ids`"):
        model(inputs_embeds=embeds, output_mtp_logits=True)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_copy_ngram_must_be_a_count(value):
    with pytest.raises(ValueError, match=re.escape(f"`copy_ngram` must be an integer >= 0 (0 = heads do not copy; 2 "
                                                   f"matches the last two tokens), got {value!r}.")):
        MTPConfig(copy_ngram=value)


# ----------------------------------------------------------------------------------------------
# Decoding


def _copying_model(head_type: str, dtype: torch.dtype = torch.float32, bias: float = 1.0, ngram: int = 1):
    """Tiny heads that copy, with gates that trust their candidates (so that copies are drafted and accepted)."""
    model = heads_model(head_type, num_heads=2, seed=5, dtype=dtype, noise=0.03, copy_ngram=ngram)
    with torch.no_grad():
        for gate in model.base_model.active_heads().copy_gates:
            gate.state.bias.fill_(bias)
    return model


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_copying_heads_match_the_reference_loop(head_type):
    # float64: the loops compute the mixture differently (top-k vs whole vocabulary); no near-ties may flip a draft.
    model = _copying_model(head_type, dtype=torch.float64)
    prompt = [11, 42, 7, 99, 5, 63, 18, 11, 42, 7, 99]
    trees = [None, [(0,), (1,), (0, 0), (0, 1)] if head_type == "sequential" else [(0,), (1,), (0, 0), (1, 0)]]
    for tree in trees:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                             mtp_depth=2, mtp_tree=tree, mtp_lookup=0, mtp_trace=True, return_dict_in_generate=True)
        tokens, accepted = reference_generate(model.base_model, prompt, 14, depth=2, tree=tree)
        assert out.sequences[0, len(prompt):].tolist() == tokens
        assert [step[0][1] for step in out.mtp_stats.trace] == accepted


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_copying_heads_decode_batches_exactly(head_type):
    model = _copying_model(head_type, ngram=2)
    ids, mask = padded_batch([3, 9, 6], seed=9)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=18, do_sample=False, eos_token_id=EOS,
                  pad_token_id=PAD)
    plain = model.generate(**kwargs, mtp_speculate=False)
    for tree in (None, True):
        assert torch.equal(model.generate(**kwargs, mtp_depth=2, mtp_tree=tree, mtp_lookup=4), plain)


def test_copies_are_drafted_and_accepted_where_the_model_repeats_itself():
    # A model that repeats its prompt (tied embeddings make tiny random models repeat): with a gate that trusts its
    # candidates, heads whose own drafts are random get them right by copying.
    model = _copying_model("ffn", bias=8.0)
    no_copy = heads_model("ffn", num_heads=2, seed=5, noise=0.03)
    no_copy.load_state_dict(model.state_dict(), strict=False)  # the same heads, without gates
    prompt = torch.tensor([[11, 42, 7, 99, 5, 63, 18, 11, 42, 7, 99, 5, 63, 18]])
    stats = {}
    for name, m in (("copy", model), ("alone", no_copy)):
        out = m.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, mtp_depth=2, mtp_lookup=0,
                         return_dict_in_generate=True)
        stats[name] = (out.sequences, out.mtp_stats.tokens_per_step)
    assert torch.equal(stats["copy"][0], stats["alone"][0])
    generated = stats["copy"][0][0, prompt.shape[1]:].tolist()
    assert len(set(generated)) < len(generated) / 2  # the model repeats itself (one token, over and over)
    assert stats["alone"][1] < 1.2 and stats["copy"][1] > 1.7  # tokens per step: copies pay


@pytest.mark.parametrize("head_type", ["ffn", "sequential"])
def test_sampling_with_copying_heads_is_exact(head_type):
    # Speculative sampling is exact for any draft distribution: the mixture is what drafts are drawn from and what
    # acceptance divides by. A prompt that repeats itself, so that candidates exist and are often drafted.
    prompt = [5, 9, 33, 5, 9, 33, 5, 9]
    model = model_with_heads(head_type, copy_ngram=1)
    with torch.no_grad():
        for gate in model.base_model.active_heads().copy_gates:
            gate.state.bias.fill_(2.0)
    exact, _ = exact_distribution(model.base_model.model, prompt=prompt)
    samples, stats = sample(model, prompt=prompt, mtp_lookup=0)
    assert chi_square_p_value(samples, exact) > 1e-3
    assert stats.proposed[0] > 0
