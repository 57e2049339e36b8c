"""The runners a materialized graph is checked on, as one table (conformance checks and tools).

``BACKENDS[name]`` (a ``registry.Runner``) says which artifact the runner executes and how it is
loaded: the fx graph and ``onnx.reference`` on ``model.qdq.onnx`` for every run, then each
registered backend's own runners (``registry.Backend.runners``). ``load(name, graph, out_dir)``
builds that artifact once per ``out_dir`` (``model.qdq.onnx`` through ``onnx_export.export_qdq``,
a backend's own through its ``lower`` on its default target) and returns
``run(inputs: list[np.ndarray]) -> list[np.ndarray]``. Every backend is loaded the way a user
of the artifact would load it — ORT sessions with the options named in the table and nothing
else, the TVM library in a FRESH ``relax.VirtualMachine`` read back from the ``.so`` — so a
difference against ``REFERENCE`` (the fx graph, i.e. ``fliqs_compiler.numerics.quant.fake_quant``) is a
difference a deployment would see.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fliqs_compiler.backends import registry
from fliqs_compiler.backends.registry import Runner

__all__ = ["BACKENDS", "REFERENCE", "runners", "artifact", "load"]


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


def _flat(out) -> list:
    if torch.is_tensor(out):
        return [out.detach().float().numpy()]
    return [a for o in out for a in _flat(o)]


REFERENCE = "torch"
# The two runners of every run, whatever the target: the graph itself and the portable QDQ file.
_COMMON = {
    "torch": Runner("graph", _open_graph, "the materialized fx graph (fake-quant reference)"),
    "onnx_reference": Runner("onnx", _open_reference, "onnx.reference.ReferenceEvaluator"),
}


def runners() -> dict:
    """Every runner to check: the common two, then each registered backend's (``registry``), in
    registration order. A backend registered later (a plug-in, a test's toy) appears here."""
    out = dict(_COMMON)
    for name in registry.names():
        out.update(registry.get(name).runners)
    return out


BACKENDS: dict = runners()  # the table at import time (the conformance tests parametrize over it)


def artifact(kind: str, graph, out_dir: Path):
    """The artifact of ``kind`` for ``graph`` under ``out_dir``, built on first use (one export
    serves every ONNX backend; one compile the TVM one)."""
    out_dir = Path(out_dir)
    if kind == "graph":
        return graph
    if kind == "onnx":
        path = out_dir / "model.qdq.onnx"
        if not path.exists():
            from fliqs_compiler.backends.onnx_export import export_qdq
            export_qdq(graph, path)
        return path
    backend = registry.get(kind)  # a backend's own artifact: built by its lower, once
    done = out_dir / f".{kind}-artifact"
    if not done.exists():
        from fliqs_compiler.backends.targets import parse_target
        onnx_path = artifact("onnx", graph, out_dir)
        built = backend.lower(graph, parse_target(backend.default_target), out_dir, onnx_path)
        done.write_text(str(built.path))
    return Path(done.read_text())


def load(name: str, graph, out_dir: Path) -> Callable:
    """``run(inputs) -> outputs`` of backend ``name`` for ``graph`` (artifacts in ``out_dir``)."""
    b = BACKENDS[name] if name in BACKENDS else runners()[name]
    return b.open(artifact(b.artifact, graph, out_dir))
