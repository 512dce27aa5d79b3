#!/usr/bin/env python
"""Precompute a frozen teacher's top-K next-token targets for every token of a preprocessed dataset.

Run it under the launcher like a training run (the run config supplies the teacher, the data, the tokenizer
and the tensor-parallel size; the options below are this tool's own)::

    ENTRY=tools/precompute_teacher.py CONFIG=run.yaml CPU_RANKS=4 bash launch/pretrain_ki.sh \\
        --output targets/books_k32 --top-k 32 [--values fp16|int8] [--temperature 2.0] [--window 1024] \\
        [--parallel.tensor_parallel 2] [--parallel.pipeline_parallel 2] [--ki.teacher_path hf:/models/llama] \\
        [--data.data_path PREFIX]

or without the launcher on one process: ``python tools/precompute_teacher.py --config run.yaml --output ...``.

- Teacher: ``ki.teacher_path``: a framework checkpoint saved at any tp/pp, or ``hf:/dir``; run in
  ``ki.teacher_dtype``, sharded over ``parallel.tensor_parallel`` ranks and split over
  ``parallel.pipeline_parallel`` stages (each builds and reads only its layers: embedding on the first,
  final norm and head on the last); the other ranks split the work (data parallel).
- Data: ``data.data_path`` names one prefix. For a blend, run the tool once per prefix (targets follow a
  dataset's tokens, so the blend's weights and split do not matter).
- Masked-LM teachers (BERT, RoBERTa) need a static mask: ``data.mask_seed`` (with ``data.mask_prob``) keys
  each token's mask on its position in the .bin, so the teacher here and a student trained with the same
  ``data.mask_seed`` see the same masked tokens (``megatron_ki/data/static_mask.py``); rows are written at the
  masked positions only. ``--window`` then counts the teacher's ``[cls]`` and ``[sep]``.
- Temperature: ``--temperature`` or ``ki.temperature``. Output: ``OUTPUT.idx`` (JSON header) and ``OUTPUT.bin``
  (rows), format in ``megatron_ki/data/teacher_targets.py``, windows and chunks in ``megatron_ki/ki/precompute.py``.
- Resumable: a killed run rerun with the same options computes only the chunks not yet recorded and gives the
  same files; the pair appears (by renames) only when complete. Rerunning a finished precompute does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.config import Config, ConfigError, ModelConfig, check_split, parse_args, parse_data_path
from megatron_ki.errors import add_debug_argument, debug_requested, exit_code_for, run_main

PROG = "precompute_teacher.py"
logger = logging.getLogger("megatron_ki")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description=__doc__.splitlines()[0],
        epilog="Other arguments: [--config FILE ...] [--group.key VALUE ...] as for pretrain_ki.py.",
    )
    p.add_argument("--output", required=True, help="targets path: writes OUTPUT.idx and OUTPUT.bin")
    p.add_argument("--top-k", type=int, default=32, help="log-probabilities kept per token [32]")
    p.add_argument("--values", choices=("fp16", "int8"), default="fp16", help="value encoding [fp16]")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature [ki.temperature]")
    p.add_argument("--window", type=int, default=None, help="teacher context [max_position_embeddings]")
    p.add_argument("--chunk-tokens", type=int, default=65536, help="rows per unit of work and resume [65536]")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per teacher forward [8192]")
    p.add_argument("--overwrite", action="store_true", help="replace existing or unfinished targets")
    add_debug_argument(p)
    return p


@dataclasses.dataclass
class Settings:
    args: argparse.Namespace
    cfg: Config
    prefix: str
    teacher_path: str
    teacher: ModelConfig
    teacher_rows: int
    tokenizer: dict
    temperature: float
    window: int
    tok: Any = None
    """The data's tokenizer (None with tokenizer type none)."""


def check_options(args: argparse.Namespace) -> None:
    for name in ("top_k", "chunk_tokens", "batch_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be positive, got {getattr(args, name)}")
    if args.temperature is not None and not args.temperature > 0:
        raise ConfigError("--temperature", f"must be positive, got {args.temperature}")
    if args.window is not None and args.window < 2:
        raise ConfigError("--window", f"must be at least 2, got {args.window}")


