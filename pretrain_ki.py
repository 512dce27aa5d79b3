"""Pre-train a model with DeepSpeed, optionally inheriting knowledge from a frozen teacher.

    deepspeed --num_gpus 8 pretrain_ki.py --config launch/configs/X.yaml [--group.key value ...]

(``launch/pretrain_ki.sh`` builds that command.) Reads top to bottom: configuration, process groups,
data, student and teacher, engine, resume, loop, final evaluation.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_ki.config import Config, ConfigError, parse_args
from megatron_ki.errors import EXIT_FAILURE, EXIT_REQUEUE, debug_requested, exit_code_for
from megatron_ki.parallel import release_deepspeed_shm

logger = logging.getLogger("megatron_ki")
PROG = "pretrain_ki.py"
STARTED = time.monotonic()  # train.exit_duration_mins counts from here


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )


def collective_timeout(cfg: Config) -> timedelta:
    """The process groups' timeout: a backstop a little after the step watchdog, which names the hung rank."""
    return timedelta(seconds=cfg.train.collective_timeout_s + 30)


def init_distributed(cfg: Config) -> None:
    """DeepSpeed's comm layer over NCCL (GPU) or gloo (CPU)."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, timeout=collective_timeout(cfg))
    release_deepspeed_shm()


def build_data(cfg: Config, groups, consumed_samples: int):
    """Tokenizer, datasets, and per-data-parallel-rank iterators (train resumes at ``consumed_samples``)."""
    from megatron_ki.data import PretrainingSampler, build_datasets_from_config, build_tokenizer
    from megatron_ki.data.token_range import check_token_range, dataset_prefixes

    tokenizer = None
    if cfg.data.tokenizer_type != "none":
        tokenizer = build_tokenizer(
            cfg.data.tokenizer_type, cfg.data.tokenizer_model, option="data.tokenizer_model"
        )
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                f"{cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ({cfg.data.tokenizer_model})",
            )
        if cfg.model.padding_positions and cfg.model.pad_token_id != tokenizer.pad:
            # RoBERTa-style positions skip tokens equal to pad_token_id: a mismatch silently shifts them.
            raise ConfigError(
                "model.pad_token_id",
                f"{cfg.model.pad_token_id} differs from the padding id {tokenizer.pad} of {cfg.data.tokenizer_model}",
            )
    if groups.rank == 0:  # token ids beyond the embedding: an IndexError at tp=1, silent garbage at tp>=2
        check_token_range(dataset_prefixes(cfg.data), cfg.model.vocab_size, cfg.data.cache_dir)
    dist.barrier()
    kind = "gpt" if cfg.model.causal else "mlm"
    gbs, train = cfg.train.global_batch_size, cfg.train
    evals = (train.train_steps // train.eval_interval if train.eval_interval else 0) + 1
    if train.eval_samples == "fixed":
        evals = 1  # every evaluation re-reads the same first eval_iters global batches
    sizes = (train.train_steps * gbs, evals * train.eval_iters * gbs, train.eval_iters * gbs)
    datasets = build_datasets_from_config(cfg.data, sizes, kind=kind, tokenizer=tokenizer)
    dp, dp_rank = groups.topology.dp, groups.dp_rank

    def loader(ds, consumed: int):
        if ds is None:
            return None
        sampler = PretrainingSampler(len(ds), consumed, train.micro_batch_size, dp_rank, dp)
        # Its own generator: starting an iterator (every fixed evaluation does) draws a worker seed, which
        # must not advance the global RNG that dropout and a bitwise resume depend on.
        return torch.utils.data.DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=cfg.data.num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(train.seed),
        )

    return tokenizer, [loader(ds, consumed_samples if i == 0 else 0) for i, ds in enumerate(datasets)]


def batches(loader, causal: bool):
    from megatron_ki.training.loop import model_inputs

    while True:  # the valid/test loaders are re-read if evaluation asks for more than one pass
        for sample in loader:
            yield model_inputs(sample, causal)


def eval_batches(loader, causal: bool, fixed: bool):
    """``() -> iterator`` for one evaluation: a fresh pass from the first sample (fixed), or Megatron's
    continuing iterator (each evaluation reads the next batches)."""
    if loader is None:
        return None
    if fixed:
        return lambda: batches(loader, causal)
    shared = batches(loader, causal)
    return lambda: shared


def build_teacher(cfg: Config, groups, device):
    """``(teacher config, this TP rank's teacher state dict or None)`` from ``ki.teacher_path`` / ``ki.teacher``."""
    from megatron_ki.convert.reshard import load_full_state, shard_state_dict
    from megatron_ki.ki.teacher import check_teacher_fits

    if not cfg.ki.enabled:
        return None, None
    state = None
    teacher_cfg = cfg.ki.teacher
    if cfg.ki.teacher_path and cfg.ki.teacher_path.startswith("hf:"):
        # A Hugging Face directory, read tensor by tensor and sharded like the student; same tokenizer enforced.
        from megatron_ki.convert.hf import open_hf_model
        from megatron_ki.convert.tokenizer import check_teacher_tokenizer

        hf_dir = cfg.ki.teacher_path[len("hf:") :]
        check_teacher_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, hf_dir)
        saved_cfg, full = open_hf_model(
            hf_dir,
            cfg.model.make_vocab_size_divisible_by,
            attention_backend=cfg.model.attention_backend,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        if teacher_cfg is not None and teacher_cfg != saved_cfg:
            raise ConfigError("ki.teacher", f"differs from the architecture of {hf_dir}/config.json")
        teacher_cfg = saved_cfg
        state = shard_state_dict(full, teacher_cfg, groups.topology.tp, groups.tp_rank)
    elif cfg.ki.teacher_path:
        _, saved_cfg, full = load_full_state(cfg.ki.teacher_path)
        if teacher_cfg is not None and teacher_cfg != saved_cfg:
            raise ConfigError("ki.teacher", f"differs from the architecture saved in {cfg.ki.teacher_path}")
        teacher_cfg = saved_cfg
        state = shard_state_dict(full, teacher_cfg, groups.topology.tp, groups.tp_rank)
    check_teacher_fits(cfg.model, teacher_cfg, groups.topology.tp, cfg.data.seq_length)
    return teacher_cfg, state


def _test_hook_fail(step: int, rank: int) -> bool:
    """Test hook: ``MEGATRON_KI_FAIL_AT_STEP=N[:RANK]`` makes one rank raise after step N (default rank 0)."""
    spec = os.environ.get("MEGATRON_KI_FAIL_AT_STEP")
    if not spec:
        return False
    at, _, who = spec.partition(":")
    return step == int(at) and rank == int(who or 0)


def main(argv: list[str] | None = None) -> int:
    """Run, and turn an expected failure into one line on one rank (``--debug``: the traceback)."""
    from megatron_ki.training.resilience import is_peer_failure, report_failure

    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]  # added by the deepspeed launcher
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    setup_logging(rank)
    try:
        return run(argv, rank, world)
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


