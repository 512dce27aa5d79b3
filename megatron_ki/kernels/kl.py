"""KL divergence between student and teacher logits through per-row statistics.

The contract (the columns of :class:`KLStat`) is shared by the compiled CPU and CUDA ops and by the one PyTorch
reference in ``reference.py``, which is both the fallback and the oracle the compiled ops are tested against.
This module dispatches each op to the compiled extension when it is built, else to that reference
(``select_backend`` logs one line per op saying which), and holds the helpers that combine statistics: slices of
a row merge exactly (:func:`rescale_kl_stats`, :func:`merge_kl_stats`), and full-row statistics give the
divergences and log-partition functions (:func:`kl_from_stats`). ``fused_kl_div`` is the one-call autograd op.
"""

from __future__ import annotations

from enum import IntEnum
from types import ModuleType
from typing import NamedTuple

import torch

from . import reference
from .build import select_backend
from .reference import KL_MODES

_MODE_CODE = {"forward_kl": 0, "cross_entropy": 0, "reverse_kl": 1}  # the compiled ops' gradient modes


class KLStat(IntEnum):
    """Columns of the ``[..., 7]`` per-row statistics: the contract of every KL op (CPU, CUDA, reference).

    Over a row, or a vocabulary slice of one, of student logits ``s`` and teacher logits ``t``, with
    ``x' = x / tau`` and all sums over the vocabulary (slice), computed in one pass::

        STUDENT_MAX          m_s = max s'
        STUDENT_SUM_EXP      Z_s = sum exp(s' - m_s)
        TEACHER_MAX          m_t = max t'
        TEACHER_SUM_EXP      Z_t = sum exp(t' - m_t)
        FORWARD_KL_SUM       A   = sum exp(t' - m_t) (t' - s')
        REVERSE_KL_SUM       B   = sum exp(s' - m_s) (s' - t')
        TEACHER_ENTROPY_SUM  C   = sum exp(t' - m_t) (t' - m_t)

    An all ``-inf`` slice gives m = -inf and Z = A = B = C = 0 (no NaN). Over the full row, with
    ``lse = m + log Z`` and ``p = softmax(x')``::

        forward KL(p_t || p_s)     = A / Z_t - lse_t + lse_s
        reverse KL(p_s || p_t)     = B / Z_s - lse_s + lse_t
        cross-entropy H(p_t, p_s)  = forward KL + (log Z_t - C / Z_t)        (the bracket is H(p_t))

    Gradients w.r.t. ``s`` of ``g * D`` per row (``g`` the row's upstream gradient)::

        forward KL, cross-entropy:  g (p_s - p_t) / tau
        reverse KL:                 g p_s ((s' - t') - lse_s + lse_t - reverse KL) / tau

    Vocab-parallel (V split over ranks): take the MAX of the two max columns over the slices, re-express each
    slice relative to it -- Z, A, B scale by ``exp(m_local - m_global)``, and C, measured from m itself, becomes
    ``exp(m_local - m_global) (C + (m_local - m_global) Z)`` -- then SUM the other five columns.
    """

    STUDENT_MAX = 0
    STUDENT_SUM_EXP = 1
    TEACHER_MAX = 2
    TEACHER_SUM_EXP = 3
    FORWARD_KL_SUM = 4
    REVERSE_KL_SUM = 5
    TEACHER_ENTROPY_SUM = 6


MAX_COLUMNS: tuple[int, ...] = (KLStat.STUDENT_MAX, KLStat.TEACHER_MAX)
"""Columns that combine over vocabulary slices by MAX."""
SUM_COLUMNS: tuple[int, ...] = tuple(c for c in KLStat if c not in MAX_COLUMNS)
"""Columns that combine over vocabulary slices by SUM, once rescaled to the global maxima."""


class KLTerms(NamedTuple):
    """Per-row results derived from full-row statistics (fp32, fp64 for fp64 statistics)."""

    forward_kl: torch.Tensor
    reverse_kl: torch.Tensor
    cross_entropy: torch.Tensor
    lse_s: torch.Tensor
    lse_t: torch.Tensor


