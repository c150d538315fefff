"""Training MTP heads with TRL's plain SFTTrainer (issue 3): the loss hook, modes, metrics and compatibility.

Everything runs on tiny random models (tests/tiny_models.py) and a word-level tokenizer built in code, with
`bf16=False` and `use_cpu=True` (SFTConfig's CPU defaults are bf16 + gradient checkpointing, 10x slower).
"""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import VOCAB_SIZE, make_config, make_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from peft_mtp import MTPConfig, head_targets
from peft_mtp.alignment import IGNORE_INDEX
from peft_mtp.distill import build_self_distilled_dataset, generate_user_requests, request_prefix
from peft_mtp.loss import FusedLinearCrossEntropy, Unembedding, fused_linear_cross_entropy
from peft_mtp.training import expected_acceptance_length, mtp_param_groups

# transformers 5.24 renames TrainingArguments.gradient_checkpointing; TRL 1.16 still reads the old name.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> {% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: `"t5 t9"` -> [5, 9]; 0/1/2 are pad/bos/eos."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB_SIZE)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", chat_template=CHAT_TEMPLATE)


def token_rows(num_rows: int = 16, seed: int = 0, min_len: int = 10, max_len: int = 20) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num_rows,), generator=generator).tolist()
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in lengths]


def lm_dataset(num_rows: int = 16, seed: int = 0, **kwargs) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": token_rows(num_rows, seed, **kwargs)})


def sft_args(tmp_path, **overrides) -> SFTConfig:
    """CPU-friendly SFTConfig: fp32, no gradient checkpointing, no reporting, no dataloader shuffling surprises."""
    kwargs = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0, max_length=64, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def make_trainer(tmp_path, model=None, peft_config=None, dataset=None, **overrides) -> SFTTrainer:
    model = model if model is not None else make_model("llama")
    return SFTTrainer(model=model, args=sft_args(tmp_path, **overrides), train_dataset=dataset or lm_dataset(),
                      processing_class=make_tokenizer(), peft_config=peft_config)


def head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".mtp_heads." in name}


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if ".mtp_heads." not in name and "lora_" not in name}


# ----------------------------------------------------------------------------------------------
# The chunked loss against a naive reference


def naive_mtp_loss(model, input_ids, labels, position_ids=None, target_source="labels"):
    """Reference: full `(B, T, K, V)` logits, plain cross-entropy / KL per head over valid targets."""
    tuner = model.base_model
    config = tuner.active_config()
    out = model(input_ids=input_ids, position_ids=position_ids, output_mtp_logits=True)
    logits = out.mtp_logits.float()  # (B, T, K, V)
    model_logits = out.logits.float()  # (B, T, V)
    if target_source == "argmax":
        predicted = torch.full_like(labels, IGNORE_INDEX)
        predicted[:, 1:] = torch.where(labels[:, 1:] != IGNORE_INDEX, model_logits[:, :-1].argmax(-1), IGNORE_INDEX)
        labels = predicted
    total = 0.0
    for k, weight in enumerate(config.head_loss_weights(), start=1):
        targets = head_targets(labels, k, position_ids)
        valid = targets != IGNORE_INDEX
        if not valid.any():
            continue
        if target_source == "soft":
            teacher = F.log_softmax(model_logits[:, k:].detach(), -1)[valid[:, : labels.shape[1] - k]]
            student = F.log_softmax(logits[:, :, k - 1][valid], -1)
            loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits[:, :, k - 1][valid], targets[valid])
        total = total + weight * loss
    return total


def chunked_mtp_loss(model, input_ids, labels, position_ids=None):
    out = model(input_ids=input_ids, labels=labels, position_ids=position_ids)
    return out.mtp_loss


