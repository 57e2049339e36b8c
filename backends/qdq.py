"""The portable artifact every run writes: ``model.qdq.onnx``, exported from the materialized
graph and checked the way users run it — a default ``onnxruntime.InferenceSession`` (every graph
rewrite on), beside our exact session — or with ``onnx.reference`` where onnxruntime cannot load
the model (FP4 Q/DQ)."""
from __future__ import annotations

from pathlib import Path

from fliqs_compiler.backends.targets import default_threads as threads

__all__ = ["export_checked"]


def _quiet_exporter_logs() -> None:
    """torch.onnx logs one warning per missing torchvision op on every export; keep stderr for
    what matters."""
    import logging
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


def export_checked(fixed, out_dir: Path, inputs: list, notes: list, reference=None) -> tuple:
    """Export ``fixed`` to ``out_dir/model.qdq.onnx`` and check its numerics on ``inputs`` (lists
    of numpy arrays; ``inputs.description`` says what they are). Returns ``(path, runnable,
    facts)`` with facts ``ort_err`` (default session), ``ort_exact_err``, ``ort_default_lsb``,
    ``numerics_inputs``. ``reference``: an ``ort_backend.GraphReference`` of ``fixed`` on
    ``inputs`` to share with later artifact checks. Raises ``ort_backend.CheckFailed`` when the default session disagrees
    with the graph beyond ``ort_backend.DEFAULT_TOLERANCE_LSB``."""
    from fliqs_compiler.backends.onnx_export import export_qdq
    from fliqs_compiler.backends.ort_backend import check_numerics, compare, ort_can_run
    _quiet_exporter_logs()
    path = export_qdq(fixed, Path(out_dir) / "model.qdq.onnx")
    runnable = ort_can_run(path)
    facts = {"ort_err": None, "ort_exact_err": None, "ort_default_lsb": None,
             "numerics_inputs": getattr(inputs, "description", f"{len(inputs)} input batches")}
    if not runnable:
        notes.append("onnxruntime cannot load model.qdq.onnx (ort_backend.ort_can_run is false: "
                     "e.g. FLOAT4E2M1 Q/DQ, or a 4-bit activation its full graph optimizations "
                     "reject); numerics were checked with onnx.reference, no onnxruntime latency")
        facts["ort_err"] = max(float(compare(fixed, path, x, engine="reference", threads=threads()))
                               for x in inputs)
        return path, runnable, facts
    n = check_numerics(fixed, path, inputs, threads=threads(), reference=reference)
    facts.update(ort_err=n["default_err"], ort_exact_err=n["exact_err"], ort_default_lsb=n["default_lsb"])
    if n["cascade_rows"]:
        notes.append(f"numerics: {n['cascade_rows']} of {n['rows']} output rows differ from the torch "
                     f"graph by up to {n['default_lsb']:.1f} output LSB in the default AND the "
                     "unoptimized onnxruntime session alike: a float op (LayerNorm, softmax) rounds "
                     "differently from torch and flips a later quantizer's code, which propagates; "
                     "onnxruntime's rewrites change nothing there")
    return path, runnable, facts
