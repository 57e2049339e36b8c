"""In-process CLI runs (click's CliRunner) and the report.json contract, written out here
independently of ``fliqs_compiler.report.CONTRACT`` so that a test of the CLI checks it."""
from __future__ import annotations

from click.testing import CliRunner

from fliqs_compiler.cli.main import cli

NUM, OPT_NUM, OPT_STR = (int, float), (int, float, type(None)), (str, type(None))
LAYER = {"node": str, "op": str, "macs": int, "params": int, "format_w": str, "format_a": str,
         "bops": int, "latency_ms": OPT_NUM, "executed_dtype": OPT_STR}
TOP = {
    "model": str, "target": str, "formats": list, "budget": {"kind": str, "value": NUM},
    "layers": list,
    "totals": {"bops": int, "float_bops": int, "size_bytes": int, "latency_ms": OPT_NUM},
    "quality": {"metric": str, "metric_reason": str, "float": NUM, "final": NUM},
    "baselines": list,
    "numerics": {"onnxruntime_max_abs_err": OPT_NUM, "tvm_max_abs_err": OPT_NUM},
    "timing_s": {"import": NUM, "passes": NUM, "search": NUM, "export": NUM, "lower": NUM},
    "environment": {"threads": int, "torch": str, "tvm": str, "onnxruntime": str, "cpu": str},
}
BASELINE = {"name": str, "bops": int, "quality": NUM, "latency_ms": OPT_NUM}


def _typed(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and not isinstance(value, bool)


def assert_contract(report: dict) -> None:
    """Every report.json field of the output contract (docs/design.md), with its type."""
    for key, spec in TOP.items():
        assert key in report, f"report.json lacks {key!r}"
        if isinstance(spec, dict):
            for sub, types in spec.items():
                assert sub in report[key], f"report.json lacks {key}.{sub}"
                assert _typed(report[key][sub], types), f"{key}.{sub} = {report[key][sub]!r}"
        else:
            assert _typed(report[key], spec), f"{key} = {report[key]!r}"
    assert all(isinstance(f, str) for f in report["formats"])
    for layer in report["layers"]:
        for k, types in LAYER.items():
            assert k in layer and _typed(layer[k], types), f"layer field {k}: {layer.get(k)!r}"
    for b in report["baselines"]:
        for k, types in BASELINE.items():
            assert k in b and _typed(b[k], types), f"baseline field {k}: {b.get(k)!r}"


def run_cli(argv) -> str:
    r = CliRunner().invoke(cli, argv)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, f"exit {r.exit_code}: {r.stderr}"
    return r.stdout
