"""`peft_mtp.fast_linear`: every candidate kernel computes `F.linear`; the choice is measured once per row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_mtp.fast_linear import (
    CANDIDATES,
    KernelChoice,
    LinearGroup,
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

