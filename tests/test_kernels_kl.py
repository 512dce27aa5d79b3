"""Fused KL kernels: the CPU C++ op against the PyTorch reference and float64 ground truth.

The ground truth (``_kl64``) is an independent log_softmax formulation in float64, not the statistics contract.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from megatron_ki.kernels import (
    KL_MODES,
    build,
    fused_kl_div,
    kl_backward,
    kl_forward_stats,
    kl_from_stats,
    load_cpu_extension,
    merge_kl_stats,
    rescale_kl_stats,
)
from megatron_ki.kernels import reference as ref

NEG_INF = float("-inf")
# fp32 accumulation of the sums: relative error ~1e-6; 16-bit *inputs* are compared with the reference
# evaluated on the same rounded inputs, so the tolerance only covers the fp32 math and the output rounding.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def ext():
    module = load_cpu_extension()
    assert module is not None, "the CPU extension must build in CI (see the megatron_ki log for the error)"
    return module


def _logits(n: int, v: int, dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def _kl64(s: torch.Tensor, t: torch.Tensor, tau: float, mode: str = "forward_kl") -> torch.Tensor:
    """Per-row KL(p_t || p_s) (or reverse KL / cross-entropy) in float64 via log_softmax; 0 log 0 = 0."""
    lp_s = torch.log_softmax(s.double() / tau, dim=-1)
    lp_t = torch.log_softmax(t.double().detach() / tau, dim=-1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    zero = torch.zeros((), dtype=torch.float64)
    if mode == "forward_kl":
        return torch.where(p_t > 0, p_t * torch.where(p_t > 0, lp_t - lp_s, zero), zero).sum(-1)
    if mode == "reverse_kl":
        return torch.where(p_s > 0, p_s * torch.where(p_s > 0, lp_s - lp_t, zero), zero).sum(-1)
    return -torch.where(p_t > 0, p_t * torch.where(p_t > 0, lp_s, zero), zero).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("v", [1, 7, 1000, 50257])
def test_stats_match_reference(ext, dtype, v):
    n = 3 if v > 1000 else 6
    s, t = _logits(n, v, dtype, 1), _logits(n, v, dtype, 2)
    s[0, : (v + 1) // 2] = NEG_INF  # -inf entries in the student
    t[1, ::2] = NEG_INF
    t[2] = NEG_INF  # a whole -inf teacher row: m = -inf, Z = 0, no NaN
    got = ext.kl_forward_stats(s, t, 2.0)
    want = ref.kl_forward_stats_reference(s.double(), t.double(), 2.0)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(got).any()
    assert got[2, 2] == NEG_INF and (got[2, [3, 4, 6]] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("mode", ["forward_kl", "reverse_kl", "cross_entropy"])
@pytest.mark.parametrize("v", [2, 7, 333])
def test_values_against_float64(ext, mode, v):
    s, t = _logits(5, v, torch.float32, 3), _logits(5, v, torch.float32, 4)
    got = fused_kl_div(s, t, temperature=1.7, mode=mode)
    want = _kl64(s, t, 1.7, mode)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if mode != "cross_entropy":
        assert (got >= -1e-6).all()


def test_kl_from_stats_terms_are_consistent(ext):
    s, t = _logits(4, 101, torch.float64, 5), _logits(4, 101, torch.float64, 6)
    terms = kl_from_stats(kl_forward_stats(s, t, 2.0))
    torch.testing.assert_close(terms.lse_s, torch.logsumexp(s / 2.0, -1))
    torch.testing.assert_close(terms.lse_t, torch.logsumexp(t / 2.0, -1))
    p_t = torch.softmax(t / 2.0, -1)
    entropy = -(p_t * torch.log_softmax(t / 2.0, -1)).sum(-1)
    torch.testing.assert_close(terms.cross_entropy - terms.forward_kl, entropy)
    torch.testing.assert_close(terms.reverse_kl, _kl64(s, t, 2.0, "reverse_kl"))


def test_extreme_logits(ext):
    v = 64
    s = torch.zeros(4, v)
    t = torch.zeros(4, v)
    s[0, ::3], t[0, 1::5] = 1e4, -1e4  # +-1e4
    s[1, :10], t[1, :10] = NEG_INF, NEG_INF  # p = 0 in both: contributes nothing
    s[2, ::2] = -1e4
    t[3, 5:] = NEG_INF  # teacher one-hot-ish
    s[3, :5] = NEG_INF  # student has zero mass where the teacher has mass: KL = +inf
    got = fused_kl_div(s, t, temperature=1.0)
    want = _kl64(s, t, 1.0)
    assert torch.isinf(got[3]) and got[3] > 0
    torch.testing.assert_close(got[:3].double(), want[:3], rtol=1e-5, atol=1e-4)
    grad = kl_backward(
        s[:3], t[:3], 1.0, *kl_from_stats(kl_forward_stats(s[:3], t[:3]))[3:], None, torch.ones(3)
    )
    assert torch.isfinite(grad).all()


def test_vocab_slices_merge_to_full_row(ext):
    """The tensor-parallel contract: stats of 3 vocab slices, merged, equal the full-row stats and results."""
    n, v, tau = 6, 50257, 2.0
    s, t = _logits(n, v, torch.float32, 7), _logits(n, v, torch.float32, 8)
    s[0, :20000] = NEG_INF  # slice 0 all -inf in the student for row 0
    t[1, 20000:40000] = NEG_INF  # slice 1 all -inf in the teacher for row 1
    s[2, 40000:] += 30.0  # the max lives in different slices for s and t
    bounds = [0, 20000, 40000, v]
    parts = [kl_forward_stats(s[:, a:b], t[:, a:b], tau) for a, b in itertools.pairwise(bounds)]
    assert parts[0][0, 0] == NEG_INF and parts[0][0, 1] == 0 and not torch.isnan(parts[0]).any()
    merged = merge_kl_stats(parts)
    full = kl_forward_stats(s, t, tau)
    torch.testing.assert_close(merged, full, rtol=2e-5, atol=1e-5)
    got, want = kl_from_stats(merged), kl_from_stats(full)
    for g_term, w_term in zip(got, want):
        torch.testing.assert_close(g_term, w_term, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.forward_kl.double(), _kl64(s, t, tau), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        got.cross_entropy.double(), _kl64(s, t, tau, "cross_entropy"), rtol=1e-5, atol=1e-5
    )

    # what each TP rank does: all-reduce max of m, rescale locally, all-reduce sum; then local backward slices
    m_s = torch.stack([p[:, 0] for p in parts]).amax(0)
    m_t = torch.stack([p[:, 2] for p in parts]).amax(0)
    summed = torch.stack([rescale_kl_stats(p, m_s, m_t) for p in parts]).sum(0)
    torch.testing.assert_close(summed[:, [1, 3, 4, 5, 6]], full[:, [1, 3, 4, 5, 6]], rtol=2e-5, atol=1e-5)
    g = torch.rand(n, generator=torch.Generator().manual_seed(0))
    for mode in ("forward_kl", "reverse_kl"):
        whole = kl_backward(s, t, tau, got.lse_s, got.lse_t, got.reverse_kl, g, mode)
        pieces = [
            kl_backward(s[:, a:b], t[:, a:b], tau, got.lse_s, got.lse_t, got.reverse_kl, g, mode)
            for a, b in itertools.pairwise(bounds)
        ]
        # row 1 has teacher p = 0 where the student has mass: its reverse KL (and gradient) is not finite
        torch.testing.assert_close(torch.cat(pieces, -1), whole, rtol=0, atol=0, equal_nan=True)
        finite_rows = [0, 2, 3, 4, 5] if mode == "reverse_kl" else list(range(n))
        assert torch.isfinite(whole[finite_rows]).all()


@pytest.mark.parametrize("mode", KL_MODES)
def test_gradcheck_float64(ext, mode, monkeypatch):
    s = _logits(3, 7, torch.float64, 9, scale=1.0).requires_grad_()
    t = _logits(3, 7, torch.float64, 10, scale=1.0)
    ignore = torch.tensor([False, True, False])
    assert torch.autograd.gradcheck(lambda x: fused_kl_div(x, t, 1.5, ignore, mode), (s,))
    monkeypatch.setattr(build, "load_cpu_extension", lambda: None)  # the reference fallback
    assert torch.autograd.gradcheck(lambda x: fused_kl_div(x, t, 1.5, ignore, mode), (s,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["forward_kl", "reverse_kl"])
def test_gradient_matches_reference(ext, dtype, mode):
    s = _logits(8, 257, dtype, 11).requires_grad_()
    t = _logits(8, 257, dtype, 12)
    w = torch.rand(8, generator=torch.Generator().manual_seed(1))
    (fused_kl_div(s, t, 2.0, mode=mode) * w).sum().backward()
    s64 = s.detach().double().requires_grad_()
    (_kl64(s64, t, 2.0, mode) * w.double()).sum().backward()
    assert s.grad.dtype == dtype and t.grad is None
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype] * 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_values(ext, dtype):
    s, t = _logits(16, 3001, dtype, 13), _logits(16, 3001, dtype, 14)
    got = fused_kl_div(s, t, 2.0)
    # exact answer for the rounded inputs: fp32 accumulation keeps it to ~1e-6 relative
    torch.testing.assert_close(got.double(), _kl64(s, t, 2.0), rtol=1e-5, atol=1e-5)
    # mixed dtypes: the teacher is cast to the student's dtype
    got_mixed = fused_kl_div(s, t.float(), 2.0)
    torch.testing.assert_close(got_mixed, got)


def test_ignored_rows_and_leading_dims(ext):
    s = _logits(2 * 3, 50, torch.float32, 15).reshape(2, 3, 50).requires_grad_()
    t = _logits(2 * 3, 50, torch.float32, 16).reshape(2, 3, 50)
    ignore = torch.tensor([[False, True, False], [True, True, False]])
    with torch.no_grad():
        s[0, 1] = NEG_INF  # garbage in ignored rows must not leak NaN
        t[1, 0] = NEG_INF
    out = fused_kl_div(s, t, 1.0, ignore_mask=ignore)
    assert out.shape == (2, 3)
    assert (out[ignore] == 0).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out[~ignore].double(), _kl64(s[~ignore].detach(), t[~ignore], 1.0))
    out.sum().backward()
    assert (s.grad[ignore] == 0).all() and torch.isfinite(s.grad).all()
    assert (s.grad[~ignore] != 0).any()


def test_all_rows_ignored(ext):
    s = torch.full((4, 9), NEG_INF, requires_grad=True)
    t = torch.full((4, 9), NEG_INF)
    out = fused_kl_div(s, t, 1.0, ignore_mask=torch.ones(4, dtype=torch.bool))
    out.sum().backward()
    assert (out == 0).all() and (s.grad == 0).all()
    grad = kl_backward(
        s.detach(), t, 1.0, torch.full((4,), NEG_INF), torch.full((4,), NEG_INF), None, torch.zeros(4)
    )
    assert (grad == 0).all()


def test_reference_path_and_single_log_line(ext, monkeypatch, caplog):
    monkeypatch.setattr(build, "_logged", set())
    s, t = _logits(3, 11, torch.float32, 17), _logits(3, 11, torch.float32, 18)
    with caplog.at_level(logging.INFO, logger="megatron_ki"):
        fused_kl_div(s, t)
        fused_kl_div(s, t)
    lines = [r.getMessage() for r in caplog.records if "fused_kl_div" in r.getMessage()]
    assert lines == ["megatron_ki kernels: fused_kl_div runs on the CPU C++ extension (cpu tensors)"]
    monkeypatch.setattr(build, "load_cpu_extension", lambda: None)  # as if the build had failed
    torch.testing.assert_close(fused_kl_div(s, t).double(), _kl64(s, t, 1.0), rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("MEGATRON_KI_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MEGATRON_KI_KERNELS"):
        build.kernels_disabled()


def test_bad_arguments(ext):
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="differ"):
        fused_kl_div(s, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        fused_kl_div(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="ignore_mask"):
        fused_kl_div(s, s, ignore_mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="row_value"):
        kl_backward(s, s, 1.0, torch.zeros(2), torch.zeros(2), None, torch.ones(2), "reverse_kl")


def test_strided_inputs(ext):
    """Vocab slices of a wider tensor (row stride > V) run in place; a transposed input is made contiguous."""
    wide_s, wide_t = _logits(6, 40, torch.float32, 19), _logits(6, 40, torch.float32, 20)
    s, t = wide_s[:, 5:22], wide_t[:, 5:22]
    assert s.stride(0) == 40
    torch.testing.assert_close(kl_forward_stats(s, t), kl_forward_stats(s.contiguous(), t.contiguous()))
    s_t = _logits(17, 6, torch.float32, 21).t()  # [6, 17] with stride(-1) == 6
    torch.testing.assert_close(fused_kl_div(s_t, t).double(), _kl64(s_t, t, 1.0), rtol=1e-5, atol=1e-6)
