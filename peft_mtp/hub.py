"""Model cards of MTP adapters: PEFT's card (`library_name: peft`) plus the MTP settings, on save and on push.

Why this module exists: `PeftModel.push_to_hub` is transformers' `PushToHubMixin.push_to_hub`. It runs
`save_pretrained` into a temporary folder, which writes PEFT's card (`PeftModel.create_or_update_model_card`:
`library_name: peft`, a `base_model:adapter:<base>` tag, the PEFT version), and then overwrites that README.md with
a card from `transformers.utils.hub.create_and_tag_model_card` (`library_name: transformers`, no adapter tag) before
uploading the folder. The Hub would then list the heads as a transformers model with no link to their base model.

The fix re-applies PEFT's own card function to the folder just before it is uploaded (the repair transformers'
Trainer makes after writing its card, transformers PR #27754) and adds a section with the MTP settings. It wraps two
`PeftModel` methods, acts only on models that hold an MTP adapter (other PEFT methods run the unwrapped code), and
installing it twice is a no-op. Drop it once transformers' push keeps the card that `save_pretrained` wrote.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

from huggingface_hub import ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftConfig, PeftModel

from .config import MTPConfig

# Tags every MTP adapter card carries, so the heads can be found on the Hub.
CARD_TAGS = ("peft_mtp", "multi-token-prediction")
_ADAPTER_TAG_PREFIX = "base_model:adapter:"
# The MTP section sits between these markers and is replaced, not appended, when a card is written again (a second
# save into the same folder, or a push onto a repo whose card already has it).
_SECTION_BEGIN = "<!-- peft_mtp: MTP settings (rewritten on every save and push) -->"
_SECTION_END = "<!-- peft_mtp: end of MTP settings -->"
_INSTALLED_MARK = "_peft_mtp_hub_fix"
_PEFT_CONFIG_FIELDS = frozenset(field.name for field in dataclasses.fields(PeftConfig))


def mtp_adapter_names(model: PeftModel) -> list[str]:
    """Names of the MTP adapters of a PEFT model, in the order they were added.

    Args:
        model: any `PeftModel`.

    Returns:
        The names whose config is an `MTPConfig` (empty for other PEFT methods).
    """
    return [name for name, config in model.peft_config.items() if isinstance(config, MTPConfig)]


def write_mtp_model_card(model: PeftModel, output_dir: str, repo_id: str | None = None) -> None:
    """Write PEFT's model card for `model` into `output_dir/README.md`, with the MTP settings added.

    An existing README.md there (a card loaded from the Hub, or the transformers card that `push_to_hub` put in its
    upload folder) is updated: its text and its tags are kept, `library_name` becomes `peft`, and the MTP section is
    written once.

    Args:
        model: a `PeftModel` holding at least one MTP adapter.
        output_dir: folder of the card.
        repo_id: the Hub repository being pushed to, used in the card's loading example; None when saving locally.
    """
    path = os.path.join(output_dir, "README.md")
    # PEFT's card function replaces the card's tags with its own: keep the ones already there (the user's
    # `push_to_hub(tags=...)`, or the tags of the card on the Hub).
    kept_tags = set(ModelCard.load(path).data.tags or []) if os.path.exists(path) else set()
    peft_card_function = PeftModel.create_or_update_model_card
    getattr(peft_card_function, "__wrapped__", peft_card_function)(model, output_dir)

    card = ModelCard.load(path)
    base_model = _hub_base_model(model, card)
    tags = {tag for tag in kept_tags | set(card.data.tags or []) if not tag.startswith(_ADAPTER_TAG_PREFIX)}
    tags.update(CARD_TAGS)
    if base_model is not None:
        tags.add(_ADAPTER_TAG_PREFIX + base_model)
        card.data["base_model"] = base_model
    else:
        # An empty or local-path `base_model` is invalid Hub metadata; leave it out rather than upload it.
        card.data.pop("base_model", None)
        if repo_id is not None:
            warnings.warn(
                f"The base model of these MTP heads is {_base_model_name(model)!r}, not a Hub repo id, so the card "
                "pushed to the Hub names no base model. Set `model.peft_config[name].base_model_name_or_path` to "
                "the base model's repo id before `push_to_hub` (see docs/saving_loading.md).",
                UserWarning,
                stacklevel=4,  # write_mtp_model_card < _upload_modified_files < push_to_hub < the caller
            )
    card.data.tags = sorted(tags)
    card.text = _with_section(card.text, _mtp_section(model, base_model, repo_id))
    card.save(path)


def install_hub_fix() -> None:
    """Make `PeftModel`'s save and push write MTP adapter cards with `write_mtp_model_card`. Safe to call twice."""
    card_function = PeftModel.create_or_update_model_card
    if getattr(card_function, _INSTALLED_MARK, False):
        return

    @functools.wraps(card_function)
    def create_or_update_model_card(self, output_dir: str):
        if not mtp_adapter_names(self):
            return card_function(self, output_dir)
        write_mtp_model_card(self, output_dir)

    setattr(create_or_update_model_card, _INSTALLED_MARK, True)
    PeftModel.create_or_update_model_card = create_or_update_model_card

    upload_function = getattr(PeftModel, "_upload_modified_files", None)
    if upload_function is None:
        warnings.warn(
            "transformers' PushToHubMixin has no `_upload_modified_files`: peft_mtp cannot repair the model card of "
            "`push_to_hub`, whose card will say `library_name: transformers`. `save_pretrained` is unaffected.",
            UserWarning,
            stacklevel=2,
        )
        return

    @functools.wraps(upload_function)
    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # The last step of `push_to_hub`: the folder already holds the transformers card; rewrite it before upload.
        if mtp_adapter_names(self):
            write_mtp_model_card(self, working_dir, repo_id=repo_id)
        return upload_function(self, working_dir, repo_id, *args, **kwargs)

    setattr(_upload_modified_files, _INSTALLED_MARK, True)
    PeftModel._upload_modified_files = _upload_modified_files


