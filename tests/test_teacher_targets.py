"""The offline teacher-targets format (megatron_ki/data/teacher_targets.py) on synthetic rows, no model:
round trips with the stated value errors, id widths of 2, 3 and 4 bytes, refusals naming both sides, resume
bookkeeping and publication."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_ki.data.indexed import IndexedDatasetBuilder
from megatron_ki.data.teacher_targets import (
    FP16_RELATIVE_ERROR,
    INT8_LOGP_RANGE,
    INT8_MAX_ERROR,
    TargetsWriter,
    TeacherTargets,
    TeacherTargetsError,
    dataset_identity,
    id_bytes_for,
    progress_dir,
    row_bytes,
    tmp_bin_file,
)
from megatron_ki.errors import MegatronKIError


def make_dataset(prefix, lengths, seed=0, vocab=100):
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, dtype=np.int32) as b:
        for n in lengths:
            b.add_document(rng.integers(0, vocab, n))
    return str(prefix)


def synthetic_rows(n, k, vocab, seed=0):
    """Sorted top-K log-probabilities of random distributions, distinct ids (some near the top of the
    vocabulary), and the exact log tail mass."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 4 * k))
    logits -= np.log(np.exp(logits).sum(-1, keepdims=True)) - np.log(0.9)  # 10% outside the candidates
    logits.sort(axis=-1)
    logp = logits[:, ::-1][:, :k].astype(np.float32)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    ids[0, 0] = vocab - 1
    tail = np.log1p(-np.exp(logp.astype(np.float64)).sum(-1)).astype(np.float32)
    return ids, logp, tail


def header_for(prefix, k, vocab, values, num_rows=None):
    ds = dataset_identity(prefix)
    width = id_bytes_for(vocab)
    return {
        "format": "megatron_ki.teacher_targets",
        "version": 1,
        "num_rows": ds["num_tokens"] if num_rows is None else num_rows,
        "k": k,
        "temperature": 2.0,
        "values": values,
        "id_bytes": width,
        "row_bytes": row_bytes(k, width, values),
        "vocab_size": vocab,
        "teacher": {"path": "teacher", "family": "gpt2", "vocab_size": vocab},
        "tokenizer": {"type": "SentencePieceTokenizer", "model": "/x/sp.model", "vocab_size": vocab},
        "dataset": ds,
    }


def write_all(path, header, ids, logp, tail, chunk=7):
    assert TargetsWriter.prepare(path, header) == "fresh"
    writer = TargetsWriter(path, header)
    n = len(ids)
    chunks = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    for c, (lo, hi) in enumerate(chunks):
        writer.write_rows(lo, ids[lo:hi], logp[lo:hi], tail[lo:hi])
        writer.mark_done(c, (lo, hi))
    writer.publish(len(chunks))
    return len(chunks)


@pytest.mark.parametrize(
    "vocab,width", [(512, 2), (65_536, 2), (65_537, 3), (151_936, 3), (16_777_216, 3), (16_777_217, 4)]
)
def test_id_width_is_the_smallest_that_holds_the_vocabulary(vocab, width):
    assert id_bytes_for(vocab) == width