def run(argv: list[str], rank: int, world: int) -> int:
    cfg = parse_args(argv)
    cfg.validate(world)
    if not cfg.data.data_path:
        raise ConfigError("data.data_path", "is required: a preprocessed prefix or 'weight prefix' pairs")

    from megatron_ki.convert.reshard import write_text_atomic
    from megatron_ki.ki.schedule import build_schedule
    from megatron_ki.ki.teacher import KILossFunction, frozen_teacher
    from megatron_ki.models import build_model
    from megatron_ki.models.pipe import Companion, build_pipeline_module, companion_layers_for
    from megatron_ki.parallel import ParallelGroups, Topology
    from megatron_ki.tensor_parallel import TPRngTracker, seed_everything
    from megatron_ki.training import checkpoint as ckpt
    from megatron_ki.training.ds_config import deepspeed_config, write_deepspeed_config
    from megatron_ki.training.engine import initialize_engine
    from megatron_ki.training.flops import (
        device_peak_flops,
        mfu,
        pipeline_layer_costs,
        training_flops_per_token,
    )
    from megatron_ki.training.loop import Trainer
    from megatron_ki.training.lr import lr_schedule
    from megatron_ki.training.metrics import MetricsWriter, ProgressBar
    from megatron_ki.training.resilience import StepWatchdog, StopRequest

    init_distributed(cfg)
    groups = ParallelGroups.build(
        Topology.from_world(world, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel),
        timeout=collective_timeout(cfg),
    )
    watchdog = StepWatchdog.from_env(rank, world, cfg.train.collective_timeout_s)
    watchdog.start()  # heartbeats from now on; the deadline counts from the first training step
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    seed_everything(cfg.train.seed + 100 * groups.pp_rank, device)
    tracker = TPRngTracker(cfg.train.seed, groups.tp_rank, device)

    # Student and teacher.
    teacher_cfg, teacher_state = build_teacher(cfg, groups, device)
    loss_fn = KILossFunction(cfg.ki, groups.tp_group)
    teacher = companion = None
    if cfg.parallel.pipeline_parallel > 1:
        if teacher_cfg is not None:
            companion = Companion(
                teacher_cfg, seed=cfg.train.seed + 1, dtype=cfg.ki.teacher_dtype, state_dict=teacher_state
            )
        model = build_pipeline_module(
            cfg.model,
            groups.topology,
            groups,
            seed=cfg.train.seed,
            loss_fn=loss_fn,
            partition_method=cfg.parallel.pipeline_partition,
            rng_tracker=tracker,
            companion=companion,
            device=device,
            layer_costs=pipeline_layer_costs(
                cfg.model,
                cfg.data.seq_length,
                teacher_cfg,
                companion_layers_for(cfg.model.num_layers, teacher_cfg.num_layers) if teacher_cfg else None,
                cfg.parallel.tensor_parallel,
            ),
        )
    else:
        model = build_model(cfg.model, groups.tp_group, seed=cfg.train.seed, rng_tracker=tracker).to(device)
        if teacher_cfg is not None:
            teacher = frozen_teacher(
                teacher_cfg, cfg.ki, groups.tp_group, teacher_state, cfg.train.seed + 1, device
            )
    del teacher_state

    ds = deepspeed_config(cfg, world)
    if rank == 0:
        run_dir = write_deepspeed_config(ds, cfg.logging.run_dir).parent
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    engine = initialize_engine(cfg, model, groups, ds)

    # Resume, then data from where the run stopped.
    trainer = Trainer(
        cfg,
        engine,
        groups,
        loss_fn,
        build_schedule(cfg.ki, lr_schedule(cfg.optim, cfg.train.train_steps), cfg.optim.lr),
        teacher=teacher,
        companion=companion,
    )
    if cfg.checkpoint.load:
        meta = ckpt.load_checkpoint(engine, cfg, groups, tracker)
        if meta is not None and not meta.get("weights_only"):
            trainer.state.step, trainer.state.consumed_samples = meta["step"], meta["consumed_samples"]
            trainer.state.flops = meta.get("flops", 0.0)
            trainer.state.train_time_s = meta.get("train_time_s", 0.0)
    _, (train_loader, valid_loader, test_loader) = build_data(cfg, groups, trainer.state.consumed_samples)
    train_iter = batches(train_loader, cfg.model.causal)
    valid_iter = eval_batches(valid_loader, cfg.model.causal, cfg.train.eval_samples == "fixed")

    peak = device_peak_flops(cfg.train.precision, device)
    writer = MetricsWriter(cfg.logging.run_dir, cfg.logging.tensorboard, enabled=rank == 0)
    bar = ProgressBar(
        cfg.train.train_steps, enabled=rank == 0 and cfg.logging.progress_bar, initial=trainer.state.step
    )
    train = cfg.train

    def save() -> None:
        ckpt.save_checkpoint(
            engine,
            cfg,
            groups,
            trainer.state.step,
            trainer.state.consumed_samples,
            extra_meta={"flops": trainer.state.flops, "train_time_s": trainer.state.train_time_s},
            tp_tracker=tracker,
        )

    started = time.perf_counter()
    fixed_eval = train.eval_samples == "fixed"

    def evaluate(split: str, data_iter) -> dict:
        """One evaluation, logged with where the run stands (tokens, FLOPs, seconds)."""
        result = trainer.evaluate(data_iter, train.eval_iters, fixed=fixed_eval and split == "valid")
        writer.log(
            trainer.state.step,
            {
                "split": split,
                "consumed_tokens": trainer.state.consumed_samples * cfg.data.seq_length,
                "flops": trainer.state.flops,
                "train_time_s": trainer.state.train_time_s,
                "elapsed_s": time.perf_counter() - started,
                **result,
            },
        )
        return result

    stop = StopRequest(train.exit_signal_handler, train.exit_duration_mins, started=STARTED)
    saved_at = trainer.state.step if cfg.checkpoint.load else None
    stop.install()
    try:
        while trainer.state.step < train.train_steps:
            watchdog.progress(trainer.state.step, "training")
            teacher_ran = trainer.teacher_active
            metrics = trainer.train_step(train_iter)
            step = trainer.state.step
            per_token = training_flops_per_token(
                cfg.model, cfg.data.seq_length, teacher_cfg if teacher_ran else None
            )
            trainer.state.flops += per_token * train.global_batch_size * cfg.data.seq_length
            metrics.update(
                flops_per_token=per_token,
                flops=trainer.state.flops,
                mfu=mfu(metrics["tokens_per_s"], per_token, peak, world) if metrics["tokens_per_s"] else None,
                elapsed_s=time.perf_counter() - started,
            )
            if step % cfg.logging.log_interval == 0 or step == train.train_steps:
                writer.log(step, metrics)
            bar.update(step, metrics["loss"], metrics["alpha"], metrics["tokens_per_s"])
            if _test_hook_fail(step, rank):
                raise RuntimeError(f"test hook: MEGATRON_KI_FAIL_AT_STEP={step} on rank {rank}")
            if valid_iter is not None and train.eval_interval and step % train.eval_interval == 0:
                watchdog.progress(step, "evaluation")
                evaluate("valid", valid_iter())
            if (
                cfg.checkpoint.save
                and cfg.checkpoint.save_interval
                and step % cfg.checkpoint.save_interval == 0
            ):
                watchdog.progress(step, "saving a checkpoint")
                save()
                saved_at = step
            reason = stop.agreed(device)
            if reason is None and train.exit_interval and step % train.exit_interval == 0:
                reason = f"train.exit_interval ({train.exit_interval}) reached"
            if reason is not None and step < train.train_steps:
                return stop_early(
                    reason, step, save if saved_at != step else None, cfg.checkpoint.save, writer, bar
                )
        bar.close()
        if cfg.checkpoint.save and saved_at != trainer.state.step:
            watchdog.progress(trainer.state.step, "saving a checkpoint")
            save()
        watchdog.progress(trainer.state.step, "evaluation")
        if valid_iter is not None and (not train.eval_interval or trainer.state.step % train.eval_interval):
            evaluate("valid", valid_iter())
        if test_loader is not None:
            final = evaluate("test", batches(test_loader, cfg.model.causal))
            logger.info("test: %s", {k: v for k, v in final.items() if v is not None})
        writer.close()
        watchdog.progress(trainer.state.step, "the final barrier")
        dist.barrier()
    finally:
        watchdog.stop()
        stop.uninstall()
    return 0


def stop_early(reason: str, step: int, save, save_dir: str | None, writer, bar) -> int:
    """Save (unless this step is saved already) and return the requeue exit code."""
    bar.close()
    if save is not None and save_dir:
        logger.info(
            "%s: saving a checkpoint at step %d, then exiting with code %d", reason, step, EXIT_REQUEUE
        )
        save()
    elif save_dir:
        logger.info("%s: step %d is saved; exiting with code %d", reason, step, EXIT_REQUEUE)
    else:
        logger.info(
            "%s: exiting at step %d with code %d WITHOUT a checkpoint (checkpoint.save is not set)",
            reason,
            step,
            EXIT_REQUEUE,
        )
    writer.close()
    dist.barrier()
    return EXIT_REQUEUE


if __name__ == "__main__":
    sys.exit(main())
