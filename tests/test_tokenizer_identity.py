"""Tokenizer identity by content (data/tokenizer_identity.py) and the checks a run makes with it before any
process group exists (training/run.py:check_tokenizer_identity): no launches, a few seconds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from megatron_ki.config import Config, ConfigError
from megatron_ki.data import build_tokenizer
from megatron_ki.data.indexed import read_stats, stats_path, write_stats
from megatron_ki.data.tokenizer_identity import (
    FIELD,
    TokenizerIdentityError,
    datasets_fingerprint,
    difference,
    fingerprint,
    pieces_of,
    recorded_in_stats,
)
from tests.training_utils import build_corpus, synthetic_documents


def other_sentencepiece(root: Path, name: str = "sp") -> str:
    """Another 512-piece model, trained on other text (same size, same special pieces): the silent case."""
    from megatron_ki.data.train_tokenizer import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "other.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for doc in synthetic_documents(seed=7):
            f.write(json.dumps({"text": doc[::-1]}) + "\n")
    return train_sentencepiece(
        str(jsonl), str(root / name), 512, special_tokens=["<mask>", "<pad>", "<eod>"], sample_size=0
    )


def appended_sentencepiece(model: str, out: Path, extra: int = 8) -> str:
    """``model`` with ``extra`` user-defined pieces appended: its first pieces are ``model``'s."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model).read_bytes())
    for i in range(extra):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<extra_{i}>", 0.0, 4  # USER_DEFINED
    out.write_bytes(proto.SerializeToString())
    return str(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("identity") / "corpus")


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return other_sentencepiece(tmp_path_factory.mktemp("other"))


def sp(path: str):
    return build_tokenizer("SentencePieceTokenizer", path)


def cfg_for(corpus, tokenizer: str | None = None, data: list[str] | None = None, **ki) -> Config:
    cfg = Config()
    cfg.data.data_path = data or [corpus.prefix]
    cfg.data.tokenizer_type = "SentencePieceTokenizer"
    cfg.data.tokenizer_model = tokenizer or corpus.tokenizer
    for k, v in ki.items():
        setattr(cfg.ki, k, v)
    return cfg


def test_fingerprint_is_content_not_path(corpus, other, tmp_path):
    copy = tmp_path / "copy.model"
    copy.write_bytes(Path(corpus.tokenizer).read_bytes())
    a, b, c = fingerprint(sp(corpus.tokenizer)), fingerprint(sp(str(copy))), fingerprint(sp(other))
    assert a == b
    assert a["sha256"] != c["sha256"] and a["vocab_size"] == c["vocab_size"] == 512
    diff = difference(a, c, pieces_of(sp(corpus.tokenizer)), a_name="mine")
    assert diff is not None and "first different piece at id" in diff and "in mine" in diff


def test_hf_export_has_the_same_identity(corpus, tmp_path):
    from megatron_ki.convert.tokenizer import export_tokenizer

    export_tokenizer(corpus.tokenizer, tmp_path / "hf")
    hf = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    assert fingerprint(hf)["sha256"] == fingerprint(sp(corpus.tokenizer))["sha256"]


def test_appended_pieces_only_when_asked(corpus, tmp_path):
    big = sp(appended_sentencepiece(corpus.tokenizer, tmp_path / "big.model"))
    small = fingerprint(sp(corpus.tokenizer))
    diff = difference(fingerprint(big), small, pieces_of(big))
    assert diff == "520 vs 512 pieces; the first 512 are the same"
    assert difference(fingerprint(big), small, pieces_of(big), appended_ok=True) is None
    assert difference(fingerprint(big), small, None, appended_ok=True) is None
    # the other way round (the data's tokenizer has more pieces than the student's) is never accepted
    assert difference(small, fingerprint(big), pieces_of(sp(corpus.tokenizer)), appended_ok=True) is not None


def test_preprocess_records_the_fingerprint(corpus):
    assert recorded_in_stats(corpus.prefix) == fingerprint(sp(corpus.tokenizer))


def strip_fingerprint(prefix: str) -> None:
    """Make the sidecar look like one written before fingerprints."""
    record = read_stats(prefix)
    record.pop(FIELD)
    for k in ("version", "bin", "bin_size", "bin_mtime_ns"):
        record.pop(k)
    write_stats(prefix, record)


