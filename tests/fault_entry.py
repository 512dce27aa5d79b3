"""``pretrain_ki.py`` with faults injected through :class:`~megatron_ki.training.loop.Callback` s, for tests
that launch real jobs (``ENTRY=tests/fault_entry.py launch/pretrain_ki.sh ...``). Its own flags, removed before
the run's config is parsed:

    --fail-at-step N[:RANK]   raise on RANK (default 0) after step N
    --kill-in-save N          SIGKILL this process once the checkpoint of step N is written, before it is published
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrain_ki
from megatron_ki.training.loop import Callback


class FailAtStep(Callback):
    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.state.step == self.step and trainer.groups.rank == self.rank:
            raise RuntimeError(f"fault injected: step {self.step} on rank {self.rank}")


class KillInSave(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_checkpoint_written(self, trainer, tmp_dir) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # like `kill -9`: this tag's files written, not published


def pop_flag(argv: list[str], flag: str) -> str | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def main() -> int:
    argv = sys.argv[1:]
    callbacks: list[Callback] = []
    fail = pop_flag(argv, "--fail-at-step")
    if fail is not None:
        at, _, rank = fail.partition(":")
        callbacks.append(FailAtStep(int(at), int(rank or 0)))
    kill = pop_flag(argv, "--kill-in-save")
    if kill is not None:
        callbacks.append(KillInSave(int(kill)))
    return pretrain_ki.main(argv, callbacks)


if __name__ == "__main__":
    pretrain_ki.exit_now(main())