@pytest.mark.parametrize(
    "arch, head_type, target_source, share_unembedding",
    [
        ("llama", "ffn", "labels", True),
        ("llama", "sequential", "labels", True),
        ("llama", "ffn", "labels", False),
        ("gemma2", "ffn", "labels", True),  # soft-capped logits
        ("llama", "ffn", "argmax", True),
        ("gemma2", "mha_ffn", "soft", True),
    ],
)
def test_chunked_loss_matches_naive_reference(arch, head_type, target_source, share_unembedding):
    torch.manual_seed(0)
    model = get_peft_model(make_model(arch), MTPConfig(num_heads=3, head_type=head_type, head_init="random",
                                                       head_target_source=target_source,
                                                       share_unembedding=share_unembedding))
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 12))
    labels = input_ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[1, 9] = IGNORE_INDEX
    params = [p for p in model.parameters() if p.requires_grad]

    expected = naive_mtp_loss(model, input_ids, labels, target_source=target_source)
    expected_grads = torch.autograd.grad(expected, params)
    actual = chunked_mtp_loss(model, input_ids, labels)
    actual_grads = torch.autograd.grad(actual, params)

    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head_type", ["ffn", "sequential"])
def test_feature_loss_regresses_head_k_onto_the_trunk_state_at_t_plus_k(head_type):
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type=head_type, head_init="random",
                                                          head_feature_loss_weight=0.5))
    plain = copy.deepcopy(model)
    plain.peft_config["default"].head_feature_loss_weight = 0.0
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 10))
    labels = input_ids.clone()
    labels[0, :3] = IGNORE_INDEX
    tuner = model.base_model
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    # Reference: the head outputs of the same pass, against the trunk's hidden state k positions later.
    from peft_mtp.heads import HeadContext

    with torch.no_grad(), tuner.get_trunk().capture(num_layer_kwargs=tuner.active_heads().num_layer_kwargs) as trunk:
        tuner.model(input_ids=input_ids)
        context = HeadContext(input_ids=input_ids, layer_kwargs=trunk.layer_kwargs, embed=tuner.get_trunk().embed)
        head_hidden = tuner.active_heads()(trunk.hidden, context)
    expected = plain(input_ids=input_ids, labels=labels).mtp_loss
    for k, weight in enumerate(tuner.active_config().head_loss_weights(), start=1):
        valid = head_targets(labels, k) != IGNORE_INDEX
        target = trunk.hidden[:, k:][valid[:, : 10 - k]]
        expected = expected + weight * 0.5 * F.smooth_l1_loss(head_hidden[:, :, k - 1][valid], target)
    # Two separate forwards of the heads (here and inside the model): equal up to float rounding.
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-4, atol=1e-6)
    assert out.mtp_loss > plain(input_ids=input_ids, labels=labels).mtp_loss


def test_fused_kernel_matches_cross_entropy_with_bias_scale_and_small_chunks():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    unembedding = Unembedding(norm=lambda h: h, weight=weight, bias=bias, logit_scale=0.7, softcap=3.0)

    loss, hits = fused_linear_cross_entropy(hidden, unembedding, targets=targets, chunk_rows=8)
    logits = unembedding.logits(hidden)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert hits.item() == (logits.argmax(-1) == targets).sum().item()
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    want = torch.autograd.grad(expected, (hidden, weight, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_fused_kernel_scales_by_incoming_gradient():
    # The forward precomputes d(loss_sum)/d(hidden); backward must scale it by whatever multiplies the loss.
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    targets = torch.randint(0, 11, (5,))
    loss, _ = FusedLinearCrossEntropy.apply(hidden, weight, None, targets, None, 1.0, None, 2)
    (grad,) = torch.autograd.grad(-3.0 * loss, hidden)
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (want,) = torch.autograd.grad(-3.0 * expected, hidden)
    torch.testing.assert_close(grad, want)


def test_all_masked_batch_gives_finite_zero_loss():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=3))
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 6))
    out = model(input_ids=input_ids, labels=torch.full_like(input_ids, IGNORE_INDEX))
    assert torch.isfinite(out.mtp_loss) and out.mtp_loss.item() == 0.0
    out.mtp_loss.backward()  # connected graph, zero gradients
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    # Shorter than K + 1: no head has a target either.
    short = torch.randint(3, VOCAB_SIZE, (2, 2))
    assert model(input_ids=short, labels=short).mtp_loss.item() == 0.0


