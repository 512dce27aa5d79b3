"""The KI loss on the compiled CPU kernels equals the PyTorch path under tensor parallelism (tp=2, gloo).

``megatron_ki.ki.ki_loss`` with ``backend="kernels"`` (``megatron_ki.kernels.kl_forward_stats`` /
``kl_backward``, the compiled C++ ops) against ``backend="torch"`` (the kernels' PyTorch reference), for
forward KL, reverse KL and cross-entropy, fp32 and bf16 logits, ordinary logits and extreme ones (1e4, -inf
entries, a whole TP slice of -inf). ``backend="auto"`` must pick the kernels: the compiled-path log line
appears, the kernels' functions are called, and the result is bit-identical to ``"kernels"``. Calls of the
reference are counted in the workers: only ``"torch"`` may run it, so a silent fallback fails the test.

Tolerances, kernels vs torch on each rank: loss and KD values 1e-5 relative (both accumulate fp32 statistics
and combine them in fp64); student gradients fp32 atol 1e-6 / rtol 1e-4, bf16 (rounded once from fp32 math)
atol 1e-7 / rtol 1.6e-2, i.e. two bf16 ulps. The tp=2 kernel result also equals the single-process torch
result on the unsharded logits (fp32: same tolerances; bf16: values 1e-5 relative, gradients two ulps).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.distributed as dist

import megatron_ki.kernels as kernels
from megatron_ki.ki import DIVERGENCES, ki_loss
from megatron_ki.tensor_parallel import group_rank
from tests.distributed import run_distributed

B, S, V = 2, 8, 64  # vocab split 32 + 32 at tp=2
ALPHA, TAU = 0.6, 2.0
DTYPES = (torch.float32, torch.bfloat16)
BACKENDS = ("torch", "kernels", "auto")
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.bfloat16: dict(atol=1e-7, rtol=1.6e-2)}
COMPILED_LINE = "runs on the CPU C++ extension"
COMPILED_OPS = ("kl_forward_stats", "kl_backward")  # megatron_ki.kernels' dispatch
REFERENCE_OPS = ("kl_forward_stats_reference", "kl_backward_reference")  # megatron_ki.kernels.reference
TORCH_CALLS = dict.fromkeys(COMPILED_OPS, 0) | dict.fromkeys(REFERENCE_OPS, 1)  # per ki_loss call
COMPILED_CALLS = dict.fromkeys(COMPILED_OPS, 1) | dict.fromkeys(REFERENCE_OPS, 0)


def make_batch(extreme: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student/teacher logits ``[B, S, V]`` (teacher correlated with the student) and labels with ignored
    positions. ``extreme``: logits of 1e4, shared -inf entries and rows whose upper TP slice is all -inf."""
    g = torch.Generator().manual_seed(7 if extreme else 3)
    s = torch.randn(B, S, V, generator=g) * 3.0
    t = torch.randn(B, S, V, generator=g) * 3.0 + 0.5 * s
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :3] = -100
    labels[1, 5] = -100
    if extreme:
        labels = torch.where(labels >= 0, labels % (V // 2), labels)  # never a -inf target
        s[0, 3, 5], t[0, 3, 9], t[1, 0, 2] = 1e4, -1e4, 1e4
        s[1, 1, 10:14] = t[1, 1, 10:14] = float("-inf")
        s[0, 4, V // 2 :] = t[0, 4, V // 2 :] = float("-inf")  # all of rank 1's slice
        s[1, 2, V // 2 + 3 :] = t[1, 2, V // 2 + 3 :] = float("-inf")
    return s.to(dtype), t.to(dtype), labels


def _shard(x: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    return x.chunk(tp, dim=-1)[rank].contiguous()


class _Counted:
    """Counts calls of one function of a module (the attribute ``ki.loss`` and ``kernels.kl`` look up)."""

    def __init__(self, module, name: str) -> None:
        self.name, self.calls, self.fn = name, 0, getattr(module, name)
        setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _worker(rank: int, world_size: int) -> dict:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    log = logging.getLogger("megatron_ki")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    assert kernels.load_cpu_extension() is not None, f"rank {rank}: the CPU extension did not load"
    counters = {n: _Counted(kernels, n) for n in COMPILED_OPS}
    counters |= {n: _Counted(kernels.reference, n) for n in REFERENCE_OPS}

    group = dist.new_group(list(range(world_size)))
    tp, r = world_size, group_rank(group)
    out: dict = {"cases": {}}
    for extreme in (False, True):
        for dtype in DTYPES:
            s_full, t_full, labels = make_batch(extreme, dtype)
            for divergence in DIVERGENCES:
                for backend in BACKENDS:
                    before = {n: c.calls for n, c in counters.items()}
                    student = _shard(s_full, r, tp).requires_grad_(True)
                    res = ki_loss(
                        student, _shard(t_full, r, tp), labels, ALPHA, temperature=TAU,
                        divergence=divergence, tp_group=group, backend=backend,
                    )  # fmt: skip
                    res.loss.backward()
                    calls = {n: c.calls - before[n] for n, c in counters.items()}
                    out["cases"][(extreme, str(dtype), divergence, backend)] = (
                        res.loss.detach(),
                        res.kd_loss,
                        student.grad.detach(),
                        calls,
                    )
    out["selected"] = kernels.select_backend("kl_forward_stats", torch.zeros(1))[0]
    out["log"] = records
    return out


def _single_process_torch(extreme: bool, dtype: torch.dtype, divergence: str):
    s_full, t_full, labels = make_batch(extreme, dtype)
    student = s_full.clone().requires_grad_(True)
    res = ki_loss(student, t_full, labels, ALPHA, temperature=TAU, divergence=divergence, backend="torch")
    res.loss.backward()
    return res, student.grad


@pytest.mark.distributed
def test_kernels_equal_torch_at_tp2() -> None:
    results = run_distributed(_worker, world_size=2)
    cases = sorted({k[:3] for k in results[0]["cases"]})
    assert len(cases) == 2 * len(DTYPES) * len(DIVERGENCES)

    for rank, res in enumerate(results):
        # "auto" chose the compiled op, and said so in the one log line per op
        assert res["selected"] == "CPU C++ extension"
        assert any("kl_forward_stats" in m and COMPILED_LINE in m for m in res["log"]), res["log"]
        assert any("kl_backward" in m and COMPILED_LINE in m for m in res["log"]), res["log"]
        for extreme, dtype_name, divergence in cases:
            dtype = getattr(torch, dtype_name.split(".")[1])
            key = (extreme, dtype_name, divergence)
            what = f"rank {rank} {key}"
            t_loss, t_kd, t_grad, t_calls = res["cases"][(*key, "torch")]
            k_loss, k_kd, k_grad, k_calls = res["cases"][(*key, "kernels")]
            a_loss, a_kd, a_grad, a_calls = res["cases"][(*key, "auto")]
            assert t_calls == TORCH_CALLS, what
            assert k_calls == a_calls == COMPILED_CALLS, what
            assert math.isfinite(t_loss.item()) and torch.isfinite(t_grad.float()).all(), what
            assert k_grad.dtype == t_grad.dtype == dtype, what
            assert k_loss.item() == pytest.approx(t_loss.item(), rel=1e-5), what
            assert k_kd.item() == pytest.approx(t_kd.item(), rel=1e-5), what
            torch.testing.assert_close(k_grad, t_grad, **GRAD_TOL[dtype], msg=what)
            assert torch.equal(a_loss, k_loss) and torch.equal(a_kd, k_kd), f"{what}: auto != kernels"
            assert torch.equal(a_grad, k_grad), f"{what}: auto != kernels"

    # the tp=2 kernel result equals the single-process torch result on the full vocabulary
    for extreme, dtype_name, divergence in cases:
        dtype = getattr(torch, dtype_name.split(".")[1])
        key = (extreme, dtype_name, divergence, "kernels")
        ref, ref_grad = _single_process_torch(extreme, dtype, divergence)
        for res in results:
            assert res["cases"][key][0].item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-5), key
        grad = torch.cat([res["cases"][key][2] for res in results], dim=-1)
        torch.testing.assert_close(grad, ref_grad, **GRAD_TOL[dtype], msg=str(key))


def test_auto_falls_back_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no compiled op exists, "auto" calls the kernels' PyTorch reference directly (no dispatch)."""
    import megatron_ki.ki.loss as loss_mod

    reference_ops = (kernels.reference.kl_forward_stats_reference, kernels.reference.kl_backward_reference)
    monkeypatch.setattr(kernels, "select_backend", lambda op, x: ("PyTorch reference", None))
    assert loss_mod._kl_ops("auto", torch.zeros(1)) == reference_ops
    assert loss_mod._kl_ops("torch", torch.zeros(1)) == reference_ops
    assert kernels.load_cpu_extension() is not None
    monkeypatch.undo()
    assert loss_mod._kl_ops("auto", torch.zeros(1)) == (kernels.kl_forward_stats, kernels.kl_backward)
