"""Growth of a teacher into a larger student (``megatron_ki/convert/grow.py``, ``tools/grow_checkpoint.py``).

Without noise the grown student's logits equal the teacher's (fp32, 1e-5 absolute on logits of size ~1) for
every family's switches (GPT-2; Llama with GQA, SwiGLU, RoPE, llama3 scaling, tied and untied; Qwen2's qkv
bias; Qwen3's q/k norms; BERT; RoBERTa) for width only, depth only and both; post-LN depth growth is not
exact and its deviation is measured against a band. With noise the function is still the teacher's (1e-5)
and the copies' gradients differ; without noise they are equal. A checkpoint written at tp=2 x pp=2 holds
the same tensors, a Hugging Face teacher grows like a framework one, and every refusal is one line.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_ki.config import Config, ModelConfig
from megatron_ki.convert.grow import GrowError, depth_is_exact, grow_state_dict, layer_map, plan_growth
from megatron_ki.convert.reshard import load_full_state, shard_state_dict, write_checkpoint
from megatron_ki.models import build_model
from tests.training_utils import ROOT

ATOL = 1e-5
VOCAB, SEQ = 200, 10
LLAMA = dict(position_embedding="rope", normalization="rmsnorm", activation="swiglu", add_bias_linear=False)
FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama_gqa_untied": dict(family="llama", num_key_value_heads=2, tie_word_embeddings=False, **LLAMA),
    "llama3_tied": dict(
        family="llama",
        num_key_value_heads=2,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_original_max_position_embeddings=16,
        **LLAMA,
    ),
    "qwen2": dict(
        family="qwen2", num_key_value_heads=2, add_qkv_bias=True, tie_word_embeddings=False, **LLAMA
    ),
    "qwen3": dict(family="qwen3", num_key_value_heads=2, qk_norm=True, **LLAMA),
    "bert": dict(family="bert", pre_norm=False, type_vocab_size=2, embedding_norm=True, activation="gelu"),
    "roberta": dict(
        family="roberta",
        pre_norm=False,
        type_vocab_size=1,
        embedding_norm=True,
        activation="gelu",
        pad_token_id=1,
    ),
}
GROWTHS = {
    "width": dict(hidden_size=64, num_attention_heads=8, kv=4, ffn_hidden_size=96),
    "depth": dict(num_layers=5),
    "both": dict(hidden_size=96, num_attention_heads=12, kv=2, ffn_hidden_size=144, num_layers=4),
}


def teacher_config(family: str) -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=48,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        make_vocab_size_divisible_by=8,
        **FAMILIES[family],
    )


def student_config(teacher: ModelConfig, growth: str, **extra) -> ModelConfig:
    g = dict(GROWTHS[growth])
    kv = g.pop("kv", None)
    if teacher.num_key_value_heads is not None and kv is not None:
        g["num_key_value_heads"] = kv
    return dataclasses.replace(teacher, **g, **extra)


def trained_like(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A teacher with non-trivial norms and biases (a wrong rule cannot hide behind ones and zeros)."""
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def model_of(cfg: ModelConfig, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(cfg)
    model.load_state_dict(shard_state_dict(full, cfg, 1, 0), strict=True)
    return model.eval()


def batch(cfg: ModelConfig) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    kw: dict = {}
    if not cfg.causal:
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, -3:] = 0
        ids[mask == 0] = cfg.pad_token_id or 0
        kw["attention_mask"] = mask
    return ids, kw


def logits(model: torch.nn.Module, cfg: ModelConfig) -> torch.Tensor:
    ids, kw = batch(cfg)
    with torch.no_grad():
        return model(ids, **kw)[..., :VOCAB].float()