def test_masked_labels_are_ignored_by_heads():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_init="random"))
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 10))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    out = model(input_ids=input_ids, labels=labels)
    # Head k has a target at t only if label t+1+k is kept: positions 5..9 are kept, so t in [4-k, 8-k].
    assert out.mtp_head_losses.shape == (2,)
    counts = [int((head_targets(labels, k) != IGNORE_INDEX).sum()) for k in (1, 2)]
    assert counts == [2 * 5, 2 * 5]
    # Changing the inputs' tokens inside the masked prompt changes hidden states, not which targets count;
    # changing a masked label's value changes nothing.
    other = labels.clone()
    other[labels == IGNORE_INDEX] = IGNORE_INDEX
    torch.testing.assert_close(model(input_ids=input_ids, labels=other).mtp_loss, out.mtp_loss)


def test_head_loss_sample_rate_scores_a_share_of_targets_in_training_only():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_loss_sample_rate=0.25))
    input_ids = torch.randint(3, VOCAB_SIZE, (8, 32))
    full = [int((head_targets(input_ids, k) != IGNORE_INDEX).sum()) for k in (1, 2)]
    captured = {}
    original = model.base_model.compute_mtp_loss

    def spy(*args, **kwargs):
        captured["result"] = original(*args, **kwargs)
        return captured["result"]

    model.base_model.compute_mtp_loss = spy
    torch.manual_seed(0)
    model.train()(input_ids=input_ids, labels=input_ids)
    sampled = captured["result"].head_counts.tolist()
    assert all(0.1 * n < s < 0.4 * n for s, n in zip(sampled, full)), (sampled, full)
    model.eval()(input_ids=input_ids, labels=input_ids)
    assert captured["result"].head_counts.tolist() == full


