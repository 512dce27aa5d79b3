"""What the last pipeline stage's loss work costs beside the head matmul, at the quickstart's shapes.

Times (median of ``--repeats`` after one warm-up, ``--threads`` threads, fp32) on logits ``[tokens, vocab]``:
the student head's matmul forward + backward (``hidden x vocab``), the LM cross-entropy forward + backward
(vocab-parallel, tp = 1), the KI loss forward + backward at temperature 1 (the teacher's LM loss read off the
KL statistics) and at temperature 2 (the teacher's LM loss from a cross-entropy pass of its own), and the
teacher's no-grad cross-entropy alone. ``LM_LOSS_FLOPS_PER_LOGIT`` and ``KD_FLOPS_PER_LOGIT`` in
``megatron_ki.training.flops`` (the weight of the loss's elementwise work when pipeline stages are balanced by
compute) come from these rows: each loss time over the head's, times the head's 6 x hidden FLOPs per logit.

    python benchmarks/bench_loss_parts.py               # 1024 tokens (8 x 128), vocab 4000, hidden 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import load_text, table

from megatron_ki.ki import ki_loss
from megatron_ki.tensor_parallel import vocab_parallel_cross_entropy


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    s = (torch.randn(n, v, generator=g) * 3).requires_grad_(True)
    t = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    x = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    cases = {
        f"head matmul fwd+bwd ({h} x {v})": lambda: (x @ w.t()).sum().backward(),
        "LM cross-entropy fwd+bwd": lambda: vocab_parallel_cross_entropy(s, labels).mean().backward(),
        "KI loss fwd+bwd, tau 1 (teacher CE from the KL statistics)": lambda: ki_loss(
            s, t, labels, 0.5, temperature=1.0
        ).loss.backward(),
        "KI loss fwd+bwd, tau 2 (teacher CE pass of its own)": lambda: ki_loss(
            s, t, labels, 0.5, temperature=2.0
        ).loss.backward(),
        "teacher cross-entropy, no grad": lambda: vocab_parallel_cross_entropy(t, labels),
    }
    load = os.getloadavg()
    rows = [(name, f"{median_ms(fn, args.repeats):.1f}") for name, fn in cases.items()]
    print("\n".join(table(("part", "ms (median)"), rows)))
    print(f"\n{n} tokens, vocab {v}, {args.threads} thread(s); load average before {load_text(load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
