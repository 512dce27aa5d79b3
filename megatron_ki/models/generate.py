"""Greedy decoding with a framework model: the quick check that an imported or trained checkpoint speaks.

Full recompute each step (no KV cache): meant for checking a model against ``transformers``'
``generate(do_sample=False)`` and for a look at what a checkpoint writes, not for serving. Works at any
tensor-parallel size (the vocab-sharded logits of the last position are gathered); a pipeline-split model is
not a single module, so decode with the tp-only model of the same checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from megatron_ki.tensor_parallel import gather_from_tp_region


@torch.no_grad()
def greedy(
    model: nn.Module,
    ids: torch.Tensor,
    n: int,
    vocab_size: int | None = None,
    tp_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """``ids`` ``[b, s]`` followed by ``n`` greedily chosen tokens: ``[b, s + n]``, as transformers'
    ``generate(do_sample=False, max_new_tokens=n)`` (ties go to the lowest id, as ``argmax`` does there).

    ``vocab_size``: the real vocabulary (default ``model.cfg.vocab_size``); padded columns are never chosen.
    ``tp_group``: the model's tensor-parallel group (every rank gets the same tokens). No stop at an end
    token: compare with transformers' ``generate(..., eos_token_id=None)``.
    """
    if n < 0:
        raise ValueError(f"greedy: n must be >= 0, got {n}")
    if vocab_size is None:
        vocab_size = model.cfg.vocab_size
    was_training = model.training
    model.eval()
    try:
        for _ in range(n):
            last = model(ids)[:, -1]
            token = gather_from_tp_region(last.contiguous(), tp_group)[:, :vocab_size].argmax(-1)
            ids = torch.cat([ids, token[:, None].to(ids.dtype)], dim=1)
    finally:
        model.train(was_training)
    return ids
