"""Fused KL divergence between student and teacher logits, and the partial-statistics interface.

Contract (all per row of ``[N, V]`` logits, ``x' = x / tau``), computed in one pass with online max rescaling:

    kl_forward_stats(s, t, tau) -> [N, 7] = [m_s, Z_s, m_t, Z_t, A, B, C]
    m = max(x'),  Z = sum exp(x' - m),  A = sum exp(t' - m_t)(t' - s'),  B = sum exp(s' - m_s)(s' - t'),
    C = sum exp(t' - m_t)(t' - m_t)

For the full row, lse = m + log Z and
    forward KL = A/Z_t - lse_t + lse_s,  reverse KL = B/Z_s - lse_s + lse_t,
    cross-entropy H(p_t, p_s) = forward KL + (log Z_t - C/Z_t).

Vocab-parallel use (V split over tensor-parallel ranks): all-reduce MAX of columns 0 and 2, call
``rescale_kl_stats(local, m_s_global, m_t_global)``, all-reduce SUM of the result, then ``kl_from_stats``.
Z, A and B only need scaling by exp(m_local - m_global); C also needs ``+ (m_local - m_global) * Z_local``
because it is measured from m_t itself -- ``rescale_kl_stats`` does both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference
from .build import select_backend

_MODE_CODE = {"forward_kl": 0, "cross_entropy": 0, "reverse_kl": 1}


class KLTerms(NamedTuple):
    """Per-row results derived from full-row statistics (fp32, fp64 for fp64 logits)."""

    forward_kl: torch.Tensor
    reverse_kl: torch.Tensor
    cross_entropy: torch.Tensor
    lse_s: torch.Tensor
    lse_t: torch.Tensor


def _check_pair(s: torch.Tensor, t: torch.Tensor, temperature: float, op: str) -> None:
    if s.shape != t.shape:
        raise ValueError(f"{op}: student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} differ")
    if s.dim() < 1:
        raise ValueError(f"{op}: logits need a vocabulary dimension, got a scalar")
    if not s.is_floating_point():
        raise TypeError(f"{op}: logits must be floating point, got {s.dtype}")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")


def _rows(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D views contiguous along V; the teacher is cast to the student's dtype if they differ."""
    v = s.shape[-1]
    s2 = s.reshape(-1, v)
    t2 = t.detach().to(s.dtype).reshape(-1, v)
    if v > 1 and s2.stride(-1) != 1:
        s2 = s2.contiguous()
    if v > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return s2, t2


