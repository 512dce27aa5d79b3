"""Pipeline-parallel model for DeepSpeed's ``PipelineModule``, with an optional frozen KI teacher
split over the same stages.

Pipeline layers are ``[EmbeddingPipe, BlockPipe x num_layers, HeadPipe]``; each wraps a slice of the
student built with :func:`megatron_ki.models.build_model` (so weights equal the single-process model's) and
the slice of the teacher that belongs beside it: teacher layer ``j`` runs beside student block
``floor(j * L_student / L_teacher)``, so every stage runs the teacher layers in proportion to its share of
student layers, whatever the depths.

Between stages one floating tensor travels: ``cat([student_hidden, teacher_hidden], -1)`` with the attention
mask (integer) beside it. DeepSpeed's pipeline engine cannot send a tuple member that does not require grad,
so the frozen teacher's hidden rides inside the student's tensor and is split again on arrival.

The teacher is never registered as a submodule: it is not in ``parameters()`` (no optimizer state, no
gradient), not in ``state_dict()`` (never saved in the student's checkpoint), and ``release()`` drops it.
The tied input/output embedding lives on the first and last stage; its gradients are all-reduced over the
framework's embedding group (Megatron's scheme). The ``PipelineModule`` itself, which needs DeepSpeed
internals for that and for the "compute" partition, is built by ``training/run.py:build_pipeline_module``
(``training/deepspeed_compat.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from megatron_ki.config import ModelConfig
from megatron_ki.dtypes import DTYPES
from megatron_ki.tensor_parallel import TPRngTracker

from . import build_model
from .transformer import TransformerLanguageModel

logger = logging.getLogger("megatron_ki")


def teacher_layers_for(student_layers: int, teacher_layers: int) -> list[list[int]]:
    """PipelinedTeacher layer indices that run beside each student block (monotone, each exactly once)."""
    out: list[list[int]] = [[] for _ in range(student_layers)]
    for j in range(teacher_layers):
        out[j * student_layers // teacher_layers].append(j)
    return out


@dataclass
class PipelinedTeacher:
    """The frozen model carried beside the student, and whether it still runs (alpha > 0)."""

    cfg: ModelConfig
    seed: int = 0
    dtype: str = "bfloat16"
    state_dict: dict[str, torch.Tensor] | None = None
    """Full (this TP rank's shards) state dict of the teacher; None keeps the seeded initialisation."""
    active: bool = True
    pieces: list[Any] = field(default_factory=list)
    sequence_parallel: bool = False
    """The teacher's activations are sequence chunks too, like the student's it travels with."""

    def build(
        self,
        tp_group: ProcessGroup | None,
        layer_range: tuple[int, int],
        pre_process: bool,
        post_process: bool,
        device: torch.device | str | None = None,
    ) -> TransformerLanguageModel:
        """The teacher's slice, frozen: eval mode, no grad, in ``dtype``, weights from ``state_dict``."""
        model = build_model(
            self.cfg,
            tp_group=tp_group,
            seed=self.seed,
            layer_range=layer_range,
            pre_process=pre_process,
            post_process=post_process,
            sequence_parallel=self.sequence_parallel,
        )
        if self.state_dict is not None:
            load_slice(model, self.state_dict, layer_range[0])
        model.to(device=device, dtype=DTYPES[self.dtype]).eval().requires_grad_(False)
        self.pieces.append(model)
        return model

    def release(self) -> None:
        """Stop running the teacher and free its memory (alpha is 0 from now on)."""
        self.active = False
        self.state_dict = None
        self.pieces.clear()


def load_slice(model: TransformerLanguageModel, full: dict[str, torch.Tensor], first_layer: int) -> None:
    """Load a slice model (layers renumbered from 0) from a whole model's state dict."""
    own = model.state_dict()
    picked = {}
    for name in own:
        source = name
        if name.startswith("layers."):
            _, idx, rest = name.split(".", 2)
            source = f"layers.{int(idx) + first_layer}.{rest}"
        elif name.startswith("head.word_embeddings.") and source not in full:
            source = name.replace("head.word_embeddings.", "embedding.word_embeddings.")
        if source not in full:
            raise KeyError(f"teacher state dict has no '{source}' (needed for '{name}')")
        picked[name] = full[source]
    model.load_state_dict(picked, strict=True)


class _Unregistered:
    """Holds a module without registering it (keeps it out of parameters() and state_dict())."""

    def __init__(self, module: nn.Module | None):
        self.module = module


def _split(hidden: torch.Tensor, student_width: int, pipe_teacher: PipelinedTeacher | None):
    if pipe_teacher is None or not pipe_teacher.active:
        return hidden, None
    return hidden[..., :student_width], hidden[..., student_width:]


def _join(student: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    return student if other is None else torch.cat([student, other.to(student.dtype)], dim=-1)


class EmbeddingPipe(nn.Module):
    """``(input_ids, attention_mask, token_type_ids) -> (hidden, attention_mask)``."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: ProcessGroup | None,
        seed: int,
        pipe_teacher: PipelinedTeacher | None = None,
        device: torch.device | str | None = None,
        sequence_parallel: bool = False,
        rng_tracker: TPRngTracker | None = None,
    ):
        super().__init__()
        self.cfg, self.pipe_teacher = cfg, pipe_teacher
        self.model = build_model(
            cfg,
            tp_group,
            seed=seed,
            rng_tracker=rng_tracker,
            layer_range=(0, 0),
            post_process=False,
            sequence_parallel=sequence_parallel,
        )
        self._teacher = _Unregistered(
            pipe_teacher.build(tp_group, (0, 0), True, False, device) if pipe_teacher else None
        )

    @property
    def word_embeddings_weight(self) -> torch.Tensor:
        return self.model.embedding.word_embeddings.weight

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention_mask, token_type_ids = inputs
        types = token_type_ids if self.cfg.type_vocab_size > 0 else None
        hidden = self.model(input_ids, token_type_ids=types)
        other = None
        if self.pipe_teacher is not None and self.pipe_teacher.active:
            with torch.no_grad():
                c = self._teacher.module
                other = c(input_ids, token_type_ids=token_type_ids if c.cfg.type_vocab_size > 0 else None)
        return _join(hidden, other), attention_mask


class BlockPipe(nn.Module):
    """One student block, and the teacher blocks that run beside it."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_number: int,
        tp_group: ProcessGroup | None,
        seed: int,
        rng_tracker: TPRngTracker | None = None,
        pipe_teacher: PipelinedTeacher | None = None,
        teacher_layers: list[int] | None = None,
        device: torch.device | str | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.cfg, self.pipe_teacher = cfg, pipe_teacher
        self.model = build_model(
            cfg,
            tp_group,
            seed=seed,
            rng_tracker=rng_tracker,
            layer_range=(layer_number, layer_number + 1),
            pre_process=False,
            post_process=False,
            sequence_parallel=sequence_parallel,
        )
        module = None
        if pipe_teacher is not None and teacher_layers:
            first, last = teacher_layers[0], teacher_layers[-1] + 1
            module = pipe_teacher.build(tp_group, (first, last), False, False, device)
        self._teacher = _Unregistered(module)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, attention_mask = inputs
        student, other = _split(hidden, self.cfg.hidden_size, self.pipe_teacher)
        student = self.model(hidden_states=student, attention_mask=attention_mask)
        if other is not None and self._teacher.module is not None:
            c = self._teacher.module
            with torch.no_grad():
                other = c(hidden_states=other.to(next(c.parameters()).dtype), attention_mask=attention_mask)
        return _join(student, other), attention_mask


class HeadPipe(nn.Module):
    """Student head (vocab-sharded logits) and, while the teacher is active, the teacher's logits; with
    ``head_inputs`` each head's :class:`~megatron_ki.models.transformer.HeadInputs` instead (the fused loss)."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: ProcessGroup | None,
        seed: int,
        pipe_teacher: PipelinedTeacher | None = None,
        device: torch.device | str | None = None,
        head_inputs: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.cfg, self.pipe_teacher, self.head_inputs = cfg, pipe_teacher, head_inputs
        last = cfg.num_layers
        self.model = build_model(
            cfg,
            tp_group,
            seed=seed,
            layer_range=(last, last),
            pre_process=False,
            sequence_parallel=sequence_parallel,
        )
        module = None
        if pipe_teacher is not None:
            n = pipe_teacher.cfg.num_layers
            module = pipe_teacher.build(tp_group, (n, n), False, True, device)
        self._teacher = _Unregistered(module)

    @property
    def word_embeddings_weight(self) -> torch.Tensor | None:
        head = self.model.head
        return head.word_embeddings.weight if getattr(head, "word_embeddings", None) is not None else None

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]):
        hidden, _ = inputs
        student, other = _split(hidden, self.cfg.hidden_size, self.pipe_teacher)
        logits = self.model(hidden_states=student, head_inputs=self.head_inputs)
        if other is None:
            return logits
        c = self._teacher.module
        with torch.no_grad():
            other_logits = c(hidden_states=other.to(next(c.parameters()).dtype), head_inputs=self.head_inputs)
        return logits, other_logits


def pipeline_layers(
    cfg: ModelConfig,
    tp_group: ProcessGroup | None,
    seed: int,
    rng_tracker: TPRngTracker | None = None,
    pipe_teacher: PipelinedTeacher | None = None,
    device: torch.device | str | None = None,
    head_inputs: bool = False,
    sequence_parallel: bool = False,
) -> list:
    """LayerSpecs ``[EmbeddingPipe, BlockPipe x L, HeadPipe]``: DeepSpeed builds only this stage's layers.
    ``head_inputs``: the last stage hands the loss the heads' inputs, not logits (``HeadPipe``);
    ``sequence_parallel``: the tensor between stages is this rank's chunk of the sequence."""
    from deepspeed.pipe import LayerSpec

    beside = teacher_layers_for(cfg.num_layers, pipe_teacher.cfg.num_layers) if pipe_teacher else None
    sp = {"sequence_parallel": sequence_parallel}
    specs = [
        LayerSpec(EmbeddingPipe, cfg, tp_group, seed, pipe_teacher, device, rng_tracker=rng_tracker, **sp)
    ]
    for i in range(cfg.num_layers):
        specs.append(
            LayerSpec(
                BlockPipe,
                cfg,
                i,
                tp_group,
                seed,
                rng_tracker,
                pipe_teacher,
                beside[i] if beside else None,
                device,
                **sp,
            )
        )
    specs.append(LayerSpec(HeadPipe, cfg, tp_group, seed, pipe_teacher, device, head_inputs, **sp))
    return specs
