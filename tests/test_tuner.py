"""The MTP tuner as a PEFT adapter: save/load, disable, trainable parameters, trunk LoRA, several adapters, and the
errors a wrong or damaged checkpoint must raise.
"""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from testing_common import (  # noqa: F401 (one_torch_thread: autouse fixture)
    COPY_TEST_CASES,
    FEATURE_TEST_CASES,
    LORA_TEST_CASES,
    TEST_CASES,
    case_params,
    lora_config,
    make_mtp_model,
    one_torch_thread,
    random_ids,
    run,
)
from tiny_models import make_config, make_model
from transformers import AutoModelForCausalLM

from peft_mtp import MTPConfig

WEIGHTS = "adapter_model.safetensors"

# --------------------------------------------------------------------------------------------------------------------
# Every head type on every architecture


@pytest.mark.parametrize(**case_params(TEST_CASES + FEATURE_TEST_CASES + COPY_TEST_CASES))
def test_save_load_roundtrip_is_exact(tmp_path, arch, config_cls, config_kwargs):
    _check_save_load_roundtrip(tmp_path, arch, config_cls, config_kwargs)


@pytest.mark.parametrize(**case_params(TEST_CASES + LORA_TEST_CASES + FEATURE_TEST_CASES + COPY_TEST_CASES))
def test_disable_adapter_gives_base_logits_exactly(arch, config_cls, config_kwargs):
    _check_disable_adapter(arch, config_cls, config_kwargs)


@pytest.mark.parametrize(**case_params(TEST_CASES + LORA_TEST_CASES + FEATURE_TEST_CASES + COPY_TEST_CASES))
def test_only_adapter_parameters_are_trainable_and_training_moves_only_them(arch, config_cls, config_kwargs):
    _check_only_adapter_trainable(arch, config_cls, config_kwargs)


@pytest.mark.parametrize(**case_params(LORA_TEST_CASES))
def test_trunk_lora_is_saved_and_restored(tmp_path, arch, config_cls, config_kwargs):
    _check_lora_roundtrip(tmp_path, arch, config_cls, config_kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Several adapters


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_second_adapter_does_not_clash_with_the_first(tmp_path, arch):
    input_ids = random_ids()
    model = make_mtp_model(arch, head_type="ffn", num_heads=2, head_init="random")
    first = run(model, input_ids)
    model.add_adapter("second", MTPConfig(head_type="sequential", num_heads=3, head_init="random",
                                          lora_config=lora_config(arch)))
    assert run(model, input_ids).mtp_logits.equal(first.mtp_logits), "adding an adapter changed the active one"
    model.set_adapter("second")
    second = run(model, input_ids)
    assert second.mtp_logits.shape[2] == 3 and not second.logits.equal(first.logits)  # its own heads and LoRA
    model.set_adapter("default")
    assert run(model, input_ids).logits.equal(first.logits), "the second adapter's LoRA leaks into the first"

    model.save_pretrained(tmp_path)
    for name, folder in [("default", tmp_path), ("second", tmp_path / "second")]:
        saved, own = load_file(folder / WEIGHTS), _own_keys(model, name)
        assert saved.keys() == own.keys(), f"{name}'s file does not hold exactly its own weights"
        assert all(saved[key].equal(own[key]) for key in saved)
    assert not any("lora_" in key or ".heads.2." in key for key in load_file(tmp_path / WEIGHTS))  # 2 heads, no LoRA

    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path).eval()
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert run(loaded, input_ids).mtp_logits.equal(first.mtp_logits)
    loaded.set_adapter("second")
    assert run(loaded, input_ids).mtp_logits.equal(second.mtp_logits)
    loaded.delete_adapter("default")
    assert not any(".default." in name for name, _ in loaded.named_parameters())
    assert run(loaded, input_ids).mtp_logits.equal(second.mtp_logits)


def test_loading_an_adapter_under_a_new_name_equals_the_original(tmp_path):
    model = make_mtp_model("qwen2", head_type="cnn", num_heads=2, head_init="random")
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="copy")
    model.set_adapter("copy")
    copy_logits = run(model, random_ids()).mtp_logits
    model.set_adapter("default")
    assert copy_logits.equal(run(model, random_ids()).mtp_logits)


# --------------------------------------------------------------------------------------------------------------------
# What the checkpoint records, and what it refuses


