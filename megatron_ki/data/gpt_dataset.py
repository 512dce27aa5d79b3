"""GPT dataset: documents concatenated into samples of ``seq_length + 1`` tokens across boundaries.

Megatron-LM's scheme: ``doc_idx`` lists the documents of every epoch (shuffled; the last epoch shuffled on
its own when it is used for less than 80% of it), ``sample_idx`` says where each sample starts in that
stream, ``shuffle_idx`` permutes the samples. Sample ``i`` is a pure function of the data, split, sequence
length, sample count and seed, so resuming from a consumed-sample count is exact. The three arrays are cached
on disk (see :mod:`megatron_ki.data.index_cache`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_ki.data.helpers import build_sample_idx
from megatron_ki.data.index_cache import default_cache_dir, describe_dataset, load_or_build
from megatron_ki.data.indexed import IndexedDataset


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give ``num_samples`` samples of ``seq_length + 1`` (one token shared)."""
    if tokens_per_epoch <= 1:
        raise ValueError(f"a dataset needs at least 2 tokens to make samples, got {tokens_per_epoch}")
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            return epochs


def build_gpt_indices(
    sizes: np.ndarray,
    documents: np.ndarray,
    seq_length: int,
    num_samples: int | None,
    seed: int,
    use_cpp: bool | None = None,
) -> dict[str, np.ndarray]:
    """``doc_idx``, ``sample_idx`` and ``shuffle_idx`` as in Megatron-LM (int64 throughout)."""
    documents = np.asarray(documents, dtype=np.int64)
    tokens = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    per_epoch = (tokens - 1) // seq_length
    if num_samples is None:
        num_samples = per_epoch
    epochs = num_epochs_for(tokens, seq_length, num_samples)
    separate_last = False
    if epochs > 1:
        from_earlier = ((epochs - 1) * tokens - 1) // seq_length
        last_epoch_samples = num_samples - from_earlier
        separate_last = last_epoch_samples < int(0.80 * per_epoch)
    rng = np.random.RandomState(seed)
    if separate_last:
        first = np.tile(documents, epochs - 1)
        rng.shuffle(first)
        last = documents.copy()
        rng.shuffle(last)
        doc_idx = np.concatenate([first, last])
    else:
        doc_idx = np.tile(documents, epochs)
        rng.shuffle(doc_idx)
    total_samples = (epochs * tokens - 1) // seq_length
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total_samples, use_cpp=use_cpp)
    if separate_last:
        cut = ((epochs - 1) * tokens - 1) // seq_length
        a = np.arange(cut, dtype=np.int64)
        b = np.arange(cut, total_samples, dtype=np.int64)
        rng.shuffle(a)
        rng.shuffle(b)
        shuffle_idx = np.concatenate([a, b])
    else:
        shuffle_idx = np.arange(total_samples, dtype=np.int64)
        rng.shuffle(shuffle_idx)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


class GPTDataset(torch.utils.data.Dataset):
    """Fixed-length causal-LM samples over the sequences ``documents`` of one indexed dataset.

    ``ds[i]`` is ``{"text": int64[seq_length + 1]}``; inputs are ``text[:-1]`` and labels ``text[1:]``.
    ``len(ds)`` is at least ``num_samples`` (whole epochs are indexed); None means one epoch. With
    ``targets`` (offline teacher targets aligned with the dataset, ``data/teacher_targets.py``) items also
    hold ``t_ids``, ``t_logp`` and ``t_tail`` for the ``seq_length`` input positions.
    """

    targets = None

    def __init__(
        self,
        indexed: IndexedDataset | str,
        documents: np.ndarray | None,
        seq_length: int,
        num_samples: int | None,
        seed: int,
        cache_dir: str | None = "",
        name: str = "train",
        use_cpp: bool | None = None,
    ):
        self.indexed = IndexedDataset(indexed) if isinstance(indexed, str | os.PathLike) else indexed
        if documents is None:
            documents = np.arange(len(self.indexed), dtype=np.int64)
        documents = np.asarray(documents, dtype=np.int64)
        if documents.size == 0:
            raise ValueError(f"{self.indexed.prefix}: the {name} split holds no documents")
        if seq_length <= 0:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.seq_length = seq_length
        self.name = name
        cache_dir = default_cache_dir(cache_dir, self.indexed.prefix)
        description = describe_dataset(
            "GPTDataset", self.indexed, documents, name, seq_length, num_samples, seed
        )
        arrays, self.built_indices = load_or_build(
            cache_dir,
            description,
            ["doc_idx", "sample_idx", "shuffle_idx"],
            lambda: build_gpt_indices(self.indexed.sizes, documents, seq_length, num_samples, seed, use_cpp),
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            arrays["doc_idx"],
            arrays["sample_idx"],
            arrays["shuffle_idx"],
        )

    def __len__(self) -> int:
        return int(self.shuffle_idx.shape[0])

    def sample_tokens(self, j: int) -> np.ndarray:
        """Tokens of unshuffled sample ``j``."""
        f_pos, f_off = (int(x) for x in self.sample_idx[j])
        l_pos, l_off = (int(x) for x in self.sample_idx[j + 1])
        ds = self.indexed
        if f_pos == l_pos:
            return ds.get(int(self.doc_idx[f_pos]), f_off, l_off - f_off + 1).astype(np.int64)
        parts = [ds.get(int(self.doc_idx[f_pos]), f_off)]
        parts += [ds[int(self.doc_idx[p])] for p in range(f_pos + 1, l_pos)]
        parts.append(ds.get(int(self.doc_idx[l_pos]), 0, l_off + 1))
        return np.concatenate(parts).astype(np.int64)

    def sample_positions(self, j: int) -> np.ndarray:
        """Global token indices (into the ``.bin``, in tokens) of unshuffled sample ``j``'s tokens: what
        per-token data aligned with the dataset (offline teacher targets) is looked up by, whatever the
        sequence length, shuffle or data-parallel layout that made the sample."""
        f_pos, f_off = (int(x) for x in self.sample_idx[j])
        l_pos, l_off = (int(x) for x in self.sample_idx[j + 1])
        ds = self.indexed
        starts = ds.pointers // ds.dtype.itemsize

        def span(pos: int, first: int, last: int) -> np.ndarray:
            return np.arange(first, last, dtype=np.int64) + int(starts[int(self.doc_idx[pos])])

        if f_pos == l_pos:
            return span(f_pos, f_off, l_off + 1)
        parts = [span(f_pos, f_off, int(ds.sizes[int(self.doc_idx[f_pos])]))]
        parts += [span(p, 0, int(ds.sizes[int(self.doc_idx[p])])) for p in range(f_pos + 1, l_pos)]
        parts.append(span(l_pos, 0, l_off + 1))
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        j = int(self.shuffle_idx[i])
        item = {"text": self.sample_tokens(j)}
        if self.targets is not None:  # the teacher's targets after each input token (not the last one)
            t_ids, t_logp, t_tail = self.targets.rows(self.sample_positions(j)[:-1])
            item.update(t_ids=t_ids, t_logp=t_logp, t_tail=t_tail)
        return item
