"""The sparse KD loss for offline top-K teacher targets (K ids + one tail bucket), exact at any tp.

Tolerances: fp32 vs the dense ki_loss or a float64 reference: 1e-5 on values (relative) and gradients.
tp=2 vs tp=1 (both fp32): 1e-5 on values, 1e-6 on gradients.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ki.ki import ki_loss, sparse_kd_loss, sparse_ki_loss, sparse_per_token_divergence
from megatron_ki.tensor_parallel import group_rank
from tests.distributed import run_distributed

B, S, V = 2, 5, 48  # V divisible by 2
REAL = 40  # a padded vocabulary: columns REAL.. are -inf (all on the last shard at tp=2)
TAUS = (1.0, 2.0)


def make_logits(seed: int, padded: bool = False):
    """Student and teacher logits ``[B, S, V]`` (-inf past REAL when ``padded``) and labels with ignored
    positions."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, S, V, generator=g) * 2.0
    t = torch.randn(B, S, V, generator=g) * 2.0 + 0.5 * s
    labels = torch.randint(0, REAL if padded else V, (B, S), generator=g)
    labels[0, :2] = -100
    labels[1, 3] = -100
    if padded:
        s[..., REAL:] = float("-inf")
        t[..., REAL:] = float("-inf")
    return s, t, labels


def top_k_targets(t: torch.Tensor, k: int, tau: float):
    """What the precompute writes: the K largest log-probabilities at tau, their ids, log of the rest."""
    lt = F.log_softmax(t.double() / tau, dim=-1)
    logp, ids = lt.topk(k, dim=-1)
    rest = (1.0 - logp.exp().sum(-1)).clamp(min=0.0)
    tail = torch.where(rest > 1e-12, rest.log(), torch.full_like(rest, float("-inf")))
    if k >= int(torch.isfinite(lt[0, 0]).sum()):
        tail = torch.full_like(rest, float("-inf"))
    return ids, logp.float(), tail.float()


def reference_sparse_kl(s: torch.Tensor, ids, logp, tail, tau: float) -> torch.Tensor:
    """Independent float64 per-position K + 1 bucket KL by plain autograd over the full vocabulary."""
    ls = F.log_softmax(s.double() / tau, dim=-1)
    lq = ls.gather(-1, ids)
    in_k = torch.zeros_like(ls, dtype=torch.bool).scatter(-1, ids, True)
    lq_tail = ls.masked_fill(in_k, float("-inf")).logsumexp(-1)
    logp, tail = logp.double(), tail.double()
    p, p_tail = logp.exp(), tail.exp()
    head = torch.where(p > 0, p * (logp - lq), torch.zeros(()).double()).sum(-1)
    safe = torch.where(p_tail > 0, tail - lq_tail, torch.zeros(()).double())
    return head + p_tail * safe


