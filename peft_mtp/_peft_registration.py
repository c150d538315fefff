"""Register MTP as a PEFT method from outside PEFT.

PEFT has no supported out-of-tree registration path (peft issue #2273): `register_peft_method` only
accepts names that are already members of the closed `PeftType` enum. This module is the one place
that works around it, by adding a real `PeftType.MTP` member and then calling the public
`register_peft_method`. It is idempotent and refuses PEFT versions it was not written for, since
it touches enum internals that a PEFT release may change.
"""

from __future__ import annotations

import enum

import peft
from packaging.version import Version
from peft.utils import PeftType
from peft.utils.peft_types import register_peft_method

PEFT_TYPE_NAME = "MTP"
MIN_PEFT_VERSION = Version("0.21.2")
# The newest PEFT minor release this workaround was checked against; newer minors are refused until
# checked, because they may change how `PeftType` and the method registry are built.
MAX_PEFT_VERSION_EXCLUSIVE = Version("0.22.0")


def _check_peft_version(version: str) -> None:
    parsed = Version(version)
    if not (MIN_PEFT_VERSION <= parsed < MAX_PEFT_VERSION_EXCLUSIVE):
        raise ImportError(
            f"peft_mtp registers the MTP method through PEFT internals checked on peft>={MIN_PEFT_VERSION},"
            f"<{MAX_PEFT_VERSION_EXCLUSIVE}, but peft=={version} is installed. Install a supported version with "
            f"`pip install 'peft>={MIN_PEFT_VERSION},<{MAX_PEFT_VERSION_EXCLUSIVE}'`."
        )


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add a real member to a closed `str` enum, as `enum` itself does when it builds the class."""
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    member.__objclass__ = enum_cls
    member.__init__(value)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)
    return member


def register_mtp_method(config_cls: type, model_cls: type) -> None:
    """Make `"MTP"` a PEFT method backed by `config_cls` and `model_cls`. Safe to call twice.

    Args:
        config_cls: the `PeftConfig` subclass of the method (`MTPConfig`).
        model_cls: the `BaseTuner` subclass of the method (`MTPModel`).

    Raises:
        ImportError: the installed PEFT version was not checked with this workaround.
        RuntimeError: another package registered a different "MTP" method.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    _check_peft_version(peft.__version__)
    if PEFT_TYPE_NAME not in PeftType._member_map_:
        _add_enum_member(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
    peft_type = PeftType[PEFT_TYPE_NAME]

    registered_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered_config is not None:
        if registered_config is config_cls and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
            return  # already registered by an earlier import
        raise RuntimeError(
            f"PEFT already has an 'MTP' method registered by {registered_config.__module__}; peft_mtp cannot "
            "register its own. Uninstall the other package or import only one of them."
        )
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
