"""tools/plot_runs.py: loading runs, steps/FLOPs to target, compute saved, the PNG and the error paths."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("plot_runs", ROOT / "tools" / "plot_runs.py")
plot_runs = importlib.util.module_from_spec(_spec)
sys.modules["plot_runs"] = plot_runs  # dataclasses look their module up while the file executes
_spec.loader.exec_module(plot_runs)

STEPS = list(range(10, 101, 10))
SCRATCH = [9.0, 8.0, 7.0, 6.0, 5.0, 4.5, 4.0, 3.5, 3.2, 3.0]
KI = [8.0, 6.5, 5.0, 4.2, 3.6, 3.0, 2.9, 2.8, 2.7, 2.6]
TOKENS_PER_STEP = 1000


def _write_run(path: Path, losses: list[float], flops_per_token, direct_flops: bool = False) -> Path:
    """A synthetic run: a train record every step, a valid record every 10 steps."""
    path.mkdir(parents=True)
    lines, total = [], 0.0
    for step in range(1, STEPS[-1] + 1):
        fpt = flops_per_token(step) if flops_per_token else None
        total += TOKENS_PER_STEP * (fpt or 0)
        train = {"step": step, "lm_loss": 10.0 - step / 50, "consumed_tokens": step * TOKENS_PER_STEP}
        if direct_flops:
            train["flops"] = total
        elif fpt is not None:
            train["flops_per_token"] = fpt
        lines.append(train)
        if step in STEPS:
            lines.append({"step": step, "split": "valid", "lm_loss": losses[STEPS.index(step)]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture
def runs(tmp_path):
    # KI pays a teacher forward (2e6 per token) on top of the student's 6e6 until step 50
    ki = _write_run(tmp_path / "ki", KI, lambda s: 8e6 if s <= 50 else 6e6)
    scratch = _write_run(tmp_path / "scratch", SCRATCH, lambda s: 6e6, direct_flops=True)
    return ki, scratch


def test_load_run_and_flops(runs):
    ki_dir, scratch_dir = runs
    ki = plot_runs.load_run(ki_dir)
    assert ki.label == "ki" and ki.steps == STEPS and ki.values == KI
    # consumed_tokens x flops_per_token summed step by step
    assert ki.flops[4] == pytest.approx(50 * 1000 * 8e6)
    assert ki.flops[5] == pytest.approx(50 * 1000 * 8e6 + 10 * 1000 * 6e6)
    scratch = plot_runs.load_run(scratch_dir)  # direct cumulative 'flops' field
    assert scratch.flops == pytest.approx([s * 1000 * 6e6 for s in STEPS])
    train = plot_runs.load_run(ki_dir, split="train")
    assert train.steps == list(range(1, 101)) and train.values[0] == pytest.approx(9.98)


def test_steps_to_target_and_compute_saved(runs):
    ki = plot_runs.load_run(runs[0])
    scratch = plot_runs.load_run(runs[1])
    hit = plot_runs.steps_to_target(ki, 3.0)
    assert hit.step == 60 and hit.flops == pytest.approx(4.6e11)
    assert plot_runs.steps_to_target(scratch, 3.0).step == 100
    # the first evaluation at or below the target, no interpolation
    assert plot_runs.steps_to_target(scratch, 4.9).step == 60
    assert plot_runs.steps_to_target(scratch, 2.0) is None
    assert plot_runs.steps_to_target(scratch, 8.5, higher_is_better=True).step == 10
    assert plot_runs.compute_saved(100, 60) == pytest.approx(40.0)
    assert plot_runs.compute_saved(6e11, 4.6e11) == pytest.approx(100 * 1.4 / 6)
    assert plot_runs.compute_saved(100, 120) == pytest.approx(-20.0)
    assert plot_runs.compute_saved(None, 5) is None

    target, ref, rows = plot_runs.summarize([scratch, ki])  # "scratch" is the reference wherever it is
    assert target == 3.0 and ref == 0
    assert rows[0]["saved_steps"] == 0.0
    assert rows[1]["step"] == 60 and rows[1]["saved_steps"] == pytest.approx(40.0)
    assert rows[1]["saved_flops"] == pytest.approx(100 * (6e11 - 4.6e11) / 6e11)
    target, ref, _ = plot_runs.summarize([plot_runs.load_run(runs[0], label="a"), ki])  # no scratch: last
    assert ref == 1 and target == 2.6


def test_restart_drops_superseded_records(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    records = [{"step": s, "lm_loss": 10.0 - s} for s in range(1, 6)]
    records.append({"step": 5, "split": "valid", "lm_loss": 4.9})
    records += [{"step": s, "lm_loss": 20.0 - s} for s in range(3, 7)]  # resumed from step 2's checkpoint
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "lm')
    train = plot_runs.load_run(run, split="train")
    assert train.steps == [1, 2, 3, 4, 5, 6]
    assert train.values == [9.0, 8.0, 17.0, 16.0, 15.0, 14.0]
    with pytest.raises(plot_runs.PlotRunsError, match="no 'valid' records"):
        plot_runs.load_run(run)  # the old attempt's evaluation at step 5 was dropped too


def test_cli_writes_png_and_table(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    rc = plot_runs.main([str(runs[1]), str(runs[0]), "--out", str(out), "--labels", "scratch", "ki"])
    assert rc == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[:2] == (540, 1440)  # 12 x 4.5 in at 120 dpi
    assert os.listdir(out.parent) == ["curves.png"]  # the temp file was renamed, nothing left behind
    text = capsys.readouterr().out
    assert "target valid lm_loss = 3.0000 (reference run: scratch)" in text
    ki_row = next(line for line in text.splitlines() if line.startswith("ki "))
    assert "60" in ki_row and "40.0%" in ki_row and "23.3%" in ki_row


def test_cli_without_flops_and_explicit_target(tmp_path, capsys):
    a = _write_run(tmp_path / "a", SCRATCH, None)
    b = _write_run(tmp_path / "b", KI, None)
    assert not plot_runs.load_run(a).has_flops
    out = tmp_path / "c.png"
    assert plot_runs.main([str(a), str(b), "--out", str(out), "--target-loss", "5.0"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    text = capsys.readouterr().out
    assert "target valid lm_loss = 5.0000 (reference run: b)" in text
    a_row = next(line for line in text.splitlines() if line.startswith("a "))
    assert "50" in a_row and "-66.7%" in a_row  # a needs 50 steps where the reference b needs 30


def test_cli_errors(runs, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    missing = tmp_path / "nope"
    assert plot_runs.main([str(missing), "--out", out]) == 1
    assert f"run directory not found: {missing}" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_runs.main([str(empty), "--out", out]) == 1
    assert f"{empty / 'metrics.jsonl'} not found" in capsys.readouterr().err
    assert plot_runs.main([str(runs[0]), "--out", out, "--metric", "bleu"]) == 1
    err = capsys.readouterr().err
    assert "no 'valid' records with a numeric 'bleu'" in err and str(runs[0] / "metrics.jsonl") in err
    assert plot_runs.main([str(runs[0]), "--out", out, "--labels", "a", "b"]) == 2
    assert "--labels has 2 names for 1 run directories" in capsys.readouterr().err
    assert not os.path.exists(out)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_runs.py"), str(missing), "--out", out],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "run directory not found" in proc.stderr