@pytest.mark.parametrize("values", ["fp16", "int8"])
@pytest.mark.parametrize("vocab", [300, 151_936, 20_000_000])
def test_round_trip_within_the_stated_error(tmp_path, values, vocab):
    prefix = make_dataset(tmp_path / "ds", [5, 17, 0, 9])
    ids, logp, tail = synthetic_rows(31, 6, vocab)
    header = header_for(prefix, 6, vocab, values)
    write_all(str(tmp_path / "t"), header, ids, logp, tail)
    t = TeacherTargets(str(tmp_path / "t"), dataset_prefix=prefix)
    assert (t.k, t.vocab_size, t.temperature) == (6, vocab, 2.0)
    assert os.path.getsize(tmp_path / "t.bin") == 31 * row_bytes(6, id_bytes_for(vocab), values)
    pos = np.array([[3, 0, 30], [7, 7, 12]], dtype=np.int64)
    got_ids, got_logp, got_tail = t.rows(pos)
    assert got_ids.shape == (2, 3, 6) and got_ids.dtype == np.int64
    assert got_logp.shape == (2, 3, 6) and got_logp.dtype == np.float32
    assert got_tail.shape == (2, 3) and got_tail.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids[pos])
    assert t.rows(np.array([0]))[0][0, 0] == vocab - 1  # the largest id survives its width
    err = np.abs(got_logp - logp[pos])
    if values == "fp16":
        assert np.all(err <= np.abs(logp[pos]) * FP16_RELATIVE_ERROR + 1e-7)
    else:
        inside = logp[pos] >= -INT8_LOGP_RANGE
        assert np.all(err[inside] <= INT8_MAX_ERROR + 1e-6)
        assert np.all(got_logp[~inside] == np.float32(-INT8_LOGP_RANGE))
        assert err[inside].max() > INT8_MAX_ERROR / 4  # the bound is about this encoding, not vacuous
    np.testing.assert_allclose(got_tail, tail[pos], rtol=FP16_RELATIVE_ERROR, atol=1e-4)


def test_tail_of_minus_infinity_survives(tmp_path):
    """K covering the whole distribution: the tail is log 0 = -inf, stored exactly."""
    prefix = make_dataset(tmp_path / "ds", [4])
    ids = np.tile(np.arange(3), (4, 1))
    logp = np.log(np.tile([0.5, 0.3, 0.2], (4, 1))).astype(np.float32)
    tail = np.full(4, -np.inf, np.float32)
    write_all(str(tmp_path / "t"), header_for(prefix, 3, 3, "fp16"), ids, logp, tail)
    _, _, got = TeacherTargets(str(tmp_path / "t")).rows(np.arange(4))
    assert np.all(np.isneginf(got))


def test_a_targets_file_of_another_dataset_is_refused_naming_both(tmp_path):
    mine = make_dataset(tmp_path / "mine", [6, 6])
    same_lengths = make_dataset(tmp_path / "same_lengths", [6, 6], seed=1)  # the .idx is identical
    other_lengths = make_dataset(tmp_path / "other_lengths", [5, 7])
    ids, logp, tail = synthetic_rows(12, 4, 100)
    write_all(str(tmp_path / "t"), header_for(mine, 4, 100, "fp16"), ids, logp, tail)
    TeacherTargets(str(tmp_path / "t"), dataset_prefix=mine)
    for other in (same_lengths, other_lengths):
        with pytest.raises(TeacherTargetsError) as e:
            TeacherTargets(str(tmp_path / "t"), dataset_prefix=other)
        message = str(e.value)
        assert str(tmp_path / "t") in message and str(tmp_path / "mine") in message and other in message
        assert isinstance(e.value, MegatronKIError) and isinstance(e.value, ValueError)


def test_another_tokenizer_or_teacher_vocabulary_is_refused_naming_both(tmp_path):
    prefix = make_dataset(tmp_path / "ds", [8])
    ids, logp, tail = synthetic_rows(8, 4, 100)
    write_all(str(tmp_path / "t"), header_for(prefix, 4, 100, "fp16"), ids, logp, tail)
    t = TeacherTargets(str(tmp_path / "t"))
    t.check_compatible(
        100, teacher_vocab=100, tokenizer_type="SentencePieceTokenizer", tokenizer_model="/y/sp.model"
    )
    with pytest.raises(TeacherTargetsError, match=r"tokenizer vocabulary 100.*uses 32000"):
        t.check_compatible(32000)
    with pytest.raises(TeacherTargetsError, match=r"teacher vocabulary 100.*uses 128"):
        t.check_compatible(100, teacher_vocab=128)
    with pytest.raises(
        TeacherTargetsError, match=r"tokenizer type 'SentencePieceTokenizer'.*'HuggingFaceTokenizer'"
    ):
        t.check_compatible(100, tokenizer_type="HuggingFaceTokenizer")
    with pytest.raises(TeacherTargetsError, match=r"tokenizer model 'sp.model'.*'other.model'"):
        t.check_compatible(100, tokenizer_model="/x/other.model")