def test_packed_batch_heads_never_cross_documents():
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=3, head_init="random")).eval()
    doc_a, doc_b = torch.randint(3, VOCAB_SIZE, (1, 7)), torch.randint(3, VOCAB_SIZE, (1, 5))
    packed = torch.cat([doc_a, doc_b], dim=1)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]
    labels = packed.clone()
    labels[0, 7] = IGNORE_INDEX  # TRL masks the first token of each packed document
    for k in (1, 2, 3):
        targets = head_targets(labels, k, position_ids)
        valid_t = (targets[0] != IGNORE_INDEX).nonzero().flatten()
        assert all((t < 7) == (t + 1 + k < 7) for t in valid_t.tolist()), f"head {k} crosses a document"
    with torch.no_grad():
        # use_cache=False, as trainers pass it: transformers builds the block-diagonal mask only without a cache.
        packed_out = model(input_ids=packed, labels=labels, position_ids=position_ids, use_cache=False)
        a = model(input_ids=doc_a, labels=doc_a)
        b = model(input_ids=doc_b, labels=doc_b)
    # The packed per-head sums are exactly the two documents' sums: nothing leaks across the boundary.
    sums_packed = packed_out.mtp_head_losses * torch.tensor([7 - 2 + 5 - 2, 7 - 3 + 5 - 3, 7 - 4 + 5 - 4])
    sums_apart = a.mtp_head_losses * torch.tensor([5, 4, 3]) + b.mtp_head_losses * torch.tensor([3, 2, 1])
    torch.testing.assert_close(sums_packed, sums_apart, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The loss hook inside SFTTrainer


def test_trl_loss_equals_next_token_plus_weighted_mtp_loss(tmp_path):
    config = MTPConfig(num_heads=2, head_init="random", mtp_loss_weight=0.5,
                       lora_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainer = make_trainer(tmp_path, peft_config=config)
    model = trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    params = [p for p in model.parameters() if p.requires_grad]

    loss = trainer.compute_loss(model, dict(batch))
    grads = torch.autograd.grad(loss, params)
    reference_out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    reference = reference_out.loss  # the model's plain path: next-token loss + 0.5 * MTP loss
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # With gradient accumulation TRL divides by the step's token count; the MTP loss follows the same share.
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    loss_ga = trainer.compute_loss(model, dict(batch), num_items_in_batch=3 * n)
    torch.testing.assert_close(loss_ga, reference / 3, rtol=1e-5, atol=1e-6)


def test_plain_sft_trainer_frozen_trunk_trains_heads_only_and_logs_metrics(tmp_path):
    eval_dataset = lm_dataset(4, seed=1)
    trainer = SFTTrainer(
        model=make_model("llama"), processing_class=make_tokenizer(), train_dataset=lm_dataset(),
        eval_dataset=eval_dataset, peft_config=MTPConfig(num_heads=2, head_type="ffn"),
        args=sft_args(tmp_path, gradient_checkpointing=True, eval_strategy="steps", eval_steps=3),
    )
    heads_before, base_before = head_state(trainer.model), base_state(trainer.model)
    trainer.train()
    heads_after, base_after = head_state(trainer.model), base_state(trainer.model)
    assert any(not torch.equal(heads_before[n], heads_after[n]) for n in heads_before), "heads did not train"
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before), "the frozen trunk changed"

    train_logs = [log for log in trainer.state.log_history if "loss" in log and "eval_loss" not in log]
    for name in ("mtp/head1_loss", "mtp/head1_acc", "mtp/head2_loss", "mtp/head2_acc", "mtp/acceptance_length",
                 "mtp/loss", "mtp/weight", "entropy", "mean_token_accuracy"):
        assert all(name in log for log in train_logs), name
    log = train_logs[0]
    # The logged loss is TRL's total: next-token loss + weight * MTP loss.
    assert math.isclose(log["loss"], log["mtp/next_token_loss"] + log["mtp/weight"] * log["mtp/loss"], rel_tol=1e-4)
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert eval_logs and all(f"eval_mtp/head{k}_loss" in eval_logs[0] for k in (1, 2))
    assert "eval_mtp/acceptance_length" in eval_logs[0]


def test_get_peft_model_joint_lora_head_lr_and_weight_schedule(tmp_path):
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    config = MTPConfig(num_heads=2, lora_config=lora, head_lr_multiplier=4.0, mtp_loss_weight=0.3,
                       mtp_loss_weight_final=0.1)
    model = get_peft_model(make_model("llama"), config)
    trainer = make_trainer(tmp_path, model=model, max_steps=5)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert any(not torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in lora_before.items())

    head_ids = {id(p) for n, p in trainer.model.named_parameters() if ".mtp_heads." in n}
    initial_lrs = {(any(id(p) in head_ids for p in g["params"])): g["initial_lr"]
                   for g in trainer.optimizer.param_groups}
    assert initial_lrs == {True: pytest.approx(4e-2), False: pytest.approx(1e-2)}
    weights = [log["mtp/weight"] for log in trainer.state.log_history if "mtp/weight" in log]
    assert weights == pytest.approx([0.3, 0.26, 0.22, 0.18, 0.14])


def test_mtp_param_groups_separates_heads():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, lora_config=LoraConfig(r=2)))
    groups = mtp_param_groups(model, learning_rate=1e-3, head_lr_multiplier=5.0)
    head_group = [g for g in groups if g["lr"] == pytest.approx(5e-3)]
    assert head_group and all(".mtp_heads." in n for n, p in model.named_parameters()
                              if any(p is q for q in head_group[0]["params"]))
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    rows = datasets.Dataset.from_dict({"input_ids": [token_rows(1, seed=3, min_len=12, max_len=12)[0]] * 8})
    config = MTPConfig(num_heads=2, head_init="random")
    # SGD: one step moves each weight by lr * gradient (AdamW's first step, g / |g|, amplifies float noise).
    big = make_trainer(tmp_path / "big", peft_config=copy.deepcopy(config), dataset=rows, max_steps=1,
                       per_device_train_batch_size=4, optim="sgd")
    before = head_state(big.model)
    big.train()
    assert any(not torch.equal(before[n], v) for n, v in head_state(big.model).items())
    accumulated = make_trainer(tmp_path / "ga", peft_config=copy.deepcopy(config), dataset=rows, max_steps=1,
                               per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd")
    accumulated.train()
    for name, value in head_state(big.model).items():
        torch.testing.assert_close(head_state(accumulated.model)[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding_free", [False, True], ids=["packing", "padding_free"])
def test_packed_training_passes_position_ids_to_the_heads(tmp_path, padding_free):
    seen = {}
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type="sequential"))
    original = model.base_model.compute_mtp_loss

    def spy(head_hidden, labels, position_ids=None, **kwargs):
        seen["position_ids"] = position_ids
        seen["labels"] = labels
        return original(head_hidden, labels, position_ids, **kwargs)

    model.base_model.compute_mtp_loss = spy
    overrides = dict(packing=True, max_length=48) if not padding_free else dict(padding_free=True, max_length=None)
    trainer = make_trainer(tmp_path, model=model, max_steps=1, **overrides)
    trainer.train()
    position_ids = seen["position_ids"]
    assert position_ids is not None and (position_ids[:, 1:] == 0).any(), "no packed document boundary reached the heads"
    labels = seen["labels"]
    for k in (1, 2):
        valid = head_targets(labels, k, position_ids) != IGNORE_INDEX
        start = position_ids.expand_as(labels)
        shifted = torch.full_like(start, -1)
        shifted[:, : -(1 + k)] = start[:, 1 + k:]
        assert ((shifted - start)[valid] == 1 + k).all()


def test_resume_from_checkpoint_restores_heads_exactly(tmp_path):
    config = MTPConfig(num_heads=2, head_init="random")
    full = make_trainer(tmp_path / "full", peft_config=copy.deepcopy(config), max_steps=4, save_strategy="steps",
                        save_steps=2)
    full.train()
    resumed = make_trainer(tmp_path / "part", peft_config=copy.deepcopy(config), max_steps=4, save_strategy="steps",
                           save_steps=2)
    # Only the first half ran in the "interrupted" run: reuse its checkpoint-2.
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for name, value in head_state(full.model).items():
        torch.testing.assert_close(head_state(resumed.model)[name], value, rtol=0, atol=0)

    # A save_steps checkpoint is a plain PEFT adapter folder.
    loaded = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "full" / "checkpoint-4"))
    for name, value in head_state(full.model).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, config_kwargs, match",
    [
        (dict(loss_type="dft"), {}, "loss_type"),
        (dict(label_smoothing_factor=0.1), {}, "label_smoothing_factor"),
        (dict(packing=True), {"head_type": "cnn"}, "head_type"),
    ],
    ids=["dft", "label_smoothing", "cnn_packing"],
)
@pytest.mark.filterwarnings("ignore:`label_smoothing_factor` is deprecated:FutureWarning")
def test_incompatible_settings_raise_at_construction(tmp_path, overrides, config_kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, peft_config=MTPConfig(num_heads=2, **config_kwargs), **overrides)


