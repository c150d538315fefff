"""`peft_mtp.fast_linear`: every candidate kernel computes `F.linear`; the choice is measured once per row count."""

from __future__ import annotations

import types

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
            model(torch.randn(4, 8))  # small counts are measured one by one: kernel costs step between them
            model(torch.randn(20, 8))
            model(torch.randn(32, 8))  # 17-32 rows share a bucket
        assert measured == [3, 1, 4, 32]
        model(x).sum().backward()  # with autograd: stock F.linear, nothing measured
        assert measured == [3, 1, 4, 32]
    assert "forward" not in model[0].__dict__  # the block restores the modules


def test_measure_kernels_fills_every_bucket_so_decoding_measures_nothing(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    choice = KernelChoice(repeats=1)
    chosen = measure_kernels(model, choice=choice)
    assert sorted(chosen) == [*range(1, 17), 32, 64] and set(chosen.values()) <= set(CANDIDATES)
    assert len(choice.table) == 18

    def no_measuring(self, group, rows, dtype):
        raise AssertionError(f"measured {rows} rows again")

    monkeypatch.setattr(KernelChoice, "_measure", no_measuring)
    inputs = [torch.randn(rows, 8) for rows in range(1, 65)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]  # stock F.linear
        with fast_small_row_linear(model, choice):
            for x, reference in zip(inputs, expected):
                torch.testing.assert_close(model(x), reference)


def test_measure_kernels_inside_an_open_block_measures_that_blocks_layers(monkeypatch):
    # The block has switched the layers already; measuring must still find them (it once found none and measured
    # nothing, so the timed generation paid every bucket's measurement).
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    choice = KernelChoice(repeats=1)
    with torch.no_grad(), fast_small_row_linear(model, choice):
        chosen = measure_kernels(model, choice=choice)
        assert sorted(chosen) == [*range(1, 17), 32, 64] and len(choice.table) == 18

        def no_measuring(self, group, rows, dtype):
            raise AssertionError(f"measured {rows} rows again")

        monkeypatch.setattr(KernelChoice, "_measure", no_measuring)
        for rows in (1, 3, 16, 40):
            model(torch.randn(rows, 8))
    assert "forward" not in model[0].__dict__


def test_row_buckets_are_exact_up_to_16_then_powers_of_two():
    assert [row_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64)] == [1, 2, 3, 4, 5, 8, 9, 16, 32, 32, 64, 64]


needs_onednn = pytest.mark.skipif("onednn_packed" not in CANDIDATES, reason="this torch build has no oneDNN")


@needs_onednn
def test_packed_copies_follow_changed_weights():
    packed = CANDIDATES["onednn_packed"]
    layer, x = nn.Linear(24, 40), torch.randn(3, 24)

    def check():
        torch.testing.assert_close(packed(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))

    with torch.no_grad():
        check()
        first = PACKED_WEIGHTS.get(layer.weight)
        assert PACKED_WEIGHTS.get(layer.weight) is first  # reused while the weight is unchanged
        layer.weight.mul_(2.0)  # an optimizer step: same storage, new version
        check()
        layer.weight.data = torch.randn(40, 24)  # new storage
        check()
        layer.weight.data += 1.0  # a LoRA merge: bypasses the version counter...
        PACKED_WEIGHTS.refresh([layer.weight])  # ...and is caught when a fast_small_row_linear block opens
        check()
        model = nn.Sequential(layer)
        layer.weight.data -= 1.0
        with fast_small_row_linear(model):
            check()
        torch.testing.assert_close(packed(x.double(), layer.weight.double(), None),  # float64: stock path
                                   F.linear(x.double(), layer.weight.double()))
    with torch.inference_mode():  # inference tensors have no version counter
        frozen = torch.randn(40, 24)
        torch.testing.assert_close(packed(x, frozen, None), F.linear(x, frozen))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts; the packed op would not
        torch.testing.assert_close(packed(x, layer.weight, None), F.linear(x, layer.weight))


