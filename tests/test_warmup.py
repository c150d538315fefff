"""`peft_mtp.warmup`: heads trained on cached trunk outputs match what the model's own forward computes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB_SIZE, make_model

from peft_mtp import MTPConfig, warmup
from peft_mtp.heads import HeadContext
from peft_mtp.loss import model_predictions
from peft_mtp.warmup import cache_trunk_outputs, warmup_heads

HEAD_TYPES = ("ffn", "sequential", "mha_ffn")


def _batches(num_batches: int = 3, batch_size: int = 4, length: int = 12, seed: int = 0):
    """Right-padded batches of a repeating pattern (learnable), labels -100 on a 3-token prompt and on padding."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        starts = torch.randint(3, VOCAB_SIZE - length, (batch_size, 1), generator=generator)
        input_ids = (starts + torch.arange(length)) % VOCAB_SIZE  # (B, T): t -> t+1 is learnable
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -3:] = 0  # one padded row
        input_ids = input_ids.masked_fill(attention_mask == 0, 0)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :3] = -100
        batches.append(dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels))
    return batches


@pytest.mark.parametrize("feature_layers", [None, [0]], ids=["trunk-output", "feature-layers"])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cached_head_outputs_equal_the_model_forward(head_type, feature_layers):
    # The cache holds exactly what a forward pass feeds the heads, so training on it trains the same function.
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type=head_type, head_init="random",
                                                           feature_layers=feature_layers))
    batch = _batches(num_batches=1)[0]
    (cached,) = cache_trunk_outputs(model, [batch], progress=False)
    assert (cached.layer_outputs is None) == (feature_layers is None)
    tuner = model.base_model
    heads = tuner.active_heads()
    context = HeadContext(input_ids=cached.input_ids, attention_mask=cached.attention_mask,
                          layer_kwargs=cached.layer_kwargs, embed=tuner.get_trunk().embed)
    with torch.no_grad():
        from_cache = heads.logits(heads(cached.head_input(heads), context), tuner.get_trunk())
        direct = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_mtp_logits=True).mtp_logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(from_cache[real], direct[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_type", ["sequential", "mha_ffn"])
def test_split_batches_give_the_heads_the_same_outputs_and_loss(head_type):
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type=head_type, head_init="random",
                                                           head_target_source="argmax", feature_layers=[0]))
    (cached,) = cache_trunk_outputs(model, _batches(num_batches=1, batch_size=5), progress=False)
    parts = cached.split(2)
    assert [part.input_ids.shape[0] for part in parts] == [2, 2, 1]
    tuner = model.base_model
    heads = tuner.active_heads()

    def run(batch):
        context = HeadContext(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              layer_kwargs=batch.layer_kwargs, embed=tuner.get_trunk().embed)
        hidden = heads(batch.head_input(heads), context)
        return hidden, tuner.compute_mtp_loss(hidden, batch.labels, trunk_hidden=batch.hidden, target_source="labels")

    with torch.no_grad():
        whole, whole_loss = run(cached)
        split = [run(part) for part in parts]
    real = cached.attention_mask.bool()
    torch.testing.assert_close(torch.cat([hidden for hidden, _ in split])[real], whole[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(sum(loss.head_correct for _, loss in split), whole_loss.head_correct)
    torch.testing.assert_close(sum(loss.head_loss_sums for _, loss in split), whole_loss.head_loss_sums)
    assert parts[1].hidden.data_ptr() == cached.hidden[2:].data_ptr()  # views, no copies
    assert parts[1].layer_outputs.data_ptr() == cached.layer_outputs[2:].data_ptr()
    with pytest.raises(ValueError, match="`rows` must be >= 1, got 0"):
        cached.split(0)
    if head_type == "sequential":  # decoder-layer heads record the trunk's layer arguments
        cached.layer_kwargs[0]["alibi"] = torch.zeros(5, 3)
        with pytest.raises(ValueError, match=r"Cannot split the cached layer argument 'alibi' \(shape \(5, 3\)\)"):
            cached.split(2)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_warmup_trains_heads_only_and_lowers_the_loss(head_type):
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type=head_type)).eval()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "mtp_heads" not in n}
    cached = cache_trunk_outputs(model, _batches(), progress=False)
    first = warmup_heads(model, cached, epochs=1, learning_rate=1e-9, progress=False)
    result = warmup_heads(model, cached, epochs=30, learning_rate=1e-2, progress=False)
    assert result.steps == 30 * len(cached)
    assert all(after < before for after, before in zip(result.head_losses, first.head_losses))
    for name, parameter in model.named_parameters():
        if name in base_before:
            assert torch.equal(parameter, base_before[name]), f"warm-up changed base parameter {name}"
    assert not model.base_model.active_heads().training  # the mode it was in before (eval)


