"""GPT dataset: token coverage per epoch, epochs, on-disk index cache built by one rank, exact resumption."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatron_ki.data.blending import PretrainingSampler
from megatron_ki.data.gpt_dataset import GPTDataset, build_gpt_indices, num_epochs_for
from megatron_ki.data.helpers import load_cpp
from megatron_ki.data.indexed import IndexedDataset
from tests.distributed import run_distributed
from tests.test_data_utils import make_indexed

SEQ = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    prefix = str(d / "ds")
    docs = make_indexed(prefix, 80, seed=3)
    return prefix, docs


def _stream(docs, doc_idx):
    return np.concatenate([np.asarray(docs[int(i)], dtype=np.int64) for i in doc_idx])


def test_one_epoch_covers_every_token_once(data, tmp_path):
    prefix, docs = data
    ds = GPTDataset(prefix, None, SEQ, None, seed=1, cache_dir=str(tmp_path))
    total = sum(len(d) for d in docs)
    assert len(ds) == (total - 1) // SEQ
    assert sorted(ds.doc_idx.tolist()) == list(range(len(docs)))  # every document once
    stream = _stream(docs, ds.doc_idx)
    covered = np.zeros(total, dtype=np.int64)
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        text = ds[i]["text"]
        assert text.dtype == np.int64 and text.shape == (SEQ + 1,)
        np.testing.assert_array_equal(text, stream[j * SEQ : j * SEQ + SEQ + 1])
        covered[j * SEQ : (j + 1) * SEQ] += 1  # input positions (the last token is only a label)
    assert covered[: len(ds) * SEQ].min() == covered[: len(ds) * SEQ].max() == 1
    assert total - len(ds) * SEQ <= SEQ  # only a tail shorter than one sample is left out
    assert sorted(ds.shuffle_idx.tolist()) == list(range(len(ds)))


@pytest.mark.parametrize("seq", [SEQ, 5, 64])
def test_sample_positions_index_the_bin_and_carry_aligned_targets(data, tmp_path, seq):
    """Each sample's positions are the .bin token indices of its tokens, whatever the sequence length, so
    per-token data aligned with the dataset (row r after token r) arrives beside the right inputs."""
    prefix, _ = data
    ds = GPTDataset(prefix, np.arange(3, 70), seq, 40, seed=2, cache_dir=str(tmp_path))
    flat = np.fromfile(f"{prefix}.bin", dtype=ds.indexed.dtype).astype(np.int64)

    class RowIsPosition:  # a stand-in targets file whose row r holds r, so alignment is visible
        def rows(self, positions):
            return (
                positions[..., None] * 10,
                positions[..., None].astype(np.float32),
                -positions.astype(np.float32),
            )

    ds.targets = RowIsPosition()
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        positions = ds.sample_positions(j)
        np.testing.assert_array_equal(flat[positions], ds.sample_tokens(j))
        item = ds[i]
        np.testing.assert_array_equal(item["t_ids"][:, 0], positions[:-1] * 10)
        np.testing.assert_array_equal(item["t_tail"], -positions[:-1])
        assert item["t_logp"].shape == (seq, 1)


@pytest.mark.parametrize("factor", [2.5, 2.95])
def test_several_epochs(data, tmp_path, factor):
    prefix, docs = data
    total = sum(len(d) for d in docs)
    per_epoch = (total - 1) // SEQ
    want = int(per_epoch * factor)
    ds = GPTDataset(prefix, None, SEQ, want, seed=5, cache_dir=str(tmp_path))
    epochs = num_epochs_for(total, SEQ, want)
    assert epochs == 3 and len(ds) >= want
    counts = np.bincount(ds.doc_idx, minlength=len(docs))
    assert counts.min() == counts.max() == 3
    # 2.5 epochs uses half of the last one: it is shuffled on its own (Megatron's separate last epoch)
    last = set(ds.doc_idx[2 * len(docs) :].tolist())
    if factor == 2.5:
        assert last == set(range(len(docs)))
    stream = _stream(docs, ds.doc_idx)
    for i in range(0, len(ds), 7):
        j = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(ds[i]["text"], stream[j * SEQ : j * SEQ + SEQ + 1])


def test_cache_reused_and_keyed_by_parameters(data, tmp_path):
    prefix, _ = data
    a = GPTDataset(prefix, None, SEQ, 100, seed=1, cache_dir=str(tmp_path))
    b = GPTDataset(prefix, None, SEQ, 100, seed=1, cache_dir=str(tmp_path))
    c = GPTDataset(prefix, None, SEQ, 100, seed=2, cache_dir=str(tmp_path))
    assert a.built_indices and not b.built_indices and c.built_indices
    assert isinstance(b.shuffle_idx, np.memmap)
    np.testing.assert_array_equal(a.shuffle_idx, b.shuffle_idx)
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)
    assert len([f for f in os.listdir(tmp_path) if f.endswith("description.json")]) == 2
    default = GPTDataset(prefix, np.arange(10, 50), SEQ, None, seed=1)  # cache beside the data
    assert os.path.isdir(os.path.join(os.path.dirname(prefix), "index-cache"))
    assert set(default.doc_idx.tolist()) == set(range(10, 50))


def test_cpp_and_numpy_indices_identical(data):
    if load_cpp() is None:
        pytest.skip("C++ helpers unavailable")
    prefix, _ = data
    sizes = IndexedDataset(prefix).sizes
    a = build_gpt_indices(sizes, np.arange(80), SEQ, 500, 9, use_cpp=True)
    b = build_gpt_indices(sizes, np.arange(80), SEQ, 500, 9, use_cpp=False)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_resume_from_consumed_samples(data, tmp_path):
    """Two data-parallel ranks: a run resumed at a consumed count sees exactly the batches it had left."""
    prefix, _ = data
    ds = GPTDataset(prefix, None, SEQ, 200, seed=1, cache_dir=str(tmp_path))

    def batches(rank, consumed):
        sampler = PretrainingSampler(
            len(ds), consumed, micro_batch_size=2, data_parallel_rank=rank, data_parallel_size=2
        )
        return [b["text"] for b in torch.utils.data.DataLoader(ds, batch_sampler=sampler)]

    full = [batches(r, 0) for r in range(2)]
    resumed = [batches(r, 12) for r in range(2)]  # 3 global micro-batches of 2 x 2 consumed
    for r in range(2):
        assert len(resumed[r]) == len(full[r]) - 3
        for x, y in zip(full[r][3:], resumed[r]):
            assert torch.equal(x, y)
    assert not torch.equal(full[0][0], full[1][0])
    flat = torch.cat([torch.cat([full[0][k], full[1][k]]) for k in range(len(full[0]))])
    expect = torch.stack([torch.from_numpy(ds[i]["text"]) for i in range(flat.shape[0])])
    assert torch.equal(flat, expect)


def _build_on_ranks(rank, world_size, prefix, cache_dir):
    ds = GPTDataset(prefix, None, SEQ, 300, seed=4, cache_dir=cache_dir)
    return ds.built_indices, ds.shuffle_idx[:20].tolist(), ds[5]["text"].tolist()


@pytest.mark.distributed
def test_indices_built_once_by_rank0(data, tmp_path):
    prefix, _ = data
    results = run_distributed(_build_on_ranks, 2, args=(prefix, str(tmp_path)), timeout=120)
    assert [r[0] for r in results] == [True, False]
    assert results[0][1:] == results[1][1:]
