"""The frozen teacher and the KI loss as the pipeline's (or the loop's) loss function.

With pp = 1 the teacher is a whole frozen model beside the student (:func:`frozen_teacher`); with pp > 1 it
is a :class:`megatron_ki.models.pipe.PipelinedTeacher` whose layers are split over the student's stages. In both
cases it is never registered in the student's module: no optimizer state, no gradient, never saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed import ProcessGroup

from megatron_ki.config import ConfigError, KIConfig, ModelConfig, check_teacher
from megatron_ki.config.schema import teacher_on_student_vocabulary
from megatron_ki.dtypes import DTYPES
from megatron_ki.errors import MegatronKIError
from megatron_ki.models import build_model
from megatron_ki.models.transformer import HeadInputs

from .fused_head import DEFAULT_CHUNK_TOKENS, fused_head_ki_loss
from .loss import KILossOutput, ki_loss, loss_positions
from .sparse_loss import head_rows_logits, sparse_ki_loss


class TeacherError(MegatronKIError, ValueError):
    """The teacher does not fit the student (vocabulary, tokenizer, tensor-parallel split)."""


def check_teacher_fits(
    student: ModelConfig, teacher: ModelConfig, tp: int, seq_length: int | None = None, pp: int = 1
) -> ModelConfig:
    """The teacher's config as it runs beside ``student``, once it fits: the same tokenizer (vocabulary,
    padded vocabulary, RoBERTa padding id), the same kind of attention, a split that works at the student's
    tensor-parallel size, and (given ``seq_length``) positions for every sample:
    :func:`megatron_ki.config.check_teacher`, the rule ``Config.validate`` applies to a ``ki.teacher`` in the
    config, here for the teacher a run loads; a mismatch is a :class:`TeacherError`.

    A teacher with embedding rows beyond the student's vocabulary (Qwen pads its rows past the tokenizer) runs
    with ``vocab_size`` = the student's: its extra rows are dropped or fall in the padding, whose logits are
    -inf, so the KD softmax and the teacher's LM loss are over the real vocabulary.
    """
    try:
        check_teacher(student, teacher, tp, seq_length, pp=pp)
    except ConfigError as e:
        raise TeacherError(f"teacher does not fit the student at '{e.key}': {e.detail}") from None
    return teacher_on_student_vocabulary(student, teacher)


def freeze(model: nn.Module, dtype: str) -> nn.Module:
    """Eval mode (no dropout), no gradients, stored in ``dtype``."""
    if dtype not in DTYPES:  # 'auto' is resolved by Config from train.precision
        raise ValueError(f"ki.teacher_dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    model.to(dtype=DTYPES[dtype]).eval().requires_grad_(False)
    return model


def frozen_teacher(
    cfg: ModelConfig,
    ki: KIConfig,
    tp_group: ProcessGroup | None,
    state_dict: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    sequence_parallel: bool = False,
) -> nn.Module:
    """The whole teacher on this TP rank (pp = 1), weights from ``state_dict`` (this rank's shards)."""
    model = build_model(cfg, tp_group=tp_group, seed=seed, sequence_parallel=sequence_parallel)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return freeze(model.to(device) if device is not None else model, ki.teacher_dtype)


@dataclass
class KILossFunction:
    """``loss_fn(outputs, labels)`` for DeepSpeed's PipelineModule and for the pp = 1 loop.

    ``outputs`` is the student's vocab-sharded logits, or ``(student_logits, teacher_logits)`` while the
    teacher runs; or the same with each head's :class:`HeadInputs` in place of its logits, which runs the
    fused head + loss (``ki/fused_head.py``, chunks of :attr:`chunk_tokens` positions). The loop sets
    :attr:`alpha` before each step; every call appends its :class:`KILossOutput` to :attr:`records` so the
    loop can log lm_loss, kd_loss and the teacher's loss.
    """

    ki: KIConfig
    tp_group: ProcessGroup | None = None
    alpha: float = 0.0
    records: list[KILossOutput] = field(default_factory=list)
    teacher_forward_calls: int = 0
    vocab_size: int | None = None
    """The student's real vocabulary: offline target ids must lie below it."""
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    """Loss positions per chunk of the fused head + loss (``train.fused_head_chunk_tokens``)."""
    __name__ = "ki_loss"

    def __call__(self, outputs, labels) -> torch.Tensor:
        if isinstance(labels, tuple | list):  # (labels, t_ids, t_logp, t_tail): offline teacher targets
            return self._offline(outputs, *labels)
        if isinstance(outputs, tuple):
            student_logits, teacher_logits = outputs
            self.teacher_forward_calls += 1
        else:
            student_logits, teacher_logits = outputs, None
        if isinstance(student_logits, HeadInputs):
            return self._fused(student_logits, teacher_logits, labels)
        out = ki_loss(
            student_logits,
            teacher_logits,
            labels,
            self.alpha if teacher_logits is not None else 0.0,
            temperature=self.ki.temperature,
            divergence=self.ki.divergence,
            tp_group=self.tp_group,
        )
        self.records.append(out)
        return out.loss

    def _fused(self, student: HeadInputs, teacher: HeadInputs | None, labels: torch.Tensor) -> torch.Tensor:
        """The heads' projections and the loss in one chunked pass: the same value as the logits path."""
        if isinstance(teacher, torch.Tensor):
            raise TypeError(
                "KI loss: the student's head inputs came with the teacher's logits; give both or neither"
            )
        out = fused_head_ki_loss(
            student.hidden,
            student.weight,
            labels,
            self.alpha if teacher is not None else 0.0,
            teacher_hidden=None if teacher is None else teacher.hidden,
            teacher_weight=None if teacher is None else teacher.weight,
            bias=student.bias,
            teacher_bias=None if teacher is None else teacher.bias,
            vocab_size=student.vocab_size,
            temperature=self.ki.temperature,
            divergence=self.ki.divergence,
            tp_group=self.tp_group,
            chunk_tokens=self.chunk_tokens,
        )
        self.records.append(out)
        return out.loss

    def _offline(self, logits, labels, t_ids, t_logp, t_tail) -> torch.Tensor:
        """The KD term over the stored top-K ids and the tail bucket (``ki/sparse_loss.py``); the targets are
        at the temperature they were computed at, which the run checked equals ``ki.temperature``. Given the
        head's inputs, only the positions with a label are projected (the same loss)."""
        if isinstance(logits, HeadInputs):
            rows = loss_positions(labels).reshape(-1).nonzero().squeeze(1)
            k = t_ids.shape[-1]
            logits = head_rows_logits(logits, rows, self.tp_group)
            labels = labels.reshape(-1).index_select(0, rows)
            t_ids, t_logp = (t.reshape(-1, k).index_select(0, rows) for t in (t_ids, t_logp))
            t_tail = t_tail.reshape(-1).index_select(0, rows)
        out = sparse_ki_loss(  # alpha 0 (targets released): the LM term alone, the targets unread
            logits,
            t_ids,
            t_logp,
            t_tail,
            labels,
            self.alpha,
            temperature=self.ki.temperature,
            tp_group=self.tp_group,
            vocab_size=self.vocab_size,
        )
        self.records.append(out)
        return out.loss

    def pop_records(self) -> list[KILossOutput]:
        records, self.records = self.records, []
        return records
