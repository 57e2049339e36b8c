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

from fliqs_compiler.ir import ops as ir
from fliqs_compiler.ir.graph import Graph

from fliqs_compiler.passes.bn_fold import no_foldable_batch_norm
from fliqs_compiler.passes.manager import contract, numeric

__all__ = ["annotate_fusion", "is_nonneg", "nonneg_annotated", "fusion_on_layers"]

_ACTS = ("relu", "relu6", "hardtanh", "clamp", "sigmoid")
_LOWER_BOUND_ARG = {"clamp": "min", "hardtanh": "min_val"}


def is_nonneg(node) -> bool:
    """True if ``node`` was annotated non-negative by :func:`annotate_fusion`."""
    return isinstance(node, fx.Node) and bool(node.meta.get("nonneg"))


def _first_input_nonneg(node: fx.Node) -> bool:
    return is_nonneg(node.args[0] if node.args else None)


def _clamp_nonneg(node: fx.Node) -> bool:
    lo = ir.get_arg(node, _LOWER_BOUND_ARG[ir.kind_of(node)])
    return (isinstance(lo, (int, float)) and lo >= 0) or _first_input_nonneg(node)


def _add_nonneg(node: fx.Node) -> bool:
    return all(is_nonneg(a) or (isinstance(a, (int, float)) and a >= 0) for a in node.args[:2])


def _cat_nonneg(node: fx.Node) -> bool:
    tensors = ir.get_arg(node, "tensors") or []
    return bool(tensors) and all(is_nonneg(t) for t in tensors)


# op kind -> is its output non-negative (inputs already annotated: topological order)
_NONNEG_RULES = {
    **{kind: (lambda node: True) for kind in ir.NONNEG_KINDS},
    **{kind: _first_input_nonneg for kind in ir.TRANSPARENT_KINDS},
    "clamp": _clamp_nonneg, "hardtanh": _clamp_nonneg, "add": _add_nonneg, "cat": _cat_nonneg,
}


def _nonneg(graph: Graph, node: fx.Node) -> bool:
    rule = _NONNEG_RULES.get(ir.kind_of(node))
    if rule is not None:
        return rule(node)
    if node.op == "call_module" and getattr(graph.gm.get_submodule(node.target), "role",
                                            None) == "activation":
        return _first_input_nonneg(node)  # an activation quantizer keeps the sign
    return False


def _fusion(node: fx.Node) -> dict:
    """The fusion annotation of one quantizable layer (empty: nothing fuses)."""
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
    return fusion


# ---- contract conditions --------------------------------------------------------------------
def nonneg_annotated(graph: Graph):
    """Every node has a bool ``meta['nonneg']``."""
    for node in graph.gm.graph.nodes:
        if not isinstance(node.meta.get("nonneg"), bool):
            return f"node {node.name} has no bool meta['nonneg']"
    return None


def fusion_on_layers(graph: Graph):
    """``meta['fusion']`` sits only on quantizable layers, and its ``act_node`` is the layer's
    only user."""
    for node in graph.gm.graph.nodes:
        fusion = node.meta.get("fusion")
        if fusion is None:
            continue
        if ir.kind_of(node) not in ir.QUANTIZABLE_KINDS:
            return f"node {node.name} is not a quantizable layer but has meta['fusion']"
        if "act_node" in fusion and [u.name for u in node.users] != [fusion["act_node"]]:
            return f"layer {node.name}: fused activation {fusion['act_node']} is not its only user"
    return None


@numeric
@contract(requires=[no_foldable_batch_norm], ensures=[nonneg_annotated, fusion_on_layers])
def annotate_fusion(graph: Graph) -> Graph:
    """Requires: ``no_foldable_batch_norm`` (a layer→BN→ReLU chain fuses only once BN is
    folded). Ensures: ``nonneg_annotated``, ``fusion_on_layers``.

    ``meta['nonneg']`` on every node (bool), ``meta['fusion']`` on quantizable layers followed
    by an activation and/or a residual add. The graph's code is unchanged."""
    for node in graph.gm.graph.nodes:  # topological order: inputs are annotated first
        node.meta["nonneg"] = bool(_nonneg(graph, node))
    for node in graph.gm.graph.nodes:
        fusion = _fusion(node) if ir.kind_of(node) in ir.QUANTIZABLE_KINDS else {}
        if fusion:
            node.meta["fusion"] = fusion
        else:
            node.meta.pop("fusion", None)
    return graph
