"""Full activation recomputation gives the same loss and gradients, with dropout, and saves activations.

With dropout on the residual stream (default generator) and on attention probabilities (the tensor-parallel
tracker's generator), a model with ``recompute_granularity: full`` must equal the same model without it
bitwise on CPU: the recomputed forward draws the same masks. Both generators must also end where the plain
run leaves them, so later steps are unaffected. At tp=2 the same holds per rank, also with sequence
parallelism (the residual-stream dropout then draws from the tracker, per rank).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_ki.models import build_model
from megatron_ki.tensor_parallel import TPRngTracker, vocab_parallel_cross_entropy
from tests.distributed import run_distributed
from tests.test_models_tp import FAMILIES, family_config

DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.2}


def _step(family: str, granularity: str, tp_group=None, tp_rank: int = 0, sp: bool = False) -> dict:
    """One training forward/backward from fixed seeds: loss, gradients, RNG states afterwards, and the bytes
    autograd saved for backward."""
    cfg = dataclasses.replace(family_config(family, **DROPOUT), recompute_granularity=granularity)
    tracker = TPRngTracker(seed=5, tp_rank=tp_rank)
    model = build_model(cfg, tp_group=tp_group, seed=1, rng_tracker=tracker, sequence_parallel=sp).train()
    torch.manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        loss = vocab_parallel_cross_entropy(logits.float(), ids, tp_group).mean()
    loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "tracker": tracker.generator.get_state(),
        "default": torch.get_rng_state(),
        "saved_bytes": sum(saved),
    }


def _assert_same(full: dict, plain: dict, what: str) -> None:
    assert torch.equal(full["loss"], plain["loss"]), f"{what}: loss {full['loss']} vs {plain['loss']}"
    for name, grad in plain["grads"].items():
        assert torch.equal(full["grads"][name], grad), f"{what}: gradient of {name}"
    assert torch.equal(full["tracker"], plain["tracker"]), f"{what}: TP tracker state after the step"
    assert torch.equal(full["default"], plain["default"]), f"{what}: default generator state after the step"


@pytest.mark.parametrize("family", FAMILIES)
def test_full_recompute_equals_plain_with_dropout(family):
    plain, full = _step(family, "none"), _step(family, "full")
    _assert_same(full, plain, family)
    # Inside each block only the block's input is kept (the head and loss still save theirs).
    assert full["saved_bytes"] < 0.6 * plain["saved_bytes"], (full["saved_bytes"], plain["saved_bytes"])


def test_dropout_is_active():
    """The comparison above means something: two plain steps that differ only in the tracker seed differ."""
    cfg = family_config("gpt2", **DROPOUT)
    grads = []
    for seed in (5, 6):
        model = build_model(cfg, seed=1, rng_tracker=TPRngTracker(seed=seed, tp_rank=0)).train()
        torch.manual_seed(3)
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        F.cross_entropy(model(ids).float().flatten(0, 1), ids.flatten()).backward()
        grads.append(model.layers[0].attention.qkv.weight.grad.clone())
    assert not torch.equal(*grads)


def _tp_worker(rank, world, cases):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    return [(_step(f, "none", group, rank, sp), _step(f, "full", group, rank, sp)) for f, sp in cases]


@pytest.mark.distributed
def test_full_recompute_equals_plain_tensor_parallel():
    cases = [("llama", False), ("llama", True), ("gpt2", True)]
    for rank, results in enumerate(run_distributed(_tp_worker, 2, args=(cases,))):
        for (family, sp), (plain, full) in zip(cases, results, strict=True):
            _assert_same(full, plain, f"{family} tp=2 sequence_parallel={sp} rank {rank}")
