"""Tokenize JSON-lines corpora into Megatron MMIDIDX datasets (the engine of ``tools/preprocess_data.py``).

The main process reads lines in chunks and hands them to a worker pool with a bounded number of chunks in
flight, so memory stays flat however large the corpus is (Megatron's own tool holds whole shards). Workers
parse, validate and tokenize; results come back in input order and are streamed into
:class:`IndexedDatasetBuilder` instances, which write under temporary names and rename only on success.

Document separator (``--append-eod``), one rule: by default the id Megatron-LM's own preprocess_data.py appends
for the same tokenizer, its eos, so shards made by either tool hold the same bytes and a blend of them one
separator: a sentencepiece model's ``eos_id()`` (``</s>``; Megatron's GPTSentencePieceTokenizer and
Llama2Tokenizer), a Hugging Face tokenizer's ``eos_token_id`` (Llama 3 ``<|end_of_text|>``, or ``<|eot_id|>``
where tokenizer_config.json names it, Qwen2.5 ``<|endoftext|>``, Mistral ``</s>``; a BERT-style vocabulary
without eos: its ``[SEP]``), GPT-2 BPE's ``<|endoftext|>``. Anything else is named with ``--eod-token
PIECE_OR_ID`` (a piece of the vocabulary, or an integer id below the vocabulary size), e.g. ``--eod-token
'<eod>'`` for the ``<eod>`` piece of tools/train_tokenizer.py. Megatron's legacy ``SentencePieceTokenizer``
type appends an ``<EOD>``, which it adds beyond the vocabulary when the model has no such piece (after
``<CLS>`` and ``<SEP>``); with an unchanged vocabulary that cannot be reproduced: train the tokenizer with an
``<EOD>`` piece (Megatron then uses that piece too) and pass ``--eod-token '<EOD>'``.
``--eod-token`` without ``--append-eod`` is a usage error (exit 2), and a tokenizer without eos needs
``--eod-token``. The id used is recorded as ``eod_token_id`` in the ``.stats.json`` sidecar (null without
``--append-eod``), and the tokenizer's content as ``tokenizer_fingerprint`` (data/tokenizer_identity.py):
training, merges and the teacher checks compare it with the tokenizer they are given.

A run that fails, for whatever reason (bad line, no non-empty document, disk full, Ctrl-C), leaves the
dataset already at ``--output-prefix`` as it was: outputs are published only once the whole run succeeded.
Temporary files of earlier runs that were killed are removed when the next run of the same prefix starts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from megatron_ki.data.corpus import CorpusError, expand_inputs, iter_lines, parse_json_line
from megatron_ki.data.indexed import (
    EOD_FIELD,
    IndexedDatasetBuilder,
    merge_datasets,
    optimal_dtype,
    remove_dataset,
    remove_stale_temp_files,
    stats_path,
    temp_tag,
    write_stats,
)
from megatron_ki.data.tokenizer_identity import FIELD as FINGERPRINT_FIELD
from megatron_ki.data.tokenizer_identity import fingerprint
from megatron_ki.data.tokenizers import TOKENIZER_TYPES, Tokenizer, TokenizerError, build_tokenizer
from megatron_ki.errors import EXIT_INTERRUPTED, MegatronKIError, UsageError, add_debug_argument, run_main

PROG = "preprocess_data.py"


class PreprocessError(MegatronKIError, RuntimeError):
    """A failure with a one-line message meant for the user (the tool prints it and exits 1)."""


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    bad_lines: int = 0
    bytes: int = 0
    bad_examples: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(tok_args: tuple, keys: list[str], eod: int | None, dtype: str, skip_bad: bool) -> None:
    """Per-process state; ``eod`` is the id resolved once by the main process (None: append nothing)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(
        tokenizer=build_tokenizer(*tok_args),
        keys=keys,
        eod=eod,
        dtype=np.dtype(dtype),
        skip=skip_bad,
    )


