"""The Llama kin people actually have: Llama 3.x RoPE scaling, biases and tied embeddings, Qwen2/2.5, Qwen3 and
Mistral (and heads whose width is not hidden / heads), imported from random tiny transformers models (the real config and model classes, shapes scaled
down) and exported back.

For each case: logits within 1e-5 of transformers' at tp=1 (in-process) and at tp=2 (gloo, one spawn for all
cases, plus Qwen3's replicated q/k-norm gradients against transformers'), and HF -> framework -> HF gives the
very same tensors and config fields, in memory and through ``tools/convert_checkpoint.py`` on disk (a tp=2 x
pp=2 checkpoint per family). Greedy generation of 20 tokens equals transformers' ``generate`` for one case per
family (Llama-3.2, Qwen2.5, Qwen3, Mistral), from the tp=2 x pp=2 checkpoint and at tp=2. The same families as
KI teachers in a launched tp=2 x pp=2 run: ``tests/test_ki_families.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from megatron_ki.config import ConfigError, check_positions, check_teacher  # noqa: E402
from megatron_ki.convert import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    load_hf_model,
    rules_for,
    to_hf_state_dict,
)
from megatron_ki.convert.reshard import shard_state_dict  # noqa: E402
from megatron_ki.models import build_model, gather_logits  # noqa: E402
from megatron_ki.tensor_parallel import vocab_parallel_cross_entropy  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.test_models_hf import randomize  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5
VOCAB, SEQ, BATCH = 256, 12, 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # scaled down with the model: all three frequency bands occur
}
# name: (model_type, HF config overrides, ModelConfig fields the import must set)
CASES: dict[str, tuple[str, dict, dict]] = {
    "llama3.2": (  # Llama-3.2-1B's switches: llama3 RoPE scaling, tied embeddings, no biases
        "llama",
        dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
        dict(rope_scaling="llama3", tie_word_embeddings=True, add_bias_linear=False, add_qkv_bias=None),
    ),
    "llama3_tied_attention_bias": (
        "llama",
        dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=False, tie_word_embeddings=True),
        dict(rope_scaling="llama3", add_bias_linear=True, add_mlp_bias=False, tie_word_embeddings=True),
    ),
    "llama_linear_mlp_bias": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}, mlp_bias=True),
        dict(rope_scaling="linear", rope_scaling_factor=2.0, add_bias_linear=False, add_mlp_bias=True),
    ),
    "llama_dynamic_past_max_positions": (  # SEQ > max_position_embeddings: the NTK base grows
        "llama",
        dict(
            rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0},
            max_position_embeddings=8,
        ),
        dict(rope_scaling="dynamic", max_position_embeddings=8),
    ),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True), dict(add_bias_linear=False, add_qkv_bias=True)),
    "qwen2_untied": (
        "qwen2",
        dict(tie_word_embeddings=False),
        dict(add_qkv_bias=True, tie_word_embeddings=False),
    ),
    "qwen3": ("qwen3", dict(head_dim=16), dict(qk_norm=True, add_bias_linear=False)),
    "qwen3_attention_bias": (
        "qwen3",
        dict(head_dim=16, attention_bias=True),
        dict(qk_norm=True, add_mlp_bias=False),
    ),
    "qwen3_wide_heads": ("qwen3", dict(head_dim=32), dict(kv_channels=32)),  # 4 x 32 != 64, like Qwen3-4B
    "mistral": ("mistral", dict(sliding_window=32), dict(sliding_window=32, add_bias_linear=False)),
    "mistral_narrow_heads": ("mistral", dict(head_dim=8, sliding_window=None), dict(kv_channels=8)),
}
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def tiny(name: str) -> torch.nn.Module:
    """The case's random transformers model, non-trivial norms and biases, in eval mode (deterministic)."""
    model_type, overrides, _ = CASES[name]
    config_cls, model_cls = (getattr(transformers, c) for c in CLASSES[model_type])
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **overrides}))
    randomize(model)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(
        0, VOCAB, (BATCH, SEQ), generator=g
    )


