"""`import peft_mtp` makes "MTP" a PEFT method, and PEFT's own entry points then work with it.

The registration adds a member to PEFT's closed `PeftType` enum (`peft_mtp._peft_registration`): these tests pin
what that must look like to PEFT, that it is idempotent, and that an unchecked PEFT version is refused clearly.
"""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from testing_common import make_mtp_model, one_torch_thread, random_ids, run  # noqa: F401 (autouse fixture)
from tiny_models import make_model
from transformers import AutoModelForCausalLM

import peft_mtp
from peft_mtp import MTPConfig, MTPModel
from peft_mtp._peft_registration import _check_peft_version, register_mtp_method


def _registry_state():
    return (list(PeftType._member_names_), dict(PeftType._value2member_map_),
            PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType.MTP), PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.MTP),
            PEFT_TYPE_TO_PREFIX_MAPPING.get(PeftType.MTP))


def test_mtp_is_a_real_member_of_peft_type():
    member = PeftType.MTP
    assert isinstance(member, PeftType) and isinstance(member, str)
    assert member is PeftType("MTP") is PeftType["MTP"]
    assert member.name == "MTP" and member.value == "MTP" and member == "MTP"
    assert member in list(PeftType) and "MTP" in PeftType.__members__
    assert json.dumps({"peft_type": member}) == '{"peft_type": "MTP"}'


def test_mtp_maps_to_its_config_tuner_and_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MTP] is MTPConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MTP] is MTPModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MTP] == MTPModel.prefix == "mtp_"
    assert MTPConfig().peft_type is PeftType.MTP


def test_registration_is_idempotent():
    before = _registry_state()
    register_mtp_method(MTPConfig, MTPModel)
    register_mtp_method(MTPConfig, MTPModel)
    assert _registry_state() == before


def test_registering_a_different_mtp_method_raises_and_changes_nothing():
    class OtherConfig(MTPConfig):
        pass

    before = _registry_state()
    with pytest.raises(RuntimeError, match=re.escape("PEFT already has an 'MTP' method registered by peft_mtp.config; "
                                                     "peft_mtp cannot register its own.")):
        register_mtp_method(OtherConfig, MTPModel)
    assert _registry_state() == before


@pytest.mark.parametrize("version", ["0.17.1", "0.22.0", "1.0.0"])
def test_unsupported_peft_version_is_refused_with_the_fix(monkeypatch, version):
    monkeypatch.setattr(peft, "__version__", version)
    before = _registry_state()
    message = (f"checked on peft>=0.21.2,<0.22.0, but peft=={version} is installed. Install a supported version with "
               "`pip install 'peft>=0.21.2,<0.22.0'`.")
    with pytest.raises(ImportError, match=re.escape(message)):
        register_mtp_method(MTPConfig, MTPModel)
    assert _registry_state() == before


@pytest.mark.parametrize("version", ["0.21.2", "0.21.99"])
def test_supported_peft_versions_pass_the_guard(version):
    _check_peft_version(version)


def test_installed_peft_is_supported():
    _check_peft_version(peft.__version__)


# --------------------------------------------------------------------------------------------------------------------
# PEFT's entry points


def test_get_peft_model_gives_a_causal_lm_peft_model():
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2))
    assert isinstance(model, PeftModelForCausalLM) and isinstance(model.base_model, MTPModel)


def test_peft_config_from_pretrained_returns_the_saved_mtp_config(tmp_path):
    model = make_mtp_model("llama", num_heads=2, head_type="cnn", cnn_kernel_size=3, head_weight_schedule=[2.0, 1.0])
    model.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is MTPConfig
    expected = model.peft_config["default"].to_dict()
    assert {key: value for key, value in loaded.to_dict().items() if key != "inference_mode"} == \
           {key: value for key, value in expected.items() if key != "inference_mode"}


def test_auto_peft_model_loads_heads_and_base_from_disk(tmp_path):
    # AutoPeftModelForCausalLM loads the base model from `base_model_name_or_path`: a tiny model saved on disk.
    make_model("gpt2").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    torch.manual_seed(0)
    model = get_peft_model(base, MTPConfig(num_heads=2, head_type="mha_ffn", head_init="random")).eval()
    model.save_pretrained(tmp_path / "heads")
    assert json.loads((tmp_path / "heads" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
           str(tmp_path / "base")

    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "heads", attn_implementation="eager").eval()
    assert isinstance(loaded, PeftModelForCausalLM) and isinstance(loaded.base_model, MTPModel)
    input_ids = random_ids()
    expected, actual = run(model, input_ids), run(loaded, input_ids)
    assert actual.logits.equal(expected.logits) and actual.mtp_logits.equal(expected.mtp_logits)


def test_model_and_layer_status_report_the_mtp_adapters():
    model = make_mtp_model("llama", num_heads=2)
    model.add_adapter("other", MTPConfig(num_heads=3, head_type="linear"))
    status = model.get_model_status()
    assert status.adapter_model_type == "MTPModel"
    assert status.peft_types == {"default": "MTP", "other": "MTP"}
    assert status.available_adapters == ["default", "other"] and status.active_adapters == ["default"]
    assert status.enabled is True and status.num_adapter_layers == 1
    assert status.trainable_params == sum(p.numel() for p in model.base_model.mtp.mtp_heads["default"].parameters())
    [layer] = model.get_layer_status()
    assert layer.name == "mtp" and layer.module_type == "MTPHeadsLayer"
    assert layer.available_adapters == ["default", "other"]
    with model.disable_adapter():
        assert model.get_model_status().enabled is False
    assert model.get_model_status().enabled is True


def test_disable_adapter_switches_heads_off_and_back_on():
    model = make_mtp_model("llama", num_heads=2)
    input_ids = random_ids()
    with model.disable_adapter():
        assert model.base_model.active_heads() is None
        assert getattr(run(model, input_ids), "mtp_logits", None) is None
    assert run(model, input_ids).mtp_logits.shape[2] == 2


def test_load_set_and_delete_adapter(tmp_path):
    make_mtp_model("llama", num_heads=3, head_type="linear", head_init="random").save_pretrained(tmp_path)
    model = make_mtp_model("llama", num_heads=2)
    model.load_adapter(tmp_path, adapter_name="loaded")
    model.set_adapter("loaded")
    assert model.active_adapters == ["loaded"] and run(model, random_ids()).mtp_logits.shape[2] == 3
    with pytest.raises(ValueError, match=re.escape("Adapter 'missing' not found; available adapters: "
                                                   "['default', 'loaded'].")):
        model.base_model.set_adapter("missing")
    with pytest.warns(UserWarning, match="Adapter loaded was active which is now deleted. Setting active adapter to "
                                         "default."):
        model.delete_adapter("loaded")
    assert list(model.peft_config) == ["default"] and "loaded" not in model.base_model.mtp.mtp_heads
    assert model.active_adapters == ["default"] and run(model, random_ids()).mtp_logits.shape[2] == 2
    with pytest.raises(ValueError, match="Adapter loaded does not exist"):
        model.delete_adapter("loaded")


def test_heads_load_with_peft_model_from_pretrained_as_trainable(tmp_path):
    make_mtp_model("llama", num_heads=2).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mtp_heads.default." in name for name in trainable)


def test_peft_mtp_exports_its_public_names():
    assert set(peft_mtp.__all__) >= {"MTPConfig", "MTPModel", "HEAD_TYPES", "head_targets", "target_offset"}
