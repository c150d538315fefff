"""`peft_mtp.fast_linear`: every candidate kernel computes `F.linear`; the choice is measured once per row count."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_mtp import fast_linear
from peft_mtp.fast_linear import (
    CANDIDATES,
    PACKED_WEIGHTS,
    KernelChoice,
    LinearGroup,
    PackedWeights,
    fast_small_row_linear,
    measure_kernels,
    row_bucket,
)


@pytest.mark.parametrize("name", sorted(CANDIDATES))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16])
def test_every_candidate_computes_the_linear_product(name, rows):
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 24), torch.randn(40, 24), torch.randn(40)
    for b in (bias, None):
        torch.testing.assert_close(CANDIDATES[name](x, weight, b), F.linear(x, weight, b))


def test_the_choice_is_measured_once_per_row_count_and_only_without_grad(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    choice = KernelChoice(repeats=1)
    measured = []
    original = KernelChoice._measure

    def counting(self, group, rows, dtype):
        measured.append(rows)
        assert isinstance(group, LinearGroup) and len(group.modules) == 2  # the whole model, timed together
        return original(self, group, rows, dtype)

    monkeypatch.setattr(KernelChoice, "_measure", counting)
    x = torch.randn(3, 8)
    expected = model(x)
    with fast_small_row_linear(model, choice):
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(model(x), expected)
            model(x[:1])
            model(torch.randn(4, 8))  # 3 and 4 rows share a bucket
        assert measured == [4, 1]
        model(x).sum().backward()  # with autograd: stock F.linear, nothing measured
        assert measured == [4, 1]
    assert "forward" not in model[0].__dict__  # the block restores the modules


def test_measure_kernels_fills_every_bucket_so_decoding_measures_nothing(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    choice = KernelChoice(repeats=1)
    chosen = measure_kernels(model, choice=choice)
    assert sorted(chosen) == [1, 2, 4, 8, 16] and set(chosen.values()) <= set(CANDIDATES)
    assert len(choice.table) == 5

    def no_measuring(self, group, rows, dtype):
        raise AssertionError(f"measured {rows} rows again")

    monkeypatch.setattr(KernelChoice, "_measure", no_measuring)
    inputs = [torch.randn(rows, 8) for rows in range(1, 17)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]  # stock F.linear
        with fast_small_row_linear(model, choice):
            for x, reference in zip(inputs, expected):
                torch.testing.assert_close(model(x), reference)


def test_row_buckets_are_powers_of_two():
    assert [row_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]



needs_onednn = pytest.mark.skipif("onednn_packed" not in CANDIDATES, reason="this torch build has no oneDNN")


@needs_onednn
def test_packed_copies_follow_in_place_updates_and_replaced_data():
    weights = PackedWeights()
    weight, x = torch.randn(40, 24), torch.randn(3, 24)
    first = weights.get(weight)
    torch.testing.assert_close(CANDIDATES["onednn_packed"](x.double(), weight.double(), None),  # float64: stock path
                               F.linear(x.double(), weight.double()))
    assert weights.get(weight) is first  # reused while the weight is unchanged
    weight.mul_(2.0)  # an optimizer step: same storage, new version
    torch.testing.assert_close(CANDIDATES["onednn_packed"](x, weight, None), F.linear(x, weight))
    assert weights.get(weight) is not first
    layer = nn.Linear(24, 40)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(CANDIDATES["onednn_packed"](x, layer.weight, layer.bias), expected)
        layer.weight.data = torch.randn(40, 24)  # new storage
        torch.testing.assert_close(CANDIDATES["onednn_packed"](x, layer.weight, layer.bias),
                                   F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_packed_copies_are_freed_when_no_bucket_chooses_them(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    group = LinearGroup([model[0], model[2]])

    def slow(kernel):
        def run(x, weight, bias):
            time.sleep(0.005)
            return kernel(x, weight, bias)
        return run

    packed = CANDIDATES["onednn_packed"]
    for candidates, kept in (({"linear": CANDIDATES["linear"], "onednn_packed": slow(packed)}, False),
                             ({"linear": slow(CANDIDATES["linear"]), "onednn_packed": packed}, True)):
        PACKED_WEIGHTS.clear()
        monkeypatch.setattr(fast_linear, "CANDIDATES", candidates)
        with torch.no_grad():
            kernel = KernelChoice(repeats=1).kernel(torch.empty(2, 8), group)
        assert (kernel is packed) is kept
        assert (model[0].weight in PACKED_WEIGHTS._copies) is kept  # measuring packed it; freed unless chosen


@needs_onednn
def test_weights_too_large_for_free_memory_are_not_packed(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    PACKED_WEIGHTS.clear()
    monkeypatch.setattr(fast_linear, "available_memory_bytes", lambda: 100)  # bytes: less than the weights
    measured = []
    monkeypatch.setitem(fast_linear.CANDIDATES, "onednn_packed", lambda x, w, b: measured.append(1) or F.linear(x, w, b))
    with torch.no_grad():
        KernelChoice(repeats=1).kernel(torch.empty(4, 8), LinearGroup([model[0], model[2]]))
    assert not measured and len(PACKED_WEIGHTS._copies) == 0
    monkeypatch.setattr(fast_linear, "available_memory_bytes", lambda: None)  # unknown: allowed
    assert fast_linear.packing_fits([model[0].weight])
