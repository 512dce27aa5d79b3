"""One job per output folder (megatron_ki/folder_lock.py): refused while the holder lives, taken over once it
is dead (pid gone on this host, or untouched beyond the stated age), released only by its owner."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from megatron_ki.folder_lock import LOCK_NAME, FolderLock, FolderLockedError


def write_lock(
    folder, host: str | None = None, pid: int | None = None, age_s: float = 0.0, job: str | None = None
):
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "host": host or socket.gethostname(),
        "pid": os.getpid() if pid is None else pid,
        "job_id": job,
        "start_time": "2026-01-01T00:00:00Z",
        "token": "someone-else",
    }
    path = folder / LOCK_NAME
    path.write_text(json.dumps(record))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_holds_records_and_releases(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = FolderLock(tmp_path / "ckpt", "checkpoint.save", stale_s=600).acquire()
    record = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert record["job_id"] == "4242" and record["start_time"].endswith("Z")
    lock.release()
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()


def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    write_lock(tmp_path, job="77")  # this very process: alive
    with pytest.raises(FolderLockedError) as e:
        FolderLock(tmp_path, "checkpoint.save", stale_s=600).acquire()
    line = str(e.value)
    assert "checkpoint.save" in line and f"pid {os.getpid()}" in line and "Slurm job 77" in line
    assert "\n" not in line


def test_only_one_of_two_racing_jobs_gets_it(tmp_path):
    got, refused = [], []

    def take():
        try:
            got.append(FolderLock(tmp_path, "checkpoint.save", stale_s=600).acquire())
        except FolderLockedError:
            refused.append(1)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 1 and len(refused) == 3


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    write_lock(tmp_path, pid=dead_pid(), job="9")  # the requeued job's own earlier allocation, killed
    with caplog.at_level(logging.WARNING, logger="megatron_ki"):
        lock = FolderLock(tmp_path, "checkpoint.save", stale_s=600).acquire()
    lines = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(lines) == 1 and "is gone on this host" in lines[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_holder_elsewhere_counts_until_it_goes_untouched(tmp_path):
    write_lock(tmp_path, host="other-node", pid=1, age_s=30)
    with pytest.raises(FolderLockedError, match="host other-node"):
        FolderLock(tmp_path, "checkpoint.save", stale_s=120).acquire()
    write_lock(tmp_path, host="other-node", pid=1, age_s=600)
    FolderLock(tmp_path, "checkpoint.save", stale_s=120).acquire().release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = FolderLock(tmp_path, "checkpoint.save", stale_s=600, heartbeat_s=0.05).acquire()
    path = tmp_path / LOCK_NAME
    old = time.time() - 1000
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 100
    lock.release()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = FolderLock(tmp_path, "checkpoint.save", stale_s=600).acquire()
    write_lock(tmp_path, host="other-node", pid=1)  # taken over meanwhile by another job
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()
