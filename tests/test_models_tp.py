"""Tensor-parallel models equal the single-process model built with the same seed.

For each family (gpt2, llama, bert, roberta) at tp=2 and tp=4, with and without sequence parallelism: gathered
logits and every parameter's gradient (unsharded with ``partition_info``) equal the tp=1 model's, fp32, atol
1e-5 / rtol 1e-4. One spawn per world size runs all families. Also: pipeline-style partial models (layer_range, pre/post_process) equal
slices of the full model; dropout masks differ across TP ranks on attention probabilities and agree on the
residual stream; the attention backends agree.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ki.config import ModelConfig
from megatron_ki.models import build_model, core_attention, gather_logits, partition_info
from megatron_ki.tensor_parallel import (
    TPRngTracker,
    seed_everything,
    unshard_rows,
    vocab_parallel_cross_entropy,
)
from tests.distributed import run_distributed

ATOL, RTOL = 1e-5, 1e-4
VOCAB, SEQ, BATCH = 300, 16, 2
FAMILIES = ("gpt2", "llama", "bert", "roberta")


def family_config(family: str, **overrides) -> ModelConfig:
    """Tiny configs; vocab 300 with make_vocab_size_divisible_by=8 so the padding is exercised."""
    base = dict(
        family=family,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=8,
        max_position_embeddings=32,
    )
    per_family = {
        "gpt2": dict(),
        "llama": dict(
            num_attention_heads=8,
            num_key_value_heads=4,
            ffn_hidden_size=96,
            position_embedding="rope",
            normalization="rmsnorm",
            norm_eps=1e-6,
            activation="swiglu",
            add_bias_linear=False,
            tie_word_embeddings=False,
        ),
        "bert": dict(
            pre_norm=False, embedding_norm=True, type_vocab_size=2, activation="gelu", norm_eps=1e-12
        ),
        "roberta": dict(
            pre_norm=False,
            embedding_norm=True,
            type_vocab_size=1,
            activation="gelu",
            pad_token_id=1,
            position_offset=2,
        ),
    }[family]
    return ModelConfig(**{**base, **per_family, **overrides})


def make_batch(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Same input on every rank; bert/roberta get right padding on the second sample."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, cfg.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "labels": labels}
    if cfg.family in ("bert", "roberta"):
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, SEQ - 5 :] = 0
        ids[mask == 0] = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        labels[mask == 0] = -100
        batch["attention_mask"] = mask
        if cfg.family == "bert":
            batch["token_type_ids"] = (torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone()
    return batch


def forward_backward(model, cfg: ModelConfig, group) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits gathered and trimmed to the vocabulary, and every parameter's local gradient."""
    batch = make_batch(cfg)
    labels = batch.pop("labels")
    logits = model(**batch)
    loss = vocab_parallel_cross_entropy(logits, labels, group).sum() / (labels != -100).sum()
    loss.backward()
    full = gather_logits(logits.detach(), group, cfg.vocab_size)
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}
    return full.numpy(), grads


def _tp_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    group = dist.group.WORLD
    out: dict = {}
    for family, sp in itertools.product(FAMILIES, (False, True)):
        cfg = family_config(family)
        model = build_model(cfg, tp_group=group, seed=7, sequence_parallel=sp)
        seen = []
        model.layers[0].register_forward_hook(
            lambda _m, args, _out, seen=seen: seen.append(tuple(args[0].shape))
        )
        logits, grads = forward_backward(model, cfg, group)
        out[(family, sp)] = {
            "logits": logits,
            "grads": grads,
            "info": partition_info(model),
            "block_in": seen,
        }
    if world_size == 2:
        out["dropout"] = _dropout_masks(rank, group)
    return out


