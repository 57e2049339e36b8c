"""A complete, valid report dict (the report.json contract) for tests of the report layer and of
``fliqs report``: four layers of the demo CNN, one baseline, optionally a two-point sweep."""
from __future__ import annotations


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
         "quality": {"metric": "accuracy", "metric_reason": "labels and first output [N, C] logits",
                     "float": 0.99, "final": 0.975},
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
