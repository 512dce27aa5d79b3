#!/usr/bin/env python
"""Merge several MMIDIDX datasets into one, streaming, keeping every document boundary.

Example::

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

or ``--input-dir DIR`` to merge every ``*.idx`` prefix in a directory (sorted by name).
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.data.indexed import IndexedDatasetError, dataset_exists, merge_datasets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="dataset prefixes (without .bin/.idx), merged in this order")
    src.add_argument("--input-dir", help="merge every prefix with an .idx in this directory, sorted by name")
    p.add_argument("--output-prefix", required=True, help="writes {output_prefix}.bin/.idx")
    args = p.parse_args(argv)
    if args.input_dir:
        prefixes = sorted(f[: -len(".idx")] for f in glob.glob(os.path.join(args.input_dir, "*.idx")))
    else:
        prefixes = [x.removesuffix(".bin").removesuffix(".idx") for x in args.input]
    if not prefixes:
        print(f"error: no .idx files in {args.input_dir}", file=sys.stderr)
        return 1
    for prefix in prefixes:
        if not dataset_exists(prefix):
            print(f"error: {prefix}.bin/.idx not found", file=sys.stderr)
            return 1
    if os.path.abspath(args.output_prefix) in {os.path.abspath(x) for x in prefixes}:
        print("error: --output-prefix must differ from every input", file=sys.stderr)
        return 1
    try:
        out = merge_datasets(prefixes, args.output_prefix)
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