def _dropout_masks(rank: int, group) -> dict:
    """Record (shape, keep-mask) of every dropout call of one training forward at tp=2."""
    cfg = family_config("bert", hidden_dropout=0.3, attention_dropout=0.3, attention_backend="eager")
    seed_everything(11)
    model = build_model(cfg, tp_group=group, seed=7, rng_tracker=TPRngTracker(11, tp_rank=rank)).train()
    calls: list[tuple[str, np.ndarray]] = []
    orig = F.dropout

    def recording(x, p=0.5, training=True, inplace=False):
        y = orig(x, p, training, inplace)
        if training and p > 0:
            calls.append(("attention" if x.dim() == 4 else "hidden", (y != 0).numpy()))
        return y

    F.dropout = recording
    try:
        batch = make_batch(cfg)
        batch.pop("labels")
        model(**batch)
    finally:
        F.dropout = orig
    return {"calls": calls}


def _unshard(shards: list[np.ndarray], dim: int, sizes: list[int]) -> torch.Tensor:
    return unshard_rows([torch.from_numpy(s) for s in shards], sizes, dim=dim)


def _check_against_reference(results: list[dict], tp: int) -> None:
    for family, sp in itertools.product(FAMILIES, (False, True)):
        cfg = family_config(family)
        # the reference pads the vocabulary as the tp run does, so the (padded) embeddings have equal shapes
        ref_cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp)
        assert ref_cfg.padded_vocab_size(1) == cfg.padded_vocab_size(tp)
        ref = build_model(ref_cfg, seed=7)
        ref_logits, ref_grads = forward_backward(ref, ref_cfg, None)
        what = f"{family}{' sequence-parallel' if sp else ''}"
        chunk = SEQ // tp if sp else SEQ  # what a block sees: this rank's chunk of the sequence, or all of it
        assert results[0][(family, sp)]["block_in"] == [(BATCH, chunk, cfg.hidden_size)], what
        info = results[0][(family, sp)]["info"]
        for rank, res in enumerate(results):
            np.testing.assert_allclose(
                res[(family, sp)]["logits"], ref_logits, atol=ATOL, rtol=RTOL, err_msg=f"{what} rank {rank}"
            )
        assert set(results[0][(family, sp)]["grads"]) == set(ref_grads), what
        sharded = 0
        for name, ref_grad in ref_grads.items():
            if name in info:
                dim, sizes = info[name]
                got = _unshard([r[(family, sp)]["grads"][name] for r in results], dim, sizes).numpy()
                sharded += 1
            else:  # replicated: every rank holds the full gradient
                got = results[0][(family, sp)]["grads"][name]
                for r in results[1:]:
                    np.testing.assert_allclose(r[(family, sp)]["grads"][name], got, atol=ATOL, rtol=RTOL)
            assert got.shape == ref_grad.shape, (what, name)
            np.testing.assert_allclose(
                got, ref_grad, atol=ATOL, rtol=RTOL, err_msg=f"{what} grad {name} tp={tp}"
            )
        assert sharded >= 5, f"{what}: expected sharded parameters, found {sharded}"


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_process(tp: int) -> None:
    results = run_distributed(_tp_worker, world_size=tp)
    _check_against_reference(results, tp)
    if tp == 2:
        calls0, calls1 = (r["dropout"]["calls"] for r in results)
        assert [k for k, _ in calls0] == [k for k, _ in calls1]
        kinds = [k for k, _ in calls0]
        assert kinds.count("attention") == 2 and kinds.count("hidden") == 5, kinds
        for (kind, m0), (_, m1) in zip(calls0, calls1):
            if kind == "hidden":  # replicated residual stream: same mask on every TP rank
                np.testing.assert_array_equal(m0, m1)
            else:  # this rank's heads: masks drawn from the forked, rank-specific generator
                assert m0.shape == m1.shape and (m0 != m1).mean() > 0.2


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_range_equals_slice_of_full_model(family: str) -> None:
    cfg = family_config(family, num_layers=3)
    full = build_model(cfg, seed=5)
    first = build_model(cfg, seed=5, layer_range=(0, 1), post_process=False)
    last = build_model(cfg, seed=5, layer_range=(1, 3), pre_process=False)
    full_sd = full.state_dict()
    for name, t in first.state_dict().items():
        torch.testing.assert_close(t, full_sd[name], atol=0, rtol=0)
    for name, t in last.state_dict().items():
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            name = f"layers.{i + 1}." + name.split(".", 2)[2]
        elif name.startswith("head.word_embeddings."):  # the tied copy a last stage owns
            name = name.replace("head.word_embeddings.", "embedding.word_embeddings.")
        torch.testing.assert_close(t, full_sd[name], atol=0, rtol=0, msg=name)
    batch = make_batch(cfg)
    batch.pop("labels")
    with torch.no_grad():
        hidden = first(**batch)
        staged = last(hidden_states=hidden, attention_mask=batch.get("attention_mask"))
        torch.testing.assert_close(staged, full(**batch), atol=1e-6, rtol=1e-5)


