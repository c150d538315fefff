"""`MTPConfig`: defaults, validation errors (each matched), head loss weights, the nested LoRA config, and docs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from peft import LoraConfig, PeftConfig, TaskType
from peft.utils import PeftType
from peft.utils.constants import DUMMY_TARGET_MODULES

from peft_mtp import MTPConfig

DOCS_CONFIG_PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
MTP_FIELDS = [f.name for f in dataclasses.fields(MTPConfig) if f.name not in {g.name for g in
              dataclasses.fields(PeftConfig)} and f.name != "target_modules"]


def test_defaults():
    config = MTPConfig()
    assert config.peft_type is PeftType.MTP and config.task_type == "CAUSAL_LM"
    assert (config.num_heads, config.head_type, config.num_layers, config.head_init) == (4, "ffn", 1, "base")
    assert config.share_unembedding is True and config.head_dropout == 0.0 and config.lora_config is None
    assert (config.mtp_loss_weight, config.head_weight_schedule, config.head_weight_ratio) == (1.0, "geometric", 0.8)
    assert config.target_modules == DUMMY_TARGET_MODULES  # MTP replaces no module of the base model
    assert (config.base_architecture, config.base_hidden_size, config.base_vocab_size) == (None, None, None)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM", TaskType.CAUSAL_LM])
def test_task_type_is_causal_lm_whichever_way_it_is_given(task_type):
    config = MTPConfig(task_type=task_type)
    assert config.task_type == "CAUSAL_LM"
    assert json.loads(json.dumps(config.to_dict()))["task_type"] == "CAUSAL_LM"


# (kwargs, the error message, matched in full). Every check of `MTPConfig._validate` and `head_loss_weights`.
INVALID_CONFIGS = [
    ({"task_type": "SEQ_CLS"}, "`task_type` must be 'CAUSAL_LM' for MTP heads, got 'SEQ_CLS'."),
    ({"num_heads": 0}, "`num_heads` must be an integer >= 1, got 0."),
    ({"num_heads": 2.0}, "`num_heads` must be an integer >= 1, got 2.0."),
    ({"head_type": "medusa"}, "`head_type` must be one of ('linear', 'ffn', 'mha_ffn', 'cnn', 'identical', "
                              "'sequential'), got 'medusa'."),
    ({"num_layers": 0}, "`num_layers` must be an integer >= 1, got 0."),
    ({"head_init": "zeros"}, "`head_init` must be one of ('base', 'random'), got 'zeros'."),
    ({"head_dropout": 1.0}, "`head_dropout` must be in [0, 1), got 1.0."),
    ({"head_dropout": -0.1}, "`head_dropout` must be in [0, 1), got -0.1."),
    ({"cnn_kernel_size": 0}, "`cnn_kernel_size` must be an integer >= 1, got 0."),
    ({"mha_num_attention_heads": 0}, "`mha_num_attention_heads` must be an integer >= 1 or None, got 0."),
    ({"mha_num_attention_heads": 2.5}, "`mha_num_attention_heads` must be an integer >= 1 or None, got 2.5."),
    ({"mtp_loss_weight": -1.0}, "`mtp_loss_weight` must be a finite float >= 0, got -1.0."),
    ({"mtp_loss_weight": math.inf}, "`mtp_loss_weight` must be a finite float >= 0, got inf."),
    ({"mtp_loss_weight": math.nan}, "`mtp_loss_weight` must be a finite float >= 0, got nan."),
    ({"head_weight_ratio": 0.0}, "`head_weight_ratio` must be in (0, 1] for the geometric schedule, got 0.0."),
    ({"head_weight_ratio": 1.5}, "`head_weight_ratio` must be in (0, 1] for the geometric schedule, got 1.5."),
    ({"head_weight_schedule": "cosine"}, "`head_weight_schedule` must be one of ('uniform', 'harmonic', "
                                         "'geometric') or a list of 4 floats, got 'cosine'."),
    ({"num_heads": 2, "head_weight_schedule": [1.0]},
     "`head_weight_schedule` as a list must hold 2 positive floats (one per head), got [1.0]."),
    ({"num_heads": 2, "head_weight_schedule": [1.0, 0.0]},
     "`head_weight_schedule` as a list must hold 2 positive floats (one per head), got [1.0, 0.0]."),
    ({"num_heads": 2, "head_weight_schedule": [1.0, math.nan]},
     "`head_weight_schedule` as a list must hold 2 positive floats (one per head), got [1.0, nan]."),
    ({"num_heads": 2, "head_weight_schedule": [1.0, "a"]},
     "`head_weight_schedule` as a list must hold 2 positive floats (one per head), got [1.0, 'a']."),
    ({"mtp_loss_weight_final": -0.1}, "`mtp_loss_weight_final` must be a finite float >= 0 or None, got -0.1."),
    ({"mtp_loss_weight_schedule": "exp"}, "`mtp_loss_weight_schedule` must be one of ('linear', 'cosine', 'step'), "
                                          "got 'exp'."),
    ({"mtp_loss_weight_step_at": 1.5}, "`mtp_loss_weight_step_at` must be in [0, 1], got 1.5."),
    ({"head_target_source": "teacher"}, "`head_target_source` must be one of ('labels', 'argmax', 'soft'), "
                                        "got 'teacher'."),
    ({"head_lr_multiplier": 0.0}, "`head_lr_multiplier` must be a finite float > 0, got 0.0."),
    ({"feature_layers": []}, "`feature_layers` must be a non-empty list of decoder-layer indices >= 0 (e.g. [2, 15]) "
                             "or None, got []."),
    ({"feature_layers": [2, -1]}, "`feature_layers` must be a non-empty list of decoder-layer indices >= 0 (e.g. "
                                  "[2, 15]) or None, got [2, -1]."),
    ({"feature_layers": "2,15"}, "`feature_layers` must be a non-empty list of decoder-layer indices >= 0 (e.g. "
                                 "[2, 15]) or None, got '2,15'."),
    ({"feature_layers": [3, 3]}, "`feature_layers` names a layer twice: [3, 3]; list each layer once."),
    ({"lora_config": "r=8"}, "`lora_config` must be a peft.LoraConfig, a dict of its fields, or None, got str."),
]


@pytest.mark.parametrize("kwargs, message", INVALID_CONFIGS, ids=[
    "-".join(f"{key}={value}" for key, value in kwargs.items()) for kwargs, _ in INVALID_CONFIGS])
def test_invalid_config_raises_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MTPConfig(**kwargs)


def test_head_weight_ratio_is_only_checked_for_the_geometric_schedule():
    assert MTPConfig(head_weight_schedule="uniform", head_weight_ratio=2.0).head_loss_weights() == [0.25] * 4


# (schedule kwargs, K, expected normalised weights w_1..w_K).
HEAD_WEIGHT_CASES = [
    ({"head_weight_schedule": "uniform"}, 4, [0.25, 0.25, 0.25, 0.25]),
    ({"head_weight_schedule": "harmonic"}, 3, [6 / 11, 3 / 11, 2 / 11]),  # 1, 1/2, 1/3 over 11/6
    ({"head_weight_schedule": "geometric"}, 3, [0.8 / 1.952, 0.64 / 1.952, 0.512 / 1.952]),  # Medusa's 0.8^k
    ({"head_weight_schedule": "geometric", "head_weight_ratio": 0.5}, 2, [2 / 3, 1 / 3]),
    ({"head_weight_schedule": "geometric", "head_weight_ratio": 1.0}, 2, [0.5, 0.5]),
    ({"head_weight_schedule": [3.0, 1.0]}, 2, [0.75, 0.25]),
    ({"head_weight_schedule": [1, 1, 2]}, 3, [0.25, 0.25, 0.5]),
]


@pytest.mark.parametrize("kwargs, num_heads, expected", HEAD_WEIGHT_CASES,
                         ids=[f"{case[0]['head_weight_schedule']}-K{case[1]}" for case in HEAD_WEIGHT_CASES])
def test_head_loss_weights(kwargs, num_heads, expected):
    weights = MTPConfig(num_heads=num_heads, **kwargs).head_loss_weights()
    assert weights == pytest.approx(expected, rel=1e-12)
    assert math.fsum(weights) == pytest.approx(1.0, rel=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# The nested LoRA config


def _lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["v_proj", "q_proj"], bias="none",
                      init_lora_weights=False)


def test_lora_config_given_as_a_dict_is_rebuilt_as_lora_config():
    config = MTPConfig(lora_config={"r": 4, "target_modules": ["q_proj"], "peft_type": "LORA"})
    assert isinstance(config.lora_config, LoraConfig)
    assert config.lora_config.r == 4 and config.lora_config.target_modules == {"q_proj"}


def test_lora_config_is_stored_json_safe_without_changing_the_config():
    config = MTPConfig(lora_config=_lora())
    stored = config.to_dict()
    assert json.loads(json.dumps(stored)) == stored  # plain JSON: no sets, no enums
    assert stored["lora_config"]["target_modules"] == ["q_proj", "v_proj"]
    assert stored["lora_config"]["peft_type"] == "LORA"
    assert isinstance(config.lora_config, LoraConfig)  # to_dict does not convert the config in place
    assert config.lora_config.target_modules == {"q_proj", "v_proj"}


def test_lora_config_is_rebuilt_as_lora_config_on_load(tmp_path):
    config = MTPConfig(num_heads=2, lora_config=_lora())
    config.save_pretrained(tmp_path)
    assert isinstance(json.loads((tmp_path / "adapter_config.json").read_text())["lora_config"], dict)
    for loaded in (MTPConfig.from_pretrained(tmp_path), PeftConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, MTPConfig) and isinstance(loaded.lora_config, LoraConfig)
        assert loaded.lora_config.to_dict() == config.lora_config.to_dict()


def test_every_field_survives_save_and_load(tmp_path):
    config = MTPConfig(num_heads=3, head_type="mha_ffn", num_layers=2, head_init="random", share_unembedding=False,
                       head_dropout=0.1, cnn_kernel_size=5, mha_num_attention_heads=2, mtp_loss_weight=0.3,
                       head_weight_schedule=[3.0, 2.0, 1.0], head_weight_ratio=0.9, lora_config=_lora())
    config.save_pretrained(tmp_path)
    assert MTPConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


# --------------------------------------------------------------------------------------------------------------------
# Documentation: every field documented in the docstring (with its help text) and in docs/config.md


@pytest.mark.parametrize("name", MTP_FIELDS)
def test_every_field_is_documented(name):
    field = next(f for f in dataclasses.fields(MTPConfig) if f.name == name)
    assert field.metadata.get("help"), f"MTPConfig.{name} has no help text"
    assert re.search(rf"^\s+{name} \(`", MTPConfig.__doc__, re.MULTILINE), f"MTPConfig.{name} is not in the docstring"
    assert f"`{name}`" in DOCS_CONFIG_PAGE.read_text(), f"MTPConfig.{name} is not in docs/config.md"
