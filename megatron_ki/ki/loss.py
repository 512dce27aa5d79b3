"""The Knowledge Inheritance loss over vocab-parallel logits.

``L = (1 - a_t) * L_lm + a_t * tau^2 * D(teacher || student)`` on the positions that carry the LM loss,
both terms averaged over the same positions so ``a_t`` trades like for like.

Exactness under tensor parallelism: the softmax of each distribution is over the FULL vocabulary, which is
split over the TP ranks. Each rank reduces its slice to seven fp32 numbers per token
(:func:`kl_forward_stats`); the ranks then merge them with one MAX all-reduce (the row maxima) and one SUM
all-reduce (the rescaled sums). Nothing ``[tokens, vocab]``-sized crosses ranks. Normalising each shard on
its own (as Megatron-DeepSpeed's distillation code does) gives a different, wrong value for tp > 1.

The backward recomputes the probabilities from the logits and the per-row statistics instead of saving
``[tokens, vocab]`` softmaxes, so the KD term costs no activation memory beyond the logits themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_ki.tensor_parallel import (
    group_size,
    vocab_parallel_cross_entropy,
    vocab_parallel_target_logit,
)

logger = logging.getLogger("megatron_ki")

Divergence = Literal["forward_kl", "reverse_kl", "cross_entropy"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "cross_entropy")
Backend = Literal["auto", "torch", "kernels"]

# Columns of the per-row statistics tensor returned by kl_forward_stats.
M_S, Z_S, M_T, Z_T, A, B, C = range(7)


# ------------------------------------------------------------------------ pure-PyTorch statistics
def _weighted_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum(w * x)`` over the last dim with ``0 * anything = 0`` (entries of probability 0 whose log-ratio
    is infinite or NaN, e.g. -inf logits, contribute nothing)."""
    return torch.where(w > 0, w * x, torch.zeros((), dtype=w.dtype, device=w.device)).sum(-1)