def test_compute_loss_func_raises_at_construction(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func"), pytest.warns(FutureWarning):
        SFTTrainer(model=make_model("llama"), args=sft_args(tmp_path), train_dataset=lm_dataset(),
                   processing_class=make_tokenizer(), peft_config=MTPConfig(num_heads=2),
                   compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())


def test_lora_with_gradient_checkpointing_trains_trunk_and_heads(tmp_path):
    config = MTPConfig(num_heads=2, lora_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer = make_trainer(tmp_path, peft_config=config, max_steps=2, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in before.items() if not torch.equal(p, after[n])}
    assert any("lora_B" in n for n in changed) and any(".mtp_heads." in n for n in changed)


def test_conversational_prompt_completion_masks_the_prompt_for_heads(tmp_path):
    seen = []
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2))
    original = model.base_model.compute_mtp_loss

    def spy(head_hidden, labels, position_ids=None, **kwargs):
        result = original(head_hidden, labels, position_ids, **kwargs)
        seen.append((labels, result.head_counts))
        return result

    model.base_model.compute_mtp_loss = spy
    rows = [{"prompt": [{"role": "user", "content": "t5 t6 t7 t8"}],
             "completion": [{"role": "assistant", "content": "t9 t10 t11 t12 t13"}]}] * 4
    make_trainer(tmp_path, model=model, dataset=datasets.Dataset.from_list(rows), max_steps=1).train()
    labels, counts = seen[0]
    assert (labels[:, :4] == IGNORE_INDEX).all(), "the prompt is not masked"
    expected = [int((head_targets(labels, k) != IGNORE_INDEX).sum()) for k in (1, 2)]
    assert counts.tolist() == expected and expected[0] > 0


def test_self_distillation_argmax_trains(tmp_path):
    trainer = make_trainer(tmp_path, peft_config=MTPConfig(num_heads=2, head_target_source="argmax"), max_steps=2)
    before = head_state(trainer.model)
    trainer.train()
    assert any(not torch.equal(before[n], v) for n, v in head_state(trainer.model).items())
    assert "mtp/head1_acc" in trainer.state.log_history[0]


# ----------------------------------------------------------------------------------------------
# Self-distilled data


