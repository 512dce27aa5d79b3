"""What a job does when the cluster interferes: a signal or a wall-clock limit (save, then exit 75), a rank that
stops answering (a step watchdog names it and ends the job), and a failure on one rank (one line, not one
traceback per rank).

- :class:`StopRequest` records SIGTERM/SIGINT (Megatron-LM's ``--exit-signal-handler``) and the wall-clock
  limit (``--exit-duration-in-mins``); :meth:`StopRequest.agreed` turns them into one decision for all ranks
  after each step, so a signal to any one rank stops every rank at the same step.
- :class:`StepWatchdog` is a thread on every rank: the loop marks progress (step, phase); when there is none
  for ``timeout_s`` it reads every rank's heartbeat from the rendezvous store, names the ranks that stopped
  answering (their heartbeat thread is frozen too) or that are stuck elsewhere, and ends this rank, so the
  launcher ends the job. Collectives alone do not bound a hang: torch gives sub-groups 30 minutes, some
  waits have no timeout, and a stopped (``kill -STOP``) peer keeps its sockets open.
- :func:`report_failure` prints an expected failure once: rank 0 at once, another rank only if it is still
  alive a moment later (that is, rank 0 did not fail the same way and the launcher did not end the job).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_ki.errors import EXIT_FAILURE, error_line

logger = logging.getLogger("megatron_ki")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PEER_GRACE_S = 5.0
"""How long a failing rank other than 0 waits before printing: rank 0 failing too ends it silently first."""


# ------------------------------------------------------------------------------------------ stopping
class StopRequest:
    """SIGTERM/SIGINT and the wall-clock limit, agreed across ranks after every step."""

    def __init__(self, handle_signals: bool, duration_mins: float | None, started: float | None = None):
        self.handle_signals = handle_signals
        self.duration_s = None if duration_mins is None else duration_mins * 60.0
        self.started = time.monotonic() if started is None else started
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch the stop signals (main thread only); a second signal while stopping is only noted."""
        if not self.handle_signals:
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def local_reason(self) -> str | None:
        if self.signum is not None:
            return f"received {signal.Signals(self.signum).name}"
        if self.duration_s is not None and time.monotonic() - self.started >= self.duration_s:
            return f"train.exit_duration_mins ({self.duration_s / 60:g}) reached"
        return None

    def agreed(self, device: torch.device) -> str | None:
        """Why every rank stops now, or None; collective over the world (one tiny all-reduce)."""
        flags = torch.tensor(
            [
                float(self.signum is not None),
                float(self.duration_s is not None and time.monotonic() - self.started >= self.duration_s),
            ],
            device=device,
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return self.local_reason() if self.signum is not None else "another rank received a stop signal"
        if flags[1] > 0:
            return f"train.exit_duration_mins ({self.duration_s / 60:g}) reached"  # type: ignore[operator]
        return None


# ------------------------------------------------------------------------------------------ watchdog
@dataclass
class Heartbeat:
    rank: int
    beat: int
    step: int
    phase: str
    host: str
    pid: int
    idle_s: float
    """Seconds since the rank's loop last marked progress, when the heartbeat was written."""

    def where(self) -> str:
        return f"{self.phase}, {self.step} steps done"


class StepWatchdog(threading.Thread):
    """Ends a rank whose loop makes no progress for ``timeout_s``, naming the ranks that stopped answering."""

    def __init__(
        self,
        rank: int,
        world: int,
        timeout_s: float,
        interval_s: float | None = None,
        store: dist.Store | None = None,
        on_hang=None,
    ):
        super().__init__(name="megatron_ki-watchdog", daemon=True)
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.interval_s = interval_s if interval_s is not None else min(10.0, max(1.0, timeout_s / 10))
        self.store = store
        self.on_hang = on_hang or _exit_now
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._step, self._phase, self._last = 0, "start-up", time.monotonic()
        self._beat = 0
        self._reporter = False
        self._armed = False
        self._stopped = threading.Event()

    @classmethod
    def from_env(cls, rank: int, world: int, timeout_s: float, **kwargs) -> StepWatchdog:
        """A watchdog with its own connection to the launcher's rendezvous store (MASTER_ADDR/PORT)."""
        store = None
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port and world > 1:
            try:
                client = dist.TCPStore(
                    addr, int(port), is_master=False, timeout=timedelta(seconds=10), wait_for_workers=False
                )
                store = dist.PrefixStore("megatron_ki/heartbeat/", client)
            except (RuntimeError, ValueError) as e:  # the watchdog still ends a hung rank, without names
                logger.warning("step watchdog: no rendezvous store (%s): hung ranks will not be named", e)
        return cls(rank, world, timeout_s, store=store, **kwargs)

    def progress(self, step: int, phase: str) -> None:
        """Called by the loop whenever it gets somewhere (cheap attribute writes); the first call arms the
        deadline: before it (start-up) the thread only sends heartbeats, so peers can name this rank."""
        self._step, self._phase, self._last = step, phase, time.monotonic()
        self._armed = True

    def stop(self) -> None:
        """Stop and wait for the thread, then drop its store connection: a connection still in use while the
        interpreter shuts down can end the process in C++ (``terminate called without an active exception``)."""
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.interval_s + 15)
        self.store = None

    def run(self) -> None:
        self._publish()
        while not self._stopped.wait(self.interval_s):
            self._publish()
            idle = time.monotonic() - self._last
            if self._armed and idle >= self.timeout_s and not self._stopped.is_set():
                self.on_hang(self.diagnose(idle), self.reporter())
                return

    # -- heartbeats ------------------------------------------------------------------------------
    def _publish(self) -> None:
        self._beat += 1
        if self.store is None:
            return
        beat = {
            "beat": self._beat,
            "step": self._step,
            "phase": self._phase,
            "host": self.host,
            "pid": self.pid,
            "idle_s": round(time.monotonic() - self._last, 1),
        }
        with contextlib.suppress(RuntimeError, dist.DistError):  # the store's host may be the frozen rank
            self.store.set(str(self.rank), json.dumps(beat))

    def _read(self) -> dict[int, Heartbeat] | None:
        if self.store is None:
            return None
        keys = [str(r) for r in range(self.world)]
        try:
            present = [k for k in keys if self.store.check([k])]
            values = self.store.multi_get(present) if present else []
        except (RuntimeError, dist.DistError):
            return None
        out = {}
        for key, raw in zip(present, values, strict=True):
            d = json.loads(bytes(raw).decode())
            out[int(key)] = Heartbeat(int(key), **d)
        return out

    def reporter(self) -> bool:
        """Whether this rank prints the diagnosis: rank 0, or the lowest rank still answering."""
        return self.rank == 0 or self._reporter

    def diagnose(self, idle: float) -> str:
        """One line: who stopped answering, or where each rank is stuck."""
        mine = f"no progress for {idle:.0f} s (train.collective_timeout_s={self.timeout_s:g})"
        first = self._read()
        if first is None:
            if self.rank != 0 and self.store is not None:
                self._reporter = self.rank == 1
                return f"{mine}: rank 0 stopped answering (the rendezvous store it hosts does not respond)"
            return f"{mine} on rank {self.rank}, {self._phase} at step {self._step}"
        for _ in range(3):  # peers that answer publish at least twice meanwhile (so does this rank)
            time.sleep(self.interval_s)
            self._publish()
        second = self._read() or {}
        frozen = sorted(
            r
            for r in range(self.world)
            if r != self.rank and (r not in second or r not in first or second[r].beat == first[r].beat)
        )
        alive = [r for r in range(self.world) if r not in frozen]
        self._reporter = bool(alive) and self.rank == alive[0]
        if frozen:
            parts = []
            for r in frozen:
                hb = second.get(r) or first.get(r)
                if hb is None:
                    parts.append(f"rank {r} (never sent a heartbeat)")
                    continue
                parts.append(f"rank {r} (host {hb.host}, pid {hb.pid}, last seen {hb.where()})")
                _kill_if_stopped(hb, self.host)
            what = "its process is" if len(frozen) == 1 else "their processes are"
            return f"{mine}: {', '.join(parts)} stopped answering: {what} frozen or gone"
        groups: dict[str, list[int]] = {}
        for r in range(self.world):
            groups.setdefault(second[r].where(), []).append(r)
        where = "; ".join(
            f"ranks {_ranges(rs)} in {w}" for w, rs in sorted(groups.items(), key=lambda x: x[1])
        )
        return f"{mine}: every rank answers but none progresses ({where})"


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(out)