def _row_max(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    return x.amax(-1)


def _exp_shifted(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``exp(x - m)`` that is 0 (not NaN) on a slice whose entries are all -inf (m = -inf)."""
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - safe_m.unsqueeze(-1)).exp()


def kl_forward_stats(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row statistics ``[N, 7]`` fp32 of the local vocabulary slice (see the module and brief contract):
    ``m_s, Z_s, m_t, Z_t, A, B, C`` with ``A = sum e^(t/tau - m_t) (t - s)/tau``,
    ``B = sum e^(s/tau - m_s) (s - t)/tau``, ``C = sum e^(t/tau - m_t) (t/tau - m_t)``."""
    xs = s.float() / temperature
    xt = t.float() / temperature
    m_s, m_t = _row_max(xs), _row_max(xt)
    e_s, e_t = _exp_shifted(xs, m_s), _exp_shifted(xt, m_t)
    diff = xt - xs
    a = _weighted_sum(e_t, diff)
    b = _weighted_sum(e_s, -diff)
    c = _weighted_sum(e_t, xt - m_t.unsqueeze(-1))
    return torch.stack([m_s, e_s.sum(-1), m_t, e_t.sum(-1), a, b, c], dim=-1)


def kl_backward(
    s: torch.Tensor,
    t: torch.Tensor,
    temperature: float,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    row_value: torch.Tensor,
    grad_rows: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """Gradient of ``grad_rows * D_row`` w.r.t. the local slice of ``s`` (shape and dtype of ``s``), with
    the GLOBAL log-sum-exps ``lse_s, lse_t`` (of ``logits / tau``) of the full rows."""
    xs = s.float() / temperature
    xt = t.float() / temperature
    log_ps = xs - lse_s.unsqueeze(-1)
    p_s = log_ps.exp()
    g = grad_rows.float().unsqueeze(-1)
    if mode in ("forward_kl", "cross_entropy"):
        grad = (p_s - (xt - lse_t.unsqueeze(-1)).exp()) * (g / temperature)
    elif mode == "reverse_kl":
        # (s - t)/tau plus one per-row offset: keeps the large lse terms out of the [rows, V] arithmetic
        offset = (lse_t.float() - lse_s.float() - row_value.float()).unsqueeze(-1)
        log_ratio = (xs - xt) + offset
        grad = torch.where(p_s > 0, p_s * log_ratio, torch.zeros((), device=s.device)) * (g / temperature)
    else:
        raise ValueError(f"kl_backward mode: expected one of {DIVERGENCES}, got {mode!r}")
    # Ignored rows (grad_rows == 0) give exactly zero even where a log-ratio is infinite.
    grad = torch.where(g != 0, grad, torch.zeros((), device=s.device))
    return grad.to(s.dtype)


def _kernel_ops(backend: str, x: torch.Tensor):
    """(forward_stats, backward) implementations for ``backend`` and the device of ``x``.

    "auto" takes ``megatron_ki.kernels`` when it imports and its backend selection reports a compiled
    extension for this device (CUDA or CPU C++); otherwise the PyTorch functions of this module.
    "kernels" always goes through ``megatron_ki.kernels`` (which itself falls back to its reference).
    """
    if backend == "torch":
        return kl_forward_stats, kl_backward
    if backend not in ("auto", "kernels"):
        raise ValueError(f"ki loss backend: expected 'auto', 'torch' or 'kernels', got {backend!r}")
    try:
        from megatron_ki import kernels

        use_kernels = backend == "kernels" or kernels.select_backend("kl_forward_stats", x)[1] is not None
    except Exception as e:  # the kernels package is optional at this layer
        if backend == "kernels":
            raise RuntimeError(f"ki loss backend='kernels' but megatron_ki.kernels is unusable: {e}") from e
        return kl_forward_stats, kl_backward
    if use_kernels:
        return kernels.kl_forward_stats, kernels.kl_backward
    return kl_forward_stats, kl_backward


# ------------------------------------------------------------------------------- merge over ranks
def merge_stats(stats: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Combine per-slice statistics ``[N, 7]`` into full-row ones, exactly, with two all-reduces of
    ``[N, 2]`` (MAX) and ``[N, 5]`` (SUM) fp32 tensors. Identity for a single rank."""
    if group_size(group) == 1:
        return stats
    m_local = stats[:, [M_S, M_T]].contiguous()
    m_global = m_local.clone()
    dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
    # Rescale factors exp(m_local - m_global); 0 for a slice that is all -inf (m_local = -inf).
    finite = torch.isfinite(m_local)
    delta = torch.where(finite, m_local - m_global, torch.zeros_like(m_local))
    r = torch.where(finite, delta.exp(), torch.zeros_like(m_local))
    r_s, r_t = r[:, 0], r[:, 1]
    z_t = stats[:, Z_T] * r_t
    sums = torch.stack(
        [
            stats[:, Z_S] * r_s,
            z_t,
            stats[:, A] * r_t,
            stats[:, B] * r_s,
            # sum e^(x - m_g)(x - m_g) = r (C_local + (m_l - m_g) Z_local)
            stats[:, C] * r_t + delta[:, 1] * z_t,
        ],
        dim=-1,
    )
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return torch.stack(
        [m_global[:, 0], sums[:, 0], m_global[:, 1], sums[:, 1], sums[:, 2], sums[:, 3], sums[:, 4]], dim=-1
    )


def divergence_from_stats(stats: torch.Tensor, divergence: str) -> tuple[torch.Tensor, ...]:
    """``(value, lse_s, lse_t)`` per row (fp32) from merged full-row statistics (lse of ``logits / tau``).

    Combined in fp64 ([rows]-sized, cheap): with logits of 1e4 the lse terms are large and nearly cancel.
    """
    m_s, z_s, m_t, z_t, a, b, c = stats.double().unbind(-1)
    log_zs, log_zt = z_s.log(), z_t.log()
    lse_diff = (m_s - m_t) + (log_zs - log_zt)  # lse_s - lse_t without the large common part
    if divergence == "forward_kl":
        value = a / z_t + lse_diff
    elif divergence == "reverse_kl":
        value = b / z_s - lse_diff
    elif divergence == "cross_entropy":
        value = a / z_t + lse_diff + (log_zt - c / z_t)
    else:
        raise ValueError(f"ki.divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    return value.float(), (m_s + log_zs).float(), (m_t + log_zt).float()


# ------------------------------------------------------------------------------ autograd function
class _VocabParallelDivergence(torch.autograd.Function):
    """Per-row D(teacher || student) on the rows ``idx`` of ``[N, V/tp]`` logits; grad w.r.t. student only.

    Saves the logits (alive anyway) and ``[rows, 3]`` statistics; backward recomputes the probabilities.
    """

    @staticmethod
    def forward(ctx, s, t, idx, temperature, divergence, group, backend):
        fwd, bwd = _kernel_ops(backend, s)
        rows_s = s if idx is None else s.index_select(0, idx)
        rows_t = t if idx is None else t.index_select(0, idx)
        stats = merge_stats(fwd(rows_s, rows_t, temperature).float(), group)
        value, lse_s, lse_t = divergence_from_stats(stats, divergence)
        ctx.save_for_backward(s, t, idx, lse_s, lse_t, value)
        ctx.temperature, ctx.divergence, ctx.bwd = temperature, divergence, bwd
        ctx.mark_non_differentiable(lse_t)
        return value, lse_t

    @staticmethod
    def backward(ctx, grad_value, _grad_lse_t):
        s, t, idx, lse_s, lse_t, value = ctx.saved_tensors
        rows_s = s if idx is None else s.index_select(0, idx)
        rows_t = t if idx is None else t.index_select(0, idx)
        grad_rows = ctx.bwd(
            rows_s,
            rows_t,
            ctx.temperature,
            lse_s,
            lse_t,
            value,
            grad_value.float().contiguous(),
            ctx.divergence,
        )
        if idx is None:
            grad = grad_rows
        else:
            grad = torch.zeros_like(s)
            grad.index_copy_(0, idx, grad_rows.to(s.dtype))
        return grad, None, None, None, None, None, None


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, divergence: str):
    if divergence not in DIVERGENCES:
        raise ValueError(f"ki.divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"ki loss: teacher logits {tuple(teacher.shape)} must have the student's shape {tuple(student.shape)} "
            "(same tokenizer, same padded vocabulary and tensor-parallel split)"
        )
    if labels is not None and labels.shape != student.shape[:-1]:
        raise ValueError(f"ki loss: labels {tuple(labels.shape)} do not match logits {tuple(student.shape)}")


def loss_positions(
    labels: torch.Tensor, ignore_index: int = -100, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask of the positions carrying the LM loss: labels != ignore_index (MLM masked tokens, or causal
    targets), further restricted by an optional causal ``loss_mask`` (nonzero = counted)."""
    mask = labels != ignore_index
    if loss_mask is not None:
        mask = mask & (loss_mask != 0)
    return mask


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    divergence: Divergence = "forward_kl",
    tp_group: ProcessGroup | None = None,
    backend: Backend = "auto",
    return_teacher_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """D(teacher || student) per position, fp32, shape ``logits.shape[:-1]``, 0 where ``mask`` is False.

    Logits are vocab-sharded ``[..., V/tp]``; softmaxes are at ``temperature`` over the full vocabulary.
    Not scaled by tau^2. Differentiable w.r.t. ``student_logits`` only (the teacher is detached). Only the
    rows in ``mask`` are computed; exactly two all-reduces of ``[rows, 2]`` and ``[rows, 5]`` fp32 run.
    ``return_teacher_lse`` also returns the teacher's full-vocabulary log-sum-exp of ``logits / tau`` per
    position (a by-product of the statistics), from which its cross-entropy costs no extra vocabulary pass.
    """
    _check_inputs(student_logits, teacher_logits, mask, divergence)
    if temperature <= 0:
        raise ValueError(f"ki.temperature: must be positive, got {temperature}")
    lead = student_logits.shape[:-1]
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    t = teacher_logits.detach().reshape(-1, v)
    idx = None
    if mask is not None:
        flat = mask.reshape(-1)
        if not bool(flat.all()):
            idx = flat.nonzero().squeeze(-1)
    rows, lse_t = _VocabParallelDivergence.apply(s, t, idx, float(temperature), divergence, tp_group, backend)

    def full(per_row: torch.Tensor) -> torch.Tensor:
        return (per_row if idx is None else per_row.new_zeros(s.shape[0]).index_put((idx,), per_row)).reshape(
            lead
        )

    return (full(rows), full(lse_t)) if return_teacher_lse else full(rows)


# ------------------------------------------------------------------------------------ the KI loss
@dataclass
class KILossOutput:
    """The mixed loss and its parts, all averaged over the same ``num_tokens`` positions.

    ``loss`` is differentiable; the others are detached, for logging.
    """

    loss: torch.Tensor
    """(1 - alpha) * lm_loss + alpha * kd_loss; differentiable w.r.t. the student logits."""
    lm_loss: torch.Tensor
    """The student's own LM cross-entropy (temperature 1)."""
    kd_loss: torch.Tensor | None
    """tau^2 x mean divergence; None when alpha == 0 (not computed)."""
    teacher_lm_loss: torch.Tensor | None
    """The teacher's LM cross-entropy on the same positions; None without teacher logits."""
    alpha: float
    """The KD weight a_t used."""
    num_tokens: torch.Tensor
    """Number of positions carrying the loss on this rank (0-dim int64 tensor; no host sync)."""


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    total = torch.where(mask, per_token.float(), torch.zeros((), device=per_token.device)).sum()
    return total / count.clamp(min=1).to(total.dtype)


def ki_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    *,
    temperature: float = 2.0,
    divergence: Divergence = "forward_kl",
    tp_group: ProcessGroup | None = None,
    lm_loss: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> KILossOutput:
    """``(1 - alpha) * L_lm + alpha * tau^2 * mean D(teacher || student)`` over the loss positions.

    ``student_logits``/``teacher_logits``: ``[b, s, V/tp]`` vocab shards (the teacher may be bf16; it gets
    no gradient). ``labels`` ``[b, s]`` with ``ignore_index`` where no loss is taken (MLM unmasked tokens,
    padding); ``loss_mask`` optionally removes more positions (causal loss mask). ``lm_loss``: the
    student's LM loss if the caller already has it, either per position ``[b, s]`` (averaged here over the
    loss positions) or a scalar already averaged over them; None computes it with the vocab-parallel
    cross-entropy. With ``alpha == 0`` the KD term is skipped entirely (``teacher_logits`` may be None).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ki_loss: alpha must be in [0, 1], got {alpha}")
    mask = loss_positions(labels, ignore_index, loss_mask)
    count = mask.sum()

    if lm_loss is None:
        lm_targets = labels if loss_mask is None else labels.masked_fill(~mask, ignore_index)
        per_tok = vocab_parallel_cross_entropy(student_logits, lm_targets, tp_group, ignore_index)
        lm = _masked_mean(per_tok, mask, count)
    elif lm_loss.dim() == 0:
        lm = lm_loss.float()
    elif lm_loss.shape == labels.shape:
        lm = _masked_mean(lm_loss, mask, count)
    else:
        raise ValueError(
            f"ki_loss: lm_loss must be a scalar or per-position {tuple(labels.shape)}, got {tuple(lm_loss.shape)}"
        )

    teacher_lm = None
    t_targets = labels if loss_mask is None else labels.masked_fill(~mask, ignore_index)
    # At temperature 1 the divergence's statistics hold the teacher's log-sum-exp: its cross-entropy then
    # needs only the target logits, not a pass of its own over the vocabulary.
    from_stats = alpha > 0.0 and temperature == 1.0
    if teacher_logits is not None:
        _check_inputs(student_logits, teacher_logits, labels, divergence)
        if not from_stats:
            with torch.no_grad():
                t_tok = vocab_parallel_cross_entropy(
                    teacher_logits.detach(), t_targets, tp_group, ignore_index
                )
                teacher_lm = _masked_mean(t_tok, mask, count)

    if alpha == 0.0:
        return KILossOutput(lm, lm.detach(), None, teacher_lm, 0.0, count)
    if teacher_logits is None:
        raise ValueError(f"ki_loss: teacher_logits are required when alpha > 0 (alpha={alpha})")

    div, lse_t = per_token_divergence(
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        divergence=divergence,
        tp_group=tp_group,
        backend=backend,
        return_teacher_lse=True,
    )
    if from_stats:
        target = vocab_parallel_target_logit(teacher_logits, t_targets, tp_group, ignore_index)
        teacher_lm = _masked_mean(lse_t - target, mask, count)
    kd = _masked_mean(div, mask, count) * (temperature**2)
    loss = (1.0 - alpha) * lm + alpha * kd
    return KILossOutput(loss, lm.detach(), kd.detach(), teacher_lm, float(alpha), count)
