"""The chunked fused head + KI loss (``ki.fused_head``) against the unfused path: the model-style logits
(``F.linear`` onto this rank's vocabulary rows through ``copy_to_tp_region``, -inf on the padded columns as
``LMHead.mask_padding`` adds them) then ``ki_loss``.

- Values (loss, LM, KD, teacher LM, count) and gradients w.r.t. the hidden states, the head weight and bias
  agree within 1e-5 in fp32, for every divergence, alpha 0 / 0.5 / 1, temperature 1 and 2, chunk sizes that do
  and do not divide the loss positions, padded vocabularies, MLM-style ignored positions, both gradient modes
  (in the forward walk, or ``recompute``). bf16: within 2e-2 relative (a 16-bit logit rounds at ~4e-3).
- tp = 2 (and tp = 4, slow) over gloo: the same, each rank against its own unfused path, with the padding
  inside the last shard and filling a whole shard.
- Memory: no tensor of ``[loss rows, V/tp]`` elements is ever allocated, only chunk-sized ones.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ki.ki import fused_head_ki_loss, ki_loss
from megatron_ki.tensor_parallel import copy_to_tp_region
from tests.distributed import run_distributed

H, HT, TOL = 16, 24, dict(atol=1e-5, rtol=1e-5)


def make_case(n: int, vocab: int, padded: int, seed: int = 0, mlm: bool = True, bias: bool = True) -> dict:
    """Full (unsharded) weights and inputs; every rank builds the same and takes its rows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    if mlm:  # MLM-style: most positions carry no loss
        labels[torch.rand(n, generator=g) < 0.6] = -100
    return {
        "h": torch.randn(n, H, generator=g),
        "w": torch.randn(padded, H, generator=g) * 0.5,
        "b": torch.randn(padded, generator=g) * 0.1 if bias else None,
        "ht": torch.randn(n, HT, generator=g),
        "wt": torch.randn(padded, HT, generator=g) * 0.5,
        "labels": labels,
        "vocab": vocab,
    }


def shard(case: dict, rank: int, tp: int, dtype: torch.dtype) -> dict:
    local = case["w"].shape[0] // tp
    rows = slice(rank * local, (rank + 1) * local)
    out = {k: (v[rows] if k in ("w", "b", "wt") else v) for k, v in case.items() if v is not None}
    out = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}
    for k in ("h", "w", "b"):
        if k in out:
            out[k].requires_grad_()
    out["start"] = rank * local
    return out


def unfused(c: dict, group, alpha: float, tau: float, divergence: str):
    """The model's path: logits then ``ki_loss``."""
    pad = torch.zeros(c["w"].shape[0], dtype=c["w"].dtype)
    pad[max(c["vocab"] - c["start"], 0) :] = float("-inf")
    s = F.linear(copy_to_tp_region(c["h"], group), c["w"], c.get("b")) + pad
    t = F.linear(c["ht"], c["wt"]) + pad if "ht" in c else None
    return ki_loss(
        s[None],
        None if t is None else t[None],
        c["labels"][None],
        alpha,
        temperature=tau,
        divergence=divergence,
        tp_group=group,
    )


def fused(c: dict, group, alpha: float, tau: float, divergence: str, chunk: int, recompute: bool):
    return fused_head_ki_loss(
        c["h"],
        c["w"],
        c["labels"],
        alpha,
        teacher_hidden=c.get("ht"),
        teacher_weight=c.get("wt"),
        bias=c.get("b"),
        vocab_size=c["vocab"],
        temperature=tau,
        divergence=divergence,
        tp_group=group,
        chunk_tokens=chunk,
        recompute=recompute,
    )


def both(c: dict, group, alpha, tau, divergence, chunk, recompute) -> tuple[list, list]:
    """``(values, grads)`` of the unfused and the fused path, each as a list."""
    results = []
    params = [c[k] for k in ("h", "w", "b") if k in c]
    for out in (unfused(c, group, alpha, tau, divergence), None):
        if out is None:
            out = fused(c, group, alpha, tau, divergence, chunk, recompute)
        values = [out.loss, out.lm_loss, out.teacher_lm_loss, out.kd_loss, out.num_tokens]
        grads = torch.autograd.grad(out.loss, params)
        results.append(
            ([None if v is None else v.detach().float() for v in values], [g.float() for g in grads])
        )
    return results[0], results[1]


def assert_close(ref: tuple[list, list], got: tuple[list, list], tol: dict, what: str) -> None:
    for i, (a, b) in enumerate(zip(ref[0] + ref[1], got[0] + got[1], strict=True)):
        if a is None or b is None:
            assert a is None and b is None, f"{what}: item {i} is None on one side only"
            continue
        torch.testing.assert_close(b, a.to(b.dtype), **tol, msg=lambda m, i=i: f"{what}: item {i}: {m}")


