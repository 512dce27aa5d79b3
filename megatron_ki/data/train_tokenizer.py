"""Sentencepiece training from streamed ``.jsonl``/``.txt`` input (the engine of tools/train_tokenizer.py).

The model is trained under a temporary prefix and renamed to ``{model_prefix}.model/.vocab`` only on success:
a failed run (bad input, Ctrl-C) leaves an existing tokenizer at the prefix as it was.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
from collections.abc import Iterable, Iterator
from typing import Any

from megatron_ki.data.corpus import expand_inputs, is_jsonl, iter_texts
from megatron_ki.data.preprocess import check_output_dir
from megatron_ki.errors import MegatronKIError, add_debug_argument, run_main
from megatron_ki.fileio import atomic_save

PROG = "train_tokenizer.py"
DEFAULT_SPECIALS = "<mask>,<pad>,<eod>"


class TrainTokenizerError(MegatronKIError, ValueError):
    """Bad options or input for tokenizer training; the message names the option or file."""


class _Recording:
    """Wraps the text iterator handed to sentencepiece, which turns any exception into a RuntimeError
    ("INTERNAL: ..."): the original exception is kept here and raised instead."""

    def __init__(self, texts: Iterator[str]):
        self.texts = texts
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.texts
        except BaseException as e:
            self.error = e
            raise


def _spm_error(e: RuntimeError, inputs: list[str], vocab_size: int) -> TrainTokenizerError:
    """sentencepiece's ``RuntimeError("Internal: file.cc(123) [cond] message")`` as one line naming the option."""
    text = " ".join(str(e).split())
    message = re.sub(r"^(?:INTERNAL|Internal):\s*(?:\S+\.cc\(\d+\)\s*)?(?:\[[^\]]*\]\s*)?", "", text) or text
    if "Vocabulary size" in message:
        return TrainTokenizerError(
            f"--vocab-size {vocab_size}: too large for this corpus (sentencepiece: {message})"
        )
    return TrainTokenizerError(
        f"--input {' '.join(inputs)}: sentencepiece could not train a model ({message})"
    )


def _check_options(model_type: str, vocab_size: int, sample_size: int) -> None:
    """Reject options sentencepiece would only fail on deep inside training, with an unhelpful message."""
    if model_type not in ("bpe", "unigram"):
        raise TrainTokenizerError(f"--model-type {model_type!r}: expected 'bpe' or 'unigram'")
    if vocab_size < 1:
        raise TrainTokenizerError(f"--vocab-size {vocab_size}: expected a positive number of pieces")
    if 0 < sample_size <= 100:
        raise TrainTokenizerError(
            f"--sample-size {sample_size}: sentencepiece needs more than 100 lines (or 0 for all)"
        )


def _nonempty_texts(inputs: list[str], files: list[str], json_key: str, skip_bad_lines: bool) -> _Recording:
    """The input lines, known to hold at least one: sentencepiece fails on none with an INTERNAL error."""
    texts = iter_texts(files, json_key=json_key, skip_bad_lines=skip_bad_lines, split_lines=True)
    first = next(texts, None)
    if first is None:
        where = f" under key {json_key!r}" if any(is_jsonl(f) for f in files) else ""
        raise TrainTokenizerError(
            f"--input {' '.join(inputs)}: no text found{where} in {len(files)} file(s); expected at least one "
            "non-empty line to train on"
        )
    return _Recording(itertools.chain([first], texts))


def sample_lines(lines: Iterable[str], size: int, seed: int) -> list[str]:
    """A uniform sample of ``size`` lines from a stream of unknown length (reservoir sampling, Algorithm R),
    a function of the lines and ``seed`` only; every line when the stream is shorter. sentencepiece's own
    ``input_sentence_size`` sampling gives another model on every run whatever ``set_random_generator_seed``
    says (measured with sentencepiece 0.2), so a corpus larger than the sample made a new tokenizer each time."""
    rng = random.Random(seed)
    kept: list[str] = []
    for i, line in enumerate(lines):
        if i < size:
            kept.append(line)
        else:
            j = rng.randrange(i + 1)
            if j < size:
                kept[j] = line
    return kept


