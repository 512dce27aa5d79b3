"""What clusters do to jobs, through the real launcher script on 2 CPU ranks: a frozen rank (``kill -STOP``),
SIGTERM to the launcher or to one rank (save, exit 75, resume bitwise with dropout), a wall-clock limit.

Runs use constant LR and ``train_steps`` far beyond where they stop, so a run stopped at step S, its resumption
and an uninterrupted run cut at the same step (``train.exit_interval``) see the same schedule and samples.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bad_inputs.harness import record
from tests.training_utils import (
    CONFIGS,
    ROOT,
    build_corpus,
    deepspeed_bin,
    free_port,
    quiet_args,
    read_metrics,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SCRIPT = ["bash", str(ROOT / "launch" / "pretrain_ki.sh")]
EXIT_REQUEUE = 75
TIMEOUT_S = 10  # train.collective_timeout_s of the frozen-rank run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("resilience") / "corpus")


def args_for(corpus, run_dir: Path, *extra: str) -> list[str]:
    """Tiny GPT with dropout, constant LR, logging every step; ``train_steps`` large (runs are stopped)."""
    return [
        "--config", str(CONFIGS / "tiny_gpt2.yaml"),
        "--train.train_steps", "100000",
        "--train.micro_batch_size", "2",
        "--train.global_batch_size", "4",
        "--model.hidden_dropout", "0.1",
        "--model.attention_dropout", "0.1",
        "--optim.lr_decay_style", "constant",
        "--optim.lr_warmup_fraction", "0",
        "--logging.log_interval", "1",
        *corpus.data_args(run_dir / "index-cache"),
        *quiet_args(run_dir),
        *extra,
    ]  # fmt: skip


class Job:
    """A launch that the test interacts with while it runs; output goes to ``run_dir/output.log``."""

    def __init__(self, run_dir: Path, args: list[str], script: bool = True, world: int = 2):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir, self.log = run_dir, run_dir / "output.log"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.update(MASTER_PORT=str(free_port()), CPU_RANKS=str(world), DEEPSPEED=deepspeed_bin())
        env["PATH"] = f"{Path(deepspeed_bin()).parent}{os.pathsep}{env['PATH']}"
        cmd = SCRIPT + args
        if not script:
            cmd = [deepspeed_bin(), "--num_gpus", str(world), "--master_port", env["MASTER_PORT"]]
            cmd += [str(ROOT / "pretrain_ki.py"), *args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def steps(self) -> list[int]:
        return [m["step"] for m in read_metrics(self.run_dir) if "split" not in m]

    def losses(self) -> list[float]:
        return [m["loss"] for m in read_metrics(self.run_dir) if "split" not in m]

    def wait_for_step(self, step: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self.steps() or self.steps()[-1] < step:
            assert self.proc.poll() is None, (
                f"the run ended (rc {self.proc.returncode}):\n{self.output()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"no step {step} after {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.1)

    def rank_pid(self, local_rank: int) -> int:
        """The pid of rank ``local_rank`` of this job (its command line names this job's run directory)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"--local_rank={local_rank}".encode() in argv and str(self.run_dir).encode() in argv:
                return int(entry.name)
        raise AssertionError(f"rank {local_rank} of {self.run_dir} not found")

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s:\n{self.output()[-3000:]}") from None

    def seconds(self) -> float:
        return time.monotonic() - self.started


def saved_step(ckpt: Path) -> int:
    tag = (ckpt / "latest").read_text().strip()
    return json.loads((ckpt / tag / "meta.json").read_text())["step"]


def test_frozen_rank_ends_the_job_and_is_named(corpus, tmp_path):
    """kill -STOP one rank: the step watchdog ends the job non-zero within collective_timeout_s + 30 s and
    names the rank that stopped answering (before: still running after 288 s with a 30 s timeout)."""
    run_dir = tmp_path / "frozen"
    job = Job(run_dir, args_for(corpus, run_dir, "--train.collective_timeout_s", str(TIMEOUT_S)))
    job.wait_for_step(3)
    frozen = job.rank_pid(1)
    os.kill(frozen, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        rc = job.wait(timeout=TIMEOUT_S + 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)
    took = time.monotonic() - stopped_at
    out = job.output()
    assert rc not in (0, EXIT_REQUEUE), out[-3000:]
    assert took < TIMEOUT_S + 30, f"the job took {took:.0f} s to end"
    lines = [line for line in out.splitlines() if "step watchdog" in line]
    record("frozen_rank (kill -STOP rank 1, collective_timeout_s 10)", rc, took, lines[0] if lines else "")
    assert len(lines) == 1, out[-3000:]
    assert f"rank 1 (host {os.uname().nodename}, pid {frozen}" in lines[0] and "stopped answering" in lines[0]
    assert "rank 0 (" not in lines[0], lines[0]
    assert "Traceback" not in out


def test_sigterm_to_the_launcher_saves_and_resumes_bitwise(corpus, tmp_path):
    """SIGTERM to launch/pretrain_ki.sh: every rank finishes its step, saves, the job exits 75 (before: the
    ranks were orphaned and trained on). Resumed to 3 steps further, the per-step losses are bitwise those of an
    uninterrupted run, with dropout 0.1 at dp=2 (per-rank RNG states, the data loader's own generator)."""
    ckpt = tmp_path / "ckpt"
    run_dir = tmp_path / "interrupted"
    job = Job(run_dir, args_for(corpus, run_dir, "--checkpoint.save", str(ckpt)))
    job.wait_for_step(3)
    job.proc.send_signal(signal.SIGTERM)  # the script's process; the ranks are its grandchildren's children
    signalled = time.monotonic()
    rc = job.wait(timeout=120)
    out = job.output()
    said = [line for line in out.splitlines() if "saving a checkpoint at step" in line and "rank0" in line]
    record("SIGTERM to launch/pretrain_ki.sh", rc, time.monotonic() - signalled, said[0] if said else "")
    assert rc == EXIT_REQUEUE, out[-3000:]
    assert "forwarding it to the ranks" in out
    stopped = saved_step(ckpt)
    assert job.steps()[-1] == stopped, (job.steps()[-3:], stopped)
    assert f"received SIGTERM: saving a checkpoint at step {stopped}" in out
    end = stopped + 3
    cut = ("--train.exit_interval", str(end))
    resumed = Job(
        tmp_path / "resumed", args_for(corpus, tmp_path / "resumed", "--checkpoint.load", str(ckpt), *cut)
    )
    full = Job(tmp_path / "full", args_for(corpus, tmp_path / "full", *cut))
    assert resumed.wait() == EXIT_REQUEUE, resumed.output()[-3000:]
    assert full.wait() == EXIT_REQUEUE, full.output()[-3000:]
    assert resumed.steps() == list(range(stopped + 1, end + 1))
    assert full.steps() == list(range(1, end + 1))
    assert job.losses()[:stopped] + resumed.losses() == full.losses()


def test_sigterm_to_one_rank_stops_every_rank(corpus, tmp_path):
    """A signal to one rank (SIGINT to rank 1, under the plain deepspeed launcher): all ranks stop at the same
    step, one checkpoint with both ranks' RNG states, exit 75."""
    ckpt = tmp_path / "ckpt"
    run_dir = tmp_path / "one_rank"
    job = Job(run_dir, args_for(corpus, run_dir, "--checkpoint.save", str(ckpt)), script=False)
    job.wait_for_step(3)
    os.kill(job.rank_pid(1), signal.SIGINT)
    signalled = time.monotonic()
    rc = job.wait(timeout=120)
    out = job.output()
    said = [line for line in out.splitlines() if "saving a checkpoint at step" in line and "rank0" in line]
    record("SIGINT to rank 1 only", rc, time.monotonic() - signalled, said[0] if said else "")
    assert rc == EXIT_REQUEUE, out[-3000:]
    step = saved_step(ckpt)
    tag = (ckpt / "latest").read_text().strip()
    assert sorted(p.name for p in (ckpt / tag / "rng").iterdir()) == ["rank00000.pt", "rank00001.pt"]
    assert f"another rank received a stop signal: saving a checkpoint at step {step}" in out


def test_exit_duration_saves_before_the_limit(corpus, tmp_path):
    """train.exit_duration_mins: past the limit (here 1 s, reached during start-up) the run saves after its
    next step and exits 75."""
    ckpt = tmp_path / "ckpt"
    run_dir = tmp_path / "duration"
    job = Job(
        run_dir,
        args_for(corpus, run_dir, "--checkpoint.save", str(ckpt), "--train.exit_duration_mins", "0.0167"),
    )
    rc = job.wait(timeout=120)
    out = job.output()
    said = [line for line in out.splitlines() if "exit_duration_mins" in line and "rank0" in line]
    record("train.exit_duration_mins 0.0167 (1 s)", rc, job.seconds(), said[0] if said else "")
    assert rc == EXIT_REQUEUE, out[-3000:]
    assert saved_step(ckpt) == 1 and job.steps() == [1]
    assert "train.exit_duration_mins (0.0167) reached: saving a checkpoint at step 1" in out


REPORT = """
import sys
from megatron_ki.errors import MegatronKIError
from megatron_ki.training import resilience
resilience.PEER_GRACE_S = float(sys.argv[3])
print("ready", flush=True)
sys.exit(resilience.report_failure("prog", MegatronKIError("bad input"), int(sys.argv[1]), 2, sys.argv[2] == "1"))
"""


def _report(rank: int, distributed: bool, grace: float, term_after: float | None) -> tuple[int, str, float]:
    """Exit code, stderr and seconds to exit of ``report_failure`` in a process of its own."""
    cmd = [sys.executable, "-c", REPORT, str(rank), "1" if distributed else "0", str(grace)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    if term_after is not None:
        time.sleep(term_after)
        assert proc.poll() is None, "another rank left before the launcher ended it"
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.monotonic() - start


def test_other_ranks_wait_for_rank_0_to_report():
    """Rank 0 prints at once; another rank, before the process group exists, stays until the launcher ends it
    (it left at once before, and the launcher then killed rank 0 before it printed: no error line at all) or
    the grace ends, and says nothing; after the group exists it prints its own failure with its rank."""
    code, err, _ = _report(0, False, 30.0, None)
    assert code == 2 and err.strip() == "prog: error: bad input"
    code, err, _ = _report(1, False, 30.0, term_after=1.0)
    assert code == 2 and err == ""
    code, err, took = _report(1, False, 0.5, None)
    assert code == 2 and err == "" and took >= 0.5
    code, err, _ = _report(1, True, 0.5, None)
    assert code == 2 and err.strip() == "prog: error: bad input (rank 1)"
