"""The output head(s) and the KI loss fused, chunk by chunk: no ``[tokens, vocab/tp]`` logits ever exist.

At 8192 tokens x 128k vocabulary the student's and the teacher's logits, their fp32 work and the logits'
gradient set a KI step's peak memory. :func:`fused_head_ki_loss` starts from the final hidden states and the
vocab-parallel head weights instead, and walks the loss positions in chunks of ``chunk_tokens``: each chunk's
student and teacher logits (-inf on the padded vocabulary columns, as ``models.transformer.LMHead`` makes them),
their per-row ``KLStat`` statistics (the kernels' op or reference) plus the temperature-1 log-partition
functions and target logits of both LM losses, merged across tensor-parallel ranks with one MAX and one SUM
all-reduce per chunk. The gradient w.r.t. the chunk's logits is then turned into the gradients w.r.t. the
student's hidden states and head weight (and bias) at once, so peak extra memory is O(chunk x vocab / tp).

By default the gradients are produced in the forward walk (scaled by the upstream gradient in backward), so
each head runs once, as in the unfused path; ``recompute=True`` keeps only per-row statistics and recomputes
each chunk's logits in backward instead (two more head matmuls, nothing ``[V/tp, H]``-sized held between
forward and backward). Values equal ``ki_loss`` on the model's logits (module docstring of ``ki.loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from megatron_ki.kernels import kl_from_stats, rescale_kl_stats
from megatron_ki.kernels.kl import MAX_COLUMNS, SUM_COLUMNS
from megatron_ki.tensor_parallel import group_rank, group_size
from megatron_ki.tensor_parallel.mappings import all_reduce_no_grad

from .loss import DIVERGENCES, Backend, Divergence, KILossOutput, _kl_ops, loss_positions

DEFAULT_CHUNK_TOKENS = 512
"""Rows per chunk: at 128k/tp columns one fp32 [chunk, V/tp] tensor is 0.25 GiB/tp; a chunk holds ~4."""


@dataclass(frozen=True)
class _Setup:
    """Per-call constants of the walk (not tensors, so autograd does not see them)."""

    alpha: float
    temperature: float
    divergence: str
    group: ProcessGroup | None
    backend: str
    vocab_start: int  # this rank's first vocabulary column
    first_pad: int  # first local column that is padding (= V/tp when none is)
    chunk: int
    recompute: bool

    @property
    def use_kd(self) -> bool:
        return self.alpha > 0.0

    @property
    def lse1_from_kl(self) -> bool:
        """At temperature 1 the KL statistics hold both temperature-1 log-partition functions."""
        return self.use_kd and self.temperature == 1.0


# ------------------------------------------------------------------------------ one chunk, forward
def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, setup: _Setup) -> torch.Tensor:
    """A chunk's vocab-shard logits, -inf on the padded columns like the model's head (``padding_bias``)."""
    out = F.linear(h, w, b)
    if setup.first_pad < out.shape[-1]:
        out[:, setup.first_pad :] = float("-inf")
    return out


def _picked(x: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """The target logit where this rank owns the target, else 0 (summed over the ranks)."""
    return x.gather(-1, idx).squeeze(-1).float().masked_fill(~owned, 0.0)


def _merge(
    blocks: list[torch.Tensor], targets: torch.Tensor, group: ProcessGroup | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Full-row ``KLStat`` blocks and target logits from this rank's slices: one MAX and one SUM all-reduce
    for all of them (the rule of ``ki.loss.all_reduce_kl_stats``, batched)."""
    if group_size(group) == 1:
        return blocks, targets
    maxima = torch.cat([b[:, list(MAX_COLUMNS)] for b in blocks], -1)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    merged = [rescale_kl_stats(b, maxima[:, 2 * i], maxima[:, 2 * i + 1]) for i, b in enumerate(blocks)]
    sums = torch.cat([b[:, list(SUM_COLUMNS)] for b in merged] + [targets], -1)
    dist.all_reduce(sums, group=group)
    width = len(SUM_COLUMNS)
    for i, b in enumerate(merged):
        b[:, list(SUM_COLUMNS)] = sums[:, i * width : (i + 1) * width]
    return merged, sums[:, len(merged) * width :]


