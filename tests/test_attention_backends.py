"""The three attention backends give the same model, with the REAL compiled CPU softmax kernels.

Each family's tiny config (``launch/configs/models/tiny_*.yaml``) is built with ``attention_backend`` =
"sdpa", "eager" and "fused_softmax" from the same seed; one forward (vocab-parallel cross-entropy) and backward
must give the same logits and the same gradient for every parameter.

Masks: causal without padding (the upper-triangular kernel), causal with padding and bidirectional with and
without padding (the masked kernel); the padded batches hold an unpadded row, a right-padded row and a
left-padded row (whose first queries see no key at all under a causal mask: every backend gives them a
zero attention output, so logits agree at every position, padding included).

Tolerances: fp32, atol 1e-5 / rtol 1e-4 elementwise (measured differences are ~2e-7, summation order only).
bf16 parameters and activations: relative L2 error below 3e-2 for the logits and for every parameter's
gradient (measured <= 9e-3: sdpa keeps the probabilities in fp32 inside its kernel, eager and fused_softmax
round them to bf16 before the product with V). At tp=2 (gloo), the backends agree on each rank and the
fused_softmax model's gathered logits and unsharded gradients equal the single-process sdpa model's.
The kernel path is asserted, not assumed: the compiled op must load and be called with the expected variant.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_ki.config import ModelConfig, model_config_from_yaml
from megatron_ki.kernels import load_cpu_extension, select_backend
from megatron_ki.kernels import softmax as kernel_softmax
from megatron_ki.models import build_model, core_attention, gather_logits, partition_info
from megatron_ki.tensor_parallel import unshard_rows, vocab_parallel_cross_entropy
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("gpt2", "llama", "bert", "roberta")
BACKENDS = ("sdpa", "eager", "fused_softmax")
BATCH, SEQ = 3, 16
FP32_TOL = dict(atol=1e-5, rtol=1e-4)
BF16_REL_L2 = 3e-2
# (family, mask case) pairs: causal families without and with padding, bidirectional ones with and without
CASES = [
    (f, c)
    for f in FAMILIES
    for c in (("causal", "causal_padded") if f in ("gpt2", "llama") else ("padded", "unpadded"))
]


def tiny_config(family: str, backend: str = "sdpa", dtype: str = "float32") -> ModelConfig:
    cfg = model_config_from_yaml(ROOT / "launch" / "configs" / "models" / f"tiny_{family}.yaml")
    return dataclasses.replace(cfg, attention_backend=backend, params_dtype=dtype)


def make_batch(cfg: ModelConfig, case: str) -> dict[str, torch.Tensor]:
    """Row 0 unpadded; in padded cases row 1 is right-padded (last 5) and row 2 left-padded (first 4)."""
    g = torch.Generator().manual_seed(2024)
    ids = torch.randint(3, cfg.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "labels": labels}
    if case.endswith("padded") and case != "unpadded":
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, SEQ - 5 :] = 0
        mask[2, :4] = 0
        ids[mask == 0] = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        labels[mask == 0] = -100
        batch["attention_mask"] = mask
    if cfg.type_vocab_size > 1:
        batch["token_type_ids"] = (torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone()
    return batch


class KernelCalls:
    """Records the ``causal`` flag of every call into the compiled softmax op (``_FusedSoftmax``)."""

    def __init__(self) -> None:
        self.flags: list[bool] = []
        self._orig = None

    def __enter__(self) -> KernelCalls:
        self._orig = kernel_softmax._FusedSoftmax.apply
        orig = self._orig

        def apply(ext, scores, mask, scale, causal):
            self.flags.append(bool(causal))
            return orig(ext, scores, mask, scale, causal)

        kernel_softmax._FusedSoftmax.apply = apply
        return self

    def __exit__(self, *exc) -> None:
        kernel_softmax._FusedSoftmax.apply = self._orig


def forward_backward(cfg: ModelConfig, case: str, group=None, seed: int = 11) -> dict:
    """Gathered fp32 logits, every parameter's local gradient (fp32 numpy) and the kernel calls made."""
    model = build_model(cfg, tp_group=group, seed=seed)
    batch = make_batch(cfg, case)
    labels = batch.pop("labels")
    with KernelCalls() as calls:
        logits = model(**batch)
        per_token = vocab_parallel_cross_entropy(logits, labels, group)
        loss = per_token.float().sum() / (labels != -100).sum()
        loss.backward()
    full = gather_logits(logits.detach(), group, cfg.vocab_size)
    grads = {n: p.grad.detach().float().numpy().copy() for n, p in model.named_parameters()}
    assert all(np.isfinite(g).all() for g in grads.values()), f"{cfg.family} {case}: non-finite gradient"
    return {
        "logits": full.float().numpy(),
        "dtype": str(logits.dtype),
        "grads": grads,
        "calls": calls.flags,
        "info": partition_info(model),
    }


