#!/usr/bin/env python
"""Convert checkpoints: framework -> Hugging Face, Hugging Face -> framework, and framework resharding.

Examples::

    # a checkpoint saved at any tp/pp/dp/ZeRO stage -> a Hugging Face directory (AutoModelFor*, AutoTokenizer)
    python tools/convert_checkpoint.py --to hf --load ckpt/run1 --save hf/run1 [--tag step00001000] \\
        [--tokenizer-model sp.model] [--dtype bfloat16] [--max-shard-size 5GB]
    # a Hugging Face directory -> a weights-only framework checkpoint at tp=2, pp=2 (fine-tune it, or use it as a
    # KI teacher; ``ki.teacher_path: hf:/dir`` also reads a Hugging Face directory directly)
    python tools/convert_checkpoint.py --from hf --load hf/llama --save ckpt/llama --target-tp 2 --target-pp 2
    # reshard a framework checkpoint (weights, step and consumed samples; not the optimizer state)
    python tools/convert_checkpoint.py --load ckpt/run1 --save ckpt/run1_tp4 --target-tp 4 --target-pp 1
    # either direction out of a bf16/fp16 run, with its fp32 master weights (gathered from the ZeRO / BF16
    # optimizer partitions of every data-parallel rank) instead of the model's working-dtype weights
    python tools/convert_checkpoint.py --to hf --weights master --load ckpt/run1 --save hf/run1_fp32

``--weights master`` is also what to use where DeepSpeed's ``zero_to_fp32.py`` cannot read a checkpoint
(bf16 + ZeRO-1 runs use DeepSpeed's BF16 optimizer, whose state it does not recognise; tp or pp > 1).

Weights are streamed tensor by tensor: Hugging Face safetensors are read one tensor at a time and written
shard by shard with headers planned from the config; pipeline-parallel checkpoints are read and written
one pipeline layer at a time. A pp = 1 framework checkpoint keeps the whole model in one file per TP rank,
which is memory-mapped (its pages count as resident while read). Every output is written to a temporary
sibling directory and renamed at the end: a failed conversion leaves nothing behind.

Supported model_types: gpt2, llama (rope_scaling llama3/linear/dynamic, attention_bias, mlp_bias), qwen2, qwen3,
mistral (sliding window: trained only with data.seq_length <= sliding_window), bert, roberta; anything else
is refused up front. Importing refuses a Hugging Face checkpoint that holds tensors its ``config.json`` mapping does not use
(e.g. Qwen2's q/k/v biases under a Llama config without ``attention_bias``) rather than drop them; only
buffers every model recomputes are skipped (rotary ``inv_freq``, GPT-2's causal-mask ``attn.bias``,
``position_ids``), and the pooler / next-sentence head of BERT and RoBERTa checkpoints are dropped with a
warning (see ``DERIVABLE_BUFFERS`` and ``UNUSED_HEADS`` in ``megatron_ki/convert/hf.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from megatron_ki.checkpoint_format import is_serialization_error, meta_config, write_failure
from megatron_ki.config import Config, DataConfig
from megatron_ki.convert import hf as hfc
from megatron_ki.convert.reshard import LazyFullState, MasterFullState, write_checkpoint
from megatron_ki.convert.tokenizer import export_tokenizer, has_hf_tokenizer
from megatron_ki.data.tokenizer_identity import FIELD as FINGERPRINT_FIELD
from megatron_ki.data.tokenizer_identity import (
    difference,
    fingerprint,
    read_hf_fingerprint,
    write_hf_fingerprint,
)
from megatron_ki.data.tokenizer_identity import valid as valid_fingerprint
from megatron_ki.dtypes import DTYPES
from megatron_ki.errors import MegatronKIError, add_debug_argument, run_main
from megatron_ki.fileio import atomic_dir

logger = logging.getLogger("convert_checkpoint")
PROG = "convert_checkpoint.py"


class ConversionError(MegatronKIError, ValueError):
    """A conversion cannot be done as asked; the message names the option, field or file."""


@contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Callable[[str], None]]:
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr) as bar:

        def step(name: str) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)

        yield step


@contextmanager
def _cleanup_if_created(path: Path) -> Iterator[None]:
    """Remove ``path`` on failure if this conversion created it (the atomic writers leave no partial tag)."""
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.exists():
            shutil.rmtree(path, ignore_errors=True)
        raise


def _open_state(load: str | Path, tag: str | None, weights: str) -> LazyFullState:
    """The checkpoint's full state: its model weights (``weights="model"``) or fp32 master weights."""
    if weights == "model":
        return LazyFullState(load, tag)
    if weights == "master":
        return MasterFullState(load, tag)
    raise ConversionError(f"--weights {weights!r}: expected 'model' or 'master'")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _tokenizer_source(meta: dict[str, Any], override: str | None) -> str | None:
    """The tokenizer to export: ``--tokenizer-model``, else the checkpoint's metadata, else its data config."""
    if override:
        if not Path(override).exists():
            raise ConversionError(f"--tokenizer-model {override}: not found")
        return override
    ref = meta.get("tokenizer") or {}
    data = meta.get("config", {}).get("data", {})
    kind = ref.get("type") or data.get("tokenizer_type")
    model = ref.get("model") or data.get("tokenizer_model")
    if kind in (None, "none") or not model:
        logger.warning("the checkpoint names no tokenizer: none written (pass --tokenizer-model)")
        return None
    if kind == "GPT2BPETokenizer":
        logger.warning(
            "GPT2BPETokenizer files are not recorded in the checkpoint: pass --tokenizer-model DIR"
        )
        return None
    if not Path(model).exists():
        raise ConversionError(
            f"tokenizer {model} (from the checkpoint's meta.json) not found: pass --tokenizer-model or "
            "--no-tokenizer"
        )
    return model