def _lm_stats(
    s: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, setup: _Setup
) -> dict[str, torch.Tensor]:
    """The student's LM loss alone (no teacher): its full-row log-partition function and target logit, with
    one MAX and one SUM all-reduce; plain PyTorch, so runs without KI never touch the compiled kernels."""
    x = s.float()
    row_max = all_reduce_no_grad(x.max(-1).values, setup.group, op=dist.ReduceOp.MAX)
    both = torch.stack([(x - row_max.unsqueeze(-1)).exp_().sum(-1), _picked(s, idx, owned)], -1)
    all_reduce_no_grad(both, setup.group)
    lse = row_max + both[:, 0].log()
    return {"lse1_s": lse, "ce_s": lse - both[:, 1]}


def _chunk_stats(
    s: torch.Tensor, t: torch.Tensor | None, idx: torch.Tensor, owned: torch.Tensor, setup: _Setup
) -> dict[str, torch.Tensor]:
    """Full-row per-row quantities of a chunk from ``KLStat`` blocks (the kernels' op or reference): one at
    the temperature for the KD term, one at temperature 1 for both LM losses (the same block when tau = 1)."""
    if t is None and not setup.use_kd:
        return _lm_stats(s, idx, owned, setup)
    forward_stats, _ = _kl_ops(setup.backend, s)
    other = s if t is None else t.to(s.dtype)  # no teacher (LM only): its columns are ignored
    blocks = [forward_stats(s, other, setup.temperature).float()] if setup.use_kd else []
    if not setup.lse1_from_kl:
        blocks.append(forward_stats(s, other, 1.0).float())
    targets = torch.stack([_picked(x, idx, owned) for x in (s, t) if x is not None], -1)
    blocks, targets = _merge(blocks, targets, setup.group)
    out: dict[str, torch.Tensor] = {}
    if setup.use_kd:
        terms = kl_from_stats(blocks[0])
        out.update(value=getattr(terms, setup.divergence), lse_s=terms.lse_s, lse_t=terms.lse_t)
    at_one = kl_from_stats(blocks[-1])
    out["lse1_s"], out["ce_s"] = at_one.lse_s, at_one.lse_s - targets[:, 0]
    if t is not None:
        out["ce_t"] = at_one.lse_t - targets[:, 1]
    return out


# ----------------------------------------------------------------------------- one chunk, gradient
def _owned(targets: torch.Tensor, setup: _Setup, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local column [c, 1], owned [c])`` of each target in this rank's vocabulary slice."""
    local = targets - setup.vocab_start
    owned = (local >= 0) & (local < vocab_local)
    return local.masked_fill(~owned, 0).unsqueeze(-1), owned


def _chunk_grad_logits(
    s: torch.Tensor,
    t: torch.Tensor | None,
    idx: torch.Tensor,
    owned: torch.Tensor,
    rows: dict[str, torch.Tensor],
    setup: _Setup,
    count: int,
) -> torch.Tensor:
    """d loss / d chunk logits for an upstream gradient of 1, fp32: the LM term's softmax minus one-hot,
    plus the kernels' KD gradient, each weighted as ``ki_loss`` mixes and averages them."""
    if 0.0 < setup.alpha < 1.0 and setup.lse1_from_kl and setup.divergence == "forward_kl":
        # tau 1: (1 - a)(p_s - y) + a(p_s - p_t) = p_s - a p_t - (1 - a) y; two exp passes instead of three
        grad = (s.float() - rows["lse_s"].unsqueeze(-1)).exp_()
        grad.sub_((t.float() - rows["lse_t"].unsqueeze(-1)).exp_(), alpha=setup.alpha)
        grad.scatter_add_(-1, idx, -(1.0 - setup.alpha) * owned.unsqueeze(-1).float())
        return grad.mul_(1.0 / count)
    grad = None
    if setup.alpha < 1.0:
        grad = (s.float() - rows["lse1_s"].unsqueeze(-1)).exp_()
        grad.scatter_add_(-1, idx, -owned.unsqueeze(-1).float())
        grad.mul_((1.0 - setup.alpha) / count)
    if setup.use_kd:
        _, backward = _kl_ops(setup.backend, s)
        g = torch.full_like(rows["lse_s"], setup.alpha * setup.temperature**2 / count)
        kd = backward(
            s,
            t.to(s.dtype),
            setup.temperature,
            rows["lse_s"],
            rows["lse_t"],
            rows["value"],
            g,
            setup.divergence,
        )
        grad = kd.float() if grad is None else grad.add_(kd)
    return grad


