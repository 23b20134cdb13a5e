"""The CPU benchmark runs end to end on a tiny configuration and its paths agree (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_merge_runs_and_paths_agree(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_merge.py"),
        "--layers",
        "2",
        "--clients",
        "2",
        "--ranks",
        "3",
        "--repeats",
        "1",
        "--gram-widths",
        "40",
        "--threads",
        "1",
        "2",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert {row["step"] for row in result["merge"]} == {"A", "B"}
    assert {row["grams"] for row in result["merge"]} == {"full", "diagonal"}
    for row in result["merge"]:
        assert row["max_rel_diff_vs_reference"] < 1e-8, row
    for row in result["gram_accumulation"]:
        assert row["fused_rel_err"] <= 2 * row["plain_rel_err"] + 1e-6, row
    assert {row["threads"] for row in result["gram_accumulation"]} == {1, 2}
    assert result["value_checks"] and result["solve"]
    for row in result["solve"]:
        assert row["max_rel_diff"] < 1e-10, row
    assert result["machine"]["isa"] in {"AVX-512", "AVX2", "other"} and result["machine"]["cpu"]


def test_bench_merge_without_the_authors_path(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bench_merge.py"),
        "--layers",
        "1",
        "--clients",
        "2",
        "--ranks",
        "2",
        "--grams",
        "diagonal",
        "--gram-widths",
        "--no-authors",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads(out.read_text())  # strict JSON: skipped numbers are null, not NaN
    assert result["gram_accumulation"] == []
    for row in result["merge"]:
        assert row["authors_s"] is None and row["speedup_vs_authors"] is None and row["fused_s"] > 0
