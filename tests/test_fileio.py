"""megatron_ki/fileio.py: a file appears whole or not at all, and no temporary file is left after a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_ki.fileio import (
    atomic_dir,
    atomic_save,
    atomic_write,
    temp_path_for,
    write_bytes_atomic,
    write_text_atomic,
)


def test_temp_path_is_a_hidden_sibling_of_the_same_kind(tmp_path):
    tmp = temp_path_for(tmp_path / "out.json")
    assert isinstance(tmp, Path) and tmp.parent == tmp_path and tmp.name.startswith(".out.json.tmp-")
    assert isinstance(temp_path_for(str(tmp_path / "out.json")), str)
    assert temp_path_for("out") != temp_path_for("out")
    assert os.path.dirname(temp_path_for("out")) == ""


def test_writes_replace_the_target(tmp_path):
    target = tmp_path / "a.txt"
    assert write_text_atomic(target, "one") == target
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    write_bytes_atomic(str(target), b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(error), atomic_write(target) as f:
        f.write("half")
        raise error
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_named_temp_and_binary_mode(tmp_path):
    target = str(tmp_path / "a.bin")
    with atomic_write(target, "wb", temp=target + ".tmp-1@host") as f:
        assert f.name == target + ".tmp-1@host"
        f.write(b"x")
    assert os.listdir(tmp_path) == ["a.bin"]
    with pytest.raises(ValueError, match="mode 'a'"), atomic_write(target, "a"):
        pass


def test_atomic_save_renames_every_suffix_and_cleans_up_on_failure(tmp_path):
    prefix = str(tmp_path / "sp")

    def save(tmp: str) -> None:
        for ext in (".vocab", ".model"):
            Path(tmp + ext).write_text(ext)

    assert atomic_save(prefix, save, suffixes=(".vocab", ".model")) == prefix
    assert sorted(os.listdir(tmp_path)) == ["sp.model", "sp.vocab"]

    def fail(tmp: str) -> None:
        Path(tmp + ".model").write_text("half")
        raise RuntimeError("spm failed")

    with pytest.raises(RuntimeError):
        atomic_save(prefix, fail, suffixes=(".vocab", ".model"))
    assert sorted(os.listdir(tmp_path)) == ["sp.model", "sp.vocab"]
    assert (tmp_path / "sp.model").read_text() == ".model"


def test_atomic_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "ckpt" / "tag"
    with atomic_dir(final) as folder:
        (folder / "f").write_text("1")
        assert not final.exists()
    assert (final / "f").read_text() == "1"
    with pytest.raises(OSError), atomic_dir(final) as folder:
        (folder / "f").write_text("2")
        raise OSError("disk full")
    assert (final / "f").read_text() == "1" and os.listdir(final.parent) == ["tag"]
