"""The ``report.json`` contract as data (``CONTRACT``) and its check (``validate_report``).

The contract is what users and tools may rely on: every field below, with these types (a list
spec ``[x]`` means "a list whose items match x"; a tuple is "any of these types"; ``bool`` never
counts as a number). Extra fields are allowed and are not part of the contract.
"""
from __future__ import annotations

__all__ = ["CONTRACT", "validate_report"]

NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))
CONTRACT = {
    "model": str, "target": str, "formats": [str], "budget": {"kind": str, "value": NUM},
    "layers": [{"node": str, "op": str, "macs": int, "params": int, "format_w": str,
                "format_a": str, "bops": int, "latency_ms": OPT_NUM, "executed_dtype": OPT_STR}],
    "totals": {"bops": int, "float_bops": int, "size_bytes": int, "latency_ms": OPT_NUM},
    # metric: a search.trainer.QUALITY name; metric_reason: why it was chosen (auto_metric's
    # rule, or "given (--metric NAME)")
    "quality": {"metric": str, "metric_reason": str, "float": NUM, "final": NUM},
    "baselines": [{"name": str, "bops": int, "quality": NUM, "latency_ms": OPT_NUM}],
    # onnxruntime_max_abs_err: a DEFAULT onnxruntime.InferenceSession(path) (what users run) vs
    # the quantized torch graph. Extra fields written by build_report: onnxruntime_exact_max_abs_err
    # (our exact session), onnxruntime_default_lsb (the default session's max |err| in output
    # LSBs, ort_backend.output_steps), tvm_lsb (the same for the TVM artifact; compile fails when
    # most output rows are beyond 2 LSB: ort_backend.check_artifact), numerics_inputs (what the
    # checks ran on).
    "numerics": {"onnxruntime_max_abs_err": OPT_NUM, "tvm_max_abs_err": OPT_NUM},
    "timing_s": {"import": NUM, "passes": NUM, "search": NUM, "export": NUM, "lower": NUM},
    "environment": {"threads": int, "torch": str, "tvm": str, "onnxruntime": str, "cpu": str},
}


def _check(value, spec, where: str, problems: list) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{where}.{key}: missing")
            else:
                _check(value[key], sub, f"{where}.{key}", problems)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list")
            return
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]", problems)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) or not isinstance(value, types):
            names = "|".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{where}: expected {names}, got {type(value).__name__}")


def validate_report(report: dict) -> list:
    """Every contract field present with its type → ``[]``; else a list of problems
    (``"report.totals.bops: missing"``, ...). Extra fields are allowed."""
    problems: list = []
    _check(report, CONTRACT, "report", problems)
    return problems

