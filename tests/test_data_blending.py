"""--data-path weights, --split ranges, blended datasets and the data-parallel sampler."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron_ki.data.blending import (
    BlendedDataset,
    PretrainingSampler,
    build_train_valid_test_datasets,
    parse_data_path,
    split_ranges,
)
from megatron_ki.data.mlm_dataset import MLMDataset
from tests.test_data_utils import make_indexed

SEQ = 8


def test_parse_data_path():
    assert parse_data_path(["a"]) == ([1.0], ["a"])
    w, p = parse_data_path("0.3 a 0.7 b")
    assert p == ["a", "b"] and np.allclose(w, [0.3, 0.7])
    w, _ = parse_data_path(["3", "a", "1", "b"])
    assert np.allclose(w, [0.75, 0.25])
    for bad, msg in (
        (["0.3", "a", "b"], "pairs"),
        (["x", "a", "1", "b"], "should be a weight"),
        (["-1", "a", "1", "b"], ">= 0"),
        ([], "no dataset"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_data_path(bad)


def test_split_ranges():
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("1", 10) == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges("80/10/10", 7) == [
        (0, 5),
        (5, 6),
        (6, 7),
    ]  # Megatron: rounding excess taken from the front
    r = split_ranges("33,33,34", 101)
    assert r[0][0] == 0 and r[-1][1] == 101 and all(a[1] == b[0] for a, b in itertools.pairwise(r))
    with pytest.raises(ValueError, match="data.split"):
        split_ranges("1,2,3,4", 10)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    make_indexed(str(d / "a"), 200, seed=1, vocab=100)
    make_indexed(str(d / "b"), 300, seed=2, vocab=100)
    return d


def test_blended_ratios_and_splits(two, tmp_path):
    path = ["0.3", str(two / "a"), "0.7", str(two / "b")]
    train, valid, test = build_train_valid_test_datasets(
        path, "90,8,2", SEQ, 1234, (2000, 200, 0), cache_dir=str(tmp_path)
    )
    assert test is None
    assert isinstance(train, BlendedDataset) and len(train) == 2000 and len(valid) == 200
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert abs(ids.mean() - 0.7) < 0.01
    for k in range(0, 1000, 50):  # any prefix of the stream keeps the ratio
        assert abs(np.mean(ids[: k + 100]) - 0.7) < 0.02
    # train and valid use disjoint documents of each dataset
    for d in range(2):
        tr, va = train.datasets[d], valid.datasets[d]
        assert not set(np.asarray(tr.doc_idx).tolist()) & set(np.asarray(va.doc_idx).tolist())
    assert set(np.asarray(train.datasets[0].doc_idx).tolist()) == set(range(180))
    sample = train[3]
    assert sample["text"].shape == (SEQ + 1,)


def test_single_dataset_and_mlm_kind(two, tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Tok:
        vocab_size: int = 100
        cls: int = 1
        sep: int = 2
        pad: int = 0
        mask: int = 3
        special_ids = (0, 1, 2, 3)

    train, valid, test = build_train_valid_test_datasets(
        [str(two / "a")], "90,5,5", SEQ, 1, (50, 5, 5), kind="mlm", tokenizer=Tok(), cache_dir=str(tmp_path)
    )
    assert isinstance(train, MLMDataset) and len(train) >= 50 and valid is not None and test is not None
    assert train[0]["text"].shape == (SEQ,)


def test_datasets_from_config(two, tmp_path):
    from megatron_ki.config import DataConfig
    from megatron_ki.data import build_datasets_from_config

    cfg = DataConfig(
        data_path=["1", str(two / "a"), "3", str(two / "b")],
        split="98,2,0",
        seq_length=SEQ,
        seed=7,
        cache_dir=str(tmp_path),
    )
    train, valid, test = build_datasets_from_config(cfg, (400, 40, 0))
    assert len(train) == 400 and len(valid) == 40 and test is None
    ids = np.array([int(train[i]["dataset_id"]) for i in range(400)])
    assert abs(ids.mean() - 0.75) < 0.01


def test_sampler_partitions_and_resumes():
    dp, mbs, total = 3, 2, 40
    per_rank = [list(PretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    assert all(len(p) == total // (mbs * dp) for p in per_rank)
    merged = [i for step in zip(*per_rank) for b in step for i in b]
    assert merged == list(range(36))
    resumed = [list(PretrainingSampler(total, 18, mbs, r, dp)) for r in range(dp)]
    assert all(resumed[r] == per_rank[r][3:] for r in range(dp))
    tail = [list(PretrainingSampler(total, 36, mbs, r, dp, drop_last=False)) for r in range(dp)]
    assert sorted(i for t in tail for b in t for i in b) == [36, 37, 38, 39]
    assert len(PretrainingSampler(total, 0, mbs, 0, dp)) == 6
    with pytest.raises(ValueError, match="rank 3 not in"):
        PretrainingSampler(total, 0, mbs, 3, dp)