def _base_model_name(model: PeftModel) -> str:
    """The base model's name or path as transformers records it ('' for a model built from a config)."""
    return getattr(model.get_base_model(), "name_or_path", "") or ""


def _hub_base_model(model: PeftModel, card: ModelCard) -> str | None:
    """The base model's Hub repo id, or None when it has none (built from a config, or loaded from a folder)."""
    recorded = [model.peft_config[name].base_model_name_or_path for name in mtp_adapter_names(model)]
    for name in (card.data.get("base_model"), _base_model_name(model), *recorded):
        if not isinstance(name, str) or not name or os.path.isdir(name):
            continue
        try:
            validate_repo_id(name)
        except HFValidationError:
            continue
        return name
    return None


def _with_section(text: str, section: str) -> str:
    """Put `section` between the MTP markers of `text`, replacing what is there, or append it."""
    begin, end = text.find(_SECTION_BEGIN), text.find(_SECTION_END)
    if begin != -1 and end > begin:
        return text[:begin] + section + text[end + len(_SECTION_END):]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def _mtp_section(model: PeftModel, base_model: str | None, repo_id: str | None) -> str:
    """The card's MTP section: what the heads are, how to load them, and every adapter's settings."""
    lines = [
        _SECTION_BEGIN,
        "## Multi-Token Prediction heads",
        "",
        "Multi-Token Prediction (MTP) heads made with `peft_mtp`, a PEFT method: head k at position t predicts "
        "token t+1+k, beside the model's own next-token head (which predicts t+1). This repository holds the heads "
        "(and any trunk LoRA) only; load them onto the base model:",
        "",
        "```python",
        "import peft_mtp  # registers the MTP method with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model or "<base model>"}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id or "<this repo id or folder>"}")',
        "```",
    ]
    for name in mtp_adapter_names(model):
        config: MTPConfig = model.peft_config[name]
        where = "" if name == "default" else f" (subfolder `{name}/`: pass `subfolder=\"{name}\"` to load it)"
        lines += ["", f"### Adapter `{name}`{where}", "", "| Setting | Value |", "|---|---|"]
        lines += [f"| `{key}` | {value} |" for key, value in _settings(config)]
    lines.append(_SECTION_END)
    return "\n".join(lines)


def _settings(config: MTPConfig) -> list[tuple[str, str]]:
    """Every MTP setting of one adapter (the fields `MTPConfig` adds to `PeftConfig`), as card rows."""
    rows = []
    for field in dataclasses.fields(MTPConfig):
        if field.name in _PEFT_CONFIG_FIELDS or field.name == "target_modules":  # PEFT's own, or internal
            continue
        value = getattr(config, field.name)
        if field.name == "lora_config":
            value = "none (trunk frozen)" if value is None else _describe_lora(value)
        rows.append((field.name, value))
        if field.name == "head_weight_schedule":
            rows.append(("head loss weights (normalised)", ", ".join(f"{w:.4g}" for w in config.head_loss_weights())))
    return [(key, f"`{value}`") for key, value in rows]


def _describe_lora(lora) -> str:
    targets = lora.target_modules if isinstance(lora.target_modules, str) else sorted(lora.target_modules or [])
    return f"r={lora.r}, lora_alpha={lora.lora_alpha}, target_modules={targets}"
