"""Pre-train a model with DeepSpeed, optionally inheriting knowledge from a frozen teacher.

    deepspeed --num_gpus 8 pretrain_ki.py --config launch/configs/X.yaml [--group.key value ...] [--debug]

(``launch/pretrain_ki.sh`` builds that command.) Parse the config, build the run, train it:
``megatron_ki/training/run.py`` assembles the run, ``megatron_ki/training/loop.py`` trains it. An expected
failure is one line on one rank (``--debug``: the traceback); exit codes in ``megatron_ki/errors.py``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence

from megatron_ki.config import ConfigError, parse_args
from megatron_ki.errors import EXIT_FAILURE, debug_requested, exit_code_for

PROG = "pretrain_ki.py"
STARTED = time.monotonic()  # train.exit_duration_mins counts from here


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )


def run(argv: list[str], world: int, callbacks: Sequence = ()) -> int:
    cfg = parse_args(argv)
    cfg.validate(world)
    if not cfg.data.data_path:
        raise ConfigError("data.data_path", "is required: a preprocessed prefix or 'weight prefix' pairs")

    from megatron_ki.folder_lock import FolderLock
    from megatron_ki.training.loop import Trainer
    from megatron_ki.training.run import build_run

    lock = None
    if cfg.checkpoint.save and int(os.environ.get("RANK", "0")) == 0:  # one job per checkpoint folder
        stale_s = cfg.checkpoint.lock_stale_minutes * 60
        lock = FolderLock(cfg.checkpoint.save, "checkpoint.save", stale_s).acquire()
    try:
        code = Trainer(build_run(cfg, world), callbacks).fit(started=STARTED)
        import torch.distributed as dist

        if dist.is_initialized():  # every rank is past fit's last barrier: tear the groups down before exit
            dist.destroy_process_group()
        return code
    finally:  # the exit-75 path (saved, requeue me) included: the requeued job finds the folder free
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None, callbacks: Sequence = ()) -> int:
    """Run, and turn an expected failure into one line on one rank (``--debug``: the traceback)."""
    import torch.distributed as dist

    from megatron_ki.training.resilience import is_peer_failure, report_failure

    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]  # added by the deepspeed launcher
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    setup_logging(rank)
    try:
        return run(argv, world, callbacks)
    except BaseException as e:
        if debug or isinstance(e, SystemExit):
            raise
        if is_peer_failure(e):  # the rank that failed says why; the others only say that they stop
            if rank == 0:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"{PROG}: rank 0 stops: lost contact with another rank ({first})", file=sys.stderr)
            return EXIT_FAILURE
        code = exit_code_for(e)
        if code is None:
            raise
        return report_failure(PROG, e, rank, code, distributed=dist.is_initialized())


def exit_now(code: int) -> None:
    """Flush and leave without the interpreter's teardown: after a finished run, the C++ destructors of the
    communication threads have ended ranks with "terminate called without an active exception" (exit 250)
    now and then, turning a complete run into a failed job. Every output is written and closed by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
