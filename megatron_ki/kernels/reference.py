"""Pure PyTorch references of every fused op: the fallback when no extension is built, and the oracle in tests.

Written for clarity, not speed: they materialise ``[N, V]`` fp32 temporaries the fused kernels avoid. They follow
the same conventions as the kernels (fp32 math for 16-bit inputs, fp64 for fp64, ``-inf`` entries contribute
exactly 0, fully masked / all ``-inf`` rows give zeros rather than NaN).
"""

from __future__ import annotations

import torch

KL_MODES = ("forward_kl", "reverse_kl", "cross_entropy")


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def _safe_max(x: torch.Tensor) -> torch.Tensor:
    """Row max (keepdim) with ``-inf`` rows mapped to 0, so ``exp(x - m)`` is 0 there instead of NaN."""
    m = x.amax(dim=-1, keepdim=True)
    return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def kl_forward_stats_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[..., 7]`` statistics ``[m_s, Z_s, m_t, Z_t, A, B, C]`` of the KL contract (see ``kernels.kl``)."""
    xs = _acc(student_logits) / temperature
    xt = _acc(teacher_logits) / temperature
    m_s = xs.amax(dim=-1)
    m_t = xt.amax(dim=-1)
    e_s = torch.exp(xs - _safe_max(xs))
    e_t = torch.exp(xt - _safe_max(xt))
    zero = torch.zeros((), dtype=xs.dtype)
    d = xt - xs
    a = torch.where(e_t > 0, e_t * torch.where(e_t > 0, d, zero), zero).sum(-1)
    b = torch.where(e_s > 0, e_s * torch.where(e_s > 0, -d, zero), zero).sum(-1)
    shifted_t = torch.where(e_t > 0, xt - _safe_max(xt), zero)
    c = (e_t * shifted_t).sum(-1)
    return torch.stack([m_s, e_s.sum(-1), m_t, e_t.sum(-1), a, b, c], dim=-1)


def kl_backward_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    row_value: torch.Tensor | None,
    grad_rows: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """Gradient w.r.t. the student logits of ``grad_rows * per_row_loss`` (contract in ``kernels.kl``)."""
    if mode not in KL_MODES:
        raise ValueError(f"kl_backward: mode must be one of {KL_MODES}, got {mode!r}")
    xs = _acc(student_logits) / temperature
    xt = _acc(teacher_logits) / temperature
    acc = xs.dtype

    def _safe(lse: torch.Tensor) -> torch.Tensor:
        lse = lse.to(acc).unsqueeze(-1)
        return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    p_s = torch.exp(xs - _safe(lse_s))
    g = grad_rows.to(acc).unsqueeze(-1)
    if mode == "reverse_kl":
        if row_value is None:
            raise ValueError("kl_backward: mode 'reverse_kl' needs row_value (the full-row reverse KL)")
        offset = (lse_t.to(acc) - lse_s.to(acc) - row_value.to(acc)).unsqueeze(-1)
        inner = torch.where(p_s > 0, p_s * (xs - xt + offset), torch.zeros((), dtype=acc))
    else:
        inner = p_s - torch.exp(xt - _safe(lse_t))
    grad = torch.where(g == 0, torch.zeros((), dtype=acc), g * inner / temperature)
    return grad.to(student_logits.dtype)


def kl_div_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    ignore_mask: torch.Tensor | None = None,
    mode: str = "forward_kl",
) -> torch.Tensor:
    """Per-row KL(p_t || p_s) (or reverse KL / cross-entropy) at temperature ``tau``, fp32 ``[...]``.

    Differentiable w.r.t. the student only; ignored rows give 0 and exactly 0 gradient.
    """
    if mode not in KL_MODES:
        raise ValueError(f"fused_kl_div: mode must be one of {KL_MODES}, got {mode!r}")
    s = _acc(student_logits)
    t = _acc(teacher_logits).detach()
    if ignore_mask is not None:
        keep = ~ignore_mask.to(torch.bool).unsqueeze(-1)
        s = torch.where(keep, s, torch.zeros((), dtype=s.dtype))  # ignored rows: finite values, zero grad
        t = torch.where(keep, t, torch.zeros((), dtype=t.dtype))
    lp_s = torch.log_softmax(s / temperature, dim=-1)
    lp_t = torch.log_softmax(t / temperature, dim=-1)
    p_s, p_t = lp_s.exp(), lp_t.exp()
    zero = torch.zeros((), dtype=s.dtype)
    if mode == "forward_kl":
        val = torch.where(p_t > 0, p_t * torch.where(p_t > 0, lp_t - lp_s, zero), zero).sum(-1)
    elif mode == "reverse_kl":
        val = torch.where(p_s > 0, p_s * torch.where(p_s > 0, lp_s - lp_t, zero), zero).sum(-1)
    else:
        val = -torch.where(p_t > 0, p_t * torch.where(p_t > 0, lp_s, zero), zero).sum(-1)
    if ignore_mask is not None:
        val = val.masked_fill(ignore_mask.to(torch.bool), 0.0)
    return val if student_logits.dtype == torch.float64 else val.float()


def scaled_masked_softmax_reference(
    scores: torch.Tensor, mask: torch.Tensor | None, scale: float = 1.0
) -> torch.Tensor:
    """softmax(scale * scores) over the last dim, ``mask`` True = masked out (0); fully masked rows give 0."""
    x = _acc(scores) * scale
    if mask is not None:
        x = x.masked_fill(mask.to(torch.bool), float("-inf"))
    m = _safe_max(x).detach()
    e = torch.exp(x - m)
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    return probs.to(scores.dtype)


def causal_mask(sq: int, sk: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool ``[sq, sk]``, True where key j > query i (masked out)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(diagonal=1)


def scaled_upper_triang_masked_softmax_reference(scores: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Causal softmax(scale * scores) over ``[..., sq, sk]`` (sq == sk), future keys get probability 0."""
    sq, sk = scores.shape[-2], scores.shape[-1]
    if sq != sk:
        raise ValueError(
            f"scaled_upper_triang_masked_softmax: needs sq == sk, got scores {tuple(scores.shape)}"
        )
    return scaled_masked_softmax_reference(scores, causal_mask(sq, sk, scores.device), scale)
