"""Our MMIDIDX files read by megatron-core's own IndexedDataset, token for token, and our separator equal to
the eod megatron-core's tokenizers report for the same tokenizer files.

megatron-core is in the ``test`` extra (``pip install --no-build-isolation -e ".[test]"``, pinned to 0.16.1, the
newest release that installs on Python 3.10/3.11; it needs only torch, numpy and packaging). Without it these
tests skip; tests/test_data_indexed.py keeps checking the byte layout with an independent reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ki.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_ki.data.preprocess import main as preprocess_main
from megatron_ki.data.tokenizers import build_tokenizer
from tests.test_data_utils import HF_FAMILIES, build_family_tokenizer_dir, make_corpus, train_sp

mcore_indexed = pytest.importorskip(
    "megatron.core.datasets.indexed_dataset",
    reason="megatron-core is not installed (pip install --no-build-isolation -e '.[test]' installs it)",
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Datasets written by our tools: preprocess (two keys), preprocess with partitions, a merge of two."""
    d = tmp_path_factory.mktemp("mcore")
    model = train_sp(str(d))
    corpus = d / "c.jsonl"
    texts = make_corpus(str(corpus), n_docs=60, seed=5)
    base = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--log-interval", "0"]
    argv = ["--input", str(corpus), "--append-eod", "--json-keys", "text", "title", *base]
    assert preprocess_main([*argv, "--output-prefix", str(d / "one")]) == 0
    lines = corpus.read_text().splitlines(keepends=True)
    for k in range(2):
        (d / f"part{k}.jsonl").write_text("".join(lines[k * 30 : (k + 1) * 30]))
    argv = ["--input", str(d / "part*.jsonl"), "--append-eod", *base, "--partitions", "2"]
    assert preprocess_main([*argv, "--output-prefix", str(d / "parts")]) == 0
    for k in range(2):
        argv = ["--input", str(d / f"part{k}.jsonl"), "--append-eod", *base]
        assert preprocess_main([*argv, "--output-prefix", str(d / f"p{k}")]) == 0
    merge = [sys.executable, str(ROOT / "tools" / "merge_datasets.py"), "--output-prefix", str(d / "merged")]
    inputs = ["--input", str(d / "p0_text_document"), str(d / "p1_text_document")]
    r = subprocess.run([*merge, *inputs], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    prefixes = {
        "text": str(d / "one_text_document"),
        "title": str(d / "one_title_document"),
        "partitions": str(d / "parts_text_document"),
        "merged": str(d / "merged"),
    }
    return {"dir": d, "model": model, "texts": texts, "prefixes": prefixes}


def assert_read_alike(prefix: str) -> None:
    """megatron-core's reader (memory-mapped and plain file reads) sees exactly what ours sees."""
    ours = IndexedDataset(prefix)
    for mmap in (True, False):
        theirs = mcore_indexed.IndexedDataset(prefix, mmap=mmap)
        assert len(theirs) == len(ours) and theirs.index.dtype == ours.dtype
        np.testing.assert_array_equal(theirs.sequence_lengths, ours.sizes)
        np.testing.assert_array_equal(theirs.document_indices, ours.document_indices)
        assert len(theirs.document_indices) - 1 == ours.num_documents
        for i in range(len(ours)):
            seq = theirs[i]
            assert seq.dtype == ours.dtype
            np.testing.assert_array_equal(seq, ours[i])
        mid = len(ours) // 2
        n = int(ours.sizes[mid])
        np.testing.assert_array_equal(theirs.get(mid, n // 2, n - n // 2), ours.get(mid, n // 2, n - n // 2))


@pytest.mark.parametrize("which", ["text", "title", "partitions", "merged"])
def test_megatron_core_reads_our_datasets(made, which):
    assert_read_alike(made["prefixes"][which])


def test_megatron_core_reads_int32_and_multi_sequence_documents(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "big_vocab")
    with IndexedDatasetBuilder(prefix, np.int32) as b:  # a vocabulary >= 65500 is written as int32
        for _ in range(25):
            lengths = rng.integers(1, 9, rng.integers(1, 4))
            b.add_document(rng.integers(0, 150_000, int(lengths.sum())), lengths)
    assert IndexedDataset(prefix).num_documents == 25 and len(IndexedDataset(prefix)) > 25
    assert_read_alike(prefix)


def test_our_separator_is_megatron_cores_eod(made, tmp_path):
    """For the same tokenizer files, our documents equal megatron-core's text_to_ids + its eod."""
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer

    theirs = SentencePieceTokenizer(made["model"])
    ours = IndexedDataset(made["prefixes"]["text"])
    assert build_tokenizer("SentencePieceTokenizer", made["model"]).eod == theirs.eod
    for i, text in enumerate(made["texts"][:10]):
        assert ours[i].tolist() == [*theirs.text_to_ids(text), theirs.eod]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in made["texts"][:10]))
    for family in HF_FAMILIES:
        path = build_family_tokenizer_dir(str(tmp_path / family), family)
        theirs = HuggingFaceTokenizer(path)
        out = str(tmp_path / f"{family}_out")
        argv = ["--input", str(tmp_path / "c.jsonl"), "--output-prefix", out, "--append-eod"]
        argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", path, "--log-interval", "0"]
        assert preprocess_main(argv) == 0
        data = IndexedDataset(out + "_text_document")
        assert theirs.eod is not None, family
        for i, text in enumerate(made["texts"][:10]):
            assert data[i].tolist() == [*theirs.text_to_ids(text), theirs.eod], family