@pytest.mark.parametrize("head_type", ["ffn", "sequential"])
def test_bf16_autocast_warmup_learns_like_float32_and_steps_outside_autocast(head_type, monkeypatch):
    # Inside autocast the optimizer step made real training diverge; the forward and backward alone may use bf16.
    in_autocast = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        in_autocast.append(torch.is_autocast_enabled("cpu"))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    results, forward_autocast = {}, []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type=head_type))
        cached = cache_trunk_outputs(model, _batches(), progress=False)
        heads = model.base_model.active_heads()
        heads.register_forward_hook(lambda module, args, output: forward_autocast.append(torch.is_autocast_enabled("cpu")))
        results[dtype] = warmup_heads(model, cached, epochs=30, learning_rate=1e-2, progress=False, autocast_dtype=dtype)
        assert all(p.dtype == torch.float32 for p in heads.parameters())
    torch.testing.assert_close(torch.tensor(results[torch.bfloat16].head_losses),
                               torch.tensor(results[None].head_losses), rtol=0.05, atol=0.0)
    steps = results[None].steps
    assert forward_autocast == [False] * steps + [True] * steps
    assert in_autocast == [False] * (2 * steps)


def test_argmax_targets_are_computed_once_when_caching_and_give_the_same_loss():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type="sequential", head_init="random",
                                                           head_target_source="argmax"))
    batch = _batches(num_batches=1)[0]
    (cached,) = cache_trunk_outputs(model, [batch], progress=False)
    assert cached.argmax_labels and not torch.equal(cached.labels, batch["labels"])
    tuner = model.base_model
    context = HeadContext(input_ids=cached.input_ids, attention_mask=cached.attention_mask,
                          layer_kwargs=cached.layer_kwargs, embed=tuner.get_trunk().embed)
    with torch.no_grad():
        head_hidden = tuner.active_heads()(cached.hidden, context)
        per_step = tuner.compute_mtp_loss(head_hidden, batch["labels"], trunk_hidden=cached.hidden)  # argmax mode
        precomputed = tuner.compute_mtp_loss(head_hidden, cached.labels, target_source="labels")
    torch.testing.assert_close(precomputed.loss, per_step.loss)
    assert torch.equal(precomputed.head_correct, per_step.head_correct)


def test_bf16_autocast_cache_runs_the_trunk_in_bf16_and_keeps_float32_outputs():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type="sequential",
                                                           head_target_source="argmax"))
    batch = _batches(num_batches=1)[0]
    trunk_autocast = []
    first_layer = model.base_model.get_trunk().layers[0]
    first_layer.register_forward_hook(lambda module, args, output: trunk_autocast.append(torch.is_autocast_enabled("cpu")))
    (exact,) = cache_trunk_outputs(model, [batch], progress=False)
    (fast,) = cache_trunk_outputs(model, [batch], progress=False, autocast_dtype=torch.bfloat16)
    assert trunk_autocast == [False, True]
    assert fast.hidden.dtype == torch.float32 and not torch.equal(fast.hidden, exact.hidden)  # bf16 matmuls ran
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(fast.hidden[real], exact.hidden[real], atol=0.1, rtol=0.05)
    # The targets are the float32 argmax of the hidden states the bf16 trunk produced, not a bf16 argmax.
    expected = model_predictions(batch["labels"], fast.hidden, model.base_model.head_unembedding(0))
    assert torch.equal(fast.labels, expected)
    trained = batch["labels"] != -100
    assert (fast.labels[trained] == exact.labels[trained]).float().mean() > 0.9  # near-ties may flip


