"""The teachers people have, driving a KI run at tp=2 x pp=2 (4 gloo ranks, launch/pretrain_ki.sh).

A Llama-3.2-, a Qwen2.5-, a Qwen3- and a Mistral-shaped teacher (random transformers models, the real
configs' shapes scaled down) is read from a Hugging Face directory (``ki.teacher_path: hf:DIR``) holding the
same family-style tokenizer as the student's data: a byte-level BPE ``tokenizer.json`` with added special
tokens, 300 tokens (a size that is a multiple of nothing). The Qwen2.5 teacher has 320 embedding rows for
that tokenizer, as Qwen2.5 has 151,936 for 151,665 tokens. The student is the tiny Llama at vocab_size 300.

Each run must finish, report a finite KD term on every step, and log on its first step the teacher LM loss
transformers computes for the teacher on that batch (over the tokenizer's 300 columns). The Qwen2.5 run (the
padded one, at temperature 1 so the teacher's loss comes from the KL statistics) is in the default suite; the
other three are ``slow`` (about a minute each on two cores).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tests.test_models_hf import randomize  # noqa: E402
from tests.training_utils import (  # noqa: E402
    CONFIGS,
    ROOT,
    SEQ_LENGTH,
    launch,
    quiet_args,
    synthetic_documents,
)

TOKENS = 300  # the tokenizer: 297 byte-level BPE pieces + 3 added specials
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = TOKENS - len(SPECIALS)  # "<|endoftext|>": the eos of the tokenizer, the data and the teachers
STEPS, MICRO = 3, 4
SCRIPT = ["bash", str(ROOT / "launch" / "pretrain_ki.sh")]
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# name: (config class, model class, fields scaled down from the real config, KI temperature)
TEACHERS: dict[str, tuple[str, str, dict, float]] = {
    "llama3.2": (  # Llama-3.2-1B: tied embeddings, llama3 RoPE scaling (factor 32, theta 5e5)
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            intermediate_size=256,
            tie_word_embeddings=True,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        2.0,
    ),
    "qwen2.5": (  # Qwen2.5-0.5B: q/k/v biases, tied, embedding rows padded beyond the tokenizer
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            intermediate_size=160,
            tie_word_embeddings=True,
            max_position_embeddings=64,
            rope_theta=1000000.0,
            vocab_size=TOKENS + 20,
        ),
        1.0,
    ),
    "qwen3": (  # Qwen3-0.6B: per-head q/k RMSNorm, heads wider than hidden / heads, tied
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(intermediate_size=192, head_dim=32, tie_word_embeddings=True, max_position_embeddings=64),
        1.0,
    ),
    "mistral": (  # Mistral-7B-v0.1: sliding-window attention (the window covers the sample), untied
        "MistralConfig",
        "MistralForCausalLM",
        dict(intermediate_size=224, sliding_window=SEQ_LENGTH, max_position_embeddings=64),
        2.0,
    ),
}


def write_tokenizer(out: Path) -> Path:
    """A family-style tokenizer directory (byte-level BPE + added specials, Qwen-like config), offline."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENS - len(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_documents(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert tok.get_vocab_size() == TOKENS and tok.token_to_id(SPECIALS[0]) == EOS
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": SPECIALS[0], "pad_token": SPECIALS[0]}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def hf_teacher(name: str) -> torch.nn.Module:
    config_cls, model_cls, fields, _ = TEACHERS[name]
    torch.manual_seed(0)
    ids = dict(bos_token_id=EOS, eos_token_id=EOS)  # as Qwen2.5's config.json; a run refuses another eos
    config = getattr(transformers, config_cls)(**{"vocab_size": TOKENS, **ids, **SHAPE, **fields})
    model = getattr(transformers, model_cls)(config)
    randomize(model)
    return model.eval()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> SimpleNamespace:
    """The corpus preprocessed with the family tokenizer, and the tokenizer directory."""
    from megatron_ki.data.preprocess import main as preprocess_main

    root = tmp_path_factory.mktemp("ki_families")
    tokenizer = write_tokenizer(root / "tokenizer")
    jsonl = root / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents()))
    args = ["--input", str(jsonl), "--tokenizer-type", "HuggingFaceTokenizer"]
    args += ["--tokenizer-model", str(tokenizer), "--append-eod", "--output-prefix", str(root / "synth")]
    assert preprocess_main([*args, "--log-interval", "1000000"]) == 0
    return SimpleNamespace(root=root, tokenizer=tokenizer, prefix=str(root / "synth_text_document"))


