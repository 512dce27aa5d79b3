"""Helpers the benchmark scripts share: markdown cells and tables, and the timed steps of a pretrain_ki.py run."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_ki.training.metrics import read_metrics


def fmt(value: Any, int_millions: bool = False) -> str:
    """A table cell: '-' for None, yes/no, floats to 0.1; with ``int_millions`` ints >= 100,000 as '1.23M'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if int_millions and isinstance(value, int):
        return f"{value / 1e6:.2f}M" if value >= 100_000 else str(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def load_text(values: Iterable[float]) -> str:
    """Load averages (1/5/15 min) as '0.12 0.34 0.56'."""
    return " ".join(f"{x:.2f}" for x in values)


def table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Markdown table lines: header, separator, one line per row of already formatted cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def timing_run_args(run_dir: Path) -> list[str]:
    """pretrain_ki.py overrides of a timing run: ZeRO 0, no evaluation, logs in ``run_dir`` without
    TensorBoard or progress bar."""
    return [
        "--train.zero_stage", "0",
        "--train.eval_interval", "0",
        "--logging.run_dir", str(run_dir),
        "--logging.tensorboard", "false",
        "--logging.progress_bar", "false",
    ]  # fmt: skip


def timed_train_steps(run_dir: Path, skip: int, who: str) -> list[dict[str, Any]]:
    """The train records of ``run_dir/metrics.jsonl`` after step ``skip`` (evaluations left out)."""
    path = run_dir / "metrics.jsonl"
    records = [r for r in read_metrics(path) if r.get("split", "train") == "train" and r.get("tokens_per_s")]
    timed = [r for r in records if r["step"] > skip]
    if not timed:
        raise RuntimeError(f"{who}: no train step after step {skip} in {path}")
    return timed


def status_bytes(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS, VmHWM, ...), which reports kB."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_step(step: Callable[[], float], reps: int, who: str) -> dict[str, float]:
    """Peak RSS above the baseline of one ``step()`` (its value kept), then the median of ``reps`` timed
    calls: ``{"value", "extra_bytes", "median_s"}``. Run it in a fresh process per case, so one case's heap
    does not hide another's peak."""
    import ctypes
    import statistics
    import time

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so the baseline RSS is tight
    if not reset_peak_rss():
        raise RuntimeError(f"{who}: cannot reset the peak RSS through /proc/self/clear_refs")
    base = status_bytes("VmRSS")
    value = step()
    extra = max(0, status_bytes("VmHWM") - base)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"value": value, "extra_bytes": extra, "median_s": statistics.median(times)}
