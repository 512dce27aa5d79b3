"""One tokenizer interface over sentencepiece, local Hugging Face tokenizers and GPT-2 BPE files.

Training and preprocessing only need ids: ``vocab_size``, ``eod`` (the id ``preprocess_data.py --append-eod``
appends after each document), ``pad``, ``mask``, ``cls``/``sep``/``bos``/``eos`` where the vocabulary has them
(None otherwise), ``tokenize`` and ``detokenize``. ``word_start_mask()`` tells which ids begin a word, for
whole-word masking. Everything loads from local files: no network access is ever attempted.

The document separator follows Megatron-LM, so that shards made by its preprocess_data.py and by ours hold the
same bytes: ``eod`` is the tokenizer's eos (sentencepiece ``eos_id()``, as Megatron's GPTSentencePieceTokenizer
and Llama2Tokenizer; ``eos_token_id`` for Hugging Face tokenizers; ``<|endoftext|>`` for GPT-2 BPE). A Hugging
Face tokenizer without an eos (BERT-style WordPiece) uses its sep (``[SEP]``). A vocabulary with neither has no
``eod`` (None); :func:`resolve_eod_token` turns an explicit ``--eod-token PIECE_OR_ID`` into an id.
"""

from __future__ import annotations

import os
import re
from typing import Literal

import numpy as np

from megatron_ki.errors import MegatronKIError

TokenizerType = Literal["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer"]
TOKENIZER_TYPES: tuple[str, ...] = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer")


class TokenizerError(MegatronKIError, ValueError):
    """A tokenizer file is missing, empty or not what its type expects; the message names the option and path."""


class TokenizerFileNotFoundError(TokenizerError, FileNotFoundError):
    """A tokenizer file or directory does not exist."""


