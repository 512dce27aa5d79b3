"""The training loop: data -> (student, teacher) -> KI loss -> DeepSpeed step, evaluation, metrics, checkpoints.

One code path for every layout: with pp = 1 the loop runs the micro-batches itself (teacher beside the
engine); with pp > 1 DeepSpeed's PipelineEngine runs them (teacher inside the stages). The KI loss function
records lm/kd/teacher losses wherever the logits are (every rank at pp = 1, the last stage at pp > 1); the
loop sums those records over the world, so every rank sees the same numbers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_ki.config import Config
from megatron_ki.errors import MegatronKIError
from megatron_ki.ki.schedule import KISchedule
from megatron_ki.ki.teacher import KILossFunction
from megatron_ki.parallel import ParallelGroups
from megatron_ki.training.metrics import peak_memory_gib

logger = logging.getLogger("megatron_ki")


class TrainingAborted(MegatronKIError, RuntimeError):
    """Training cannot continue (too many consecutive non-finite steps)."""


def model_inputs(
    sample: dict[str, torch.Tensor], causal: bool
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A collated data sample -> ``((input_ids, attention_mask, token_type_ids), labels)``.

    Causal: ``text`` holds seq + 1 tokens; inputs are the first seq, labels the next-token targets.
    MLM: ``text`` is the masked input, ``labels`` holds the targets (-100 elsewhere), ``padding_mask`` 1 = token.
    """
    text = sample["text"].long()
    if causal:
        ids, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
        if "loss_mask" in sample:
            labels = labels.masked_fill(sample["loss_mask"][:, 1:] == 0, -100)
        mask = torch.ones_like(ids)
    else:
        ids, labels = text, sample["labels"].long()
        mask = sample.get("padding_mask", torch.ones_like(ids)).long()
    return (ids, mask, torch.zeros_like(ids)), labels


@dataclass
class LoopState:
    """What a resumed run needs besides the engine: the step and the samples consumed."""

    step: int = 0
    consumed_samples: int = 0
    consecutive_skips: int = 0
    skipped_total: int = 0
    flops: float = 0.0
    """Cumulative training FLOPs (student forward + backward, teacher forward while it runs)."""
    train_time_s: float = 0.0
    """Cumulative seconds spent in training steps (evaluation, saving and start-up left out)."""


