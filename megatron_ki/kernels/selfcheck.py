"""A compiled op is checked once against the PyTorch reference before it is first used.

A kernel built on the machine it runs on (another compiler, another CPU's SIMD, another GPU) has never run
there before: a wrong result would train silently. :func:`verified` runs each op family of an extension once
per process and device type on a small random case, forward and backward, with masked rows and extreme
logits, and compares with ``reference.py``:

- ``kl`` (``kl_forward_stats`` + ``kl_backward``, forward and reverse modes): rows with logits of +-1e4,
  ``-inf`` entries in both distributions, an all ``-inf`` (masked) row, a row with zero upstream gradient;
- ``softmax`` (``softmax_forward`` + ``softmax_backward``, masked and causal): +-1e4 scores, a bool mask with
  a fully masked row.

The reference is evaluated in fp64 on the same fp32 inputs. An op whose result differs by more than
``|got - want| <= ATOL + RTOL * |want|`` (non-finite entries must match exactly) is not used: the dispatch
(``build.select_backend``) falls back to the reference, with one warning line naming the op, the path and
the largest error. An op that raises is treated the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

import torch

from .reference import (
    kl_backward_reference,
    kl_forward_stats_reference,
    scaled_masked_softmax_reference,
    scaled_upper_triang_masked_softmax_reference,
)

logger = logging.getLogger("megatron_ki")

RTOL = 1e-4
ATOL = 1e-4
"""The stated tolerance of the start-up check (fp32 kernels against the fp64 reference)."""

OP_FAMILY = {
    "kl_forward_stats": "kl",
    "kl_backward": "kl",
    "fused_kl_div": "kl",
    "scaled_masked_softmax": "softmax",
    "scaled_upper_triang_masked_softmax": "softmax",
}

_results: dict[tuple[int, str, str], str | None] = {}
"""(id of the extension, family, device type) -> None (agrees) or the reason it does not."""


def _error(got: torch.Tensor, want: torch.Tensor, what: str) -> str | None:
    """None if ``got`` matches ``want`` within the tolerance, else a short description of the worst entry."""
    got, want = got.double().cpu(), want.double().cpu()
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite) or not torch.equal(got[~finite], want[~finite]):
        return f"{what}: non-finite entries differ from the reference's"
    if not finite.any():
        return None
    excess = (got - want).abs() - (ATOL + RTOL * want.abs())
    excess = torch.where(finite, excess, torch.full_like(excess, -1.0))
    worst = int(excess.argmax())
    if excess.view(-1)[worst] <= 0:
        return None
    g, w = got.view(-1)[worst].item(), want.view(-1)[worst].item()
    return f"{what}: {g:.6g} where the reference gives {w:.6g}"


def _kl_case(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    s = torch.randn(6, 37, generator=gen) * 3
    t = torch.randn(6, 37, generator=gen) * 3
    s[1, ::3], t[1, 1::4] = 1e4, -1e4  # extreme logits
    s[2, ::2] = -1e4
    s[3, :7], t[3, :7] = float("-inf"), float("-inf")  # -inf entries where both have no mass
    s[4], t[4] = float("-inf"), float("-inf")  # a masked (all -inf) row
    return s.to(device), t.to(device)


def check_kl(ext: ModuleType, device: torch.device) -> str | None:
    """Why ``ext``'s KL ops disagree with the reference on ``device`` (None: they agree)."""
    s, t = _kl_case(device)
    tau = 2.0
    got = ext.kl_forward_stats(s, t, tau)
    want = kl_forward_stats_reference(s.double(), t.double(), tau)
    err = _error(got, want, "kl_forward_stats")
    if err:
        return err
    m_s, z_s, m_t, z_t = want[:, 0], want[:, 1], want[:, 2], want[:, 3]
    lse_s, lse_t = m_s + z_s.log(), m_t + z_t.log()
    reverse = want[:, 5] / z_s - lse_s + lse_t
    grad_rows = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64, device=device)
    reverse = torch.where(grad_rows != 0, reverse, torch.zeros_like(reverse))
    for mode, code in (("forward_kl", 0), ("reverse_kl", 1)):
        got = ext.kl_backward(
            s, t, tau, lse_s.float(), lse_t.float(), reverse.float(), grad_rows.float(), code
        )
        want_g = kl_backward_reference(s.double(), t.double(), tau, lse_s, lse_t, reverse, grad_rows, mode)
        err = _error(got, want_g, f"kl_backward ({mode})")
        if err:
            return err
    return None


def check_softmax(ext: ModuleType, device: torch.device) -> str | None:
    """Why ``ext``'s softmax ops disagree with the reference on ``device`` (None: they agree)."""
    gen = torch.Generator().manual_seed(4321)
    x = torch.randn(2, 2, 5, 7, generator=gen) * 4
    x[0, 0, 1, ::2] = 1e4
    x[1, 1, 2, 1::3] = -1e4
    mask = torch.rand(2, 1, 5, 7, generator=gen) < 0.3
    mask[0, 0, 3] = True  # a fully masked row: all 0
    grad = torch.randn(2, 2, 5, 7, generator=gen)
    x, mask, grad = x.to(device), mask.to(device), grad.to(device)
    scale = 0.5
    for causal in (False, True):
        xs = x[..., :5].contiguous() if causal else x
        m = None if causal else mask
        g = grad[..., :5].contiguous() if causal else grad
        want_in = xs.double().requires_grad_(True)
        if causal:
            want = scaled_upper_triang_masked_softmax_reference(want_in, scale)
        else:
            want = scaled_masked_softmax_reference(want_in, m, scale)
        (want_grad,) = torch.autograd.grad(want, want_in, g.double())
        name = "scaled_upper_triang_masked_softmax" if causal else "scaled_masked_softmax"
        probs = ext.softmax_forward(xs, m, scale, causal)
        err = _error(probs, want, f"{name} forward") or _error(
            ext.softmax_backward(g, probs, scale), want_grad, f"{name} backward"
        )
        if err:
            return err
    return None


CHECKS: dict[str, Callable[[ModuleType, torch.device], str | None]] = {
    "kl": check_kl,
    "softmax": check_softmax,
}


def verified(ext: ModuleType, op: str, device: torch.device, path: str) -> bool:
    """Whether ``ext`` may run ``op`` on ``device``: its family passed the start-up check (run here once per
    process, extension and device type; a failure logs one warning line)."""
    family = OP_FAMILY.get(op)
    if family is None:
        return True
    key = (id(ext), family, device.type)
    if key not in _results:
        try:  # the first use may come under no_grad (evaluation): the reference's backward needs autograd
            with torch.inference_mode(False), torch.enable_grad():
                _results[key] = CHECKS[family](ext, device)
        except Exception as e:  # an op that raises on a valid input is as unusable as a wrong one
            _results[key] = f"raised {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if _results[key] is not None:
            logger.warning(
                "megatron_ki kernels: the %s %s ops disagree with the PyTorch reference at start-up (%s; "
                "tolerance %g + %g x |reference|): using the PyTorch reference",
                path,
                family,
                _results[key],
                ATOL,
                RTOL,
            )
    return _results[key] is None
