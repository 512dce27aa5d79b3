"""Training-step throughput and peak memory: framework models vs transformers, single process.

Each measurement (family x implementation) runs in a fresh subprocess so its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; forward + backward + AdamW step, fp32,
dropout 0, the same architecture on both sides (GPT-2 vs GPT2LMHeadModel, RoBERTa vs RobertaForMaskedLM).

    python benchmarks/bench_model.py --steps 3 --warmup 1
    python benchmarks/bench_model.py --layers 2 --hidden 128 --heads 4 --seq 128 --vocab 1000  # quick

Prints a markdown table. Both children import torch and transformers, so the RSS baseline is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _model_config(args: argparse.Namespace):
    """The framework's ``ModelConfig`` of ``--family`` at the command line's sizes."""
    from megatron_ki.config import ModelConfig

    common = dict(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        make_vocab_size_divisible_by=1,
        attention_backend=args.backend,
    )
    if args.family == "gpt2":
        return ModelConfig(family="gpt2", max_position_embeddings=args.seq, **common)
    return ModelConfig(
        family="roberta",
        max_position_embeddings=args.seq,
        pre_norm=False,
        embedding_norm=True,
        type_vocab_size=1,
        activation="gelu",
        pad_token_id=1,
        position_offset=2,
        norm_eps=1e-5,
        **common,
    )


def _batch(args: argparse.Namespace):
    """Random token ids and their labels: next token (gpt2) or 15% masked positions (roberta)."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    if args.family == "gpt2":
        labels = torch.roll(ids, -1, dims=1)
    else:  # MLM: 15% of positions carry the loss
        labels = ids.masked_fill(torch.rand(ids.shape, generator=g) >= 0.15, -100)
    return ids, labels


def _model_and_loss(args: argparse.Namespace, cfg, ids, labels):
    """The ``--impl`` model (ours or transformers') and a closure computing its loss on the batch."""
    import torch
    import torch.nn.functional as F
    import transformers

    from megatron_ki.convert import config_to_hf
    from megatron_ki.models import build_model
    from megatron_ki.tensor_parallel import vocab_parallel_cross_entropy

    if args.impl == "ours":
        model = build_model(cfg, seed=0)

        def loss_fn() -> torch.Tensor:
            logits = model(ids)
            per_tok = vocab_parallel_cross_entropy(logits, labels)
            return per_tok.sum() / (labels != -100).sum()
    else:
        hf_cfg = config_to_hf(cfg)
        hf_cfg._attn_implementation = "sdpa" if args.backend == "sdpa" else "eager"
        cls = transformers.GPT2LMHeadModel if args.family == "gpt2" else transformers.RobertaForMaskedLM
        model = cls(hf_cfg)

        def loss_fn() -> torch.Tensor:
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)

    return model, loss_fn


def _time_steps(args: argparse.Namespace, model, loss_fn):
    """``--warmup`` untimed then ``--steps`` timed AdamW steps; the step times and the last loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times, loss


def _child(args: argparse.Namespace) -> dict:
    """One measurement (``--family`` x ``--impl``) in this process: throughput, peak RSS, final loss."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = _model_config(args)
    ids, labels = _batch(args)
    model, loss_fn = _model_and_loss(args, cfg, ids, labels)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    times, loss = _time_steps(args, model, loss_fn)
    tokens = args.batch * args.seq
    return {
        "family": args.family,
        "impl": args.impl,
        "params": n_params,
        "step_s": sum(times) / len(times),
        "best_step_s": min(times),
        "tokens_per_s": tokens / min(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": float(loss),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument(
        "--backend", choices=["sdpa", "eager"], default="sdpa", help="attention path on both sides"
    )
    p.add_argument("--families", default="gpt2,roberta")
    p.add_argument("--repeats", type=int, default=2, help="alternate ours/hf this many times, keep the best")
    p.add_argument("--family", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.family:  # child process: one measurement, JSON on the last line
        print(json.dumps(_child(args)))
        return
    passthrough = [a for a in sys.argv[1:] if not a.startswith(("--families", "--repeats"))]
    if "--families" in sys.argv or "--repeats" in sys.argv:
        raise SystemExit("use --families=... and --repeats=... (with '=')")
    rows = []
    for family in args.families.split(","):
        res: dict[str, dict] = {}
        for _ in range(args.repeats):  # alternate so load from other jobs hits both sides alike
            for impl in ("ours", "hf"):
                cmd = [sys.executable, __file__, *passthrough, "--family", family, "--impl", impl]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                if impl not in res or r["tokens_per_s"] > res[impl]["tokens_per_s"]:
                    res[impl] = r
        rows.append(res)
    print(
        f"layers={args.layers} hidden={args.hidden} heads={args.heads} seq={args.seq} batch={args.batch} "
        f"vocab={args.vocab} steps={args.steps} (+{args.warmup} warmup) threads={args.threads} "
        f"backend={args.backend}, fp32, AdamW; tokens/s from the fastest step, best of {args.repeats} runs\n"
    )
    print(
        "| model | params | megatron_ki tokens/s | transformers tokens/s | ratio | megatron_ki peak RSS MiB | "
        "transformers peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for res in rows:
        o, h = res["ours"], res["hf"]
        print(
            f"| {o['family']} | {o['params'] / 1e6:.1f}M | {o['tokens_per_s']:.0f} | {h['tokens_per_s']:.0f} | "
            f"{o['tokens_per_s'] / h['tokens_per_s']:.2f} | {o['peak_rss_mib']:.0f} | {h['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
