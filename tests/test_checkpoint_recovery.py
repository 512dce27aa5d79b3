"""Resume from the newest *complete* checkpoint, refuse a missing one, and fail a save cleanly.

Three launches through the real ``deepspeed`` launcher (2 ranks, ZeRO-1, tiny GPT-2, ~15 s each):

- ``requeue``: ``checkpoint.load`` = ``checkpoint.save`` = a directory that does not exist yet, with
  ``checkpoint.load_if_exists``: it starts from scratch (one log line) and saves steps 1 and 2;
- ``fallback``: a copy of that directory whose step 2 has a truncated file that only rank 1 checks: every rank
  resumes from step 1 and step 2 is trained (bitwise as the first run did) and saved again;
- ``all_broken``: every tag incomplete: one error line for the job naming the directory and the newest file.

The rest is in-process on copies of the first launch's checkpoint (the cheap checks of each kind of damaged
file, ``latest`` pointing at a missing tag or behind a newer one, a missing or empty directory) or without
DeepSpeed at all (a save that fails on a full disk, a DeepSpeed load error, a truncated teacher).
"""

from __future__ import annotations

import errno
import os
import shutil
import types
from pathlib import Path

import pytest
import torch

from megatron_ki.checkpoint_format import CheckpointError, read_meta
from megatron_ki.config import load_config
from megatron_ki.convert.reshard import load_full_state
from megatron_ki.parallel import Topology
from megatron_ki.training import checkpoint as ckpt
from tests.training_utils import (
    CONFIGS,
    LaunchQueue,
    RunResult,
    build_corpus,
    launch,
    quiet_args,
    write_teacher,
)

pytestmark = [pytest.mark.distributed]

