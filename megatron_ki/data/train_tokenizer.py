"""Sentencepiece training from streamed ``.jsonl``/``.txt`` input (the engine of tools/train_tokenizer.py)."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_ki.data.corpus import CorpusError, expand_inputs, iter_texts

DEFAULT_SPECIALS = "<mask>,<pad>,<eod>"


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
    the given order right after ``<unk>``, ``<s>``, ``</s>``.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type {model_type!r}: expected 'bpe' or 'unigram'")
    if 0 < sample_size <= 100:
        raise ValueError(
            f"--sample-size {sample_size}: sentencepiece needs more than 100 lines (or 0 for all)"
        )
    files = expand_inputs(inputs)
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    specials = [t for t in (special_tokens or []) if t]
    spm.set_random_generator_seed(seed)  # sampling and shuffling of the input lines
    texts = iter_texts(files, json_key=json_key, skip_bad_lines=skip_bad_lines, split_lines=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=texts,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        user_defined_symbols=specials,
        input_sentence_size=sample_size,
        shuffle_input_sentence=True,
        byte_fallback=byte_fallback,
        seed_sentencepiece_size=max(10 * vocab_size, 100_000),
        num_threads=num_threads,
        max_sentence_length=max_sentence_length,
        minloglevel=2,
    )
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    specials = [t.strip() for t in args.special_tokens.split(",") if t.strip()]
    try:
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
    except (CorpusError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    print(
        f"wrote {path} ({sp.get_piece_size()} pieces; specials: "
        + ", ".join(f"{t}={sp.piece_to_id(t)}" for t in specials)
        + ")"
    )
    return 0
