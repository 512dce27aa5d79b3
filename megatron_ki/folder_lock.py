"""One job per output folder: a lock file held for the job's lifetime.

Two jobs writing one ``checkpoint.save`` folder (a requeued Slurm job whose old allocation still runs, a typo
in a sweep) each finish with rc 0 while their checkpoints overwrite each other. The job's launcher-facing
process (global rank 0; the precompute's rank 0) creates ``{folder}/.lock`` with ``O_CREAT | O_EXCL`` (atomic:
of two jobs starting together exactly one creates it) holding its host, pid, Slurm job id and start time, and
touches it every :data:`HEARTBEAT_S` seconds while it runs. A second job is refused in one line naming the
holder. A lock is *stale*, left by a job that died without releasing it (``kill -9``, a lost node), when

- its holder ran on this host and its pid is gone, or
- nobody touched it for ``stale_s`` seconds (a holder elsewhere, whose pid cannot be asked; a frozen one),

and is then taken over with one log line. A requeued job resuming its own folder finds no lock (the exit-75
path releases it) or a stale one (the old allocation was killed): it starts. The lock is released (removed,
only if it is still ours) on every exit that runs Python's ``finally``.

Beside ``config``, above ``errors``: the standard library and ``errors`` only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from megatron_ki.errors import MegatronKIError

LOCK_NAME = ".lock"
HEARTBEAT_S = 60.0
"""How often the holder touches its lock (its mtime); ``stale_s`` must be well above it."""

logger = logging.getLogger("megatron_ki")


class FolderLockedError(MegatronKIError):
    """Another live job holds the folder's lock; the message names it."""


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (in doubt, it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


def describe_holder(holder: dict[str, Any]) -> str:
    """``host H, pid P, job J, since T`` of a lock's content."""
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('start_time')}"


class FolderLock:
    """The lock on ``folder`` for ``what`` (the option that named it, e.g. ``checkpoint.save``)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        what: str,
        stale_s: float,
        heartbeat_s: float = HEARTBEAT_S,
        lock_file: str | os.PathLike | None = None,
    ):
        """``lock_file``: another lock than ``{folder}/.lock`` (the precompute locks ``{output}.lock``)."""
        self.folder = Path(folder)
        self.path = Path(lock_file) if lock_file is not None else self.folder / LOCK_NAME
        self.what = what
        self.stale_s = float(stale_s)
        self.heartbeat_s = float(heartbeat_s)
        self.record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------- state
    def _read(self) -> tuple[dict[str, Any] | None, float | None]:
        """``(content or None when unreadable, mtime)``; ``(None, None)`` when there is no lock."""
        try:
            st = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        return (record if isinstance(record, dict) else None), st.st_mtime

    def stale_reason(self, holder: dict[str, Any] | None, mtime: float) -> str | None:
        """Why the lock ``holder`` (touched at ``mtime``) was left by a dead job, or None when it may live."""
        age = time.time() - mtime
        if holder is None:  # half-written by a creator that died at once (or is writing it right now)
            return f"unreadable and untouched for {age:.0f} s" if age > 5.0 else None
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return f"its pid {pid} is gone on this host"
        if age > self.stale_s:
            return f"untouched for {age / 60:.1f} min (more than {self.stale_s / 60:g} min)"
        return None

    def _mine(self, holder: dict[str, Any] | None) -> bool:
        return bool(holder) and self.record is not None and holder.get("token") == self.record["token"]

    # ---------------------------------------------------------------------------------- acquire
    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`FolderLockedError` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": _job_id(),
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "start_unix": now,
            "token": f"{socket.gethostname()}:{os.getpid()}:{now:.6f}",
        }
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, mtime = self._read()
                if mtime is None:
                    continue  # released meanwhile: try again
                reason = self.stale_reason(holder, mtime)
                if reason is None:
                    who = describe_holder(holder) if holder else "a job that is writing it now"
                    raise FolderLockedError(
                        f"{self.what} {self.folder}: in use by another job ({who}; lock file {self.path}): "
                        "one job per folder; give this job another folder, or end the other job (a lock "
                        f"left by a dead job is taken over once its pid is gone or after {self.stale_s / 60:g} "
                        "min untouched)"
                    ) from None
                if self._take_over(holder):
                    who = describe_holder(holder) if holder else "unknown"
                    logger.warning(
                        "%s %s: taking over the lock of a dead job (%s: %s)",
                        self.what,
                        self.folder,
                        who,
                        reason,
                    )
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            self.record = record
            self._start_heartbeat()
            return self
        raise FolderLockedError(f"{self.what} {self.folder}: could not take the lock {self.path} (contended)")

    def _take_over(self, judged: dict[str, Any] | None) -> bool:
        """Move the stale lock aside (a rename: of two jobs taking it over, one moves it), then check that
        what was moved is the lock judged stale; a live lock moved by mistake goes back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = None
        if moved != judged:  # another job replaced it between our read and our rename: put it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            with contextlib.suppress(OSError):
                aside.unlink()
            return False
        with contextlib.suppress(OSError):
            aside.unlink()
        return True

    # -------------------------------------------------------------------------------- heartbeat
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="folder-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.touch()

    def touch(self) -> None:
        """Refresh the lock's mtime (it tells jobs on other hosts that the holder lives)."""
        with contextlib.suppress(OSError):
            os.utime(self.path)

    # ---------------------------------------------------------------------------------- release
    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder, _ = self._read()
        if self._mine(holder):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.record = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
