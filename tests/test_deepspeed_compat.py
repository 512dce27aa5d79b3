"""The DeepSpeed version gate of training/deepspeed_compat.py: another major version is refused in one line."""

from __future__ import annotations

import logging

import pytest

from megatron_ki.training import deepspeed_compat as compat


def test_tested_version_passes():
    assert compat.check_deepspeed_version("0.19.8") == (0, 19)
    import deepspeed

    assert compat.check_deepspeed_version() == tuple(int(x) for x in deepspeed.__version__.split(".")[:2])


def test_other_major_is_refused():
    with pytest.raises(
        compat.DeepSpeedVersionError, match=r"DeepSpeed 1\.2\.0 is installed.*tested with 0\.19"
    ):
        compat.check_deepspeed_version("1.2.0")
    with pytest.raises(compat.DeepSpeedVersionError, match="cannot read"):
        compat.check_deepspeed_version("nightly")


def test_other_minor_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(compat.check_deepspeed_version, "_warned", False, raising=False)
    with caplog.at_level(logging.WARNING, logger="megatron_ki"):
        assert compat.check_deepspeed_version("0.16.4+cu121") == (0, 16)
        compat.check_deepspeed_version("0.16.4")
    assert [r.message for r in caplog.records].count(
        "DeepSpeed 0.16.4+cu121: megatron_ki's use of its internals is tested with 0.19.x"
    ) == 1


def test_missing_zero_restore_method_is_named(tmp_path):
    """Another DeepSpeed whose ZeRO optimizer lacks a private restore routine: a one-line error naming it."""
    from types import SimpleNamespace

    from megatron_ki.checkpoint_format import CheckpointError

    class Optimizer:
        _load_global_state = _restore_elastic_base_optimizer_state = _link_all_hp_params = None

    engine = SimpleNamespace(optimizer=Optimizer(), checkpoint_mp_rank=0)
    with pytest.raises(
        CheckpointError, match="_restore_from_elastic_fp32_weights.*resume with 2 data-parallel"
    ):
        compat.load_zero_state_at_other_dp(engine, tmp_path, 2)
