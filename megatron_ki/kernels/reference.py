"""Pure PyTorch references of every fused op: the fallback when no extension is built, and the oracle in tests.

Written for clarity, not speed: they materialise ``[N, V]`` fp32 temporaries the fused kernels avoid. They follow
the same conventions as the kernels (fp32 math for 16-bit inputs, fp64 for fp64, ``-inf`` entries contribute
exactly 0, fully masked / all ``-inf`` rows give zeros rather than NaN). The KL pair below is the only Python
implementation of the statistics contract documented on ``kernels.kl.KLStat``.
"""

from __future__ import annotations

import torch

KL_MODES: tuple[str, ...] = ("forward_kl", "reverse_kl", "cross_entropy")
"""Per-row divergences derivable from the KL statistics (forward_kl and cross_entropy share one gradient)."""


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Max over the last dim; ``-inf`` for an empty slice (a rank that holds no vocabulary entries)."""
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    return x.amax(-1)


def _exp_shifted(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``exp(x - m)`` per row that is 0, not NaN, where ``m`` is not finite (an all ``-inf`` slice or row)."""
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - safe_m.unsqueeze(-1)).exp()


def _weighted_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum(w * x)`` over the last dim with ``0 * anything = 0``: entries of probability 0, whose log-ratio is
    infinite or NaN (``-inf`` logits), contribute nothing."""
    return torch.where(w > 0, w * x, torch.zeros((), dtype=w.dtype, device=w.device)).sum(-1)


def kl_forward_stats_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``[..., 7]`` statistics, in ``KLStat`` column order, over the given (local) vocabulary slice."""
    xs = _acc(student_logits) / temperature
    xt = _acc(teacher_logits) / temperature
    m_s, m_t = _row_max(xs), _row_max(xt)
    e_s, e_t = _exp_shifted(xs, m_s), _exp_shifted(xt, m_t)
    gap = xt - xs
    forward_sum = _weighted_sum(e_t, gap)
    reverse_sum = _weighted_sum(e_s, -gap)
    entropy_sum = _weighted_sum(e_t, xt - m_t.unsqueeze(-1))
    return torch.stack([m_s, e_s.sum(-1), m_t, e_t.sum(-1), forward_sum, reverse_sum, entropy_sum], dim=-1)


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
    """Gradient w.r.t. the student logits of ``sum(grad_rows * per_row_loss)`` (see ``kernels.kl.kl_backward``).

    Shape and dtype of the student logits; rows with ``grad_rows == 0`` are exactly 0 even where a log-ratio
    is infinite.
    """
    if mode not in KL_MODES:
        raise ValueError(f"kl_backward: mode must be one of {KL_MODES}, got {mode!r}")
    xs = _acc(student_logits) / temperature
    xt = _acc(teacher_logits) / temperature
    acc = xs.dtype
    zero = torch.zeros((), dtype=acc, device=xs.device)
    p_s = _exp_shifted(xs, lse_s.to(acc))
    g = grad_rows.to(acc).unsqueeze(-1)
    if mode == "reverse_kl":
        if row_value is None:
            raise ValueError("kl_backward: mode 'reverse_kl' needs row_value (the full-row reverse KL)")
        # (s - t)/tau plus one per-row offset keeps the large lse terms out of the [rows, V] arithmetic
        offset = (lse_t.to(acc) - lse_s.to(acc) - row_value.to(acc)).unsqueeze(-1)
        inner = torch.where(p_s > 0, p_s * ((xs - xt) + offset), zero)
    else:
        inner = p_s - _exp_shifted(xt, lse_t.to(acc))
    grad = torch.where(g != 0, inner * (g / temperature), zero)
    return grad.to(student_logits.dtype)


def _safe_max(x: torch.Tensor) -> torch.Tensor:
    """Row max (keepdim) with ``-inf`` rows mapped to 0, so ``exp(x - m)`` is 0 there instead of NaN."""
    m = x.amax(dim=-1, keepdim=True)
    return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


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
