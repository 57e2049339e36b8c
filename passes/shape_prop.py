"""Shape/dtype propagation: every node gets ``meta["shape"]`` (tuple) and ``meta["dtype"]``.

Runs the graph on fake tensors (``FakeTensorMode``) built from ``graph.inputs``, so nothing is
computed and no state (BatchNorm running statistics) is touched. Falls back to a real run on
``graph.example_inputs()`` under ``no_grad`` in eval mode if fake propagation fails (e.g. an op
without a fake kernel).
"""
from __future__ import annotations

import torch
from torch.fx.passes.shape_prop import ShapeProp

from fliqs_compiler.graph import Graph

from .manager import numeric, set_training

__all__ = ["propagate_shapes"]


def _copy_meta(graph: Graph) -> None:
    for n in graph.gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is None:
            continue
        if not hasattr(tm, "shape"):  # tuple outputs: describe the first tensor
            tm = next((t for t in tm if hasattr(t, "shape")), None) \
                if isinstance(tm, (list, tuple)) else None
            if tm is None:
                continue
        n.meta["shape"] = tuple(int(d) for d in tm.shape)
        n.meta["dtype"] = str(tm.dtype).replace("torch.", "")


@numeric
def propagate_shapes(graph: Graph) -> Graph:
    """Requires: ``graph.inputs`` describe the inputs with static shapes.
    Guarantees: each tensor-valued node has ``meta['shape']`` / ``meta['dtype']`` (and fx's
    ``meta['tensor_meta']``); the graph itself is unchanged."""
    gm = graph.gm
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake = [torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
                    for spec in graph.inputs]
        ShapeProp(gm, fake_mode=mode).propagate(*fake)
    except Exception:  # noqa: BLE001 — fall back to a real, side-effect-free run
        training = gm.training
        set_training(gm, False)
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*graph.example_inputs())
        finally:
            set_training(gm, training)
    _copy_meta(graph)
    return graph
