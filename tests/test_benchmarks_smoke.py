"""The KI-step and pretraining benchmarks run end to end at tiny sizes, so they cannot rot unnoticed.

Each runs as a user would (a subprocess on the command line) for 1-2 timed steps; the test checks the
markdown table's columns and that the numbers in it are real measurements (positive, consistent).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the first markdown table in ``stdout``."""
    lines: list[str] = []
    for line in stdout.splitlines():
        if line.strip().startswith("|"):
            lines.append(line.strip())
        elif lines:  # the first table ended
            break
    assert len(lines) >= 3, f"no markdown table in output:\n{stdout}"
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines]
    assert all(c == "---" for c in cells[1]), lines[1]
    return cells[0], cells[2:]


def _run(args: list[str], timeout: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_ki_step_tiny(tmp_path: Path) -> None:
    out = tmp_path / "ki.json"
    stdout = _run(
        [
            str(BENCH / "bench_ki_step.py"),
            "--layers", "1", "--hidden", "32", "--heads", "2",
            "--teacher-layers", "1", "--teacher-hidden", "16", "--teacher-heads", "2",
            "--vocab", "96", "--seq", "8", "--batch", "2", "--steps", "2", "--warmup", "1",
            "--device", "cpu", "--json", str(out),
        ],
        timeout=110,
    )  # fmt: skip
    header, rows = _table(stdout)
    assert header == [
        "run",
        "teacher dtype",
        "student params",
        "teacher params",
        "step ms (median)",
        "step ms (min)",
        "teacher fwd ms",
        "overhead %",
        "teacher FLOP share %",
        "goal <= %",
        "meets goal",
        "overhead % (min)",
    ]
    assert [r[0] for r in rows] == ["student only", "student + teacher (KI)", "student + teacher (KI)"]
    assert [r[1] for r in rows] == ["-", "bfloat16", "float32"]
    result = json.loads(out.read_text())
    base, *ki = result["rows"]
    assert base["overhead %"] is None and base["teacher params"] is None
    for row in result["rows"]:
        assert len(row["step ms (all)"]) == 2 and all(t > 0 for t in row["step ms (all)"])
        assert row["step ms (min)"] == pytest.approx(min(row["step ms (all)"]))
        assert row["final loss"] == pytest.approx(row["final loss"])  # finite (NaN != NaN)
    for row in ki:
        assert 0 < row["teacher params"] < row["student params"]
        assert 0 < row["teacher fwd ms"] < row["step ms (median)"]
        assert row["goal <= %"] == pytest.approx(row["teacher FLOP share %"] + 10.0)
        expected = 100 * (row["step ms (median)"] / base["step ms (median)"] - 1)
        assert row["overhead %"] == pytest.approx(expected)
        assert row["meets goal"] == (row["overhead %"] <= row["goal <= %"])
        expected_min = 100 * (row["step ms (min)"] / base["step ms (min)"] - 1)
        assert row["overhead % (min)"] == pytest.approx(expected_min)
    assert 0 < result["ki_flop_share"] < 1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.skipif(
    shutil.which("deepspeed") is None and not (Path(sys.executable).parent / "deepspeed").exists(),
    reason="the deepspeed launcher is not installed",
)
def test_bench_pretrain_tiny(tmp_path: Path) -> None:
    out = tmp_path / "pretrain.json"
    stdout = _run(
        [
            str(BENCH / "bench_pretrain.py"),
            "--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "16", "--batch", "2",
            "--steps", "3", "--skip", "1", "--repeats", "1", "--docs", "150", "--vocab", "300",
            "--threads", "1", "--workdir", str(tmp_path / "work"), "--json", str(out),
        ],
        timeout=140,
    )  # fmt: skip
    header, rows = _table(stdout)
    assert header == [
        "run",
        "tokens/s (median)",
        "step ms (median)",
        "per-run tokens/s",
        "steps timed",
        "overhead %",
        "goal <= %",
        "meets goal",
        "tokens/s (best step)",
        "overhead % (best)",
    ]
    assert [r[0] for r in rows] == ["plain PyTorch loop", "pretrain_ki.py (deepspeed, 1 CPU rank)"]
    plain, framework = json.loads(out.read_text())["rows"]
    for row in (plain, framework):
        assert row["tokens/s (median)"] > 0
        assert row["steps timed"] == 2  # 3 steps, the first skipped
        assert row["step ms (median)"] == pytest.approx(1e3 * 2 * 16 / row["tokens/s (median)"])
        assert row["tokens/s (best step)"] >= row["tokens/s (median)"]
    expected = 100 * (plain["tokens/s (median)"] / framework["tokens/s (median)"] - 1)
    assert framework["overhead %"] == pytest.approx(expected)
    assert framework["meets goal"] == (framework["overhead %"] <= 10.0)
    best = 100 * (plain["tokens/s (best step)"] / framework["tokens/s (best step)"] - 1)
    assert framework["overhead % (best)"] == pytest.approx(best)
    # the framework run really went through pretrain_ki.py and logged its steps
    metrics = (tmp_path / "work" / "framework0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics if json.loads(x).get("split", "train") == "train"] == [
        1,
        2,
        3,
    ]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.skipif(
    shutil.which("deepspeed") is None and not (Path(sys.executable).parent / "deepspeed").exists(),
    reason="the deepspeed launcher is not installed",
)
def test_bench_mfu_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGATRON_KI_PEAK_FLOPS", "1e12")  # a CPU has no entry in flops.py's peak table
    out, work = tmp_path / "mfu.json", tmp_path / "work"
    stdout = _run(
        [
            str(BENCH / "bench_mfu.py"), "--tiny", "--configs", "tiny_gpt2", "--device", "cpu",
            "--steps", "3", "--skip", "1", "--threads", "1", "--workdir", str(work), "--json", str(out),
        ],
        timeout=140,
    )  # fmt: skip
    header, rows = _table(stdout)
    assert header == [
        "model",
        "run",
        "batch (micro x accum x seq)",
        "student params",
        "teacher params",
        "tokens/s",
        "step ms",
        "MFU %",
        "KI overhead %",
        "teacher FLOP share %",
        "goal",
        "meets goal",
        "peak mem GiB",
        "steps timed",
    ]
    assert [r[:3] for r in rows] == [
        ["tiny_gpt2", "scratch", "2 x 2 x 128"],
        ["tiny_gpt2", "KI", "2 x 2 x 128"],
    ]
    result = json.loads(out.read_text())
    assert result["peak_flops"] == pytest.approx(1e12)
    scratch, ki = result["rows"]
    for row in (scratch, ki):
        assert not row["failed"]
        assert row["tokens/s"] > 0 and row["steps timed"] == 2  # 3 steps, the first skipped
        assert row["step ms"] == pytest.approx(1e3 * 4 * 128 / row["tokens/s"])  # global 4 x seq 128
        assert row["MFU %"] == pytest.approx(100 * row["tokens/s"] * row["flops per token"] / 1e12)
        assert row["MFU %"] > 0
        assert row["peak mem GiB"] > 0  # peak_rss_gib of the launched rank on CPU
    assert ki["flops per token"] > scratch["flops per token"]  # the teacher's forward is charged
    assert 0 < ki["teacher params"] < scratch["student params"] == ki["student params"]
    assert scratch["teacher params"] is None and scratch["KI overhead %"] is None
    assert 0 < ki["teacher FLOP share %"] < 100
    assert ki["KI overhead %"] == pytest.approx(100 * (ki["step ms"] / scratch["step ms"] - 1))
    assert ki["meets goal"] == (ki["KI overhead %"] <= ki["teacher FLOP share %"] + 10.0)
    assert scratch["meets goal"] == (scratch["MFU %"] >= 45.0)
    # both runs went through pretrain_ki.py; only the KI run computed a distillation loss
    for run, has_kd in (("scratch", False), ("KI", True)):
        lines = (work / "runs" / f"tiny_gpt2_{run}" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert all((r["kd_loss"] is not None) == has_kd for r in records)


HAS_LAUNCHER = shutil.which("deepspeed") is not None or (Path(sys.executable).parent / "deepspeed").exists()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(720)
@pytest.mark.skipif(not HAS_LAUNCHER, reason="the deepspeed launcher is not installed")
def test_bench_ki_convergence_quick(tmp_path: Path) -> None:
    """--quick: both families end to end through the launcher (teacher, scratch, KI, grown, grown + KI); the
    tables hold the KI report's numbers of the runs it made, and a grown arm starts at its teacher's loss."""
    out, work = tmp_path / "conv.json", tmp_path / "work"
    stdout = _run(
        [str(BENCH / "bench_ki_convergence.py"), "--quick", "--seeds", "1", "--no-ablation",
         "--workdir", str(work), "--json", str(out)],
        timeout=600,
    )  # fmt: skip
    header, rows = _table(stdout)
    assert header[:6] == ["family", "arm", "seed", "step-0 loss", "rise after step 0", "final"]
    assert [r[:3] for r in rows] == [
        [f, arm, "1"] for f in ("gpt", "roberta") for arm in ("KI", "grown", "grown + KI")
    ]
    result = json.loads(out.read_text())
    for family in ("gpt", "roberta"):
        arms = result["families"][family]["arms"]
        assert set(arms) == {"ki", "grown", "grown_ki"}
        valid = [
            json.loads(x)
            for x in (work / family / "scratch_seed1" / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("split") == "valid"
        ]
        assert valid[0]["step"] == 0 and valid[-1]["step"] == 8
        for (seed,) in arms.values():
            assert seed["scratch_final"] == valid[-1]["lm_loss"]
            assert seed["target"] == seed["scratch_final"] and seed["scratch_step"] is not None
            assert seed["teacher_level"] is not None and seed["start"] is not None
        summary = result["families"][family]["summary"]
        teacher = summary["teacher_final"]
        for arm in (
            "grown",
            "grown_ki",
        ):  # growth keeps the function: the student starts where the teacher is
            assert arms[arm][0]["start"] == pytest.approx(teacher, abs=1e-4), (family, arm)
        assert arms["ki"][0]["flop_share_pct"] > 0
        assert summary["seeds"] == 1 and summary["seed_spread"] == 0.0
        assert summary["arms"]["ki"]["gap_claimed"] is False
        assert (work / family / "teacher_ckpt" / "latest").is_file()
        assert (work / family / "grown_ckpt_seed1" / "latest").is_file()


def test_bench_ki_convergence_claims_and_order() -> None:
    """A gap is claimed only beyond the seed spread (of any arm); the regime and the grown + KI goals are read
    off the means; the paper's a_t order is read off the final losses."""
    sys.path.insert(0, str(BENCH))
    import bench_ki_convergence as bench

    def rows(finals, steps, scratch=(4.5, 4.4)):
        out = []
        for f, st, sc in zip(finals, steps, scratch):
            out.append({"ki_final": f, "scratch_final": sc, "steps_pct": st, "saved_flops_pct": 10.0,
                        "saved_seconds_pct": None, "overhead_pct": None, "flop_share_pct": None, "start": 6.0,
                        "spike": None, "ki_overtakes_teacher": 100, "scratch_overtakes_teacher": 200})  # fmt: skip
        return out

    arms = {"ki": rows((4.0, 4.1), (40.0, 60.0)), "grown": rows((3.9, 3.95), (30.0, 30.0))}
    arms["grown_ki"] = rows((3.5, 3.6), (20.0, 30.0))
    s = bench.summarize_family("gpt", arms, teacher_final=4.7)
    assert s["seed_spread"] == pytest.approx(0.1) and s["regime_holds"]
    assert s["arms"]["ki"]["final_gap"] == pytest.approx(-0.4) and s["arms"]["ki"]["gap_claimed"]
    assert (
        s["arms"]["ki"]["steps_pct"] == pytest.approx(50.0)
        and s["ki_steps_goal_met"]
        and s["ki_flops_goal_met"]
    )
    assert s["grown_ki_steps_goal_met"] and s["grown_ki_vs_grown"] == pytest.approx(-0.375)
    assert s["grown_ki_below_ki_claimed"] and s["grown_ki_below_grown_claimed"]
    assert not bench.summarize_family("gpt", arms, teacher_final=4.5)[
        "regime_holds"
    ]  # scratch 4.45: too close
    arms["ki"][1]["ki_final"] = 4.9  # mean gap 0.0 now, within the KI seed spread of 0.9
    assert not bench.summarize_family("gpt", arms, teacher_final=4.7)["arms"]["ki"]["gap_claimed"]
    arms["ki"][1]["steps_pct"] = None  # one seed never reached the target: no mean, goal not met
    assert bench.summarize_family("gpt", arms, teacher_final=4.7)["ki_steps_goal_met"] is False
    ablation = [{"schedule": k, "final": v} for k, v in (("linear", 4.0), ("step", 4.2), ("constant", 4.5))]
    assert "holds here; first vs second 0.2000, by more than" in bench.paper_order(ablation, 0.1)
    ablation[0]["final"] = 4.3
    assert "does not hold" in bench.paper_order(ablation, 0.1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.skipif(not HAS_LAUNCHER, reason="the deepspeed launcher is not installed")
def test_bench_ki_overhead_tiny(tmp_path: Path) -> None:
    """The quickstart layout, scratch and KI, 3 steps each: the table is the runs' own step times."""
    out, work = tmp_path / "overhead.json", tmp_path / "work"
    stdout = _run(
        [str(BENCH / "bench_ki_overhead.py"), "--layouts", "quickstart (pp=2)", "--steps", "3", "--skip", "1",
         "--repeats", "1", "--max-docs", "300", "--workdir", str(work), "--json", str(out), "--stage-timers"],
        timeout=280,
    )  # fmt: skip
    header, rows = _table(stdout)
    assert header[:4] == ["layout", "scratch step ms", "KI step ms", "overhead %"]
    assert [r[0] for r in rows] == ["quickstart (pp=2)"]
    (row,) = json.loads(out.read_text())["rows"]
    steps = {}
    for arm in ("scratch", "ki"):
        lines = (work / "runs" / f"quickstart_{arm}_0" / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if "split" not in r]  # train records
        assert [r["step"] for r in records] == [1, 2, 3]
        assert all((r["kd_loss"] is not None) == (arm == "ki") for r in records)
        steps[arm] = records
    assert row["scratch_ms"] == pytest.approx(
        1e3 * (steps["scratch"][1]["step_time_s"] + steps["scratch"][2]["step_time_s"]) / 2
    )
    assert row["overhead_pct"] == pytest.approx(100 * (row["ki_ms"] / row["scratch_ms"] - 1))
    ratio = steps["ki"][-1]["flops_per_token"] / steps["scratch"][-1]["flops_per_token"]
    assert row["flop_share_pct"] == pytest.approx(100 * (ratio - 1)) and row["flop_share_pct"] > 0
    assert row["meets_goal"] == (row["overhead_pct"] <= row["flop_share_pct"] + 10)
    for arm in ("scratch", "ki"):  # --stage-timers: both stages, their parts within the step
        assert len(row["stages"][arm]) == 2
        for st in row["stages"][arm]:
            parts = [st[p] for p in ("forward", "backward", "send/recv", "rest")]
            assert st["forward"] > 0 and st["backward"] > 0 and min(parts) >= 0
            assert sum(parts) <= 1.1 * st["step"] + 2, (arm, st)
    assert "Where each stage's time goes" in stdout


@pytest.mark.distributed
def test_bench_sequence_parallel_quick(tmp_path: Path) -> None:
    """--quick at tp=2: sequence parallelism halves what each rank saves outside the tensor-parallel regions
    (norms, dropout masks, the projections' inputs) and leaves the rest (already split over heads) alone."""
    out = tmp_path / "sp.json"
    stdout = _run([str(BENCH / "bench_sequence_parallel.py"), "--quick", "--json", str(out)], timeout=200)
    header, rows = _table(stdout)
    assert header[:2] == ["tp", "sequence parallel"] and [r[:2] for r in rows] == [["2", "off"], ["2", "on"]]
    off, on = json.loads(out.read_text())
    assert on["outside"] * 2 == pytest.approx(off["outside"], rel=0.02)
    assert on["inside"] == pytest.approx(off["inside"], rel=0.02)
