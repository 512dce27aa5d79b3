"""A teacher whose embedding rows are padded beyond the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens),
scaled down: 320 rows for a 300-token family tokenizer, beside a 300-token student whose own vocabulary is
padded for tensor parallelism (make_vocab_size_divisible_by x tp).

- ``check_teacher`` accepts more rows than the student's vocabulary and refuses fewer, naming both numbers.
- The teacher tokenizer check reads family ``tokenizer.json`` directories (byte-level BPE, added specials),
  accepts the padded teacher when the tokenizers agree, and names the first differing id otherwise.
- The KI loss with that teacher, loaded through ``load_teacher_weights`` (``hf:DIR``), equals a dense PyTorch
  reference over the first 300 columns -- the KD term, both LM losses and the gradient w.r.t. the student's
  logits (exactly 0 on the padded columns) -- at tp=1 and tp=2, with the padding inside the last rank's shard
  and filling a whole shard. The reference takes the teacher's logits from transformers, not from us.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from megatron_ki.config import Config, ConfigError, DataConfig, KIConfig, check_teacher  # noqa: E402
from megatron_ki.convert import config_from_hf  # noqa: E402
from megatron_ki.convert.tokenizer import TokenizerMismatchError, check_teacher_tokenizer  # noqa: E402
from megatron_ki.ki import ki_loss  # noqa: E402
from megatron_ki.ki.teacher import TeacherError, check_teacher_fits, frozen_teacher  # noqa: E402
from megatron_ki.models import build_model  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.test_ki_families import TOKENS, hf_teacher, write_tokenizer  # noqa: E402

ROWS = TOKENS + 20  # the Qwen2.5-shaped teacher's embedding rows
ALPHA, BATCH, SEQ = 0.6, 2, 10
TOL = dict(atol=1e-5, rtol=1e-5)


def student_config(divisible: int):
    """A tiny Llama student on the 300-token tokenizer, its vocabulary padded to ``divisible`` x tp."""
    return config_from_hf(
        transformers.LlamaConfig(
            vocab_size=TOKENS,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        make_vocab_size_divisible_by=divisible,
    )


# ------------------------------------------------------------------------------------------ the rule
def test_teacher_with_more_rows_is_accepted_fewer_refused() -> None:
    student = student_config(8)
    teacher = config_from_hf(hf_teacher("qwen2.5").config, make_vocab_size_divisible_by=8)
    assert teacher.vocab_size == ROWS
    check_teacher(student, teacher, tp=2)
    running = check_teacher_fits(student, teacher, tp=2)
    assert running.vocab_size == TOKENS and running.padded_vocab_size(2) == student.padded_vocab_size(2)
    assert dataclasses.replace(running, vocab_size=ROWS) == teacher  # nothing else changes
    fewer = dataclasses.replace(teacher, vocab_size=TOKENS - 1)
    with pytest.raises(
        ConfigError, match=f"teacher vocabulary {TOKENS - 1} differs from the student's {TOKENS}"
    ):
        check_teacher(student, fewer, tp=1)
    with pytest.raises(TeacherError, match=f"at least the student's {TOKENS} rows"):
        check_teacher_fits(student, fewer, tp=1)
    other_padding = dataclasses.replace(teacher, make_vocab_size_divisible_by=128)
    with pytest.raises(ConfigError, match="teacher padded vocabulary 512 differs from the student's 304"):
        check_teacher(student, other_padding, tp=2)


# --------------------------------------------------------------------------------------- tokenizers
def _variant(src: Path, dst: Path, edit) -> Path:
    """A copy of the tokenizer directory whose tokenizer.json ``edit`` changed."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    edit(data)
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def test_family_tokenizer_json_check(tmp_path) -> None:
    tok = write_tokenizer(tmp_path / "tok")
    only_json = tmp_path / "only_json"
    only_json.mkdir()
    shutil.copyfile(tok / "tokenizer.json", only_json / "tokenizer.json")
    for student in (tok, tok / "tokenizer.json", only_json):  # a directory, the file, no tokenizer_config
        for teacher in (tok, only_json):
            check_teacher_tokenizer("HuggingFaceTokenizer", str(student), teacher, teacher_rows=ROWS)
    check_teacher_tokenizer("HuggingFaceTokenizer", str(tok), tok, teacher_rows=TOKENS)
    with pytest.raises(TokenizerMismatchError, match=f"{TOKENS - 1} embedding rows, fewer than the {TOKENS}"):
        check_teacher_tokenizer("HuggingFaceTokenizer", str(tok), tok, teacher_rows=TOKENS - 1)

    def rename_last_special(data: dict) -> None:
        data["added_tokens"][-1]["content"] = "<|fim|>"

    renamed = _variant(tok, tmp_path / "renamed", rename_last_special)
    with pytest.raises(
        TokenizerMismatchError, match=f"at id {TOKENS - 1}: student '<\\|im_end\\|>', teacher"
    ):
        check_teacher_tokenizer("HuggingFaceTokenizer", str(tok), renamed, teacher_rows=ROWS)

    def add_special(data: dict) -> None:
        data["added_tokens"].append({**data["added_tokens"][-1], "id": TOKENS, "content": "<|extra|>"})

    longer = _variant(tok, tmp_path / "longer", add_special)
    with pytest.raises(TokenizerMismatchError, match=f"has {TOKENS + 1} tokens, the student's .* {TOKENS}"):
        check_teacher_tokenizer("HuggingFaceTokenizer", str(tok), longer, teacher_rows=ROWS)


