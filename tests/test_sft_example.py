"""The command line of `examples/sft_mtp.py`: every `MTPConfig` field it offers parses into the config it names."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import sft_mtp  # noqa: E402  (examples/ is not a package)

from peft_mtp import MTPConfig  # noqa: E402


def parse(*argv: str):
    return sft_mtp.make_parser().parse_args_and_config(args=["--output_dir", "unused", *argv])


def test_command_line_fields_build_the_config_they_name():
    script_args, mtp_args, _ = parse(
        "--num_heads", "3", "--head_type", "sequential", "--draft_vocab_size", "2048",
        "--feature_layers", "2", "15", "--mtp_loss_weight_final", "0.1", "--dataset_name", "stdlib",
    )
    config = MTPConfig(**dataclasses.asdict(mtp_args))
    assert (config.num_heads, config.head_type, config.draft_vocab_size) == (3, "sequential", 2048)
    assert config.feature_layers == [2, 15]
    assert config.mtp_loss_weight_final == 0.1
    assert script_args.dataset_name == "stdlib"


def test_command_line_defaults_are_mtpconfigs():
    _, mtp_args, _ = parse()
    defaults = MTPConfig()
    for name, value in dataclasses.asdict(mtp_args).items():
        assert getattr(defaults, name) == value, name
    # Optional fields left unset stay None rather than becoming a string or 0.
    assert mtp_args.draft_vocab_size is None and mtp_args.mtp_loss_weight_final is None


def test_nested_configs_stay_off_the_command_line():
    _, mtp_args, _ = parse()
    offered = {f.name for f in dataclasses.fields(mtp_args)}
    assert offered.isdisjoint(sft_mtp._NOT_ON_COMMAND_LINE)
    assert {"num_heads", "head_type", "draft_vocab_size"} <= offered


def test_unknown_head_type_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("--head_type", "medusa")
    assert "invalid choice: 'medusa'" in capsys.readouterr().err