def _fake_kernels() -> types.ModuleType:
    """Reference implementations with the kernels' contract (mask True = masked out, fp32 math)."""
    mod = types.ModuleType("megatron_ki.kernels")

    def scaled_masked_softmax(scores, mask, scale):
        x = (scores.float() * scale).masked_fill(mask, -10000.0)
        return torch.softmax(x, -1).to(scores.dtype)

    def scaled_upper_triang_masked_softmax(scores, scale):
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool).triu(1)
        return scaled_masked_softmax(scores, mask, scale)

    mod.scaled_masked_softmax = scaled_masked_softmax
    mod.scaled_upper_triang_masked_softmax = scaled_upper_triang_masked_softmax
    return mod


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_attention_backends_agree(causal: bool, padded: bool, monkeypatch) -> None:
    import megatron_ki

    fake = _fake_kernels()
    monkeypatch.setitem(sys.modules, "megatron_ki.kernels", fake)
    monkeypatch.setattr(megatron_ki, "kernels", fake, raising=False)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=g)
    k, v = torch.randn(2, 2, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g)  # GQA: 2 kv heads
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, 6:] = False
    mask = pad if padded else None
    kw = dict(causal=causal, padding_mask=mask, dropout_p=0.0, scale=0.25)
    outs = {b: core_attention(q, k, v, backend=b, **kw) for b in ("sdpa", "eager", "fused_softmax")}
    # explicit reference
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) * 0.25
    allowed = torch.ones(8, 8, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None] & (pad[:, None, None, :] if padded else True)
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv
    for b, out in outs.items():
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4, msg=b)
    with pytest.raises(ValueError, match="attention_backend"):
        core_attention(q, k, v, backend="nope", **kw)


def test_bf16_params_and_activations() -> None:
    cfg = family_config("llama", params_dtype="bfloat16")
    model = build_model(cfg, seed=1)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    logits = model(torch.randint(0, VOCAB, (2, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits[..., : cfg.vocab_size].float()).all()
    ref = build_model(dataclasses.replace(cfg, params_dtype="float32"), seed=1)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q.float())
        ids = torch.randint(0, VOCAB, (2, 8))
        torch.testing.assert_close(model(ids).float(), ref(ids), atol=0.1, rtol=0.05)


def test_bad_config_errors() -> None:
    with pytest.raises(ValueError, match="layer_range"):
        build_model(family_config("gpt2"), layer_range=(1, 5))
    with pytest.raises(ValueError, match="family"):
        from megatron_ki.models import BertModel

        BertModel(family_config("gpt2"))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_padded_vocabulary_gets_no_probability(family) -> None:
    """Rows added to pad the vocabulary for TP get -inf logits: softmax and loss are over the real vocabulary."""
    cfg = family_config(family)
    assert cfg.padded_vocab_size(1) > cfg.vocab_size
    model = build_model(cfg, seed=1)
    ids = torch.randint(0, VOCAB, (2, 8))
    logits = model(ids)
    assert torch.isfinite(logits[..., : cfg.vocab_size]).all()
    assert torch.isneginf(logits[..., cfg.vocab_size :]).all()
    targets = torch.randint(0, cfg.vocab_size, (2, 8))
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    trimmed = torch.nn.functional.cross_entropy(
        logits[..., : cfg.vocab_size].flatten(0, 1), targets.flatten()
    )
    torch.testing.assert_close(full, trimmed)
    full.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