def lm_loss(out: torch.Tensor, cfg: ModelConfig) -> float:
    ids, _ = batch(cfg)
    return float(F.cross_entropy(out[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))


# ------------------------------------------------------------------------------ function preserved
@pytest.mark.parametrize("growth", list(GROWTHS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_grown_logits_equal_the_teachers(family, growth):
    teacher = teacher_config(family)
    student = student_config(teacher, growth)
    full = trained_like(teacher)
    grown = grow_state_dict(full, teacher, student, noise=0.0)
    expected, got = logits(model_of(teacher, full), teacher), logits(model_of(student, grown), student)
    plan = plan_growth(teacher, student)
    if depth_is_exact(student, plan):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    else:  # post-LN depth: the zeroed blocks' LayerNorms still apply (measured: max |d logit| 0.18-0.36)
        assert growth != "width" and not teacher.pre_norm
        deviation = float((got - expected).abs().max())
        assert 1e-3 < deviation < 0.6, deviation


@pytest.mark.parametrize("family", list(FAMILIES))
def test_noise_keeps_the_function_and_breaks_the_symmetry(family):
    teacher = teacher_config(family)
    student = student_config(teacher, "width")
    full = trained_like(teacher)
    grads = {}
    for noise in (0.0, 0.05):
        grown = grow_state_dict(full, teacher, student, noise=noise, seed=3)
        model = model_of(student, grown)
        out = logits(model, student)
        # the held-out band: the noise is zero-sum over each group of copies, so only rounding remains
        assert abs(lm_loss(out, student) - lm_loss(logits(model_of(teacher, full), teacher), teacher)) < 1e-5
        ids, kw = batch(student)
        model.train()
        loss = F.cross_entropy(model(ids, **kw)[:, :-1, :VOCAB].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        grads[noise] = model.layers[0].mlp.fc1.weight.grad.detach().clone()
    h, f = teacher.hidden_size, teacher.ffn_size
    for noise, g in grads.items():
        # FFN unit i and its copy i + f (tiled) of the first layer: equal gradients without noise
        rows, copy = g[:f], g[f : 2 * f]  # SwiGLU: within the gate half
        gap = float((rows - copy).abs().max() / rows.abs().max())
        if noise == 0.0:
            assert gap < 1e-5, gap
        else:
            assert gap > 1e-2, gap
    assert h < student.hidden_size


def test_copies_stay_equal_after_a_step_without_noise_and_diverge_with_it():
    teacher = teacher_config("gpt2")
    student = student_config(teacher, "width")
    full = trained_like(teacher)
    for noise in (0.0, 0.05):
        model = model_of(student, grow_state_dict(full, teacher, student, noise=noise, seed=1)).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ids, _ = batch(student)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(ids)[:, :-1, :VOCAB].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
            opt.step()
        w = model.layers[1].attn_norm.weight.detach()  # the residual stream's copies: units i and i + h
        h = teacher.hidden_size
        gap = float((w[:h] - w[h : 2 * h]).abs().max())
        assert gap < 1e-6 if noise == 0.0 else gap > 1e-4, (noise, gap)


def test_depth_modes_map_layers():
    assert layer_map(2, 5, "identity") == ((0, False), (0, True), (0, True), (1, False), (1, True))
    assert layer_map(2, 4, "interleave") == ((0, False), (0, False), (1, False), (1, False))
    assert layer_map(2, 5, "stack") == ((0, False), (1, False), (0, False), (1, False), (0, False))
    teacher = teacher_config("gpt2")
    student = student_config(teacher, "depth")
    full = trained_like(teacher)
    grown = grow_state_dict(full, teacher, student, depth="stack")
    for i in range(student.num_layers):
        torch.testing.assert_close(
            grown[f"layers.{i}.mlp.fc2.weight"], full[f"layers.{i % 2}.mlp.fc2.weight"]
        )
    assert not depth_is_exact(student, plan_growth(teacher, student, "stack"))


def test_tied_teacher_grows_into_an_untied_student():
    teacher = teacher_config("llama3_tied")
    student = student_config(teacher, "both", tie_word_embeddings=False)
    full = trained_like(teacher)
    grown = grow_state_dict(full, teacher, student)
    assert "head.output.weight" in grown
    torch.testing.assert_close(
        logits(model_of(student, grown), student), logits(model_of(teacher, full), teacher), atol=ATOL, rtol=0
    )


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hidden_size=16, num_attention_heads=2), "model.hidden_size"),
        (dict(num_layers=1), "model.num_layers"),
        (dict(hidden_size=48, num_attention_heads=6, ffn_hidden_size=96), "model.hidden_size"),
        (dict(hidden_size=64, num_attention_heads=4, ffn_hidden_size=96), "model.kv_channels"),
        (dict(hidden_size=64, num_attention_heads=8, ffn_hidden_size=72), "model.ffn_hidden_size"),
        (dict(vocab_size=300), "model.vocab_size"),
        (dict(normalization="rmsnorm"), "model.normalization"),
        (dict(max_position_embeddings=64), "model.max_position_embeddings"),
    ],
)
def test_what_cannot_grow_is_refused_naming_the_field(changes, field):
    teacher = teacher_config("gpt2")
    with pytest.raises(GrowError) as e:
        plan_growth(teacher, dataclasses.replace(teacher, **changes))
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_untied_teacher_cannot_grow_into_a_tied_student():
    teacher = teacher_config("llama_gqa_untied")
    with pytest.raises(GrowError, match="model.tie_word_embeddings"):
        plan_growth(teacher, dataclasses.replace(teacher, tie_word_embeddings=True))


