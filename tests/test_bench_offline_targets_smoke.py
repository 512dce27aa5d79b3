"""benchmarks/bench_offline_targets.py runs end to end at tiny sizes, so it cannot rot unnoticed.

The slow test runs ``--quick`` as a user would (a subprocess through the launcher: teacher, precomputes,
students) and checks that the tables hold the files' real sizes and the runs' own logged numbers; the fast
tests check the slice of the data and the offline-vs-online claim on made-up numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
HAS_LAUNCHER = shutil.which("deepspeed") is not None or (Path(sys.executable).parent / "deepspeed").exists()


def bench_module():
    sys.path.insert(0, str(BENCH))
    import bench_offline_targets

    return bench_offline_targets


def first_table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the first markdown table in ``stdout``."""
    lines: list[str] = []
    for line in stdout.splitlines():
        if line.strip().startswith("|"):
            lines.append(line.strip())
        elif lines:
            break
    assert len(lines) >= 3, f"no markdown table in output:\n{stdout}"
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines]
    return cells[0], cells[2:]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.skipif(not HAS_LAUNCHER, reason="the deepspeed launcher is not installed")
def test_bench_offline_targets_quick(tmp_path: Path) -> None:
    """--quick with K = 32 in fp16 and int8: sizes are the files', losses and step times the runs' own."""
    bench = bench_module()
    out, work = tmp_path / "offline.json", tmp_path / "work"
    args = [str(BENCH / "bench_offline_targets.py"), "--quick", "--ks", "32", "--int8-k", "32"]
    args += ["--max-tokens", "20000", "--workdir", str(work), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=880,
        check=False,
    )
    assert proc.returncode == 0, f"failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    header, rows = first_table(proc.stdout)
    assert tuple(header) == bench.PRECOMPUTE_COLUMNS
    assert [r[:2] for r in rows] == [["32", "fp16"], ["32", "int8"]]
    result = json.loads(out.read_text())
    from megatron_ki.data.indexed import IndexedDataset

    tokens = IndexedDataset(result["data_prefix"]).num_tokens
    assert result["tokens"] == tokens and 0 < tokens <= 20000 * 1.5
    for p in result["precompute"]:
        value_bytes = 2 if p["values"] == "fp16" else 1
        assert p["row_bytes"] == p["k"] * (2 + value_bytes) + 2  # 2-byte ids below 65,536, fp16 tail
        assert p["tokens"] == tokens and p["bin_bytes"] == Path(p["path"] + ".bin").stat().st_size
        assert p["bytes_per_token"] == pytest.approx(p["row_bytes"])
        assert p["tokens_per_s_wall"] == pytest.approx(tokens / p["wall_s"]) and p["wall_s"] > 0
    check_students(result, work / "gpt")
    (vs,) = result["offline_vs_online"]
    assert vs["k"] == 32 and vs["online_seed_spread"] is None and vs["goal_met"] is None
    assert "unknown" in vs["verdict"]


def check_students(result: dict, runs: Path) -> None:
    """Every student's final is its last validation loss; offline runs had a KD term and no teacher FLOPs."""
    students = {r["arm"]: r for r in result["students"]}
    assert list(students) == ["scratch", "online", "offline K=32"]
    names = {"scratch": "scratch_seed1", "online": "online_seed1"}
    names |= {"offline K=32": "offline_k32_seed1"}
    scratch_train = [r for r in records(runs / "scratch_seed1") if "split" not in r]
    for arm, name in names.items():
        recs = records(runs / name)
        valid = [r for r in recs if r.get("split") == "valid"]
        assert students[arm]["final"] == valid[-1]["lm_loss"] and valid[-1]["step"] == 8
        train = [r for r in recs if "split" not in r]
        assert any(r["kd_loss"] is not None for r in train) == (arm != "scratch")
        if arm.startswith("offline"):
            assert all(r["teacher_lm_loss"] is None for r in train)
            assert [r["flops_per_token"] for r in train] == [r["flops_per_token"] for r in scratch_train]
            row = students[arm]
            ratio = row["kd_step_ms"] / row["scratch_step_ms"]
            assert row["overhead_pct"] == pytest.approx(100 * (ratio - 1))
            assert row["overhead_goal_met"] == (row["overhead_pct"] < 5.0)
    assert students["scratch"]["step_at_target"] == 8 and students["scratch"]["overhead_pct"] is None


def test_offline_vs_online_claims_only_beyond_the_seed_spread() -> None:
    bench = bench_module()
    rows = [{"arm": "online", "final": f} for f in (4.0, 4.2)]
    rows += [{"arm": "offline K=8", "final": 9.0}]
    rows += [{"arm": "offline K=32", "final": f} for f in (4.1, 4.3)]
    rows += [{"arm": "offline K=128", "final": f} for f in (4.5, 4.5)]
    k32, k128 = bench.offline_vs_online(rows, [8, 32, 128])  # K=8 is below the compared Ks
    assert k32["gap"] == pytest.approx(0.1) and k32["online_seed_spread"] == pytest.approx(0.2)
    assert k32["goal_met"] and k32["verdict"] == "within the seed spread of online KI"
    assert k128["gap"] == pytest.approx(0.4) and not k128["goal_met"]
    assert k128["verdict"] == "worse than online KI"
    (single,) = bench.offline_vs_online([rows[0], rows[3]], [32])
    assert single["online_seed_spread"] is None and single["goal_met"] is None


def test_slice_keeps_every_nth_document_and_the_separator(tmp_path: Path) -> None:
    from quickstart import Data

    from megatron_ki.data.indexed import IndexedDataset, IndexedDatasetBuilder, read_stats, write_stats

    bench = bench_module()
    prefix = tmp_path / "src"
    docs = [np.arange(1, 11, dtype=np.int32) + 10 * d for d in range(10)]  # 10 documents of 10 tokens
    with IndexedDatasetBuilder(prefix, dtype=np.int32) as b:
        for doc in docs:
            b.add_document(doc)
    write_stats(prefix, {"eod_token_id": 0, "min_token_id": 1, "max_token_id": 100})
    data = Data(str(prefix), "tok.model", 128)
    assert bench.slice_data(data, 0, tmp_path) == (data, 100)
    sliced, tokens = bench.slice_data(data, 30, tmp_path)
    assert tokens == 30  # a stride of ceil(100 / 30) = 4: documents 0, 4, 8
    ds = IndexedDataset(sliced.prefix)
    for got, want in zip((ds[i] for i in range(len(ds))), (docs[0], docs[4], docs[8]), strict=True):
        np.testing.assert_array_equal(got, want)
    stats = read_stats(sliced.prefix)
    assert stats["eod_token_id"] == 0 and (stats["min_token_id"], stats["max_token_id"]) == (1, 90)
    assert stats["num_tokens"] == 30 and sliced.tokenizer == "tok.model"
