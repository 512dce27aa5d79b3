"""Offline teacher targets: run a frozen teacher over every sequence of a dataset and write its top-K.

The engine behind ``tools/precompute_teacher.py`` (which loads the teacher and the process groups); the file
format is :mod:`megatron_ki.data.teacher_targets`.

- Windows. A sequence longer than the window ``W`` (the teacher's ``max_position_embeddings`` or less) is
  run in overlapping windows of ``W`` tokens starting every ``S = W // 2`` tokens; the first window keeps all
  its rows, every later one only the rows past the previous window's end (its last ``S`` positions), so every
  row but those of the first window sees at least ``W - S`` tokens of context. Positions restart at 0 in each
  window (the teacher sees each window as a sequence of its own).
- Chunks. Windows are numbered in dataset order and cut into chunks of about ``chunk_tokens`` rows (a window
  belongs to chunk ``floor(rows before it / chunk_tokens)``), so a chunk's rows are one contiguous range.
  Inside a chunk, windows are sorted by length (longest first, then position) and packed into micro-batches
  of at most ``batch_tokens`` padded tokens. Both depend only on the dataset and these two numbers, never on
  the rank or the data-parallel size: a chunk's rows are the same bytes wherever it is computed (on the same
  hardware and thread count). Right padding never reaches a real row (causal attention).
- Masked-LM teachers (BERT, RoBERTa). The static mask of ``data/static_mask.py`` (keyed by the tokens'
  global positions, as the student's MLM dataset applies it with ``data.mask_seed``) is applied to each window,
  which the teacher sees as ``[cls] window [sep]`` (so ``W`` is 2 less than its positions), right-padded with an
  attention mask. Rows exist only at the positions the mask selects: a chunk's rows are the selected positions
  of its range, in order, starting at the count of selected positions before it (``Plan.stored``, one pass over
  the tokens). Only the selected rows are reduced to a top-K.
- Ranks. Data-parallel groups take the chunks left to do in turn; the tensor-parallel ranks of a group hold
  the teacher's shards: each finds the top-K of its vocabulary slice, the slices' candidates are all-gathered
  and the global top-K chosen (ties: lower id first), and the log-sum-exp and the tail mass are all-reduced
  over the group. Tensor-parallel results equal tp = 1 to float rounding (the row-parallel sums run in
  another order), not byte for byte.
- Stages. At pp > 1 each stage holds its share of the teacher's layers (``models/stage.py``): the first runs
  the embedding, every stage its blocks, and the hidden state of each micro-batch goes to the same tensor
  rank of the next stage by point-to-point sends (:class:`StageLinks`; the shape follows from the
  micro-batch, which every stage plans alike, so no shape message is sent). Only the last stage computes
  logits and top-K; its tensor rank 0 writes. The operations and their order are those of pp = 1, so rows
  equal pp = 1 to float rounding (byte for byte on the same hardware and thread count).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from megatron_ki.config import ModelConfig
from megatron_ki.data.indexed import IndexedDataset
from megatron_ki.data.static_mask import StaticMasking, iter_masked_positions
from megatron_ki.data.teacher_targets import (
    FORMAT,
    VERSION,
    TargetsWriter,
    TeacherTargetsError,
    config_sha256,
    id_bytes_for,
    row_bytes,
    token_base,
    value_encoding_doc,
)
from megatron_ki.parallel import ParallelGroups

logger = logging.getLogger("megatron_ki")
WINDOW_POLICY = "overlap-half"
ROW_BLOCK = 4096
"""Rows whose top-K is taken at once: bounds the float32 copies of a ``[rows, vocab / tp]`` block."""


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Windows of every sequence and their chunks: ``seq``, ``start``, ``end``, ``keep`` (offsets within the
    sequence; rows ``[keep, end)`` are this window's), ``base`` (global token index of each sequence's first
    token) and ``chunks`` (``(first window, end window)`` per chunk)."""

    window: int
    stride: int
    seq: np.ndarray
    start: np.ndarray
    end: np.ndarray
    keep: np.ndarray
    base: np.ndarray
    chunks: list[tuple[int, int]] = field(default_factory=list)
    stored: np.ndarray | None = None
    """Masked-LM: the first stored row of each chunk (and the total at the end); None: one row per token."""

    def rows_of(self, chunk: int) -> tuple[int, int]:
        """The global token positions ``[lo, hi)`` chunk ``chunk`` covers."""
        lo, hi = self.chunks[chunk]
        first, last = self.seq[lo], self.seq[hi - 1]
        return int(self.base[first] + self.keep[lo]), int(self.base[last] + self.end[hi - 1])

    def stored_rows(self, chunk: int) -> tuple[int, int]:
        """The rows ``[lo, hi)`` of the targets file chunk ``chunk`` writes."""
        if self.stored is None:
            return self.rows_of(chunk)
        return int(self.stored[chunk]), int(self.stored[chunk + 1])


