"""Static MLM masks keyed by each token's position in the dataset's ``.bin`` (BERT-style static masking).

RoBERTa draws a new mask for every sample (``mlm_dataset.mask_tokens``); that mask cannot be known before
training, so a teacher run once over the data (offline targets, ``tools/precompute_teacher.py``) cannot see
the input the student will see. Static masking makes the mask a function of the token's global position
``p`` (token ``o`` of sequence ``s`` is ``pointers[s] // itemsize + o``), the token itself and a seed:

- ``p`` is selected when its token may be masked (not a special token) and ``u(seed, p, 0) < mask_prob``
  (an independent draw per token: the share of selected tokens is ``mask_prob`` in expectation, not per
  sample as with dynamic masking);
- a selected token becomes ``mask`` when ``u(seed, p, 1) < 1 - random_prob - keep_prob``, a random
  non-special token ``random_ids[floor(u(seed, p, 2) * len(random_ids))]`` when below ``1 - keep_prob``, else
  stays;

where ``u`` is a counter-based hash (splitmix64's finaliser) mapped to ``[0, 1)``. Every sequence length,
packing, shuffle, epoch, data-parallel layout and process sees the same mask for the same token, and the
precompute sees it too. The cost: every epoch repeats the same masks (BERT copied its data 10 times with
different masks for that reason; a second seed gives a second set).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SCHEME = "position-hash-v1"
"""Name of the rule above, recorded in offline targets' headers: a reader knowing another rule refuses them."""
IGNORE_INDEX = -100
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64, wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, positions: np.ndarray, stream: int) -> np.ndarray:
    """``u(seed, p, stream)`` in ``[0, 1)`` (float64, 53 bits) for every position of ``positions``."""
    with np.errstate(over="ignore"):
        key = _mix(np.asarray([seed & (2**64 - 1)], dtype=np.uint64) + _GOLDEN)[0]
        x = np.asarray(positions, dtype=np.int64).astype(np.uint64) * np.uint64(4) + np.uint64(stream)
        bits = _mix(x ^ key) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class StaticMasking:
    """The static mask of one seed and 80/10/10 split; ``special`` marks ids that are never masked."""

    seed: int
    mask_prob: float = 0.15
    random_prob: float = 0.1
    keep_prob: float = 0.1

    def selected(self, tokens: np.ndarray, positions: np.ndarray, special: np.ndarray) -> np.ndarray:
        """Which tokens (at these global positions) are predicted."""
        return ~special[tokens] & (uniform(self.seed, positions, 0) < self.mask_prob)

    def apply(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        special: np.ndarray,
        mask_id: int,
        random_ids: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, labels)`` of ``tokens`` at ``positions``: labels hold the token where selected, else
        IGNORE_INDEX; inputs have the selected tokens replaced as the module docstring says."""
        tokens = np.asarray(tokens, dtype=np.int64)
        chosen = self.selected(tokens, positions, special)
        labels = np.where(chosen, tokens, IGNORE_INDEX)
        inputs = tokens.copy()
        where = np.flatnonzero(chosen)
        if where.size:
            pos = np.asarray(positions)[where]
            u = uniform(self.seed, pos, 1)
            to_mask = u < 1.0 - self.random_prob - self.keep_prob
            to_random = ~to_mask & (u < 1.0 - self.keep_prob)
            inputs[where[to_mask]] = mask_id
            pick = np.minimum((uniform(self.seed, pos[to_random], 2) * len(random_ids)).astype(np.int64),
                              len(random_ids) - 1)  # fmt: skip
            inputs[where[to_random]] = np.asarray(random_ids, dtype=np.int64)[pick]
        return inputs, labels

    def describe(self, special: np.ndarray) -> dict[str, Any]:
        """What offline targets record of the mask, so a student masking otherwise is refused."""
        ids = np.flatnonzero(special).tolist()
        return {
            "scheme": SCHEME,
            **asdict(self),
            "special_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
            "num_special_ids": len(ids),
        }


def iter_masked_positions(
    dataset: Any, masking: StaticMasking, special: np.ndarray, block_tokens: int = 1 << 22
) -> Iterator[np.ndarray]:
    """Sorted global positions of the selected tokens of an indexed ``dataset``, streamed in pieces of about
    ``block_tokens`` tokens (a dataset of any size, bounded memory)."""
    end = int(dataset.num_tokens)
    for lo in range(0, end, block_tokens):
        hi = min(lo + block_tokens, end)
        positions = np.arange(lo, hi, dtype=np.int64)
        chosen = masking.selected(dataset.token_slice(lo, hi).astype(np.int64), positions, special)
        yield positions[chosen]
