#!/usr/bin/env python
"""Merge several MMIDIDX datasets into one, streaming, keeping every document boundary.

Example::

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document [--vocab-size 32000]

or ``--input-dir DIR`` to merge every ``*.idx`` prefix in a directory (sorted by name).

The inputs must come from the same tokenizer, and MMIDIDX files do not record which one made them: the
merge refuses inputs whose token dtypes differ (uint16 for a vocabulary under 65500, int32 above), inputs
whose ``.stats.json`` sidecars (written by tools/preprocess_data.py) name different tokenizers or vocabulary
sizes or record different document separators (``eod_token_id``, e.g. the eos of one run and ``--eod-token
'<eod>'`` of another: a blend must have one), and, with ``--vocab-size N``, any token id outside ``[0, N)``;
without sidecars it cannot tell apart two vocabularies of similar size, and an input without a sidecar (or
whose sidecar predates ``eod_token_id``) has an unknown separator. The output gets its own sidecar (token
count, largest id, and ``eod_token_id`` when every input records the same one). Inputs whose sidecars record
different ``tokenizer_fingerprint`` (the tokenizer's content: pieces and special ids) are refused naming the
first differing piece's id; the output records it when every input does (inputs without one: a warning).
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.data.indexed import (
    bin_path,
    idx_path,
    merge_datasets,
    read_stats,
    recorded_eods,
    stats_path,
)
from megatron_ki.data.preprocess import check_output_dir, write_error
from megatron_ki.data.tokenizer_identity import FIELD as FINGERPRINT_FIELD
from megatron_ki.data.tokenizer_identity import (
    TokenizerIdentityError,
    datasets_fingerprint,
    unrecorded_warning,
)
from megatron_ki.errors import MegatronKIError, UsageError, add_debug_argument, run_main

PROG = "merge_datasets.py"
TOKENIZER_FIELDS = ("tokenizer_type", "vocab_size")
"""Sidecar fields that must agree between inputs (the model path may differ between copies of one model)."""


class MergeError(MegatronKIError):
    """An input is missing or does not fit the others."""


def _missing(prefix: str) -> str | None:
    """A one-line reason when ``prefix`` is not a complete pair, naming the file(s) that are missing."""
    missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
    if not missing:
        return None
    if len(missing) == 2:
        return f"dataset {prefix}: neither {missing[0]} nor {missing[1]} found"
    present = bin_path(prefix) if missing[0] == idx_path(prefix) else idx_path(prefix)
    return f"dataset {prefix}: {missing[0]} not found ({present} is there; expected both files)"


def _tokenizer_of(prefixes: list[str]) -> dict:
    """The tokenizer fields the inputs' sidecars agree on; a disagreement is a MergeError naming both."""
    seen: dict[str, tuple[object, str]] = {}
    for prefix in prefixes:
        stats = read_stats(prefix) or {}
        for key in (*TOKENIZER_FIELDS, "tokenizer_model"):
            value = stats.get(key)
            if value is None:
                continue
            if key in seen and seen[key][0] != value and key in TOKENIZER_FIELDS:
                first_value, first = seen[key]
                raise MergeError(
                    f"dataset {prefix}: {key} is {value} ({stats_path(prefix)}) but {first_value} for {first}; "
                    "expected every input to come from the same tokenizer"
                )
            seen.setdefault(key, (value, prefix))
    return {k: v for k, (v, _) in seen.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="dataset prefixes (without .bin/.idx), merged in this order")
    src.add_argument("--input-dir", help="merge every prefix with an .idx in this directory, sorted by name")
    p.add_argument("--output-prefix", required=True, help="writes {output_prefix}.bin/.idx")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="refuse inputs with a token id outside [0, N) (the tokenizer's vocabulary size)",
    )
    add_debug_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """An expected failure is one line on stderr and exit code 1 (2: a bad option)."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UsageError(f"--vocab-size {args.vocab_size}: expected a positive number of tokens")
    if args.input_dir:
        if not os.path.isdir(args.input_dir):
            raise MergeError(f"--input-dir {args.input_dir}: not a directory")
        prefixes = sorted(f[: -len(".idx")] for f in glob.glob(os.path.join(args.input_dir, "*.idx")))
        if not prefixes:
            raise MergeError(f"--input-dir {args.input_dir}: no .idx files found")
    else:
        prefixes = [x.removesuffix(".bin").removesuffix(".idx") for x in args.input]
    for prefix in prefixes:
        reason = _missing(prefix)
        if reason is not None:
            raise MergeError(reason)
    if os.path.abspath(args.output_prefix) in {os.path.abspath(x) for x in prefixes}:
        raise UsageError(f"--output-prefix {args.output_prefix}: is also an input; expected a new prefix")
    tokenizer = _tokenizer_of(prefixes)
    recorded_eods(prefixes)  # different separators: refused before the output directory is touched
    try:
        identity, unrecorded = datasets_fingerprint(prefixes)  # same tokenizer content, not just size
    except TokenizerIdentityError as e:
        raise MergeError(str(e)) from None
    if unrecorded:
        print(f"{PROG}: {unrecorded_warning(unrecorded)}", file=sys.stderr)
    check_output_dir(args.output_prefix, error=MergeError)
    stats = {"source": PROG, **tokenizer, "inputs": [os.path.abspath(p) for p in prefixes]}
    if identity is not None and not unrecorded:
        stats[FINGERPRINT_FIELD] = identity[0]
    try:
        out = merge_datasets(prefixes, args.output_prefix, args.vocab_size, stats=stats)
    except MegatronKIError:
        raise
    except OSError as e:
        raise write_error(e, args.output_prefix) from e
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}: {out.num_documents} documents, "
        f"{len(out)} sequences, {out.num_tokens} tokens ({out.dtype.name})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
