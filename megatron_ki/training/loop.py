"""The training loop: data -> (student, teacher) -> KI loss -> DeepSpeed step, evaluation, metrics, checkpoints.

One code path for every layout: with pp = 1 the loop runs the micro-batches itself (teacher beside the
engine); with pp > 1 DeepSpeed's PipelineEngine runs them (teacher inside the stages). The KI loss function
records lm/kd/teacher losses wherever the logits are (every rank at pp = 1, the last stage at pp > 1); the
loop sums those records over the world, so every rank sees the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_ki.errors import MegatronKIError
from megatron_ki.training.deepspeed_compat import (
    StageTimer,
    global_grad_norm,
    loss_scale,
    skipped_steps,
    stage_times,
)
from megatron_ki.training.metrics import peak_memory_gib

if TYPE_CHECKING:
    from megatron_ki.training.run import Run

logger = logging.getLogger("megatron_ki")


_TOTALS = ("lm", "lm_weight", "kd", "kd_weight", "teacher_lm", "teacher_lm_weight", "loss")
"""The columns of :meth:`Trainer._aggregate`'s one row per loss record, in order."""


class TrainingAborted(MegatronKIError, RuntimeError):
    """Training cannot continue (too many consecutive non-finite steps)."""


TARGET_KEYS = ("t_ids", "t_logp", "t_tail")
"""Offline teacher targets of a sample: top-K ids, their log-probabilities, the tail's log-mass."""


def model_inputs(
    sample: dict[str, torch.Tensor], causal: bool
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | tuple[torch.Tensor, ...]]:
    """A collated data sample -> ``((input_ids, attention_mask, token_type_ids), labels)``; with offline
    teacher targets, labels is ``(labels, t_ids, t_logp, t_tail)``.

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
    if "t_ids" in sample:  # offline teacher targets travel with the labels (at pp > 1: to the last stage)
        return (ids, mask, torch.zeros_like(ids)), (labels, *(sample[k] for k in TARGET_KEYS))
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


class Callback:
    """Hooks into a run, for what the loop itself should not know about (tests inject faults through them)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After every training step, before evaluation, saving and the stop decision."""

    def on_checkpoint_written(self, trainer: Trainer, tmp_dir: Path) -> None:
        """A checkpoint's files are written under ``tmp_dir`` and not yet published."""


