#!/usr/bin/env python
"""Merge several MMIDIDX datasets into one, streaming, keeping every document boundary.

Example::

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document [--vocab-size 32000]

or ``--input-dir DIR`` to merge every ``*.idx`` prefix in a directory (sorted by name).

The inputs must come from the same tokenizer, and MMIDIDX files do not record which one made them: the
merge refuses inputs whose token dtypes differ (uint16 for a vocabulary under 65500, int32 above) and, with
``--vocab-size N``, any token id outside ``[0, N)``; it cannot tell apart two vocabularies of similar size.
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.data.indexed import IndexedDatasetError, bin_path, idx_path, merge_datasets


def _missing(prefix: str) -> str | None:
    """A one-line reason when ``prefix`` is not a complete pair, naming the file(s) that are missing."""
    missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
    if not missing:
        return None
    if len(missing) == 2:
        return f"dataset {prefix}: neither {missing[0]} nor {missing[1]} found"
    present = bin_path(prefix) if missing[0] == idx_path(prefix) else idx_path(prefix)
    return f"dataset {prefix}: {missing[0]} not found ({present} is there; expected both files)"


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 1:
        print(f"error: --vocab-size must be >= 1, got {args.vocab_size}", file=sys.stderr)
        return 1
    if args.input_dir:
        prefixes = sorted(f[: -len(".idx")] for f in glob.glob(os.path.join(args.input_dir, "*.idx")))
    else:
        prefixes = [x.removesuffix(".bin").removesuffix(".idx") for x in args.input]
    if not prefixes:
        print(f"error: --input-dir {args.input_dir}: no .idx files found", file=sys.stderr)
        return 1
    for prefix in prefixes:
        reason = _missing(prefix)
        if reason is not None:
            print(f"error: {reason}", file=sys.stderr)
            return 1
    if os.path.abspath(args.output_prefix) in {os.path.abspath(x) for x in prefixes}:
        print("error: --output-prefix must differ from every input", file=sys.stderr)
        return 1
    try:
        out = merge_datasets(prefixes, args.output_prefix, args.vocab_size)
    except (IndexedDatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}: {out.num_documents} documents, "
        f"{len(out)} sequences, {out.num_tokens} tokens ({out.dtype.name})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
