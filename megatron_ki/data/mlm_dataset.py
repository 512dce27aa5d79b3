"""Masked-LM dataset for BERT/RoBERTa: "full-sentences" packing and 80/10/10 masking.

Packing (RoBERTa's FULL-SENTENCES): consecutive sequences are packed whole into blocks of at most
``seq_length - 2`` tokens, crossing document boundaries (documents end with the EOD token written by
``preprocess_data.py --append-eod``); a sequence longer than a block is cut into block-sized pieces. Each
sample is ``[cls] block [sep]`` padded to ``seq_length``.

Masking: ``mask_prob`` of the maskable tokens (never specials or padding) are selected, with fairseq's
randomised rounding of the count; of those 80% become ``mask``, 10% a random non-special token, 10% stay.
With whole-word masking whole words are selected. Everything random is drawn from a generator seeded with
``(seed, epoch, sample index)``, so a sample is identical across runs, ranks and resumptions.

Static masking (``static_mask``, ``data/static_mask.py``): the mask is instead a function of each token's
position in the ``.bin``, the same in every epoch and packing; what offline teacher targets of an MLM teacher
need (items then carry ``t_ids``, ``t_logp``, ``t_tail`` at the predicted positions when ``targets`` is set).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_ki.data.index_cache import default_cache_dir, describe_dataset, load_or_build
from megatron_ki.data.indexed import IndexedDataset
from megatron_ki.data.static_mask import IGNORE_INDEX, StaticMasking
from megatron_ki.data.teacher_targets import token_base


def pack_blocks(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Blocks ``[start, end)`` in the concatenated token stream of ``sizes``, whole sequences where possible."""
    if capacity <= 0:
        raise ValueError(f"block capacity must be positive, got {capacity}")
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    cur_start, cur_len = 0, 0
    for size in np.asarray(sizes, dtype=np.int64).tolist():
        if size == 0:
            continue
        if cur_len and cur_len + size > capacity:
            starts.append(cur_start)
            ends.append(cur_start + cur_len)
            cur_start, cur_len = pos, 0
        if size > capacity:  # cut a long sequence; its tail opens the next block
            n_full = size // capacity
            for k in range(n_full):
                starts.append(pos + k * capacity)
                ends.append(pos + (k + 1) * capacity)
            cur_start, cur_len = pos + n_full * capacity, size - n_full * capacity
        else:
            if cur_len == 0:
                cur_start = pos
            cur_len += size
        pos += size
    if cur_len:
        starts.append(cur_start)
        ends.append(cur_start + cur_len)
    return np.stack([np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)], axis=1).reshape(
        -1, 2
    )


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    maskable: np.ndarray,
    mask_id: int,
    random_ids: np.ndarray,
    mask_prob: float = 0.15,
    random_prob: float = 0.1,
    keep_prob: float = 0.1,
    word_starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(inputs, labels)``; labels hold the original token where selected, else IGNORE_INDEX.

    ``maskable`` marks positions that may be selected; ``word_starts`` (same length) enables whole-word
    masking: a word is a word-start position and the maskable positions that follow it.
    """
    positions = np.flatnonzero(maskable)
    inputs = tokens.copy()
    labels = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    if positions.size == 0:
        return inputs, labels
    if word_starts is not None:
        starts = word_starts[positions].copy()
        starts[0] = True
        starts[1:] |= np.diff(positions) > 1  # a non-maskable token ends a word
        word_id = np.cumsum(starts) - 1
        n_units = int(word_id[-1]) + 1
    else:
        word_id = np.arange(positions.size)
        n_units = positions.size
    n_mask = min(n_units, int(mask_prob * n_units + rng.random()))
    chosen_units = np.zeros(n_units, dtype=bool)
    chosen_units[rng.choice(n_units, n_mask, replace=False)] = True
    selected = positions[chosen_units[word_id]]
    labels[selected] = tokens[selected]
    u = rng.random(selected.size)
    to_mask = selected[u < 1.0 - random_prob - keep_prob]
    to_random = selected[(u >= 1.0 - random_prob - keep_prob) & (u < 1.0 - keep_prob)]
    inputs[to_mask] = mask_id
    if to_random.size:
        inputs[to_random] = rng.choice(random_ids, to_random.size)
    return inputs, labels


def _check_mlm_options(
    tokenizer, seq_length: int, mask_prob: float, random_prob: float, keep_prob: float
) -> None:
    for attr in ("cls", "sep", "pad", "mask"):
        if getattr(tokenizer, attr, None) is None:
            raise ValueError(f"MLMDataset: the tokenizer has no {attr} token (train it with one)")
    if seq_length < 3:
        raise ValueError(f"MLMDataset: seq_length must be >= 3, got {seq_length}")
    if not (0 < mask_prob < 1 and random_prob >= 0 and keep_prob >= 0 and random_prob + keep_prob <= 1):
        raise ValueError("MLMDataset: need 0 < mask_prob < 1 and random_prob + keep_prob <= 1")


def special_mask(tokenizer) -> np.ndarray:
    """``bool [vocab_size]``: the tokenizer's special ids, which are never masked."""
    special = np.zeros(int(tokenizer.vocab_size), dtype=bool)
    special[list(tokenizer.special_ids)] = True
    return special


