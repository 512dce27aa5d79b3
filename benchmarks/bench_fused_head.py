"""Chunked fused head + KI loss (``ki.fused_head``) vs the unfused path, on CPU: peak extra memory and time.

Unfused: student and teacher logits ``F.linear`` (-inf on padded columns), ``ki_loss``, backward to the hidden
states and head weight. Fused: ``fused_head_ki_loss`` on the same hidden states and weights. Both include the
gradients they must produce (hidden [N, H], weight [V, H]). Each case runs in a fresh subprocess; "extra
memory" is the growth of the peak RSS (VmHWM, reset just before) during the first forward+backward over the
RSS once the inputs exist. Time is the median of --reps further iterations. tp = 1, forward KL, alpha 0.5,
temperature 2, every position counted (causal LM).

    python benchmarks/bench_fused_head.py                # tokens 8192, hidden 1024, vocab 32000 and 128256
    python benchmarks/bench_fused_head.py --quick        # tokens 1024, hidden 256, vocab 8000, fp32, 1 rep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench_common import measure_step

from megatron_ki.ki.fused_head import DEFAULT_CHUNK_TOKENS

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def run_case(impl: str, args: argparse.Namespace, vocab: int, dtype_name: str) -> dict:
    """One measurement in this process (called in a fresh subprocess by main)."""
    import torch
    import torch.nn.functional as F

    from megatron_ki.ki import fused_head_ki_loss, ki_loss

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dtype = getattr(torch, DTYPES[dtype_name])
    g = torch.Generator().manual_seed(0)
    n, hid = args.tokens, args.hidden
    h = torch.randn(n, hid, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hid, generator=g) * hid**-0.5).to(dtype).requires_grad_()
    ht = torch.randn(n, hid, generator=g).to(dtype)
    wt = (torch.randn(vocab, hid, generator=g) * hid**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    opts = {"temperature": 2.0, "divergence": "forward_kl"}

    def step() -> float:
        if impl == "fused":
            out = fused_head_ki_loss(
                h, w, labels, 0.5, teacher_hidden=ht, teacher_weight=wt, chunk_tokens=args.chunk, **opts
            )
        else:
            with torch.no_grad():
                t = F.linear(ht, wt)
            out = ki_loss(F.linear(h, w)[None], t[None], labels[None], 0.5, **opts)
        out.loss.backward()
        h.grad = w.grad = None
        return float(out.loss)

    m = measure_step(step, args.reps, "bench_fused_head")
    return {"median_s": m["median_s"], "extra_bytes": m["extra_bytes"], "loss": m["value"]}


def measure(args: argparse.Namespace, vocab: int, dtype_name: str) -> dict:
    """Both paths, each in its own subprocess."""
    res = {}
    for impl in ("unfused", "fused"):
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--hidden", str(args.hidden)]
        cmd += ["--chunk", str(args.chunk), "--reps", str(args.reps), "--case", impl, str(vocab), dtype_name]
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": "131072",
        }  # large buffers unmapped: RSS tracks live memory
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        res[impl] = json.loads(out.strip().splitlines()[-1])
        print(f"done {impl} vocab={vocab} {dtype_name}", file=sys.stderr)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument(
        "--chunk",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        help="fused: tokens per chunk [the framework's default]",
    )
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="tokens 1024, hidden 256, vocab 8000, fp32, 1 rep"
    )
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "VOCAB", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.dtypes, args.reps, args.chunk = (
            1024,
            256,
            [8000],
            ["fp32"],
            1,
            256,
        )
    if args.case:
        impl, vocab, dtype_name = args.case
        print(json.dumps(run_case(impl, args, int(vocab), dtype_name)))
        return

    rows = [(v, d, measure(args, v, d)) for v in args.vocab for d in args.dtypes]
    mib = 1024.0**2
    print(
        f"tokens={args.tokens}, hidden={args.hidden}, chunk={args.chunk}, median of {args.reps}, threads=2\n"
    )
    print(
        "| vocab | dtype | unfused ms | fused ms | time ratio | unfused extra MiB | fused extra MiB | memory ratio |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for vocab, dtype_name, res in rows:
        u, f = res["unfused"], res["fused"]
        print(
            f"| {vocab} | {dtype_name} | {u['median_s'] * 1e3:.0f} | {f['median_s'] * 1e3:.0f} | "
            f"{f['median_s'] / u['median_s']:.2f}x | {u['extra_bytes'] / mib:.0f} | {f['extra_bytes'] / mib:.0f} | "
            f"{u['extra_bytes'] / max(f['extra_bytes'], 1):.1f}x |"
        )
    print(
        "\nloss (fused, unfused): "
        + "; ".join(f"{r['fused']['loss']:.6f}, {r['unfused']['loss']:.6f}" for *_, r in rows)
    )


if __name__ == "__main__":
    main()