@dataclass
class _Grads:
    """Gradients of the student's hidden rows and head; the head's in fp32 when the weight is 16-bit."""

    h: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None

    @staticmethod
    def zeros(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> _Grads:
        wide = torch.promote_types(w.dtype, torch.float32)
        bias = None if b is None else torch.zeros(b.shape, dtype=wide, device=b.device)
        return _Grads(torch.zeros_like(h), torch.zeros(w.shape, dtype=wide, device=w.device), bias)

    def add(self, grad_logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor, rows: slice) -> None:
        gl = grad_logits.to(h.dtype)
        self.h[rows] = gl @ w
        if self.w.dtype == h.dtype:
            self.w.addmm_(gl.t(), h)
        else:
            self.w += (gl.t() @ h).to(self.w.dtype)
        if self.b is not None:
            self.b += grad_logits.sum(0).to(self.b.dtype)


# -------------------------------------------------------------------------------- the walk, autograd
_ROW_KEYS = ("lse1_s", "lse_s", "lse_t", "value")  # what recompute keeps per row, fp32


def _chunk(
    inputs: tuple[torch.Tensor | None, ...], targets: torch.Tensor, rows: slice, setup: _Setup
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    h, w, b, ht, wt, bt = inputs
    s = _logits(h[rows], w, b, setup)
    t = None if ht is None else _logits(ht[rows], wt, bt, setup)
    idx, owned = _owned(targets[rows], setup, w.shape[0])
    return s, t, idx, owned


class _FusedHeadKILoss(torch.autograd.Function):
    """``(loss, lm, kd, teacher_lm)`` of the loss rows; gradient w.r.t. the student's hidden rows and head."""

    @staticmethod
    def forward(ctx, h, w, b, ht, wt, bt, targets, setup: _Setup):
        inputs, n = (h, w, b, ht, wt, bt), h.shape[0]
        want = any(ctx.needs_input_grad[:3])
        grads = _Grads.zeros(h, w, b) if want and not setup.recompute else None
        kept = h.new_zeros(n, len(_ROW_KEYS), dtype=torch.float32) if want and setup.recompute else None
        totals = h.new_zeros(3, dtype=torch.float32)  # sums of student CE, teacher CE, divergence
        for start in range(0, n, setup.chunk):
            rows = slice(start, start + setup.chunk)
            s, t, idx, owned = _chunk(inputs, targets, rows, setup)
            stats = _chunk_stats(s, t, idx, owned, setup)
            for i, key in enumerate(("ce_s", "ce_t", "value")):
                if key in stats:
                    totals[i] += stats[key].sum()
            if grads is not None:
                grads.add(_chunk_grad_logits(s, t, idx, owned, stats, setup, max(n, 1)), h[rows], w, rows)
            if kept is not None:
                kept[rows] = torch.stack([stats.get(k, stats["lse1_s"]) for k in _ROW_KEYS], -1)
        if grads is not None and group_size(setup.group) > 1:
            dist.all_reduce(grads.h, group=setup.group)  # the hidden rows feed every rank's vocabulary slice
        lm, teacher_lm, div = (totals / max(n, 1)).unbind()
        kd = div * setup.temperature**2
        loss = (1.0 - setup.alpha) * lm + setup.alpha * kd if setup.use_kd else lm.clone()
        ctx.setup, ctx.grads = setup, grads
        ctx.save_for_backward(h, w, b, ht, wt, bt, targets, kept)
        ctx.mark_non_differentiable(lm, kd, teacher_lm)
        return loss, lm, kd, teacher_lm

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        h, w, b, ht, wt, bt, targets, kept = ctx.saved_tensors
        if ctx.setup.recompute:
            grads = _recompute(ctx.setup, (h, w, b, ht, wt, bt), targets, kept)
        elif ctx.grads is None:
            raise RuntimeError("fused_head_ki_loss: backward ran twice; pass recompute=True to allow it")
        else:
            grads, ctx.grads = ctx.grads, None  # scaled in place below: no second [V/tp, H] copy
        g = grad_loss.float()
        out = [
            x.mul_(g).to(like.dtype)
            for x, like in ((grads.h, h), (grads.w, w), (grads.b, b))
            if x is not None
        ]
        return (*out, *([None] * (3 - len(out))), None, None, None, None, None)


def _recompute(
    setup: _Setup, inputs: tuple[torch.Tensor | None, ...], targets: torch.Tensor, kept: torch.Tensor
) -> _Grads:
    """``recompute=True``: each chunk's logits again, with the kept per-row statistics, to the gradients."""
    h, w, b = inputs[:3]
    grads, n = _Grads.zeros(h, w, b), h.shape[0]
    for start in range(0, n, setup.chunk):
        rows = slice(start, start + setup.chunk)
        s, t, idx, owned = _chunk(inputs, targets, rows, setup)
        stats = {k: kept[rows, i].contiguous() for i, k in enumerate(_ROW_KEYS)}
        grads.add(_chunk_grad_logits(s, t, idx, owned, stats, setup, max(n, 1)), h[rows], w, rows)
    if group_size(setup.group) > 1:
        dist.all_reduce(grads.h, group=setup.group)
    return grads


# ---------------------------------------------------------------------------------------- entry point
def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    teacher: tuple[torch.Tensor | None, torch.Tensor | None],
    opts: tuple[float, str, int],
) -> None:
    temperature, divergence, chunk_tokens = opts
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fused_head_ki_loss: alpha must be in [0, 1], got {alpha}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"ki.divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    if not temperature > 0 or chunk_tokens < 1:
        raise ValueError(
            f"fused_head_ki_loss: temperature {temperature} and chunk_tokens {chunk_tokens} must be > 0"
        )
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"fused_head_ki_loss: hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)} and head weight "
            f"{tuple(weight.shape)} do not fit ([..., H], [...], [V/tp, H])"
        )
    t_hidden, t_weight = teacher
    if (t_hidden is None) != (t_weight is None):
        raise ValueError("fused_head_ki_loss: teacher_hidden and teacher_weight come together")
    if t_hidden is None and alpha > 0:
        raise ValueError(f"fused_head_ki_loss: the teacher is required when alpha > 0 (alpha={alpha})")
    if t_hidden is not None and (
        t_hidden.shape[:-1] != labels.shape or t_weight.shape != (weight.shape[0], t_hidden.shape[-1])
    ):
        raise ValueError(
            f"fused_head_ki_loss: teacher hidden {tuple(t_hidden.shape)} / weight {tuple(t_weight.shape)} must be "
            f"[..., Ht] / [{weight.shape[0]}, Ht] (the student's positions and vocabulary split)"
        )