def plan_windows(sizes: np.ndarray, window: int) -> tuple[np.ndarray, ...]:
    """``(seq, start, end, keep)`` of every window (see the module docstring), in dataset order."""
    if window < 2:
        raise TeacherTargetsError(f"--window {window}: must be at least 2")
    stride = window // 2
    lengths = np.asarray(sizes, dtype=np.int64)
    extra = np.maximum(lengths - window, 0)
    count = np.where(lengths == 0, 0, 1 + (extra + stride - 1) // stride)
    seq = np.repeat(np.arange(len(lengths), dtype=np.int64), count)
    j = np.arange(len(seq), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    start = j * stride
    end = np.minimum(start + window, lengths[seq])
    keep = np.where(j == 0, 0, start + window - stride)
    return seq, start, end, keep


def make_plan(dataset: IndexedDataset, window: int, chunk_tokens: int) -> Plan:
    """The windows and chunks of ``dataset`` (a function of its sequence lengths and the two sizes only)."""
    if chunk_tokens < 1:
        raise TeacherTargetsError(f"--chunk-tokens {chunk_tokens}: must be positive")
    seq, start, end, keep = plan_windows(np.asarray(dataset.sizes), window)
    base = token_base(dataset)
    kept = end - keep
    chunk_of = (np.cumsum(kept) - kept) // chunk_tokens
    _, firsts = np.unique(chunk_of, return_index=True)
    bounds = [*firsts.tolist(), len(seq)]
    chunks = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    return Plan(window, window // 2, seq, start, end, keep, base, chunks)


def count_stored_rows(
    plan: Plan, dataset: IndexedDataset, masking: StaticMasking, special: np.ndarray
) -> None:
    """Set ``plan.stored``: the selected positions before each chunk (chunks are ascending position ranges)."""
    bounds = np.asarray([plan.rows_of(c)[0] for c in range(len(plan.chunks))], dtype=np.int64)
    counts = np.zeros(len(plan.chunks), dtype=np.int64)
    for positions in iter_masked_positions(dataset, masking, special):
        counts += np.bincount(np.searchsorted(bounds, positions, side="right") - 1, minlength=len(counts))
    plan.stored = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def micro_batches(plan: Plan, chunk: int, batch_tokens: int) -> list[list[int]]:
    """Window indices of each micro-batch of ``chunk``: longest first, at most ``batch_tokens`` padded tokens."""
    lo, hi = plan.chunks[chunk]
    idx = np.arange(lo, hi)
    lengths = plan.end[lo:hi] - plan.start[lo:hi]
    order = idx[np.lexsort((idx, -lengths))]
    batches: list[list[int]] = []
    padded = 0  # length of the current batch's first (longest) window
    for w in order.tolist():
        if batches and (len(batches[-1]) + 1) * padded <= batch_tokens:
            batches[-1].append(w)
        else:
            batches.append([w])
            padded = int(plan.end[w] - plan.start[w])
    return batches


# ------------------------------------------------------------------------------------------ top-K
def sort_desc_lower_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending, equal values by id ascending (the tie rule of the targets)."""
    order = torch.argsort(ids, dim=-1, stable=True)
    values, ids = values.gather(-1, order), ids.gather(-1, order)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), ids.gather(-1, order)


def local_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, V)`` largest of each row of ``z [n, V]`` with their column ids, lower id first on ties
    (also at the boundary: a row whose k-th and (k+1)-th values tie is sorted in full)."""
    vocab = z.shape[-1]
    kk = min(k, vocab)
    values, ids = torch.topk(z, min(kk + 1, vocab), dim=-1)
    tie = (
        values[:, kk - 1] == values[:, kk]
        if kk < vocab
        else torch.zeros(len(z), dtype=torch.bool, device=z.device)
    )
    values, ids = sort_desc_lower_id(values[:, :kk], ids[:, :kk])
    rows = tie.nonzero().flatten()
    if len(rows):
        full = torch.sort(z[rows], dim=-1, descending=True, stable=True)
        values[rows], ids[rows] = full.values[:, :kk], full.indices[:, :kk]
    return values, ids


def _all_gather_last(t: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def vocab_parallel_topk(
    z: torch.Tensor, k: int, group: ProcessGroup | None, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K of the full-vocabulary softmax of ``z`` (``[n, V/tp]`` float32 logits already divided by the
    temperature; this rank holds ids ``vocab_start ..``): ``(ids int64 [n, K], logp [n, K], tail [n])``,
    tail = log of the probability mass outside the K ids (-inf when there is none)."""
    values, ids = local_topk(z, k)
    values, ids = sort_desc_lower_id(
        _all_gather_last(values, group), _all_gather_last(ids + vocab_start, group)
    )
    values, ids = values[:, :k], ids[:, :k]
    m = z.max(dim=-1).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(z - m[:, None])
    local = ids - vocab_start
    own = (local >= 0) & (local < z.shape[-1])
    rest = torch.cat([e, torch.zeros(len(e), 1, dtype=e.dtype, device=e.device)], dim=-1)
    rest.scatter_(-1, torch.where(own, local, z.shape[-1]), 0.0)
    sums = torch.stack([e.sum(-1), rest[:, :-1].sum(-1)])
    if group is not None:
        dist.all_reduce(sums, group=group)
    lse = m + torch.log(sums[0])
    return ids, values - lse[:, None], torch.log(sums[1]) + m - lse


# ---------------------------------------------------------------------------------------- the stages
SEND_DEPTH = 2
"""Hidden states a stage may have in flight to the next one: it runs ahead by this many micro-batches."""


@dataclass
class StageLinks:
    """This rank's neighbours in the teacher's pipeline (global ranks; ``None`` at the first / last stage)
    and the hidden state they exchange (``[batch, seq, hidden_size]`` in ``dtype``)."""

    prev: int | None = None
    next: int | None = None
    hidden_size: int = 0
    dtype: torch.dtype = torch.float32
    pending: list[tuple[Any, torch.Tensor]] = field(default_factory=list)

    @property
    def is_last(self) -> bool:
        return self.next is None

    def recv(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """The previous stage's hidden state of the next micro-batch (sent in micro-batch order)."""
        hidden = torch.empty(batch, seq, self.hidden_size, dtype=self.dtype, device=device)
        dist.recv(hidden, src=self.prev)
        return hidden

    def send(self, hidden: torch.Tensor) -> None:
        """Start sending to the next stage; wait for the oldest send beyond :data:`SEND_DEPTH`."""
        hidden = hidden.contiguous()
        self.pending.append((dist.isend(hidden, dst=self.next), hidden))
        while len(self.pending) > SEND_DEPTH:
            self.pending.pop(0)[0].wait()

    def flush(self) -> None:
        """Wait for every send in flight (their buffers are then free)."""
        while self.pending:
            self.pending.pop(0)[0].wait()


# ---------------------------------------------------------------------------------------- the forward
@dataclass
class MaskedInputs:
    """How a masked-LM teacher's input is made: the static mask and the tokenizer's special ids."""

    masking: StaticMasking
    special: np.ndarray
    cls: int
    sep: int
    pad: int
    mask_id: int
    random_ids: np.ndarray


@dataclass
class Batch:
    """A micro-batch's padded input ids, attention mask (masked-LM) and selected positions per window."""

    ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    selected: list[np.ndarray] | None = None


Rows = tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]
"""``(positions or None, ids [n, K], logp [n, K], tail [n])`` of a chunk's stored rows, in row order."""


@dataclass
class Engine:
    """Computes chunks of a :class:`Plan` with ``model`` (this rank's shard of the teacher); ``masked`` given,
    a masked-LM teacher."""

    model: nn.Module
    dataset: IndexedDataset
    plan: Plan
    k: int
    temperature: float
    batch_tokens: int
    tp_group: ProcessGroup | None = None
    vocab_start: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stages: StageLinks = field(default_factory=StageLinks)
    masked: MaskedInputs | None = None

    def tokens(self, w: int) -> np.ndarray:
        p = self.plan
        return self.dataset.get(int(p.seq[w]), int(p.start[w]), int(p.end[w] - p.start[w]))

    def positions(self, w: int) -> np.ndarray:
        """Global positions of window ``w``'s tokens."""
        p = self.plan
        first = int(p.base[p.seq[w]] + p.start[w])
        return np.arange(first, first + int(p.end[w] - p.start[w]), dtype=np.int64)

    @torch.no_grad()
    def chunk(self, chunk: int) -> Rows | None:
        """The stored rows of ``chunk``; ``None`` on a stage before the last (it sends its hidden states on)."""
        p = self.plan
        if not self.stages.is_last:
            for batch in micro_batches(p, chunk, self.batch_tokens):
                self.stages.send(self._stage_forward(self._inputs(batch)))
            self.stages.flush()
            return None
        parts = []
        for batch in micro_batches(p, chunk, self.batch_tokens):
            z, rows = self._forward(batch)
            for b in range(0, len(z), ROW_BLOCK):
                out = vocab_parallel_topk(z[b : b + ROW_BLOCK], self.k, self.tp_group, self.vocab_start)
                parts.append((rows[b : b + ROW_BLOCK], *(t.cpu().numpy() for t in out)))
        lo, hi = p.stored_rows(chunk)
        if not parts:  # a masked-LM chunk may select no position
            parts = [(np.zeros(0, np.int64), np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32),
                      np.zeros(0, np.float32))]  # fmt: skip
        positions, ids, logp, tail = (np.concatenate([x[i] for x in parts]) for i in range(4))
        if len(positions) != hi - lo:
            raise RuntimeError(
                f"precompute: chunk {chunk} gave {len(positions)} rows, the plan expects {hi - lo}"
            )
        order = np.argsort(positions, kind="stable")
        return (positions[order] if self.masked else None), ids[order], logp[order], tail[order]

    def _inputs(self, batch: list[int]) -> Batch:
        """The right-padded inputs of ``batch`` (every stage knows the shape)."""
        if self.masked is not None:
            return self._masked_inputs(batch)
        p = self.plan
        longest = max(int(p.end[w] - p.start[w]) for w in batch)
        inputs = np.zeros((len(batch), longest), np.int64)
        for i, w in enumerate(batch):
            t = self.tokens(w)
            inputs[i, : len(t)] = t
        return Batch(torch.from_numpy(inputs).to(self.device))

    def _masked_inputs(self, batch: list[int]) -> Batch:
        """``[cls] window [sep]`` with the static mask applied, padded; the selected offsets of each window."""
        m, p = self.masked, self.plan
        longest = max(int(p.end[w] - p.start[w]) for w in batch) + 2
        inputs = np.full((len(batch), longest), m.pad, np.int64)
        attention = np.zeros((len(batch), longest), np.int64)
        selected = []
        for i, w in enumerate(batch):
            t = self.tokens(w).astype(np.int64)
            masked, labels = m.masking.apply(t, self.positions(w), m.special, m.mask_id, m.random_ids)
            inputs[i, : len(t) + 2] = [m.cls, *masked.tolist(), m.sep]
            attention[i, : len(t) + 2] = 1
            selected.append(np.flatnonzero(labels >= 0))
        return Batch(
            torch.from_numpy(inputs).to(self.device), torch.from_numpy(attention).to(self.device), selected
        )

    def _stage_forward(self, batch: Batch) -> torch.Tensor:
        """This stage's output: from the ids on the first stage, else from the previous stage's hidden."""
        if self.stages.prev is None:
            return self.model(input_ids=batch.ids, attention_mask=batch.attention_mask)
        hidden = self.stages.recv(*batch.ids.shape, self.device)
        return self.model(hidden_states=hidden, attention_mask=batch.attention_mask)

    def _forward(self, windows: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """Logits / temperature of the stored rows of ``windows`` (float32 ``[rows, V/tp]``) and their global
        positions: every kept row (causal), the selected kept rows (masked-LM: the logits one on, past cls)."""
        p = self.plan
        batch = self._inputs(windows)
        logits = self._stage_forward(batch)
        parts, rows = [], []
        for i, w in enumerate(windows):
            lo, hi = int(p.keep[w] - p.start[w]), int(p.end[w] - p.start[w])
            offsets = np.arange(lo, hi)
            if batch.selected is not None:
                offsets = batch.selected[i][batch.selected[i] >= lo]
                parts.append(logits[i, torch.from_numpy(offsets + 1).to(logits.device)])
            else:
                parts.append(logits[i, lo:hi])
            rows.append(self.positions(w)[offsets])
        z = torch.cat(parts).float() / self.temperature  # stays on the device: NCCL gathers device tensors
        return z, np.concatenate(rows)


def todo_chunks(writer: TargetsWriter, num_chunks: int) -> list[int]:
    """Chunks not yet recorded as done, as global rank 0 sees them (every rank gets the same list)."""
    leader = not dist.is_initialized() or dist.get_rank() == 0
    todo = [sorted(set(range(num_chunks)) - writer.done_chunks()) if leader else None]
    if dist.is_initialized():
        dist.broadcast_object_list(todo, src=0)
    return todo[0]


def run_chunks(
    engine: Engine,
    writer: TargetsWriter,
    groups: ParallelGroups,
    on_chunk_written: Callable[[int], None] | None = None,
) -> int:
    """Compute this data-parallel group's share of the chunks left, write them (the last stage's tensor rank
    0) and record them. ``on_chunk_written(chunk)`` runs between the write and the record (fault injection in tests).
    Returns how many chunks this rank computed."""
    todo = todo_chunks(writer, len(engine.plan.chunks))
    mine = todo[groups.dp_rank :: groups.topology.dp]
    started, done = time.monotonic(), 0
    for chunk in mine:
        rows = engine.chunk(chunk)
        if rows is not None and groups.tp_rank == 0:
            positions, ids, logp, tail = rows
            lo, hi = engine.plan.stored_rows(chunk)
            writer.write_rows(lo, ids, logp, tail, positions)
            if on_chunk_written is not None:
                on_chunk_written(chunk)
            writer.mark_done(chunk, (lo, hi))
        done += 1
        if groups.rank == 0 and (done % 50 == 0 or done == len(mine)):
            rate = sum(engine.plan.rows_of(c)[1] - engine.plan.rows_of(c)[0] for c in mine[:done])
            logger.info(
                "precompute: %d/%d chunks on rank 0 (%d left in all at start), %.0f tokens/s",
                done, len(mine), len(todo), rate / max(time.monotonic() - started, 1e-9),
            )  # fmt: skip
    writer.close()
    return done


# -------------------------------------------------------------------------------------------- header
ALIGNMENT_CAUSAL = (
    "row r: the teacher's next-token distribution after global token r of the dataset's .bin, with the context "
    "of that token's own sequence only"
)
ALIGNMENT_MASKED = (
    "row r: the teacher's distribution over the token at global position PATH.pos[r] of the dataset's .bin, "
    "given its own sequence (window) with the static mask applied, as [cls] window [sep]"
)


def targets_header(
    *,
    teacher_path: str,
    teacher_cfg: ModelConfig,
    teacher_rows: int,
    dataset: dict[str, Any],
    tokenizer: dict[str, Any],
    k: int,
    temperature: float,
    values: str,
    plan: Plan,
    chunk_tokens: int,
    batch_tokens: int,
    masking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``.idx`` header of a precompute (no time stamps or host names: reruns give identical bytes);
    ``masking`` (a masked-LM teacher's static mask) makes the rows those of the masked positions."""
    vocab = teacher_cfg.vocab_size
    if not 0 < k <= vocab:
        raise TeacherTargetsError(f"--top-k {k}: must be in [1, {vocab}] (the teacher's vocabulary)")
    config = teacher_cfg.to_dict() if hasattr(teacher_cfg, "to_dict") else dict(vars(teacher_cfg))
    width = id_bytes_for(vocab)
    rows = int(dataset["num_tokens"]) if masking is None else int(plan.stored[-1])
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_rows": rows,
        "masking": masking,
        "k": k,
        "temperature": float(temperature),
        "values": values,
        "value_encoding": value_encoding_doc(values),
        "id_bytes": width,
        "row_bytes": row_bytes(k, width, values),
        "vocab_size": vocab,
        "teacher": {
            "path": teacher_path,
            "family": teacher_cfg.family,
            "vocab_size": teacher_rows,
            "config": config,
            "config_sha256": config_sha256(config),
        },
        "tokenizer": tokenizer,
        "dataset": dataset,
        "window": {
            "policy": WINDOW_POLICY,
            "size": plan.window,
            "stride": plan.stride,
            "description": "windows of `size` tokens every `stride` tokens; the first keeps all its rows, later "
            "ones the rows past the previous window's end; positions restart at 0 in each window",
        },
        "chunking": {
            "chunk_tokens": chunk_tokens,
            "batch_tokens": batch_tokens,
            "num_chunks": len(plan.chunks),
        },
        "alignment": ALIGNMENT_CAUSAL if masking is None else ALIGNMENT_MASKED,
    }
