"""Table-driven bad-input tests: run a tool or the entry point on one bad input, then check the one-line
message, the exit code, and that nothing half-written is left and nothing existing is lost.

Each test module lists :class:`BadInput` rows; a module-scoped fixture runs them all, two at a time (most
of each case is interpreter start-up, and the machine has 2 cores), and the parametrised test asserts on each
row. With ``BAD_INPUTS_REPORT=FILE`` every row's (case, exit code, seconds, message) is appended to FILE as
JSON lines, for the table in a closing note.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


@dataclass(frozen=True)
class BadInput:
    """One bad input. ``setup(tmp)`` makes the files and returns the command (argv); ``culprits`` are strings
    the error line must contain (the file or option named, what was found or expected)."""

    name: str
    setup: Callable[[Path], list[str]]
    culprits: tuple[str, ...]
    exit_code: int = 1
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 120.0
    keep: tuple[str, ...] = ()
    """Paths (relative to the case folder) that exist before the run and must be byte-identical after it."""
    no_new: tuple[str, ...] = ("*.tmp*", "*.tmp-*", "*.tmp")
    """Glob patterns no file under the case folder may match after the run (half-written leftovers)."""
    error_prefix: str | None = None
    """The program name the line starts with, e.g. ``"preprocess_data.py: error:"`` (None: not checked)."""
    one_line: bool = True


@dataclass
class Outcome:
    case: BadInput
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    folder: Path
    kept_before: dict[str, str]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def error_lines(self) -> list[str]:
        """Lines of the output that carry an error message."""
        return [line for line in self.output.splitlines() if "error:" in line.lower()]


def single_rank_env() -> dict[str, str]:
    """What the launcher gives a one-rank job: ``pretrain_ki.py`` run without it, on a rendezvous of its own."""
    from tests.training_utils import free_port

    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
    }


def tool(script: str, *args: str) -> list[str]:
    return [PYTHON, str(ROOT / script), *args]


def _digest(path: Path) -> str:
    if path.is_dir():
        return ",".join(f"{p.relative_to(path)}={_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(path.read_bytes()).hexdigest()


_report_lock = threading.Lock()


def run_case(case: BadInput, root: Path) -> Outcome:
    folder = root / case.name
    folder.mkdir(parents=True, exist_ok=True)
    argv = case.setup(folder)
    kept = {k: _digest(folder / k) for k in case.keep}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **case.env}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, cwd=folder, env=env, capture_output=True, text=True, timeout=case.timeout, check=False
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -9, str(e.stdout or ""), f"{e.stderr or ''}\n[test] killed after {case.timeout} s"
    outcome = Outcome(case, rc, time.perf_counter() - start, out, err, folder, kept)
    lines = outcome.error_lines()
    record(case.name, rc, outcome.seconds, lines[-1] if lines else " ".join(err.strip().splitlines()[-1:]))
    return outcome


def record(case: str, exit_code: int, seconds: float, message: str) -> None:
    """Append one row to ``$BAD_INPUTS_REPORT`` (if set): the closing-note table of failures."""
    report = os.environ.get("BAD_INPUTS_REPORT")
    if report:
        row = {"case": case, "exit_code": exit_code, "seconds": round(seconds, 2), "message": message}
        with _report_lock, open(report, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def run_all(cases: Iterable[BadInput], root: Path, workers: int = 2) -> dict[str, Outcome]:
    cases = list(cases)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda c: run_case(c, root), cases), strict=True))


def check(outcome: Outcome) -> None:
    """The assertions every bad input shares."""
    case, out = outcome.case, outcome.output
    assert outcome.returncode == case.exit_code, (
        f"{case.name}: exit code {outcome.returncode}, expected {case.exit_code}\n{out[-3000:]}"
    )
    assert "Traceback" not in out, f"{case.name}: a traceback for an expected failure\n{out[-3000:]}"
    lines = outcome.error_lines()
    assert lines, f"{case.name}: no error line\n{out[-3000:]}"
    if case.one_line:
        assert len(lines) == 1, f"{case.name}: {len(lines)} error lines, expected one:\n" + "\n".join(lines)
    line = lines[-1]
    if case.error_prefix:
        assert line.startswith(case.error_prefix), (
            f"{case.name}: {line!r} does not start with {case.error_prefix!r}"
        )
    for culprit in case.culprits:
        assert culprit in line, f"{case.name}: {culprit!r} not named in {line!r}"
    for pattern in case.no_new:
        left = [str(p.relative_to(outcome.folder)) for p in outcome.folder.rglob(pattern)]
        assert not left, f"{case.name}: half-written files left behind: {left}"
    for path, digest in outcome.kept_before.items():
        assert (outcome.folder / path).exists(), f"{case.name}: {path} existed before the run and is gone"
        assert _digest(outcome.folder / path) == digest, f"{case.name}: {path} was changed by the failed run"