def tokenizer_of(cfg: Config, teacher_vocab: int) -> tuple[dict, Any]:
    """``(what the header records of the data's tokenizer, the tokenizer)``; without one (type none) the
    teacher's vocabulary and None."""
    if cfg.data.tokenizer_type in (None, "none"):
        return {"type": None, "model": None, "vocab_size": teacher_vocab}, None
    from megatron_ki.data import build_tokenizer

    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, option="data.tokenizer_model")
    from megatron_ki.data.tokenizer_identity import FIELD, fingerprint

    model = os.path.abspath(cfg.data.tokenizer_model) if cfg.data.tokenizer_model else None
    record = {"type": cfg.data.tokenizer_type, "model": model, "vocab_size": int(tok.vocab_size)}
    return {**record, FIELD: fingerprint(tok)}, tok  # the run reading the targets checks its own against it


def resolve(argv: list[str]) -> Settings:
    """Options and config -> what to run; every refusal is one line naming the option or file."""
    from megatron_ki.training.run import (
        check_teacher_eod,
        check_tokenizer_identity,
        data_eod,
        teacher_config_of,
        teacher_eos_ids,
    )

    args, rest = build_parser().parse_known_args(argv)
    check_options(args)
    cfg = parse_args(rest)
    path = cfg.ki.teacher_path
    if not path:
        raise ConfigError("ki.teacher_path", "is required: the teacher (a framework checkpoint or hf:/dir)")
    if not cfg.data.data_path:
        raise ConfigError("data.data_path", "is required: the preprocessed dataset prefix")
    _, prefixes = parse_data_path(cfg.data.data_path)
    if len(prefixes) != 1:
        raise ConfigError(
            "data.data_path",
            f"names {len(prefixes)} datasets; run the tool once per prefix (--data.data_path P)",
        )
    teacher = teacher_config_of(path, cfg.model.make_vocab_size_divisible_by)
    if not teacher.causal:
        check_masked_teacher(cfg, teacher, path)
    tokenizer, tok = tokenizer_of(cfg, teacher.vocab_size)
    rows, vocab = teacher.vocab_size, tokenizer["vocab_size"]
    if rows < vocab:
        raise ConfigError(
            "ki.teacher_path", f"{path} has {rows} embedding rows, fewer than the tokenizer's {vocab} tokens"
        )
    teacher = dataclasses.replace(teacher, vocab_size=vocab)  # extra rows (Qwen) are never predicted
    check_split(teacher, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, prefix="teacher")
    eod = data_eod(cfg)
    if eod is not None:
        check_teacher_eod(path, teacher_eos_ids(path), *eod)
    rank = int(os.environ.get("RANK", "0"))
    identity = check_tokenizer_identity(cfg, tok, rank, teacher_path=path)  # data, teacher, tokenizer agree
    if tok is None and identity is not None:  # no tokenizer given: the targets record the data's
        tokenizer = {**tokenizer, "tokenizer_fingerprint": identity}
    temperature = cfg.ki.temperature if args.temperature is None else args.temperature
    window = min(args.window or teacher.max_position_embeddings, teacher.max_position_embeddings)
    if not teacher.causal:  # room for [cls] and [sep]
        if window < 4:
            raise ConfigError("--window", f"{window}: a masked-LM teacher needs at least 4 ([cls] x x [sep])")
        window -= 2
    return Settings(args, cfg, prefixes[0], path, teacher, rows, tokenizer, temperature, window, tok)


def check_masked_teacher(cfg: Config, teacher: ModelConfig, path: str) -> None:
    """A masked-LM teacher needs the static mask (``data.mask_seed``) and a tokenizer with its special tokens."""
    if cfg.data.mask_seed is None:
        raise ConfigError(
            "data.mask_seed",
            f"is required for the {teacher.family} (masked LM) teacher {path}: its targets are computed on "
            "masked input, so the mask must be static (keyed by each token's position) and the student must "
            "train with the same data.mask_seed and data.mask_prob",
        )
    if cfg.data.tokenizer_type in (None, "none"):
        raise ConfigError(
            "data.tokenizer_type",
            f"is required for the masked-LM teacher {path} (its [cls] [sep] [mask] ids)",
        )


def masked_inputs(s: Settings):
    """The static mask and special ids of a masked-LM teacher's input (None for a causal teacher)."""
    import numpy as np

    from megatron_ki.data.mlm_dataset import special_mask
    from megatron_ki.data.static_mask import StaticMasking
    from megatron_ki.ki.precompute import MaskedInputs

    if s.teacher.causal:
        return None
    tok = s.tok
    for attr in ("cls", "sep", "pad", "mask"):
        if getattr(tok, attr, None) is None:
            raise ConfigError("data.tokenizer_model", f"{s.cfg.data.tokenizer_model} has no {attr} token")
    special = special_mask(tok)
    masking = StaticMasking(s.cfg.data.mask_seed, s.cfg.data.mask_prob)
    return MaskedInputs(masking, special, tok.cls, tok.sep, tok.pad, tok.mask, np.flatnonzero(~special))