# One per family the issue names: Llama-3.2, Qwen2.5, Qwen3, Mistral.
FAMILY_CASES = ("llama3.2", "qwen2_tied", "qwen3_wide_heads", "mistral")
PROMPT = torch.tensor([[5, 17, 42, 8], [200, 3, 99, 150]])
NEW_TOKENS = 20  # prompt + 20 <= Mistral's sliding window (32): exact


def hf_greedy(hf: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(
            PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
        )


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_tp1(name: str) -> None:
    hf = tiny(name)
    model, cfg = load_hf_model(hf, make_vocab_size_divisible_by=1)
    assert cfg.family == CASES[name][0]
    for key, value in CASES[name][2].items():
        assert getattr(cfg, key) == value, key
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


def _hf_fields(hf_cfg) -> dict:
    """The config.json fields that decide the computation."""
    keys = [*COMMON, "head_dim", "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings"]
    keys += ["sliding_window", "rms_norm_eps", "hidden_act", "model_type"]
    return {k: getattr(hf_cfg, k, None) for k in keys}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_state_dict_and_config(name: str) -> None:
    hf = tiny(name)
    cfg = config_from_hf(hf.config, make_vocab_size_divisible_by=128)
    back = to_hf_state_dict(from_hf_state_dict(hf.state_dict(), cfg), cfg)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0, msg=k)
    model = build_model(cfg)
    assert {r.ours for r in rules_for(cfg)} == set(model.state_dict())
    assert cfg.num_parameters(tp=1) == sum(p.numel() for p in model.parameters())  # FLOPs, size checks
    hf_cfg = config_to_hf(cfg)
    assert type(hf_cfg) is type(hf.config)
    assert _hf_fields(hf_cfg) == _hf_fields(hf.config)
    type(hf)(hf_cfg).load_state_dict(back, strict=True)
    assert config_from_hf(hf_cfg, make_vocab_size_divisible_by=128) == cfg


def _tp2_worker(rank: int, world_size: int) -> dict:
    from megatron_ki.models.generate import greedy

    group = dist.group.WORLD
    out: dict = {}
    for name in CASES:
        hf = tiny(name)
        cfg = config_from_hf(hf.config, make_vocab_size_divisible_by=1)
        model = build_model(cfg, tp_group=group)
        full = from_hf_state_dict(hf.state_dict(), cfg)
        model.load_state_dict(shard_state_dict(full, cfg, world_size, rank), strict=True)
        ids, labels = batch()
        logits = model(ids)
        vocab_parallel_cross_entropy(logits, labels, group).mean().backward()
        ref = hf(input_ids=ids).logits
        F.cross_entropy(ref.flatten(0, 1), labels.flatten()).backward()
        got = gather_logits(logits.detach(), group, cfg.vocab_size)
        norms = {}
        if cfg.qk_norm:  # replicated weights of per-rank heads: gradients all-reduced over tp
            for x in "qk":
                ours = getattr(model.layers[0].attention, f"{x}_norm").weight.grad
                theirs = getattr(hf.model.layers[0].self_attn, f"{x}_norm").weight.grad
                norms[x] = (ours.clone(), theirs.clone())
        out[name] = {"logits": (got, ref.detach()), "norm_grads": norms}
        if name in FAMILY_CASES:  # greedy decoding with vocab-sharded logits
            out[name]["greedy"] = (greedy(model, PROMPT, NEW_TOKENS, tp_group=group), hf_greedy(hf))
    return out


@pytest.mark.distributed
def test_logits_and_qk_norm_grads_match_transformers_tp2() -> None:
    results = run_distributed(_tp2_worker, world_size=2)
    for rank, res in enumerate(results):
        for name, r in res.items():
            got, ref = r["logits"]
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=f"{name} rank {rank}")
            for x, (ours, theirs) in r["norm_grads"].items():
                torch.testing.assert_close(
                    ours, theirs, atol=ATOL, rtol=1e-4, msg=f"{name} {x}_norm rank {rank}"
                )
    assert all(results[0][n]["norm_grads"] for n in CASES if n.startswith("qwen3"))
    for rank, res in enumerate(results):
        for name in FAMILY_CASES:
            ours, ref = res[name]["greedy"]
            assert torch.equal(ours, ref), f"{name} greedy rank {rank}"


