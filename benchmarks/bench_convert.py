#!/usr/bin/env python
"""Time and peak memory of tools/convert_checkpoint.py on a ~1B-parameter Llama-style model, on CPU.

A model of the shape of ``launch/configs/models/llama_1b.yaml`` with random weights is written as a Hugging
Face directory (generated tensor by tensor, never whole in memory), then converted by the real command line,
each step in a fresh process so its peak RSS (``wait4``'s ``ru_maxrss``) is its own:

1. HF -> framework checkpoint at tp=2, pp=2;
2. framework (tp=2, pp=2) -> HF.

The final directory is checked tensor by tensor against the first. The goal is a peak RSS below 1.5x the
model's size in bytes. Example::

    python benchmarks/bench_convert.py --dtype float32 --workdir /tmp/bench_convert

Needs about 3x the model size of free disk in ``--workdir`` (removed at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_ki.config import model_config_from_yaml  # noqa: E402
from megatron_ki.convert import hf as hfc  # noqa: E402
from megatron_ki.dtypes import DTYPES  # noqa: E402


def write_random_hf(out: Path, config_yaml: Path, dtype: torch.dtype, layers: int | None) -> tuple[int, int]:
    """A random HF model of that shape, written tensor by tensor; returns (parameters, bytes)."""
    cfg = model_config_from_yaml(config_yaml)
    if layers is not None:
        cfg.num_layers = layers
    shapes = hfc.framework_shapes(cfg)
    gen = torch.Generator().manual_seed(0)

    def make(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return 1.0 + 0.02 * torch.randn(shapes[name], generator=gen, dtype=dtype)
        return 0.02 * torch.randn(shapes[name], generator=gen, dtype=dtype)

    state = hfc.LazyState([r.ours for r in hfc.rules_for(cfg)], make)
    out.mkdir(parents=True)
    hfc.hf_config_for(cfg, dtype).save_pretrained(str(out))
    hfc.write_hf_weights(out, cfg, state, dtype)
    plan = hfc.hf_weight_plan(cfg, dtype)
    params = sum(int(torch.Size(s).numel()) for _, _, s in plan)
    return params, params * torch.empty((), dtype=dtype).element_size()


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in bytes and stderr tail of one command in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    peak = int(json.loads(out.strip().splitlines()[-1])["maxrss_kb"]) * 1024
    return seconds, peak, err


def measured(argv: list[str]) -> list[str]:
    """``argv`` run under a tiny wrapper that prints the child's own ``ru_maxrss`` as JSON."""
    wrapper = (
        "import json, os, subprocess, sys\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "_, status, ru = os.wait4(p.pid, 0)\n"
        "code = os.waitstatus_to_exitcode(status)\n"
        "print(json.dumps({'maxrss_kb': ru.ru_maxrss, 'code': code}))\n"
        "sys.exit(code)\n"
    )
    return [sys.executable, "-c", wrapper, *argv]


def compare(a: Path, b: Path) -> int:
    wa, wb = hfc.HFWeights(a), hfc.HFWeights(b)
    if set(wa.keys()) != set(wb.keys()):
        raise AssertionError(f"tensor names differ: {sorted(set(wa.keys()) ^ set(wb.keys()))[:5]}")
    for k in wa:
        if not torch.equal(wa[k], wb[k]):
            raise AssertionError(f"{k} differs after the round trip")
    return len(wa.keys())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "launch/configs/models/llama_1b.yaml"))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--layers", type=int, default=None, help="override num_layers (smoke runs)")
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tool = str(ROOT / "tools" / "convert_checkpoint.py")
    try:
        t0 = time.perf_counter()
        params, size = write_random_hf(work / "hf", Path(args.config), DTYPES[args.dtype], args.layers)
        gen_s = time.perf_counter() - t0
        steps = [
            (
                "HF -> framework (tp=2, pp=2)",
                [tool, "--from", "hf", "--load", str(work / "hf"), "--save", str(work / "ckpt"), "--target-tp", "2",
                 "--target-pp", "2", "--no-progress"],
            ),
            (
                "framework (tp=2, pp=2) -> HF",
                [tool, "--to", "hf", "--load", str(work / "ckpt"), "--save", str(work / "hf_back"), "--no-progress"],
            ),
        ]  # fmt: skip
        rows = []
        for name, argv in steps:
            seconds, peak, _ = run_measured(measured([sys.executable, *argv]))
            rows.append((name, seconds, peak))
        n = compare(work / "hf", work / "hf_back")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"model: {args.config} ({params / 1e9:.3f}B parameters, {args.dtype}, {size / 1e9:.2f} GB)")
    print(f"random HF model written in {gen_s:.1f} s; round trip checked: {n} tensors identical")
    print(f"machine: {os.cpu_count()} CPUs visible, torch {torch.__version__}")
    print()
    print("| step | wall s | peak RSS GB | peak RSS / model size |")
    print("|---|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {peak / 1e9:.2f} | {peak / size:.2f}x |")
    worst = max(peak for _, _, peak in rows) / size
    print()
    print(f"goal peak RSS < 1.5x model size: {'met' if worst < 1.5 else 'NOT met'} (worst {worst:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