def teacher_source(s: Settings) -> tuple[ModelConfig, Mapping]:
    """``(saved config, whole-model state read tensor by tensor)``: a framework checkpoint at any tp/pp
    (a pp > 1 one reads one pipeline layer's files at a time, a pp = 1 one is memory-mapped) or ``hf:``."""
    from megatron_ki.convert.hf import LazyState, open_hf_model
    from megatron_ki.convert.reshard import LazyFullState

    if not s.teacher_path.startswith("hf:"):
        full = LazyFullState(s.teacher_path)
        return full.cfg, LazyState(list(full), full.__getitem__)  # a name test that reads nothing
    from megatron_ki.convert.tokenizer import check_teacher_tokenizer

    source = s.teacher_path[len("hf:") :]
    if s.tokenizer["type"] is not None:
        check_teacher_tokenizer(
            s.cfg.data.tokenizer_type, s.cfg.data.tokenizer_model, source, teacher_rows=s.teacher_rows
        )
    return open_hf_model(
        source, s.cfg.model.make_vocab_size_divisible_by, hidden_dropout=0.0, attention_dropout=0.0
    )


def load_teacher(s: Settings, groups, device):
    """This rank's pipeline stage of the frozen teacher, its tensor-parallel shard: only the stage's modules
    are built and only their tensors read from the teacher's files."""
    from megatron_ki.convert.reshard import shard_state_dict
    from megatron_ki.ki.teacher import freeze
    from megatron_ki.models.stage import build_stage, stage_source_names

    saved, full = teacher_source(s)
    running = dataclasses.replace(saved, vocab_size=s.teacher.vocab_size)
    topology = groups.topology
    model = build_stage(running, groups.tp_group, topology.pp, groups.pp_rank)
    names = stage_source_names(model)
    wanted = list(dict.fromkeys(names.values()))  # model order: a pp checkpoint reads each layer once
    state = shard_state_dict(full, running, topology.tp, groups.tp_rank, names=wanted)
    model.load_state_dict({n: state[source] for n, source in names.items()}, strict=True)
    return freeze(model.to(device), s.cfg.ki.teacher_dtype)


def stage_links(s: Settings, groups, dtype):
    """Point-to-point neighbours of this rank: the same data and tensor rank on the adjacent stages."""
    from megatron_ki.ki.precompute import StageLinks

    topo, (pipe, data, tensor) = groups.topology, groups.coord
    return StageLinks(
        prev=topo.rank(pipe - 1, data, tensor) if pipe > 0 else None,
        next=topo.rank(pipe + 1, data, tensor) if pipe < topo.pp - 1 else None,
        hidden_size=s.teacher.hidden_size,
        dtype=dtype,
    )


def prepare_output(s: Settings, header: dict, rank: int) -> str:
    """Rank 0 creates or resumes the temporary files; every rank gets its answer (or its error)."""
    import torch.distributed as dist

    from megatron_ki.data.teacher_targets import TargetsWriter, TeacherTargetsError

    answer: list = [None]
    if rank == 0:
        try:
            answer = [TargetsWriter.prepare(s.args.output, header, overwrite=s.args.overwrite)]
        except (TeacherTargetsError, OSError) as e:
            answer = [e]
    if dist.is_initialized():
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], BaseException):
        if rank == 0:
            raise answer[0]
        error = TeacherTargetsError(str(answer[0]))
        error.all_ranks = True  # rank 0 says it
        raise error
    return answer[0]


def plan_and_header(s: Settings, masked=None):
    """``(dataset, plan, header)``: the windows and chunks of the data, and the header they will be written
    under (every rank computes the same; a masked-LM teacher's plan counts the masked positions per chunk)."""
    from megatron_ki.data.indexed import IndexedDataset
    from megatron_ki.data.teacher_targets import dataset_identity
    from megatron_ki.data.token_range import check_token_range
    from megatron_ki.ki.precompute import count_stored_rows, make_plan, targets_header

    check_token_range([s.prefix], s.teacher.vocab_size, s.cfg.data.cache_dir)
    dataset = IndexedDataset(s.prefix)
    plan = make_plan(dataset, s.window, s.args.chunk_tokens)
    if masked is not None:
        count_stored_rows(plan, dataset, masked.masking, masked.special)
    header = targets_header(
        teacher_path=s.teacher_path,
        teacher_cfg=s.teacher,
        teacher_rows=s.teacher_rows,
        dataset=dataset_identity(s.prefix),
        tokenizer=s.tokenizer,
        k=s.args.top_k,
        temperature=s.temperature,
        values=s.args.values,
        plan=plan,
        chunk_tokens=s.args.chunk_tokens,
        batch_tokens=s.args.batch_tokens,
        masking=None if masked is None else masked.masking.describe(masked.special),
    )
    return dataset, plan, header