def _init_pool_worker(*args) -> None:
    """Pool workers leave interrupts to the main process, which cleans up and terminates them.

    A worker starts with SIGTERM blocked (:func:`_start_pool`) and unblocks it only once its action is the
    default one: a SIGTERM that arrived meanwhile (``pool.terminate()`` of a run that ended while this
    worker was still starting) then ends it at once.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _init_worker(*args)


def _start_pool(ctx, workers: int, init: tuple):
    """``ctx.Pool`` whose workers are forked with SIGTERM blocked.

    Otherwise a SIGTERM reaching a new worker before its initializer runs goes to the handler inherited from
    the main process (which raises KeyboardInterrupt), possibly inside an at-fork hook, where Python reports
    the exception as "ignored" and goes on: the signal is lost, the worker waits for tasks forever and
    ``pool.join()`` with it. Blocked, the signal stays pending until :func:`_init_pool_worker` unblocks it.
    """
    if not hasattr(signal, "pthread_sigmask"):
        return ctx.Pool(workers, initializer=_init_pool_worker, initargs=init)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return ctx.Pool(workers, initializer=_init_pool_worker, initargs=init)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tok, "sp"):
        return tok.sp.encode(texts, num_threads=1)  # type: ignore[attr-defined]
    return tok.tokenize_batch(texts)


def _process_chunk(chunk: tuple[str, int, list[bytes]]) -> dict:
    """Parse and tokenize one chunk of lines; bad lines are reported, never raised, to keep order."""
    path, first_line, lines = chunk
    tok: Tokenizer = _WORKER["tokenizer"]
    keys: list[str] = _WORKER["keys"]
    good: list[list[str]] = []
    bad: list[str] = []
    nbytes = 0
    for i, raw in enumerate(lines):
        nbytes += len(raw)
        texts, reason = parse_json_line(raw, keys)
        if texts is None:
            bad.append(f"{path}:{first_line + i}: {reason}")
            if not _WORKER["skip"]:
                break
            continue
        good.append(texts)
    out: dict = {"bad": bad, "bytes": nbytes, "keys": {}}
    eod: int | None = _WORKER["eod"]
    for k_i, key in enumerate(keys):
        ids = _encode(tok, [g[k_i] for g in good]) if good else []
        ids = [x for x in ids if x]
        empty = len(good) - len(ids)
        if eod is not None:
            for x in ids:
                x.append(eod)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        total = int(lengths.sum(dtype=np.int64))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=_WORKER["dtype"], count=total)
        out["keys"][key] = (tokens, lengths, empty)
    return out


# ------------------------------------------------------------------------------------------- reading
def _chunks(files: list[str], chunk_lines: int, chunk_bytes: int) -> Iterator[tuple[str, int, list[bytes]]]:
    for path in files:
        buf: list[bytes] = []
        size = 0
        first = 1
        for lineno, raw in enumerate(iter_lines(path), 1):
            buf.append(raw)
            size += len(raw)
            if len(buf) >= chunk_lines or size >= chunk_bytes:
                yield path, first, buf
                buf, size, first = [], 0, lineno + 1
        if buf:
            yield path, first, buf


def _ordered_map(pool, chunks: Iterator, inflight: int) -> Iterator[dict]:
    """Like ``pool.imap`` but with at most ``inflight`` chunks read ahead (imap reads the whole input)."""
    if pool is None:
        for c in chunks:
            yield _process_chunk(c)
        return
    pending: deque = deque()
    for c in chunks:
        pending.append(pool.apply_async(_process_chunk, (c,)))
        if len(pending) >= inflight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _Progress:
    def __init__(self, interval: int, stream=None):
        self.interval, self.stream = interval, stream or sys.stderr
        self.start = time.perf_counter()
        self.next = interval

    def update(self, s: Stats, final: bool = False) -> None:
        if not final and (self.interval <= 0 or s.documents < self.next):
            return
        while self.interval > 0 and self.next <= s.documents:
            self.next += self.interval
        dt = max(time.perf_counter() - self.start, 1e-9)
        print(
            f"[preprocess] {s.documents:,} docs | {s.documents / dt:,.0f} docs/s | {s.tokens / dt:,.0f} tokens/s"
            f" | {s.bytes / dt / 1e6:,.2f} MB/s | {dt:,.1f} s",
            file=self.stream,
            flush=True,
        )


# -------------------------------------------------------------------------------------------- driver
def output_prefix_for(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def check_output_dir(
    prefix: str, option: str = "--output-prefix", error: type[MegatronKIError] = PreprocessError
) -> None:
    """Create the directory of ``prefix`` if needed and make sure a file can be written there.

    Writing a probe file is the only test that holds for root, ACLs and read-only mounts alike.
    """
    out_dir = os.path.dirname(os.path.abspath(prefix))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise error(f"{option} {prefix}: {out_dir} is a file, expected the output directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise error(f"{option} {prefix}: cannot create output directory {out_dir}: {e.strerror}") from None
    probe = os.path.join(out_dir, f".{os.path.basename(prefix)}.probe{temp_tag()}")
    try:
        with open(probe, "wb"):
            pass
    except OSError as e:
        raise error(
            f"{option} {prefix}: output directory {out_dir} is not writable ({e.strerror}); "
            "expected a directory this user can create files in"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


def write_error(e: OSError, prefix: str) -> PreprocessError:
    """An OSError met while the dataset was being written, as one line naming the file or the prefix."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason += " (the disk is full)"
    where = f"{e.filename}" if e.filename else f"--output-prefix {prefix}"
    return PreprocessError(
        f"{where}: {reason}; nothing was written, a dataset already at the prefix was kept"
    )


