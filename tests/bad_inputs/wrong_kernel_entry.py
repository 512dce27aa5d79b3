"""``pretrain_ki.py`` with a deliberately wrong compiled softmax (it ignores the attention mask) injected into
the kernels' dispatch: the start-up check must catch it and the run must train on the PyTorch reference."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pretrain_ki
from megatron_ki.kernels import build

_real = build.load_cpu_extension


@functools.cache  # one module, as the real loader gives: the check runs once per module
def _wrong():
    ext = _real()
    if ext is None:
        return None
    return SimpleNamespace(
        kl_forward_stats=ext.kl_forward_stats,
        kl_backward=ext.kl_backward,
        softmax_forward=lambda x, mask, scale, causal: ext.softmax_forward(x, None, scale, False),
        softmax_backward=ext.softmax_backward,
    )


build.load_cpu_extension = _wrong

if __name__ == "__main__":
    pretrain_ki.exit_now(pretrain_ki.main())