def run_args(ws: SimpleNamespace, name: str, teacher_dir: Path, run_dir: Path) -> list[str]:
    return [
        "--config", str(CONFIGS / "tiny_llama.yaml"),
        "--model.vocab_size", str(TOKENS),
        "--parallel.tensor_parallel", "2",
        "--parallel.pipeline_parallel", "2",
        "--train.train_steps", str(STEPS),
        "--train.micro_batch_size", str(MICRO),
        "--train.global_batch_size", str(MICRO),  # one micro-batch per step: the logged value is its loss
        "--data.data_path", ws.prefix,
        "--data.tokenizer_type", "HuggingFaceTokenizer",
        "--data.tokenizer_model", str(ws.tokenizer),
        "--data.seq_length", str(SEQ_LENGTH),
        "--data.split", "90,8,2",
        "--data.cache_dir", str(run_dir / "index-cache"),
        "--ki.enabled", "true",
        "--ki.teacher_path", f"hf:{teacher_dir}",
        "--ki.teacher_dtype", "float32",
        "--ki.temperature", str(TEACHERS[name][3]),
        "--ki.alpha0", "0.5",
        "--ki.decay_steps", "100",
        *quiet_args(run_dir),
    ]  # fmt: skip


def first_batch(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch of the run (dp = 1), rebuilt from the config it saved."""
    from megatron_ki.config import load_config
    from megatron_ki.training.loop import model_inputs
    from megatron_ki.training.run import build_loaders

    cfg = load_config(run_dir / "config.yaml")
    groups = SimpleNamespace(topology=SimpleNamespace(dp=1), dp_rank=0, rank=0)
    train, _, _ = build_loaders(cfg, groups, 0)
    (ids, _, _), labels = model_inputs(next(iter(train)), causal=True)
    return ids, labels


FAMILIES = [
    pytest.param(n, marks=[pytest.mark.distributed] + ([] if n == "qwen2.5" else [pytest.mark.slow]))
    for n in TEACHERS
]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_teacher_drives_a_ki_run_tp2_pp2(name: str, workspace, tmp_path) -> None:
    hf = hf_teacher(name)
    teacher_dir = tmp_path / "teacher"
    hf.save_pretrained(teacher_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(workspace.tokenizer / f, teacher_dir / f)
    run_dir = tmp_path / "run"
    result = launch(4, run_args(workspace, name, teacher_dir, run_dir), run_dir, script=SCRIPT, timeout=300)
    assert result.returncode == 0, f"launch failed (rc {result.returncode}):\n{result.tail()}"
    steps = [m for m in result.metrics() if "split" not in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1)), result.tail()
    assert all(m["kd_loss"] is not None and math.isfinite(m["kd_loss"]) and m["kd_loss"] > 0 for m in steps)
    ids, labels = first_batch(run_dir)
    assert ids.shape == (MICRO, SEQ_LENGTH) and int(ids.max()) < TOKENS
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[..., :TOKENS]  # the tokenizer's columns (Qwen2.5: 20 rows fewer)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).item()
    assert steps[0]["teacher_lm_loss"] == pytest.approx(ref, rel=1e-5, abs=1e-5)
    print(f"{name}: launch {result.seconds:.1f} s, teacher LM loss {ref:.6f}, kd {steps[0]['kd_loss']:.6f}")