def _write_sidecars(
    prefixes: dict[str, str], builders: dict[str, IndexedDatasetBuilder], extra: dict
) -> None:
    for key, prefix in prefixes.items():
        try:
            write_stats(prefix, {**builders[key].token_stats(), **extra, "json_key": key})
        except OSError as e:  # the dataset is complete without it; training then scans the .bin once
            print(
                f"{PROG}: warning: could not write {stats_path(prefix)} ({e.strerror or e})", file=sys.stderr
            )


def _no_documents(args, stats: Stats) -> PreprocessError:
    return PreprocessError(
        f"--input {' '.join(args.input)}: no non-empty documents found "
        f"({stats.empty} empty, {stats.bad_lines} bad lines); expected at least one"
    )


def _run_partition(
    files: list[str],
    prefixes: dict[str, str],
    args,
    tok: Tokenizer,
    pool,
    stats: Stats,
    progress: _Progress,
    require_documents: bool = False,
    stats_extra: dict | None = None,
) -> None:
    """Tokenize ``files`` into ``prefixes``; with ``require_documents`` (the only partition, written at the
    final prefixes), a run without any document fails before anything is published. With ``stats_extra``
    each dataset gets its ``.stats.json`` sidecar."""
    dtype = optimal_dtype(tok.vocab_size)
    builders = {k: IndexedDatasetBuilder(p, dtype) for k, p in prefixes.items()}
    try:
        chunks = _chunks(files, args.chunk_lines, args.chunk_bytes)
        for res in _ordered_map(pool, chunks, inflight=max(2, 2 * args.workers)):
            if res["bad"]:
                if not args.skip_bad_lines:
                    raise PreprocessError(
                        f"{res['bad'][0]} (use --skip-bad-lines to count such lines and go on)"
                    )
                stats.bad_lines += len(res["bad"])
                stats.bad_examples.extend(res["bad"][: max(0, 5 - len(stats.bad_examples))])
            stats.bytes += res["bytes"]
            for key, (tokens, lengths, empty) in res["keys"].items():
                builders[key].add_documents(tokens, lengths)
                stats.empty += empty
                if key == args.json_keys[0]:
                    stats.documents += int(lengths.size)
                stats.tokens += int(tokens.size)
            progress.update(stats)
        if require_documents and stats.documents == 0:
            raise _no_documents(args, stats)
        for b in builders.values():  # every index written before any output is published
            b.prepare()
        for b in builders.values():
            b.finalize()
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    if stats_extra is not None:
        _write_sidecars(prefixes, builders, stats_extra)