def test_soft_targets_train_on_a_cache_taken_for_argmax_targets(monkeypatch):
    # One cache serves both target sources: in soft mode the cached labels only mark the trained positions.
    seen = []
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type="sequential",
                                                           head_target_source="argmax"))
    cached = cache_trunk_outputs(model, _batches(), progress=False)
    model.base_model.active_config().head_target_source = "soft"
    original = model.base_model.compute_mtp_loss

    def recording(*args, target_source=None, **kwargs):
        seen.append(target_source)
        return original(*args, target_source=target_source, **kwargs)

    monkeypatch.setattr(model.base_model, "compute_mtp_loss", recording)
    first = warmup_heads(model, cached, epochs=1, learning_rate=1e-9, progress=False)
    result = warmup_heads(model, cached, epochs=30, learning_rate=1e-2, progress=False)
    assert set(seen) == {"soft"}
    assert all(after < before for after, before in zip(result.head_losses, first.head_losses))


def test_time_limit_stops_early():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=1, head_type="ffn"))
    cached = cache_trunk_outputs(model, _batches(), progress=False)
    result = warmup_heads(model, cached, epochs=1000, time_limit_s=1e-9, progress=False)
    assert result.steps == 1  # the first step is always taken
    with pytest.raises(ValueError, match=r"`time_limit_s` must be > 0 seconds \(or None for no limit\), got 0.0"):
        warmup_heads(model, cached, time_limit_s=0.0, progress=False)
    with pytest.raises(ValueError, match="`batches` is empty"):
        warmup_heads(model, [], progress=False)


def test_metrics_report_the_last_full_pass_when_the_final_one_is_short():
    # At a learning rate of ~0 every pass scores the same; a pass over one batch of three would score differently.
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2, head_type="ffn", head_init="random"))
    cached = cache_trunk_outputs(model, _batches(), progress=False)
    one = warmup_heads(model, cached, epochs=1, learning_rate=1e-12, progress=False)
    cut_short = warmup_heads(model, cached, epochs=1.3, learning_rate=1e-12, progress=False)  # 4 steps: 3 + 1
    past_half = warmup_heads(model, cached, epochs=1.7, learning_rate=1e-12, progress=False)  # 5 steps: 3 + 2
    assert cut_short.steps == 4 and past_half.steps == 5
    torch.testing.assert_close(torch.tensor(cut_short.head_losses), torch.tensor(one.head_losses))
    assert cut_short.head_accuracies == one.head_accuracies
    assert not torch.allclose(torch.tensor(past_half.head_losses), torch.tensor(one.head_losses))


def _warm_up_on_a_fake_clock(monkeypatch, readings, time_limit_s: float):
    """Warm up with `peft_mtp.warmup`'s clock replaced by `readings`; return the result and each step's rate."""
    rates = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=1, head_type="ffn"))
    cached = cache_trunk_outputs(model, _batches(), progress=False)
    clock = iter(readings)
    monkeypatch.setattr(warmup, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    result = warmup_heads(model, cached, epochs=1000, learning_rate=1e-2, time_limit_s=time_limit_s, progress=False)
    return result, rates


def test_time_limit_fits_the_schedule_so_the_learning_rate_ends_near_zero(monkeypatch):
    # Every reading of the warm-up's clock is one second later, so each step takes one second and 30 fit.
    result, rates = _warm_up_on_a_fake_clock(monkeypatch, range(10**6), time_limit_s=30.5)
    assert result.steps == 30
    assert rates[-1] < 0.02 * max(rates)  # decayed to ~0 by the deadline, not cut off mid-schedule


def test_time_limit_is_used_whole_when_the_first_steps_are_slow(monkeypatch):
    # The first 10 steps take 3 s each, the rest 1 s: a schedule fitted to the first steps' pace would stop near 20
    # steps; the clock-driven one trains until the deadline and still ends near zero.
    readings = [0.0, *(3.0 * (i + 1) for i in range(10)), *(30.0 + i + 1 for i in range(10**4))]
    result, rates = _warm_up_on_a_fake_clock(monkeypatch, readings, time_limit_s=62.0)
    assert result.steps == 41  # 10 slow steps, 31 fast ones; the next would end past 62 s at the average pace
    assert rates[-1] < 0.02 * max(rates)


def test_trunk_lora_is_refused():
    # With a trainable trunk its outputs change every step: a cache would train on stale inputs.
    config = MTPConfig(num_heads=1, head_type="ffn", lora_config=LoraConfig(r=2, target_modules=["q_proj"]))
    model = get_peft_model(make_model("llama"), config)
    with pytest.raises(ValueError, match="frozen trunk"):
        cache_trunk_outputs(model, _batches(num_batches=1), progress=False)