@needs_onednn
def test_packed_copies_are_freed_when_no_bucket_chooses_them(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    group = LinearGroup([model[0], model[2]])
    # A clock that only the slow kernel moves: which kernel wins cannot depend on the machine's load.
    clock = [0.0]
    monkeypatch.setattr(fast_linear, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow(kernel):
        def run(x, weight, bias):
            clock[0] += 1.0
            return kernel(x, weight, bias)
        return run

    packed = CANDIDATES["onednn_packed"]
    loses = {"linear": CANDIDATES["linear"], "onednn_packed": slow(packed)}
    wins = {"linear": slow(CANDIDATES["linear"]), "onednn_packed": packed}
    for candidates, kept in ((loses, False), (wins, True)):
        PACKED_WEIGHTS.clear()
        monkeypatch.setattr(fast_linear, "CANDIDATES", candidates)
        with torch.no_grad():
            kernel = KernelChoice(repeats=1).kernel(torch.empty(2, 8), group)
        assert (kernel is packed) is kept
        assert PACKED_WEIGHTS.holds(model[0].weight) is kept  # measuring packed it; freed unless chosen
    # Chosen for one bucket, losing in another: the copies stay for the bucket that reads them.
    choice = KernelChoice(repeats=1)
    with torch.no_grad():
        monkeypatch.setattr(fast_linear, "CANDIDATES", wins)
        assert choice.kernel(torch.empty(4, 8), group) is packed
        monkeypatch.setattr(fast_linear, "CANDIDATES", loses)
        assert choice.kernel(torch.empty(2, 8), group) is not packed
    assert PACKED_WEIGHTS.holds(model[0].weight)


@needs_onednn
def test_weights_too_large_for_free_memory_are_not_packed(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    PACKED_WEIGHTS.clear()
    monkeypatch.setattr(fast_linear, "available_memory_bytes", lambda: 100)  # bytes: less than the weights
    measured = []
    monkeypatch.setitem(fast_linear.CANDIDATES, "onednn_packed",
                        lambda x, w, b: measured.append(1) or F.linear(x, w, b))
    with torch.no_grad():
        KernelChoice(repeats=1).kernel(torch.empty(4, 8), LinearGroup([model[0], model[2]]))
    assert not measured and not PACKED_WEIGHTS.holds(model[0].weight)
    monkeypatch.setattr(fast_linear, "available_memory_bytes", lambda: None)  # unknown: allowed
    assert fast_linear.packing_fits([model[0].weight])


def test_a_nested_block_leaves_the_outer_blocks_switch_in_place():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with fast_small_row_linear(model):
        outer = model[0].forward
        with fast_small_row_linear(model):
            assert model[0].forward is outer
        assert model[0].forward is outer  # still switched: `generate` enters its own block inside a caller's
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])


def test_linear_on_a_bare_weight_uses_the_open_blocks_measurements(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
    other = nn.Linear(8, 4)
    weight, bias = torch.randn(5, 8), torch.randn(5)  # rows gathered from an unembedding: not an nn.Linear
    x = torch.randn(2, 3, 8)
    expected = F.linear(x, weight, bias)
    choice = KernelChoice(repeats=1)
    chosen = []
    original = KernelChoice.kernel

    def recording(self, flat, group):
        chosen.append((flat.shape[0], group))
        return original(self, flat, group)

    monkeypatch.setattr(KernelChoice, "kernel", recording)
    with torch.no_grad():
        torch.testing.assert_close(fast_linear.linear(x, weight, bias), expected)  # no block open: F.linear
        assert not chosen
        with fast_small_row_linear(model, choice):
            torch.testing.assert_close(fast_linear.linear(x, weight, bias), expected)
            assert chosen[-1][0] == 6 and chosen[-1][1].modules == list(model)  # 6 rows, the model's measurements
            with fast_small_row_linear(model, choice):  # nested over the same model: still the model's layers
                fast_linear.linear(x, weight, bias)
                assert chosen[-1][1].modules == list(model)
            with fast_small_row_linear(other, choice):  # another model's block: its own layers
                fast_linear.linear(x, weight, bias)
                assert chosen[-1][1].modules == [other]
            fast_linear.linear(x, weight, bias)
            assert chosen[-1][1].modules == list(model)
        count = len(chosen)
        fast_linear.linear(x, weight, bias)
        assert len(chosen) == count  # closed again
    with fast_small_row_linear(model, choice):
        out = fast_linear.linear(x, weight.requires_grad_(), bias)  # autograd: F.linear, gradients flow
        assert out.requires_grad and len(chosen) == count