def test_build_self_distilled_dataset_batched_equals_one_by_one():
    tokenizer = make_tokenizer()
    config = make_config("llama")
    config.initializer_range = 0.5  # large weights: greedy outputs depend on the prompt (std 0.02 repeats one token)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model = get_peft_model(base, MTPConfig(num_heads=2))
    prompts = [[{"role": "user", "content": " ".join(f"t{i}" for i in range(5 + n, 5 + 2 * n))}] for n in (2, 6, 3)]
    prompts[1].append({"role": "assistant", "content": "t9"})  # a finished conversation: its answer is regenerated
    # Special ids suppressed so that every answer has visible tokens to compare.
    kwargs = dict(max_new_tokens=6, show_progress=False, suppress_tokens=[0, 1, 2])
    batched = build_self_distilled_dataset(model, tokenizer, prompts, batch_size=3, **kwargs)
    single = build_self_distilled_dataset(model, tokenizer, prompts, batch_size=1, **kwargs)
    # Left padding: a prompt's answer does not depend on the others in its batch.
    assert batched["completion"] == single["completion"]
    assert len({c[0]["content"] for c in batched["completion"]}) == 3
    assert batched["prompt"][1] == prompts[1][:1] and batched["completion"][0][0]["role"] == "assistant"
    assert tokenizer.padding_side == "right"  # restored

    plain = build_self_distilled_dataset(model, tokenizer, datasets.Dataset.from_dict({"prompt": ["t5 t6", "t7"]}),
                                         batch_size=2, **kwargs)
    assert plain.column_names == ["prompt", "completion"] and plain["completion"][0].startswith(" t")


class _ScriptedWriter(torch.nn.Module):
    """Stands in for a model in `generate_user_requests`: each `generate` call returns the next scripted batch."""

    def __init__(self, tokenizer, batches: list[list[str]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.batches, self.calls = tokenizer, list(batches), []
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": tokenizer.eos_token_id})()

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids.clone(), kwargs, torch.rand(1).item()))  # the draw shows the seed used
        rows = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in self.batches.pop(0)]
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids[: len(rows)], new], dim=1)


def test_model_written_requests_are_complete_distinct_and_never_near_an_excluded_text():
    tokenizer = make_tokenizer()
    assert request_prefix(tokenizer) == "<s> "  # the template up to the user's text
    batches = [
        ["t5 t6 t7 </s>", "t5 t6 t7 t8", "t9 t10 t11 t12 </s>"],  # 2nd: no end of turn (cut by max_new_tokens)
        ["t7 t6 t5 </s>", "t20 t21 </s>", "t30 t31 t32 t33 </s>"],  # same words as the 1st; too short; excluded
        ["t40 t41 t42 </s>", "t50 t51 t52 </s>", "t60 t61 t62 </s>"],
    ]
    writer = _ScriptedWriter(tokenizer, batches)
    state = torch.random.get_rng_state()
    requests = generate_user_requests(writer, tokenizer, num_requests=3, batch_size=3, seed=7,
                                      exclude=["t30 t31 t32 t34"], show_progress=False)
    assert requests == ["t5 t6 t7", "t9 t10 t11 t12", "t40 t41 t42"]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    prompts, kwargs, draws = zip(*writer.calls)
    assert all(p.tolist() == [[1]] * 3 for p in prompts) and all(k["do_sample"] for k in kwargs)
    seeded = []
    for seed in (7, 8, 9):  # batch i samples with seed + i
        torch.manual_seed(seed)
        seeded.append(torch.rand(1).item())
    assert list(draws) == seeded

    # Too few distinct requests: stops after max_batches with what it has.
    writer = _ScriptedWriter(tokenizer, [["t5 t6 t7 </s>"] * 2] * 2)
    assert generate_user_requests(writer, tokenizer, num_requests=5, batch_size=2, max_batches=2,
                                  show_progress=False) == ["t5 t6 t7"]
    assert len(writer.calls) == 2
    with pytest.raises(ValueError, match="chat template"):
        request_prefix(PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer))


def test_expected_acceptance_length():
    assert expected_acceptance_length([]) == 1.0
    assert expected_acceptance_length([1.0, 1.0]) == 3.0
    assert expected_acceptance_length([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
