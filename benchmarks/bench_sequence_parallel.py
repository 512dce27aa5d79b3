"""Sequence parallelism on CPU: activation memory per rank and step time, with and without it, at tp 2 and 4.

Each layout runs on ``tp`` gloo ranks: the student model (``--family``, dropout 0.1, training mode) does one
forward under ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps for the
backward. Bytes are counted once per storage, parameters left out, and split in two:

- "outside": what lives outside the tensor-parallel regions -- tensors saved by the norms and the dropouts,
  and the inputs the column-parallel projections keep (last dimension = hidden size). Without sequence
  parallelism every TP rank holds all of them for the whole sequence; with it, its chunk (Megatron-LM's
  10·sbh of the 34·sbh per layer, which sequence parallelism divides by tp).
- "inside": attention (q, k, v, scores, probabilities), the MLP's intermediate, the row-parallel inputs:
  already split over the heads / FFN columns by tensor parallelism.

Time is the median over ``--steps`` forward + backward passes after one warm-up. On a 2-core machine tp ranks
share the cores, so times compare layouts against each other only.

    python benchmarks/bench_sequence_parallel.py                       # GPT-2 4 x 512, seq 1024, tp 2 and 4
    python benchmarks/bench_sequence_parallel.py --quick               # a tiny model, tp 2, 1 step
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import fmt, table
from megatron_ki.config import ModelConfig
from megatron_ki.models import build_model
from megatron_ki.models.norms import LayerNorm, RMSNorm
from megatron_ki.tensor_parallel import ColumnParallelLinear, TPRngTracker, vocab_parallel_cross_entropy

MiB = 2**20


def model_config(args: argparse.Namespace) -> ModelConfig:
    extra = {}
    if args.family == "llama":
        extra = dict(
            position_embedding="rope",
            normalization="rmsnorm",
            activation="swiglu",
            add_bias_linear=False,
            tie_word_embeddings=False,
        )
    return ModelConfig(
        family=args.family,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 32),
        hidden_dropout=0.1,
        attention_dropout=0.1,
        attention_backend="eager",
        **extra,
    )


class SavedTensors:
    """Bytes autograd saves for backward, once per storage, by where they were saved (see module docstring)."""

    def __init__(self, model: torch.nn.Module, hidden: int):
        self.hidden, self.stack, self.seen = hidden, [], set()
        self.bytes = {"outside": 0, "inside": 0}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for m in model.modules():
            m.register_forward_pre_hook(self._enter)
            m.register_forward_hook(self._leave)

    def _enter(self, module: torch.nn.Module, _args: tuple) -> None:
        self.stack.append(module)

    def _leave(self, _module: torch.nn.Module, _args: tuple, _out: object) -> None:
        self.stack.pop()

    def _where(self, t: torch.Tensor) -> str:
        inner = self.stack[-1] if self.stack else None
        if isinstance(inner, (LayerNorm, RMSNorm, torch.nn.Dropout)):
            return "outside"
        if isinstance(inner, ColumnParallelLinear) and t.dim() > 1 and t.shape[-1] == self.hidden:
            return "outside"
        return "inside"

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and key not in self.params:
            self.seen.add(key)
            self.bytes[self._where(t)] += storage.nbytes()
        return t


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, sp: bool, out: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = model_config(args)
    tracker = TPRngTracker(1, rank)
    model = build_model(cfg, dist.group.WORLD, seed=1, rng_tracker=tracker, sequence_parallel=sp).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)

    def step(counter: SavedTensors | None) -> None:
        if counter is None:
            logits = model(ids)
        else:
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                logits = model(ids)
        vocab_parallel_cross_entropy(logits, ids, dist.group.WORLD).mean().backward()
        model.zero_grad(set_to_none=True)

    counter = SavedTensors(model, cfg.hidden_size)
    step(counter)
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step(None)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put({**counter.bytes, "step_s": statistics.median(times)})
    dist.destroy_process_group()


def measure(args: argparse.Namespace, tp: int, sp: bool) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, tp, port, args, sp, out)) for r in range(tp)]
    for p in procs:
        p.start()
    result = out.get(timeout=3600)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"tp={tp} sequence_parallel={sp}: a rank exited with {p.exitcode}")
    return {"tp": tp, "sequence_parallel": sp, **result}


def report(rows: list[dict]) -> list[str]:
    cells = []
    base = {r["tp"]: r for r in rows if not r["sequence_parallel"]}
    for r in rows:
        b = base[r["tp"]]
        cells.append(
            [
                str(r["tp"]),
                "on" if r["sequence_parallel"] else "off",
                fmt(r["outside"] / MiB),
                fmt(r["inside"] / MiB),
                fmt((r["outside"] + r["inside"]) / MiB),
                f"{b['outside'] / max(r['outside'], 1):.2f}x",
                f"{r['step_s'] * 1e3:.0f}",
                f"{r['step_s'] / b['step_s']:.2f}x",
            ]
        )
    columns = [
        "tp",
        "sequence parallel",
        "outside MiB",
        "inside MiB",
        "total MiB",
        "outside: off / this",
        "step ms",
        "time vs off",
    ]
    return table(columns, cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--quick", action="store_true", help="layers 2, hidden 64, seq 32, batch 1, tp 2, 1 step")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.seq, args.batch = 2, 64, 4, 512, 32, 1
        args.tp, args.steps = [2], 1
    rows = [measure(args, tp, sp) for tp in args.tp for sp in (False, True)]
    print(
        f"{args.family}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, "
        f"sequence {args.seq}, batch {args.batch}; saved activations of rank 0 (MiB), median of {args.steps} steps"
    )
    print("\n".join(report(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
