"""A non-finite loss or gradient skips the optimizer step (weights untouched) and is counted; K consecutive
skips abort training with a message."""

import os

import pytest
import torch

from megatron_ki.training.engine import GuardedAdamW
from tests.distributed import run_distributed


def test_guarded_adamw_skips_nonfinite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.nonfinite_skips == 1 and p.grad is None
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert opt.nonfinite_skips == 1 and not torch.equal(p.detach(), torch.ones(3))


def _worker(rank, world, poison_steps, max_skips):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import tempfile

    from megatron_ki.config import load_config
    from megatron_ki.ki.teacher import KILossFunction
    from megatron_ki.training.loop import Trainer, TrainingAborted
    from megatron_ki.training.run import build_run

    cfg = load_config(
        "launch/configs/models/tiny_gpt2.yaml",
        [
            "--train.global_batch_size", "2",
            "--train.max_consecutive_skips", str(max_skips),
            "--data.seq_length", "8",
            "--logging.run_dir", tempfile.mkdtemp(prefix="nonfinite-"),
        ],
    )  # fmt: skip
    run = build_run(cfg, world, data=False)  # the same assembly as pretrain_ki.py, without data
    model = run.engine.module

    class Poisoned(KILossFunction):
        def __call__(self, outputs, labels):
            loss = super().__call__(outputs, labels)
            return loss * float("nan") if trainer.state.step in poison_steps else loss

    run.loss_fn = Poisoned(cfg.ki)
    trainer = Trainer(run)
    ids = torch.randint(0, 500, (2, 9))
    batch = (
        (ids[:, :-1], torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)),
        ids[:, 1:],
    )

    def data():
        while True:
            yield batch

    it = data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = []
    try:
        for _ in range(6):
            m = trainer.train_step(it)
            changed = any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            log.append((m["skipped"], m["skipped_total"], changed))
    except TrainingAborted as e:
        return log, str(e)
    return log, None


@pytest.mark.distributed
def test_nonfinite_steps_are_skipped_then_abort():
    log, aborted = run_distributed(_worker, 1, args=({1}, 3))[0]
    assert aborted is None
    assert [entry[0] for entry in log] == [0, 1, 0, 0, 0, 0]
    assert log[1][2] is False and log[0][2] and log[2][2]  # the poisoned step left the weights as they were
    assert log[-1][1] == 1
    log, aborted = run_distributed(_worker, 1, args=({2, 3, 4}, 3))[0]
    assert len(log) == 4  # steps 0-1 train, 2-3 are skipped, the third consecutive skip (step 4) aborts
    assert "3 consecutive steps had a non-finite loss or gradient" in aborted
    assert "train.max_consecutive_skips=3" in aborted
