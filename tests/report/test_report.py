"""fliqs_compiler.report: contract validation, atomic files, markdown content, the two plots, and
the report layer's imports (only base, numerics, ir and cost of fliqs_compiler)."""
from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fliqs_compiler import report as R
from fliqs_compiler.base.errors import FliqsError

from report_samples import sample_report


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


REPORT_DIR = Path(R.__file__).parent
# the layers below the report (and the report itself); driver, search, passes, backends sit above
REPORT_MAY_IMPORT = ("base", "numerics", "ir", "cost", "report")


def _fliqs_imports(path: Path) -> set:
    """Every ``fliqs_compiler.*`` module a source file imports, lazily inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{a.name}" for a in node.names)
            if node.level:  # a relative import stays inside the report package
                found.add("fliqs_compiler.report")
    return {name for name in found if name.startswith("fliqs_compiler")}


@pytest.mark.parametrize("path", sorted(REPORT_DIR.glob("*.py")), ids=lambda p: p.name)
def test_report_imports_only_lower_layers(path):
    bad = sorted(name for name in _fliqs_imports(path)
                 if (name.split(".") + [""])[1] not in REPORT_MAY_IMPORT)
    assert not bad, f"{path.name} imports {bad}"


def test_import_report_loads_no_upper_layer():
    code = ("import sys, fliqs_compiler.report; print(sorted(m for m in sys.modules if "
            "m.split('.')[:2] in (['fliqs_compiler', 'driver'], ['fliqs_compiler', 'search'], "
            "['fliqs_compiler', 'passes'], ['fliqs_compiler', 'backends'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
