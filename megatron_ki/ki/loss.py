"""The Knowledge Inheritance loss over vocab-parallel logits.

``L = (1 - a_t) * L_lm + a_t * tau^2 * D(teacher || student)`` on the positions that carry the LM loss,
both terms averaged over the same positions so ``a_t`` trades like for like.

Exactness under tensor parallelism: the softmax of each distribution is over the FULL vocabulary, which is
split over the TP ranks. Each rank reduces its slice to the seven fp32 per-row statistics of
``megatron_ki.kernels.KLStat`` (compiled op or its PyTorch reference); the ranks then merge them with one MAX
all-reduce (the row maxima) and one SUM all-reduce (the rescaled sums). Nothing ``[tokens, vocab]``-sized
crosses ranks. Normalising each shard on its own (as Megatron-DeepSpeed's distillation code does) gives a
different, wrong value for tp > 1.

The real vocabulary only: the columns past ``model.vocab_size`` (Megatron's padding to a multiple of
``make_vocab_size_divisible_by x tp``, on the last TP ranks' shards) hold -inf logits in the student and the
teacher alike (``models.transformer.LMHead``), and a teacher with embedding rows beyond the student's
vocabulary runs on the student's (``ki.teacher.check_teacher_fits``). A -inf column has probability exactly 0
in both softmaxes and adds exactly 0 to every statistic (the kernels never form ``0 * -inf``), so the KD term,
its gradient (0 on those columns) and both LM losses equal the same losses over ``logits[..., :vocab_size]``.

The backward recomputes the probabilities from the logits and the per-row statistics instead of saving
``[tokens, vocab]`` softmaxes, so the KD term costs no activation memory beyond the logits themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_ki import kernels
from megatron_ki.kernels import KL_MODES, kl_from_stats, reference, rescale_kl_stats
from megatron_ki.kernels.kl import MAX_COLUMNS, SUM_COLUMNS
from megatron_ki.tensor_parallel import (
    group_size,
    vocab_parallel_cross_entropy,
    vocab_parallel_target_logit,
)

Divergence = Literal["forward_kl", "reverse_kl", "cross_entropy"]
DIVERGENCES: tuple[str, ...] = KL_MODES
Backend = Literal["auto", "torch", "kernels"]


def _kl_ops(backend: str, x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """``(forward_stats, backward)`` for the loss's ``backend`` option and the device of ``x``.

    "torch" is the PyTorch reference of ``megatron_ki.kernels``. "kernels" is the kernels' dispatch (the compiled
    op, else that reference). "auto" takes the dispatch only where a compiled op exists for this device, and the
    reference otherwise -- also when probing fails (e.g. a bad ``MEGATRON_KI_KERNELS``), since it is exact.
    Looked up at call time so tests can count or replace them.
    """
    if backend not in ("auto", "torch", "kernels"):
        raise ValueError(f"ki loss backend: expected 'auto', 'torch' or 'kernels', got {backend!r}")
    if backend == "auto":
        try:
            compiled = kernels.select_backend("kl_forward_stats", x)[1] is not None
        except Exception:  # a broken extension or setting must not stop training: the reference is exact
            compiled = False
        backend = "kernels" if compiled else "torch"
    if backend == "torch":
        return reference.kl_forward_stats_reference, reference.kl_backward_reference
    return kernels.kl_forward_stats, kernels.kl_backward


def load_kl_ops(device: torch.device | str, backend: Backend = "auto") -> None:
    """Resolve ``backend`` on ``device`` now, building the compiled op if it needs building, so a build happens
    at start-up and not inside a training step a watchdog times; falls back exactly as the loss does."""
    _kl_ops(backend, torch.empty(0, device=device))


def all_reduce_kl_stats(stats: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Full-row statistics from this rank's vocabulary-slice statistics ``[N, 7]``, exactly, with two
    all-reduces: ``[N, 2]`` maxima (MAX), then ``[N, 5]`` rescaled sums (SUM), fp32. Identity for one rank."""
    if group_size(group) == 1:
        return stats
    maxima = stats[:, list(MAX_COLUMNS)].contiguous()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    merged = rescale_kl_stats(stats, *maxima.unbind(-1))
    sums = merged[:, list(SUM_COLUMNS)].contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    merged[:, list(SUM_COLUMNS)] = sums
    return merged