def _grad(fn, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = s.clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


# ------------------------------------------------------------------------------- single process
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("tau", TAUS)
def test_whole_vocabulary_equals_dense_ki_loss(tau: float, padded: bool) -> None:
    """K = every real id, tail -inf: the sparse loss IS ki_loss's forward KL -- value and gradient, with the
    label mask, a mixed a_t and (``padded``) -inf student columns."""
    s, t, labels = make_logits(1, padded)
    ids, logp, tail = top_k_targets(t, REAL if padded else V, tau)
    kw = {"temperature": tau, "backend": "torch"}
    for alpha in (1.0, 0.6):
        dense, g_dense = _grad(lambda x, a=alpha: ki_loss(x, t, labels, a, **kw).loss, s)
        sparse, g_sparse = _grad(
            lambda x, a=alpha: sparse_ki_loss(x, ids, logp, tail, labels, a, temperature=tau).loss, s
        )
        assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
        torch.testing.assert_close(g_sparse, g_dense, atol=1e-5, rtol=1e-5)
    out, ref = (
        sparse_ki_loss(s, ids, logp, tail, labels, 0.6, temperature=tau),
        ki_loss(s, t, labels, 0.6, **kw),
    )
    assert out.kd_loss.item() == pytest.approx(ref.kd_loss.item(), rel=1e-5)
    assert out.lm_loss.item() == pytest.approx(ref.lm_loss.item(), rel=1e-6)
    assert int(out.num_tokens) == int(ref.num_tokens) and out.alpha == 0.6
    assert out.teacher_lm_loss is None and not out.kd_loss.requires_grad
    mask = labels != -100
    assert sparse_kd_loss(s, ids, logp, tail, tau, None, mask).item() == pytest.approx(out.kd_loss.item())


@pytest.mark.parametrize("k", [1, 5, 17])
@pytest.mark.parametrize("tau", TAUS)
def test_top_k_equals_float64_reference(k: int, tau: float) -> None:
    s, t, labels = make_logits(2, padded=True)
    ids, logp, tail = top_k_targets(t, k, tau)
    mask = labels != -100
    ids = ids.masked_fill(~mask.unsqueeze(-1), -1)  # garbage off the mask is never read
    ref_ids = ids.clamp(min=0)

    def ref(x):
        return reference_sparse_kl(x, ref_ids, logp, tail, tau)[mask].mean() * tau**2

    want, g_want = _grad(ref, s.double())
    got, g_got = _grad(lambda x: sparse_kd_loss(x, ids, logp, tail, tau, None, mask, vocab_size=REAL), s)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(g_got.double(), g_want, atol=1e-6, rtol=1e-5)
    assert torch.all(g_got[~mask] == 0) and torch.all(g_got[..., REAL:] == 0)
    per = sparse_per_token_divergence(s, ids, logp, tail, mask, temperature=tau)
    assert torch.all(per[~mask] == 0) and torch.all(per[mask] >= -1e-6)


def test_gradcheck_float64() -> None:
    """The hand-written backward is the exact gradient (finite differences in float64)."""
    s, t, _ = make_logits(3, padded=True)
    s = s[:1, :3].double().requires_grad_(True)
    ids, logp, tail = top_k_targets(t[:1, :3], 4, 2.0)
    mask = torch.tensor([[True, False, True]])

    def fn(x):
        return sparse_per_token_divergence(x, ids, logp.double(), tail.double(), mask, temperature=2.0)

    assert fn(s).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


def test_k_ids_hold_all_the_student_mass_stays_finite() -> None:
    """q_tail -> 0 (the other logits 1e4 below, exp underflows even in float64): finite, as the reference."""
    s, t, _ = make_logits(4)
    ids, logp, tail = top_k_targets(t, 3, 1.0)
    s = s.clone()
    s[0, 0] = -1e4
    s[0, 0].scatter_(-1, ids[0, 0], torch.tensor([3.0, 2.0, 1.0]))
    assert tail[0, 0] > -10  # the teacher does put mass in the tail
    got, grad = _grad(lambda x: sparse_per_token_divergence(x, ids, logp, tail, temperature=1.0).sum(), s)
    want, g_want = _grad(lambda x: reference_sparse_kl(x, ids, logp, tail, 1.0).sum(), s.double())
    assert math.isfinite(got.item()) and got.item() > 1e3
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), g_want, atol=1e-5, rtol=1e-5)


def test_teacher_tail_zero_contributes_nothing() -> None:
    """t_tail = -inf with K < V: no tail term, no NaN; the gradient still moves the student's tail mass."""
    s, t, _ = make_logits(5)
    ids, logp, _ = top_k_targets(t, 6, 2.0)
    logp = logp - logp.logsumexp(-1, keepdim=True)  # the K ids hold all of the teacher's mass
    tail = torch.full(s.shape[:-1], float("-inf"))
    got, grad = _grad(lambda x: sparse_kd_loss(x, ids, logp, tail, 2.0), s)
    want, g_want = _grad(lambda x: reference_sparse_kl(x, ids, logp, tail, 2.0).mean() * 4.0, s.double())
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), g_want, atol=1e-6, rtol=1e-5)


def test_saves_no_vocabulary_sized_tensor_but_the_logits() -> None:
    s, t, labels = make_logits(6)
    ids, logp, tail = top_k_targets(t, 8, 2.0)
    x = s.clone().requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sparse_per_token_divergence(x, ids, logp, tail, labels != -100)
    big = [z for z in saved if z.numel() >= S * V]
    assert saved and all(z.data_ptr() == x.data_ptr() for z in big), [tuple(z.shape) for z in big]


