"""Smoke test of benchmarks/bench_step.py: it runs, times every method and writes its table, JSON and chart.

Timings are not asserted (they belong to the benchmark's own report, not to a test).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_clip  # noqa: E402
import bench_step  # noqa: E402
import precision_modes  # noqa: E402


def test_bench_step_quick_runs_and_writes_results(tmp_path):
    result = bench_step.main(["--quick", "--device", "cpu", "--sets", "1x16M", "--rounds", "1", "--out", str(tmp_path)])
    (entry,) = result["sets"]
    assert entry["params"] == 2**24
    assert set(entry["methods"]) == {"FusedNAG", "torch fused", "torch foreach", "torch for-loop",
                                     "FusedNAG bf16 momentum"}
    assert entry["methods"]["FusedNAG"]["bytes_per_param"] == 20
    assert entry["methods"]["FusedNAG bf16 momentum"]["bytes_per_param"] == 16
    assert entry["methods"]["FusedNAG"]["vs_fusednag"] == 1.0
    assert all(r["ms"] > 0 and r["gbps"] > 0 for r in entry["methods"].values())
    assert set(result["host_overhead_us"]) == {"FusedNAG", "torch fused"}
    assert result["step_allocations"]["FusedNAG"] == 0  # the fused step allocates nothing

    written = {p.suffix: p for p in tmp_path.iterdir()}
    assert set(written) == {".json", ".md", ".png"}
    assert json.loads(written[".json"].read_text())["meta"]["quick"] is True
    table = written[".md"].read_text()
    assert "| 1x16M |" in table and "torch foreach" in table and result["meta"]["command"] in table


def test_host_per_tensor_reports_each_method_and_count():
    host = bench_step.host_per_tensor(torch.device("cpu"), counts=(3, 7), reps=2, rounds=1)
    assert set(host) == {"back-to-back", "interleaved"}
    for rows in host.values():
        assert set(rows) == set(bench_step.host_methods())
        assert all(set(row) == {3, 7} and min(row.values()) > 0 for row in rows.values())
    table = bench_step.host_markdown(host)
    assert "| FusedNAG GradScaler |" in table and "| torch foreach |" in table
    assert bench_step.host_targets(host) == []  # the targets are stated at 2000 and 10000 tensors only


def test_host_per_group_reports_each_method_and_setting():
    groups = bench_step.host_per_group(torch.device("cpu"), counts=(3, 5), reps=2, rounds=1)
    assert set(groups) == {f"{m}, {s}" for m in ("FusedNAG", "torch fused", "torch foreach")
                           for s in ("same lr", "lr per group")}
    assert all(set(row) == {3, 5} and min(row.values()) > 0 for row in groups.values())
    assert "| FusedNAG, lr per group |" in bench_step.group_markdown(groups)


def test_host_per_tensor_fresh_takes_medians_over_processes():
    host = bench_step.host_per_tensor_fresh(torch.device("cpu"), counts=(3,), processes=2)
    assert set(host) == {"back-to-back", "interleaved"}
    for rows in host.values():
        assert set(rows) == set(bench_step.host_methods())
        assert all(set(row) == {3} and row[3] > 0 for row in rows.values())


def test_bench_step_rejects_unknown_set():
    with pytest.raises(SystemExit):
        bench_step.main(["--quick", "--sets", "no-such-set"])


def test_bench_step_times_each_bfloat16_mode_with_its_bytes(tmp_path):
    modes = ["FusedNAG fp32 momentum", "FusedNAG master weights", "FusedNAG stochastic rounding"]
    result = bench_step.main(["--quick", "--device", "cpu", "--dtype", "bfloat16", "--sets", "1x16M", "--rounds", "1",
                              "--methods", *modes, "--out", str(tmp_path), "--no-plot"])
    methods = result["sets"][0]["methods"]
    assert {m: r["bytes_per_param"] for m, r in methods.items()} == {
        "FusedNAG": 10, "FusedNAG fp32 momentum": 14, "FusedNAG master weights": 20, "FusedNAG stochastic rounding": 10}
    assert all(r["ms"] > 0 and r["roofline_ms"] > 0 for r in methods.values())


def test_precision_modes_runs_and_writes_results(tmp_path):
    result = precision_modes.main(["--steps", "20", "--eval-every", "10", "--seeds", "1", "--out", str(tmp_path)])
    assert set(result["summary"]) == set(precision_modes.MODES)
    assert result["summary"]["float32"]["vs_float32"] == 1.0
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}


def test_bench_clip_quick_runs_and_writes_results(tmp_path):
    result = bench_clip.main(["--quick", "--device", "cpu", "--sets", "2000x64x64", "--rounds", "1", "--out",
                              str(tmp_path)])
    (entry,) = result["sets"]
    assert {m: r["bytes_per_param"] for m, r in entry["methods"].items()} == {
        "FusedNAG max_grad_norm": 24, "clip_grad_norm_ + FusedNAG": 32, "clip_grad_norm_ + torch fused": 32,
        "clip_grad_norm_ + torch foreach": 32}
    assert all(r["ms"] > 0 for r in entry["methods"].values())
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md"}


def test_stable_call_cost_runs():
    # (builds a small stable-ABI op at run time with the compiler torch.utils.cpp_extension finds)
    import stable_call_cost

    results = stable_call_cost.main(["--counts", "20", "--rounds", "1", "--steps", "1"])
    assert set(results[20]) == {"stable, lists only", "stable op", "nag_step_ op", "FusedNAG.step()", "torch fused"}
    assert all(us > 0 for us in results[20].values())
