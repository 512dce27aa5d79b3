"""Scaled masked / causal softmax: the CPU C++ op against the PyTorch reference and float64."""

from __future__ import annotations

import pytest
import torch

from megatron_ki.kernels import load_cpu_extension, scaled_masked_softmax, scaled_upper_triang_masked_softmax
from megatron_ki.kernels import reference as ref

# 16-bit outputs are rounded once from fp32 math: half an ulp of the output dtype
OUT_TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def ext():
    module = load_cpu_extension()
    assert module is not None, "the CPU extension must build in CI (see the megatron_ki log for the error)"
    return module


def _scores(shape, dtype, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _mask(shape, seed, p=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < p


def _softmax64(x, mask, scale):
    x = x.double() * scale
    if mask is not None:
        x = x.masked_fill(mask, float("-inf"))
    out = torch.softmax(x, -1)
    return torch.nan_to_num(out, nan=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 5, 37), (2, 1, 1, 37), (5, 37), (2, 3, 5, 37)])
def test_forward_matches_float64(ext, dtype, mask_shape):
    x = _scores((2, 3, 5, 37), dtype, 1)
    mask = None if mask_shape is None else _mask(mask_shape, 2)
    got = scaled_masked_softmax(x, mask, scale=0.7)
    assert got.dtype == dtype and got.shape == x.shape
    want = _softmax64(x, mask, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=OUT_TOL[dtype], atol=OUT_TOL[dtype])
    torch.testing.assert_close(
        got, ref.scaled_masked_softmax_reference(x, mask, 0.7), rtol=0, atol=OUT_TOL[dtype]
    )
    if mask is not None:
        assert (got.masked_select(mask.expand_as(got)) == 0).all()


def test_fully_masked_rows_are_zero(ext):
    x = _scores((1, 2, 4, 9), torch.float32, 3).requires_grad_()
    mask = torch.zeros(1, 1, 4, 9, dtype=torch.bool)
    mask[0, 0, 1] = True  # query 1 sees nothing
    out = scaled_masked_softmax(x, mask, 1.0)
    assert (out[:, :, 1] == 0).all() and not torch.isnan(out).any()
    torch.testing.assert_close(out.sum(-1)[:, :, [0, 2, 3]], torch.ones(1, 2, 3))
    out.backward(torch.randn_like(out))
    assert (x.grad[:, :, 1] == 0).all() and torch.isfinite(x.grad).all()


def test_extreme_scores(ext):
    x = torch.tensor([[[[1e4, -1e4, 0.0, float("-inf")], [float("-inf")] * 4]]])
    out = scaled_masked_softmax(x, None, 1.0)
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0] * 4]]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(2, 3), (4,)])
def test_causal_matches_float64(ext, dtype, lead):
    x = _scores((*lead, 19, 19), dtype, 4)
    got = scaled_upper_triang_masked_softmax(x, scale=0.5)
    assert got.shape == x.shape and got.dtype == dtype
    want = _softmax64(x, ref.causal_mask(19, 19), 0.5)
    torch.testing.assert_close(got.double(), want, rtol=OUT_TOL[dtype], atol=OUT_TOL[dtype])
    assert (got.triu(1) == 0).all()


def test_gradcheck_float64(ext):
    x = _scores((2, 2, 4, 6), torch.float64, 5, scale=1.0).requires_grad_()
    mask = _mask((2, 1, 4, 6), 6)
    mask[0, 0, 2] = True  # one fully masked row
    assert torch.autograd.gradcheck(lambda a: scaled_masked_softmax(a, mask, 0.9), (x,))
    assert torch.autograd.gradcheck(lambda a: ref.scaled_masked_softmax_reference(a, mask, 0.9), (x,))
    y = _scores((3, 5, 5), torch.float64, 7, scale=1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: scaled_upper_triang_masked_softmax(a, 1.3), (y,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradient_matches_reference(ext, dtype):
    x = _scores((2, 2, 8, 33), dtype, 8).requires_grad_()
    mask = _mask((2, 1, 1, 33), 9)
    g = _scores((2, 2, 8, 33), dtype, 10, scale=1.0)
    scaled_masked_softmax(x, mask, 0.3).backward(g)
    x64 = x.detach().double().requires_grad_()
    ref.scaled_masked_softmax_reference(x64, mask, 0.3).backward(g.double())
    assert x.grad.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)


def test_bad_arguments(ext):
    x = torch.zeros(1, 1, 3, 3)
    with pytest.raises(TypeError, match="bool"):
        scaled_masked_softmax(x, torch.zeros(1, 1, 3, 3), 1.0)
    with pytest.raises(ValueError, match="broadcast"):
        scaled_masked_softmax(x, torch.zeros(2, 1, 3, 4, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match=r"\[b, heads, sq, sk\]"):
        scaled_masked_softmax(torch.zeros(3, 3), None, 1.0)
    with pytest.raises(ValueError, match="sq == sk"):
        scaled_upper_triang_masked_softmax(torch.zeros(1, 3, 4), 1.0)
