"""The framework's switches reproduce transformers' GPT-2, Llama, BERT and RoBERTa weight for weight.

Tiny random transformers models are created locally (no network), their weights loaded through the
mapping tables, and the logits compared in fp32 within atol 1e-5 (bert/roberta with a padding mask).
The reverse direction (framework -> HF state dict) must reload into transformers strictly.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_ki.convert import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    load_hf_model,
    rules_for,
    to_hf_state_dict,
)

ATOL, RTOL = 1e-5, 1e-5
VOCAB, SEQ, BATCH = 97, 12, 2


def tiny_hf(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(cfg)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM(cfg)
    if family == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
        return transformers.BertForMaskedLM(cfg)
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=34,
        type_vocab_size=1,
        pad_token_id=1,
    )
    return transformers.RobertaForMaskedLM(cfg)


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial norms and biases (HF initialises them to 1/0) so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def batch_for(family: str, pad_id: int | None):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    kw: dict = {}
    if family in ("bert", "roberta"):
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, -4:] = 0
        ids[mask == 0] = pad_id
        kw["attention_mask"] = mask
        if family == "bert":
            kw["token_type_ids"] = (torch.arange(SEQ) >= 5).long().expand(BATCH, SEQ).clone()
    return ids, kw


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "roberta"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_logits_match_transformers(family: str, backend: str) -> None:
    hf = tiny_hf(family)
    randomize(hf)
    hf.eval()
    model, cfg = load_hf_model(hf, make_vocab_size_divisible_by=1, attention_backend=backend)
    model.eval()
    assert cfg.family == family and cfg.padded_vocab_size(1) == VOCAB
    ids, kw = batch_for(family, hf.config.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, **kw).logits
        got = model(ids, **kw)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "roberta"])
def test_round_trip_state_dict_and_config(family: str) -> None:
    hf = tiny_hf(family)
    randomize(hf)
    cfg = config_from_hf(hf.config, make_vocab_size_divisible_by=16)
    ours = from_hf_state_dict(hf.state_dict(), cfg)
    assert ours["embedding.word_embeddings.weight"].shape[0] == cfg.padded_vocab_size(1) == 112
    back = to_hf_state_dict(ours, cfg)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0, msg=k)
    # every framework tensor is covered by the table
    from megatron_ki.models import build_model

    model = build_model(cfg)
    assert {r.ours for r in rules_for(cfg)} == set(model.state_dict())
    hf_cfg = config_to_hf(cfg)
    rebuilt = type(hf)(hf_cfg)
    rebuilt.load_state_dict(back, strict=True)
    assert config_from_hf(hf_cfg, make_vocab_size_divisible_by=16) == cfg


def test_unsupported_config_is_rejected() -> None:
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=48, hidden_act="gelu"
    )
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf(cfg)
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf(transformers.T5Config())