def expected_kernel_calls(cfg: ModelConfig, case: str) -> list[bool]:
    """One fused call per layer, upper-triangular (True) only for causal attention without padding."""
    return [case == "causal"] * cfg.num_layers


def run_all_backends(family: str, case: str, dtype: str, group=None) -> dict[str, dict]:
    return {b: forward_backward(tiny_config(family, b, dtype), case, group) for b in BACKENDS}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_backends_agree(outs: dict[str, dict], dtype: str, what: str) -> None:
    ref = outs["sdpa"]
    for backend in ("eager", "fused_softmax"):
        got = outs[backend]
        assert got["grads"].keys() == ref["grads"].keys()
        pairs = [("logits", got["logits"], ref["logits"])]
        pairs += [(f"grad {n}", got["grads"][n], g) for n, g in ref["grads"].items()]
        for name, a, b in pairs:
            msg = f"{what} {dtype}: {backend} vs sdpa, {name}"
            assert a.shape == b.shape, msg
            if dtype == "float32":
                np.testing.assert_allclose(a, b, **FP32_TOL, err_msg=msg)
            else:
                assert rel_l2(a, b) < BF16_REL_L2, f"{msg}: relative L2 error {rel_l2(a, b):.3g}"


@pytest.fixture(scope="module", autouse=True)
def compiled_softmax() -> None:
    assert load_cpu_extension() is not None, "the CPU extension must build (see the megatron_ki log)"
    assert select_backend("scaled_masked_softmax", torch.zeros(1))[1] is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("family", "case"), CASES)
def test_backends_agree_single_process(family: str, case: str, dtype: str) -> None:
    outs = run_all_backends(family, case, dtype)
    cfg = tiny_config(family)
    assert outs["fused_softmax"]["calls"] == expected_kernel_calls(cfg, case)
    assert outs["sdpa"]["calls"] == [] and outs["eager"]["calls"] == []
    assert {o["dtype"] for o in outs.values()} == {f"torch.{dtype}"}
    assert_backends_agree(outs, dtype, f"{family}/{case}")


def test_tolerance_detects_a_wrong_mask() -> None:
    """The comparison can fail: a fused model that ignores the padding is far outside the tolerance."""
    cfg = tiny_config("bert", "fused_softmax")
    right = forward_backward(cfg, "padded")
    model = build_model(cfg, seed=11)
    batch = make_batch(cfg, "padded")
    batch.pop("labels")
    batch.pop("attention_mask")
    with torch.no_grad():
        wrong = model(**batch)[..., : cfg.vocab_size].numpy()
    assert np.abs(wrong[1:] - right["logits"][1:]).max() > 100 * FP32_TOL["atol"]
    np.testing.assert_allclose(wrong[0], right["logits"][0], **FP32_TOL)  # the unpadded row is unchanged


# ------------------------------------------------------------------------------------------- tp = 2
def _tp_worker(rank: int, world_size: int) -> dict:
    assert load_cpu_extension() is not None, f"rank {rank}: the CPU extension did not load"
    group = dist.group.WORLD
    out = {}
    for family, case in CASES:
        out[(family, case, "float32")] = run_all_backends(family, case, "float32", group)
    for family in ("gpt2", "roberta"):  # bf16 under TP: one causal, one bidirectional padded family
        case = "causal" if family == "gpt2" else "padded"
        out[(family, case, "bfloat16")] = run_all_backends(family, case, "bfloat16", group)
    return out


