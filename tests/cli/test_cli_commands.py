"""The single-stage commands as thin layers over the API: ``fliqs search`` (config.json only),
``fliqs profile`` (latency table, cached), ``fliqs report --print``, and ``--help`` of each."""
from __future__ import annotations

import json

import pytest

from cli_runs import run_cli
from report_samples import sample_report


@pytest.mark.parametrize("cmd", ["compile", "lower", "search", "profile", "report", "demo"])
def test_help(cmd):
    out = run_cli([cmd, "--help"])
    assert "Usage: " in out and "--debug" in out


def test_compile_help_lists_the_contract_options():
    out = run_cli(["compile", "--help"])
    for opt in ("--target", "--data", "--formats", "--budget", "--sweep", "--steps", "--out",
                "--seed", "--resume", "--input-shape", "--debug"):
        assert opt in out, opt


def test_search_writes_config_only(tmp_path, demo_model):
    out = tmp_path / "s"
    stdout = run_cli(["search", str(demo_model), "--data", "digits", "--steps", "3",
                      "--formats", "int4,int8", "--budget", "bops=0.6x", "--out", str(out), "--quiet"])
    assert "config.json" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "demo" and cfg["budget"] == "bops=0.6x"
    assert cfg["formats"] and all(set(v) == {"weight", "activation"} for v in cfg["formats"].values())
    assert len((out / "search.jsonl").read_text().splitlines()) == 3
    assert not (out / "model.qdq.onnx").exists() and not (out / "report.json").exists()


def test_profile_json_and_cache(tmp_path, monkeypatch, demo_model):
    monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["profile", str(demo_model), "--target", "ort", "--formats", "int8,bf16", "--json", "--quiet"]
    table = json.loads(run_cli(argv))
    assert table["unit"] == "ms" and len(table["layers"]) == 4
    assert all(row["int8"] > 0 and row["bf16"] > 0 for row in table["layers"])
    cache = list((tmp_path / "cache").rglob("*.json"))
    assert cache
    stamp = cache[0].stat().st_mtime_ns
    again = json.loads(run_cli(argv))  # served from the cache: nothing re-measured
    assert again == table and cache[0].stat().st_mtime_ns == stamp


def test_report_print(tmp_path):
    from fliqs_compiler import report as R
    R.write_report(tmp_path, sample_report())
    out = run_cli(["report", str(tmp_path), "--print"])
    assert "# fliqs report: demo" in out and "formats.png" in out