def test_kv_heads_not_a_multiple_are_refused():
    teacher = teacher_config("llama3_tied")  # 4 query heads, 2 key/value heads
    student = dataclasses.replace(teacher, hidden_size=96, num_attention_heads=12, num_key_value_heads=3)
    with pytest.raises(GrowError, match="model.num_key_value_heads"):
        plan_growth(teacher, student)


# ------------------------------------------------------------------------------------ the tool
def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "grow_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def write_yaml(path, cfg: ModelConfig, tp: int = 1, pp: int = 1) -> str:
    import yaml

    data = {"model": dataclasses.asdict(cfg), "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp}}
    data["model"].pop("position_offset", None)
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tool_writes_a_sharded_checkpoint_of_the_grown_model(family, tmp_path):
    teacher = teacher_config(family)
    student = student_config(teacher, "both")
    full = trained_like(teacher)
    write_checkpoint(full, Config(model=teacher), tmp_path / "teacher", tp=2, pp=1, tag="teacher")
    cfg_file = write_yaml(tmp_path / "student.yaml", student, tp=2, pp=2)
    r = run_tool("--load", str(tmp_path / "teacher"), "--config", cfg_file, "--save", str(tmp_path / "grown"),
                 "--noise", "0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["function_preserving"] == student.pre_norm
    meta, cfg, sharded = load_full_state(tmp_path / "grown")
    assert meta["layout"] == {"tp": 2, "pp": 2, "dp": 1, "zero_stage": 0} and meta["weights_only"]
    assert meta["grown_from"]["factors"] == {
        "hidden": 3,
        "q_heads": 3,
        "kv_heads": 1 if teacher.num_key_value_heads else 3,
        "ffn": 3,
    }
    expected = grow_state_dict(full, teacher, student)
    assert cfg == student
    for name, t in expected.items():
        torch.testing.assert_close(sharded[name][: t.shape[0]], t, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "roberta"])
def test_tool_grows_a_hugging_face_teacher(family, tmp_path):
    """A random transformers model (tests/test_models_hf.py's tiny ones) grows like a framework teacher: the
    grown framework student's logits equal transformers' (2x wide; pre-LN also 3 layers deep)."""
    pytest.importorskip("transformers")
    from megatron_ki.convert import config_from_hf
    from megatron_ki.convert.hf import read_hf_config
    from tests.test_models_hf import VOCAB as HF_VOCAB
    from tests.test_models_hf import randomize, tiny_hf

    hf = tiny_hf(family)
    randomize(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    teacher = config_from_hf(read_hf_config(tmp_path / "hf"), 8)
    kv = {"num_key_value_heads": 2 * teacher.kv_heads} if teacher.num_key_value_heads else {}
    student = dataclasses.replace(
        teacher,
        hidden_size=2 * teacher.hidden_size,
        num_attention_heads=2 * teacher.num_attention_heads,
        ffn_hidden_size=2 * teacher.ffn_size,
        num_layers=3 if teacher.pre_norm else teacher.num_layers,
        **kv,
    )
    cfg_file = write_yaml(tmp_path / "student.yaml", student)
    r = run_tool("--load", f"hf:{tmp_path / 'hf'}", "--config", cfg_file, "--save", str(tmp_path / "grown"),
                 "--noise", "0.01")  # fmt: skip
    assert r.returncode == 0, r.stderr
    _, cfg, full = load_full_state(tmp_path / "grown")
    ids, kw = batch(student)
    ids = ids % HF_VOCAB
    if not student.causal:
        ids[kw["attention_mask"] == 0] = student.pad_token_id or 0
    model = model_of(cfg, full)
    with torch.no_grad():
        expected = hf(ids, **kw).logits.float()
        got = model(ids, **kw)[..., :HF_VOCAB].float()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_tool_refusals_are_one_line_and_write_nothing(tmp_path):
    teacher = teacher_config("gpt2")
    write_checkpoint(trained_like(teacher), Config(model=teacher), tmp_path / "teacher", tp=1, pp=1)
    narrow = write_yaml(
        tmp_path / "narrow.yaml", dataclasses.replace(teacher, hidden_size=48, num_attention_heads=6)
    )
    r = run_tool("--load", str(tmp_path / "teacher"), "--config", narrow, "--save", str(tmp_path / "out"))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "model.hidden_size" in lines[0] and "integer multiple" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