# ----------------------------------------------------------------------------------- framework -> HF
def export_hf(
    load: str | Path,
    save: str | Path,
    tag: str | None = None,
    tokenizer_model: str | None = None,
    no_tokenizer: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    weights: str = "model",
) -> Path:
    """Framework checkpoint (any tp/pp/dp/ZeRO stage) -> Hugging Face directory ``save``; returns it.
    ``weights="master"`` exports the fp32 master weights of a mixed-precision run."""
    import transformers

    state = _open_state(load, tag, weights)
    cfg = state.cfg
    if cfg.family not in hfc.MAPPINGS:
        raise ConversionError(f"model.family {cfg.family!r}: no Hugging Face mapping")
    out_dtype = _dtype(dtype) or state[next(iter(state))].dtype
    source = None if no_tokenizer else _tokenizer_source(state.meta, tokenizer_model)
    limit = hfc.parse_size(max_shard_size)
    save = Path(save)
    with atomic_dir(save) as tmp:
        tok = None
        if source is not None:
            export_tokenizer(source, tmp)
            tok = transformers.AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
            if len(tok) > cfg.vocab_size:
                raise ConversionError(
                    f"tokenizer {source} has {len(tok)} tokens, more than model.vocab_size={cfg.vocab_size}"
                )
        identity = _export_fingerprint(state.meta, source, state.folder)
        if identity is not None:
            write_hf_fingerprint(tmp, identity)  # a run using this export as hf: teacher checks against it
        hf_cfg = hfc.hf_config_for(cfg, out_dtype, tok, state.meta.get("eod_token_id"))
        hf_cfg.save_pretrained(str(tmp))
        if cfg.causal:
            transformers.GenerationConfig.from_model_config(hf_cfg).save_pretrained(str(tmp))
        n = len(hfc.rules_for(cfg))
        with _progress(n, "export", progress) as step:
            hfc.write_hf_weights(tmp, cfg, state, out_dtype, limit, on_tensor=step)
    return save