def test_unpublished_targets_are_refused_and_resume_keeps_finished_chunks(tmp_path):
    prefix = make_dataset(tmp_path / "ds", [10, 10])
    ids, logp, tail = synthetic_rows(20, 4, 100)
    path = str(tmp_path / "t")
    header = header_for(prefix, 4, 100, "fp16")
    assert TargetsWriter.prepare(path, header) == "fresh"
    writer = TargetsWriter(path, header)
    writer.write_rows(0, ids[:10], logp[:10], tail[:10])
    writer.mark_done(0, (0, 10))
    writer.write_rows(10, ids[10:], logp[10:], tail[10:])  # written, never recorded: a kill before the record
    writer.close()
    with pytest.raises(TeacherTargetsError, match="not published"):
        TeacherTargets(path)
    with pytest.raises(TeacherTargetsError, match="1 of 2 chunks not written"):
        TargetsWriter(path, header).publish(2)
    assert TargetsWriter.prepare(path, header) == "resume"
    assert TargetsWriter(path, header).done_chunks() == {0}
    with pytest.raises(TeacherTargetsError, match="other settings"):
        TargetsWriter.prepare(path, {**header, "temperature": 1.0})
    writer = TargetsWriter(path, header)
    writer.write_rows(10, ids[10:], logp[10:], tail[10:])
    writer.mark_done(1, (10, 20))
    writer.publish(2)
    assert not os.path.exists(tmp_bin_file(path)) and not os.path.exists(progress_dir(path))
    np.testing.assert_array_equal(TeacherTargets(path).rows(np.arange(20))[0], ids)
    assert TargetsWriter.prepare(path, header) == "published"
    with pytest.raises(TeacherTargetsError, match="--overwrite"):
        TargetsWriter.prepare(path, {**header, "k": 4, "temperature": 3.0})
    assert TargetsWriter.prepare(path, {**header, "temperature": 3.0}, overwrite=True) == "fresh"
    with pytest.raises(TeacherTargetsError, match="not published"):
        TeacherTargets(path)


def test_missing_and_truncated_files_are_refused(tmp_path):
    with pytest.raises(TeacherTargetsError, match="no such file"):
        TeacherTargets(str(tmp_path / "nothing"))
    prefix = make_dataset(tmp_path / "ds", [8])
    ids, logp, tail = synthetic_rows(8, 4, 100)
    write_all(str(tmp_path / "t"), header_for(prefix, 4, 100, "int8"), ids, logp, tail)
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(5)
    with pytest.raises(TeacherTargetsError, match="not one precompute's output"):
        TeacherTargets(str(tmp_path / "t"))


def test_positions_outside_the_rows_are_an_index_error(tmp_path):
    prefix = make_dataset(tmp_path / "ds", [8])
    ids, logp, tail = synthetic_rows(8, 4, 100)
    write_all(str(tmp_path / "t"), header_for(prefix, 4, 100, "fp16"), ids, logp, tail)
    with pytest.raises(IndexError, match="token index 8"):
        TeacherTargets(str(tmp_path / "t")).rows(np.array([1, 8]))


def test_token_base_gives_each_sequences_first_row(tmp_path):
    from megatron_ki.data.indexed import IndexedDataset
    from megatron_ki.data.teacher_targets import token_base

    ds = IndexedDataset(make_dataset(tmp_path / "ds", [5, 0, 3, 9]))
    np.testing.assert_array_equal(token_base(ds), [0, 5, 5, 8])
