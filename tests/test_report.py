"""report.py: contract validation, atomic files, markdown content and the two plots."""
from __future__ import annotations

import copy
import json

import pytest

from fliqs_compiler import report as R
from fliqs_compiler.errors import FliqsError


def sample_report(sweep: bool = False) -> dict:
    layers = [
        {"node": "conv1", "op": "conv2d", "macs": 9216, "params": 160, "format_w": "float",
         "format_a": "float", "bops": 0, "latency_ms": None, "executed_dtype": "float32"},
        {"node": "conv2", "op": "conv2d", "macs": 294912, "params": 4640, "format_w": "int4",
         "format_a": "int8", "bops": 294912 * 32, "latency_ms": 0.01, "executed_dtype": "int8"},
        {"node": "conv3", "op": "conv2d", "macs": 147456, "params": 9248, "format_w": "fp8_e4m3",
         "format_a": "fp8_e4m3", "bops": 147456 * 64, "latency_ms": 0.02, "executed_dtype": "float8_e4m3fn"},
        {"node": "fc", "op": "linear", "macs": 320, "params": 330, "format_w": "float",
         "format_a": "float", "bops": 0, "latency_ms": None, "executed_dtype": None},
    ]
    r = {"model": "demo", "target": "llvm", "formats": ["int4", "int8", "fp8_e4m3"],
         "budget": {"kind": "bops", "value": 2.0e7, "text": "bops=0.5x"},
         "layers": layers,
         "totals": {"bops": 294912 * 32 + 147456 * 64, "float_bops": 9536 * 1024,
                    "size_bytes": 11568, "latency_ms": 0.5},
         "quality": {"metric": "accuracy", "float": 0.99, "final": 0.975},
         "baselines": [{"name": "uniform int8", "bops": 28311552, "quality": 0.98, "latency_ms": None}],
         "numerics": {"onnxruntime_max_abs_err": 1e-6, "tvm_max_abs_err": None},
         "timing_s": {"import": 0.1, "passes": 0.2, "search": 3.0, "export": 0.4, "lower": 1.0},
         "environment": {"threads": 2, "torch": "2.13", "tvm": "0.27", "onnxruntime": "1.32",
                         "cpu": "x86_64"},
         "data": {"spec": "digits", "train": 1438, "holdout": 359, "holdout_fraction": 0.2}}
    if sweep:
        r["sweep"] = [{"budget": "bops=0.2x", "bops": 5_000_000, "quality": 0.95, "latency_ms": 0.4},
                      {"budget": "bops=0.5x", "bops": 18_874_368, "quality": 0.975, "latency_ms": 0.5}]
    return r


def test_sample_meets_contract():
    assert R.validate_report(sample_report()) == []


@pytest.mark.parametrize("path,mutate,expect", [
    (("totals",), lambda d: d.pop("bops"), "report.totals.bops: missing"),
    (("layers", 1), lambda d: d.update(macs=1.5), "report.layers[1].macs: expected int"),
    (("numerics",), lambda d: d.update(tvm_max_abs_err="x"), "report.numerics.tvm_max_abs_err"),
    ((), lambda d: d.pop("environment"), "report.environment: missing"),
    ((), lambda d: d.update(formats="int8"), "report.formats: expected a list"),
    (("quality",), lambda d: d.update(final=True), "report.quality.final: expected"),
])
def test_validate_names_the_broken_field(path, mutate, expect):
    r = sample_report()
    node = r
    for key in path:
        node = node[key]
    mutate(node)
    problems = R.validate_report(r)
    assert problems and any(p.startswith(expect) for p in problems), problems


def test_write_report_files_and_markdown(tmp_path):
    paths = R.write_report(tmp_path, sample_report())
    assert set(paths) == {"report.json", "report.md", "formats.png"}
    assert json.loads((tmp_path / "report.json").read_text())["model"] == "demo"
    md = (tmp_path / "report.md").read_text()
    for needle in ("budget asked", "budget achieved", "float 99.00 % → final 97.50 %", "`conv2`",
                   "int4", "uniform int8", "1438 examples", "20 %", "2 threads"):
        assert needle in md, needle
    assert (tmp_path / "formats.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "pareto.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_sweep_draws_pareto(tmp_path):
    paths = R.write_report(tmp_path, sample_report(sweep=True))
    assert paths["pareto.png"].read_bytes()[:4] == b"\x89PNG"
    assert "## Sweep" in (tmp_path / "report.md").read_text()


def test_write_refuses_broken_report(tmp_path):
    r = sample_report()
    del r["timing_s"]
    with pytest.raises(ValueError, match="timing_s"):
        R.write_report(tmp_path, r)
    assert list(tmp_path.iterdir()) == []


def test_render_from_dir_and_errors(tmp_path):
    R.write_report(tmp_path, sample_report())
    (tmp_path / "report.md").unlink()
    R.render(tmp_path)
    assert (tmp_path / "report.md").exists()
    with pytest.raises(FliqsError, match="no report.json"):
        R.render(tmp_path / "nope")
    (tmp_path / "report.json").write_text("{broken")
    with pytest.raises(FliqsError, match="not readable JSON"):
        R.render(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(FliqsError, match="not a fliqs report"):
        R.render(tmp_path)


def test_many_layers_plot(tmp_path):
    r = sample_report()
    base = r["layers"][1]
    r["layers"] = [dict(copy.deepcopy(base), node=f"layer{i}") for i in range(30)]
    R.plot_formats(r, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