class Trainer:
    """Drives one run; built by ``pretrain_ki.py`` from already constructed parts."""

    def __init__(
        self,
        cfg: Config,
        engine,
        groups: ParallelGroups,
        loss_fn: KILossFunction,
        schedule: KISchedule,
        teacher=None,
        companion=None,
    ):
        self.cfg, self.engine, self.groups = cfg, engine, groups
        self.loss_fn, self.schedule = loss_fn, schedule
        self.teacher, self.companion = teacher, companion
        self.pipeline = cfg.parallel.pipeline_parallel > 1
        self.causal = cfg.model.causal
        self.gas = cfg.gradient_accumulation_steps(groups.topology.world_size)
        self.state = LoopState()
        self.tokens_per_sample = cfg.data.seq_length
        self.teacher_valid_loss: float | None = None
        """The teacher's LM loss on the fixed validation samples, kept after the teacher is released."""

    # -------------------------------------------------------------------------------- teacher
    @property
    def teacher_active(self) -> bool:
        if self.companion is not None:
            return self.companion.active
        return self.teacher is not None

    def release_teacher(self) -> None:
        """a_t is 0 from now on: stop running the teacher and free it."""
        if self.companion is not None and self.companion.active:
            self.companion.release()
        self.teacher = None
        logger.info("KI: alpha is 0 from step %d on; teacher released", self.state.step)

    # ----------------------------------------------------------------------------------- steps
    def _forward_loss(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        ids, mask, types = (t.to(self.engine.device) for t in inputs)
        labels = labels.to(self.engine.device)
        typed = self.cfg.model.type_vocab_size > 0
        logits = self.engine(ids, attention_mask=mask, token_type_ids=types if typed else None)
        if self.teacher is not None and self.teacher_active:
            with torch.no_grad():
                t_typed = self.teacher.cfg.type_vocab_size > 0
                t_logits = self.teacher(ids, attention_mask=mask, token_type_ids=types if t_typed else None)
            return self.loss_fn((logits, t_logits), labels)
        return self.loss_fn(logits, labels)

    def _aggregate(self, records, token_weighted: bool = False) -> dict[str, float | None]:
        """Average the loss records of all ranks (every rank gets the same numbers).

        Training averages the micro-batch means (Megatron's reporting); evaluation weights each record by its
        loss positions, so the value is the mean over the evaluated tokens whatever the micro-batch split
        (MLM micro-batches carry different numbers of masked positions).
        """
        # (weighted sum, weight) of lm, kd and teacher lm, then the weighted loss (its weight is lm's): one
        # device-to-host copy and one all-reduce for all of them.
        totals = torch.zeros(7, dtype=torch.float64)
        if records:
            zero = torch.zeros((), dtype=torch.float64, device=records[0].lm_loss.device)
            rows = []
            for r in records:
                w = r.num_tokens.to(zero) if token_weighted else torch.ones_like(zero)
                kd_w = w if r.kd_loss is not None else zero
                t_w = w if r.teacher_lm_loss is not None else zero
                kd = r.kd_loss.detach().double() if r.kd_loss is not None else zero
                teacher = r.teacher_lm_loss.detach().double() if r.teacher_lm_loss is not None else zero
                lm, loss = r.lm_loss.detach().double(), r.loss.detach().double()
                rows.append(torch.stack([lm * w, w, kd * kd_w, kd_w, teacher * t_w, t_w, loss * w]))
            totals = torch.stack(rows).cpu().sum(dim=0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        t = totals.tolist()

        def mean(total: int, weight: int) -> float | None:
            return t[total] / t[weight] if t[weight] else None

        return {
            "lm_loss": mean(0, 1),
            "kd_loss": mean(2, 3),
            "teacher_lm_loss": mean(4, 5),
            "loss": mean(6, 1),
        }

    def train_step(self, data_iter: Iterator) -> dict[str, Any]:
        step = self.state.step
        alpha = self.schedule.alpha(step)
        if self.teacher_active and not self.schedule.teacher_needed(step):
            self.release_teacher()
        self.loss_fn.alpha = alpha if self.teacher_active else 0.0
        self.engine.train()
        skipped_before = self._skipped()
        start = time.perf_counter()
        if self.pipeline:
            loss = self.engine.train_batch(data_iter=data_iter)
            loss_value = float(loss)
        else:
            total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
            for _ in range(self.gas):
                inputs, labels = next(data_iter)
                loss = self._forward_loss(inputs, labels)
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().double()  # no host sync per micro-batch
            loss_value = float(total) / self.gas  # the step's one sync, inside the timed span
        elapsed = time.perf_counter() - start
        self.state.train_time_s += elapsed
        skipped = self._skipped() - skipped_before
        metrics = self._aggregate(self.loss_fn.pop_records())
        self.state.step += 1
        global_batch = self.cfg.train.global_batch_size
        self.state.consumed_samples += global_batch
        self.state.skipped_total += skipped
        self.state.consecutive_skips = self.state.consecutive_skips + 1 if skipped else 0
        if self.state.consecutive_skips >= self.cfg.train.max_consecutive_skips:
            raise TrainingAborted(
                f"{self.state.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"(train.max_consecutive_skips={self.cfg.train.max_consecutive_skips}); last loss {loss_value}"
            )
        tokens = global_batch * self.tokens_per_sample
        metrics.update(
            step=self.state.step,
            alpha=self.loss_fn.alpha,
            lr=self.engine.get_lr()[0],
            grad_norm=_grad_norm(self.engine),
            loss_scale=_loss_scale(self.engine),
            skipped=skipped,
            skipped_total=self.state.skipped_total,
            consumed_samples=self.state.consumed_samples,
            consumed_tokens=self.state.consumed_samples * self.tokens_per_sample,
            step_time_s=elapsed,
            train_time_s=self.state.train_time_s,
            tokens_per_s=tokens / elapsed if elapsed > 0 else None,
            **peak_memory_gib(self.engine.device),
        )
        return metrics

    def _skipped(self) -> int:
        """Steps skipped so far: by DeepSpeed (fp16/bf16 overflow) or by the framework's guarded optimizer."""
        guarded = getattr(self.engine, "guarded_optimizer", None)
        return int(self.engine.skipped_steps or 0) + (guarded.nonfinite_skips if guarded is not None else 0)

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data_iter: Iterator, iters: int, fixed: bool = True) -> dict[str, float | None]:
        """Mean losses over ``iters`` global batches of ``data_iter`` (token-weighted), and perplexity.

        With ``fixed`` (the same samples at every evaluation) the teacher's LM loss measured while it ran is
        reported again after it is released: it is a frozen model on the same tokens.
        """
        self.loss_fn.pop_records()
        self.loss_fn.alpha = self.schedule.alpha(self.state.step) if self.teacher_active else 0.0
        self.engine.eval()
        for _ in range(iters):
            if self.pipeline:
                self.engine.eval_batch(data_iter=data_iter, return_logits=False)
            else:
                for _ in range(self.gas):
                    inputs, labels = next(data_iter)
                    self._forward_loss(inputs, labels)
        metrics = self._aggregate(self.loss_fn.pop_records(), token_weighted=True)
        lm = metrics["lm_loss"]
        metrics["perplexity"] = math.exp(min(lm, 50.0)) if lm is not None else None
        if fixed:
            if metrics["teacher_lm_loss"] is not None:
                self.teacher_valid_loss = metrics["teacher_lm_loss"]
            elif self.teacher_valid_loss is not None:
                metrics["teacher_lm_loss"] = self.teacher_valid_loss
        self.engine.train()
        return metrics


def _grad_norm(engine) -> float | None:
    try:
        norm = engine.get_global_grad_norm()
    except Exception:
        return None
    if norm is None:
        return None
    return float(norm)


def _loss_scale(engine) -> float | None:
    opt = getattr(engine, "optimizer", None)
    scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
    try:
        return float(scale) if scale is not None else None
    except (TypeError, ValueError):
        return None