STEP1, STEP2, STEP3 = (ckpt.tag_for(s) for s in (1, 2, 3))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def run_args(ws: dict, name: str, steps: int, *extra: str) -> list[str]:
    run_dir = ws["root"] / "runs" / name
    return [
        "--config", str(CONFIGS / "tiny_gpt2.yaml"),
        "--train.train_steps", str(steps),
        "--train.micro_batch_size", "2",
        "--train.global_batch_size", "4",
        "--train.zero_stage", "1",
        "--optim.lr_decay_style", "constant",
        "--optim.lr_warmup_fraction", "0",
        *ws["corpus"].data_args(run_dir / "index-cache"),
        *quiet_args(run_dir),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    pool = LaunchQueue(workers=2)
    state = {"root": root, "corpus": build_corpus(root / "corpus"), "pool": pool, "runs": {}}
    yield state
    pool.close()


def _submit(ws: dict, name: str, args: list[str]):
    if name not in ws["runs"]:
        ws["runs"][name] = ws["pool"].submit(lambda: launch(2, args, ws["root"] / "runs" / name))
    return ws["runs"][name]


def requeue_ckpt(ws: dict) -> tuple[RunResult, Path]:
    """The first launch (saving steps 1 and 2 into a directory that did not exist), and that directory.
    Queues the two launches that start from copies of it, so that they run side by side."""
    ckpt_dir = ws["root"] / "ckpt_requeue"
    both = ("--checkpoint.load", str(ckpt_dir), "--checkpoint.save", str(ckpt_dir))
    extra = (*both, "--checkpoint.load_if_exists", "true", "--checkpoint.save_interval", "1")
    result = _submit(
        ws, "requeue", run_args(ws, "requeue", 2, *extra, "--checkpoint.keep_last", "3")
    ).result()
    assert result.returncode == 0, result.tail()
    if "fallback" not in ws["runs"]:
        # step 2 of a copy loses the second half of rank 0's RNG file, which rank 1 checks (the ranks split the
        # files): rank 0 alone would take step 2.
        fallback = ws["root"] / "ckpt_fallback"
        shutil.copytree(ckpt_dir, fallback)
        truncate(fallback / STEP2 / "rng" / "rank00000.pt")
        load = ("--checkpoint.load", str(fallback), "--checkpoint.save", str(fallback))
        _submit(ws, "fallback", run_args(ws, "fallback", 3, *load, "--checkpoint.save_interval", "1"))
        broken = ws["root"] / "ckpt_all_broken"
        shutil.copytree(ckpt_dir, broken)
        truncate(broken / STEP2 / "mp_rank_00_model_states.pt")
        truncate(broken / STEP1 / "meta.json")
        _submit(ws, "all_broken", run_args(ws, "all_broken", 3, "--checkpoint.load", str(broken)))
    return result, ckpt_dir


def copy_of(ws: dict, name: str) -> Path:
    _, src = requeue_ckpt(ws)
    dst = ws["root"] / "copies" / name
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ launches
def test_missing_load_dir_with_load_if_exists_starts_from_scratch(ws):
    result, ckpt_dir = requeue_ckpt(ws)
    assert result.output.count("starting from scratch (load_if_exists)") == 1, result.tail()
    assert f"checkpoint.load {ckpt_dir} does not exist" in result.output
    assert result.steps() == [1, 2]
    assert ckpt.read_latest(ckpt_dir) == STEP2 and ckpt.published_tags(ckpt_dir) == [STEP1, STEP2]
    names = {p.name for p in (ckpt_dir / STEP2).iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names


def test_incomplete_newest_tag_falls_back_on_every_rank(ws):
    first, _ = requeue_ckpt(ws)
    fallback = ws["root"] / "ckpt_fallback"
    result = ws["runs"]["fallback"].result()
    assert result.returncode == 0, result.tail()
    bad = fallback / STEP2 / "rng" / "rank00000.pt"
    assert f"checkpoint.load: skipping {fallback / STEP2}: {bad} is truncated or corrupt" in result.output
    assert (
        f"checkpoint.load: resuming from {fallback / STEP1}, the newest complete checkpoint" in result.output
    )
    assert result.output.count("checkpoint.load: skipping") == 1, "logged on rank 0 only"
    assert result.steps() == [2, 3]
    assert result.losses()[0] == first.losses()[1]  # step 2 again, from step 1's state: bitwise the same
    # the corrupt step 2 was saved over, and step 3 is published
    assert ckpt.read_latest(fallback) == STEP3
    assert ckpt.tag_problems(fallback, STEP2) == []


def test_no_complete_tag_is_one_error_for_the_job(ws):
    requeue_ckpt(ws)
    broken = ws["root"] / "ckpt_all_broken"
    result = ws["runs"]["all_broken"].result()
    assert result.returncode != 0
    lines = [line for line in result.output.splitlines() if "error:" in line]
    # Every rank reached the same verdict (collective): only rank 0 prints it.
    assert len(lines) == 1, result.tail()
    assert lines[0].startswith(f"pretrain_ki.py: error: checkpoint.load {broken}: no complete checkpoint")
    assert f"{broken / STEP2 / 'mp_rank_00_model_states.pt'} is truncated or corrupt" in lines[0]
    assert "1 older tag(s) are incomplete too" in lines[0]
    assert "Traceback" not in result.output


# -------------------------------------------------------------------------------- checks, in-process
def _meta_json(d: Path) -> Path:
    return d / STEP2 / "meta.json"


DAMAGE = {
    "truncated_meta": (lambda d: truncate(_meta_json(d)), "meta.json: not valid JSON"),
    "meta_without_layout": (
        lambda d: _meta_json(d).write_text('{"format_version": 1}'),
        "no 'layout' object",
    ),
    "truncated_model_states": (
        lambda d: truncate(d / STEP2 / "mp_rank_00_model_states.pt"),
        "mp_rank_00_model_states.pt is truncated or corrupt (not a readable zip archive",
    ),
    "missing_optim_states": (
        lambda d: (d / STEP2 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
        "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing",
    ),
    "truncated_optim_states": (
        lambda d: truncate(d / STEP2 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        "zero_pp_rank_0_mp_rank_00_optim_states.pt is truncated or corrupt",
    ),
    "truncated_rng": (lambda d: truncate(d / STEP2 / "rng" / "rank00001.pt"), "rank00001.pt is truncated"),
    "empty_rng": (lambda d: os.truncate(d / STEP2 / "rng" / "rank00001.pt", 0), "rank00001.pt is empty"),
    "missing_rng": (lambda d: (d / STEP2 / "rng" / "rank00000.pt").unlink(), "rank00000.pt is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_tag_is_skipped_naming_the_file(ws, damage):
    d = copy_of(ws, damage)
    spoil, reason = DAMAGE[damage]
    spoil(d)
    tag, meta, skipped = ckpt.find_resume_tag(d)
    assert (tag, meta["step"]) == (STEP1, 1)
    assert [s[0] for s in skipped] == [STEP2]
    assert any(reason in p and str(d / STEP2) in p for p in skipped[0][1]), skipped
    # the files are split over the ranks (meta.json is read by each): together the shares find exactly what
    # one rank finds alone
    shares = {p for r in range(3) for p in ckpt.tag_problems(d, STEP2, r, 3)}
    assert shares == set(ckpt.tag_problems(d, STEP2))


def test_latest_and_tags(ws):
    d = copy_of(ws, "latest_behind")
    (d / "latest").write_text(STEP1)  # a save published step 2 but died before rewriting `latest`
    assert ckpt.find_resume_tag(d)[:1] == (STEP2,)
    shutil.rmtree(d / STEP2)
    (d / "latest").write_text(STEP2)  # `latest` names a tag that is gone: the older one loads
    tag, _, skipped = ckpt.find_resume_tag(d)
    assert tag == STEP1 and skipped == [(STEP2, [f"{d / STEP2} (named by 'latest') does not exist"])]
    truncate(d / STEP1 / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as err:
        ckpt.find_resume_tag(d)
    message = str(err.value)
    assert message.startswith(f"checkpoint.load {d}: no complete checkpoint to resume from: {d / STEP2}")
    assert "1 older tag(s) are incomplete too" in message and "\n" not in message
    (d / "latest").unlink()
    shutil.rmtree(d / STEP1)
    (d / f"{STEP1}.tmp").mkdir()  # only an interrupted first save: no checkpoint
    assert ckpt.find_resume_tag(d) is None


def _cfg(*overrides: str):
    return load_config(CONFIGS / "tiny_gpt2.yaml", list(overrides))


def _groups(world: int = 1, rank: int = 0):
    return types.SimpleNamespace(rank=rank, topology=Topology.from_world(world, 1, 1))


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_load_dir(tmp_path, kind, caplog):
    d = tmp_path / "ckpt"
    if kind == "empty":
        d.mkdir()
        (d / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(None, _cfg("--checkpoint.load", str(d)), _groups())
    what = "does not exist" if kind == "missing" else "holds no checkpoint (no 'latest' file, no tag)"
    assert str(err.value).startswith(f"checkpoint.load {d}: {what}; expected a directory written by")
    assert "checkpoint.load_if_exists true" in str(err.value)
    caplog.set_level("INFO", logger="megatron_ki")
    cfg = _cfg("--checkpoint.load", str(d), "--checkpoint.load_if_exists", "true")
    assert ckpt.load_checkpoint(None, cfg, _groups()) is None
    assert f"checkpoint.load {d} {what}: starting from scratch" in caplog.text
    assert not d.exists() or [p.name for p in d.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, expected a checkpoint directory"):
        ckpt.load_checkpoint(None, _cfg("--checkpoint.load", str(tmp_path / "file")), _groups())


def test_deepspeed_load_error_names_the_tag(ws):
    d = copy_of(ws, "deepspeed_error")

    class Engine:
        def load_checkpoint(self, *args, **kwargs):
            raise RuntimeError("PytorchStreamReader failed reading file data/3: invalid header\nsecond line")

    cfg = _cfg("--checkpoint.load", str(d), "--train.zero_stage", "1")
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(Engine(), cfg, _groups(world=2))
    assert str(err.value) == (
        f"checkpoint.load: DeepSpeed could not load {d / STEP2}: PytorchStreamReader failed reading file data/3: "
        "invalid header"
    )


# ------------------------------------------------------------------------------------ failed saves
class FakeEngine:
    """Writes a model-states file like DeepSpeed; then, when asked, a second file onto a full device."""

    def __init__(self):
        self.fail: str | None = None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.zeros(300_000)}}, folder / "mp_rank_00_model_states.pt")  # 1.1 MiB
        if self.fail == "dev_full":  # torch.save onto a full device: "unexpected pos ..." without errno
            os.symlink("/dev/full", folder / "optim_states.pt")
            torch.save({"w": torch.zeros(100_000)}, folder / "optim_states.pt")
        elif self.fail == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "optim_states.pt"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("fail", ["dev_full", "dev_full_little_space", "enospc"])
def test_failed_save_removes_its_tmp_and_keeps_the_published_tag(tmp_path, monkeypatch, fail):
    root = tmp_path / "ckpt"
    cfg = _cfg("--checkpoint.save", str(root))
    engine = FakeEngine()
    ckpt.save_checkpoint(engine, cfg, _groups(), step=1, consumed_samples=4)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    engine.fail = "enospc" if fail == "enospc" else "dev_full"
    if fail == "dev_full_little_space":
        usage = shutil.disk_usage(tmp_path)
        fake = type(usage)(usage.total, usage.total - 2**20, 2**20)  # less than twice the 1.1 MiB written
        monkeypatch.setattr(shutil, "disk_usage", lambda path: fake)
    with pytest.raises(CheckpointError) as err:
        ckpt.save_checkpoint(engine, cfg, _groups(), step=2, consumed_samples=8)
    message = str(err.value)
    assert message.startswith(f"checkpoint.save {root}: could not write {STEP2}: ")
    assert message.endswith(f"; the published {STEP1} is kept") and "\n" not in message
    if fail == "dev_full":
        assert "unexpected pos" in message and "MiB free on its disk" in message
    elif fail == "dev_full_little_space":
        assert "no space left on device (1 MiB free, 1.1 MiB written before the failure)" in message
    else:
        assert f"no space left on device writing {root / (STEP2 + '.tmp') / 'optim_states.pt'} (" in message
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before, "the published checkpoint and `latest` are untouched, the .tmp folder is gone"
    assert not list(root.glob("*.tmp"))


def test_failed_save_other_errors_keep_their_traceback(tmp_path):
    class Buggy(FakeEngine):
        def save_checkpoint(self, *args, **kwargs):
            raise RuntimeError("a bug, not a write error")

    with pytest.raises(RuntimeError, match="a bug"):
        ckpt.save_checkpoint(Buggy(), _cfg("--checkpoint.save", str(tmp_path)), _groups(), 1, 4)


# ----------------------------------------------------------------------------------- teacher files
def test_damaged_teacher_files_name_the_file(tmp_path):
    teacher = write_teacher(tmp_path / "teacher", "tiny_gpt2.yaml")
    states = teacher / "teacher" / "mp_rank_00_model_states.pt"
    truncate(states)
    with pytest.raises(CheckpointError) as err:
        load_full_state(teacher)
    assert str(err.value).startswith(f"{states} is truncated or corrupt (not a readable zip archive")
    states.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint file missing: {states}"):
        load_full_state(teacher)
    meta = teacher / "teacher" / "meta.json"
    truncate(meta)
    with pytest.raises(CheckpointError) as err:
        read_meta(teacher)
    assert str(err.value).startswith(f"{meta}: not valid JSON (")
    with pytest.raises(
        CheckpointError, match=r"--tag step00000009, but .* does not exist \(tags there: teacher\)"
    ):
        read_meta(teacher, "step00000009")
