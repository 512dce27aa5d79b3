"""The sparse KD loss for offline teacher targets: the teacher's top-K ids plus one tail bucket.

Offline targets hold, per position, the teacher's K largest log-probabilities at temperature tau
(``t_logp [b, s, K]``) with their ids (``t_ids``) and the log of the remaining mass (``t_tail [b, s]``,
-inf when the K ids hold all of it). The KD term is the forward KL over the K + 1 buckets::

    sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail),   q = softmax(student / tau)

over the FULL vocabulary, averaged over the loss positions and scaled by tau^2 exactly like ``ki_loss``'s KD
term, so a_t trades like for like. With K = the whole vocabulary it IS ``ki_loss``'s forward KL.

Exactness under tensor parallelism: each rank gathers the logits of the K ids it owns (0 elsewhere) and
reduces its slice, with the K ids masked out, to the tail's row max and rescaled sum-exp. One MAX all-reduce
of ``[rows]`` and one SUM all-reduce of ``[rows, K + 1]`` (the K logits and the tail sum) then give every rank
the same K logits and the tail's log-sum-exp; the full log-sum-exp is ``logaddexp(lse(K logits), lse_tail)``.
Nothing ``[tokens, vocab]``-sized crosses ranks.

Precision: ``log q_tail = lse_tail - lse`` comes from a log-sum-exp of the non-K logits taken at their own
maximum, never from ``1 - sum_k q_k``, so it stays accurate (and finite) when the K ids hold almost all the
student's mass. A position whose K ids cover every column with a finite logit has no tail bucket: its
``t_tail`` is ignored (the teacher's tail then has no support in the student).

Memory: the forward and the backward each use one fp32 ``[rows, V/tp]`` buffer (the scaled logits, then their
exponentials in place; the forward's is freed on return, the backward's becomes the gradient, scattered into a
``[tokens, V/tp]`` zero tensor when a mask leaves rows out, as in ``ki_loss``). Saved for backward: the student
logits (alive anyway), the selected row indices, and ``[rows, K]`` / ``[rows]`` tensors: local ids, ownership,
the K logits, the teacher's probabilities, its tail probability, the full and the tail log-sum-exp. The
backward recomputes the rest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from megatron_ki.models.transformer import HeadInputs
from megatron_ki.tensor_parallel import copy_to_tp_region, group_rank, group_size
from megatron_ki.tensor_parallel.mappings import all_reduce_no_grad

from .loss import KILossOutput, _masked_mean, _student_lm_loss, loss_positions


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scaled_rows(s: torch.Tensor, rows: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """A fresh buffer (never a view of ``s``) of ``s[rows] / tau`` in the accumulation dtype."""
    x = s if rows is None else s.index_select(0, rows)
    acc = _acc_dtype(s)
    if x.dtype != acc:
        return x.to(acc).div_(temperature)
    return torch.div(s, temperature) if x is s else x.div_(temperature)  # one pass into a fresh buffer


def _local_ids(ids: torch.Tensor, vocab_local: int, group: ProcessGroup | None):
    """``(index, owned)``: each id's column in this rank's vocabulary slice, 0 where another rank owns it."""
    local = ids - group_rank(group) * vocab_local
    owned = (local >= 0) & (local < vocab_local)
    return local.masked_fill(~owned, 0), owned


def _mask_ids_(x: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """Set the owned K columns of ``x`` to -inf in place. An ``amin`` scatter leaves a column that only
    non-owned ids point at (index 0) untouched, whatever order the writes land in."""
    inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
    return x.scatter_reduce_(-1, idx, torch.where(owned, -inf, inf), reduce="amin", include_self=True)


def _stats(x: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, group: ProcessGroup | None):
    """``(z [R, K], lse [R], lse_tail [R])`` over the full vocabulary; consumes ``x`` (scaled logits)."""
    z = x.gather(-1, idx).masked_fill(~owned, 0.0)
    _mask_ids_(x, idx, owned)
    if x.shape[-1] == 0:
        m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    else:
        m = x.amax(-1)
    all_reduce_no_grad(m, group, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    packed = torch.cat([z, x.sub_(m.unsqueeze(-1)).exp_().sum(-1, keepdim=True)], dim=-1)
    all_reduce_no_grad(packed, group)
    z, tail_sum = packed[:, :-1], packed[:, -1]
    lse_tail = m + tail_sum.log()
    return z, torch.logaddexp(z.logsumexp(-1), lse_tail), lse_tail


def _check_targets(ids: torch.Tensor, z: torch.Tensor, p: torch.Tensor, limit: int) -> None:
    """Refuse ids outside ``[0, limit)``, repeated ids, and ids on -inf (padded) student columns; one sync."""
    bad_range = ((ids < 0) | (ids >= limit)).any()
    ordered = ids.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any()
    on_padding = (torch.isneginf(z) & (p > 0)).any()
    bad_range, repeated, on_padding = torch.stack([bad_range, repeated, on_padding]).tolist()
    if bad_range:
        raise ValueError(
            f"sparse KD: teacher target ids span [{int(ids.min())}, {int(ids.max())}], outside the student's "
            f"vocabulary [0, {limit}): the targets were made for another tokenizer or vocabulary"
        )
    if repeated:
        raise ValueError(
            "sparse KD: a position lists the same teacher target id twice (a corrupt targets file)"
        )
    if on_padding:
        bad = ids[torch.isneginf(z) & (p > 0)]
        raise ValueError(
            f"sparse KD: teacher target ids {sorted(set(bad.tolist()))[:8]} fall on columns where the student's "
            "logit is -inf (its padded vocabulary): the targets were made for another tokenizer or vocabulary"
        )


class _SparseKL(torch.autograd.Function):
    """Per-row K + 1 bucket forward KL on the rows ``rows`` of ``[N, V/tp]`` logits; grad w.r.t. student only."""

    @staticmethod
    def forward(ctx, s, ids, logp, tail, rows, temperature, group, limit):
        x = _scaled_rows(s, rows, temperature)
        idx, owned = _local_ids(ids, s.shape[-1], group)
        z, lse, lse_tail = _stats(x, idx, owned, group)
        del x
        acc = z.dtype
        logp, tail = logp.to(acc), tail.to(acc)
        p = logp.exp()
        if limit is not None:
            _check_targets(ids, z, p, limit)
        has_tail = torch.isfinite(lse_tail)
        p_tail = torch.where(has_tail, tail.exp(), torch.zeros_like(tail))
        zero = torch.zeros((), dtype=acc, device=z.device)
        head = torch.where(p > 0, p * (logp - (z - lse.unsqueeze(-1))), zero).sum(-1)
        value = head + torch.where(p_tail > 0, p_tail * (tail - (lse_tail - lse)), zero)
        ctx.save_for_backward(s, rows, idx, owned, z, p, p_tail, lse, lse_tail)
        ctx.temperature = temperature
        return value

    @staticmethod
    def backward(ctx, grad_value):
        s, rows, idx, owned, z, p, p_tail, lse, lse_tail = ctx.saved_tensors
        x = _scaled_rows(s, rows, ctx.temperature)
        _mask_ids_(x, idx, owned)
        g = grad_value.to(z.dtype) / ctx.temperature
        total = p.sum(-1) + p_tail  # 1 up to the targets' rounding; exact gradient of the stated sum
        finite = torch.isfinite(lse_tail)
        q_tail = torch.where(finite, (lse_tail - lse).exp(), torch.zeros_like(lse))
        # non-K column j: exp(x_j - lse_tail) * (total * q_tail - p_tail); K column k: total * q_k - p_k
        coeff = (total * q_tail - p_tail) * g
        shift = torch.where(finite, lse_tail, torch.zeros_like(lse_tail))
        x.sub_(shift.unsqueeze(-1)).exp_().mul_(coeff.unsqueeze(-1))
        grad_k = (total.unsqueeze(-1) * (z - lse.unsqueeze(-1)).exp() - p) * g.unsqueeze(-1)
        x.scatter_add_(-1, idx, grad_k.masked_fill(~owned, 0.0))
        if rows is None:
            grad = x.to(s.dtype)
        else:
            grad = torch.zeros_like(s).index_copy_(0, rows, x.to(s.dtype))
        return grad, None, None, None, None, None, None, None


def _check_shapes(student: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, tail: torch.Tensor) -> None:
    lead = tuple(student.shape[:-1])
    if ids.shape != logp.shape or tuple(ids.shape[:-1]) != lead or tuple(tail.shape) != lead:
        raise ValueError(
            f"sparse KD: targets t_ids {tuple(ids.shape)}, t_logp {tuple(logp.shape)}, t_tail {tuple(tail.shape)} "
            f"do not match the student logits {tuple(student.shape)} (expected [..., K], [..., K] and [...])"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"sparse KD: t_ids must be integer token ids, got {ids.dtype}")


def sparse_per_token_divergence(
    student_logits: torch.Tensor,
    t_ids: torch.Tensor,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    tp_group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """KL(teacher || student) over the K + 1 buckets per position, shape ``logits.shape[:-1]``, 0 off ``mask``.

    fp32 (fp64 for fp64 logits); not scaled by tau^2; differentiable w.r.t. ``student_logits`` only. Only the
    rows in ``mask`` are computed or checked (ids elsewhere may be anything). ``vocab_size``: the student's
    real vocabulary (ids at or beyond it raise); None allows the whole padded width, where an id on a -inf
    padded column still raises. ``check_ids=False`` skips the checks and their one host sync.
    """
    _check_shapes(student_logits, t_ids, t_logp, t_tail)
    if temperature <= 0:
        raise ValueError(f"ki.temperature: must be positive, got {temperature}")
    lead, v, k = student_logits.shape[:-1], student_logits.shape[-1], t_ids.shape[-1]
    s = student_logits.reshape(-1, v)
    ids, logp, tail = t_ids.reshape(-1, k).long(), t_logp.detach().reshape(-1, k), t_tail.detach().reshape(-1)
    rows = None
    if mask is not None:
        flat = mask.reshape(-1)
        if not bool(flat.all()):
            rows = flat.nonzero().squeeze(-1)
            ids, logp, tail = ids[rows], logp[rows], tail[rows]
    limit = (vocab_size if vocab_size is not None else v * group_size(tp_group)) if check_ids else None
    per_row = _SparseKL.apply(s, ids, logp, tail, rows, float(temperature), tp_group, limit)
    if rows is not None:
        per_row = per_row.new_zeros(s.shape[0]).index_put((rows,), per_row)
    return per_row.reshape(lead)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    t_ids: torch.Tensor,
    t_logp: torch.Tensor,
    t_tail: torch.Tensor,
    temperature: float,
    tp_group: ProcessGroup | None = None,
    mask: torch.Tensor | None = None,
    *,
    vocab_size: int | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """``tau^2 x`` the mean K + 1 bucket KL over the ``mask`` positions (all if None): ``ki_loss``'s KD term.

    fp32 scalar, 0 when no position is masked in. See ``sparse_per_token_divergence`` for the arguments.
    """
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    div = sparse_per_token_divergence(
        student_logits, t_ids, t_logp, t_tail, mask, temperature=temperature, tp_group=tp_group,
        vocab_size=vocab_size, check_ids=check_ids,
    )  # fmt: skip
    return _masked_mean(div, mask, mask.sum()) * (temperature**2)


def head_rows_logits(head: HeadInputs, rows: torch.Tensor, tp_group: ProcessGroup | None) -> torch.Tensor:
    """The logits ``[len(rows), V/tp]`` of the flattened positions ``rows`` only, from the output head's inputs
    (-inf on the padded vocabulary columns, as the head's own logits). A masked LM predicts ~15% of its
    positions, so this projects ~15% of the rows the logits path would."""
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1]).index_select(0, rows)
    logits = F.linear(copy_to_tp_region(hidden, tp_group), head.weight, head.bias)
    local = head.weight.shape[0]
    first_pad = head.vocab_size - group_rank(tp_group) * local
    if first_pad < local:
        pad = torch.arange(local, device=logits.device) >= first_pad
        logits = logits.masked_fill(pad, float("-inf"))
    return logits


def sparse_ki_loss(
    student_logits: torch.Tensor,
    t_ids: torch.Tensor | None,
    t_logp: torch.Tensor | None,
    t_tail: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    *,
    temperature: float = 2.0,
    tp_group: ProcessGroup | None = None,
    lm_loss: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    check_ids: bool = True,
) -> KILossOutput:
    """``(1 - alpha) * L_lm + alpha * tau^2 * mean KL_{K+1}(teacher || student)``: ``ki_loss`` for offline targets.

    Same positions, averaging, ``lm_loss`` and ``loss_mask`` semantics and output as ``ki_loss``; the LM term
    is the vocab-parallel cross-entropy. ``teacher_lm_loss`` is always None: the targets give the teacher's
    probability of a label only when it is among the K ids at temperature 1, so no exact value exists in
    general. With ``alpha == 0`` the KD term is skipped (the targets may be None).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sparse_ki_loss: alpha must be in [0, 1], got {alpha}")
    mask = loss_positions(labels, ignore_index, loss_mask)
    count = mask.sum()
    targets = labels if loss_mask is None else labels.masked_fill(~mask, ignore_index)
    lm = _student_lm_loss(student_logits, targets, lm_loss, mask, count, tp_group, ignore_index)
    if alpha == 0.0:
        return KILossOutput(lm, lm.detach(), None, None, 0.0, count)
    if t_ids is None or t_logp is None or t_tail is None:
        raise ValueError(f"sparse_ki_loss: teacher targets are required when alpha > 0 (alpha={alpha})")
    div = sparse_per_token_divergence(
        student_logits, t_ids, t_logp, t_tail, mask, temperature=temperature, tp_group=tp_group,
        vocab_size=vocab_size, check_ids=check_ids,
    )  # fmt: skip
    kd = _masked_mean(div, mask, count) * (temperature**2)
    loss = (1.0 - alpha) * lm + alpha * kd
    return KILossOutput(loss, lm.detach(), kd.detach(), None, float(alpha), count)
