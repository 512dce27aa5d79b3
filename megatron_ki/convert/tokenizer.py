"""Tokenizers for Hugging Face directories: sentencepiece -> fast tokenizer export, copying, id-by-id checks.

A sentencepiece ``.model`` is exported as a ``tokenizers`` ``tokenizer.json`` (plus ``tokenizer_config.json``)
that ``AutoTokenizer`` loads offline. The model, normalizer and pre-tokenizer follow the sentencepiece
model's own settings (transformers' ``SpmConverter.build_tokenizer_from_spm_proto``: BPE merges ranked by
piece score or Unigram scores, the precompiled normalisation map, extra-whitespace removal, dummy prefix,
byte fallback, user-defined pieces kept whole), so ``tok(text, add_special_tokens=False)`` gives the same
ids as ``SentencePieceProcessor.encode(text)``. No post-processor is set: like sentencepiece's ``encode``,
the exported tokenizer adds no BOS/EOS.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megatron_ki.errors import MegatronKIError

# Files a Hugging Face tokenizer directory may hold (copied as they are).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


class TokenizerMismatchError(MegatronKIError, ValueError):
    """Teacher and student tokenizers differ; the message names the first differing id."""


def _load_proto(model_file: str | Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    path = Path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer-model {path}: sentencepiece model file not found")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def sentencepiece_to_fast(model_file: str | Path) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` encoding exactly like the sentencepiece model."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _load_proto(model_file)
    model_type = proto.trainer_spec.model_type
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if model_type == 2:  # BPE
        vocab: Any = {piece: i for i, (piece, _) in enumerate(pieces)}
    elif model_type == 1:  # Unigram
        vocab = pieces
    else:
        raise ValueError(
            f"{model_file}: sentencepiece model_type {model_type} unsupported (only BPE=2 and Unigram=1)"
        )
    raw = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, merges=None, legacy=False)
    if raw is None:
        raise ValueError(f"{model_file}: transformers could not build a fast tokenizer from this model")
    raw.normalizer, raw.pre_tokenizer = _normalizer_and_pre_tokenizer(proto)

    def piece_of(i: int) -> str | None:
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    trainer = proto.trainer_spec
    specials = {
        "unk_token": piece_of(trainer.unk_id),
        "bos_token": piece_of(trainer.bos_id),
        "eos_token": piece_of(trainer.eos_id),
        "pad_token": piece_of(trainer.pad_id),
    }
    names = {p.piece for p in proto.pieces}
    for key, piece in (("pad_token", "<pad>"), ("mask_token", "<mask>")):
        if specials.get(key) is None and piece in names:
            specials[key] = piece
    # normalized=True: matched in the normalised text, so the text around them is normalised in one piece
    # (sentencepiece never splits the text before normalising it)
    added = {k: AddedToken(v, normalized=True, special=True) for k, v in specials.items() if v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, clean_up_tokenization_spaces=False, **added)
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def _normalizer_and_pre_tokenizer(proto: Any) -> tuple[Any, Any]:
    """sentencepiece's normalisation in its order, and a pre-tokenizer splitting like its ``SplitIntoWords``.

    Two details make the ids agree where transformers' converter does not: leading whitespace is kept as one
    ``▁`` aligned with the start of the text, because ``Metaspace(prepend_scheme="first")`` adds the dummy
    prefix only when the normalised text still begins at offset 0; and no prefix is ever added by the
    normaliser, which also normalises the (``normalized=True``) special tokens' own text.
    """
    import re

    from tokenizers import Regex, normalizers, pre_tokenizers

    spec = proto.normalizer_spec
    space = "\u2581" if spec.escape_whitespaces else " "
    steps: list[Any] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" +\\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", space))
    if spec.add_dummy_prefix and not spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex("\\A" + space), space + space))
    pre: list[Any] = []
    prepend = "first" if spec.add_dummy_prefix else "never"
    pre.append(
        pre_tokenizers.Metaspace(replacement=space, prepend_scheme=prepend, split=spec.escape_whitespaces)
    )
    user = sorted((p.piece for p in proto.pieces if p.type == _SP_USER), key=len, reverse=True)
    if user:
        pattern = "|".join(re.escape(u) for u in user)
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    return normalizers.Sequence(steps), pre_tokenizers.Sequence(pre)


def export_tokenizer(source: str | Path, out_dir: str | Path) -> list[str]:
    """Write a tokenizer ``AutoTokenizer`` loads into ``out_dir``; returns the files written.

    ``source``: a sentencepiece ``.model`` file (exported as a fast tokenizer) or a Hugging Face tokenizer
    directory / ``tokenizer.json`` (copied as they are).
    """
    src, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        files = [f for f in HF_TOKENIZER_FILES if (src / f).is_file()]
        if not files:
            raise FileNotFoundError(
                f"{src}: no tokenizer files (expected one of {', '.join(HF_TOKENIZER_FILES[:3])} ...)"
            )
        for f in files:
            shutil.copyfile(src / f, out / f)
        return files
    if not src.is_file():
        raise FileNotFoundError(
            f"tokenizer {src}: not found (a sentencepiece .model or a tokenizer directory)"
        )
    if src.name == "tokenizer.json":
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(src))
    else:
        tok = sentencepiece_to_fast(src)
    tok.save_pretrained(str(out))
    config = out / "tokenizer_config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"  # no sentencepiece needed to load it
    config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sorted(p.name for p in out.iterdir() if p.name in HF_TOKENIZER_FILES)


def has_hf_tokenizer(path: str | Path) -> bool:
    p = Path(path)
    return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()


def vocabulary(tok: Any) -> list[str]:
    """Pieces by id of a framework tokenizer (``megatron_ki.data``) or a transformers tokenizer."""
    if hasattr(tok, "id_to_piece"):
        return [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    n = len(tok)
    return [tok.convert_ids_to_tokens(i) for i in range(n)]


def check_same_vocabulary(
    student: list[str],
    teacher: list[str],
    student_name: str,
    teacher_name: str,
    appended_ok: bool = False,
) -> None:
    """Refuse unless both vocabularies hold the same pieces under the same ids, naming the first difference.
    ``appended_ok`` (``data.accept_prefix_tokenizer``): the teacher's pieces may be the first of the student's."""
    for i, (a, b) in enumerate(zip(student, teacher)):
        if a != b:
            raise TokenizerMismatchError(
                f"teacher tokenizer ({teacher_name}) differs from the student's ({student_name}) at id {i}: "
                f"student {a!r}, teacher {b!r}; KI needs the same tokenizer"
            )
    if len(student) != len(teacher) and not (appended_ok and len(teacher) < len(student)):
        raise TokenizerMismatchError(
            f"teacher tokenizer ({teacher_name}) has {len(teacher)} tokens, the student's ({student_name}) "
            f"{len(student)}; KI needs the same tokenizer"
        )


def check_teacher_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None,
    teacher_dir: str | Path,
    teacher_rows: int | None = None,
    appended_ok: bool = False,
) -> None:
    """Refuse a Hugging Face teacher whose tokenizer is not the student's (``data.tokenizer_type/model``).

    Any tokenizer ``AutoTokenizer`` reads offline works, a family's ``tokenizer.json`` included (byte-level
    BPE with added special tokens, a vocabulary of any size). Only the tokenizers are compared: a teacher whose
    embedding has rows beyond its tokenizer (``teacher_rows``, Qwen's 151,936 for 151,665 tokens) fits, and
    ``check_teacher`` drops those rows; a teacher with fewer rows than its tokenizer has tokens is refused, as
    some token ids would have no embedding.
    """
    from transformers import AutoTokenizer

    from megatron_ki.data import build_tokenizer

    if not has_hf_tokenizer(teacher_dir):
        raise TokenizerMismatchError(
            f"ki.teacher_path hf:{teacher_dir}: no tokenizer.json / tokenizer_config.json there, so the teacher's "
            "tokenizer cannot be checked against the student's; add the teacher's tokenizer files"
        )
    if tokenizer_type in (None, "none") or not tokenizer_model:
        raise TokenizerMismatchError(
            f"ki.teacher_path hf:{teacher_dir}: data.tokenizer_type/tokenizer_model must name the student's "
            "tokenizer so the teacher's can be checked against it"
        )
    student = build_tokenizer(tokenizer_type, tokenizer_model)
    teacher = vocabulary(AutoTokenizer.from_pretrained(str(teacher_dir), local_files_only=True))
    check_same_vocabulary(vocabulary(student), teacher, str(tokenizer_model), str(teacher_dir), appended_ok)
    if teacher_rows is not None and teacher_rows < len(teacher):
        raise TokenizerMismatchError(
            f"ki.teacher_path hf:{teacher_dir}: the model has {teacher_rows} embedding rows, fewer than the "
            f"{len(teacher)} tokens of its tokenizer"
        )
