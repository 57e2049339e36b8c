"""Check an imported graph against onnxruntime (``fliqs inspect --verify``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph

__all__ = ["verify_onnx_import", "ort_session", "run_ort"]


def ort_session(model_path, threads: int = 2):
    """An onnxruntime CPU session with ``threads`` intra-op threads and BASIC graph optimizations.

    BASIC, not ALL: onnxruntime 1.32's extended QDQ fusions change results for int4 / fp8
    Relu→QuantizeLinear chains (measured: max error 1.9 on a small int4 model), so the reference
    must run the graph as written.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FliqsError(f"{model_path}: onnxruntime cannot load the model ({msg[:200]})") from None


def run_ort(model_path, inputs: dict, threads: int = 2) -> list[np.ndarray]:
    """Run ``model_path`` on ``{name: array}`` with :func:`ort_session`; returns all outputs."""
    return ort_session(model_path, threads).run(None, inputs)


def verify_onnx_import(graph: Graph, model_path, rtol: float = 1e-4, atol: float = 1e-5,
                       seed: int = 0) -> tuple[bool, float]:
    """Run ``graph`` and onnxruntime (2 threads) on the same seeded random inputs.

    Requires: ``graph`` imported from ``model_path`` (same input names/order).
    Guarantees: ``ok`` is True iff every output satisfies ``|ours - ort| <= atol + rtol*|ort|``
    (and shapes match); ``max_abs_err`` is the largest absolute difference over all outputs.
    """
    inputs = graph.example_inputs(seed)
    feed = {spec.name: t.numpy() for spec, t in zip(graph.inputs, inputs)}
    ref = run_ort(Path(model_path), feed)
    with torch.no_grad():
        ours = graph(*inputs)
    ours = list(ours) if isinstance(ours, (tuple, list)) else [ours]
    if len(ours) != len(ref):
        return False, float("inf")
    ok, worst = True, 0.0
    for o, r in zip(ours, ref):
        o = o.detach().cpu().numpy()
        if o.shape != r.shape:
            return False, float("inf")
        if r.dtype == np.bool_ or not np.issubdtype(r.dtype, np.number):
            same = np.array_equal(o, r)
            ok &= same
            worst = max(worst, 0.0 if same else float("inf"))
            continue
        diff = np.abs(o.astype(np.float64) - r.astype(np.float64))
        nan_same = np.isnan(o) & np.isnan(r) if np.issubdtype(r.dtype, np.floating) else False
        diff = np.where(nan_same, 0.0, diff)
        if diff.size:
            worst = max(worst, float(np.nanmax(np.where(np.isnan(diff), np.inf, diff))))
        ok &= bool(np.all(diff <= atol + rtol * np.abs(r.astype(np.float64))))
    return bool(ok), worst