def test_adapter_config_records_the_base_model(tmp_path):
    base = make_model("phi3")
    base.save_pretrained(tmp_path / "base")
    model = make_mtp_model("phi3", num_heads=2)
    model.get_base_model().name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "heads")
    saved = json.loads((tmp_path / "heads" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MTP" and saved["task_type"] == "CAUSAL_LM"
    assert saved["base_architecture"] == "Phi3ForCausalLM"
    assert saved["base_hidden_size"] == 32 and saved["base_vocab_size"] == 128
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")


def test_no_pickle_is_written_or_read(tmp_path, monkeypatch):
    model = make_mtp_model("llama", head_type="sequential", num_heads=2, lora_config=lora_config("llama"))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was written or read")

    for module, name in [(torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps"), (pickle, "load"),
                         (pickle, "loads")]:
        monkeypatch.setattr(module, name, refuse)
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", WEIGHTS]


# (name, base model the heads are loaded onto, what the error must name). Heads are built for a tiny Llama:
# LlamaForCausalLM, hidden size 32, vocabulary 128.
MISMATCHED_BASES = [
    ("architecture", lambda: make_model("qwen2"),
     "base_architecture: heads built for 'LlamaForCausalLM', model has 'Qwen2ForCausalLM'"),
    ("hidden_size", lambda: _llama_with(hidden_size=48), "base_hidden_size: heads built for 32, model has 48"),
    ("vocab_size", lambda: _llama_with(vocab_size=256), "base_vocab_size: heads built for 128, model has 256"),
]


@pytest.mark.parametrize("make_base, message", [case[1:] for case in MISMATCHED_BASES],
                         ids=[case[0] for case in MISMATCHED_BASES])
def test_loading_onto_a_model_the_heads_do_not_fit_raises(tmp_path, make_base, message):
    make_mtp_model("llama", num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        PeftModel.from_pretrained(make_base(), tmp_path)
    # The same check guards `load_adapter` onto a model that already has heads of its own (which fit it).
    model = get_peft_model(make_base(), MTPConfig(num_heads=2))
    with pytest.raises(ValueError, match=re.escape(message)):
        model.load_adapter(tmp_path, adapter_name="again")
    assert list(model.peft_config) == ["default"] and run(model, random_ids()).mtp_logits is not None  # unharmed


# (name, how the file is damaged): each must fail in safetensors' header check, never load part of the weights.
CORRUPTIONS = [
    ("truncated", lambda data: data[: len(data) // 2], "incomplete metadata, file not fully covered"),
    ("header_only", lambda data: data[:6], "header too small"),
    ("garbage", lambda data: b"\xff" * len(data), "header too large"),
    ("empty", lambda data: b"", "header too small"),
]


@pytest.mark.parametrize("corrupt, message", [case[1:] for case in CORRUPTIONS], ids=[case[0] for case in CORRUPTIONS])
def test_truncated_or_corrupt_weights_raise(tmp_path, corrupt, message):
    make_mtp_model("llama", num_heads=2).save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(SafetensorError, match=re.escape(f"Error while deserializing header: {message}")):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def _drop_one_head_key(weights):
    weights.pop(next(key for key in sorted(weights) if ".mtp_heads." in key))


def _drop_one_lora_key(weights):
    weights.pop(next(key for key in sorted(weights) if "lora_B" in key))


def _add_an_unknown_key(weights):
    weights["base_model.mtp.mtp_heads.heads.7.blocks.0.linear.weight"] = torch.zeros(32, 32)


# (name, edit of the saved weights, error). The config asks for 2 `ffn` heads with trunk LoRA.
CHECKPOINT_EDITS = [
    ("missing_head_key", _drop_one_head_key, "adapter 'default' does not match its MTP config: 1 missing keys"),
    ("missing_lora_key", _drop_one_lora_key, "adapter 'default' does not match its MTP config: 1 missing keys"),
    ("unexpected_key", _add_an_unknown_key, "0 missing keys [], 1 unexpected keys "
                                            "['base_model.mtp.mtp_heads.heads.7.blocks.0.linear.weight']"),
]


@pytest.mark.parametrize("edit, message", [case[1:] for case in CHECKPOINT_EDITS],
                         ids=[case[0] for case in CHECKPOINT_EDITS])
def test_checkpoint_with_missing_or_unexpected_keys_raises(tmp_path, edit, message):
    make_mtp_model("llama", num_heads=2, lora_config=lora_config("llama")).save_pretrained(tmp_path)
    weights = load_file(tmp_path / WEIGHTS)
    edit(weights)
    save_file(weights, tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match=re.escape(message)):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_config_that_does_not_match_the_weights_raises(tmp_path):
    make_mtp_model("llama", num_heads=2).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_heads"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"3 missing keys \['base_model\.mtp\.mtp_heads\.default\.heads\.2\."):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_weights_of_the_wrong_shape_raise(tmp_path):
    make_mtp_model("llama", num_heads=2).save_pretrained(tmp_path)
    weights = load_file(tmp_path / WEIGHTS)
    key = next(key for key in sorted(weights) if key.endswith("linear.bias"))
    weights[key] = torch.zeros(3)
    save_file(weights, tmp_path / WEIGHTS)
    with pytest.raises(RuntimeError, match=re.escape("size mismatch for base_model.mtp.mtp_heads.default.")):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Checkers


def _check_save_load_roundtrip(tmp_path, arch, config_cls, config_kwargs):
    """Save, load onto a fresh copy of the base model: logits and head logits are bit-identical; only heads saved."""
    model = make_mtp_model(arch, config_cls, head_init="random", **config_kwargs)
    input_ids = random_ids()
    before = run(model, input_ids)
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / WEIGHTS).keys() == _own_keys(model, "default").keys()
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path).eval()
    after = run(loaded, input_ids)
    assert after.logits.equal(before.logits)
    assert after.mtp_logits.equal(before.mtp_logits)
    assert not any(p.requires_grad for p in loaded.parameters()), "adapters load frozen unless is_trainable=True"


def _check_disable_adapter(arch, config_cls, config_kwargs):
    """Inside `disable_adapter()` the model is the base model, bit for bit (heads and trunk LoRA off); after, not."""
    input_ids = random_ids()
    with torch.no_grad():
        base_logits = make_model(arch)(input_ids=input_ids).logits
    model = make_mtp_model(arch, config_cls, head_init="random", **config_kwargs)
    with model.disable_adapter(), torch.no_grad():
        disabled = model(input_ids=input_ids, output_mtp_logits=True)
    assert disabled.logits.equal(base_logits)
    assert getattr(disabled, "mtp_logits", None) is None
    enabled = run(model, input_ids)
    assert enabled.mtp_logits is not None
    assert enabled.logits.equal(base_logits) == (config_kwargs.get("lora_config") is None)


def _check_only_adapter_trainable(arch, config_cls, config_kwargs):
    """Trainable parameters are exactly the adapter's (names carry `mtp_` or `lora_`); one step moves only them."""
    model = make_mtp_model(arch, config_cls, head_init="random", **config_kwargs)
    model.train()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert all("mtp_" in name or "lora_" in name for name in trainable), sorted(trainable)
    assert trainable.keys() == {name for name in _own_keys(model, "default", named_parameters=True)}
    assert any("lora_" in name for name in trainable) == (config_kwargs.get("lora_config") is not None)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    input_ids = random_ids()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not p.detach().equal(before[name])}
    assert changed and changed <= trainable.keys(), sorted(changed - trainable.keys())


def _check_lora_roundtrip(tmp_path, arch, config_cls, config_kwargs):
    """Trunk LoRA changes the logits, is saved beside the heads, and comes back as a LoraConfig and equal weights."""
    model = make_mtp_model(arch, config_cls, head_init="random", **config_kwargs)
    input_ids = random_ids()
    before = run(model, input_ids)
    with torch.no_grad():
        assert not before.logits.equal(make_model(arch)(input_ids=input_ids).logits), "LoRA should change the logits"
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert any("lora_A" in key for key in saved) and any("lora_B" in key for key in saved)
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path).eval()
    lora = loaded.peft_config["default"].lora_config
    assert type(lora).__name__ == "LoraConfig"
    assert set(lora.target_modules) == set(config_kwargs["lora_config"].target_modules)
    after = run(loaded, input_ids)
    assert after.logits.equal(before.logits) and after.mtp_logits.equal(before.mtp_logits)


def _own_keys(model, adapter_name, named_parameters=False):
    """One adapter's weights in a model: its heads and its trunk LoRA, as saved (adapter name removed) or as named
    in `named_parameters()`."""
    own = {}
    for name, value in (model.named_parameters() if named_parameters else model.state_dict().items()):
        if f".mtp_heads.{adapter_name}." in name or f".lora_A.{adapter_name}." in name or \
                f".lora_B.{adapter_name}." in name:
            key = name if named_parameters else name.replace(f".{adapter_name}.", ".", 1)
            own[key] = value
    return own


def _llama_with(**overrides):
    config = make_config("llama")
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
