"""RoBERTa positions follow transformers' rule for any padding id (issue 18).

transformers numbers a RoBERTa input as ``cumsum(not_pad) * not_pad + padding_idx``: real tokens from
pad_token_id + 1 on, padding at pad_token_id, over a table of max_position_embeddings + pad_token_id + 1 rows
(HF's ``max_position_embeddings``, 514 for roberta-base). The framework derives the offset from the padding id,
so a tokenizer whose ``<pad>`` is 4 (tools/train_tokenizer.py's) trains at data.seq_length =
model.max_position_embeddings, converts to and from transformers with equal logits, and feeds a KI teacher;
a configuration that could index past the table is refused before any process starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_ki.config import (
    ConfigError,
    KIConfig,
    ModelConfig,
    config_from_dict,
    load_config,
    model_config_from_yaml,
)
from megatron_ki.convert.hf import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    open_hf_model,
    to_hf_state_dict,
)
from megatron_ki.convert.reshard import load_full_state, write_checkpoint
from megatron_ki.ki.teacher import TeacherError, check_teacher_fits, frozen_teacher
from megatron_ki.models import build_model
from megatron_ki.models.transformer import make_position_ids

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "launch" / "configs" / "models" / "tiny_roberta.yaml"
VOCAB, SEQ = 97, 12
# The case: tiny_roberta.yaml's shape at hidden 128, 130 positions, 128-token samples, pad id 4.
FAILING_CASE = [
    "--model.hidden_size", "128",
    "--model.max_position_embeddings", "130",
    "--model.pad_token_id", "4",
    "--data.seq_length", "128",
]  # fmt: skip


def roberta(pad: int, max_positions: int = SEQ, **kw) -> ModelConfig:
    fields = dict(
        family="roberta",
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=1,
        max_position_embeddings=max_positions,
        pre_norm=False,
        activation="gelu",
        type_vocab_size=1,
        pad_token_id=pad,
        embedding_norm=True,
    )
    return ModelConfig(**{**fields, **kw})


def batches(pad: int, seq: int = SEQ, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Unpadded (every row full length), right-padded and left-padded batches; no real token equals ``pad``."""
    g = torch.Generator().manual_seed(pad)
    ids = torch.randint(pad + 1, vocab, (3, seq), generator=g)
    right, left = ids.clone(), ids.clone()
    right[1, -5:] = pad
    right[2, seq // 2 :] = pad
    left[1, :4] = pad
    return {"unpadded": ids, "right_padded": right, "left_padded": left}


def hf_roberta(pad: int, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ + pad + 1,
        type_vocab_size=1,
        pad_token_id=pad,
    )
    model = transformers.RobertaForMaskedLM(hf_cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms and biases, and a non-zero padding row
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_position_ids(hf, ids: torch.Tensor) -> torch.Tensor:
    """The ids transformers' RobertaEmbeddings looks up, caught at its position table."""
    seen = []
    handle = hf.roberta.embeddings.position_embeddings.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=(ids != hf.config.pad_token_id).long())
    finally:
        handle.remove()
    (pos,) = seen
    return pos.expand_as(ids)


# ----------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("pad", [1, 4])
def test_positions_equal_transformers(pad):
    hf = hf_roberta(pad)
    cfg = config_from_hf(hf.config, make_vocab_size_divisible_by=1)
    assert cfg.pad_token_id == pad and cfg.max_position_embeddings == SEQ
    assert cfg.position_id_offset == pad + 1
    assert cfg.position_table_size == hf.config.max_position_embeddings == SEQ + pad + 1
    for name, ids in batches(pad).items():
        ours = make_position_ids(ids, cfg)
        torch.testing.assert_close(ours, hf_position_ids(hf, ids), rtol=0, atol=0, msg=name)
        assert int(ours.max()) < cfg.position_table_size, name
    full = batches(pad)["unpadded"]  # SEQ = max_position_embeddings tokens: the last row of the table
    assert int(make_position_ids(full, cfg).max()) == cfg.position_table_size - 1 == SEQ + pad


@pytest.mark.parametrize("pad", [1, 4])
def test_hf_round_trip_equal_logits(pad):
    """transformers -> framework -> transformers with pad id ``pad``: same config, same weights, same logits."""
    transformers = pytest.importorskip("transformers")
    hf = hf_roberta(pad)
    cfg = config_from_hf(hf.config, make_vocab_size_divisible_by=1)
    model = build_model(cfg)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    model.eval()
    back = transformers.RobertaForMaskedLM(config_to_hf(cfg)).eval()
    back.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=True)
    assert back.config.max_position_embeddings == hf.config.max_position_embeddings
    assert back.config.pad_token_id == pad
    assert config_from_hf(back.config, make_vocab_size_divisible_by=1) == cfg
    for name, ids in batches(pad).items():
        mask = (ids != pad).long()
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits
            ours = model(ids, attention_mask=mask)
            again = back(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(again, ref, atol=0, rtol=0, msg=name)


def test_framework_model_exports_with_equal_logits():
    """A RoBERTa trained here with pad id 4 (tables drawn by the framework) runs identically in transformers."""
    transformers = pytest.importorskip("transformers")
    cfg = roberta(pad=4)
    model = build_model(cfg, seed=3).eval()
    hf = transformers.RobertaForMaskedLM(config_to_hf(cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=True)
    assert hf.config.max_position_embeddings == SEQ + 5
    for ids in batches(4).values():
        mask = (ids != 4).long()
        with torch.no_grad():
            torch.testing.assert_close(
                model(ids, attention_mask=mask),
                hf(input_ids=ids, attention_mask=mask).logits,
                atol=1e-5,
                rtol=1e-5,
            )


def test_hf_teacher_directory_with_pad_4(tmp_path):
    """``ki.teacher_path: hf:DIR`` reads a pad-4 RoBERTa with the same table and logits."""
    hf = hf_roberta(4)
    hf.save_pretrained(tmp_path / "hf")
    cfg, weights = open_hf_model(tmp_path / "hf", make_vocab_size_divisible_by=1)
    assert cfg == config_from_hf(hf.config, make_vocab_size_divisible_by=1)
    teacher = frozen_teacher(cfg, KIConfig(teacher_dtype="float32"), None, dict(weights.items()))
    ids = batches(4)["unpadded"]
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- the failing case
def test_failing_case_trains():
    """pad id 4 and data.seq_length = model.max_position_embeddings - 2 = 128: a full-length batch trains."""
    cfg = load_config(TINY, FAILING_CASE)
    cfg.validate(1)
    m = cfg.model
    assert m.position_table_size == 130 + 5
    model = build_model(m, seed=cfg.train.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for seq in (128, 130):  # the samples, and ones as long as the table is meant for
        ids = torch.randint(5, m.vocab_size, (2, seq), generator=g)  # unpadded: no id 4
        labels = torch.randint(5, m.vocab_size, (2, seq), generator=g)
        for batch in (ids.masked_fill(torch.arange(seq) >= seq - 9, 4), ids):
            logits = model(batch, attention_mask=(batch != 4).long())
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
            optim.zero_grad()
            loss.backward()
            optim.step()
            assert torch.isfinite(loss)
    assert model.embedding.position_embeddings.weight.grad[-1].abs().sum() > 0  # the table's last row trained


def test_failing_case_reads_the_projects_tokenizer(tmp_path):
    """With data made by the project's own tokenizer (<pad> = 4) build_data accepts pad id 4, and its samples
    run through the student at seq_length 128."""
    from megatron_ki.data import build_tokenizer
    from megatron_ki.training.run import build_loaders
    from tests.training_utils import build_corpus

    corpus = build_corpus(tmp_path / "corpus")
    data = [*corpus.data_args(tmp_path / "cache"), "--data.seq_length", "128"]  # the corpus' args say 32
    cfg = load_config(TINY, [*FAILING_CASE, *data])
    cfg.validate(1)
    groups = SimpleNamespace(topology=SimpleNamespace(dp=1), dp_rank=0, rank=0)
    train, _, _ = build_loaders(cfg, groups, 0)
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    assert tokenizer.pad == cfg.model.pad_token_id == 4
    model = build_model(cfg.model, seed=cfg.train.seed)
    sample = next(iter(train))
    ids, mask = sample["text"].long(), sample["padding_mask"].long()
    assert ids.shape[1] == 128 and bool(((ids == 4) == (mask == 0)).all())
    logits = model(ids, attention_mask=mask)
    labels = sample["labels"].long()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    assert torch.isfinite(loss)
    # a model whose pad id is not the tokenizer's is still refused
    wrong = load_config(TINY, [*FAILING_CASE, *data, "--model.pad_token_id", "1"])
    with pytest.raises(ConfigError, match="differs from the padding id 4") as info:
        build_loaders(wrong, groups, 0)
    assert info.value.key == "model.pad_token_id"


# ---------------------------------------------------------------------------------- refused configs
@pytest.mark.parametrize("pad", [1, 4])
def test_position_table_overflow_is_refused_naming_the_three_options(pad):
    cfg = load_config(TINY, ["--model.pad_token_id", str(pad), "--data.seq_length", "129"])
    with pytest.raises(ConfigError) as info:
        cfg.validate(1)
    message = str(info.value)
    assert info.value.key == "data.seq_length"
    for name in ("data.seq_length", "model.max_position_embeddings", "model.pad_token_id"):
        assert name in message, message
    assert f"up to model.pad_token_id + data.seq_length = {pad} + 129 = {pad + 129}" in message
    assert f"past the {128 + pad + 1}-row position table" in message
    load_config(TINY, ["--model.pad_token_id", str(pad), "--data.seq_length", "128"]).validate(1)


def test_teacher_position_table_is_checked():
    teacher = dataclasses.asdict(model_config_from_yaml(TINY)) | {
        "pad_token_id": 4,
        "max_position_embeddings": 64,
    }
    cfg = config_from_dict(
        {
            "model": {**dataclasses.asdict(model_config_from_yaml(TINY)), "pad_token_id": 4},
            "ki": {"enabled": True, "teacher": teacher},
            "data": {"seq_length": 65},
        }
    )
    with pytest.raises(ConfigError, match=r"ki\.teacher\.max_position_embeddings") as info:
        cfg.validate(1)
    assert info.value.key == "data.seq_length" and "ki.teacher.pad_token_id" in str(info.value)
    cfg.data.seq_length = 64
    cfg.validate(1)
    cfg.ki.teacher = dataclasses.replace(cfg.ki.teacher, pad_token_id=1)
    with pytest.raises(ConfigError, match="differs from model.pad_token_id=4") as info:
        cfg.validate(1)
    assert info.value.key == "ki.teacher.pad_token_id"


def test_checkpoint_teacher_must_share_padding_and_fit():
    student = roberta(pad=4)
    check_teacher_fits(student, roberta(pad=4), tp=1, seq_length=SEQ)
    with pytest.raises(TeacherError, match="teacher pad_token_id 1 differs from model.pad_token_id=4"):
        check_teacher_fits(student, roberta(pad=1), tp=1)
    with pytest.raises(TeacherError, match=rf"'data.seq_length': {SEQ + 1} tokens take RoBERTa position ids"):
        check_teacher_fits(student, roberta(pad=4), tp=1, seq_length=SEQ + 1)


# ------------------------------------------------------------------------ one rule, old configs
def test_position_offset_is_derived_and_the_old_key_must_agree():
    assert roberta(pad=1, position_offset=2) == roberta(pad=1)  # the old shipped form still loads
    assert roberta(pad=1).position_offset is None  # nothing stale to disagree after a change of pad id
    again = dataclasses.replace(roberta(pad=1, position_offset=2), pad_token_id=4)
    assert again.position_table_size == SEQ + 5
    with pytest.raises(ConfigError) as info:
        roberta(pad=4, max_positions=128, position_offset=2)
    assert info.value.key == "model.position_offset"
    message = str(info.value)
    assert "model.pad_token_id=4" in message and "pad_token_id + 1 = 5" in message
    assert "130-row position table with model.max_position_embeddings 125" in message
    with pytest.raises(ConfigError, match="family bert"):
        ModelConfig(family="bert", pad_token_id=0, position_offset=1)
    assert ModelConfig(family="bert", pad_token_id=0, position_offset=0).position_table_size == 128


def test_shipped_roberta_configs_use_the_rule():
    for path in sorted(TINY.parent.glob("*roberta*.yaml")):
        assert "position_offset" not in path.read_text(), path
        cfg = model_config_from_yaml(path)
        assert cfg.pad_token_id == 1 and cfg.position_table_size == cfg.max_position_embeddings + 2, path
    base = model_config_from_yaml(TINY.parent / "roberta_base.yaml")
    pytest.importorskip("transformers")
    assert config_to_hf(base).max_position_embeddings == 514  # roberta-base's


def test_pad_id_above_1_keeps_every_other_initial_value():
    """Rows a larger pad id adds are drawn last: every other tensor, and the table's first rows, are those of
    the same config with pad id 1 (and of configs written before the offset was derived)."""
    one = build_model(roberta(pad=1, max_positions=32), seed=5).state_dict()
    four = build_model(roberta(pad=4, max_positions=32), seed=5).state_dict()
    assert list(one) == list(four)
    for k, v in one.items():
        w = four[k]
        if k == "embedding.position_embeddings.weight":
            assert w.shape[0] == v.shape[0] + 3
            w = w[: v.shape[0]]
        torch.testing.assert_close(w, v, rtol=0, atol=0, msg=k)


def test_old_checkpoint_with_pad_4_still_loads(tmp_path):
    """A checkpoint saved before the rule, pad id 4 with position_offset 2 and 128 positions, held a 130-row
    table used from row 5 on: it loads as 125 positions, the same table and the same model."""
    cfg = roberta(pad=4, max_positions=125)
    model = build_model(cfg, seed=2)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert full["embedding.position_embeddings.weight"].shape[0] == 130
    from megatron_ki.config import Config

    write_checkpoint(full, Config(model=cfg, ki=KIConfig(teacher=cfg)), tmp_path, tp=1, pp=1, tag="old")
    meta_path = tmp_path / "old" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for m in (meta["config"]["model"], meta["config"]["ki"]["teacher"]):  # as the old version wrote it
        m.update(max_position_embeddings=128, position_offset=2)
    meta_path.write_text(json.dumps(meta))
    _, loaded_cfg, state = load_full_state(tmp_path)
    assert loaded_cfg == cfg
    again = build_model(loaded_cfg)
    again.load_state_dict(state, strict=True)
    ids = batches(4)["right_padded"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("pad", [1, 4])
def test_num_parameters_counts_the_table(pad):
    cfg = roberta(pad=pad)
    with torch.device("meta"):
        built = sum(p.numel() for p in build_model(cfg).parameters())
    assert cfg.num_parameters() == built