def test_convert_checkpoint_round_trip_on_disk(tmp_path) -> None:
    """Per family: imported at tp=2 x pp=2 by tools/convert_checkpoint.py and exported again: the same tensors
    and config; the checkpoint's model gives transformers' logits (1e-5) and its greedy generation of 20
    tokens (``megatron_ki.models.generate.greedy``) equals ``generate(do_sample=False)``."""
    from megatron_ki.models.generate import greedy
    from tests.test_convert import cc, framework_model, hf_tensors

    for name in FAMILY_CASES:
        hf = tiny(name)
        src, ckpt, back = (tmp_path / f"{name}_{x}" for x in ("src", "ckpt", "back"))
        hf.save_pretrained(src)
        cc.import_hf(src, ckpt, tp=2, pp=2, progress=False)
        meta = json.loads((ckpt / "converted" / "meta.json").read_text())
        assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (2, 2)
        cc.export_hf(ckpt, back, progress=False)
        ref, got = hf_tensors(src), hf_tensors(back)
        assert set(got) == set(ref), name
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, atol=0, rtol=0, msg=f"{name} {k}")
        saved = json.loads((back / "config.json").read_text())
        assert saved["architectures"] == [CLASSES[CASES[name][0]][1]]
        assert _hf_fields(transformers.AutoConfig.from_pretrained(str(back))) == _hf_fields(hf.config), name
        model, cfg = framework_model(ckpt)
        ids, _ = batch()
        with torch.no_grad():
            ours = model(ids)[..., : cfg.vocab_size]
            torch.testing.assert_close(ours, hf(input_ids=ids).logits, atol=ATOL, rtol=RTOL, msg=name)
        ref = hf_greedy(hf)
        assert ref.shape == (2, PROMPT.shape[1] + NEW_TOKENS)
        assert torch.equal(greedy(model, PROMPT, NEW_TOKENS), ref), name


def test_sliding_window_longer_than_the_sample_is_refused() -> None:
    cfg = config_from_hf(tiny("mistral").config)
    check_positions(cfg, 32)  # the window covers the sample: exact
    with pytest.raises(ConfigError, match=r"data.seq_length.*40 .*sliding_window=32"):
        check_positions(cfg, 40)
    with pytest.raises(ConfigError, match=r"40 is longer than ki.teacher.sliding_window=32"):
        check_teacher(cfg, cfg, 1, 40)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="40 tokens is longer than model.sliding_window=32"):
        model(torch.zeros(1, 40, dtype=torch.long))


@pytest.mark.parametrize(
    "config,message",
    [
        (lambda: transformers.GemmaConfig(), r"model_type 'gemma' unsupported; expected one of \[.*'qwen3'"),
        (lambda: transformers.Qwen2MoeConfig(), "model_type 'qwen2_moe' unsupported"),
        (
            lambda: transformers.LlamaConfig(
                rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
            ),
            "rope_type 'yarn' unsupported",
        ),
        (lambda: transformers.MistralConfig(hidden_act="gelu"), "hidden_act 'gelu' unsupported"),
    ],
)
def test_other_models_are_refused_up_front(config, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_hf(config())


def test_export_refuses_switches_the_family_cannot_express() -> None:
    cfg = config_from_hf(tiny("qwen2_tied").config)
    import dataclasses

    with pytest.raises(ValueError, match="Qwen2Config cannot express model.add_mlp_bias=True"):
        config_to_hf(dataclasses.replace(cfg, add_mlp_bias=True))
    with pytest.raises(ValueError, match="LlamaConfig cannot express model.qk_norm=True"):
        config_to_hf(dataclasses.replace(cfg, family="llama", add_qkv_bias=None, qk_norm=True))