def kl_forward_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[..., 7]`` fp32 statistics ``[m_s, Z_s, m_t, Z_t, A, B, C]`` over the given (local) vocab slice.

    Rows that are all ``-inf`` give m = -inf and Z = A = B = C = 0 (no NaN). fp64 logits give fp64 stats.
    """
    _check_pair(student_logits, teacher_logits, temperature, "kl_forward_stats")
    lead = student_logits.shape[:-1]
    _, ext = select_backend("kl_forward_stats", student_logits)
    s2, t2 = _rows(student_logits.detach(), teacher_logits)
    if ext is None:
        out = reference.kl_forward_stats_reference(s2, t2, temperature)
    else:
        out = ext.kl_forward_stats(s2, t2, float(temperature))
    return out.reshape(*lead, 7)


def kl_backward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    row_value: torch.Tensor | None,
    grad_rows: torch.Tensor,
    mode: str = "forward_kl",
) -> torch.Tensor:
    """Gradient w.r.t. ``student_logits`` (same shape and dtype) of ``sum(grad_rows * per_row_loss)``.

    ``lse_s``/``lse_t`` are the GLOBAL (full-vocabulary) log-partition functions at temperature ``tau``;
    ``mode`` is ``forward_kl`` / ``cross_entropy`` (grad = g (p_s - p_t) / tau) or ``reverse_kl``
    (grad = g p_s ((s - t)/tau - lse_s + lse_t - row_value) / tau, ``row_value`` = full-row reverse KL).
    Rows with ``grad_rows == 0`` get exactly zero.
    """
    _check_pair(student_logits, teacher_logits, temperature, "kl_backward")
    if mode not in _MODE_CODE:
        raise ValueError(f"kl_backward: mode must be one of {tuple(_MODE_CODE)}, got {mode!r}")
    if mode == "reverse_kl" and row_value is None:
        raise ValueError("kl_backward: mode 'reverse_kl' needs row_value (the full-row reverse KL)")
    shape = student_logits.shape
    _, ext = select_backend("kl_backward", student_logits)
    s2, t2 = _rows(student_logits.detach(), teacher_logits)
    flat = [x.detach().reshape(-1) if x is not None else None for x in (lse_s, lse_t, row_value, grad_rows)]
    if ext is None:
        grad = reference.kl_backward_reference(s2, t2, temperature, *flat, mode=mode)
    else:
        if flat[2] is None:
            flat[2] = torch.zeros_like(flat[0])
        grad = ext.kl_backward(s2, t2, float(temperature), *flat, _MODE_CODE[mode])
    return grad.reshape(shape)


def kl_from_stats(stats: torch.Tensor) -> KLTerms:
    """Per-row KL terms from FULL-row statistics ``[..., 7]`` (combined in fp64 to avoid cancellation)."""
    out_dtype = torch.float64 if stats.dtype == torch.float64 else torch.float32
    m_s, z_s, m_t, z_t, a, b, c = stats.double().unbind(-1)
    lse_s = m_s + torch.log(z_s)
    lse_t = m_t + torch.log(z_t)
    diff = (m_s - m_t) + (torch.log(z_s) - torch.log(z_t))  # lse_s - lse_t without the large common part
    forward = a / z_t + diff
    reverse = b / z_s - diff
    entropy_t = torch.log(z_t) - c / z_t
    return KLTerms(
        forward.to(out_dtype),
        reverse.to(out_dtype),
        (forward + entropy_t).to(out_dtype),
        lse_s.to(out_dtype),
        lse_t.to(out_dtype),
    )


def rescale_kl_stats(stats: torch.Tensor, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    """Re-express local statistics relative to global maxima ``m_s``/``m_t`` (``[...]``) so slices SUM.

    Z, A, B scale by exp(m_local - m_global); C becomes exp(m_local - m_global) (C + (m_local - m_global) Z).
    Slices whose Z is 0 (all ``-inf``) contribute exactly 0.
    """
    ms_l, zs, mt_l, zt, a, b, c = stats.unbind(-1)
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    ds = torch.where(zs > 0, ms_l - m_s, zero)
    dt = torch.where(zt > 0, mt_l - m_t, zero)
    fs = torch.where(zs > 0, torch.exp(ds), zero)
    ft = torch.where(zt > 0, torch.exp(dt), zero)
    c_new = ft * (c + dt * zt)
    return torch.stack(
        [m_s.to(stats.dtype), zs * fs, m_t.to(stats.dtype), zt * ft, a * ft, b * fs, c_new], -1
    )


def merge_kl_stats(parts: list[torch.Tensor]) -> torch.Tensor:
    """Full-row statistics from per-slice statistics (the single-process version of the TP merge)."""
    if not parts:
        raise ValueError("merge_kl_stats: needs at least one slice")
    m_s = torch.stack([p[..., 0] for p in parts]).amax(0)
    m_t = torch.stack([p[..., 2] for p in parts]).amax(0)
    return (
        torch.stack([rescale_kl_stats(p, m_s, m_t) for p in parts])
        .sum(0)
        .index_copy(
            -1, torch.tensor([0, 2], device=m_s.device), torch.stack([m_s, m_t], -1).to(parts[0].dtype)
        )
    )


class _FusedKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, s, t, temperature: float, ignore, mode: str):
        stats = ext.kl_forward_stats(s, t, temperature)
        terms = kl_from_stats(stats)
        value = getattr(terms, mode)
        if ignore is not None:
            value = value.masked_fill(ignore, 0.0)
        ctx.ext, ctx.temperature, ctx.mode = ext, temperature, mode
        ctx.save_for_backward(s, t, terms.lse_s, terms.lse_t, value, ignore)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        s, t, lse_s, lse_t, value, ignore = ctx.saved_tensors
        g = grad_value.to(lse_s.dtype)
        if ignore is not None:
            g = g.masked_fill(ignore, 0.0)
        grad = ctx.ext.kl_backward(
            s, t, ctx.temperature, lse_s, lse_t, value, g.contiguous(), _MODE_CODE[ctx.mode]
        )
        return None, grad, None, None, None, None


def fused_kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    ignore_mask: torch.Tensor | None = None,
    mode: str = "forward_kl",
) -> torch.Tensor:
    """Per-row KL(p_t || p_s), p = softmax(logits / tau), over logits ``[..., V]``: fp32 ``[...]``.

    ``ignore_mask`` (bool ``[...]``, True = ignore) rows give 0 and zero gradient. Differentiable w.r.t.
    ``student_logits`` only. ``mode`` may also be ``reverse_kl`` or ``cross_entropy`` (H(p_t, p_s)). The fused
    path keeps no ``[N, V]`` fp32 temporary: the only full-size tensor it makes is the gradient, in s's dtype.
    """
    _check_pair(student_logits, teacher_logits, temperature, "fused_kl_div")
    if mode not in _MODE_CODE:
        raise ValueError(f"fused_kl_div: mode must be one of {tuple(_MODE_CODE)}, got {mode!r}")
    lead = student_logits.shape[:-1]
    if ignore_mask is not None:
        if ignore_mask.shape != lead:
            raise ValueError(
                f"fused_kl_div: ignore_mask must have shape {tuple(lead)}, got {tuple(ignore_mask.shape)}"
            )
        ignore_mask = ignore_mask.to(device=student_logits.device, dtype=torch.bool)
    _, ext = select_backend("fused_kl_div", student_logits)
    if ext is None:
        return reference.kl_div_reference(student_logits, teacher_logits, temperature, ignore_mask, mode)
    v = student_logits.shape[-1]
    s2 = student_logits.reshape(-1, v)
    if v > 1 and s2.stride(-1) != 1:
        s2 = s2.contiguous()
    _, t2 = _rows(student_logits, teacher_logits)
    ignore = ignore_mask.reshape(-1) if ignore_mask is not None else None
    out = _FusedKLDiv.apply(ext, s2, t2, float(temperature), ignore, mode)
    return out.reshape(lead)
