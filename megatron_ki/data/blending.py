"""Blending several datasets by weight, train/valid/test splits, and the data-parallel batch sampler.

``data.data_path: [0.3, prefixA, 0.7, prefixB]`` (Megatron's form; weights normalised) and ``data.split:
969,30,1`` (proportions of each dataset's documents), both read by :func:`megatron_ki.config.parse_data_path`
and :func:`~megatron_ki.config.parse_split`, give three blended datasets. The sampler hands each data-parallel
rank its own slice of every global micro-batch and resumes from a consumed-sample count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from megatron_ki.config import parse_data_path, parse_split
from megatron_ki.data.gpt_dataset import GPTDataset
from megatron_ki.data.helpers import build_blending_indices
from megatron_ki.data.indexed import IndexedDataset
from megatron_ki.data.mlm_dataset import MLMDataset
from megatron_ki.data.static_mask import StaticMasking

SPLIT_NAMES = ("train", "valid", "test")


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Megatron's split of ``num_documents`` into train/valid/test ``[start, end)`` ranges."""
    bounds = [0]
    for fraction in parse_split(split):
        bounds.append(bounds[-1] + round(fraction * num_documents))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (deterministic greedy order)."""

    def __init__(self, datasets: list, weights: list[float], size: int, use_cpp: bool | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset: need as many weights as datasets, at least one")
        self.datasets = datasets
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(
            self.weights, self.size, use_cpp
        )
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, ds in enumerate(datasets):
            if counts[d] > len(ds):
                raise ValueError(
                    f"BlendedDataset: dataset {d} is asked for {counts[d]} samples but holds {len(ds)}"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d = int(self.dataset_index[i])
        sample = dict(self.datasets[d][int(self.dataset_sample_index[i])])
        sample["dataset_id"] = np.int64(d)
        return sample


def build_train_valid_test_datasets(
    data_path: list[str] | str,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int | None, int | None, int | None],
    kind: Literal["gpt", "mlm"] = "gpt",
    tokenizer=None,
    cache_dir: str | None = "",
    **mlm_kwargs,
) -> list[torch.utils.data.Dataset | None]:
    """Train/valid/test datasets (None where a split is empty or asks for 0 samples), blended by weight."""
    weights, prefixes = parse_data_path(data_path)
    per_split: list[list] = [[], [], []]
    for prefix, w in zip(prefixes, weights):
        indexed = IndexedDataset(prefix)
        ranges = split_ranges(split, indexed.num_documents)
        for s, (lo, hi) in enumerate(ranges):
            want = num_samples[s]
            if hi <= lo or want == 0:
                per_split[s].append(None)
                continue
            seq_lo, seq_hi = int(indexed.document_indices[lo]), int(indexed.document_indices[hi])
            documents = np.arange(seq_lo, seq_hi, dtype=np.int64)
            n = None if want is None else (want if len(prefixes) == 1 else math.ceil(want * w * 1.005))
            if kind == "gpt":
                ds = GPTDataset(indexed, documents, seq_length, n, seed, cache_dir, SPLIT_NAMES[s])
            elif kind == "mlm":
                if tokenizer is None:
                    raise ValueError("build_train_valid_test_datasets: kind='mlm' needs a tokenizer")
                ds = MLMDataset(
                    indexed,
                    documents,
                    seq_length,
                    n,
                    seed,
                    tokenizer,
                    cache_dir=cache_dir,
                    name=SPLIT_NAMES[s],
                    **mlm_kwargs,
                )
            else:
                raise ValueError(f"kind must be 'gpt' or 'mlm', got {kind!r}")
            per_split[s].append(ds)
    out: list[torch.utils.data.Dataset | None] = []
    for s in range(3):
        parts = per_split[s]
        if all(p is None for p in parts):
            out.append(None)
        elif len(parts) == 1:
            out.append(parts[0])
        else:
            keep = [(p, w) for p, w in zip(parts, weights) if p is not None]
            size = num_samples[s]
            if size is None:
                size = min(int(len(p) / w) for p, w in keep if w > 0)
            out.append(BlendedDataset([p for p, _ in keep], [w for _, w in keep], size))
    return out


class PretrainingSampler(torch.utils.data.Sampler):
    """Batch sampler: rank ``r`` gets indices ``[r*mbs, (r+1)*mbs)`` of each global micro-batch of
    ``mbs * dp`` consecutive samples, starting at ``consumed_samples`` (Megatron's pretraining sampler).

    Use as ``DataLoader(ds, batch_sampler=PretrainingSampler(...))``. Resuming with the consumed count saved
    in a checkpoint continues exactly where the run stopped, on every rank.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        if total_samples <= 0:
            raise ValueError(f"PretrainingSampler: no samples to draw (total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("PretrainingSampler: micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"PretrainingSampler: rank {data_parallel_rank} not in [0, {data_parallel_size})"
            )
        if consumed_samples < 0:
            raise ValueError(f"PretrainingSampler: consumed_samples must be >= 0, got {consumed_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.dp = data_parallel_size
        self.drop_last = drop_last
        self.global_micro = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        remaining = max(0, self.total_samples - self.consumed_samples)
        return remaining // self.global_micro if self.drop_last else -(-remaining // self.global_micro)

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples, self.global_micro):
            batch = list(range(start, min(start + self.global_micro, self.total_samples)))
            if len(batch) == self.global_micro:
                yield batch[lo:hi]
            elif not self.drop_last:
                # the last partial global batch is spread over ranks as evenly as possible
                mine = batch[self.rank :: self.dp]
                if mine:
                    yield mine


def build_datasets_from_config(
    data_cfg,
    num_samples: tuple[int | None, int | None, int | None],
    kind: Literal["gpt", "mlm"] = "gpt",
    tokenizer=None,
) -> list[torch.utils.data.Dataset | None]:
    """Train/valid/test datasets from a :class:`megatron_ki.config.DataConfig` (``cache_dir=None``: beside data)."""
    extra = {}
    if kind == "mlm":
        extra = {"mask_prob": data_cfg.mask_prob, "whole_word_masking": data_cfg.whole_word_masking}
        if data_cfg.mask_seed is not None:
            extra["static_mask"] = StaticMasking(data_cfg.mask_seed, data_cfg.mask_prob)
    return build_train_valid_test_datasets(
        data_cfg.data_path,
        data_cfg.split,
        data_cfg.seq_length,
        data_cfg.seed,
        num_samples,
        kind=kind,
        tokenizer=tokenizer,
        cache_dir="" if data_cfg.cache_dir is None else data_cfg.cache_dir,
        **extra,
    )
