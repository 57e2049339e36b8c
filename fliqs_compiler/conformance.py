"""The backends a materialized graph runs on, as one table (conformance checks and tools).

``BACKENDS[name]`` says which artifact the backend executes and how it is loaded; ``load(name,
graph, out_dir)`` builds that artifact once per ``out_dir`` (``model.qdq.onnx`` through
``onnx_export.export_qdq``, ``tvm/model.so`` through ``tvm_lower.lower``) and returns
``run(inputs: list[np.ndarray]) -> list[np.ndarray]``. Every backend is loaded the way a user
of the artifact would load it — ORT sessions with the options named in the table and nothing
else, the TVM library in a FRESH ``relax.VirtualMachine`` read back from the ``.so`` — so a
difference against ``REFERENCE`` (the fx graph, i.e. ``fliqs_compiler.quant.fake_quant``) is a
difference a deployment would see.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["Backend", "BACKENDS", "REFERENCE", "artifact", "load"]


@dataclass(frozen=True)
class Backend:
    artifact: str  # 'graph' (the fx graph itself) | 'onnx' (model.qdq.onnx) | 'tvm' (tvm/model.so)
    open: Callable  # artifact -> run(inputs) -> outputs
    what: str


def _flat(out) -> list:
    if torch.is_tensor(out):
        return [out.detach().float().numpy()]
    return [a for o in out for a in _flat(o)]


def _open_graph(graph):
    def run(inputs):
        with torch.no_grad():
            return _flat(graph(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]))
    return run


def _open_reference(path: Path):
    import onnx
    from onnx.reference import ReferenceEvaluator
    model = onnx.load(str(path))
    ev, names = ReferenceEvaluator(model), [i.name for i in model.graph.input]
    return lambda inputs: [np.asarray(o) for o in ev.run(None, dict(zip(names, inputs)))]


def _ort(level: str | None):
    """An ORT session opener: ``level`` None is ``InferenceSession(path)`` with no options at all
    (what a user of the file gets: every graph rewrite on); else that graph optimization level."""
    def open_(path: Path):
        import onnxruntime as ort
        if level is None:
            sess = ort.InferenceSession(str(path))
        else:
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sess = ort.InferenceSession(str(path), sess_options=so)
        names = [i.name for i in sess.get_inputs()]
        return lambda inputs: sess.run(None, dict(zip(names, inputs)))
    return open_


def _open_tvm(path: Path):
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())

    def run(inputs):
        out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu()) for x in inputs])
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    return run


REFERENCE = "torch"
BACKENDS: dict[str, Backend] = {
    "torch": Backend("graph", _open_graph, "the materialized fx graph (fake-quant reference)"),
    "onnx_reference": Backend("onnx", _open_reference, "onnx.reference.ReferenceEvaluator"),
    "ort_default": Backend("onnx", _ort(None), "onnxruntime.InferenceSession(path), no options"),
    "ort_disable_all": Backend("onnx", _ort("ORT_DISABLE_ALL"),
                               "onnxruntime session, graph optimizations ORT_DISABLE_ALL"),
    "tvm": Backend("tvm", _open_tvm, "tvm_lower.lower(graph, 'llvm') -> tvm/model.so, fresh VM"),
}


def artifact(kind: str, graph, out_dir: Path):
    """The artifact of ``kind`` for ``graph`` under ``out_dir``, built on first use (one export
    serves every ONNX backend; one compile the TVM one)."""
    out_dir = Path(out_dir)
    if kind == "graph":
        return graph
    if kind == "onnx":
        path = out_dir / "model.qdq.onnx"
        if not path.exists():
            from .backends.onnx_export import export_qdq
            export_qdq(graph, path)
        return path
    if kind == "tvm":
        path = out_dir / "tvm" / "model.so"
        if not path.exists():
            from .backends.tvm_lower import lower
            lower(graph, "llvm", out_dir)
        return path
    raise ValueError(f"unknown artifact kind {kind!r}")


def load(name: str, graph, out_dir: Path) -> Callable:
    """``run(inputs) -> outputs`` of backend ``name`` for ``graph`` (artifacts in ``out_dir``)."""
    b = BACKENDS[name]
    return b.open(artifact(b.artifact, graph, out_dir))