GRID = list(itertools.product(("forward_kl", "reverse_kl", "cross_entropy"), (0.0, 0.5, 1.0), (1.0, 2.0)))


# ------------------------------------------------------------------------------------------ tp = 1
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk", [4, 7, 1000])
def test_equals_unfused_fp32(chunk: int, recompute: bool) -> None:
    """Every divergence x alpha x temperature; 41 real of 48 padded columns; ~40% of positions carry loss."""
    c = shard(make_case(50, 41, 48), 0, 1, torch.float32)
    for divergence, alpha, tau in GRID:
        ref, got = both(c, None, alpha, tau, divergence, chunk, recompute)
        assert_close(ref, got, TOL, f"{divergence} alpha={alpha} tau={tau} chunk={chunk}")


def test_causal_untied_without_bias_or_padding() -> None:
    """Every position counted (causal LM), no bias, no padded columns; chunk 8 divides the 64 rows."""
    c = shard(make_case(64, 48, 48, seed=3, mlm=False, bias=False), 0, 1, torch.float32)
    ref, got = both(c, None, 0.5, 2.0, "forward_kl", 8, False)
    assert_close(ref, got, TOL, "causal")


def test_bf16_within_stated_tolerance() -> None:
    """bf16 hidden states and weights: values and gradients within 2e-2 of the unfused bf16 path."""
    c = shard(make_case(50, 41, 48, seed=1), 0, 1, torch.bfloat16)
    for divergence in ("forward_kl", "reverse_kl"):
        ref, got = both(c, None, 0.5, 2.0, divergence, 7, False)
        assert_close(ref, got, dict(atol=2e-2, rtol=2e-2), f"bf16 {divergence}")


def test_teacher_gets_no_gradient_and_lm_only_without_teacher() -> None:
    c = shard(make_case(20, 41, 48), 0, 1, torch.float32)
    c["wt"].requires_grad_()
    out = fused(c, None, 0.5, 2.0, "forward_kl", 6, False)
    out.loss.backward()
    assert c["wt"].grad is None
    lm_only = fused_head_ki_loss(c["h"], c["w"], c["labels"], 0.0, bias=c["b"], vocab_size=41, chunk_tokens=6)
    assert lm_only.kd_loss is None and lm_only.teacher_lm_loss is None
    torch.testing.assert_close(lm_only.loss, out.lm_loss, **TOL)
    with pytest.raises(ValueError, match="teacher is required"):
        fused_head_ki_loss(c["h"], c["w"], c["labels"], 0.5)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(x):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("recompute", [False, True])
def test_no_tokens_by_vocab_tensor(recompute: bool) -> None:
    """Forward and backward over 512 loss rows x 256 columns, chunk 16: the largest tensor is a chunk's
    (16 x 256) or the weight's (256 x 16), nowhere near the 512 x 256 logits the unfused path makes."""
    c = shard(make_case(512, 250, 256, mlm=False), 0, 1, torch.float32)
    with LargestTensor() as fused_mode:
        fused(c, None, 0.5, 2.0, "reverse_kl", 16, recompute).loss.backward()
    with LargestTensor() as unfused_mode:
        unfused(c, None, 0.5, 2.0, "reverse_kl").loss.backward()
    assert unfused_mode.largest >= 512 * 256
    assert fused_mode.largest <= max(16 * 256, 256 * HT, 512 * HT), fused_mode.largest


# ------------------------------------------------------------------------------------------ tp > 1
def _tp_worker(rank: int, world: int, padded: int, vocab: int) -> list[str]:
    """Every rank compares its fused and unfused results; returns the failures (empty when all agree)."""
    group = dist.new_group(list(range(world)))
    c = shard(make_case(30, vocab, padded, seed=5), rank, world, torch.float32)
    failures = []
    for (divergence, alpha, tau), chunk in itertools.product(GRID, (4, 7)):
        ref, got = both(c, group, alpha, tau, divergence, chunk, recompute=chunk == 7)
        try:
            assert_close(ref, got, TOL, f"rank {rank} {divergence} alpha={alpha} tau={tau} chunk={chunk}")
        except AssertionError as e:
            failures.append(str(e))
    student_only = {k: v for k, v in c.items() if k not in ("ht", "wt")}  # LM alone: no kernels, own merge
    ref, got = both(student_only, group, 0.0, 1.0, "forward_kl", 7, recompute=False)
    try:
        assert_close(ref, got, TOL, f"rank {rank} without a teacher")
    except AssertionError as e:
        failures.append(str(e))
    return failures


@pytest.mark.distributed
@pytest.mark.parametrize("padded,vocab", [(48, 41), (48, 20)], ids=["pad-in-last-shard", "pad-fills-a-shard"])
def test_tp2_equals_unfused(padded: int, vocab: int) -> None:
    for failures in run_distributed(_tp_worker, world_size=2, args=(padded, vocab)):
        assert not failures, failures[:3]