class Trainer:
    """Trains a :class:`~megatron_ki.training.run.Run`: ``Trainer(build_run(cfg)).fit()``.

    One step: the a_t schedule sets the KI weight (and releases the teacher once it is 0), the engine runs
    forward/backward over the micro-batches (the pipeline engine at pp > 1), the loss records of every rank are
    averaged. :meth:`fit` adds logging, evaluation, checkpoints, the stop decision and the step watchdog.
    """

    def __init__(self, run: Run, callbacks: Sequence[Callback] = ()):
        cfg, groups = run.cfg, run.groups
        self.run, self.cfg, self.engine, self.groups = run, cfg, run.engine, groups
        self.loss_fn, self.schedule = run.loss_fn, run.schedule
        self.teacher, self.pipe_teacher = run.teacher, run.pipe_teacher
        self.callbacks = list(callbacks)
        self.pipeline = cfg.parallel.pipeline_parallel > 1
        self.stage_timer = (
            StageTimer(run.engine if self.pipeline else None, run.device)
            if cfg.logging.stage_timers
            else None
        )
        self.causal = cfg.model.causal
        self.micro_batches = cfg.gradient_accumulation_steps(groups.topology.world_size)
        self.state = LoopState()
        if run.resumed:
            meta = run.resumed
            self.state.step, self.state.consumed_samples = meta["step"], meta["consumed_samples"]
            self.state.flops = meta.get("flops", 0.0)
            self.state.train_time_s = meta.get("train_time_s", 0.0)
        self.tokens_per_sample = cfg.data.seq_length
        self.targets_active = cfg.ki.offline
        self.fused_head = run.fused_head and not self.pipeline
        """pp = 1: the models return their heads' inputs, and the loss runs the fused head + loss."""
        self.teacher_valid_loss: float | None = None
        """The teacher's LM loss on the fixed validation samples, kept after the teacher is released."""

    # -------------------------------------------------------------------------------- teacher
    @property
    def teacher_active(self) -> bool:
        """The KD term can be computed: a teacher runs, or offline targets are read and not yet released."""
        if self.pipe_teacher is not None:
            return self.pipe_teacher.active
        return self.teacher is not None or self.targets_active

    def release_teacher(self) -> None:
        """a_t is 0 from now on: stop running the teacher and free it (offline: stop using the targets)."""
        if self.pipe_teacher is not None and self.pipe_teacher.active:
            self.pipe_teacher.release()
        self.teacher = None
        self.targets_active = False
        logger.info("KI: alpha is 0 from step %d on; teacher released", self.state.step)

    # ----------------------------------------------------------------------------------- steps
    def _forward_loss(self, inputs: tuple[torch.Tensor, ...], labels) -> torch.Tensor:
        ids, mask, types = (t.to(self.engine.device) for t in inputs)
        if isinstance(labels, tuple | list):
            labels = tuple(t.to(self.engine.device) for t in labels)
        else:
            labels = labels.to(self.engine.device)
        typed = self.cfg.model.type_vocab_size > 0
        heads = {"head_inputs": True} if self.fused_head else {}
        logits = self.engine(ids, attention_mask=mask, token_type_ids=types if typed else None, **heads)
        if self.teacher is not None and self.teacher_active:
            with torch.no_grad():
                t_typed = self.teacher.cfg.type_vocab_size > 0
                t_types = types if t_typed else None
                t_logits = self.teacher(ids, attention_mask=mask, token_type_ids=t_types, **heads)
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
        totals = torch.zeros(len(_TOTALS), dtype=torch.float64)
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
        t = dict(zip(_TOTALS, totals.tolist(), strict=True))

        def mean(total: str, weight: str) -> float | None:
            return t[total] / t[weight] if t[weight] else None

        return {
            "lm_loss": mean("lm", "lm_weight"),
            "kd_loss": mean("kd", "kd_weight"),
            "teacher_lm_loss": mean("teacher_lm", "teacher_lm_weight"),
            "loss": mean("loss", "lm_weight"),
        }

    def train_step(self, data_iter: Iterator) -> dict[str, Any]:
        step = self.state.step
        alpha = self.schedule.alpha(step)
        if self.teacher_active and not self.schedule.teacher_needed(step):
            self.release_teacher()
        self.loss_fn.alpha = alpha if self.teacher_active else 0.0
        self.engine.train()
        skipped_before = self._skipped()
        if self.stage_timer is not None:
            self.stage_timer.pop()  # evaluations run the same pipeline instructions: count this step's only
        start = time.perf_counter()
        if self.pipeline:
            loss = self.engine.train_batch(data_iter=data_iter)
            loss_value = float(loss)
        else:
            total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
            for _ in range(self.micro_batches):
                inputs, labels = next(data_iter)
                with self._timed("ForwardPass"):
                    loss = self._forward_loss(inputs, labels)
                with self._timed("BackwardPass"):
                    self.engine.backward(loss)
                with self._timed("OptimizerStep"):
                    self.engine.step()
                total += loss.detach().double()  # no host sync per micro-batch
            loss_value = float(total) / self.micro_batches  # the step's one sync, inside the timed span
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
            grad_norm=global_grad_norm(self.engine),
            loss_scale=loss_scale(self.engine),
            skipped=skipped,
            skipped_total=self.state.skipped_total,
            consumed_samples=self.state.consumed_samples,
            consumed_tokens=self.state.consumed_samples * self.tokens_per_sample,
            step_time_s=elapsed,
            train_time_s=self.state.train_time_s,
            tokens_per_s=tokens / elapsed if elapsed > 0 else None,
            **peak_memory_gib(self.engine.device),
        )
        if self.stage_timer is not None:
            metrics.update(stage_times(self.stage_timer.pop(), self.groups.pp_rank, self.groups.topology.pp))
        return metrics

    def _timed(self, name: str):
        """``logging.stage_timers`` at pp = 1: the span counts as ``name``."""
        return contextlib.nullcontext() if self.stage_timer is None else self.stage_timer.timed(name)

    def _skipped(self) -> int:
        """Steps skipped so far: by DeepSpeed (fp16/bf16 overflow) or by the framework's guarded optimizer."""
        return skipped_steps(self.engine)

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
                for _ in range(self.micro_batches):
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

    # ------------------------------------------------------------------------------------------- fit
    def fit(self, started: float | None = None) -> int:
        """Train to ``train.train_steps`` or until a stop request; returns the exit code: 0, or 75 when a
        signal, ``exit_duration_mins`` (counted from ``started``, a ``time.monotonic()``) or ``exit_interval``
        stopped the run after saving."""
        from megatron_ki.training.metrics import MetricsWriter, ProgressBar
        from megatron_ki.training.resilience import StopRequest

        cfg, train, state = self.cfg, self.cfg.train, self.state
        rank0 = self.groups.rank == 0
        self._started = time.perf_counter()
        self._writer = MetricsWriter(cfg.logging.run_dir, cfg.logging.tensorboard, enabled=rank0)
        self._bar = ProgressBar(
            train.train_steps, enabled=rank0 and cfg.logging.progress_bar, initial=state.step
        )
        self._saved_at = state.step if self.run.resumed else None
        stop = StopRequest(train.exit_signal_handler, train.exit_duration_mins, started=started)
        stop.install()
        try:
            if train.eval_at_start and self.run.data.valid is not None and not self.run.resumed:
                self._evaluate("valid")
            while state.step < train.train_steps:
                self._progress("training")
                teacher_ran = self.teacher_active
                self._log_step(self.train_step(self.run.data.train), teacher_ran)
                step = state.step
                for callback in self.callbacks:
                    callback.on_step_end(self, self._last_metrics)
                if (
                    self.run.data.valid is not None
                    and train.eval_interval
                    and step % train.eval_interval == 0
                ):
                    self._evaluate("valid")
                if (
                    cfg.checkpoint.save
                    and cfg.checkpoint.save_interval
                    and step % cfg.checkpoint.save_interval == 0
                ):
                    self.save()
                reason = stop.agreed(self.run.device)
                if reason is None and train.exit_interval and step % train.exit_interval == 0:
                    reason = f"train.exit_interval ({train.exit_interval}) reached"
                if reason is not None and step < train.train_steps:
                    return self._stop_early(reason)
            self._finish()
        finally:
            if self.run.watchdog is not None:
                self.run.watchdog.stop()
            stop.uninstall()
        return 0

    def _progress(self, phase: str) -> None:
        if self.run.watchdog is not None:
            self.run.watchdog.progress(self.state.step, phase)

    def _log_step(self, metrics: dict[str, Any], teacher_ran: bool) -> None:
        """Count the step's FLOPs (the teacher's while it ran), log every log_interval steps."""
        from megatron_ki.training.flops import device_peak_flops, mfu, training_flops_per_token

        cfg, step = self.cfg, self.state.step
        teacher_cfg = self.run.teacher_cfg if teacher_ran else None
        per_token = training_flops_per_token(cfg.model, cfg.data.seq_length, teacher_cfg)
        self.state.flops += per_token * cfg.train.global_batch_size * cfg.data.seq_length
        peak = device_peak_flops(cfg.train.precision, self.run.device)
        world = self.groups.topology.world_size
        metrics.update(
            flops_per_token=per_token,
            flops=self.state.flops,
            mfu=mfu(metrics["tokens_per_s"], per_token, peak, world) if metrics["tokens_per_s"] else None,
            elapsed_s=time.perf_counter() - self._started,
        )
        if step % cfg.logging.log_interval == 0 or step == cfg.train.train_steps:
            self._writer.log(step, metrics)
        self._bar.update(step, metrics["loss"], metrics["alpha"], metrics["tokens_per_s"])
        self._last_metrics = metrics

    def _evaluate(self, split: str) -> dict[str, float | None]:
        """One evaluation, logged with where the run stands (tokens, FLOPs, seconds)."""
        self._progress("evaluation")
        data = self.run.data.valid if split == "valid" else self.run.data.test
        fixed = self.cfg.train.eval_samples == "fixed" and split == "valid"
        result = self.evaluate(data(), self.cfg.train.eval_iters, fixed=fixed)
        record = {
            "split": split,
            "consumed_tokens": self.state.consumed_samples * self.tokens_per_sample,
            "flops": self.state.flops,
            "train_time_s": self.state.train_time_s,
            "elapsed_s": time.perf_counter() - self._started,
            **result,
        }
        self._writer.log(self.state.step, record)
        return result

    def save(self) -> None:
        from megatron_ki.training import checkpoint as ckpt

        self._progress("saving a checkpoint")
        state = self.state
        ckpt.save_checkpoint(
            self.engine,
            self.cfg,
            self.groups,
            state.step,
            state.consumed_samples,
            extra_meta={
                "flops": state.flops,
                "train_time_s": state.train_time_s,
                "eod_token_id": self.run.eod_token_id,
                "tokenizer_fingerprint": self.run.tokenizer_fingerprint,
            },
            tp_tracker=self.run.tracker,
            on_written=self._checkpoint_written,
        )
        self._saved_at = state.step

    def _checkpoint_written(self, tmp_dir: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint_written(self, tmp_dir)

    def _finish(self) -> None:
        """The last save and evaluations, then every rank leaves together."""
        cfg, train, step = self.cfg, self.cfg.train, self.state.step
        self._bar.close()
        if cfg.checkpoint.save and self._saved_at != step:
            self.save()
        if self.run.data.valid is not None and (not train.eval_interval or step % train.eval_interval):
            self._evaluate("valid")
        if self.run.data.test is not None:
            final = self._evaluate("test")
            logger.info("test: %s", {k: v for k, v in final.items() if v is not None})
        self._writer.close()
        self._progress("the final barrier")
        if dist.is_initialized():
            dist.barrier()

    def _stop_early(self, reason: str) -> int:
        """Save (unless this step is saved already) and return the requeue exit code."""
        from megatron_ki.errors import EXIT_REQUEUE

        step, save_dir = self.state.step, self.cfg.checkpoint.save
        self._bar.close()
        if save_dir and self._saved_at != step:
            logger.info(
                "%s: saving a checkpoint at step %d, then exiting with code %d", reason, step, EXIT_REQUEUE
            )
            self.save()
        elif save_dir:
            logger.info("%s: step %d is saved; exiting with code %d", reason, step, EXIT_REQUEUE)
        else:
            logger.info(
                "%s: exiting at step %d with code %d WITHOUT a checkpoint (checkpoint.save is not set)",
                reason,
                step,
                EXIT_REQUEUE,
            )
        self._writer.close()
        if dist.is_initialized():
            dist.barrier()
        return EXIT_REQUEUE