@pytest.mark.distributed
def test_backends_agree_tp2() -> None:
    results = run_distributed(_tp_worker, world_size=2)
    assert len(results[0]) == len(CASES) + 2
    for (family, case, dtype), outs0 in results[0].items():
        cfg = tiny_config(family)
        assert cfg.padded_vocab_size(1) == cfg.padded_vocab_size(2)  # same shapes as the tp=1 model
        for rank, res in enumerate(results):
            outs = res[(family, case, dtype)]
            assert outs["fused_softmax"]["calls"] == expected_kernel_calls(cfg, case)
            assert_backends_agree(outs, dtype, f"{family}/{case} rank {rank}")
        if dtype != "float32":
            continue
        # the tp=2 fused model equals the single-process sdpa model: logits and unsharded gradients
        ref = forward_backward(tiny_config(family, "sdpa"), case)
        info = outs0["fused_softmax"]["info"]
        assert len(info) >= 5, f"{family}: expected sharded parameters"
        for rank, res in enumerate(results):
            np.testing.assert_allclose(
                res[(family, case, dtype)]["fused_softmax"]["logits"],
                ref["logits"],
                **FP32_TOL,
                err_msg=f"{family}/{case} tp=2 rank {rank} logits",
            )
        for name, ref_grad in ref["grads"].items():
            shards = [r[(family, case, dtype)]["fused_softmax"]["grads"][name] for r in results]
            if name in info:
                dim, sizes = info[name]
                got = unshard_rows([torch.from_numpy(s) for s in shards], sizes, dim=dim).numpy()
            else:
                got = shards[0]
            np.testing.assert_allclose(got, ref_grad, **FP32_TOL, err_msg=f"{family}/{case} tp=2 grad {name}")


def test_core_attention_edge_cases() -> None:
    """Causal attention with fewer queries than keys (aligned to the last key) and a query row that may
    attend to nothing (an all-padding sample): the three backends agree, forward and backward, and the
    query with no visible key gets a zero output, not NaN and not a uniform average."""
    g = torch.Generator().manual_seed(5)
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[1, 6:] = False
    keep[2, :] = False  # all padding
    for causal, sq, mask in ((True, 4, None), (True, 8, keep), (False, 8, keep), (True, 4, keep)):
        q0 = torch.randn(3, 4, sq, 16, generator=g)
        k0, v0 = torch.randn(3, 2, 8, 16, generator=g), torch.randn(3, 2, 8, 16, generator=g)  # GQA
        grad_out = torch.randn(3, 4, sq, 16, generator=g)
        # explicit reference: the last query sees every key, masks combined, empty rows -> 0
        allowed = (
            torch.ones(sq, 8, dtype=torch.bool).tril(8 - sq) if causal else torch.ones(sq, 8, dtype=bool)
        )
        allowed = allowed[None, None] & (mask[:, None, None, :] if mask is not None else True)
        s = q0 @ k0.repeat_interleave(2, 1).transpose(-1, -2) * 0.25
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        ref = p @ v0.repeat_interleave(2, 1)
        outs = {}
        with KernelCalls() as calls:
            for backend in BACKENDS:
                q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
                out = core_attention(
                    q, k, v, causal=causal, padding_mask=mask, dropout_p=0.0, backend=backend, scale=0.25
                )
                out.backward(grad_out)
                outs[backend] = (out.detach(), q.grad, k.grad, v.grad)
        assert calls.flags == [False]  # sq != sk or padding: the general masked kernel
        what = f"causal={causal} sq={sq} padded={mask is not None}"
        for backend, (out, *grads) in outs.items():
            torch.testing.assert_close(out, ref, **FP32_TOL, msg=f"{what} {backend}")
            if mask is not None:
                assert (out[2] == 0).all(), f"{what} {backend}: all-padding sample must give zeros"
            for got, want in zip(grads, outs["sdpa"][1:]):
                assert torch.isfinite(got).all(), f"{what} {backend}"
                torch.testing.assert_close(got, want, **FP32_TOL, msg=f"{what} {backend} grad")
