"""Assembling the ``report.json`` dict of a run from what the driver measured.

The report layer takes everything as arguments (graph, formats, a latency model, backend facts,
dataset, search facts), so it needs no import of the driver, search, passes or backends; the
cost functions come from ``fliqs_compiler.cost`` (imported lazily to keep ``import`` light).
"""
from __future__ import annotations

from fliqs_compiler.report.environment import environment

__all__ = ["build_report", "layer_rows", "artifact_bytes"]

# timing_s: the contract's stages first (0.0 when a stage did not run), then any others
CONTRACT_STAGES = ("import", "passes", "search", "export", "lower")


def _layer_ms(latency, layer, fw: str, fa: str):
    """A layer's latency from the table, or None (no table, a float layer, or a missing pair)."""
    if latency is None or layer.keep_float:
        return None
    try:
        return float(latency.layer_ms(layer, fw, fa))
    except Exception:  # noqa: BLE001 — a pair the table has no entry for
        return None


def layer_rows(graph, formats: dict, latency, executed: dict) -> list:
    """One ``report.json`` layer row per quantizable layer (keep-float layers included)."""
    from fliqs_compiler.numerics import formats as F
    from fliqs_compiler.cost.model import layer_bops
    rows = []
    for layer in graph.layers.values():
        entry = formats.get(layer.name) or {}
        fw = F.get(entry.get("weight", "float")).name
        fa = F.get(entry.get("activation", entry.get("weight", "float"))).name
        ex = executed.get(layer.name) or {}
        rows.append({"node": layer.name, "op": layer.op, "macs": int(layer.macs),
                     "params": int(layer.params), "format_w": fw, "format_a": fa,
                     "bops": int(layer_bops(layer, fw, fa)),
                     "latency_ms": _layer_ms(latency, layer, fw, fa),
                     "executed_dtype": ex.get("dtype") if isinstance(ex, dict) else str(ex),
                     "kernel": ex.get("kernel") if isinstance(ex, dict) else None,
                     "weight_storage": ex.get("weight_storage") if isinstance(ex, dict) else None,
                     "keep_float": bool(layer.keep_float), "group": layer.group})
    return rows


def _totals(graph, formats: dict, latency, facts: dict) -> dict:
    """``bops``/``size_bytes`` count the searched layers (what a budget constrains);
    ``float_bops``/``float_size_bytes`` the layers kept in float (float32 weights)."""
    from fliqs_compiler.cost.model import config_cost, float_bops
    searched_ms = None
    if latency is not None:
        try:
            searched_ms = float(config_cost(graph, formats, "latency", latency))
        except Exception:  # noqa: BLE001 — the table lacks a chosen pair: no searched latency
            searched_ms = None
    return {"bops": int(config_cost(graph, formats, "bops")), "float_bops": int(float_bops(graph)),
            "size_bytes": int(config_cost(graph, formats, "size")),
            "latency_ms": facts.get("latency_ms"), "searched_latency_ms": searched_ms,
            "float_size_bytes": int(sum(4 * la.params for la in graph.layers.values()
                                        if la.keep_float))}


def _numerics(facts: dict) -> dict:
    """Backend checks. ``onnxruntime_max_abs_err``: a default ``onnxruntime.InferenceSession``
    (what users run) vs the quantized torch graph; ``onnxruntime_exact_max_abs_err``: our exact
    session; ``onnxruntime_default_lsb``: the default session's max |err| in output LSBs;
    ``tvm_lsb``: the TVM artifact's (a fresh VM on the .so) max |err| in output LSBs;
    ``numerics_inputs``: what the checks ran on."""
    return {"onnxruntime_max_abs_err": facts.get("ort_err"),
            "onnxruntime_exact_max_abs_err": facts.get("ort_exact_err"),
            "onnxruntime_default_lsb": facts.get("ort_default_lsb"),
            "tvm_max_abs_err": facts.get("tvm_err"), "tvm_lsb": facts.get("tvm_lsb"),
            "numerics_inputs": facts.get("numerics_inputs")}


def _timing(timing: dict) -> dict:
    timing_s = {k: round(float(timing.get(k, 0.0)), 3) for k in CONTRACT_STAGES}
    timing_s.update({k: round(float(v), 3) for k, v in timing.items() if k not in timing_s})
    return timing_s


def _data(dataset) -> dict:
    """The data split: examples that trained the shared weights, held out, and scored."""
    n_train, n_val = len(dataset.x_train), len(dataset.x_val)
    return {"description": dataset.description, "labels": dataset.y_val is not None,
            "train": n_train, "holdout": n_val,
            "holdout_fraction": round(n_val / max(1, n_train + n_val), 4),
            "quality_examples": len(dataset.x_test),
            "quality_split": "validation" if dataset.x_test is dataset.x_val else "test"}


def artifact_bytes(out_dir, files: dict) -> dict:
    """``{file key: bytes}`` of the report's artifact files that exist as plain files under
    ``out_dir`` (``tvm``: the TVM library, ``onnx``: the QDQ model; folders are skipped)."""
    from pathlib import Path
    sizes = {}
    for key, rel in files.items():
        path = Path(out_dir) / rel
        if path.is_file():
            sizes[key] = path.stat().st_size
    return sizes


def build_report(*, graph, model_name: str, target, formats_searched: list, budget, budget_value,
                 formats: dict, quality: dict, facts: dict, timing: dict, latency, dataset,
                 search_info: dict, baselines: list, notes: list, files: dict) -> dict:
    """The report.json dict: every contract field (``report.contract.CONTRACT``) plus context
    (data split, search facts, notes, files). Key order is the order report.json shows."""
    return {
        "model": model_name, "target": str(target.text), "formats": list(formats_searched),
        "budget": {"kind": budget.kind, "value": float(budget_value), "text": budget.text,
                   "relative": bool(budget.relative)},
        "layers": layer_rows(graph, formats, latency, facts.get("executed") or {}),
        "totals": _totals(graph, formats, latency, facts),
        "quality": quality,
        "baselines": baselines,
        "numerics": _numerics(facts),
        "timing_s": _timing(timing),
        "environment": environment(),
        "data": _data(dataset),
        "search": search_info,
        "notes": notes,
        "files": files,
    }
