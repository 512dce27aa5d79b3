#!/usr/bin/env python
"""Build the embedded demo corpus from text every Python installation has: the standard library.

One document per docstring (module, class and function docstrings of the running interpreter's standard
library ``.py`` files, found with ``ast``, so nothing is imported or executed), and with ``--mode files`` or
``both`` one document per source file. Files are visited in sorted order and docstrings in source order, so
the output is byte-for-byte deterministic for a given Python. Written as ``.jsonl`` with ``text`` and
``source`` keys, ready for tools/train_tokenizer.py and tools/preprocess_data.py.

Example::

    python tools/build_demo_corpus.py --output data/demo.jsonl
"""

import argparse
import ast
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.errors import MegatronKIError, add_debug_argument, describe_os_error, run_main
from megatron_ki.fileio import atomic_write

PROG = "build_demo_corpus.py"

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}


def stdlib_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def documents(root: str, mode: str, min_chars: int) -> Iterator[dict]:
    for path in stdlib_files(root):
        rel = os.path.relpath(path, root)
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if mode in ("files", "both") and len(source) >= min_chars:
            yield {"text": source, "source": rel}
        if mode not in ("docstrings", "both"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=rel)
        except (SyntaxError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                name = getattr(node, "name", "<module>")
                yield {"text": doc, "source": f"{rel}:{name}"}


def main(argv: list[str] | None = None) -> int:
    """An expected failure is one line on stderr and exit code 1."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="output .jsonl file")
    p.add_argument("--mode", choices=("docstrings", "files", "both"), default="docstrings")
    p.add_argument("--min-chars", type=int, default=64, help="drop documents shorter than this")
    p.add_argument("--max-docs", type=int, default=0, help="stop after this many documents (0: all)")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard-library directory")
    add_debug_argument(p)
    args = p.parse_args(argv)
    if not os.path.isdir(args.stdlib):
        raise MegatronKIError(f"--stdlib {args.stdlib}: not a directory, expected Python's standard library")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MegatronKIError(f"--output {args.output}: {out_dir} is a file, expected the output directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise MegatronKIError(f"--output {args.output}: cannot create {out_dir}: {e.strerror}") from None
    n = chars = 0
    try:
        with atomic_write(args.output) as f:
            for doc in documents(args.stdlib, args.mode, args.min_chars):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                n += 1
                chars += len(doc["text"])
                if args.max_docs and n >= args.max_docs:
                    break
    except OSError as e:
        raise MegatronKIError(
            f"--output {args.output}: cannot write the corpus ({describe_os_error(e)})"
        ) from e
    print(
        f"wrote {args.output}: {n} documents, {chars} characters (Python {sys.version.split()[0]}, {args.mode})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
