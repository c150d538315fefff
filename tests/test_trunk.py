"""Reading decoder layers' call signatures once per class (peft_mtp.trunk): the same answer as reading them per call."""

from __future__ import annotations

import inspect

import pytest
from testing_common import one_torch_thread  # noqa: F401 (autouse fixture)
from tiny_models import ARCHITECTURES, make_model
from torch import nn

from peft_mtp.trunk import _CACHE_ARGUMENTS, Trunk, cache_argument_name, layer_signature


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_signature_is_the_bound_forwards(arch):
    layer = Trunk(make_model(arch)).layers[0]
    assert layer_signature(layer) == inspect.signature(layer.forward)
    assert cache_argument_name(layer) in inspect.signature(layer.forward).parameters
    assert cache_argument_name(layer) in _CACHE_ARGUMENTS


class _VarArgsLayer(nn.Module):
    def forward(*args, **kwargs):  # noqa: N805 (no named `self`: binding must keep `*args`)
        return args


class _OldStyleLayer(nn.Module):
    def forward(self, hidden_states, layer_past=None, use_cache=False):
        return hidden_states


def test_a_forward_without_a_named_self_keeps_its_varargs():
    layer = _VarArgsLayer()
    assert layer_signature(layer) == inspect.signature(layer.forward)
    assert list(layer_signature(layer).parameters) == ["args", "kwargs"]


def test_the_cache_argument_is_found_under_older_names():
    layer = _OldStyleLayer()
    assert layer_signature(layer) == inspect.signature(layer.forward)
    assert cache_argument_name(layer) == "layer_past"
    assert cache_argument_name(_VarArgsLayer()) == "cache"
