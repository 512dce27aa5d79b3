"""Tensor-parallel layers, vocab-parallel cross-entropy and the TP RNG at tp=2 and tp=4 (gloo) against
single-process nn.Linear / nn.Embedding / F.cross_entropy holding the full weight.

One spawn per world size runs every check (spawning is the slow part) and returns max-abs differences;
the test functions below assert on them. Tolerances: fp32 1e-5 (forward and gradients); cross-entropy with
bf16 logits: loss 1e-5 (fp32 statistics of the same bf16 values), gradient (returned in bf16) 4e-3.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ki.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPRngTracker,
    VocabParallelEmbedding,
    seed_everything,
    shard_rows,
    unshard_rows,
    vocab_parallel_cross_entropy,
)
from tests.distributed import run_distributed

IN, QKV = 12, [16, 8, 8]  # fused column layer with unequal segments (q larger than k, v)
OUT_COL = 24
ROW_IN, ROW_OUT = 16, 10
VOCAB, EMB = 32, 6
BATCH, SEQ = 2, 5
FP32_TOL = 1e-5


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def _gather(x: torch.Tensor, group, dim: int = -1) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check_column(tp, rank, group, sizes, gather_output, tag, res):
    out_size = sum(sizes)
    torch.manual_seed(100)
    full = nn.Linear(IN, out_size)
    torch.manual_seed(100)
    ref = ColumnParallelLinear(IN, out_size, None, output_sizes=sizes)  # tp=1: the full init
    torch.manual_seed(100)
    col = ColumnParallelLinear(IN, out_size, group, gather_output=gather_output, output_sizes=sizes)
    bias = _rand(out_size, seed=101)
    with torch.no_grad():
        full.weight.copy_(ref.weight)
        full.bias.copy_(bias)
        col.bias.copy_(shard_rows(bias, sizes, tp, rank))
    res[f"{tag}/init_is_shard_of_full"] = _diff(col.weight, shard_rows(ref.weight, sizes, tp, rank))
    res[f"{tag}/gathered_weight"] = _diff(
        unshard_rows(_gather(col.weight.detach(), group), sizes), full.weight
    )

    x_full = _rand(BATCH, SEQ, IN, seed=102).requires_grad_(True)
    x = x_full.detach().clone().requires_grad_(True)
    g = _rand(BATCH, SEQ, out_size, seed=103)
    y_full = full(x_full)
    (y_full * g).sum().backward()
    y = col(x)
    if gather_output:
        # the gathered output should be Y = X A^T in the full weight's layout
        full_layout = _diff(y, y_full)
        rank_major = _diff(unshard_rows(y.chunk(tp, -1), sizes, dim=-1), y_full)
        res[f"{tag}/out_full_layout"] = full_layout
        res[f"{tag}/out_either_layout"] = min(full_layout, rank_major)
        g_rank_major = torch.cat([shard_rows(g, sizes, tp, r, dim=-1) for r in range(tp)], -1)
        (y * (g if full_layout <= rank_major else g_rank_major)).sum().backward()
    else:
        res[f"{tag}/out"] = _diff(y, shard_rows(y_full, sizes, tp, rank, dim=-1))
        (y * shard_rows(g, sizes, tp, rank, dim=-1)).sum().backward()
    res[f"{tag}/grad_input"] = _diff(x.grad, x_full.grad)
    res[f"{tag}/grad_weight"] = _diff(unshard_rows(_gather(col.weight.grad, group), sizes), full.weight.grad)
    res[f"{tag}/grad_bias"] = _diff(unshard_rows(_gather(col.bias.grad, group), sizes), full.bias.grad)


def _check_row(tp, rank, group, input_is_parallel, tag, res):
    torch.manual_seed(200)
    ref = RowParallelLinear(ROW_IN, ROW_OUT, None)
    torch.manual_seed(200)
    row = RowParallelLinear(ROW_IN, ROW_OUT, group, input_is_parallel=input_is_parallel)
    full = nn.Linear(ROW_IN, ROW_OUT)
    bias = _rand(ROW_OUT, seed=201)
    with torch.no_grad():
        full.weight.copy_(ref.weight)
        full.bias.copy_(bias)
        row.bias.copy_(bias)
    res[f"{tag}/init_is_shard_of_full"] = _diff(row.weight, ref.weight.chunk(tp, 1)[rank])
    res[f"{tag}/gathered_weight"] = _diff(torch.cat(_gather(row.weight.detach(), group), 1), full.weight)

    x_full = _rand(BATCH, SEQ, ROW_IN, seed=202).requires_grad_(True)
    g = _rand(BATCH, SEQ, ROW_OUT, seed=203)
    y_full = full(x_full)
    (y_full * g).sum().backward()
    if input_is_parallel:
        x = x_full.detach().chunk(tp, -1)[rank].clone().requires_grad_(True)
        y = row(x)
        (y * g).sum().backward()
        res[f"{tag}/grad_input"] = _diff(torch.cat(_gather(x.grad, group), -1), x_full.grad)
    else:
        x = x_full.detach().clone().requires_grad_(True)
        y = row(x)
        (y * g).sum().backward()
        res[f"{tag}/grad_input"] = _diff(x.grad, x_full.grad)
    res[f"{tag}/out"] = _diff(y, y_full)
    res[f"{tag}/grad_weight"] = _diff(torch.cat(_gather(row.weight.grad, group), 1), full.weight.grad)
    res[f"{tag}/grad_bias"] = _diff(row.bias.grad, full.bias.grad)


def _check_embedding(tp, rank, group, res):
    torch.manual_seed(300)
    ref = VocabParallelEmbedding(VOCAB, EMB, None)
    torch.manual_seed(300)
    emb = VocabParallelEmbedding(VOCAB, EMB, group)
    full = nn.Embedding(VOCAB, EMB)
    with torch.no_grad():
        full.weight.copy_(ref.weight)
    res["emb/init_is_shard_of_full"] = _diff(emb.weight, ref.weight.chunk(tp, 0)[rank])
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(301))
    ids[0, 0], ids[0, 1] = 0, VOCAB - 1  # both range ends
    g = _rand(BATCH, SEQ, EMB, seed=302)
    (full(ids) * g).sum().backward()
    y = emb(ids)
    (y * g).sum().backward()
    res["emb/out"] = _diff(y, full(ids))
    res["emb/grad_weight"] = _diff(torch.cat(_gather(emb.weight.grad, group), 0), full.weight.grad)


def _check_cross_entropy(tp, rank, group, res):
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(400))
    target[0, :2] = -100
    target[1, 0] = VOCAB - 1
    for dtype, tag in ((torch.float32, "ce_fp32"), (torch.bfloat16, "ce_bf16")):
        logits_full = (_rand(BATCH, SEQ, VOCAB, seed=401) * 4).to(dtype)
        ref_logits = logits_full.float().clone().requires_grad_(True)
        ref = F.cross_entropy(ref_logits.reshape(-1, VOCAB), target.reshape(-1), reduction="none").reshape(
            BATCH, SEQ
        )
        g = _rand(BATCH, SEQ, seed=402)
        (ref * g).sum().backward()
        local = logits_full.chunk(tp, -1)[rank].clone().requires_grad_(True)
        loss = vocab_parallel_cross_entropy(local, target, group)
        (loss * g).sum().backward()
        res[f"{tag}/loss"] = _diff(loss, ref)
        res[f"{tag}/ignored_zero"] = float(loss.detach()[target == -100].abs().max())
        res[f"{tag}/grad_dtype_ok"] = float(local.grad.dtype == dtype)
        res[f"{tag}/grad"] = _diff(torch.cat(_gather(local.grad, group), -1), ref_logits.grad)


def _check_rng(tp, rank, group, res):
    seed_everything(1234)
    tracker = TPRngTracker(1234, tp_rank=rank)
    ones = torch.ones(4096)
    outside = F.dropout(ones, 0.5)
    with tracker.fork():
        inside = F.dropout(ones, 0.5)
    after = F.dropout(ones, 0.5)
    outs, ins, afters = _gather(outside, group), _gather(inside, group), _gather(after, group)
    res["rng/outside_agree"] = float(all(torch.equal(o, outs[0]) for o in outs))
    res["rng/after_fork_agree"] = float(all(torch.equal(a, afters[0]) for a in afters))
    res["rng/inside_differ"] = float(
        all(not torch.equal(ins[i], ins[j]) for i in range(tp) for j in range(i))
    )
    # fork() leaves the default stream as if it had not been entered
    seed_everything(1234)
    F.dropout(ones, 0.5)
    res["rng/fork_transparent"] = float(torch.equal(F.dropout(ones, 0.5), after))
    # state_dict round trip replays the same masks
    state = {k: v.clone() for k, v in tracker.state_dict().items()}
    with tracker.fork():
        m1 = F.dropout(ones, 0.5)
        m1b = F.dropout(ones, 0.5)
    tracker.load_state_dict(state)
    with tracker.fork():
        m2 = F.dropout(ones, 0.5)
        m2b = F.dropout(ones, 0.5)
    res["rng/state_roundtrip"] = float(
        torch.equal(m1, m2) and torch.equal(m1b, m2b) and not torch.equal(m1, m1b)
    )
    fresh = TPRngTracker(0, tp_rank=rank)
    fresh.load_state_dict(state)
    with fresh.fork():
        m3 = F.dropout(ones, 0.5)
    res["rng/state_to_new_tracker"] = float(torch.equal(m1, m3))


def _tp_worker(rank: int, world_size: int) -> dict[str, float]:
    group = dist.new_group(list(range(world_size)))
    tp = world_size
    res: dict[str, float] = {}
    _check_column(tp, rank, group, [OUT_COL], False, "col", res)
    _check_column(tp, rank, group, [OUT_COL], True, "col_gather", res)
    _check_column(tp, rank, group, QKV, False, "col_qkv", res)
    _check_column(tp, rank, group, QKV, True, "col_qkv_gather", res)
    _check_row(tp, rank, group, True, "row_parallel_in", res)
    _check_row(tp, rank, group, False, "row_full_in", res)
    _check_embedding(tp, rank, group, res)
    _check_cross_entropy(tp, rank, group, res)
    _check_rng(tp, rank, group, res)
    return res


@pytest.fixture(scope="module", params=[2, 4], ids=lambda tp: f"tp{tp}")
def tp_results(request) -> list[dict[str, float]]:
    return run_distributed(_tp_worker, request.param)


def _assert_close(
    results: list[dict[str, float]], prefix: str, tol: float = FP32_TOL, skip: tuple = ()
) -> None:
    keys = [k for k in results[0] if k.startswith(prefix + "/") and k.split("/", 1)[1] not in skip]
    assert keys, prefix
    for rank, res in enumerate(results):
        bad = {k: res[k] for k in keys if not res[k] <= tol}
        assert not bad, f"rank {rank}: {bad}"


# ------------------------------------------------------------------------------ without processes
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("sizes", [[24], [16, 8, 8], [8, 4, 4, 8]])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_unshard_roundtrip(tp: int, sizes: list[int], dim: int) -> None:
    shape = (sum(sizes), 3) if dim == 0 else (3, sum(sizes))
    full = torch.randn(shape)
    shards = [shard_rows(full, sizes, tp, r, dim=dim) for r in range(tp)]
    assert all(s.shape[dim] == sum(sizes) // tp for s in shards)
    assert torch.equal(unshard_rows(shards, sizes, dim=dim), full)
    # each shard holds its part of every segment, in segment order
    seg0 = full.narrow(dim, 0, sizes[0]).chunk(tp, dim)[tp - 1]
    assert torch.equal(shards[tp - 1].narrow(dim, 0, sizes[0] // tp), seg0)


# ------------------------------------------------------------------------------------- tp = 2, 4
@pytest.mark.distributed
def test_column_parallel(tp_results) -> None:
    _assert_close(tp_results, "col")
    _assert_close(tp_results, "col_gather")
    _assert_close(tp_results, "col_qkv")


@pytest.mark.distributed
def test_column_parallel_fused_gather_grads(tp_results) -> None:
    _assert_close(tp_results, "col_qkv_gather", skip=("out_full_layout",))


@pytest.mark.distributed
def test_column_parallel_fused_gather_output_layout(tp_results) -> None:
    for res in tp_results:
        assert res["col_qkv_gather/out_full_layout"] <= FP32_TOL


@pytest.mark.distributed
def test_row_parallel(tp_results) -> None:
    _assert_close(tp_results, "row_parallel_in")
    _assert_close(tp_results, "row_full_in")


@pytest.mark.distributed
def test_vocab_parallel_embedding(tp_results) -> None:
    _assert_close(tp_results, "emb")


@pytest.mark.distributed
def test_vocab_parallel_cross_entropy(tp_results) -> None:
    for res in tp_results:
        assert res["ce_fp32/loss"] <= FP32_TOL and res["ce_fp32/grad"] <= FP32_TOL
        assert res["ce_bf16/loss"] <= FP32_TOL  # fp32 statistics of the same bf16 values
        assert res["ce_bf16/grad"] <= 4e-3  # gradient rounded to bf16
        assert res["ce_fp32/ignored_zero"] == 0.0 and res["ce_bf16/ignored_zero"] == 0.0
        assert res["ce_fp32/grad_dtype_ok"] == 1.0 and res["ce_bf16/grad_dtype_ok"] == 1.0


@pytest.mark.distributed
def test_tp_rng_tracker(tp_results) -> None:
    for res in tp_results:
        for key in (
            "rng/outside_agree",
            "rng/after_fork_agree",
            "rng/inside_differ",
            "rng/fork_transparent",
            "rng/state_roundtrip",
            "rng/state_to_new_tracker",
        ):
            assert res[key] == 1.0, key
