"""csrc/helpers.cpp against the NumPy implementations: identical arrays, and the documented semantics."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from megatron_ki.data import helpers


@pytest.fixture(scope="module")
def cpp():
    mod = helpers.load_cpp()
    if mod is None:
        pytest.skip("C++ helpers could not be built here (no compiler or pybind11); NumPy path is used")
    return mod


def _case(seed: int, n_docs: int, max_len: int, epochs: int):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, max_len, n_docs).astype(np.int32)
    sizes[rng.integers(0, n_docs)] = max_len  # at least one non-empty document
    doc_idx = np.tile(np.arange(n_docs), epochs)
    rng.shuffle(doc_idx)
    return sizes, doc_idx


@pytest.mark.parametrize(
    "seed,n_docs,max_len,epochs,seq",
    [(0, 50, 40, 1, 7), (1, 300, 5, 3, 16), (2, 10, 200, 2, 1), (3, 1000, 30, 2, 128)],
)
def test_sample_idx_cpp_equals_numpy_and_definition(cpp, seed, n_docs, max_len, epochs, seq):
    sizes, doc_idx = _case(seed, n_docs, max_len, epochs)
    total = int(sizes[doc_idx].sum())
    n = (total - 1) // seq
    a = helpers.build_sample_idx(sizes, doc_idx, seq, n, use_cpp=True)
    b = helpers.build_sample_idx_numpy(sizes, doc_idx, seq, n)
    assert a.dtype == b.dtype == np.int64 and a.shape == (n + 1, 2)
    np.testing.assert_array_equal(a, b)
    # definition: row i points at global token i * seq, inside a non-empty document
    starts = np.concatenate([[0], np.cumsum(sizes[doc_idx].astype(np.int64))])
    for i in range(0, n + 1, max(1, n // 50)):
        pos, off = a[i]
        assert starts[pos] + off == i * seq and 0 <= off < sizes[doc_idx[pos]]


def test_sample_idx_rejects_too_many_samples(cpp):
    sizes = np.array([5, 5], np.int32)
    doc_idx = np.array([0, 1])
    for use_cpp in (True, False):
        with pytest.raises(ValueError, match="not enough tokens"):
            helpers.build_sample_idx(sizes, doc_idx, 3, 4, use_cpp=use_cpp)


@pytest.mark.parametrize(
    "weights,size",
    [([0.3, 0.7], 1000), ([0.5, 0.25, 0.125, 0.125], 5000), ([1.0], 10), ([1 / 3, 1 / 3, 1 / 3], 3001)],
)
def test_blending_cpp_equals_numpy(cpp, weights, size):
    a = helpers.build_blending_indices(np.array(weights), size, use_cpp=True)
    b = helpers.build_blending_indices_numpy(np.array(weights), size)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    counts = np.bincount(a[0], minlength=len(weights))
    assert np.all(np.abs(counts - np.array(weights) * size) <= 1.0 + 1e-9)
    for d in range(len(weights)):  # each dataset's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(a[1][a[0] == d], np.arange(counts[d]))


def test_log_line_says_which_path(monkeypatch, caplog):
    monkeypatch.setenv("MEGATRON_KI_KERNELS", "reference")
    with caplog.at_level(logging.INFO, logger="megatron_ki.data.helpers"):
        assert helpers.load_cpp.__wrapped__() is None
    assert "dataset helpers: NumPy (MEGATRON_KI_KERNELS=reference)" in caplog.text
    monkeypatch.setenv("MEGATRON_KI_KERNELS", "auto")
    monkeypatch.setenv("MEGATRON_KI_NO_CPP", "1")  # the old spelling still works, with a deprecation line
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert helpers.load_cpp.__wrapped__() is None
    assert "MEGATRON_KI_NO_CPP=1 is deprecated: use MEGATRON_KI_KERNELS=reference" in caplog.text
    monkeypatch.setenv("MEGATRON_KI_NO_CPP", "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron_ki.data.helpers"):
        mod = helpers.load_cpp.__wrapped__()
    assert ("dataset helpers: C++" in caplog.text) == (mod is not None)
    assert mod is not None or "dataset helpers: NumPy (C++ helpers unavailable" in caplog.text