# ------------------------------------------------------------------------------- the KI loss, exact
def _teacher_dir(root: Path) -> Path:
    """The 320-row Qwen2.5-shaped teacher with the 300-token tokenizer, as a Hugging Face directory."""
    tok = write_tokenizer(root / "tok")
    hf_teacher("qwen2.5").save_pretrained(root / "teacher")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok / f, root / "teacher" / f)
    return root / "teacher"


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, TOKENS, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, TOKENS, (BATCH, SEQ), generator=g)
    labels[0, :3] = -100
    return ids, labels


def _ours(teacher_dir: Path, divisible: int, temperature: float, group, tp: int, rank: int) -> dict:
    """The KI loss of this rank: the teacher through ``load_teacher_weights``, the student's logits shard."""
    from megatron_ki.training.run import load_teacher_weights

    student_cfg = student_config(divisible)
    cfg = Config(
        model=student_cfg,
        ki=KIConfig(enabled=True, teacher_path=f"hf:{teacher_dir}", teacher_dtype="float32"),
        data=DataConfig(
            tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(teacher_dir), seq_length=SEQ
        ),
    )
    groups = SimpleNamespace(topology=SimpleNamespace(tp=tp, pp=1), tp_rank=rank)
    t_cfg, state = load_teacher_weights(cfg, groups)
    teacher = frozen_teacher(t_cfg, cfg.ki, group, state)
    student = build_model(student_cfg, tp_group=group, seed=3)
    ids, labels = _batch()
    logits = student(ids).detach().requires_grad_(True)
    with torch.no_grad():
        t_logits = teacher(ids)
    out = ki_loss(logits, t_logits, labels, ALPHA, temperature=temperature, tp_group=group)
    out.loss.backward()
    local = logits.shape[-1]
    return {
        "parts": [out.loss.detach(), out.lm_loss, out.kd_loss, out.teacher_lm_loss],
        "grad": logits.grad,
        "columns": (rank * local, (rank + 1) * local),
        "student_logits": logits.detach(),
        "teacher_rows": t_cfg.vocab_size,
    }


def _dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """``[loss, lm, kd, teacher lm]`` and d loss / d student logits over the real columns only, in float64."""
    s = student_logits.double().requires_grad_(True)
    t = teacher_logits.double()
    _, labels = _batch()
    mask = labels != -100
    lm = F.cross_entropy(s[mask], labels[mask])
    t_lm = F.cross_entropy(t[mask], labels[mask])
    log_ps, log_pt = (F.log_softmax(x[mask] / temperature, -1) for x in (s, t))
    kd = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2
    loss = (1 - ALPHA) * lm + ALPHA * kd
    loss.backward()
    return [x.detach().float() for x in (loss, lm, kd, t_lm)], s.grad.float()


def _check(results: list[dict], teacher_dir: Path, temperature: float) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    ids, _ = _batch()
    with torch.no_grad():
        hf_logits = hf(input_ids=ids).logits
    assert hf_logits.shape[-1] == ROWS
    real = torch.cat([r["student_logits"] for r in results], -1)
    assert torch.isneginf(real[..., TOKENS:]).all()  # the student's padded columns
    ref_parts, ref_grad = _dense(real[..., :TOKENS], hf_logits[..., :TOKENS], temperature)
    for r in results:
        assert r["teacher_rows"] == TOKENS
        for got, want, what in zip(r["parts"], ref_parts, ("loss", "lm", "kd", "teacher lm"), strict=True):
            torch.testing.assert_close(got.float(), want, **TOL, msg=what)
        lo, hi = r["columns"]
        want = torch.zeros_like(r["grad"])
        if lo < TOKENS:
            want[..., : min(hi, TOKENS) - lo] = ref_grad[..., lo : min(hi, TOKENS)]
        torch.testing.assert_close(r["grad"], want, **TOL)
        assert bool((r["grad"][..., max(TOKENS - lo, 0) :] == 0).all())  # exactly 0 on the padding


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_over_real_vocabulary_tp1(tmp_path, temperature: float) -> None:
    teacher_dir = _teacher_dir(tmp_path)
    _check([_ours(teacher_dir, 128, temperature, None, 1, 0)], teacher_dir, temperature)


def _tp2_worker(rank: int, world: int, teacher_dir: str) -> list[dict]:
    out = []
    for divisible in (128, 512):  # padding inside rank 1's shard (300 of 512) / filling it (300 of 1024)
        for temperature in (1.0, 2.0):
            out.append(_ours(Path(teacher_dir), divisible, temperature, dist.group.WORLD, world, rank))
    return out


@pytest.mark.distributed
def test_kd_over_real_vocabulary_tp2(tmp_path) -> None:
    teacher_dir = _teacher_dir(tmp_path)
    results = run_distributed(_tp2_worker, world_size=2, args=(str(teacher_dir),))
    for i, temperature in enumerate((1.0, 2.0, 1.0, 2.0)):
        _check([results[0][i], results[1][i]], teacher_dir, temperature)
    assert results[1][2]["columns"] == (512, 1024)  # the whole shard of rank 1 is padding
