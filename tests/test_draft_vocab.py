"""Draft vocabularies (`MTPConfig.draft_vocab_size`): heads predict over N frequent tokens, decoding stays exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from decoding_utils import PAD, heads_model, padded_batch
from peft import PeftModel, get_peft_model
from test_decoding_sampling import chi_square_p_value, exact_distribution, model_with_heads, sample
from test_training import lm_dataset, make_trainer
from test_warmup import _batches
from testing_common import one_torch_thread  # noqa: F401  (fixture)
from tiny_models import VOCAB_SIZE, make_model

from peft_mtp import HEAD_TYPES, MTPConfig, fast_linear, fit_draft_vocabulary, head_targets
from peft_mtp.alignment import IGNORE_INDEX
from peft_mtp.decoding.loop import SpeculativeDecoder
from peft_mtp.draft_vocab import DraftVocabulary, count_tokens
from peft_mtp.warmup import cache_trunk_outputs, warmup_heads

DRAFT_SIZE = 40

# transformers 5.24 renames TrainingArguments.gradient_checkpointing; TRL 1.16 still reads the old name.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def draft_ids(model) -> torch.Tensor:
    return model.base_model.active_heads().draft_vocab.token_ids


# ----------------------------------------------------------------------------------------------
# Choosing the tokens


def test_fit_takes_the_most_frequent_ids_then_the_lowest_unused():
    vocabulary = DraftVocabulary(size=5, vocab_size=12)
    counts = torch.zeros(12)
    counts[[9, 4, 7]] = torch.tensor([5.0, 3.0, 3.0])  # 9 first; 4 and 7 tie (lower id first)
    vocabulary.fit(counts)
    assert vocabulary.token_ids.tolist() == [0, 1, 4, 7, 9]  # then the lowest unused ids: 0, 1
    assert bool(vocabulary.fitted)
    assert vocabulary.to_slots(torch.tensor([9, 2, -100, 0])).tolist() == [4, -1, -1, 0]
    assert vocabulary.to_token_ids(torch.tensor([4, 2])).tolist() == [9, 4]

    counts = torch.arange(12, dtype=torch.float64)  # more distinct ids than slots: the 5 most frequent
    vocabulary.fit(counts)
    assert vocabulary.token_ids.tolist() == [7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match=r"`counts` must have shape \(12,\)"):
        vocabulary.fit(torch.zeros(5))


def test_count_tokens_skips_ignored_labels():
    counts = count_tokens([[3, 3, -100, 5], [5, 5]], vocab_size=8)
    assert counts.tolist() == [0, 0, 0, 2, 0, 3, 0, 0]


@pytest.mark.parametrize("value, message", [(0, ">= 1"), (True, ">= 1"), ("8", ">= 1")])
def test_invalid_sizes_name_the_field(value, message):
    with pytest.raises(ValueError, match=f"`draft_vocab_size` must be an integer {message}"):
        MTPConfig(draft_vocab_size=value)


def test_a_size_above_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match=f"between 1 and the model's vocabulary size {VOCAB_SIZE}, got 500"):
        get_peft_model(make_model("llama"), MTPConfig(num_heads=1, draft_vocab_size=500))


def test_fitting_heads_without_a_draft_vocabulary_is_refused():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=1))
    with pytest.raises(ValueError, match="whole vocabulary"):
        fit_draft_vocabulary(model, [[3, 4]])


# ----------------------------------------------------------------------------------------------
# Logits and loss


def fitted_model(head_type="ffn", arch="llama", **config):
    torch.manual_seed(0)
    model = get_peft_model(make_model(arch), MTPConfig(num_heads=3, head_type=head_type, head_init="random",
                                                       draft_vocab_size=DRAFT_SIZE, **config))
    fit_draft_vocabulary(model, [list(range(50, 50 + DRAFT_SIZE // 2)), [7, 7, 7]])
    return model


def test_a_tree_wider_than_the_draft_vocabulary_is_refused_with_the_fix():
    model = heads_model("ffn", num_heads=2, draft_vocab_size=4, noise=0.0)
    ids = torch.tensor([[5, 9, 33, 71]])
    with pytest.raises(ValueError, match=r"head 2 for its top 6 candidates, but the heads' draft vocabulary .* has 4 "
                                         r"tokens; use paths whose entries at depth 2 are below 4"):
        model.generate(ids, max_new_tokens=4, do_sample=False, mtp_depth=2, mtp_tree=[(0,), (0, 5)],
                       pad_token_id=PAD)
    within = model.generate(ids, max_new_tokens=4, do_sample=False, mtp_depth=2, mtp_tree=[(0,), (0, 3)],
                            pad_token_id=PAD)
    plain = model.generate(ids, max_new_tokens=4, do_sample=False, mtp_speculate=False, pad_token_id=PAD)
    assert torch.equal(within, plain)


@pytest.mark.parametrize("head_type", ["ffn", "sequential"])
def test_head_logits_are_the_full_logits_on_the_draft_tokens_and_minus_inf_elsewhere(head_type):
    model = fitted_model(head_type)
    torch.manual_seed(0)  # the same heads, predicting over the whole vocabulary
    full_model = get_peft_model(make_model("llama"), MTPConfig(num_heads=3, head_type=head_type, head_init="random"))
    ids = torch.randint(3, VOCAB_SIZE, (2, 10))
    with torch.no_grad():
        ours = model(input_ids=ids, output_mtp_logits=True).mtp_logits
        full = full_model(input_ids=ids, output_mtp_logits=True).mtp_logits
    inside = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    inside[draft_ids(model)] = True
    assert torch.isneginf(ours[..., ~inside]).all()
    torch.testing.assert_close(ours[..., inside], full[..., inside], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target_source", ["labels", "argmax", "soft"])
def test_loss_is_cross_entropy_over_the_draft_tokens_and_misses_count(target_source):
    model = fitted_model(head_target_source=target_source)
    tuner = model.base_model
    ids = torch.randint(3, VOCAB_SIZE, (2, 12))
    ids[0, 5:8] = torch.tensor([51, 52, 7])  # some targets inside the draft vocabulary
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(input_ids=ids, labels=labels, output_mtp_logits=True)
    chunked_grads = torch.autograd.grad(out.mtp_loss, params, retain_graph=True)

    # Reference: full logits restricted to the draft tokens, plain cross-entropy / KL over those columns.
    vocab = draft_ids(model)
    logits = out.mtp_logits[..., vocab].float()  # (B, T, K, N)
    model_logits = out.logits.detach().float()
    if target_source == "argmax":
        labels = torch.where(labels[:, 1:] != IGNORE_INDEX, model_logits[:, :-1].argmax(-1), IGNORE_INDEX)
        labels = torch.cat([torch.full_like(ids[:, :1], IGNORE_INDEX), labels], dim=1)
    slots = torch.full((VOCAB_SIZE,), -1, dtype=torch.long)
    slots[vocab] = torch.arange(len(vocab))
    expected, expected_acc = 0.0, []
    for k, weight in enumerate(tuner.active_config().head_loss_weights(), start=1):
        targets = head_targets(labels, k)
        valid = targets != IGNORE_INDEX
        if target_source == "soft":
            teacher = F.log_softmax(model_logits[:, k:][valid[:, : ids.shape[1] - k]][:, vocab], -1)
            student = F.log_softmax(logits[:, :, k - 1][valid], -1)
            loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
            expected_acc.append((student.argmax(-1) == teacher.argmax(-1)).float().mean())
        else:
            y = slots[targets[valid]]
            inside = y >= 0
            loss = F.cross_entropy(logits[:, :, k - 1][valid][inside], y[inside]) if inside.any() else 0.0
            hits = (logits[:, :, k - 1][valid].argmax(-1) == y) & inside
            expected_acc.append(hits.float().sum() / valid.sum())  # a target outside is a miss
        expected = expected + weight * loss
    torch.testing.assert_close(out.mtp_loss, torch.as_tensor(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mtp_head_accuracies, torch.stack(expected_acc).float(), atol=1e-6, rtol=0)
    for got, want in zip(chunked_grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_save_and_load_restore_the_draft_tokens_exactly(tmp_path):
    model = fitted_model("mha_ffn")
    before = draft_ids(model).clone()
    assert before.tolist() != list(range(DRAFT_SIZE))  # fitted, not the placeholder
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(make_model("llama"), str(tmp_path))
    assert torch.equal(draft_ids(loaded), before)
    assert bool(loaded.base_model.active_heads().draft_vocab.fitted)
    ids = torch.randint(3, VOCAB_SIZE, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, output_mtp_logits=True).mtp_logits,
                           loaded(input_ids=ids, output_mtp_logits=True).mtp_logits)


# ----------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("head_type, tree", [(h, None) for h in HEAD_TYPES] + [("ffn", True), ("cnn", True)])
def test_decoding_is_exact_and_drafts_only_draft_tokens(head_type, tree, monkeypatch):
    model = heads_model(head_type, num_heads=3, draft_vocab_size=DRAFT_SIZE, noise=0.0)
    vocabulary = model.base_model.active_heads().draft_vocab
    vocabulary.fit(torch.rand(VOCAB_SIZE, generator=torch.Generator().manual_seed(0)))
    drafted = []
    original = SpeculativeDecoder._draft

    def recording(self, tree_, depth):
        tokens, probs = original(self, tree_, depth)
        drafted.append(tokens[:, 1:].flatten())
        return tokens, probs

    monkeypatch.setattr(SpeculativeDecoder, "_draft", recording)
    ids, mask = padded_batch([5, 8, 3], seed=1)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    plain = model.generate(**common, mtp_speculate=False)
    ours = model.generate(**common, mtp_depth=3, mtp_tree=tree, return_dict_in_generate=True)
    assert torch.equal(plain, ours.sequences)
    drafted = torch.cat(drafted)
    assert drafted.numel() and torch.isin(drafted, vocabulary.token_ids).all()


def test_decoding_scores_the_draft_vocabulary_through_the_measured_small_row_kernel(monkeypatch):
    # The rows gathered from the unembedding are a bare tensor that `fast_small_row_linear` cannot switch;
    # `fast_linear.linear` gives them the open block's kernel choice (at one row F.linear was several times slower).
    model = heads_model("sequential", num_heads=2, draft_vocab_size=DRAFT_SIZE, noise=0.0)
    model.base_model.active_heads().draft_vocab.fit(torch.rand(VOCAB_SIZE, generator=torch.Generator().manual_seed(0)))
    scored = []  # (rows, a block was open) of every product over the draft vocabulary's rows
    original = fast_linear.linear

    def recording(x, weight, bias=None):
        if weight.shape[0] == DRAFT_SIZE:
            scored.append((x.reshape(-1, x.shape[-1]).shape[0], bool(fast_linear._OPEN_BLOCKS)))
        return original(x, weight, bias)

    monkeypatch.setattr(fast_linear, "linear", recording)
    ids, mask = padded_batch([5, 8], seed=2)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    plain = model.generate(**common, mtp_speculate=False)
    assert torch.equal(model.generate(**common, mtp_depth=2), plain)
    assert scored and all(open_block for _, open_block in scored)  # every draft step, inside generate's block
    assert min(rows for rows, _ in scored) <= 2  # the small row counts this is for


def test_heads_that_cannot_draft_the_model_s_tokens_accept_nothing_and_stay_exact():
    # A vocabulary the model's greedy tokens never enter: every draft is rejected, output unchanged.
    model = heads_model("ffn", num_heads=2, draft_vocab_size=4, noise=0.0)
    ids = torch.tensor([[5, 9, 33, 71]])
    plain = model.generate(ids, max_new_tokens=16, do_sample=False, mtp_speculate=False, pad_token_id=PAD)
    counts = torch.ones(VOCAB_SIZE)
    counts[plain[0]] = 0  # fitted on everything but those tokens
    model.base_model.active_heads().draft_vocab.fit(counts)
    out = model.generate(ids, max_new_tokens=16, do_sample=False, mtp_depth=2, return_dict_in_generate=True,
                         pad_token_id=PAD)
    assert torch.equal(plain, out.sequences)
    assert out.mtp_stats.accepted[0] == 0 and out.mtp_stats.proposed[0] > 0


@pytest.mark.parametrize("head_type", ["ffn", "sequential"])
def test_sampling_with_a_draft_vocabulary_is_exact(head_type):
    model = model_with_heads(head_type, draft_vocab_size=16)
    exact, conditionals = exact_distribution(model.base_model.model)
    # The 16 tokens the model favours over the sampled steps: drafts are often, not always, right.
    model.base_model.active_heads().draft_vocab.fit(sum(conditionals.values()).double())
    samples, stats = sample(model)
    assert chi_square_p_value(samples, exact) > 1e-3
    assert 0 < stats.accepted[0] < stats.proposed[0]


# ----------------------------------------------------------------------------------------------
# Training


def test_the_sft_trainer_fits_the_vocabulary_on_its_training_set_and_trains(tmp_path):
    dataset = lm_dataset(num_rows=16)
    trainer = make_trainer(tmp_path, peft_config=MTPConfig(num_heads=2, draft_vocab_size=DRAFT_SIZE), dataset=dataset)
    vocabulary = trainer.model.base_model.active_heads().draft_vocab
    assert bool(vocabulary.fitted)
    counts = count_tokens(trainer.train_dataset["input_ids"], VOCAB_SIZE)
    most_frequent = set(torch.sort(-counts, stable=True).indices[:DRAFT_SIZE].tolist())
    assert set(vocabulary.token_ids.tolist()) == most_frequent
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    logged = [entry for entry in trainer.state.log_history if "mtp/head1_acc" in entry]
    assert logged and all(0.0 <= entry["mtp/head1_acc"] <= 1.0 for entry in logged)


def test_an_unfittable_training_set_warns_instead_of_training_on_placeholder_ids():
    from peft_mtp.draft_vocab import fit_on_dataset

    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=1, draft_vocab_size=DRAFT_SIZE))
    with pytest.warns(UserWarning, match="draft vocabulary is not fitted"):
        assert not fit_on_dataset(model.base_model, None)
    assert not bool(model.base_model.active_heads().draft_vocab.fitted)


def test_a_fitted_vocabulary_is_not_refitted_by_a_new_trainer(tmp_path):
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=1, draft_vocab_size=DRAFT_SIZE))
    chosen = fit_draft_vocabulary(model, [[100, 101, 102]]).clone()
    make_trainer(tmp_path, model=model)
    assert torch.equal(draft_ids(model), chosen)


def test_warmup_trains_on_the_draft_vocabulary():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type="ffn", draft_vocab_size=DRAFT_SIZE))
    cached = cache_trunk_outputs(model, _batches(), progress=False)
    labels = torch.cat([b.labels.flatten() for b in cached])
    fit_draft_vocabulary(model, [labels.tolist()])
    first = warmup_heads(model, cached, epochs=1, learning_rate=1e-9, progress=False)
    result = warmup_heads(model, cached, epochs=30, learning_rate=1e-2, progress=False)
    assert all(after < before for after, before in zip(result.head_losses, first.head_losses))
    assert all(0.0 <= acc <= 1.0 for acc in result.head_accuracies)