def _run_trainer(
    spm: Any, recording: _Recording, tmp_prefix: str, inputs: list[str], vocab_size: int, **options: Any
) -> None:
    """Train to ``tmp_prefix``, re-raising the input's own error, else sentencepiece's as one readable line."""
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(recording), model_prefix=tmp_prefix, vocab_size=vocab_size, **options
        )
    except RuntimeError as e:
        if recording.error is not None:
            raise recording.error from None
        raise _spm_error(e, inputs, vocab_size) from None
    if recording.error is not None:
        raise recording.error


def train_sentencepiece(
    inputs: list[str] | str,
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    character_coverage: float = 0.9995,
    special_tokens: list[str] | None = None,
    sample_size: int = 1_000_000,
    byte_fallback: bool = False,
    seed: int = 0,
    num_threads: int = 1,
    max_sentence_length: int = 16384,
    skip_bad_lines: bool = False,
) -> str:
    """Train and write ``{model_prefix}.model/.vocab``; returns the model path.

    Special tokens become sentencepiece user-defined symbols: never split, and present in the vocabulary in
    the given order right after ``<unk>``, ``<s>``, ``</s>``. Bad options or input raise
    :class:`TrainTokenizerError` (or :class:`~megatron_ki.data.corpus.CorpusError`); nothing is written then.
    """
    import sentencepiece as spm

    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    _check_options(model_type, vocab_size, sample_size)
    files = expand_inputs(inputs)
    check_output_dir(model_prefix, "--model-prefix", TrainTokenizerError)
    specials = [t for t in (special_tokens or []) if t]
    recording = _nonempty_texts(inputs, files, json_key, skip_bad_lines)
    if sample_size > 0:
        recording = _Recording(iter(sample_lines(recording, sample_size, seed)))
    options = dict(
        model_type=model_type,
        character_coverage=character_coverage,
        user_defined_symbols=specials,
        input_sentence_size=0,  # sampled above: sentencepiece's own sampling ignores the seed
        shuffle_input_sentence=False,
        byte_fallback=byte_fallback,
        seed_sentencepiece_size=max(10 * vocab_size, 100_000),
        num_threads=num_threads,
        max_sentence_length=max_sentence_length,
        minloglevel=2,
    )

    def train(tmp_prefix: str) -> None:
        _run_trainer(spm, recording, tmp_prefix, inputs, vocab_size, **options)

    spm.set_random_generator_seed(seed)
    atomic_save(model_prefix, train, suffixes=(".vocab", ".model"))  # .model, the file readers open, last
    return model_prefix + ".model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a sentencepiece tokenizer from .jsonl or .txt files")
    p.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl, .jsonl.gz, .txt)")
    p.add_argument("--json-key", default="text", help="key holding the text in .jsonl files")
    p.add_argument("--model-prefix", required=True, help="writes {prefix}.model and {prefix}.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--special-tokens",
        default=DEFAULT_SPECIALS,
        help=f"comma-separated user-defined symbols (default {DEFAULT_SPECIALS})",
    )
    p.add_argument(
        "--sample-size",
        type=int,
        default=1_000_000,
        help="lines kept for training, sampled uniformly from the stream (0: all)",
    )
    p.add_argument("--byte-fallback", action="store_true", help="decompose unknown characters into bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-bad-lines", action="store_true")
    add_debug_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``tools/train_tokenizer.py``: an expected failure is one line on stderr and exit code 1."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    specials = [t.strip() for t in args.special_tokens.split(",") if t.strip()]
    path = train_sentencepiece(
        args.input,
        args.model_prefix,
        args.vocab_size,
        args.model_type,
        args.json_key,
        args.character_coverage,
        specials,
        args.sample_size,
        args.byte_fallback,
        args.seed,
        args.num_threads,
        skip_bad_lines=args.skip_bad_lines,
    )
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    print(
        f"wrote {path} ({sp.get_piece_size()} pieces; specials: "
        + ", ".join(f"{t}={sp.piece_to_id(t)}" for t in specials)
        + ")"
    )
    return 0