@pytest.mark.distributed
@pytest.mark.slow
def test_tp4_equals_unfused() -> None:
    for failures in run_distributed(_tp_worker, world_size=4, args=(48, 37)):
        assert not failures, failures[:3]


def test_no_grad_evaluation_gives_the_same_values() -> None:
    c = shard(make_case(20, 41, 48), 0, 1, torch.float32)
    with torch.no_grad():
        out = fused(c, None, 0.5, 2.0, "forward_kl", 6, False)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, unfused(c, None, 0.5, 2.0, "forward_kl").loss.detach(), **TOL)


def test_second_backward_needs_recompute() -> None:
    """The default mode hands its gradients out once (scaled in place); recompute walks again each time."""
    c = shard(make_case(20, 41, 48), 0, 1, torch.float32)
    out = fused(c, None, 0.5, 2.0, "forward_kl", 6, False)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute=True"):
        out.loss.backward()
    out = fused(c, None, 0.5, 2.0, "forward_kl", 6, True)
    first = torch.autograd.grad(out.loss, c["w"], retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out.loss, c["w"])[0], first)


# ----------------------------------------------------------------------------- through the models' heads
def _model_pair(family: str, group=None, sp: bool = False):
    from megatron_ki.config import ModelConfig, load_config
    from megatron_ki.models import build_model

    student_cfg = load_config(f"launch/configs/models/tiny_{family}.yaml").model
    teacher_cfg = ModelConfig(
        **{**student_cfg.__dict__, "num_layers": 1, "hidden_size": 24, "ffn_hidden_size": 48}
    )
    student = build_model(student_cfg, tp_group=group, seed=5, sequence_parallel=sp)
    teacher = build_model(teacher_cfg, tp_group=group, seed=9, sequence_parallel=sp)
    teacher.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, student_cfg.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    if family in ("roberta", "bert"):  # MLM: a few positions carry the loss
        labels = torch.full_like(ids, -100)
        labels[:, 1:11:3] = ids[:, 1:11:3]
    else:
        labels[:, :2] = -100
    return student, teacher, ids, labels


def _loss_and_grads(
    family: str, fused: bool, alpha: float, group=None, chunk: int = 3, sp: bool = False
) -> tuple[list, dict]:
    from megatron_ki.config import KIConfig
    from megatron_ki.ki.teacher import KILossFunction

    student, teacher, ids, labels = _model_pair(family, group, sp)
    loss_fn = KILossFunction(KIConfig(temperature=2.0), group, alpha=alpha, chunk_tokens=chunk)
    with torch.no_grad():
        t_out = teacher(ids, head_inputs=fused)
    loss = loss_fn((student(ids, head_inputs=fused), t_out), labels)
    loss.backward()
    rec = loss_fn.pop_records()[0]
    values = [rec.loss.item(), rec.lm_loss.item(), rec.kd_loss.item(), rec.teacher_lm_loss.item()]
    return values, {n: p.grad for n, p in student.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama", "roberta"])
def test_model_head_inputs_equal_the_logits_path(family: str) -> None:
    """The models' ``head_inputs`` through ``KILossFunction`` give the logits path's loss, its parts and every
    student gradient (tied GPT-2, untied Llama, RoBERTa's MLM head with its bias and dense transform)."""
    ref_values, ref_grads = _loss_and_grads(family, fused=False, alpha=0.5)
    values, grads = _loss_and_grads(family, fused=True, alpha=0.5)
    assert values == pytest.approx(ref_values, rel=1e-5)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, **TOL, msg=name)


def _model_tp_worker(rank: int, world: int) -> list[str]:
    group = dist.new_group(list(range(world)))
    bad = []
    families = ("gpt2", "llama", "roberta") if world == 2 else ("gpt2", "roberta")  # tiny_llama: 2 kv heads
    for family, fused, sp in itertools.product(families, (True, False), (False, True)):
        if not (fused or sp):
            continue
        ref_values, ref_grads = _loss_and_grads(family, False, 0.5, group)
        values, grads = _loss_and_grads(family, fused, 0.5, group, sp=sp)
        what = f"{family} fused={fused} sequence_parallel={sp}"
        if values != pytest.approx(ref_values, rel=1e-5):
            bad.append(f"{what}: values {values} != {ref_values}")
        bad += [f"{what}: {n}" for n, g in ref_grads.items() if not torch.allclose(grads[n], g, **TOL)]
    return bad


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_model_head_inputs_tp(tp: int) -> None:
    """At tp > 1, KI through the models (student and teacher): the fused head, sequence parallelism and both
    together give each rank the loss and gradient shards of the plain tensor-parallel logits path."""
    assert run_distributed(_model_tp_worker, tp) == [[]] * tp
