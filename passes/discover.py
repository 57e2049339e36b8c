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

Input-only layers (``quantize_inputs``, off by default): the input activation of a LayerNorm,
softmax or GELU (``INPUT_OPS``; GELU also in the ``x·0.5·(1 + erf(x/√2))`` form ONNX exporters
write) becomes a layer with ``attrs['input_only']``, op ``layer_norm`` / ``softmax`` / ``gelu``, no
weight, ``macs`` and ``params`` 0: the op still runs in float on the dequantized input, so it
has no multiply-accumulates for BOPs and no weight for size (docs/method.md, "Cost models").
``input_operand`` gives the tensor it quantizes and the nodes that read it.

Keep-float rules (configuration): the first / last quantizable layer in topological order
(``keep_float_first`` / ``keep_float_last``), and layers whose public name matches one of
``keep_float_patterns`` (``re.search``) get ``keep_float=True``.
"""
from __future__ import annotations

import math
import operator
import re
from typing import Optional, Sequence

import torch
from torch import fx

from fliqs_compiler.ir import ops as ir
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph, LayerInfo

from fliqs_compiler.passes._util import public_name
from fliqs_compiler.passes.manager import contract
from fliqs_compiler.passes.shape_prop import tensor_nodes_have_shape

__all__ = ["discover_quantizable", "layer_macs", "layers_discovered", "INPUT_OPS",
           "input_operand"]

# ``quantize_inputs`` values → the ir kind of the op whose input activation becomes a decision
INPUT_OPS = {"layernorm": "layer_norm", "softmax": "softmax", "gelu": "gelu"}
_ERF = (torch.erf, torch.ops.aten.erf.default)
_SCALE = (torch.div, torch.mul, operator.truediv, operator.mul, torch.ops.aten.div.Tensor,
          torch.ops.aten.mul.Tensor)

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


def _shapes_unknown(node: fx.Node) -> FliqsError:
    return FliqsError(f"node {public_name(node)}: shapes unknown; pin the input shapes with "
                      "--input-shape NAME=1x3x224x224")


def _reaches(start: fx.Node, target: fx.Node, hops: int) -> bool:
    frontier = {start}
    for _ in range(hops):
        frontier = {u for n in frontier for u in n.users}
        if target in frontier:
            return True
    return False


def _erf_gelu(erf: fx.Node) -> Optional[tuple]:
    """``(x, [nodes reading x])`` when ``erf`` is the Erf of an exported GELU
    ``x·0.5·(1 + erf(x·c))``: the scaling of x that feeds it and the Mul by x after it."""
    scaled = erf.args[0] if erf.args else None
    if not (isinstance(scaled, fx.Node) and scaled.op == "call_function" and scaled.target in _SCALE
            and len(scaled.args) == 2 and isinstance(scaled.args[0], fx.Node)
            and ir.is_constant(scaled.args[1])):
        return None
    x = scaled.args[0]
    product = [u for u in x.users if u is not scaled and _reaches(erf, u, 3)]
    return (x, [scaled, *product]) if len(product) == 1 else None


def input_operand(node: fx.Node, kinds=tuple(INPUT_OPS.values())) -> Optional[tuple]:
    """``(x, readers)`` for a node whose input activation can be an input-only layer: the tensor
    and the nodes of the op that read it (the node itself; for an exported erf GELU, its scaling
    and its product). None for any other node. After ``insert_quantizers`` x is the quantizer."""
    kind = ir.kind_of(node)
    if kind in kinds:
        x = ir.get_arg(node, "input")
        return (x, [node]) if isinstance(x, fx.Node) else None
    if "gelu" in kinds and node.op == "call_function" and node.target in _ERF:
        return _erf_gelu(node)
    return None


def _input_only_layer(node: fx.Node, kinds: tuple) -> Optional[LayerInfo]:
    found = input_operand(node, kinds)
    if found is None or ir.is_constant(found[0]):
        return None
    shape = _shape(found[0])
    if shape is None:
        raise _shapes_unknown(node)
    op = ir.kind_of(node) or "gelu"
    return LayerInfo(name=public_name(node), op=op, node=node.name, input_shape=shape,
                     output_shape=shape, attrs={"input_only": True})


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


def _register(layers: dict, node: fx.Node, layer: LayerInfo) -> None:
    if layer.name in layers:
        raise FliqsError(f"node name {layer.name!r} is used twice; give the ONNX nodes unique names")
    layers[layer.name] = layer
    node.meta["fliqs_layer"] = layer.name


@contract(requires=[tensor_nodes_have_shape], ensures=[layers_discovered])
def discover_quantizable(graph: Graph, keep_float_first: bool = True,
                         keep_float_last: bool = True, keep_float_patterns: Sequence[str] = (),
                         quantize_act_matmul: bool = True,
                         quantize_inputs: Sequence[str] = ()) -> Graph:
    """Requires: ``tensor_nodes_have_shape`` (run ``propagate_shapes`` first). Ensures:
    ``layers_discovered``.

    ``graph.layers`` maps public name → LayerInfo (topological order) for every quantizable
    node, and for every op named in ``quantize_inputs`` (``INPUT_OPS`` keys) an input-only
    layer; ``node.meta['fliqs_layer']`` = public name on those nodes; keep-float rules applied.
    Existing ``graph.layers`` is replaced."""
    patterns = _compile_patterns(keep_float_patterns, "keep-float pattern")
    input_kinds = tuple(INPUT_OPS[k] for k in quantize_inputs)
    layers: dict[str, LayerInfo] = {}
    for node in graph.gm.graph.nodes:
        kind = ir.kind_of(node)
        if kind not in ir.QUANTIZABLE_KINDS:
            layer = _input_only_layer(node, input_kinds) if input_kinds else None
            if layer is not None:
                layer.keep_float = any(p.search(layer.name) for p in patterns)
                _register(layers, node, layer)
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
            raise _shapes_unknown(node)
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
        _register(layers, node, LayerInfo(
            name=name, op=kind, node=node.name,
            macs=int(layer_macs(kind, in_shape, w_shape, out_shape, groups)),
            params=int(math.prod(w_shape)) if const_w else 0,
            weight_shape=w_shape, input_shape=in_shape, output_shape=out_shape,
            keep_float=any(p.search(name) for p in patterns), attrs=attrs))
    order = list(layers)
    # first/last among layers with a constant weight: act x act matmuls are never "the stem"
    weighted = [n for n in order if layers[n].params > 0] or order
    if weighted and keep_float_first:
        layers[weighted[0]].keep_float = True
    if weighted and keep_float_last:
        layers[weighted[-1]].keep_float = True
    graph.layers = layers
    return graph