def copy_dataset(prefix: str, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        Path(str(out) + ext).write_bytes(Path(prefix + ext).read_bytes())
    write_stats(str(out), {k: v for k, v in read_stats(prefix).items() if not k.startswith(("bin", "vers"))})
    return str(out)


def test_run_refuses_data_of_another_tokenizer(corpus, other):
    from megatron_ki.training.run import check_tokenizer_identity

    with pytest.raises(ConfigError) as e:
        check_tokenizer_identity(cfg_for(corpus, other), sp(other))
    assert e.value.key == "data.tokenizer_model" and stats_path(corpus.prefix) in str(e.value)
    assert "first different piece at id" in str(e.value)
    assert check_tokenizer_identity(cfg_for(corpus), sp(corpus.tokenizer))["sha256"]


def test_old_data_is_accepted_with_one_warning(corpus, other, tmp_path, caplog):
    from megatron_ki.training.run import check_tokenizer_identity

    old = copy_dataset(corpus.prefix, tmp_path / "old_text_document")
    strip_fingerprint(old)
    with caplog.at_level(logging.WARNING, logger="megatron_ki"):
        check_tokenizer_identity(cfg_for(corpus, other, data=[old]), sp(other))
    lines = [r.getMessage() for r in caplog.records if "fingerprint" in r.getMessage()]
    assert len(lines) == 1 and stats_path(old) in lines[0]


def test_blend_of_two_tokenizers_is_refused(corpus, other, tmp_path):
    from megatron_ki.training.run import check_tokenizer_identity

    mixed = copy_dataset(corpus.prefix, tmp_path / "mixed_text_document")
    record = read_stats(mixed)
    record[FIELD] = fingerprint(sp(other))
    write_stats(mixed, {k: v for k, v in record.items() if not k.startswith(("bin", "vers"))})
    with pytest.raises(TokenizerIdentityError):
        datasets_fingerprint([corpus.prefix, mixed])
    cfg = cfg_for(corpus, data=["0.5", corpus.prefix, "0.5", mixed])
    with pytest.raises(ConfigError) as e:
        check_tokenizer_identity(cfg, None)
    assert e.value.key == "data.data_path" and "mixed_text_document" in str(e.value)


def test_teacher_of_another_tokenizer_is_refused(corpus, other, tmp_path):
    from megatron_ki.checkpoint_format import read_meta, write_meta
    from megatron_ki.training.run import check_tokenizer_identity
    from tests.training_utils import write_teacher

    teacher = write_teacher(tmp_path / "teacher", "tiny_gpt2.yaml")
    cfg = cfg_for(corpus, enabled=True, teacher_path=str(teacher))
    check_tokenizer_identity(cfg, sp(corpus.tokenizer))  # none recorded: accepted (a warning)
    tag, meta = read_meta(teacher)
    meta.pop("format_version")
    write_meta(teacher / tag, {**meta, FIELD: fingerprint(sp(other))})
    with pytest.raises(ConfigError) as e:
        check_tokenizer_identity(cfg, sp(corpus.tokenizer))
    assert e.value.key == "ki.teacher_path" and "meta.json" in str(e.value)
    write_meta(teacher / tag, {**meta, FIELD: fingerprint(sp(corpus.tokenizer))})
    check_tokenizer_identity(cfg, sp(corpus.tokenizer))


def convert_tool():
    import importlib.util

    from tests.bad_inputs.harness import ROOT

    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_export_and_import_carry_the_fingerprint(corpus, other, tmp_path):
    from megatron_ki.checkpoint_format import read_meta, write_meta
    from megatron_ki.data.tokenizer_identity import read_hf_fingerprint
    from tests.training_utils import write_teacher

    cc = convert_tool()
    teacher = write_teacher(tmp_path / "teacher", "tiny_gpt2.yaml")
    tag, meta = read_meta(teacher)
    meta.pop("format_version")
    mine = fingerprint(sp(corpus.tokenizer))
    write_meta(teacher / tag, {**meta, FIELD: mine})
    with pytest.raises(cc.ConversionError, match="not the one the checkpoint was trained with"):
        cc.export_hf(teacher, tmp_path / "hf_wrong", tokenizer_model=other, progress=False)
    assert not (tmp_path / "hf_wrong").exists()
    cc.export_hf(teacher, tmp_path / "hf", tokenizer_model=corpus.tokenizer, progress=False)
    assert read_hf_fingerprint(tmp_path / "hf")[0] == mine
    cc.import_hf(tmp_path / "hf", tmp_path / "back", progress=False)
    assert read_meta(tmp_path / "back")[1][FIELD] == mine
    # the export's record is what an hf: teacher is checked by (beside its tokenizer files, piece by piece)
    from megatron_ki.data.tokenizer_identity import write_hf_fingerprint
    from megatron_ki.training.run import check_tokenizer_identity

    cfg = cfg_for(corpus, enabled=True, teacher_path=f"hf:{tmp_path / 'hf'}")
    check_tokenizer_identity(cfg, sp(corpus.tokenizer))
    write_hf_fingerprint(tmp_path / "hf", fingerprint(sp(other)))
    with pytest.raises(ConfigError, match="tokenizer_fingerprint.json was made with another tokenizer"):
        check_tokenizer_identity(cfg, sp(corpus.tokenizer))


def test_a_merge_records_the_fingerprint_its_inputs_share(corpus, tmp_path, capsys):
    import importlib.util

    from tests.bad_inputs.harness import ROOT

    spec = importlib.util.spec_from_file_location("merge_datasets", ROOT / "tools" / "merge_datasets.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    copy = copy_dataset(corpus.prefix, tmp_path / "b_text_document")
    out = tmp_path / "ab_text_document"
    assert merge.main(["--input", corpus.prefix, copy, "--output-prefix", str(out)]) == 0
    assert recorded_in_stats(str(out)) == recorded_in_stats(corpus.prefix)
    strip_fingerprint(copy)  # one input from before fingerprints: merged, one warning, nothing recorded
    out2 = tmp_path / "ab2_text_document"
    assert merge.main(["--input", corpus.prefix, copy, "--output-prefix", str(out2)]) == 0
    assert recorded_in_stats(str(out2)) is None
    assert capsys.readouterr().err.count("no tokenizer fingerprint recorded") == 1