def fused_head_ki_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    temperature: float = 2.0,
    divergence: Divergence = "forward_kl",
    tp_group: ProcessGroup | None = None,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    backend: Backend = "auto",
    recompute: bool = False,
) -> KILossOutput:
    """``ki_loss`` of the logits ``hidden @ weight.T + bias`` (and the teacher's), without forming them.

    ``hidden`` ``[..., H]`` / ``teacher_hidden`` ``[..., Ht]``: what the heads project (after the final norm,
    or the MLM transform); ``weight``/``teacher_weight`` ``[V/tp, H|Ht]``: this rank's vocabulary rows (tied
    or not), biases ``[V/tp]``. Columns at and past ``vocab_size`` (the real vocabulary; None: no padding)
    are -inf. ``labels``, ``loss_mask``, ``alpha``, ``temperature``, ``divergence``, ``backend``: as
    ``ki_loss``. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; the teacher gets no gradient.
    """
    _check(
        hidden,
        weight,
        labels,
        alpha,
        (teacher_hidden, teacher_weight),
        (temperature, divergence, chunk_tokens),
    )
    mask = loss_positions(labels, ignore_index, loss_mask)
    count = mask.sum()
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    local = weight.shape[0]
    start = group_rank(tp_group) * local
    first_pad = local if vocab_size is None else min(max(vocab_size - start, 0), local)
    setup = _Setup(
        float(alpha),
        float(temperature),
        divergence,
        tp_group,
        backend,
        start,
        first_pad,
        chunk_tokens,
        recompute,
    )

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(-1, x.shape[-1]).index_select(0, rows)

    if not torch.is_grad_enabled():  # evaluation: needs_input_grad then skips the gradient work
        hidden, weight, bias = (None if x is None else x.detach() for x in (hidden, weight, bias))
    t_args = (pick(teacher_hidden), teacher_weight, teacher_bias)
    t_args = tuple(None if x is None else x.detach() for x in t_args)
    targets = labels.reshape(-1).index_select(0, rows)
    loss, lm, kd, teacher_lm = _FusedHeadKILoss.apply(pick(hidden), weight, bias, *t_args, targets, setup)
    return KILossOutput(
        loss,
        lm,
        kd if setup.use_kd else None,
        teacher_lm if teacher_hidden is not None else None,
        float(alpha),
        count,
    )
