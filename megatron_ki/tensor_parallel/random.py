"""Tensor-parallel RNG: dropout that differs across TP ranks where activations are sharded, and agrees
where they are replicated.

Replicated regions (residual stream, embeddings) use the default generator, seeded identically on every
TP rank. Sharded regions (attention probabilities of this rank's heads) use a second generator seeded
with an offset plus the TP rank, entered with ``tracker.fork()``. Megatron-LM's ``CudaRNGStatesTracker``
has the same shape; here the generators are explicit objects, not process globals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TP_SEED_OFFSET = 2718


class TPRngTracker:
    """Owns the generator of the model-parallel (sharded) region for one device."""

    def __init__(self, seed: int, tp_rank: int, device: torch.device | str = "cpu"):
        self.seed = seed
        self.tp_rank = tp_rank
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + TP_SEED_OFFSET + 100 * tp_rank)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Run the body with the default generator of ``device`` swapped for the sharded-region one."""
        if self.device.type == "cuda":
            saved = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.generator.get_state(), self.device)
            try:
                yield
            finally:
                self.generator.set_state(torch.cuda.get_rng_state(self.device))
                torch.cuda.set_rng_state(saved, self.device)
        else:
            saved = torch.get_rng_state()
            torch.set_rng_state(self.generator.get_state())
            try:
                yield
            finally:
                self.generator.set_state(torch.get_rng_state())
                torch.set_rng_state(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def seed_everything(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed the replicated-region generators (Python, NumPy, torch) identically on every TP rank."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed(seed)
