"""The start-up check of the compiled ops (megatron_ki/kernels/selfcheck.py): the CPU build passes it, and a
deliberately wrong op (forward or backward, KL or softmax) is caught, logged once and replaced by the
PyTorch reference."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from megatron_ki.kernels import build, reference, selfcheck
from megatron_ki.kernels.kl import fused_kl_div
from megatron_ki.kernels.softmax import scaled_masked_softmax


@pytest.fixture(scope="module")
def ext():
    module = build.load_cpu_extension()
    if module is None:
        pytest.skip("the CPU extension did not build here")
    return module


@pytest.fixture
def fresh(monkeypatch):
    """Forget earlier checks and log lines, so this test's ones are the first."""
    monkeypatch.setattr(selfcheck, "_results", {})
    monkeypatch.setattr(build, "_logged", set())


def wrapped(ext, **replace):
    """The real extension with some functions replaced."""
    names = ("kl_forward_stats", "kl_backward", "softmax_forward", "softmax_backward")
    return SimpleNamespace(**{**{n: getattr(ext, n) for n in names}, **replace})


def test_the_cpu_build_passes(ext, fresh):
    cpu = torch.device("cpu")
    assert selfcheck.check_kl(ext, cpu) is None
    assert selfcheck.check_softmax(ext, cpu) is None
    with torch.no_grad():  # a first use inside evaluation
        assert selfcheck.verified(ext, "scaled_masked_softmax", cpu, "CPU C++ extension")
    assert build.select_backend("fused_kl_div", torch.zeros(1))[1] is ext


def off_by_a_bit(fn):
    return lambda *a: fn(*a) * 1.01


def masked_rows_wrong(fn):
    """Right except in an all -inf row (gives NaN there): the edge case the check includes."""

    def op(s, t, tau):
        out = fn(s, t, tau)
        dead = torch.isinf(s).all(-1)
        out[dead] = float("nan")
        return out

    return op


def raises(*_a):
    raise RuntimeError("illegal instruction in the AVX2 path")


@pytest.mark.parametrize(
    "name,bad,family,says",
    [
        ("forward", lambda e: {"kl_forward_stats": off_by_a_bit(e.kl_forward_stats)}, "kl", "kl_forward_stats"),
        ("masked_row", lambda e: {"kl_forward_stats": masked_rows_wrong(e.kl_forward_stats)}, "kl", "non-finite"),
        ("backward", lambda e: {"kl_backward": off_by_a_bit(e.kl_backward)}, "kl", "kl_backward"),
        ("raising", lambda e: {"kl_backward": raises}, "kl", "raised RuntimeError"),
        ("softmax", lambda e: {"softmax_forward": lambda x, m, sc, c: e.softmax_forward(x, None, sc, c)}, "softmax", "forward"),
        ("softmax_grad", lambda e: {"softmax_backward": off_by_a_bit(e.softmax_backward)}, "softmax", "backward"),
    ],
)  # fmt: skip
def test_a_wrong_op_falls_back_with_one_line(ext, fresh, monkeypatch, caplog, name, bad, family, says):
    wrong = wrapped(ext, **bad(ext))
    monkeypatch.setattr(build, "load_cpu_extension", lambda: wrong)
    op = "fused_kl_div" if family == "kl" else "scaled_masked_softmax"
    with caplog.at_level(logging.INFO, logger="megatron_ki"):
        assert build.select_backend(op, torch.zeros(1)) == ("PyTorch reference", None)
        build.select_backend(op, torch.zeros(1))
    warnings = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"CPU C++ extension {family} ops" in warnings[0] and says in warnings[0]
    assert "using the PyTorch reference" in warnings[0]


def test_the_run_then_computes_with_the_reference(ext, fresh, monkeypatch):
    """With a wrong op injected the results are the reference's, not the wrong op's."""
    wrong = wrapped(
        ext,
        kl_forward_stats=off_by_a_bit(ext.kl_forward_stats),
        softmax_forward=lambda x, m, sc, c: torch.zeros_like(x),
    )
    monkeypatch.setattr(build, "load_cpu_extension", lambda: wrong)
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 19, generator=gen), torch.randn(4, 19, generator=gen)
    want = reference.kl_forward_stats_reference(s, t, 1.0)
    terms_s = s.clone().requires_grad_(True)
    got = fused_kl_div(terms_s, t)
    lse_s, lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
    expect = want[:, 4] / want[:, 3] - lse_t + lse_s
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    x = torch.randn(1, 2, 3, 4, generator=gen)
    torch.testing.assert_close(scaled_masked_softmax(x, None), torch.softmax(x, -1))
