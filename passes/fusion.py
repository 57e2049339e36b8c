"""Fusion annotation: which layers a backend executes as one kernel, and which tensors are
known to be non-negative.

Patterns (annotation only, the graph is not rewritten):
- ``layer (+ bias) → activation`` where the layer's only user is a ReLU / ReLU6 / Clip / Hardtanh /
  Sigmoid: ``node.meta['fusion'] = {'act': kind, 'act_node': name}`` on the layer;
- ``layer (→ activation) → Add`` (a residual add): ``meta['fusion']['residual_add'] = add node``.

Non-negativity (``node.meta['nonneg'] = True``): outputs of ReLU / ReLU6 / Sigmoid / Softmax,
Clip / Hardtanh with a lower bound ≥ 0, and shape/pooling ops, Add and Concat whose inputs are
all non-negative. Activation quantizers read it: such inputs get
``SearchableQuantizer(unsigned=True)``.
"""
from __future__ import annotations

from torch import fx

from fliqs_compiler import ir
from fliqs_compiler.graph import Graph

from .manager import numeric

__all__ = ["annotate_fusion", "is_nonneg"]

_ACTS = ("relu", "relu6", "hardtanh", "clamp", "sigmoid")


def _lower_bound_nonneg(node: fx.Node) -> bool:
    kind = ir.kind_of(node)
    if kind == "clamp":
        lo = ir.get_arg(node, "min")
    elif kind == "hardtanh":
        lo = ir.get_arg(node, "min_val")
    else:
        return False
    return isinstance(lo, (int, float)) and lo >= 0


def is_nonneg(node) -> bool:
    """True if ``node`` was annotated non-negative by :func:`annotate_fusion`."""
    return isinstance(node, fx.Node) and bool(node.meta.get("nonneg"))


@numeric
def annotate_fusion(graph: Graph) -> Graph:
    """Requires: nothing (shapes optional). Guarantees: ``meta['nonneg']`` on every node (bool),
    ``meta['fusion']`` on quantizable layers followed by an activation and/or a residual add.
    The graph's code is unchanged."""
    for node in graph.gm.graph.nodes:  # topological order: inputs are annotated first
        kind = ir.kind_of(node)
        nonneg = False
        if kind in ir.NONNEG_KINDS or (kind in ("clamp", "hardtanh")
                                       and _lower_bound_nonneg(node)):
            nonneg = True
        elif kind in ir.TRANSPARENT_KINDS or kind in ("clamp", "hardtanh"):
            src = node.args[0] if node.args else None
            nonneg = is_nonneg(src)
        elif kind == "add":
            args = [a for a in node.args[:2]]
            nonneg = all(is_nonneg(a) or (isinstance(a, (int, float)) and a >= 0) for a in args)
        elif kind == "cat":
            tensors = ir.get_arg(node, "tensors") or []
            nonneg = bool(tensors) and all(is_nonneg(t) for t in tensors)
        elif node.op == "call_module" and getattr(graph.gm.get_submodule(node.target),
                                                  "role", None) == "activation":
            nonneg = is_nonneg(node.args[0])  # an activation quantizer keeps the sign
        node.meta["nonneg"] = nonneg
    for node in graph.gm.graph.nodes:
        if ir.kind_of(node) not in ir.QUANTIZABLE_KINDS:
            continue
        fusion = {}
        tail = node
        users = list(node.users)
        if len(users) == 1 and ir.kind_of(users[0]) in _ACTS:
            fusion["act"] = ir.kind_of(users[0])
            fusion["act_node"] = users[0].name
            tail = users[0]
        tail_users = list(tail.users)
        if len(tail_users) == 1 and ir.kind_of(tail_users[0]) == "add":
            add = tail_users[0]
            other = [a for a in add.args[:2] if a is not tail]
            if other and not ir.is_constant(other[0]):  # a constant operand is a bias add
                fusion["residual_add"] = add.name
        if fusion:
            node.meta["fusion"] = fusion
        else:
            node.meta.pop("fusion", None)
    return graph
