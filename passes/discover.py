"""Quantizable-node discovery: fill ``graph.layers`` with one ``LayerInfo`` per conv /
conv-transpose / linear (Gemm) / MatMul with a constant weight, and apply the keep-float rules.

MACs (batch included):
- conv: output elements × (Cin / groups) × prod(kernel);
- conv-transpose: input elements × (Cout / groups) × prod(kernel);
- linear: output elements × in_features; matmul: output elements × K.
``params`` counts the weight elements (the tensor the weight format applies to); the bias count
is in ``attrs['bias_params']``. Activation × activation MatMuls (attention scores Q·Kᵀ and
context A·V) are layers too (``quantize_act_matmul``, default; ``attrs['act_x_act']``); their
``params`` is 0 and their second operand plays the weight (its BOPs width counts).

Keep-float rules (configuration): the first / last quantizable layer in topological order
(``keep_float_first`` / ``keep_float_last``), and layers whose public name matches one of
``keep_float_patterns`` (``re.search``) get ``keep_float=True``.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from torch import fx

from fliqs_compiler.ir import ops as ir
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph, LayerInfo

from fliqs_compiler.passes._util import public_name
from fliqs_compiler.passes.manager import contract
from fliqs_compiler.passes.shape_prop import tensor_nodes_have_shape

__all__ = ["discover_quantizable", "layer_macs", "layers_discovered"]

_SIG_ARGS = ("stride", "padding", "dilation", "groups", "output_padding")


def _shape(x):
    return tuple(x.meta["shape"]) if isinstance(x, fx.Node) and "shape" in x.meta else None


def layer_macs(kind: str, in_shape, w_shape, out_shape, groups: int = 1) -> int:
    """MACs of one layer from its shapes (see the module docstring)."""
    if kind.startswith("conv_transpose"):
        return math.prod(in_shape) * w_shape[1] * math.prod(w_shape[2:])
    if kind.startswith("conv"):
        return math.prod(out_shape) * (in_shape[1] // groups) * math.prod(w_shape[2:])
    if kind == "linear":
        return math.prod(out_shape) * w_shape[-1]
    if kind == "matmul":
        return math.prod(out_shape) * in_shape[-1]
    raise ValueError(kind)


def _plain(v):
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def _compile_patterns(patterns: Sequence[str], option: str):
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise FliqsError(f"{option} {p!r}: not a valid regular expression ({e})") from None
    return out


# ---- contract conditions --------------------------------------------------------------------
def _constant_nodes(gm: fx.GraphModule) -> set:
    """Nodes that depend on no placeholder (one topological sweep, like ``ir.is_constant``)."""
    constant = set()
    for node in gm.graph.nodes:
        if node.op != "placeholder" and all(i in constant for i in node.all_input_nodes):
            constant.add(node)
    return constant


def _const(node, constant: set) -> bool:
    return not isinstance(node, fx.Node) or node in constant


def layers_discovered(graph: Graph):
    """Every conv / linear / MatMul with a constant weight on a computed input is a layer of
    ``graph.layers`` (``meta['fliqs_layer']`` = its name), and every ``LayerInfo.node`` is a node
    of the fx graph carrying that name."""
    constant = _constant_nodes(graph.gm)
    nodes = {}
    for node in graph.gm.graph.nodes:
        nodes[node.name] = node
        if ir.kind_of(node) not in ir.QUANTIZABLE_KINDS:
            continue
        if _const(ir.get_arg(node, "input"), constant) or \
                not _const(ir.get_arg(node, "weight"), constant):
            continue
        name = node.meta.get("fliqs_layer")
        if name not in graph.layers or graph.layers[name].node != node.name:
            return f"layer node {node.name} is missing from graph.layers"
    for name, layer in graph.layers.items():
        node = nodes.get(layer.node)
        if node is None:
            return f"layer {name}: fx node {layer.node!r} is not in the graph"
        if node.meta.get("fliqs_layer") != name:
            return f"layer {name}: fx node {layer.node} is marked {node.meta.get('fliqs_layer')!r}"
    return None


@contract(requires=[tensor_nodes_have_shape], ensures=[layers_discovered])
def discover_quantizable(graph: Graph, keep_float_first: bool = True,
                         keep_float_last: bool = True, keep_float_patterns: Sequence[str] = (),
                         quantize_act_matmul: bool = True) -> Graph:
    """Requires: ``tensor_nodes_have_shape`` (run ``propagate_shapes`` first). Ensures:
    ``layers_discovered``.

    ``graph.layers`` maps public name → LayerInfo (topological order) for every quantizable
    node; ``node.meta['fliqs_layer']`` = public name on those nodes; keep-float rules applied.
    Existing ``graph.layers`` is replaced."""
    patterns = _compile_patterns(keep_float_patterns, "keep-float pattern")
    layers: dict[str, LayerInfo] = {}
    for node in graph.gm.graph.nodes:
        kind = ir.kind_of(node)
        if kind not in ir.QUANTIZABLE_KINDS:
            continue
        x, w = ir.get_arg(node, "input"), ir.get_arg(node, "weight")
        const_w = ir.is_constant(w)
        if ir.is_constant(x):  # constant-folding material, not a layer
            continue
        if kind == "matmul" and not const_w and not quantize_act_matmul:
            continue
        if not const_w and kind != "matmul":
            continue  # a conv/linear with a computed weight (dynamic conv): not searched
        in_shape, w_shape, out_shape = _shape(x), _shape(w), _shape(node)
        if in_shape is None or w_shape is None or out_shape is None:
            raise FliqsError(f"node {public_name(node)}: shapes unknown; pin the input shapes "
                             "with --input-shape NAME=1x3x224x224")
        attrs = {}
        if kind.startswith("conv"):
            for k in _SIG_ARGS:
                if k == "output_padding" and not kind.startswith("conv_transpose"):
                    continue
                attrs[k] = _plain(ir.get_arg(node, k))
        bias = ir.get_arg(node, "bias") if "bias" in ir.spec_of(node).args else None
        attrs["bias"] = bias is not None
        attrs["bias_params"] = math.prod(_shape(bias)) if _shape(bias) else 0
        if kind == "matmul":
            attrs["act_x_act"] = not const_w
        groups = attrs.get("groups") or 1
        name = public_name(node)
        if name in layers:
            raise FliqsError(f"node name {name!r} is used twice; give the ONNX nodes unique names")
        layers[name] = LayerInfo(
            name=name, op=kind, node=node.name,
            macs=int(layer_macs(kind, in_shape, w_shape, out_shape, groups)),
            params=int(math.prod(w_shape)) if const_w else 0,
            weight_shape=w_shape, input_shape=in_shape, output_shape=out_shape,
            keep_float=any(p.search(name) for p in patterns), attrs=attrs)
        node.meta["fliqs_layer"] = name
    order = list(layers)
    # first/last among layers with a constant weight: act x act matmuls are never "the stem"
    weighted = [n for n in order if layers[n].params > 0] or order
    if weighted and keep_float_first:
        layers[weighted[0]].keep_float = True
    if weighted and keep_float_last:
        layers[weighted[-1]].keep_float = True
    graph.layers = layers
    return graph
