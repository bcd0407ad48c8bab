"""Smoke test of benchmarks/bench_step.py: it runs, times every method and writes its table, JSON and chart.

Timings are not asserted (they belong to the benchmark's own report, not to a test).
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_step  # noqa: E402


def test_bench_step_quick_runs_and_writes_results(tmp_path):
    result = bench_step.main(["--quick", "--device", "cpu", "--sets", "1x16M", "--rounds", "1", "--out", str(tmp_path)])
    (entry,) = result["sets"]
    assert entry["params"] == 2**24
    assert set(entry["methods"]) == {"FusedNAG", "torch fused", "torch foreach", "torch for-loop"}
    assert entry["methods"]["FusedNAG"]["vs_fusednag"] == 1.0
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in entry["methods"].values())
    assert set(result["host_overhead_us"]) == {"FusedNAG", "torch fused"}
    assert result["step_allocations"]["FusedNAG"] == 0  # the fused step allocates nothing

    written = {p.suffix: p for p in tmp_path.iterdir()}
    assert set(written) == {".json", ".md", ".png"}
    assert json.loads(written[".json"].read_text())["meta"]["quick"] is True
    table = written[".md"].read_text()
    assert "| 1x16M |" in table and "torch foreach" in table and result["meta"]["command"] in table


def test_bench_step_rejects_unknown_set():
    with pytest.raises(SystemExit):
        bench_step.main(["--quick", "--sets", "no-such-set"])