def _kill_if_stopped(hb: Heartbeat, host: str) -> None:
    """SIGKILL a peer on this host that is stopped (state T): it can do nothing but hold the job. The
    launcher would kill it too, but only after its 30 s SIGTERM grace, which a stopped process ignores."""
    if hb.host != host:
        return
    try:
        with open(f"/proc/{hb.pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            os.kill(hb.pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass


def _exit_now(message: str, report: bool) -> None:
    if report:
        sys.stderr.write(f"pretrain_ki.py: error: step watchdog: {message}\n")
        sys.stderr.flush()
    else:
        time.sleep(PEER_GRACE_S)  # let the reporting rank print first
    os._exit(EXIT_FAILURE)


# ------------------------------------------------------------------------------------------ failures
def is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another rank died or closed its connections (not a bug on this rank)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Gloo")
    )


def report_failure(prog: str, e: BaseException, rank: int, code: int, distributed: bool) -> int:
    """Print an expected failure once for the job and return ``code``.

    Rank 0 prints at once. Another rank waits :data:`PEER_GRACE_S` before it leaves: if rank 0 failed the
    same way, the launcher ends this rank (silently) once rank 0 has printed and exited; if not, the failure
    is this rank's own and it is printed with the rank. Before the process group exists every rank sees the
    same input, and an ``all_ranks`` error was agreed on by all: those only rank 0 prints. Another rank never
    leaves at once: the launcher kills the rest of the job when the first rank exits, which could be before
    rank 0 has printed the reason.
    """
    if rank == 0:
        print(error_line(prog, e), file=sys.stderr, flush=True)
        return code
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    signal.signal(signal.SIGINT, lambda *_: os._exit(code))
    time.sleep(PEER_GRACE_S)
    if distributed and not getattr(e, "all_ranks", False):
        print(f"{error_line(prog, e)} (rank {rank})", file=sys.stderr, flush=True)
    return code
