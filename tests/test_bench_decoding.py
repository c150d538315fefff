"""The decoding benchmark's bookkeeping (benchmarks/bench_decoding.py): every adapter gets its own row."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from bench_decoding import adapter_labels  # noqa: E402  (benchmarks/ is not a package)


def test_adapters_saved_under_the_same_folder_name_get_distinct_labels(tmp_path):
    # The main job saves every run's heads as .../heads-<type>-k<K>-<key>/final.
    first, second = tmp_path / "heads-a" / "final", tmp_path / "heads-b" / "final"
    other = tmp_path / "mine"
    assert adapter_labels([str(first), str(second), str(other)]) == ["heads-a/final", "heads-b/final", "mine"]


def test_a_single_adapter_is_labelled_by_its_folder_name(tmp_path):
    assert adapter_labels([str(tmp_path / "heads-a" / "final")]) == ["final"]


def test_the_same_adapter_twice_is_refused(tmp_path):
    path = tmp_path / "heads-a" / "final"
    with pytest.raises(SystemExit, match="lists .*final.* twice"):
        adapter_labels([str(path), str(path) + "/"])
