"""CPU forward+backward time of one attention layer for the three attention backends (sdpa, eager, fused_softmax).

Two timings per case, both forward + backward with a fixed random output gradient:
  core   ``megatron_ki.models.core_attention`` on q, k, v ``[b, heads, s, head_dim]`` (the part the backend
         swaps: scores, mask, softmax, probabilities x V);
  layer  the whole ``SelfAttention`` module (fused QKV projection, core attention, output projection) on
         ``[b, s, heads * head_dim]``, tp=1.
Masks: ``causal`` (no padding: SDPA's is_causal / the upper-triangular kernel), ``causal_padded`` and
``padded`` (bidirectional) with row lengths drawn between s/2 and s (row 0 unpadded). The backends run
round-robin inside each repetition so load from other processes spreads evenly; the median is reported. The
last column is the largest |output - sdpa output| of the core attention over the non-padded queries.

    python benchmarks/bench_attention.py                        # b=4, heads=8, s=512, head_dim=64, fp32+bf16
    python benchmarks/bench_attention.py --seq 128 --reps 2     # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from megatron_ki.config import ModelConfig
from megatron_ki.kernels import load_cpu_extension
from megatron_ki.models import core_attention
from megatron_ki.models.transformer import SelfAttention

BACKENDS = ("sdpa", "eager", "fused_softmax")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MASKS = ("causal", "causal_padded", "padded")


def padding_mask(batch: int, seq: int, masks: str, g: torch.Generator) -> torch.Tensor | None:
    """Bool ``[b, s]`` keep mask (True = attend), right padding, or None for the unpadded case."""
    if masks == "causal":
        return None
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    return torch.arange(seq)[None, :] < lengths[:, None]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def core_step(args, masks: str, dtype: torch.dtype, backend: str) -> tuple[Callable[[], None], torch.Tensor]:
    """A closure running forward+backward of core_attention, and the output of one forward (for checks)."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
    grad_out = torch.randn(*shape, generator=g).to(dtype)
    pad = padding_mask(args.batch, args.seq, masks, g)
    kw = dict(causal=masks != "padded", padding_mask=pad, dropout_p=0.0, backend=backend)
    scale = args.head_dim**-0.5

    def step() -> None:
        out = core_attention(q, k, v, scale=scale, **kw)
        out.backward(grad_out)
        q.grad = k.grad = v.grad = None

    with torch.no_grad():
        out = core_attention(q, k, v, scale=scale, **kw)
    if pad is not None:  # compare only queries that are real tokens
        out = out.float() * pad[:, None, :, None]
    return step, out.float()


def layer_step(args, masks: str, dtype: torch.dtype, backend: str) -> Callable[[], None]:
    """A closure running forward+backward of one SelfAttention module (tp=1)."""
    hidden = args.heads * args.head_dim
    cfg = ModelConfig(
        family="gpt2" if masks != "padded" else "bert",
        hidden_size=hidden,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq,
        attention_backend=backend,
        params_dtype="float32" if dtype == torch.float32 else "bfloat16",
    )
    torch.manual_seed(0)
    layer = SelfAttention(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, hidden, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(args.batch, args.seq, hidden, generator=g).to(dtype)
    pad = padding_mask(args.batch, args.seq, masks, g)

    def step() -> None:
        layer(x, pad).backward(grad_out)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return step


def time_round_robin(steps: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per step of each closure; the closures alternate inside every repetition."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if load_cpu_extension() is None:
        raise SystemExit(
            "bench_attention: the CPU extension did not build; fused_softmax would time the reference"
        )

    rows = []
    for masks in args.masks:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            core, outs = {}, {}
            for backend in BACKENDS:
                core[backend], outs[backend] = core_step(args, masks, dtype, backend)
            core_t = time_round_robin(core, args.warmup, args.reps)
            layer = {backend: layer_step(args, masks, dtype, backend) for backend in BACKENDS}
            layer_t = time_round_robin(layer, args.warmup, args.reps)
            for backend in BACKENDS:
                err = (outs[backend] - outs["sdpa"]).abs().max().item()
                rows.append((masks, dtype_name, backend, core_t[backend], layer_t[backend], err))
            print(f"done {masks} {dtype_name}", file=sys.stderr, flush=True)

    print(
        f"b={args.batch}, heads={args.heads}, s={args.seq}, head_dim={args.head_dim}; forward+backward, "
        f"median of {args.reps} after {args.warmup} warm-up; torch {torch.__version__}, "
        f"{args.threads} threads, {cpu_name()}\n"
    )
    print(
        "| mask | dtype | backend | core attention ms | attention layer ms | core vs eager | max abs diff vs sdpa |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    eager = {(m, d): c for m, d, b, c, _, _ in rows if b == "eager"}
    for masks, dtype_name, backend, core_s, layer_s, err in rows:
        ratio = eager[(masks, dtype_name)] / core_s
        print(
            f"| {masks} | {dtype_name} | {backend} | {core_s * 1e3:.1f} | {layer_s * 1e3:.1f} | "
            f"{ratio:.2f}x | {err:.1e} |"
        )


if __name__ == "__main__":
    main()
