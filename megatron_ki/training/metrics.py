"""Run metrics: a JSON-lines log (plus TensorBoard), the step metrics' field names, and a rank-0 progress bar.

``<run_dir>/metrics.jsonl`` is the record tools/plot_runs.py reads: one JSON object per line, ``{"step": N,
...}``, flushed per line so a crash keeps everything logged before it. Field names the tools understand:
``split`` (absent means train; ``valid``/``test`` for evaluations), ``lm_loss``, ``kd_loss``, ``loss``,
``alpha``, ``lr``, ``consumed_tokens`` (cumulative), ``flops_per_token``, ``flops`` (cumulative training
FLOPs, teacher forward included while KI is on), ``tokens_per_s``, ``step_time_s``, ``train_time_s``
(cumulative step seconds), ``elapsed_s`` (seconds since the loop started, evaluations included), ``mfu``, and
rank 0's ``peak_gpu_memory_gib`` (GPU) or ``peak_rss_gib`` (CPU). Evaluation records add ``perplexity`` and
``teacher_lm_loss`` (the teacher on the same validation tokens, kept after it is released) and are
token-weighted means over the same samples at every evaluation unless ``train.eval_samples`` is continuing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
    """A JSON-safe scalar: tensors/numpy scalars to Python numbers, non-finite floats to None (strict JSON)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return str(value)


class MetricsWriter:
    """Append metrics to ``<run_dir>/metrics.jsonl`` and TensorBoard; a no-op unless ``enabled`` (rank 0).

    The file is opened in append mode so a resumed run continues the same log (tools/plot_runs.py keeps the
    records written after a restart when steps repeat).
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    f"logging.tensorboard is true but TensorBoard cannot be imported ({e}); "
                    "pip install tensorboard or set logging.tensorboard false"
                ) from e
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))

    def log(self, step: int, metrics: dict[str, float | int | None]) -> None:
        """Write one record ``{"step": step, **metrics}``; TensorBoard gets the numeric values."""
        if not self.enabled or self._file is None:
            return
        record = {"step": int(step)}
        record.update({str(k): _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = str(record.get("split") or "train")
            for key, value in record.items():
                if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                self._tb.add_scalar(f"{prefix}/{key}", value, global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a truncated last line (crash mid-write) is dropped, corruption elsewhere
    raises ValueError naming the file and line."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # the writer died in the middle of this line
            raise ValueError(f"{path}:{i + 1}: not a JSON object ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def peak_memory_gib(device: torch.device | str) -> dict[str, float]:
    """This process's peak memory so far: ``peak_gpu_memory_gib`` (the CUDA caching allocator's
    ``max_memory_allocated``) on a GPU, ``peak_rss_gib`` (the kernel's ``ru_maxrss``) otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


class ProgressBar:
    """tqdm bar on rank 0 showing step, loss, alpha and tokens/s; silent when disabled or not on a TTY
    (unless ``force``), so log files and CI output stay clean."""

    def __init__(self, total: int, enabled: bool = True, force: bool = False, initial: int = 0, file=None):
        self._bar = None
        self.enabled = enabled
        file = file or sys.stdout
        if not enabled or not (force or (hasattr(file, "isatty") and file.isatty())):
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, file=file, dynamic_ncols=True, unit="step")

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(
        self,
        step: int,
        loss: float | None = None,
        alpha: float | None = None,
        tokens_per_s: float | None = None,
    ) -> None:
        """Move the bar to ``step`` (absolute, so resumed runs and skipped steps stay right)."""
        if self._bar is None:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if alpha is not None:
            postfix["alpha"] = f"{float(alpha):.3f}"
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{float(tokens_per_s):,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (plain print when the bar is off; nothing when disabled)."""
        if self._bar is None:
            if self.enabled:
                print(message)
        else:
            self._bar.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