def precompute(argv: list[str], on_chunk_written: Callable[[int], None] | None = None) -> int:
    """Resolve, set up the ranks, load the teacher, compute the chunks left, publish."""
    from megatron_ki.folder_lock import FolderLock
    from megatron_ki.parallel import Topology

    s = resolve(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    topology = Topology.from_world(world, s.cfg.parallel.tensor_parallel, s.cfg.parallel.pipeline_parallel)
    masked = masked_inputs(s)
    dataset, plan, header = plan_and_header(s, masked)
    lock = None
    if rank == 0:  # one job per output: {output}.lock, held until the end (folder_lock.py)
        output = Path(s.args.output)
        stale_s = s.cfg.checkpoint.lock_stale_minutes * 60
        lock = FolderLock(output.parent, "--output", stale_s, lock_file=f"{output}.lock").acquire()
    try:
        return _precompute(s, rank, topology, masked, dataset, plan, header, on_chunk_written)
    finally:
        if lock is not None:
            lock.release()


def _precompute(s: Settings, rank, topology, masked, dataset, plan, header, on_chunk_written) -> int:
    """Set up the ranks, load the teacher, compute the chunks left, publish (under the output's lock)."""
    import torch.distributed as dist

    from megatron_ki.data.teacher_targets import TargetsWriter
    from megatron_ki.ki.precompute import Engine, run_chunks
    from megatron_ki.parallel import ParallelGroups
    from megatron_ki.training.run import collective_timeout, default_device, init_distributed

    if "MASTER_ADDR" in os.environ:  # started by a launcher
        init_distributed(s.cfg)
    state = prepare_output(s, header, rank)
    if state == "published":
        if rank == 0:
            print(f"{PROG}: {s.args.output}.idx/.bin are complete for these settings; nothing to do")
        return 0
    groups = (
        ParallelGroups.build(topology, timeout=collective_timeout(s.cfg)) if dist.is_initialized() else None
    )
    groups = groups or ParallelGroups.single()
    device = default_device()
    local_vocab = s.teacher.padded_vocab_size(topology.tp) // topology.tp
    teacher = load_teacher(s, groups, device)
    links = stage_links(s, groups, next(teacher.parameters()).dtype)
    engine = Engine(
        teacher, dataset, plan, s.args.top_k, s.temperature, s.args.batch_tokens,
        groups.tp_group, groups.tp_rank * local_vocab, device, links, masked,
    )  # fmt: skip
    writer = TargetsWriter(s.args.output, header)
    started = time.monotonic()
    computed = run_chunks(engine, writer, groups, on_chunk_written)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        writer.publish(len(plan.chunks))
        what = "tokens" if masked is None else "masked tokens"
        print(
            f"{PROG}: wrote {s.args.output}.idx/.bin: {header['num_rows']} {what} x K={s.args.top_k} "
            f"({header['row_bytes']} bytes/row{'' if masked is None else ' + 8 in .pos'}, {s.args.values}), {state} "
            f"run, {computed} chunks on rank 0 in "
            f"{time.monotonic() - started:.1f} s"
        )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None, on_chunk_written: Callable[[int], None] | None = None) -> int:
    """Every rank runs; an expected failure is printed once (rank 0, or the rank it is its own)."""
    import torch.distributed as dist

    from megatron_ki.training.resilience import report_failure

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"[%(asctime)s rank{rank}] %(message)s"
    )
    try:
        return precompute([a for a in argv if a != "--debug"], on_chunk_written)
    except BaseException as e:
        code = exit_code_for(e)
        if rank == 0 or code is None or isinstance(e, SystemExit) or debug_requested(argv):
            raise
        return report_failure(PROG, e, rank, code, distributed=dist.is_initialized())


if __name__ == "__main__":
    code = run_main(PROG, main)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as pretrain_ki.exit_now: no teardown of the communication threads