def test_bad_targets_are_refused_with_a_message() -> None:
    s, t, labels = make_logits(7, padded=True)
    ids, logp, tail = top_k_targets(t, 4, 2.0)
    beyond = ids.clone()
    beyond[1, 1, 2] = REAL + 1  # a padded column of the student
    with pytest.raises(ValueError, match=r"outside the student's vocabulary \[0, 40\)"):
        sparse_kd_loss(s, beyond, logp, tail, 2.0, vocab_size=REAL)
    with pytest.raises(ValueError, match="padded vocabulary"):
        sparse_kd_loss(s, beyond, logp, tail, 2.0)  # no vocab_size: the -inf column gives it away
    with pytest.raises(ValueError, match="outside"):
        sparse_kd_loss(s, ids + V, logp, tail, 2.0)
    with pytest.raises(ValueError, match="outside"):
        sparse_kd_loss(s, ids.masked_fill(ids == ids[0, 2, 0], -3), logp, tail, 2.0)
    twice = ids.clone()
    twice[0, 2, 1] = twice[0, 2, 0]
    with pytest.raises(ValueError, match="twice"):
        sparse_kd_loss(s, twice, logp, tail, 2.0)
    with pytest.raises(ValueError, match="do not match"):
        sparse_kd_loss(s, ids[..., :3], logp, tail, 2.0)
    with pytest.raises(ValueError, match="integer"):
        sparse_kd_loss(s, ids.float(), logp, tail, 2.0)
    with pytest.raises(ValueError, match="targets are required"):
        sparse_ki_loss(s, None, None, None, labels, 0.5)


def test_alpha_zero_and_nothing_masked_in() -> None:
    s, t, labels = make_logits(8)
    out = sparse_ki_loss(s, None, None, None, labels, 0.0)
    lm = F.cross_entropy(s.double().reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert out.kd_loss is None and out.loss.item() == pytest.approx(lm.item(), rel=1e-6)
    ids, logp, tail = top_k_targets(t, 4, 2.0)
    x = s.clone().requires_grad_(True)
    res = sparse_ki_loss(x, ids, logp, tail, torch.full_like(labels, -100), 0.5)
    res.loss.backward()
    assert res.loss.item() == 0.0 and int(res.num_tokens) == 0 and torch.all(x.grad == 0)


def test_bf16_student() -> None:
    s, t, labels = make_logits(9)
    ids, logp, tail = top_k_targets(t, 8, 2.0)
    x = s.to(torch.bfloat16).requires_grad_(True)
    got = sparse_kd_loss(x, ids, logp, tail, 2.0, None, labels != -100)
    got.backward()
    mask = labels != -100
    want, g_want = _grad(
        lambda y: reference_sparse_kl(y, ids, logp, tail, 2.0)[mask].mean() * 4.0, x.detach().double()
    )
    assert x.grad.dtype == torch.bfloat16 and got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), g_want, atol=2e-4, rtol=2e-2)


# -------------------------------------------------------------------------------------- tp = 2
def _cases():
    """(name, padded, K, tau): the whole vocabulary, top-K with ids on both shards, K=1."""
    return [
        ("whole", True, REAL, 1.0),
        ("top5", True, 5, 2.0),
        ("top17", False, 17, 2.0),
        ("k1", True, 1, 1.0),
    ]


def _targets(name, padded, k, tau):
    s, t, labels = make_logits(10 + len(name), padded)
    ids, logp, tail = top_k_targets(t, k, tau)
    return s, ids, logp, tail, labels


def _counting_all_reduce(log: list[int]):
    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        log.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    return original, counted