# ------------------------------------------------------------------------------ autograd function
class _VocabParallelDivergence(torch.autograd.Function):
    """Per-row D(teacher || student) on the rows ``idx`` of ``[N, V/tp]`` logits; grad w.r.t. student only.

    Saves the logits (alive anyway) and ``[rows, 3]`` statistics; backward recomputes the probabilities.
    """

    @staticmethod
    def forward(ctx, s, t, idx, temperature, divergence, group, backend):
        forward_stats, backward = _kl_ops(backend, s)
        rows_s, rows_t = _select_rows(s, t, idx)
        stats = all_reduce_kl_stats(forward_stats(rows_s, rows_t, temperature).float(), group)
        terms = kl_from_stats(stats)
        value = getattr(terms, divergence)
        ctx.save_for_backward(s, t, idx, terms.lse_s, terms.lse_t, value)
        ctx.temperature, ctx.divergence, ctx.backward_op = temperature, divergence, backward
        ctx.mark_non_differentiable(terms.lse_t)
        return value, terms.lse_t

    @staticmethod
    def backward(ctx, grad_value, _grad_lse_t):
        s, t, idx, lse_s, lse_t, value = ctx.saved_tensors
        rows_s, rows_t = _select_rows(s, t, idx)
        grad_rows = ctx.backward_op(
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


def _select_rows(
    s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if idx is None:
        return s, t
    return s.index_select(0, idx), t.index_select(0, idx)


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
    """The teacher's LM cross-entropy (temperature 1) on the same positions, over the real vocabulary (the
    student's ``model.vocab_size`` = the tokenizer's; padded columns are -inf): transformers' loss of the
    teacher on ``logits[..., :vocab_size]``, which for a teacher with rows beyond the tokenizer (Qwen) leaves
    those rows out. None without teacher logits."""
    alpha: float
    """The KD weight a_t used."""
    num_tokens: torch.Tensor
    """Number of positions carrying the loss on this rank (0-dim int64 tensor; no host sync)."""


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    total = torch.where(mask, per_token.float(), torch.zeros((), device=per_token.device)).sum()
    return total / count.clamp(min=1).to(total.dtype)


def _student_lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    given: torch.Tensor | None,
    mask: torch.Tensor,
    count: torch.Tensor,
    tp_group: ProcessGroup | None,
    ignore_index: int,
) -> torch.Tensor:
    """The student's LM loss over the loss positions: ``given`` (a scalar, or per position) or computed."""
    if given is None:
        return _masked_mean(
            vocab_parallel_cross_entropy(logits, targets, tp_group, ignore_index), mask, count
        )
    if given.dim() == 0:
        return given.float()
    if given.shape == targets.shape:
        return _masked_mean(given, mask, count)
    raise ValueError(
        f"ki_loss: lm_loss must be a scalar or per-position {tuple(targets.shape)}, got {tuple(given.shape)}"
    )


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
    no gradient), -inf in the padded columns as the models make them, so every term is over the real
    vocabulary (module docstring). ``labels`` ``[b, s]`` with ``ignore_index`` where no loss is taken (MLM
    unmasked tokens, padding); ``loss_mask`` optionally removes more positions (causal loss mask). ``lm_loss``: the
    student's LM loss if the caller already has it, either per position ``[b, s]`` (averaged here over the
    loss positions) or a scalar already averaged over them; None computes it with the vocab-parallel
    cross-entropy. With ``alpha == 0`` the KD term is skipped entirely (``teacher_logits`` may be None).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ki_loss: alpha must be in [0, 1], got {alpha}")
    mask = loss_positions(labels, ignore_index, loss_mask)
    count = mask.sum()
    t_targets = labels if loss_mask is None else labels.masked_fill(~mask, ignore_index)
    lm = _student_lm_loss(student_logits, t_targets, lm_loss, mask, count, tp_group, ignore_index)

    teacher_lm = None
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
    opts = {"temperature": temperature, "divergence": divergence, "tp_group": tp_group, "backend": backend}
    div, lse_t = per_token_divergence(student_logits, teacher_logits, mask, return_teacher_lse=True, **opts)
    if from_stats:
        target = vocab_parallel_target_logit(teacher_logits, t_targets, tp_group, ignore_index)
        teacher_lm = _masked_mean(lse_t - target, mask, count)
    kd = _masked_mean(div, mask, count) * (temperature**2)
    loss = (1.0 - alpha) * lm + alpha * kd
    return KILossOutput(loss, lm.detach(), kd.detach(), teacher_lm, float(alpha), count)
