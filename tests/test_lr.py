import math

import pytest

from megatron_ki.config import OptimConfig
from megatron_ki.training.lr import lr_at


def test_paper_schedule_warmup_then_linear_decay():
    cfg = OptimConfig(lr=5e-4, min_lr=0.0, lr_warmup_fraction=0.1, lr_decay_style="linear")
    total = 1000
    assert lr_at(0, cfg, total) == pytest.approx(5e-4 / 100)
    assert lr_at(99, cfg, total) == pytest.approx(5e-4)
    assert lr_at(100, cfg, total) == pytest.approx(5e-4)
    assert lr_at(550, cfg, total) == pytest.approx(2.5e-4)
    assert lr_at(1000, cfg, total) == pytest.approx(0.0)
    assert lr_at(5000, cfg, total) == pytest.approx(0.0)


def test_cosine_constant_inverse_sqrt():
    cos = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_fraction=0.0, lr_decay_style="cosine")
    assert lr_at(0, cos, 100) == pytest.approx(1.0)
    assert lr_at(50, cos, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, cos, 100) == pytest.approx(0.1)
    const = OptimConfig(lr=1.0, lr_warmup_fraction=0.1, lr_decay_style="constant")
    assert lr_at(5, const, 100) == pytest.approx(0.6)
    assert lr_at(99, const, 100) == pytest.approx(1.0)
    inv = OptimConfig(lr=1.0, min_lr=0.0, lr_warmup_fraction=0.04, lr_decay_style="inverse_sqrt")
    assert lr_at(3, inv, 100) == pytest.approx(1.0)
    assert lr_at(15, inv, 100) == pytest.approx(math.sqrt(4) / math.sqrt(16))
