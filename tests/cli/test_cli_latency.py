"""``fliqs compile --budget latency=...``: the latency table is measured on the target, the
search runs against it, and the report shows table latency (the budget) next to the measured
whole-model latency."""
from __future__ import annotations

import json

from cli_runs import assert_contract, run_cli


def test_latency_budget_uses_the_measured_table(tmp_path, monkeypatch, demo_model):
    """--budget latency=...: the table is measured on the target (ort micro-graphs here), the
    search runs against it, and the report shows table latency (budget) and measured latency."""
    monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "lat"
    run_cli(["compile", str(demo_model), "--target", "ort", "--data", "digits", "--steps", "4",
             "--formats", "int8,bf16", "--budget", "latency=1.2x", "--out", str(out), "--quiet"])
    assert list((tmp_path / "cache").rglob("*.json")), "no latency table was written"
    report = json.loads((out / "report.json").read_text())
    assert_contract(report)
    assert report["budget"]["kind"] == "latency" and report["budget"]["value"] > 0
    assert report["totals"]["searched_latency_ms"] > 0 and report["totals"]["latency_ms"] > 0
    searched = [la for la in report["layers"] if not la["keep_float"]]
    assert all(la["latency_ms"] > 0 for la in searched)
    assert "latency table" in (out / "report.md").read_text()