# ------------------------------------------------------------------- dispatch: compiled op or reference
def _check_pair(s: torch.Tensor, t: torch.Tensor, temperature: float, op: str) -> None:
    if s.shape != t.shape:
        raise ValueError(f"{op}: student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} differ")
    if s.dim() < 1:
        raise ValueError(f"{op}: logits need a vocabulary dimension, got a scalar")
    if not s.is_floating_point():
        raise TypeError(f"{op}: logits must be floating point, got {s.dtype}")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")


def _check_mode(mode: str, op: str) -> None:
    if mode not in KL_MODES:
        raise ValueError(f"{op}: mode must be one of {KL_MODES}, got {mode!r}")


def _rows(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D views contiguous along V (what the compiled ops take); the teacher in the student's dtype."""
    v = s.shape[-1]
    s2 = s.reshape(-1, v)
    t2 = t.detach().to(s.dtype).reshape(-1, v)
    if v > 1 and s2.stride(-1) != 1:
        s2 = s2.contiguous()
    if v > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return s2, t2


def _forward_stats(
    ext: ModuleType | None, s: torch.Tensor, t: torch.Tensor, temperature: float
) -> torch.Tensor:
    if ext is None:
        return reference.kl_forward_stats_reference(s, t, temperature)
    return ext.kl_forward_stats(s, t, float(temperature))


def _backward(
    ext: ModuleType | None,
    s: torch.Tensor,
    t: torch.Tensor,
    temperature: float,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    row_value: torch.Tensor | None,
    grad_rows: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    if ext is None:
        return reference.kl_backward_reference(s, t, temperature, lse_s, lse_t, row_value, grad_rows, mode)
    if row_value is None:  # only reverse KL reads it
        row_value = torch.zeros_like(lse_s)
    return ext.kl_backward(s, t, float(temperature), lse_s, lse_t, row_value, grad_rows, _MODE_CODE[mode])


def kl_forward_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[..., 7]`` :class:`KLStat` statistics over the given (local) vocabulary slice.

    fp32 (fp64 for fp64 logits); rows that are all ``-inf`` give m = -inf and zeros, never NaN.
    """
    _check_pair(student_logits, teacher_logits, temperature, "kl_forward_stats")
    lead = student_logits.shape[:-1]
    _, ext = select_backend("kl_forward_stats", student_logits)
    s2, t2 = _rows(student_logits.detach(), teacher_logits)
    return _forward_stats(ext, s2, t2, temperature).reshape(*lead, 7)


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

    ``lse_s``/``lse_t`` are the GLOBAL (full-vocabulary) log-partition functions at temperature ``tau``, so a
    vocabulary slice gets its slice of the full-row gradient (formulas on :class:`KLStat`); ``row_value`` is the
    full-row reverse KL, needed by ``mode="reverse_kl"`` only. Rows with ``grad_rows == 0`` get exactly zero.
    """
    _check_pair(student_logits, teacher_logits, temperature, "kl_backward")
    _check_mode(mode, "kl_backward")
    if mode == "reverse_kl" and row_value is None:
        raise ValueError("kl_backward: mode 'reverse_kl' needs row_value (the full-row reverse KL)")
    _, ext = select_backend("kl_backward", student_logits)
    s2, t2 = _rows(student_logits.detach(), teacher_logits)
    lse_s, lse_t, row_value, grad_rows = (
        x.detach().reshape(-1) if x is not None else None for x in (lse_s, lse_t, row_value, grad_rows)
    )
    grad = _backward(ext, s2, t2, temperature, lse_s, lse_t, row_value, grad_rows, mode)
    return grad.reshape(student_logits.shape)


# ----------------------------------------------------------------------------- combining statistics
def kl_from_stats(stats: torch.Tensor) -> KLTerms:
    """Per-row divergences and log-partition functions from FULL-row statistics ``[..., 7]``.

    Combined in fp64 (``[rows]``-sized, cheap): with logits of 1e4 the lse terms are large and nearly cancel.
    """
    out_dtype = torch.float64 if stats.dtype == torch.float64 else torch.float32
    m_s, z_s, m_t, z_t, a, b, c = stats.double().unbind(-1)
    log_zs, log_zt = z_s.log(), z_t.log()
    lse_gap = (m_s - m_t) + (log_zs - log_zt)  # lse_s - lse_t without the large common part
    forward = a / z_t + lse_gap
    reverse = b / z_s - lse_gap
    cross_entropy = forward + (log_zt - c / z_t)
    terms = (forward, reverse, cross_entropy, m_s + log_zs, m_t + log_zt)
    return KLTerms(*(x.to(out_dtype) for x in terms))


def rescale_kl_stats(stats: torch.Tensor, m_s: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    """Slice statistics re-expressed relative to the row's global maxima ``m_s``/``m_t`` (``[...]``).

    The results of a row's slices then SUM column by column to the full-row statistics (the max columns hold
    the global maxima). A slice that is all ``-inf`` contributes exactly 0.
    """
    local_max = stats[..., list(MAX_COLUMNS)]
    finite = torch.isfinite(local_max)
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    shift = torch.where(finite, local_max - torch.stack([m_s, m_t], -1).to(stats.dtype), zero)
    scale_s, scale_t = torch.where(finite, shift.exp(), zero).unbind(-1)
    _, z_s, _, z_t, a, b, c = stats.unbind(-1)
    z_t = z_t * scale_t
    columns = (
        m_s.to(stats.dtype),
        z_s * scale_s,
        m_t.to(stats.dtype),
        z_t,
        a * scale_t,
        b * scale_s,
        c * scale_t + shift[..., 1] * z_t,  # sum e^(x - m_g)(x - m_g) = r (C + (m_l - m_g) Z)
    )
    return torch.stack(columns, -1)


def merge_kl_stats(parts: list[torch.Tensor]) -> torch.Tensor:
    """Full-row statistics from per-slice statistics: the single-process version of the vocab-parallel merge."""
    if not parts:
        raise ValueError("merge_kl_stats: needs at least one slice")
    maxima = torch.stack([p[..., list(MAX_COLUMNS)] for p in parts]).amax(0)
    m_s, m_t = maxima.unbind(-1)
    merged = torch.stack([rescale_kl_stats(p, m_s, m_t) for p in parts]).sum(0)
    merged[..., list(MAX_COLUMNS)] = maxima.to(merged.dtype)
    return merged


# ---------------------------------------------------------------------------------- one-call op
class _FusedKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, s, t, temperature: float, ignore, mode: str):
        terms = kl_from_stats(_forward_stats(ext, s, t, temperature))
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
        grad = _backward(ctx.ext, s, t, ctx.temperature, lse_s, lse_t, value, g.contiguous(), ctx.mode)
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
    ``student_logits`` only. ``mode`` may also be ``reverse_kl`` or ``cross_entropy`` (H(p_t, p_s)). The compiled
    path keeps no ``[N, V]`` fp32 temporary: the only full-size tensor it makes is the gradient, in s's dtype.
    """
    _check_pair(student_logits, teacher_logits, temperature, "fused_kl_div")
    _check_mode(mode, "fused_kl_div")
    lead = student_logits.shape[:-1]
    if ignore_mask is not None:
        if ignore_mask.shape != lead:
            raise ValueError(
                f"fused_kl_div: ignore_mask must have shape {tuple(lead)}, got {tuple(ignore_mask.shape)}"
            )
        ignore_mask = ignore_mask.to(device=student_logits.device, dtype=torch.bool)
    _, ext = select_backend("fused_kl_div", student_logits)
    v = student_logits.shape[-1]
    s2 = student_logits.reshape(-1, v)  # not detached: the gradient flows back through this view
    if v > 1 and s2.stride(-1) != 1:
        s2 = s2.contiguous()
    _, t2 = _rows(student_logits, teacher_logits)
    ignore = ignore_mask.reshape(-1) if ignore_mask is not None else None
    out = _FusedKLDiv.apply(ext, s2, t2, float(temperature), ignore, mode)
    return out.reshape(lead)