class MLMDataset(torch.utils.data.Dataset):
    """RoBERTa-style MLM samples over the sequences ``documents`` of one indexed dataset.

    ``ds[i]`` returns ``text`` (masked input ids), ``labels`` (IGNORE_INDEX where not predicted),
    ``loss_mask`` (1.0 where predicted), ``padding_mask`` (1 on real tokens), all of length seq_length.
    ``tokenizer`` supplies ``vocab_size``, ``cls``, ``sep``, ``pad``, ``mask``, ``special_ids`` and, for
    whole-word masking, ``word_start_mask()``.
    """

    targets = None
    """Offline teacher targets of this dataset's ``.bin`` (static masking only)."""

    def __init__(
        self,
        indexed: IndexedDataset | str,
        documents: np.ndarray | None,
        seq_length: int,
        num_samples: int | None,
        seed: int,
        tokenizer,
        mask_prob: float = 0.15,
        random_prob: float = 0.1,
        keep_prob: float = 0.1,
        whole_word_masking: bool = False,
        cache_dir: str | None = "",
        name: str = "train",
        static_mask: StaticMasking | None = None,
    ):
        self.indexed = IndexedDataset(indexed) if isinstance(indexed, str | os.PathLike) else indexed
        if documents is None:
            documents = np.arange(len(self.indexed), dtype=np.int64)
        documents = np.asarray(documents, dtype=np.int64)
        if documents.size == 0:
            raise ValueError(f"{self.indexed.prefix}: the {name} split holds no documents")
        _check_mlm_options(tokenizer, seq_length, mask_prob, random_prob, keep_prob)
        if static_mask is not None and whole_word_masking:
            raise ValueError("MLMDataset: static masking masks tokens, not whole words (whole_word_masking)")
        self.static_mask = static_mask
        self.token_base = token_base(self.indexed)
        self.seq_length, self.seed, self.name = seq_length, seed, name
        self.mask_prob, self.random_prob, self.keep_prob = mask_prob, random_prob, keep_prob
        self.cls, self.sep, self.pad, self.mask_id = (
            tokenizer.cls,
            tokenizer.sep,
            tokenizer.pad,
            tokenizer.mask,
        )
        self.vocab_size = int(tokenizer.vocab_size)
        self.special = special_mask(tokenizer)
        self.random_ids = np.flatnonzero(~self.special)
        self.word_start = np.asarray(tokenizer.word_start_mask(), dtype=bool) if whole_word_masking else None
        self.documents = documents
        sizes = np.asarray(self.indexed.sizes)[documents].astype(np.int64)
        self.stream_starts = np.zeros(documents.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.stream_starts[1:])
        cache_dir = default_cache_dir(cache_dir, self.indexed.prefix)
        description = describe_dataset(
            "MLMDataset", self.indexed, documents, name, seq_length, num_samples, seed
        )

        def build() -> dict[str, np.ndarray]:
            blocks = pack_blocks(sizes, seq_length - 2)
            n = blocks.shape[0]
            epochs = 1 if num_samples is None else max(1, -(-num_samples // n))
            shuffle = np.concatenate(
                [np.random.default_rng([seed, e]).permutation(n) for e in range(epochs)]
            ).astype(np.int64)
            return {"blocks": blocks, "shuffle_idx": shuffle}

        arrays, self.built_indices = load_or_build(cache_dir, description, ["blocks", "shuffle_idx"], build)
        self.blocks, self.shuffle_idx = arrays["blocks"], arrays["shuffle_idx"]
        self.blocks_per_epoch = int(self.blocks.shape[0])

    def __len__(self) -> int:
        return int(self.shuffle_idx.shape[0])

    def _block_pieces(self, b: int) -> list[tuple[int, int, int]]:
        """``(sequence, first, end)`` offsets of the pieces of block ``b`` (it may span sequences)."""
        start, end = (int(x) for x in self.blocks[b])
        k = int(np.searchsorted(self.stream_starts, start, side="right")) - 1
        pieces, pos = [], start
        while pos < end:
            seq_start, seq_end = int(self.stream_starts[k]), int(self.stream_starts[k + 1])
            lo, hi = pos - seq_start, min(end, seq_end) - seq_start
            if hi > lo:
                pieces.append((int(self.documents[k]), lo, hi))
            pos = max(pos, min(end, seq_end))
            k += 1
        return pieces

    def block_tokens(self, b: int) -> np.ndarray:
        """Unmasked tokens of block ``b`` (without cls/sep)."""
        parts = [self.indexed.get(s, lo, hi - lo) for s, lo, hi in self._block_pieces(b)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def block_positions(self, b: int) -> np.ndarray:
        """Global ``.bin`` positions of block ``b``'s tokens (what static masks and offline targets key on)."""
        parts = [
            np.arange(lo, hi, dtype=np.int64) + self.token_base[s] for s, lo, hi in self._block_pieces(b)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        b = int(self.shuffle_idx[i])
        block = self.block_tokens(b)
        n = block.size + 2
        tokens = np.full(self.seq_length, self.pad, dtype=np.int64)
        tokens[0] = self.cls
        tokens[1 : n - 1] = block
        tokens[n - 1] = self.sep
        item: dict[str, np.ndarray] = {}
        if self.static_mask is not None:
            inputs, labels = tokens.copy(), np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
            positions = self.block_positions(b)
            inputs[1 : n - 1], labels[1 : n - 1] = self.static_mask.apply(
                block, positions, self.special, self.mask_id, self.random_ids
            )
            if self.targets is not None:
                item.update(self._targets_at(labels, positions))
        else:
            inputs, labels = self._dynamic_mask(tokens, n, i)
        padding_mask = np.zeros(self.seq_length, dtype=np.int64)
        padding_mask[:n] = 1
        item.update(
            text=inputs,
            labels=labels,
            loss_mask=(labels != IGNORE_INDEX).astype(np.float32),
            padding_mask=padding_mask,
        )
        return item

    def _dynamic_mask(self, tokens: np.ndarray, n: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        maskable = np.zeros(self.seq_length, dtype=bool)
        maskable[:n] = ~self.special[tokens[:n]]
        rng = np.random.default_rng([self.seed, i // self.blocks_per_epoch, i])
        starts = self.word_start[tokens] if self.word_start is not None else None
        return mask_tokens(
            tokens,
            rng,
            maskable,
            self.mask_id,
            self.random_ids,
            self.mask_prob,
            self.random_prob,
            self.keep_prob,
            starts,
        )

    def _targets_at(self, labels: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The teacher's rows at the predicted positions (``[seq_length, K]``; zeros, tail -inf elsewhere)."""
        k = self.targets.k
        t_ids = np.zeros((self.seq_length, k), np.int64)
        t_logp = np.zeros((self.seq_length, k), np.float32)
        t_tail = np.full(self.seq_length, -np.inf, np.float32)
        at = np.flatnonzero(labels != IGNORE_INDEX)
        if at.size:
            t_ids[at], t_logp[at], t_tail[at] = self.targets.rows(positions[at - 1])
        return {"t_ids": t_ids, "t_logp": t_logp, "t_tail": t_tail}