def _source_fingerprint(source: str | Path) -> dict[str, Any]:
    """The fingerprint of the tokenizer at ``source`` (a sentencepiece .model, a tokenizer dir or .json)."""
    from megatron_ki.data import build_tokenizer

    kind = "HuggingFaceTokenizer" if Path(source).is_dir() or str(source).endswith(".json") else None
    tok = build_tokenizer(kind or "SentencePieceTokenizer", str(source), option="--tokenizer-model")
    return fingerprint(tok)


def _export_fingerprint(meta: dict[str, Any], source: str | Path | None, folder: Path) -> dict | None:
    """What the export records of the model's tokenizer: the fingerprint its training recorded (the
    exported tokenizer must be that one), else the exported tokenizer's own."""
    recorded = meta.get(FINGERPRINT_FIELD)
    recorded = recorded if valid_fingerprint(recorded) else None
    if source is None:
        return recorded
    exported = _source_fingerprint(source)
    if recorded is None:
        return exported
    diff = difference(recorded, exported)
    if diff is not None:
        raise ConversionError(
            f"tokenizer {source} is not the one the checkpoint was trained with ({folder}/meta.json): {diff}; "
            "pass that tokenizer's --tokenizer-model"
        )
    return recorded


# ----------------------------------------------------------------------------------- HF -> framework
def import_hf(
    load: str | Path,
    save: str | Path,
    tp: int = 1,
    pp: int = 1,
    tag: str = "converted",
    make_vocab_size_divisible_by: int = 128,
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Hugging Face directory -> weights-only framework checkpoint at ``tp``/``pp`` under ``save``."""
    load = Path(load)
    cfg, state = hfc.open_hf_model(load, make_vocab_size_divisible_by, dtype=_dtype(dtype))
    for what, value in (("heads", cfg.num_attention_heads), ("key/value heads", cfg.kv_heads)):
        if value % tp:
            raise ConversionError(f"--target-tp {tp} does not divide the model's {what} ({value})")
    if cfg.ffn_size % tp:
        raise ConversionError(f"--target-tp {tp} does not divide the model's FFN size ({cfg.ffn_size})")
    if pp > cfg.num_layers:
        raise ConversionError(f"--target-pp {pp} is more than the model's {cfg.num_layers} layers")
    data = DataConfig()
    extra: dict[str, Any] = {"source": {"huggingface": str(load.resolve())}}
    eos = getattr(hfc.read_hf_config(load), "eos_token_id", None)
    if isinstance(eos, int) and not isinstance(eos, bool):  # its document end, as far as the model says
        extra["eod_token_id"] = eos
    if has_hf_tokenizer(load):
        data = DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(load.resolve()))
        extra["tokenizer"] = {"type": data.tokenizer_type, "model": data.tokenizer_model}
    identity, _ = read_hf_fingerprint(load)  # recorded by our export, else the tokenizer files' own
    if identity is None and has_hf_tokenizer(load):
        identity = _source_fingerprint(load)
    if identity is not None:
        extra[FINGERPRINT_FIELD] = identity
    config = Config(model=cfg, data=data)
    config.parallel.tensor_parallel, config.parallel.pipeline_parallel = tp, pp
    save = Path(save)
    with _cleanup_if_created(save), _progress(len(state) * tp, "import", progress) as step:
        state.on_load = step
        return write_checkpoint(state, config, save, tp, pp, tag=tag, extra_meta=extra)


# ---------------------------------------------------------------------------------------- reshard
def reshard(
    load: str | Path,
    save: str | Path,
    tp: int,
    pp: int,
    tag: str | None = None,
    out_tag: str | None = None,
    progress: bool = True,
    weights: str = "model",
) -> Path:
    """A framework checkpoint at another tp/pp (weights, step, consumed samples; no optimizer state);
    ``weights="master"`` writes the fp32 master weights of a mixed-precision run."""
    state = _open_state(load, tag, weights)
    meta = state.meta
    config = meta_config(meta)
    config.parallel.tensor_parallel, config.parallel.pipeline_parallel = tp, pp
    keep = {
        k: meta[k]
        for k in ("step", "consumed_samples", "tokenizer", "eod_token_id", FINGERPRINT_FIELD)
        if k in meta
    }
    keep["source"] = {"checkpoint": str(state.folder.resolve()), "layout": meta["layout"]}
    save = Path(save)
    if save.resolve() == Path(load).resolve():
        raise ConversionError("--save must differ from --load when resharding (the source is read lazily)")
    with _cleanup_if_created(save), _progress(len(state) * tp, "reshard", progress) as step:
        state.on_load = step
        return write_checkpoint(
            state, config, save, tp, pp, tag=out_tag or state.folder.name, extra_meta=keep
        )


# -------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = p.add_mutually_exclusive_group()
    direction.add_argument(
        "--to", choices=["hf"], help="export a framework checkpoint to Hugging Face format"
    )
    direction.add_argument(
        "--from", dest="from_", choices=["hf"], help="import a Hugging Face model directory"
    )
    p.add_argument(
        "--load", required=True, help="source: framework checkpoint root or Hugging Face directory"
    )
    p.add_argument("--save", required=True, help="destination directory (written atomically)")
    p.add_argument("--tag", default=None, help="checkpoint tag to read (default: the 'latest' file)")
    p.add_argument("--target-tp", type=int, default=None, help="tensor-parallel size of the framework output")
    p.add_argument("--target-pp", type=int, default=None, help="pipeline stages of the framework output")
    p.add_argument("--out-tag", default=None, help="tag of the framework output (default: converted / same)")
    p.add_argument(
        "--tokenizer-model", default=None, help="sentencepiece .model or HF tokenizer dir to export"
    )
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument(
        "--weights",
        choices=["model", "master"],
        default="model",
        help="model: the weights in the model's working dtype (default); master: the fp32 master weights of a "
        "bf16/fp16 run, gathered from its ZeRO/BF16 optimizer partitions (needs a checkpoint saved by training)",
    )
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast weights (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
    p.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128, help="vocabulary padding of imported models"
    )
    p.add_argument("--no-progress", action="store_true", help="no per-tensor progress bar")
    add_debug_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: an expected failure (a missing, truncated or unfitting input, a full disk) is one line
    on stderr and exit code 1; ``--debug`` shows its traceback."""
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    try:
        for flag, value in (("--target-tp", args.target_tp), ("--target-pp", args.target_pp)):
            if value is not None and value < 1:
                raise ConversionError(f"{flag} must be >= 1, got {value}")
        if args.to == "hf":
            if args.target_tp is not None or args.target_pp is not None:
                raise ConversionError("--target-tp/--target-pp do not apply to --to hf")
            out = export_hf(
                args.load,
                args.save,
                args.tag,
                args.tokenizer_model,
                args.no_tokenizer,
                args.dtype,
                args.max_shard_size,
                progress,
                args.weights,
            )
        elif args.from_ == "hf":
            if args.weights != "model":
                raise ConversionError("--weights master reads a framework checkpoint: not with --from hf")
            out = import_hf(
                args.load,
                args.save,
                args.target_tp or 1,
                args.target_pp or 1,
                args.out_tag or "converted",
                args.make_vocab_size_divisible_by,
                args.dtype,
                progress,
            )
        else:
            if args.target_tp is None and args.target_pp is None:
                raise ConversionError("give --to hf, --from hf, or --target-tp/--target-pp to reshard")
            meta_layout = LazyFullState(args.load, args.tag).meta["layout"]
            out = reshard(
                args.load,
                args.save,
                args.target_tp or meta_layout["tp"],
                args.target_pp or meta_layout["pp"],
                args.tag,
                args.out_tag,
                progress,
                args.weights,
            )
    except MegatronKIError:
        raise
    except (ValueError, KeyError) as e:  # the Hugging Face mappings' refusals name the tensor or field
        raise ConversionError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
    except RuntimeError as e:
        if not is_serialization_error(e):
            raise
        raise ConversionError(
            f"--save {args.save}: could not write it: {write_failure(e, Path(args.save), 0)}"
        ) from e
    print(json.dumps({"saved": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