def preprocess(args: argparse.Namespace) -> Stats:
    """Run the whole job described by parsed ``args``; raises PreprocessError with a one-line reason."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        files = expand_inputs(args.input)
    except CorpusError as e:
        raise PreprocessError(str(e)) from None
    if all(os.path.getsize(f) == 0 for f in files):
        raise PreprocessError(f"--input {' '.join(args.input)}: the input is empty (0 bytes)")
    tok_args = (args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file)
    try:
        tok = build_tokenizer(*tok_args, eod_token=args.eod_token)
    except TokenizerError as e:
        raise PreprocessError(str(e)) from None
    if args.append_eod and tok.eod is None:
        source = args.tokenizer_model or args.vocab_file
        raise PreprocessError(
            f"--append-eod: tokenizer {tok.name} {source} has no eos token, the separator Megatron-LM "
            "appends; name one with --eod-token PIECE_OR_ID (a piece of its vocabulary or an id)"
        )
    check_output_dir(args.output_prefix)
    try:
        return _preprocess(args, files, tok, tok_args)
    except MegatronKIError:
        raise
    except OSError as e:
        raise write_error(e, args.output_prefix) from e


def _preprocess(args: argparse.Namespace, files: list[str], tok: Tokenizer, tok_args: tuple) -> Stats:
    dtype = np.dtype(optimal_dtype(tok.vocab_size)).name
    eod = tok.eod if args.append_eod else None
    init = (tok_args, list(args.json_keys), eod, dtype, args.skip_bad_lines)
    final = {k: output_prefix_for(args.output_prefix, k) for k in args.json_keys}
    # what killed runs left (with partitions, the builder of the final prefix starts only at the very end)
    for p in final.values():
        remove_stale_temp_files(p)
    n_parts = max(1, min(args.partitions, len(files)))
    groups = [files[i::n_parts] for i in range(n_parts)]
    stats = Stats()
    progress = _Progress(args.log_interval)
    stats_extra = {
        "source": PROG,
        "tokenizer_type": args.tokenizer_type,
        "tokenizer_model": os.path.abspath(args.tokenizer_model) if args.tokenizer_model else None,
        "vocab_size": tok.vocab_size,
        "append_eod": bool(args.append_eod),
        EOD_FIELD: eod,
        FINGERPRINT_FIELD: fingerprint(tok),  # what the ids mean, by content (data/tokenizer_identity.py)
    }
    pool = None
    part_prefixes: list[dict[str, str]] = []
    if args.workers > 1:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = _start_pool(ctx, args.workers, init)
    else:
        _init_worker(*init)
    try:
        for i, group in enumerate(groups):
            prefixes = final if n_parts == 1 else {k: f"{p}.part{i:03d}" for k, p in final.items()}
            part_prefixes.append(prefixes)
            only = n_parts == 1
            _run_partition(
                group, prefixes, args, tok, pool, stats, progress, only, stats_extra if only else None
            )
        if stats.documents == 0:  # the parts are temporary: an existing dataset at the prefix stays as it was
            raise _no_documents(args, stats)
        if n_parts > 1:
            for k, p in final.items():
                merge_datasets([pp[k] for pp in part_prefixes], p, stats={**stats_extra, "json_key": k})
    finally:
        if pool is not None:
            # close + join, not terminate: the at most 2 x workers chunks in flight finish in milliseconds, and
            # Pool.terminate's hand-over of the task queue's lock from idle workers can deadlock (a run that
            # failed on a truncated .gz hung once in about 100 runs here).
            pool.close()
            pool.join()
        if n_parts > 1:
            for pp in part_prefixes:
                for p in pp.values():
                    remove_dataset(p)
    progress.update(stats, final=True)
    return stats


EOD_RULE = """\
document separator (--append-eod), one rule:
  By default the id Megatron-LM's own preprocess_data.py appends for the same tokenizer, its eos, so
  shards made by either tool hold the same bytes and a blend of them has one separator:
    SentencePieceTokenizer  sp.eos_id() ('</s>', as Megatron's GPTSentencePieceTokenizer/Llama2Tokenizer)
    HuggingFaceTokenizer    eos_token_id (Llama 3 '<|end_of_text|>', or '<|eot_id|>' where its
                            tokenizer_config.json says so; Qwen2.5 '<|endoftext|>'; Mistral '</s>');
                            a BERT-style vocabulary without eos: its sep ('[SEP]')
    GPT2BPETokenizer        '<|endoftext|>'
  --eod-token PIECE_OR_ID appends anything else: a piece of the vocabulary (e.g. '<eod>' of
  tools/train_tokenizer.py) or an integer id below the vocabulary size; it needs --append-eod (a usage
  error without it). A tokenizer without eos needs --eod-token. Megatron's legacy SentencePieceTokenizer
  type appends an '<EOD>', which it adds beyond the vocabulary when the model has no such piece; to get
  the same bytes, train the tokenizer with an '<EOD>' piece (Megatron then uses it too) and pass
  --eod-token '<EOD>'.
  The id used is recorded as eod_token_id in {prefix}_{key}_document.stats.json (null without
  --append-eod); tools/merge_datasets.py refuses inputs whose recorded ids differ.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tokenize .jsonl/.jsonl.gz into Megatron MMIDIDX {prefix}_{key}_document.bin/.idx",
        epilog=EOD_RULE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="input file(s) or glob(s): .jsonl or .jsonl.gz")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)")
    g.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="count and report bad lines instead of stopping at the first one",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="sentencepiece .model or local Hugging Face tokenizer directory")
    g.add_argument("--vocab-file", help="GPT2BPETokenizer vocab.json")
    g.add_argument("--merge-file", help="GPT2BPETokenizer merges.txt")
    g.add_argument(
        "--append-eod",
        action="store_true",
        help="append a document separator after each document: by default the id Megatron-LM's "
        "preprocess_data.py appends for the same tokenizer, its eos (sentencepiece eos_id() '</s>', Hugging "
        "Face eos_token_id, GPT-2 '<|endoftext|>'; a Hugging Face vocabulary without eos: its sep); "
        "recorded as eod_token_id in {prefix}.stats.json",
    )
    g.add_argument(
        "--eod-token",
        metavar="PIECE_OR_ID",
        help="with --append-eod, append this instead of the eos: a piece of the vocabulary (e.g. '<eod>' of "
        "tools/train_tokenizer.py) or an integer id. Megatron's legacy SentencePieceTokenizer type appends an "
        "<EOD> it adds beyond the vocabulary; to match it, train the tokenizer with an <EOD> piece and pass "
        "--eod-token '<EOD>'. Required with --append-eod when the tokenizer has no eos; a usage error "
        "without --append-eod",
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="outputs are {prefix}_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: tokenize in this process)")
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="split the input files into this many groups written separately, then merged",
    )
    g.add_argument("--log-interval", type=int, default=10000, help="print progress every this many documents")
    g.add_argument("--chunk-lines", type=int, default=512, help="lines per work unit sent to a worker")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20, help="bytes per work unit sent to a worker")
    add_debug_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``tools/preprocess_data.py``: an expected failure is one line on stderr and exit code 1 (2: usage)."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.eod_token is not None and not args.append_eod:
        raise UsageError(
            f"--eod-token {args.eod_token}: only applies with --append-eod (it names the separator appended "
            "after each document); add --append-eod or drop --eod-token"
        )
    for flag in ("workers", "partitions", "chunk_lines", "chunk_bytes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected an integer >= 1")
    t0 = time.perf_counter()

    def _terminate(signum, frame):
        raise KeyboardInterrupt  # clean up temporary outputs on SIGTERM as on Ctrl-C

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        stats = preprocess(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    dt = time.perf_counter() - t0
    print(
        f"documents: {stats.documents}  tokens: {stats.tokens}  skipped empty documents: {stats.empty}  "
        f"bad lines: {stats.bad_lines}  time: {dt:.2f} s  tokens/s: {stats.tokens / max(dt, 1e-9):.0f}"
    )
    for ex in stats.bad_examples:
        print(f"  bad line: {ex}")
    for key in args.json_keys:
        print(f"wrote {output_prefix_for(args.output_prefix, key)}.bin/.idx")
    return 0