def _sparse_worker(rank: int, world_size: int) -> dict:
    group = dist.new_group(list(range(world_size)))
    r, out = group_rank(group), {}
    for name, padded, k, tau in _cases():
        s, ids, logp, tail, labels = _targets(name, padded, k, tau)
        x = s.chunk(world_size, -1)[r].contiguous().requires_grad_(True)
        log: list[int] = []
        original, counted = _counting_all_reduce(log)
        dist.all_reduce = counted
        try:
            res = sparse_ki_loss(x, ids, logp, tail, labels, 0.7, temperature=tau, tp_group=group)
            res.loss.backward()
        finally:
            dist.all_reduce = original
        out[name] = (res.loss.item(), res.kd_loss.item(), res.lm_loss.item(), x.grad.numpy(), log)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("bias", [False, True])
def test_head_rows_path_equals_the_logits_path(bias: bool) -> None:
    """Offline targets from the head's inputs (only the labelled rows projected, ``head_rows_logits``) give the
    logits path's loss and gradients (hidden, weight, bias), padded vocabulary columns included."""
    from megatron_ki.config import KIConfig
    from megatron_ki.ki.teacher import KILossFunction
    from megatron_ki.models.transformer import HeadInputs

    g = torch.Generator().manual_seed(5)
    h0, w0 = torch.randn(B, S, 16, generator=g), torch.randn(V, 16, generator=g) * 0.5
    b0 = torch.randn(V, generator=g) if bias else None
    _, t, labels = make_logits(9, padded=True)
    ids, logp, tail = top_k_targets(t, 6, 2.0)
    fn = KILossFunction(
        KIConfig(enabled=True, temperature=2.0, teacher_targets=["x"]), alpha=0.7, vocab_size=REAL
    )
    results = []
    for rows_only in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        if rows_only:
            out = HeadInputs(h, w, b, REAL)
        else:
            out = F.linear(h, w, b)
            out = out.masked_fill(torch.arange(V) >= REAL, float("-inf"))
        loss = fn(out, (labels, ids, logp, tail))
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, b.grad if bias else None))
    for a, c in zip(*results, strict=True):
        if a is not None:
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    records = fn.pop_records()
    assert float(records[0].kd_loss) == pytest.approx(float(records[1].kd_loss), rel=1e-6)
    assert int(records[0].num_tokens) == int(records[1].num_tokens) == int((labels != -100).sum())


def test_tp2_equals_tp1() -> None:
    results = run_distributed(_sparse_worker, world_size=2)
    for name, padded, k, tau in _cases():
        s, ids, logp, tail, labels = _targets(name, padded, k, tau)
        x = s.clone().requires_grad_(True)
        res = sparse_ki_loss(x, ids, logp, tail, labels, 0.7, temperature=tau)
        res.loss.backward()
        assert (((ids < V // 2) & (ids >= 0)).any() and (ids >= V // 2).any()) or k == 1
        grads = [torch.as_tensor(r[name][3]) for r in results]
        for loss, kd, lm, _, log in (r[name] for r in results):
            assert loss == pytest.approx(res.loss.item(), rel=1e-5, abs=1e-6), name
            assert kd == pytest.approx(res.kd_loss.item(), rel=1e-5, abs=1e-6), name
            assert lm == pytest.approx(res.lm_loss.item(), rel=1e-5), name
            rows = int((labels != -100).sum())
            # the LM loss's three [tokens] all-reduces, then the KD term's MAX [rows] and SUM [rows, K + 1]
            assert log == [B * S] * 3 + [rows, rows * (k + 1)], (name, log)
        torch.testing.assert_close(torch.cat(grads, -1), x.grad, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ benchmark
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_sparse_kd_tiny(tmp_path: Path) -> None:
    """The micro-benchmark runs end to end at a tiny size and prints its table (numbers are not checked)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sparse_kd.py"
    out = tmp_path / "sparse.json"
    args = ["--tokens", "64", "--vocab", "512", "--ks", "4", "16", "--reps", "1", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--json", str(out)], capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("|")]
    assert lines[0].startswith("| KD term | K | fwd+bwd ms (median)") and len(lines) == 2 + 3
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dense", "4", "16"}
    assert all(r["median_s"] > 0 and math.isfinite(r["kl_sum"]) for r in results.values())
    assert results["dense"]["teacher_bytes"] == 64 * 512 * 4 > results["16"]["teacher_bytes"]
