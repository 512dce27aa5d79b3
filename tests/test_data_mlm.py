"""MLM dataset: full-sentences packing, 80/10/10 masking rates, specials never masked, determinism, WWM."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from megatron_ki.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_ki.data.mlm_dataset import IGNORE_INDEX, MLMDataset, pack_blocks

SEQ = 32
VOCAB = 200
PAD, CLS, SEP, MASK, EOD = 0, 1, 2, 3, 4


@dataclass
class FakeTokenizer:
    vocab_size: int = VOCAB
    pad: int = PAD
    cls: int = CLS
    sep: int = SEP
    mask: int = MASK
    eod: int = EOD

    @property
    def special_ids(self):
        return [PAD, CLS, SEP, MASK, EOD]

    def word_start_mask(self):
        out = np.arange(VOCAB) % 3 == 0  # ids divisible by 3 begin a word
        out[self.special_ids] = True
        return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlm")
    prefix = str(d / "ds")
    rng = np.random.default_rng(11)
    # documents end with EOD, as preprocess_data.py --append-eod writes them
    docs = [[*rng.integers(5, VOCAB, rng.integers(1, 70)).tolist(), EOD] for _ in range(150)]
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for doc in docs:
            b.add_document(doc)
    return prefix, docs


def test_pack_blocks_whole_sequences_and_cover_stream():
    sizes = np.array([3, 4, 10, 2, 0, 25, 1, 1])
    blocks = pack_blocks(sizes, 10)
    assert blocks.tolist() == [[0, 7], [7, 17], [17, 19], [19, 29], [29, 39], [39, 46]]
    for s, e in blocks:
        assert 0 < e - s <= 10
    assert blocks[0, 0] == 0 and blocks[-1, 1] == sizes.sum()
    assert (blocks[1:, 0] == blocks[:-1, 1]).all()


def test_samples_are_packed_blocks(data, tmp_path):
    prefix, docs = data
    ds = MLMDataset(prefix, None, SEQ, None, seed=1, tokenizer=FakeTokenizer(), cache_dir=str(tmp_path))
    stream = np.concatenate(docs)
    seen = 0
    for b in range(ds.blocks_per_epoch):
        s, e = ds.blocks[b]
        np.testing.assert_array_equal(ds.block_tokens(b), stream[s:e])
        seen += e - s
    assert seen == stream.size  # every token once per epoch
    sample = ds[0]
    n = int(sample["padding_mask"].sum())
    block = ds.block_tokens(int(ds.shuffle_idx[0]))
    assert n == block.size + 2
    assert sample["labels"][0] == IGNORE_INDEX and sample["text"][0] == CLS and sample["text"][n - 1] == SEP
    assert (sample["text"][n:] == PAD).all()
    restored = np.where(sample["labels"] != IGNORE_INDEX, sample["labels"], sample["text"])
    np.testing.assert_array_equal(restored[1 : n - 1], block)


def test_masking_rates_and_specials(data, tmp_path):
    prefix, _ = data
    ds = MLMDataset(prefix, None, SEQ, 3000, seed=7, tokenizer=FakeTokenizer(), cache_dir=str(tmp_path))
    maskable = selected = masked = randomised = kept = 0
    for i in range(len(ds)):
        s = ds[i]
        orig = np.where(s["labels"] != IGNORE_INDEX, s["labels"], s["text"])
        sel = s["labels"] != IGNORE_INDEX
        special = np.isin(orig, FakeTokenizer().special_ids) | (s["padding_mask"] == 0)
        assert not (sel & special).any()  # specials and padding are never selected
        assert (s["text"][special] == orig[special]).all()
        np.testing.assert_array_equal(s["loss_mask"], sel.astype(np.float32))
        maskable += int((~special).sum())
        selected += int(sel.sum())
        masked += int((s["text"][sel] == MASK).sum())
        kept += int((s["text"][sel] == orig[sel]).sum())
        randomised += int(((s["text"][sel] != MASK) & (s["text"][sel] != orig[sel])).sum())
        assert not np.isin(s["text"][sel], [PAD, CLS, SEP, EOD]).any()
    assert abs(selected / maskable - 0.15) < 0.01, selected / maskable
    # a random replacement can draw the original token (1/195 of them), which then counts as kept
    assert abs(masked / selected - 0.8) < 0.02 and abs(randomised / selected - 0.1) < 0.015
    assert abs(kept / selected - 0.1) < 0.015


def test_deterministic_across_runs_and_resume(data, tmp_path):
    prefix, _ = data
    a = MLMDataset(prefix, None, SEQ, 400, seed=3, tokenizer=FakeTokenizer(), cache_dir=str(tmp_path / "a"))
    b = MLMDataset(
        IndexedDataset(prefix),
        None,
        SEQ,
        400,
        seed=3,
        tokenizer=FakeTokenizer(),
        cache_dir=str(tmp_path / "b"),
    )
    assert a.built_indices and b.built_indices
    order = list(range(len(a)))
    resumed = {i: b[i] for i in reversed(order[250:])}  # a resumed run reads only the tail, in any order
    for i in order[250:]:
        for k in ("text", "labels", "padding_mask"):
            np.testing.assert_array_equal(a[i][k], resumed[i][k])
    c = MLMDataset(prefix, None, SEQ, 400, seed=4, tokenizer=FakeTokenizer(), cache_dir=str(tmp_path / "a"))
    assert any(not np.array_equal(a[i]["labels"], c[i]["labels"]) for i in range(10))
    # the same block in two epochs gets different masks
    n = a.blocks_per_epoch
    e1 = int(np.flatnonzero(np.asarray(a.shuffle_idx[n:]) == a.shuffle_idx[0])[0]) + n
    assert not np.array_equal(a[0]["labels"], a[e1]["labels"]) or not np.array_equal(
        a[0]["text"], a[e1]["text"]
    )


def test_whole_word_masking(data, tmp_path):
    prefix, _ = data
    tok = FakeTokenizer()
    starts = tok.word_start_mask()
    ds = MLMDataset(
        prefix, None, SEQ, 600, seed=2, tokenizer=tok, whole_word_masking=True, cache_dir=str(tmp_path)
    )
    selected = maskable = 0
    for i in range(len(ds)):
        s = ds[i]
        orig = np.where(s["labels"] != IGNORE_INDEX, s["labels"], s["text"])
        sel = s["labels"] != IGNORE_INDEX
        ok = ~np.isin(orig, tok.special_ids) & (s["padding_mask"] == 1)
        maskable += int(ok.sum())
        selected += int(sel.sum())
        # a continuation piece (not a word start) directly after a maskable token shares its fate
        for p in range(1, SEQ):
            if ok[p] and ok[p - 1] and not starts[orig[p]]:
                assert sel[p] == sel[p - 1], (i, p)
    assert 0.10 < selected / maskable < 0.20


def test_mlm_needs_special_tokens(data):
    prefix, _ = data
    with pytest.raises(ValueError, match="no mask token"):
        MLMDataset(prefix, None, SEQ, None, 0, FakeTokenizer(mask=None), cache_dir=None)


# ------------------------------------------------------------------------------------ static masking
def static_items(prefix: str, seq: int, seed: int, masking, tmp_path) -> dict[int, tuple[int, int]]:
    """``{global position: (input id, label)}`` over every sample of an MLM dataset with a static mask."""
    ds = MLMDataset(
        prefix, None, seq, 300, seed, FakeTokenizer(), cache_dir=str(tmp_path), static_mask=masking
    )
    seen: dict[int, tuple[int, int]] = {}
    for i in range(len(ds)):
        item, b = ds[i], int(ds.shuffle_idx[i])
        positions = ds.block_positions(b)
        n = positions.size
        assert item["text"][0] == CLS and item["text"][n + 1] == SEP and (item["text"][n + 2 :] == PAD).all()
        assert (item["labels"][[0, n + 1]] == IGNORE_INDEX).all()
        ds_tokens = ds.block_tokens(b)
        for p, x, y, t in zip(
            positions.tolist(), item["text"][1 : n + 1], item["labels"][1 : n + 1], ds_tokens
        ):
            assert y in (IGNORE_INDEX, t)
            assert seen.setdefault(p, (int(x), int(y))) == (int(x), int(y))  # the same in every epoch
    return seen


def test_static_masks_follow_the_token_position(data, tmp_path):
    """Two students with other sequence lengths, shuffles and epochs see the same mask on the same token."""
    from megatron_ki.data.static_mask import StaticMasking

    prefix, _ = data
    masking = StaticMasking(seed=5, mask_prob=0.15)
    a = static_items(prefix, SEQ, 1, masking, tmp_path / "a")
    b = static_items(prefix, 53, 9, masking, tmp_path / "b")
    common = sorted(set(a) & set(b))
    assert len(common) > 2000 and all(a[p] == b[p] for p in common)
    other = static_items(prefix, SEQ, 1, StaticMasking(seed=6, mask_prob=0.15), tmp_path / "c")
    assert sum(a[p][1] != other[p][1] for p in common) > 100  # another seed, another mask


def test_static_masking_rates_and_specials():
    from megatron_ki.data.static_mask import StaticMasking

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, 200_000)
    special = np.zeros(VOCAB, dtype=bool)
    special[FakeTokenizer().special_ids] = True
    positions = np.arange(10**9, 10**9 + tokens.size)  # far positions hash as well as near ones
    inputs, labels = StaticMasking(seed=3, mask_prob=0.15).apply(
        tokens, positions, special, MASK, np.flatnonzero(~special)
    )
    chosen = labels != IGNORE_INDEX
    assert not chosen[special[tokens]].any()
    assert abs(chosen.sum() / (~special[tokens]).sum() - 0.15) < 0.005
    masked, kept = inputs[chosen] == MASK, inputs[chosen] == tokens[chosen]
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(kept.mean() - 0.1 - 0.1 / (VOCAB - 5)) < 0.01  # a random draw may hit the token itself
    assert not special[inputs[chosen & (inputs != MASK)]].any()
    assert (inputs[~chosen] == tokens[~chosen]).all()


def test_static_masking_refuses_whole_words(data):
    from megatron_ki.data.static_mask import StaticMasking

    with pytest.raises(ValueError, match="static masking masks tokens, not whole words"):
        MLMDataset(data[0], None, SEQ, 10, 1, FakeTokenizer(), whole_word_masking=True,
                   static_mask=StaticMasking(seed=1))  # fmt: skip
