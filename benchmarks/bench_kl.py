"""Fused KL (forward + backward) vs the eager PyTorch composition, on CPU: time and peak extra memory.

Eager: log_softmax of student and teacher (fp32 math, as the fused op does), kl_div(log_target=True), sum over
the vocabulary, backward. Fused: megatron_ki.kernels.fused_kl_div on the same inputs. Each case runs in a fresh
subprocess; "extra memory" is the growth of the process's peak RSS (VmHWM, reset just before) during the
first forward+backward over the RSS once the inputs exist (it includes the gradient, which both paths must produce). Time is the median of
--reps further iterations.

    python benchmarks/bench_kl.py                      # tokens=4096, vocab 32000 and 50304, fp32 and bf16
    python benchmarks/bench_kl.py --vocab 8000 --reps 2  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench_common import measure_step

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run_case(impl: str, tokens: int, vocab: int, dtype_name: str, reps: int, temperature: float) -> dict:
    """One measurement in this process (called in a fresh subprocess by main)."""
    import torch
    import torch.nn.functional as F

    from megatron_ki.kernels import fused_kl_div, load_cpu_extension

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    dtype = getattr(torch, DTYPES[dtype_name])
    if impl == "fused" and load_cpu_extension() is None:
        raise RuntimeError("bench_kl: the CPU extension did not build")
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(tokens, vocab, generator=g) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(tokens, vocab, generator=g) * 2).to(dtype)

    def step() -> float:
        if impl == "fused":
            loss = fused_kl_div(student, teacher, temperature).sum()
        else:
            log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
            log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
            loss = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1).sum()
        loss.backward()
        student.grad = None
        return float(loss)

    m = measure_step(step, reps, "bench_kl")
    return {"median_s": m["median_s"], "extra_bytes": m["extra_bytes"], "loss": m["value"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 50304])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "VOCAB", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        impl, vocab, dtype_name = args.case
        print(json.dumps(run_case(impl, args.tokens, int(vocab), dtype_name, args.reps, args.temperature)))
        return

    rows = []
    for vocab in args.vocab:
        for dtype_name in args.dtypes:
            res = {}
            for impl in ("eager", "fused"):
                cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--reps", str(args.reps)]
                cmd += ["--temperature", str(args.temperature), "--case", impl, str(vocab), dtype_name]
                # a fixed mmap threshold: large buffers are mapped and unmapped, so RSS tracks live memory
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                res[impl] = json.loads(out.strip().splitlines()[-1])
            rel = abs(res["fused"]["loss"] - res["eager"]["loss"]) / max(abs(res["eager"]["loss"]), 1e-12)
            rows.append((vocab, dtype_name, res, rel))
            print(f"done vocab={vocab} {dtype_name}", file=sys.stderr)

    mib = 1024.0**2
    print(f"tokens={args.tokens}, temperature={args.temperature}, median of {args.reps}, torch threads=2\n")
    print(
        "| vocab | dtype | eager ms | fused ms | speedup | eager extra MiB | fused extra MiB | memory ratio | loss rel. diff |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for vocab, dtype_name, res, rel in rows:
        e, f = res["eager"], res["fused"]
        print(
            f"| {vocab} | {dtype_name} | {e['median_s'] * 1e3:.0f} | {f['median_s'] * 1e3:.0f} | "
            f"{e['median_s'] / f['median_s']:.1f}x | {e['extra_bytes'] / mib:.0f} | {f['extra_bytes'] / mib:.0f} | "
            f"{e['extra_bytes'] / max(f['extra_bytes'], 1):.1f}x | {rel:.1e} |"
        )


if __name__ == "__main__":
    main()
