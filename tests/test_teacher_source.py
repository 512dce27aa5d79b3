"""What a run checks about its data's document separator and its teacher before any process group exists
(``megatron_ki/training/run.py``): the separator recorded beside the data, one per blend, and a teacher that
ends documents with the same id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_ki.checkpoint_format import FORMAT_VERSION
from megatron_ki.config import Config, ConfigError
from megatron_ki.data.indexed import IndexedDatasetBuilder, write_stats
from megatron_ki.training.run import (
    check_teacher_eod,
    check_teacher_source,
    data_eod,
    teacher_config_of,
    teacher_eos_ids,
)


def _dataset(prefix: Path, eod: int | None) -> str:
    with IndexedDatasetBuilder(str(prefix), np.uint16) as b:
        b.add_document([7, 8, eod or 9])
    write_stats(str(prefix), {**b.token_stats(), "eod_token_id": eod})
    return str(prefix)


def _cfg(data_path: list[str], **ki) -> Config:
    cfg = Config()
    cfg.data.data_path = data_path
    for k, v in ki.items():
        setattr(cfg.ki, k, v)
    return cfg


def test_data_eod_names_the_sidecar_and_refuses_a_mixed_blend(tmp_path):
    a, b, c = _dataset(tmp_path / "a", 2), _dataset(tmp_path / "b", 2), _dataset(tmp_path / "c", 5)
    assert data_eod(_cfg(["0.5", a, "0.5", b])) == (2, f"{a}.stats.json")
    with pytest.raises(ConfigError, match=rf"data.data_path.*{c}: eod_token_id 5 .* {a} records 2"):
        data_eod(_cfg(["0.5", a, "0.5", c]))
    bare = tmp_path / "bare"
    with IndexedDatasetBuilder(str(bare), np.uint16) as builder:
        builder.add_document([1, 2])
    assert data_eod(_cfg([str(bare)])) is None  # nothing recorded (e.g. Megatron-LM's own tool): no check


def test_teacher_eos_ids_from_hf_files_and_framework_meta(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert teacher_eos_ids(f"hf:{hf}") == {2, 7}
    (hf / "generation_config.json").write_text("{ not json")
    assert teacher_eos_ids(f"hf:{hf}") == {2}
    ckpt = tmp_path / "ckpt"
    (ckpt / "step5").mkdir(parents=True)
    (ckpt / "latest").write_text("step5")
    meta = {"format_version": FORMAT_VERSION, "config": {}, "step": 5, "layout": {}, "eod_token_id": 5}
    (ckpt / "step5" / "meta.json").write_text(json.dumps(meta))
    assert teacher_eos_ids(str(ckpt)) == {5}
    meta["eod_token_id"] = None
    (ckpt / "step5" / "meta.json").write_text(json.dumps(meta))
    assert teacher_eos_ids(str(ckpt)) == set()


def test_check_teacher_eod():
    check_teacher_eod("hf:/t", {2, 7}, 7, "x.stats.json")
    check_teacher_eod("hf:/t", set(), 5, "x.stats.json")  # the teacher says nothing: nothing to compare
    check_teacher_eod("hf:/t", {2}, None, "")  # the data says nothing
    with pytest.raises(ConfigError) as e:
        check_teacher_eod("hf:/t", {2}, 5, "/d/x.stats.json")
    assert e.value.key == "ki.teacher_path"
    for part in ("hf:/t", "eos_token_id [2]", "id 5", "/d/x.stats.json", "--eod-token 2"):
        assert part in str(e.value)


def test_unsupported_or_missing_teacher_is_a_config_error(tmp_path):
    transformers = pytest.importorskip("transformers")
    gemma = tmp_path / "gemma"
    transformers.GemmaConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1).save_pretrained(gemma)
    with pytest.raises(ConfigError, match=r"ki.teacher_path.*model_type 'gemma' unsupported"):
        teacher_config_of(f"hf:{gemma}", 128)
    with pytest.raises(ConfigError, match=r"ki.teacher_path.*hf:/no/such/dir.*config.json: missing"):
        check_teacher_source(_cfg([], enabled=True, teacher_path="hf:/no/such/dir"), world=1)
    check_teacher_source(_cfg([], enabled=False, teacher_path=f"hf:{gemma}"), world=1)  # KI off: not read
