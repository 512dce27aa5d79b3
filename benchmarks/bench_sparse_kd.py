"""Sparse (offline top-K + tail) vs dense (online teacher logits) KD term on CPU: time and peak extra memory.

Dense: ``megatron_ki.ki.per_token_divergence`` (forward KL, the KI loss's KD term) on full teacher logits.
Sparse: ``megatron_ki.ki.sparse_per_token_divergence`` on the teacher's top-K log-probabilities, ids and tail.
Both forward + backward of the per-token KL summed, at tp = 1. Each case runs in a fresh subprocess; "extra
MiB" is the growth of the peak RSS (VmHWM, reset once the inputs exist) during the first forward + backward,
and includes the ``[tokens, vocab]`` gradient both must produce; "teacher input MiB" is what the KD term
reads of the teacher (its logits, or the int64 ids, fp32 log-probabilities and tail as the loss takes them),
not counted in "extra". Time is the median of ``--reps`` further iterations.

    python benchmarks/bench_sparse_kd.py                          # 4 x 512 tokens, vocab 32000, K 8 32 128
    python benchmarks/bench_sparse_kd.py --tokens 256 --vocab 4000 --ks 8 --reps 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import measure_step, table

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def run_case(impl: str, k: int, args: argparse.Namespace) -> dict:
    """One measurement in this process (``impl`` "dense" or "sparse"; called in a fresh subprocess)."""
    import torch

    from megatron_ki.ki import per_token_divergence, sparse_per_token_divergence

    torch.set_num_threads(args.threads)
    tau, dtype = args.temperature, getattr(torch, DTYPES[args.dtype])
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(args.tokens, args.vocab, generator=g) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(args.tokens, args.vocab, generator=g) * 2).to(dtype)
    if impl == "sparse":
        logp_full = torch.log_softmax(teacher.float() / tau, dim=-1)
        logp, ids = logp_full.topk(k, dim=-1)
        tail = (-logp.exp().sum(-1)).log1p()
        del teacher, logp_full
        teacher_bytes = sum(x.nbytes for x in (ids, logp, tail))
    else:
        teacher_bytes = teacher.nbytes

    def step() -> float:
        if impl == "dense":
            kl = per_token_divergence(student, teacher, temperature=tau, backend=args.dense_backend)
        else:
            kl = sparse_per_token_divergence(student, ids, logp, tail, temperature=tau)
        loss = kl.sum()
        loss.backward()
        student.grad = None
        return float(loss)

    m = measure_step(step, args.reps, "bench_sparse_kd")
    return {
        "median_s": m["median_s"],
        "extra_bytes": m["extra_bytes"],
        "teacher_bytes": teacher_bytes,
        "kl_sum": m["value"],
    }


def _measure(impl: str, k: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
    cmd += ["--reps", str(args.reps), "--temperature", str(args.temperature), "--dtype", args.dtype]
    cmd += ["--threads", str(args.threads), "--dense-backend", args.dense_backend, "--case", impl, str(k)]
    # a fixed mmap threshold: large buffers are mapped and unmapped, so RSS tracks live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4 * 512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense-backend", default="auto", choices=["auto", "torch", "kernels"])
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args)))
        return

    results = {"dense": _measure("dense", 0, args)} | {k: _measure("sparse", k, args) for k in args.ks}
    dense_s, mib = results["dense"]["median_s"], 1024.0**2
    rows = [
        [
            "dense (teacher logits)" if k == "dense" else f"sparse top-{k} + tail",
            "-" if k == "dense" else str(k),
            f"{res['median_s'] * 1e3:.1f}",
            f"{dense_s / res['median_s']:.2f}x",
            f"{res['extra_bytes'] / mib:.0f}",
            f"{res['teacher_bytes'] / mib:.1f}",
        ]
        for k, res in results.items()
    ]
    print(
        f"tokens={args.tokens}, vocab={args.vocab}, {args.dtype}, temperature={args.temperature}, "
        f"median of {args.reps}, torch threads={args.threads}, dense backend={args.dense_backend}\n"
    )
    columns = ["KD term", "K", "fwd+bwd ms (median)", "speed vs dense", "extra MiB", "teacher input MiB"]
    print("\n".join(table(columns, rows)))
    if args.json:
        meta = vars(args) | {"json": str(args.json)}
        args.json.write_text(json.dumps({"args": meta, "results": {str(k): v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
