"""What a tokenizer *is*, by content: a fingerprint recorded beside data, in checkpoints and in targets.

Two sentencepiece models of the same size trained on other corpora give the same ids to other words; a path
or a vocabulary size cannot tell them apart, so a teacher, a dataset or offline targets made with one and
used with the other train silently on garbage. The fingerprint (:func:`fingerprint`) is a small JSON dict:

- ``sha256``: over the pieces in id order and the special ids (unk, bos, eos, pad, mask): the identity;
- ``vocab_size``, ``specials``: kept in clear, so a mismatch can say how the two differ;
- ``piece_hashes``: two hex digits per id (8 bits of the piece's hash), enough to name the first differing
  id of two fingerprints (an 8-bit collision makes a later id be named, never a false match: ``sha256``
  decides equality);
- ``pieces_sha256``: over the pieces alone, so a live tokenizer can check that another's pieces are a
  prefix of its own (:func:`compare` with ``appended_ok``);
- ``scores_sha256`` (sentencepiece only): scores and types, which decide how text is split; compared only
  when both sides have it.

The same vocabulary read as a sentencepiece model or as its Hugging Face export has the same ``sha256``: only
pieces and the five special ids go into it, which both readings agree on.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from typing import Any

from megatron_ki.errors import MegatronKIError

FINGERPRINT_VERSION = 1
FIELD = "tokenizer_fingerprint"
"""The key under which the fingerprint is recorded (``.stats.json``, checkpoint meta, targets header, HF)."""
SPECIALS = ("unk", "bos", "eos", "pad", "mask")


def _pieces(tok: Any) -> list[str]:
    if hasattr(tok, "sp"):  # sentencepiece: straight from the model
        return [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    return [str(tok.id_to_piece(i) or "") for i in range(tok.vocab_size)]


def _specials(tok: Any) -> dict[str, int | None]:
    return {name: None if getattr(tok, name) is None else int(getattr(tok, name)) for name in SPECIALS}


def _pieces_digest(pieces: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in pieces:
        b = p.encode("utf-8", "surrogatepass")
        h.update(struct.pack("<I", len(b)))
        h.update(b)
    return h.hexdigest()


def _piece_hashes(pieces: Sequence[str]) -> str:
    return "".join(hashlib.sha256(p.encode("utf-8", "surrogatepass")).hexdigest()[:2] for p in pieces)


def _identity(pieces_sha256: str, specials: dict[str, int | None]) -> str:
    return hashlib.sha256(f"{pieces_sha256}|{json.dumps(specials, sort_keys=True)}".encode()).hexdigest()


def fingerprint(tok: Any, pieces: Sequence[str] | None = None) -> dict[str, Any]:
    """The fingerprint of ``tok``, a ``megatron_ki.data`` tokenizer (:func:`~megatron_ki.data.build_tokenizer`;
    a Hugging Face directory is read as ``HuggingFaceTokenizer``, whose special ids follow the same rules).
    ``pieces``: :func:`pieces_of` ``tok`` when the caller has them already (a 150k vocabulary takes a second)."""
    pieces = _pieces(tok) if pieces is None else pieces
    specials = _specials(tok)
    pieces_sha = _pieces_digest(pieces)
    out: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "sha256": _identity(pieces_sha, specials),
        "vocab_size": len(pieces),
        "specials": specials,
        "pieces_sha256": pieces_sha,
        "piece_hashes": _piece_hashes(pieces),
    }
    sp = getattr(tok, "sp", None)
    if sp is not None:
        h = hashlib.sha256()
        for i in range(len(pieces)):
            kind = (sp.is_unknown(i), sp.is_control(i), sp.is_unused(i), sp.is_byte(i))
            h.update(struct.pack("<f4?", float(sp.get_score(i)), *kind))
        out["scores_sha256"] = h.hexdigest()
    return out


def valid(fp: Any) -> bool:
    """Whether ``fp`` is a fingerprint these tools wrote (anything else counts as not recorded)."""
    return (
        isinstance(fp, dict)
        and fp.get("version") == FINGERPRINT_VERSION
        and isinstance(fp.get("sha256"), str)
        and isinstance(fp.get("vocab_size"), int)
        and isinstance(fp.get("piece_hashes"), str)
        and isinstance(fp.get("specials"), dict)
    )


def difference(
    a: dict[str, Any],
    b: dict[str, Any],
    a_pieces: Sequence[str] | None = None,
    appended_ok: bool = False,
    a_name: str = "the first",
) -> str | None:
    """How tokenizer ``b`` differs from ``a`` in words, or None when they are the same.

    ``a_pieces``: ``a``'s pieces, when ``a`` is a live tokenizer (names the piece at the differing id, and
    makes the prefix check exact). ``appended_ok``: ``b`` may be shorter when its pieces are the first of
    ``a``'s and its special ids are ``a``'s (``a`` appended pieces to ``b``).
    """
    if a["sha256"] == b["sha256"]:
        if a.get("scores_sha256") and b.get("scores_sha256") and a["scores_sha256"] != b["scores_sha256"]:
            return "the same pieces, but other piece scores/types (text is split into other pieces)"
        return None
    na, nb = a["vocab_size"], b["vocab_size"]
    if a["specials"] != b["specials"]:
        diffs = [
            f"{k} id {a['specials'].get(k)} vs {b['specials'].get(k)}"
            for k in SPECIALS
            if a["specials"].get(k) != b["specials"].get(k)
        ]
        return "special ids differ: " + ", ".join(diffs)
    ha, hb = a["piece_hashes"], b["piece_hashes"]
    first = next((i for i in range(min(na, nb)) if ha[2 * i : 2 * i + 2] != hb[2 * i : 2 * i + 2]), None)
    if (
        first is None
        and appended_ok
        and nb < na
        and (a_pieces is None or _pieces_digest(a_pieces[:nb]) == b.get("pieces_sha256"))
    ):
        return None  # b's pieces begin a's: a appended pieces
    size = f"{na} vs {nb} pieces"
    if first is None:
        if na != nb:
            return f"{size}; the first {min(na, nb)} are the same"
        return f"{size}; the pieces differ (same size, same special ids)"
    piece = f" ({a_pieces[first]!r} in {a_name})" if a_pieces is not None else ""
    return f"{size}; first different piece at id {first}{piece}"


def pieces_of(tok: Any) -> list[str]:
    """The pieces of a live tokenizer by id (for :func:`difference`'s ``a_pieces``)."""
    return _pieces(tok)


class TokenizerIdentityError(MegatronKIError, ValueError):
    """Two things read together were made with tokenizers of different content; names both and how."""


def recorded_in_stats(prefix: str | os.PathLike) -> dict[str, Any] | None:
    """The fingerprint the ``.stats.json`` sidecar of ``prefix`` records; None when it records none (no
    sidecar, or one written before fingerprints)."""
    from megatron_ki.data.indexed import read_stats

    fp = (read_stats(prefix) or {}).get(FIELD)
    return fp if valid(fp) else None


def datasets_fingerprint(
    prefixes: Sequence[str | os.PathLike],
) -> tuple[tuple[dict[str, Any], str] | None, list[str]]:
    """``((fingerprint, its sidecar) | None, sidecars without one)`` of datasets read together (a blend, a
    merge): they must all have been made with one tokenizer, else :class:`TokenizerIdentityError` naming the
    first two that differ. Datasets without a recorded fingerprint never conflict (the caller warns)."""
    from megatron_ki.data.indexed import stats_path

    first: tuple[dict[str, Any], str] | None = None
    unrecorded: list[str] = []
    for prefix in prefixes:
        fp = recorded_in_stats(prefix)
        where = stats_path(prefix)
        if fp is None:
            unrecorded.append(where)
            continue
        if first is None:
            first = (fp, where)
            continue
        diff = difference(first[0], fp)
        if diff is not None:
            raise TokenizerIdentityError(
                f"dataset {prefix} was made with another tokenizer than {first[1][: -len('.stats.json')]} "
                f"({where} vs {first[1]}: {diff}); datasets read together need one tokenizer: "
                "preprocess them again with the same --tokenizer-model"
            )
    return first, unrecorded


def unrecorded_warning(what: Sequence[str]) -> str:
    """The one warning line for inputs written before fingerprints (accepted, not checked)."""
    shown = ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "")
    return (
        f"warning: no tokenizer fingerprint recorded in {shown} (written before tokenizer identity was "
        "recorded): its tokenizer is not checked"
    )


HF_FILE = "tokenizer_fingerprint.json"
"""Beside a Hugging Face export's tokenizer files: the fingerprint of the tokenizer the model was trained with."""


def read_hf_fingerprint(hf_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, str]:
    """``(fingerprint | None, its file)`` recorded in a Hugging Face directory by the export."""
    path = os.path.join(os.fspath(hf_dir), HF_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            fp = json.load(f)
    except (OSError, ValueError):
        return None, path
    return (fp if valid(fp) else None), path


def write_hf_fingerprint(hf_dir: str | os.PathLike, fp: dict[str, Any]) -> str:
    """Record ``fp`` in a Hugging Face directory (atomically); returns the file."""
    from megatron_ki.fileio import write_text_atomic

    path = os.path.join(os.fspath(hf_dir), HF_FILE)
    write_text_atomic(path, json.dumps(fp, sort_keys=True) + "\n")
    return path
