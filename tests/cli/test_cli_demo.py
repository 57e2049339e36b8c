"""``fliqs demo``: the bundled digits CNN compiled for llvm on sklearn digits as a sweep of tight
budgets with uniform QAT beside it, end to end, as a real process, with every contract file in
--out and the "FLIQS vs uniform" table printed. (Its wall time is a benchmark, not a test: a
loaded machine stretched it past any fixed limit.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest


def test_bundled_model_is_small_and_valid(demo_model):
    assert demo_model.is_file() and demo_model.stat().st_size < 1_000_000
    model = onnx.load(demo_model)
    onnx.checker.check_model(model)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 8, 8]


@pytest.mark.slow
@pytest.mark.tvm
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "TVM_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-m", "fliqs_compiler.cli.main", "demo", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    assert str(out / "report.md") in p.stdout
    assert "FLIQS vs uniform at the same BOPs" in p.stdout
    for name in ("config.json", "model.qdq.onnx", "tvm/model.so", "report.json", "report.md",
                 "formats.png", "search.jsonl", "search.png", "pareto.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "llvm" and report["model"] == "demo"
    assert report["quality"]["float"] > 0.97
    assert report["numerics"]["tvm_max_abs_err"] is not None
    assert report["totals"]["latency_ms"] > 0
    sweep = report["sweep"]
    assert len(sweep) == 3
    for point in sweep:  # every point meets its budget (projection), none silently overshoots
        assert point["bops"] <= point["budget_value"] * 1.02
    uniform = {b["name"] for b in report["sweep_baselines"]}
    assert {"uniform-int2", "uniform-int8"} <= uniform
    # the printed table: at every point FLIQS is no worse than the best uniform format that fits
    # the same budget (2 pp slack: 360 held-out digits, one sample is 0.28 pp)
    from fliqs_compiler.cli.demo_cmd import versus_uniform
    rows = versus_uniform(report)
    assert len(rows) == 3
    for budget, q, bops, name, uq, ubops in rows:
        assert uq is None or q >= uq - 0.02, (budget, q, name, uq)
