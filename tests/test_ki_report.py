"""tools/ki_report.py / megatron_ki.training.report: the KI report on synthetic runs with known answers."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from megatron_ki.training import report

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ki_report", ROOT / "tools" / "ki_report.py")
ki_report = importlib.util.module_from_spec(_spec)
sys.modules["ki_report"] = ki_report
_spec.loader.exec_module(ki_report)

STEPS = list(range(10, 101, 10))
SCRATCH = [9.0, 8.0, 7.0, 6.0, 5.0, 4.6, 4.4, 4.2, 4.1, 4.0]  # final 4.0, first reached at step 100
KI = [8.0, 6.5, 5.0, 4.4, 4.2, 3.95, 3.8, 3.6, 3.5, 3.4]  # <= 4.0 first at step 60, < 4.5 first at step 40
TEACHER_LM = 4.5
TOKENS = 1000  # per step
STUDENT_FPT, KI_FPT = 6e6, 8e6  # the teacher forward adds a third while it runs (steps 1-50)
TEACHER_STEPS = 50


def _step_time(step: int, ki: bool) -> float:
    if step <= 3:
        return 0.4  # warm-up, left out of the overhead
    return 0.12 if ki and step <= TEACHER_STEPS else 0.1


def _records(losses, ki: bool, steps=range(1, 101), eval_fields: bool = True, train_time: bool = True):
    """Train records every step, an evaluation every 10 steps; KI runs the teacher until step 50."""
    out, flops, seconds = [], 0.0, 0.0
    for step in steps:
        teacher = ki and step <= TEACHER_STEPS
        fpt = KI_FPT if teacher else STUDENT_FPT
        flops, seconds = flops + TOKENS * fpt, seconds + _step_time(step, ki)
        train = {
            "step": step,
            "lm_loss": 10 - step / 50,
            "kd_loss": 1.0 - step / 100 if teacher else None,
            "alpha": max(0.0, 1 - step / TEACHER_STEPS) if ki else 0.0,
            "step_time_s": _step_time(step, ki),
            "flops_per_token": fpt,
            "flops": flops,
            "consumed_tokens": step * TOKENS,
        }
        if train_time:
            train["train_time_s"] = seconds
        out.append(train)
        if step in STEPS:
            valid = {"step": step, "split": "valid", "lm_loss": losses[STEPS.index(step)]}
            valid["teacher_lm_loss"] = TEACHER_LM if ki else None
            if eval_fields:
                valid.update(flops=flops, train_time_s=seconds, consumed_tokens=step * TOKENS)
            out.append(valid)
    return out


def _write(path: Path, records, train_steps: int | None = 100) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if train_steps is not None:
        (path / "config.yaml").write_text(f"model:\n  num_layers: 2\ntrain:\n  train_steps: {train_steps}\n")
    return path


def _seconds_at(step: int, ki: bool) -> float:
    return sum(_step_time(s, ki) for s in range(1, step + 1))


@pytest.fixture
def runs(tmp_path):
    ki = _write(tmp_path / "ki", _records(KI, ki=True, eval_fields=False))  # interpolated from train records
    scratch = _write(tmp_path / "scratch", _records(SCRATCH, ki=False))
    return ki, scratch


def test_compute_saved_to_the_scratch_target(runs):
    r = report.build_ki_report(*runs)
    assert r.target == 4.0 and r.target_step == 100
    assert r.ki_hit.step == 60 and r.scratch_hit.step == 100
    ki_flops = TOKENS * (TEACHER_STEPS * KI_FPT + 10 * STUDENT_FPT)
    assert r.ki_hit.flops == pytest.approx(ki_flops)
    assert r.scratch_hit.flops == pytest.approx(100 * TOKENS * STUDENT_FPT)
    ki_s, scratch_s = 3 * 0.4 + 47 * 0.12 + 10 * 0.1, 3 * 0.4 + 97 * 0.1
    assert r.ki_hit.seconds == pytest.approx(ki_s) and r.scratch_hit.seconds == pytest.approx(scratch_s)
    assert r.saved_steps == pytest.approx(40.0)
    assert r.saved_flops == pytest.approx(100 * (6e11 - ki_flops) / 6e11)  # 23.3%
    assert r.saved_seconds == pytest.approx(100 * (scratch_s - ki_s) / scratch_s)  # 28.1%
    assert r.gap_step == 100 and r.final_gap == pytest.approx(3.4 - 4.0)
    assert r.ki.seconds == pytest.approx([_seconds_at(s, True) for s in STEPS])
    assert not r.provisional and r.ki_progress.finished and r.scratch_progress.planned_steps == 100
    v = r.verdict()
    assert v.startswith(
        "KI reached the scratch run's final validation lm_loss (4.0000) at step 60, scratch at step 100: "
        "40.0% fewer steps, 23.3% fewer FLOPs (teacher forward included), 28.1% less training time."
    )
    assert "single-seed comparison" in v and "rovisional" not in v
    md = r.markdown()
    assert v in md and "| step | 60 | 100 | 40.0% |" in md and "KI - scratch = -0.6000" in md
    assert "in progress" not in md and "![KI report curves](ki_report.png)" in md


def test_teacher_level_overtake_and_overhead(runs, tmp_path):
    r = report.build_ki_report(*runs)
    assert r.teacher_level == TEACHER_LM and "KI run's validation teacher_lm_loss" in r.teacher_source
    assert r.ki_overtake_step == 40 and r.scratch_overtake_step == 70  # strictly below 4.5
    o = r.overhead
    assert (o.first_step, o.last_step, o.n_steps) == (4, TEACHER_STEPS, TEACHER_STEPS - 3)
    assert o.ki_step_time_s == pytest.approx(0.12) and o.scratch_step_time_s == pytest.approx(0.1)
    assert o.overhead_pct == pytest.approx(20.0)
    assert o.ki_flops_per_token == KI_FPT and o.scratch_flops_per_token == STUDENT_FPT
    assert o.flop_share_pct == pytest.approx(100 / 3)
    assert o.difference_points == pytest.approx(20 - 100 / 3)
    md = r.markdown()
    assert "+20.0%" in md and "+33.3%" in md and "13.3 points below the teacher's FLOP share" in md
    assert "KI at step 40; scratch at step 70" in md
    # without the KI run's teacher_lm_loss, the teacher run's final value is the level
    no_own = [{k: v for k, v in rec.items() if k != "teacher_lm_loss"} for rec in _records(KI, ki=True)]
    ki2 = _write(tmp_path / "ki2", no_own)
    teacher = _write(tmp_path / "teacher", _records([9, 8, 7, 6, 5.5, 5.2, 5.0, 4.9, 4.85, 4.8], ki=False))
    r = report.build_ki_report(ki2, runs[1], teacher)
    assert r.teacher_level == 4.8 and "teacher run's final validation lm_loss" in r.teacher_source
    assert r.ki_overtake_step == 40 and r.scratch_overtake_step == 60
    assert r.teacher is not None and r.teacher.label == "teacher"


def test_missing_teacher_run(runs, tmp_path):
    missing = tmp_path / "no-teacher"
    r = report.build_ki_report(*runs, teacher_dir=missing)  # the KI run's own level still serves
    assert r.teacher_level == TEACHER_LM and r.teacher is None
    assert any(f"run directory not found: {missing}" in n for n in r.notes)
    scratch_only = _write(tmp_path / "ki_plain", _records(KI, ki=False))  # no teacher_lm_loss, no teacher run
    r = report.build_ki_report(scratch_only, runs[1])
    assert r.teacher_level is None and r.ki_overtake_step is None and r.scratch_overtake_step is None
    assert r.overhead is None and any("KI overhead not measured" in n for n in r.notes)
    md = r.markdown()
    assert "Teacher level unknown" in md and "Not measured" in md
    report.write_ki_report(r, tmp_path / "out")  # the figure copes without teacher, a_t or KD loss


def test_no_saving_and_costs_more(runs, tmp_path):
    worse = _write(tmp_path / "worse", _records([9.5, 8.5, 7.5, 6.5, 5.5, 5.0, 4.6, 4.3, 4.2, 4.1], ki=True))
    r = report.build_ki_report(worse, runs[1])
    assert r.ki_hit is None and r.saved_steps is None and r.saved_flops is None and r.saved_seconds is None
    assert r.verdict().startswith("No saving measured: KI has not reached the scratch run's final validation")
    assert "its best is 4.1000 at step 100" in r.verdict()
    assert "| step | not reached | 100 | - |" in r.markdown()
    # scratch first gets to its final 4.0 at step 50; KI only at step 60
    early = _write(
        tmp_path / "early", _records([9.0, 8.0, 7.0, 5.0, 3.9, 4.2, 4.1, 4.05, 4.02, 4.0], ki=False)
    )
    r = report.build_ki_report(runs[0], early)
    assert r.scratch_hit.step == 50 and r.saved_steps == pytest.approx(-20.0)
    assert r.verdict().startswith("KI costs more: it reached the scratch run's final validation lm_loss")
    assert "20.0% more steps" in r.verdict()


def test_in_progress_is_provisional(tmp_path):
    ki = _write(tmp_path / "ki", _records(KI, ki=True))
    scratch = _write(tmp_path / "scratch", _records(SCRATCH, ki=False), train_steps=200)
    r = report.build_ki_report(ki, scratch)
    assert r.scratch_progress.last_step == 100 and r.scratch_progress.finished is False
    assert r.provisional and [p.label for p in r.unfinished] == ["scratch"]
    assert "Provisional" in r.verdict() and "scratch at step 100 of 200" in r.verdict()
    assert "latest validation lm_loss" in r.verdict()
    assert "in progress: scratch at step 100 of 200." in r.markdown()
    # a run cut mid-line (still writing) and without config.yaml: read what exists, length unknown
    going = tmp_path / "going"
    _write(going, _records(KI, ki=True, steps=range(1, 56)), train_steps=None)
    with open(going / "metrics.jsonl", "a") as f:
        f.write('{"step": 56, "lm_')
    r = report.build_ki_report(going, scratch)
    assert r.ki_progress.last_step == 55 and r.ki_progress.finished is None
    assert r.ki.steps == [10, 20, 30, 40, 50] and r.ki_hit is None and r.gap_step == 50


def test_restart_records_use_the_latest_attempt(runs, tmp_path):
    good = _records(KI, ki=True, eval_fields=False)
    diverged = [
        dict(r, lm_loss=9.9, step_time_s=5.0, train_time_s=999.0) for r in good if 40 < r["step"] <= 70
    ]
    resumed = [r for r in good if r["step"] > 40]  # from the step-40 checkpoint: steps go back from 70 to 41
    ki = _write(tmp_path / "restarted", [r for r in good if r["step"] <= 40] + diverged + resumed)
    r = report.build_ki_report(ki, runs[1])
    ref = report.build_ki_report(*runs)
    assert r.ki.steps == STEPS and r.ki.values == KI
    assert r.ki_hit.step == 60 and r.saved_steps == ref.saved_steps
    assert r.ki_hit.flops == pytest.approx(ref.ki_hit.flops)
    assert r.ki_hit.seconds == pytest.approx(ref.ki_hit.seconds)
    assert r.overhead.ki_step_time_s == pytest.approx(0.12)


def test_seconds_from_step_times_when_train_time_is_missing(tmp_path):
    """Older logs: no train_time_s anywhere; the step times are summed (weighted by the logging interval)."""
    records = [
        r for r in _records(SCRATCH, ki=False, eval_fields=False, train_time=False) if r["step"] % 2 == 0
    ]
    run = report.load_run(_write(tmp_path / "old", records))
    # step 2's time stands for steps 1-2, step 4's for 3-4, ...: an estimate (step 3 was warm-up too)
    assert run.seconds[0] == pytest.approx(2 * 0.4 + 4 * 2 * 0.1)
    assert run.seconds[-1] == pytest.approx(2 * 0.4 + 49 * 2 * 0.1)
    empty = [{k: v for k, v in r.items() if k != "step_time_s"} for r in records]
    assert report.load_run(_write(tmp_path / "none", empty)).seconds == [None] * 10


def test_cli_writes_both_files(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert ki_report.main(["--ki", str(runs[0]), "--scratch", str(runs[1]), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["ki_report.md", "ki_report.png"]  # no temp file left behind
    png = (out / "ki_report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    text = capsys.readouterr().out
    md = (out / "ki_report.md").read_text()
    assert md in text and "40.0% fewer steps" in md
    assert f"wrote {out / 'ki_report.md'}" in text and f"wrote {out / 'ki_report.png'}" in text
    assert (
        ki_report.main(["--ki", str(runs[0]), "--scratch", str(runs[1])]) == 0
    )  # default: the KI run's parent
    assert (runs[0].parent / "ki_report.md").is_file() and (runs[0].parent / "ki_report.png").is_file()


def test_cli_errors(runs, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert (
        ki_report.main(["--ki", str(missing), "--scratch", str(runs[1]), "--out", str(tmp_path / "o")]) == 1
    )
    err = capsys.readouterr().err
    assert err == f"ki_report.py: error: run directory not found: {missing}\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ki_report.main(["--ki", str(runs[0]), "--scratch", str(empty)]) == 1
    assert capsys.readouterr().err.startswith(f"ki_report.py: error: {empty / 'metrics.jsonl'} not found")
    assert ki_report.main(["--ki", str(runs[0]), "--scratch", str(runs[1]), "--split", "test"]) == 1
    err = capsys.readouterr().err
    assert "no 'test' records" in err and str(runs[0] / "metrics.jsonl") in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() and not (tmp_path / "ki_report.md").exists()
    with pytest.raises(SystemExit) as e:
        ki_report.main(["--ki", str(runs[0])])  # --scratch is required
    assert e.value.code == 2


def test_arms_report_puts_every_arm_beside_scratch(runs, tmp_path, capsys):
    """--arm: each arm against the scratch run with the single report's numbers, the loss at step 0 where the
    run evaluated there, and an evaluation at step 0 is never an overtaking of the teacher."""
    grown_losses = [4.45, 4.3, 4.1, 3.9, 3.8, 3.7, 3.6, 3.5, 3.45, 3.4]  # <= 4.0 first at step 40
    records = _records(grown_losses, ki=True)
    records.insert(0, {"step": 0, "split": "valid", "lm_loss": 4.499, "teacher_lm_loss": TEACHER_LM,
                       "flops": 0.0, "train_time_s": 0.0, "consumed_tokens": 0})  # fmt: skip
    grown = _write(tmp_path / "grown_ki", records)
    out = tmp_path / "arms"
    argv = [
        "--scratch",
        str(runs[1]),
        "--arm",
        f"KI={runs[0]}",
        "--arm",
        f"grown + KI={grown}",
        "--out",
        str(out),
    ]
    assert ki_report.main(argv) == 0
    assert sorted(os.listdir(out)) == ["arms_report.md", "arms_report.png"]
    md = (out / "arms_report.md").read_text()
    assert md in capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| arm")}  # fmt: skip
    assert rows["KI"][:2] == ["-", "60 (60.0%)"] and rows["KI"][6] == "40"
    assert rows["grown + KI"][:2] == ["4.4990", "40 (40.0%)"]
    assert rows["grown + KI"][6] == "10"  # below the teacher's 4.5 at step 0 too, but that is its start
    assert rows["scratch"][1] == "100" and "Teacher level: 4.5000" in md


def test_arms_report_refuses_a_malformed_arm(runs, capsys):
    with pytest.raises(SystemExit) as e:
        ki_report.main(["--scratch", str(runs[1]), "--arm", "no-equals-sign"])
    assert e.value.code == 2 and "--arm 'no-equals-sign': expected LABEL=DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ki_report.main(["--scratch", str(runs[1])])
