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


def test_search_with_separate_weight_and_activation_decisions(tmp_path, demo_model):
    """``--weight-activation separate``: two decisions per layer, and the configuration's BOPs
    (MACs x bits_w x bits_a, from ``inspect --json``) within the budget."""
    out = tmp_path / "s"
    run_cli(["search", str(demo_model), "--data", "digits", "--steps", "6", "--formats", "int2,int4,int8",
             "--budget", "bops=0.2x", "--weight-activation", "separate", "--out", str(out), "--quiet"])
    cfg = json.loads((out / "config.json").read_text())
    first = json.loads((out / "search.jsonl").read_text().splitlines()[0])
    assert len(first["choice"]) == 2 * len(cfg["formats"])
    macs = {n["name"]: n["macs"] for n in json.loads(run_cli(["inspect", str(demo_model), "--json"]))["nodes"]}
    bits = {"int2": 2, "int4": 4, "int8": 8}
    bops = sum(macs[name] * bits[f["weight"]] * bits[f["activation"]] for name, f in cfg["formats"].items())
    assert bops <= 0.2 * sum(macs[name] * 64 for name in cfg["formats"]) + 1e-6
    with pytest.raises(AssertionError, match="exit 2"):
        run_cli(["search", str(demo_model), "--weight-activation", "per-layer", "--out", str(tmp_path / "x")])


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


def test_profile_with_quantized_inputs_times_only_costed_layers(tmp_path, monkeypatch):
    """``--quantize-inputs`` adds input-only decisions (LayerNorm / softmax / GELU inputs): the
    table has no row for them (they cost nothing) and every other layer is still timed."""
    from onnx_models import make_vit
    monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path / "cache"))
    vit = make_vit(tmp_path)
    base = ["profile", str(vit), "--target", "ort", "--formats", "int8", "--json", "--quiet"]
    plain = json.loads(run_cli(base))
    with_inputs = json.loads(run_cli(base + ["--quantize-inputs", "layernorm,softmax,gelu"]))
    assert [r["node"] for r in with_inputs["layers"]] == [r["node"] for r in plain["layers"]]
    assert all(r["int8"] > 0 for r in with_inputs["layers"])
    inspected = json.loads(run_cli(["inspect", str(vit), "--json", "--quantize-inputs", "softmax"]))
    searched = [n["name"] for n in inspected["nodes"] if n["group"]]
    assert len(searched) > len(plain["layers"])  # the softmax inputs are searched, not timed


def test_profile_refuses_a_bad_quantize_inputs_op_before_reading_the_model(tmp_path):
    from click.testing import CliRunner
    from fliqs_compiler.cli.main import cli
    model = tmp_path / "m.onnx"
    model.write_bytes(b"never read")
    r = CliRunner().invoke(cli, ["profile", str(model), "--target", "ort",
                                 "--quantize-inputs", "layernorm,batchnorm"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "--quantize-inputs 'batchnorm'" in r.output