def _describe_unreadable(path: str) -> str:
    """Why a file a tokenizer could not load looks wrong: empty, JSON, or just its size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError as e:
        return e.strerror or str(e)
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith((b"{", b"[")):
        return (
            f"{size} bytes of JSON (a Hugging Face tokenizer? that is --tokenizer-type HuggingFaceTokenizer)"
        )
    return f"{size} bytes that sentencepiece cannot parse as a model"


class Tokenizer:
    """Common surface; subclasses fill the ids in ``__init__``."""

    name: str = "tokenizer"
    vocab_size: int
    eod: int | None = None
    pad: int | None = None
    mask: int | None = None
    cls: int | None = None
    sep: int | None = None
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    separators: tuple[int, ...] = ()
    """Ids of pieces named ``<eod>`` / ``<|endoftext|>``: special (never masked by MLM) even when ``eod`` is
    another id, as they were when they were the default separator."""

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        """The id of ``piece`` if the vocabulary has it as a whole piece, else None."""
        raise NotImplementedError

    @property
    def special_ids(self) -> list[int]:
        """Ids that MLM never masks nor samples as random replacements."""
        ids = {self.eod, self.pad, self.mask, self.cls, self.sep, self.bos, self.eos, self.unk}
        return sorted({*(i for i in ids if i is not None), *self.separators})

    def word_start_mask(self) -> np.ndarray:
        """Boolean array over the vocabulary: True where a piece begins a new word."""
        marks = ("\u2581", "\u0120", " ")  # sentencepiece '▁', byte-level BPE 'Ġ', plain space
        out = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            piece = self.id_to_piece(i) or ""
            out[i] = piece.startswith(marks)
        out[self.special_ids] = True
        return out


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``; specials are looked up by piece (``<eod>``, ``<pad>``, ``<mask>`` ...)."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, option: str = "--tokenizer-model"):
        import sentencepiece as spm

        if os.path.isdir(model_file):
            raise TokenizerError(
                f"{option} {model_file}: is a directory, expected a sentencepiece .model file"
            )
        if not os.path.isfile(model_file):
            raise TokenizerFileNotFoundError(f"{option} {model_file}: sentencepiece model file not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError):
            # sentencepiece says "could not parse ModelProto" or, for an empty file, "unk is not defined"
            raise TokenizerError(
                f"{option} {model_file}: found {_describe_unreadable(model_file)}; expected a sentencepiece "
                ".model file (as written by tools/train_tokenizer.py)"
            ) from None
        self.vocab_size = int(self.sp.get_piece_size())

        def piece(p: str) -> int | None:
            i = self.sp.piece_to_id(p)
            return None if i == self.sp.unk_id() and p != self.sp.id_to_piece(i) else int(i)

        def own(i: int) -> int | None:
            return None if i < 0 else int(i)

        self.unk = own(self.sp.unk_id())
        self.bos = own(self.sp.bos_id())
        self.eos = own(self.sp.eos_id())
        self.pad = piece("<pad>")
        if self.pad is None:
            self.pad = own(self.sp.pad_id())
        self.mask = piece("<mask>")
        self.eod = self.eos  # Megatron's GPTSentencePieceTokenizer / Llama2Tokenizer: eod = sp.eos_id()
        self.separators = tuple(i for i in (piece("<eod>"),) if i is not None)
        self.cls = piece("<cls>")
        if self.cls is None:
            self.cls = self.bos
        self.sep = piece("<sep>")
        if self.sep is None:
            self.sep = self.eos

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        i = int(self.sp.piece_to_id(piece))
        return i if self.sp.id_to_piece(i) == piece else None


class _HFTokenizer(Tokenizer):
    """Shared code for tokenizers built on ``transformers``' fast tokenizers (no special tokens added)."""

    def _set_ids(self) -> None:
        tok = self.tok
        self.vocab_size = len(tok)
        vocab = tok.get_vocab()

        def first(*names: str | None) -> int | None:
            for n in names:
                if n is not None and n in vocab:
                    return int(vocab[n])
            return None

        self.bos = tok.bos_token_id
        self.eos = tok.eos_token_id
        self.unk = tok.unk_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else first("<pad>", "[PAD]")
        self.mask = tok.mask_token_id if tok.mask_token_id is not None else first("<mask>", "[MASK]")
        self.cls = tok.cls_token_id if tok.cls_token_id is not None else first("<cls>", "[CLS]", "<s>")
        self.sep = tok.sep_token_id if tok.sep_token_id is not None else first("<sep>", "[SEP]", "</s>")
        # Megatron's HuggingFaceTokenizer: eod = eos_token_id; BERT-style vocabularies have none: their [SEP]
        self.eod = self.eos if self.eos is not None else self.sep
        self.separators = tuple(i for i in (first("<eod>"), first("<|endoftext|>")) if i is not None)

    def tokenize(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        return self.tok.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.tok.convert_ids_to_tokens(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        i = self.tok.get_vocab().get(piece)  # added tokens (<|im_end|>, ...) included
        return None if i is None else int(i)


class HuggingFaceTokenizer(_HFTokenizer):
    """A local Hugging Face tokenizer directory (``tokenizer.json`` and/or ``tokenizer_config.json``)."""

    name = "HuggingFaceTokenizer"

    def __init__(self, path: str, option: str = "--tokenizer-model"):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if not os.path.exists(path):
            raise TokenizerFileNotFoundError(f"{option} {path}: Hugging Face tokenizer directory not found")
        tok_json = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as first_error:
            reason = " ".join(str(first_error).split())
            if not os.path.isfile(tok_json):
                raise TokenizerError(
                    f"{option} {path}: cannot load a Hugging Face tokenizer ({reason}); expected a "
                    "directory with tokenizer.json or tokenizer_config.json"
                ) from None
            try:
                self.tok = PreTrainedTokenizerFast(tokenizer_file=tok_json)
            except Exception as e:
                raise TokenizerError(
                    f"{option} {path}: {tok_json} is not a Hugging Face tokenizer.json "
                    f"({' '.join(str(e).split())})"
                ) from None
        self._set_ids()


class GPT2BPETokenizer(_HFTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (Megatron's ``--vocab-file/--merge-file``)."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        for flag, f in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not f or not os.path.isfile(f):
                raise TokenizerFileNotFoundError(
                    f"{flag} {f}: file not found (GPT2BPETokenizer needs vocab.json and merges.txt)"
                )
        # Built from the `tokenizers` library directly: GPT2TokenizerFast changed its file arguments in
        # transformers 5, this works with every version.
        try:
            raw = RawTokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as e:
            raise TokenizerError(
                f"--vocab-file {vocab_file} / --merge-file {merge_file}: cannot be read as GPT-2 BPE files "
                f"({' '.join(str(e).split())}); expected a vocab.json object and a merges.txt of pairs"
            ) from None
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        eot = "<|endoftext|>"
        specials = (
            {"bos_token": eot, "eos_token": eot, "unk_token": eot} if raw.token_to_id(eot) is not None else {}
        )
        self.tok = PreTrainedTokenizerFast(tokenizer_object=raw, **specials)
        self._set_ids()


def resolve_eod_token(tok: Tokenizer, spec: str, option: str = "--eod-token") -> int:
    """The id named by ``spec``: an integer (digits only) is an id, anything else a piece of the vocabulary.

    Either must exist in ``tok``'s vocabulary, else :class:`TokenizerError` naming ``option``: a separator the
    model's embedding has no row for would fail (or silently wrap) at training time.
    """
    if re.fullmatch(r"\s*-?[0-9]+\s*", spec):
        i = int(spec)
        if not 0 <= i < tok.vocab_size:
            raise TokenizerError(
                f"{option} {spec}: id {i} is outside the vocabulary of {tok.name} ({tok.vocab_size} tokens); "
                f"expected an id in [0, {tok.vocab_size}) or a piece of the vocabulary"
            )
        return i
    i = tok.piece_to_id(spec)
    if i is None:
        raise TokenizerError(
            f"{option} {spec!r}: no such piece in the vocabulary of {tok.name} ({tok.vocab_size} tokens); "
            "expected a piece the tokenizer has (e.g. '</s>', '<eod>', '<|endoftext|>') or an integer id"
        )
    return i


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    *,
    option: str = "--tokenizer-model",
    eod_token: str | None = None,
) -> Tokenizer:
    """Build a tokenizer by Megatron's type name from local files.

    A missing, empty or unreadable file raises :class:`TokenizerError` naming ``option`` (the flag or config
    key that gave ``tokenizer_model``, e.g. ``data.tokenizer_model``) and the path. ``eod_token`` (a piece or
    an id, see :func:`resolve_eod_token`) replaces the default separator ``eod`` (the eos).
    """
    tok = _build(tokenizer_type, tokenizer_model, vocab_file, merge_file, option)
    if eod_token is not None:
        tok.eod = resolve_eod_token(tok, eod_token)
    return tok


def _build(
    tokenizer_type: str,
    tokenizer_model: str | None,
    vocab_file: str | None,
    merge_file: str | None,
    option: str,
) -> Tokenizer:
    """The tokenizer of ``tokenizer_type`` with its default ids (see :func:`build_tokenizer`)."""
    if tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise TokenizerError(f"SentencePieceTokenizer needs {option} (a sentencepiece .model file)")
        return SentencePieceTokenizer(tokenizer_model, option)
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise TokenizerError(f"HuggingFaceTokenizer needs {option} (a local tokenizer directory)")
        return HuggingFaceTokenizer(tokenizer_model, option)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file or "", merge_file or "")
    raise TokenizerError(f"--tokenizer-type {tokenizer_type!r}: expected one of {list(TOKENIZER_TYPES)}")
