"""Shape/dtype propagation: every node gets ``meta["shape"]`` (tuple) and ``meta["dtype"]``.

Runs the graph on fake tensors (``FakeTensorMode``) built from ``graph.inputs``, so nothing is
computed and no state (BatchNorm running statistics) is touched. Falls back to a real run on
``graph.example_inputs()`` under ``no_grad`` in eval mode if fake propagation fails (e.g. an op
without a fake kernel).
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fliqs_compiler.ir import ops as ir
from fliqs_compiler.ir.graph import Graph

from fliqs_compiler.passes.manager import contract, numeric, set_training

__all__ = ["propagate_shapes", "inputs_have_static_shapes", "tensor_nodes_have_shape"]


# ---- contract conditions --------------------------------------------------------------------
def _static_dim(d) -> bool:
    try:
        return operator.index(d) >= 0
    except TypeError:
        return False


def inputs_have_static_shapes(graph: Graph):
    """``graph.inputs`` describes each placeholder, with a static shape."""
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(graph.inputs):
        return (f"{len(placeholders)} placeholders but {len(graph.inputs)} input specs "
                f"({[spec.name for spec in graph.inputs]})")
    for spec in graph.inputs:
        if not all(_static_dim(d) for d in spec.shape):
            return f"input {spec.name!r} has a non-static shape {tuple(spec.shape)}"
    return None


def _missing_shape(node) -> bool:
    return isinstance(node, fx.Node) and not ("shape" in node.meta and "dtype" in node.meta)


def tensor_nodes_have_shape(graph: Graph):
    """Placeholders, and every quantizable-kind node with its input and weight, carry
    ``meta['shape']`` and ``meta['dtype']`` (what discovery and costs read)."""
    for node in graph.gm.graph.nodes:
        if node.op == "placeholder":
            looked_at = (node,)
        elif ir.kind_of(node) in ir.QUANTIZABLE_KINDS:
            looked_at = (node, ir.get_arg(node, "input"), ir.get_arg(node, "weight"))
        else:
            continue
        missing = next((n for n in looked_at if _missing_shape(n)), None)
        if missing is not None:
            return f"node {missing.name} has no meta['shape'] / meta['dtype']"
    return None


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
@contract(requires=[inputs_have_static_shapes], ensures=[tensor_nodes_have_shape])
def propagate_shapes(graph: Graph) -> Graph:
    """Requires: ``inputs_have_static_shapes``. Ensures: ``tensor_nodes_have_shape``.

    Each tensor-valued node gets ``meta['shape']`` / ``meta['dtype']`` (and fx's
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
