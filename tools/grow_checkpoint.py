#!/usr/bin/env python
"""Grow a trained model into a larger student that starts where the teacher is (bert2BERT, HyperCloning,
G_stack), written as a weights-only framework checkpoint of the student's shape at any tp x pp layout.

Examples::

    # a framework checkpoint (any tp/pp) -> the student of student.yaml, tp=1 x pp=2 (its parallel group)
    python tools/grow_checkpoint.py --load ckpt/teacher --config student.yaml --save ckpt/grown
    # a Hugging Face model, with another layout and exact copies (no symmetry-breaking noise)
    python tools/grow_checkpoint.py --load hf:models/llama --config big.yaml --save ckpt/grown \\
        --target-tp 2 --target-pp 2 --noise 0
    # then train from it (step 0, a fresh optimizer, the configured warm-up), alone or with KI from the teacher
    CONFIG=student.yaml bash launch/pretrain_ki.sh --checkpoint.init_from ckpt/grown \\
        --ki.enabled true --ki.teacher_path ckpt/teacher

Width (hidden size, FFN, query and key/value heads) grows by integer factors and keeps the function exactly
(``megatron_ki/convert/grow.py`` says how); non-integer factors are refused. Depth: ``--depth identity``
(default) inserts copies with zeroed output projections, exact for pre-LN models (GPT-2, Llama, Qwen) and
approximate for post-LN BERT/RoBERTa, whose LayerNorms still apply; ``stack`` (G_stack) and ``interleave``
(bert2BERT's AKI order) copy trained layers and change the function. ``--noise`` (default 0.01 of each tensor's
standard deviation, zero-sum over each group of copies: still function-preserving) lets the copies diverge in
training; ``--noise 0`` keeps them exact copies, which receive equal gradients and never diverge.

Everything is checked before anything is written: the student's config (family, vocabulary, positions, norms,
biases, head width) against the teacher's, and its tokenizer (``data.tokenizer_type/model`` of the config)
against the teacher's. The output is written to a temporary sibling and renamed: a failure leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ki.config import ConfigError, load_config
from megatron_ki.convert.grow import (
    DEPTH_MODES,
    GrowError,
    check_same_tokenizer,
    depth_is_exact,
    grow_state_dict,
    open_source,
    plan_growth,
    source_fingerprint,
)
from megatron_ki.convert.reshard import write_checkpoint
from megatron_ki.data.tokenizer_identity import FIELD as FINGERPRINT_FIELD
from megatron_ki.errors import add_debug_argument, run_main

logger = logging.getLogger("grow_checkpoint")
PROG = "grow_checkpoint.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the teacher: a framework checkpoint root, or hf:DIR")
    p.add_argument("--tag", default=None, help="checkpoint tag to read (default: the 'latest' file)")
    p.add_argument(
        "--config", required=True, action="append", help="the student's YAML config (repeat to compose)"
    )
    p.add_argument("--save", required=True, help="destination checkpoint directory (must not hold one)")
    p.add_argument("--target-tp", type=int, default=None, help="tensor-parallel size (default: the config's)")
    p.add_argument("--target-pp", type=int, default=None, help="pipeline stages (default: the config's)")
    p.add_argument("--depth", choices=DEPTH_MODES, default="identity", help="how layers are added")
    p.add_argument(
        "--noise",
        type=float,
        default=0.01,
        help="zero-sum noise per group of copies, relative to each tensor's standard deviation (0: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out-tag", default="grown", help="tag of the output checkpoint")
    add_debug_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: a student that cannot be grown, a missing or unreadable input, is one line on
    stderr (exit 2 for a configuration that does not fit, 1 for a file); ``--debug`` shows the traceback."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args, overrides = build_parser().parse_known_args(argv)
    for flag, value in (("--target-tp", args.target_tp), ("--target-pp", args.target_pp)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    if not 0.0 <= args.noise < 1.0:
        raise ConfigError("--noise", f"must be in [0, 1), got {args.noise}")
    config = load_config(args.config, overrides)
    student = config.model
    save = Path(args.save)
    if save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise GrowError(f"--save {save}: exists and is not an empty directory; choose a new directory")
    teacher, state, meta = open_source(args.load, student.make_vocab_size_divisible_by, args.tag)
    plan = plan_growth(teacher, student, args.depth)
    check_same_tokenizer(args.load, meta, config.data)
    tp = args.target_tp or config.parallel.tensor_parallel
    pp = args.target_pp or config.parallel.pipeline_parallel
    exact = depth_is_exact(student, plan)
    if not exact:
        why = (
            "post-LN blocks apply their LayerNorms on a zeroed branch"
            if args.depth == "identity"
            else f"--depth {args.depth} copies trained layers"
        )
        logger.warning("the grown model does not compute the teacher's function exactly: %s", why)
    grown = grow_state_dict(state, teacher, student, args.depth, args.noise, args.seed)
    extra = {
        "grown_from": {
            "source": args.load,
            "tag": getattr(getattr(state, "folder", None), "name", None),
            "teacher_step": meta.get("step"),
            "depth": args.depth,
            "noise": args.noise,
            "seed": args.seed,
            "factors": {
                "hidden": plan.hidden,
                "q_heads": plan.q_heads,
                "kv_heads": plan.kv_heads,
                "ffn": plan.ffn,
            },
            "layers": [list(x) for x in plan.layers],
            "function_preserving": exact,
        }
    }
    if meta.get("eod_token_id") is not None:
        extra["eod_token_id"] = meta["eod_token_id"]
    recorded = source_fingerprint(args.load, meta)
    if recorded is not None:  # the grown student's data, teachers and targets are checked against it
        extra[FINGERPRINT_FIELD] = recorded
    out = write_checkpoint(grown, config, save, tp, pp, tag=args.out_tag, extra_meta=extra)
    logger.info(
        "grew %s (%d layers x %d) into %d layers x %d at tp=%d pp=%d: %s",
        args.load,
        teacher.num_layers,
        teacher.hidden_size,
        student.num_layers,
        student.hidden_size,
        tp,
        pp,
        out,
    )
    print(json.dumps({"saved": str(out), "function_preserving": exact}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
