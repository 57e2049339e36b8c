"""Insert searchable quantize nodes (docs/design.md, "Quantized graph shape").

For each searched layer ``L`` (public name), reading activation ``a`` and weight ``w``::

    a ─► call_module <L>_aq (SearchableQuantizer role=activation, per tensor) ─┐
    w ─► call_module <L>_wq (SearchableQuantizer role=weight, per output channel) ┴► L

Weight quantizers are per channel along the output-channel axis with ``block_axis`` = the
reduction axis (conv/linear: 0 / 1; conv-transpose: 1 / 0; MatMul ``[.., K, N]``: -1 / -2).
Activation quantizers are per tensor with ``block_axis`` 1 (conv, NCHW) or -1 (linear, MatMul),
and ``unsigned=True`` where the fusion pass proved the input non-negative. For an activation ×
activation MatMul the ``weight`` quantizer is per tensor on the second operand. An input-only
layer (a LayerNorm / softmax / GELU input, ``discover.input_operand``) gets only ``<L>_aq``, per
tensor with ``block_axis`` -1, between its input and the op's nodes that read it (other readers of
that tensor, e.g. a residual Add, stay float). Each candidate format owns its scale
(SearchableQuantizer).
"""
from __future__ import annotations

from torch import fx

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir import ops as ir
from fliqs_compiler.ir.graph import Graph
from fliqs_compiler.ir.space import roles_of
from fliqs_compiler.numerics.quantizers import SearchableQuantizer

from fliqs_compiler.passes._util import sanitize, unique_attr
from fliqs_compiler.passes.discover import input_operand, layers_discovered
from fliqs_compiler.passes.fusion import is_nonneg, nonneg_annotated
from fliqs_compiler.passes.grouping import (decisions_cover_searched_layers,
                                            quantizers_belong_to_decisions)
from fliqs_compiler.passes.manager import check_graph, contract

__all__ = ["insert_quantizers", "searched_layers_quantized"]

_ROLE_ARGS = (("weight", "weight"), ("activation", "input"))  # (role, layer argument it reads)


# ---- contract conditions --------------------------------------------------------------------
def searched_layers_quantized(graph: Graph):
    """Each searched layer reads its weight and its input through the SearchableQuantizer that
    ``graph.space.quantizers`` records for (layer, role)."""
    if graph.space is None:
        return "graph.space is None (no quantizers recorded)"
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    for layer in graph.searched_layers():
        node = nodes.get(layer.node)
        if node is None:
            return f"layer {layer.name}: fx node {layer.node!r} is not in the graph"
        for role, arg in _ROLE_ARGS:
            if role not in roles_of(layer):
                continue
            path = graph.space.quantizers.get((layer.name, role))
            if path is None:
                return f"layer {layer.name}: no {role} quantizer recorded"
            src = input_operand(node)[0] if layer.attrs.get("input_only") else ir.get_arg(node, arg)
            if not (isinstance(src, fx.Node) and src.op == "call_module" and src.target == path):
                return f"layer {layer.name}: its {arg} does not come from {path!r}"
            module = graph.gm.get_submodule(path)
            if not isinstance(module, SearchableQuantizer):
                return (f"layer {layer.name}: {role} quantizer {path!r} is a "
                        f"{type(module).__name__}, not a SearchableQuantizer")
    return None


def _quantizer_node(gm: fx.GraphModule, src: fx.Node, before: fx.Node, path: str,
                    module) -> fx.Node:
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(before):
        q = gm.graph.call_module(path, (src,))
    for k in ("shape", "dtype", "nonneg", "tensor_meta"):
        if k in src.meta:
            q.meta[k] = src.meta[k]
    return q


def _insert(gm: fx.GraphModule, node: fx.Node, arg: str, path: str, module) -> fx.Node:
    q = _quantizer_node(gm, ir.get_arg(node, arg), node, path, module)
    ir.set_arg(node, arg, q)
    return q


def _insert_input_only(graph: Graph, layer, candidates: dict, scale_mode: str) -> None:
    """The one activation quantizer of an input-only layer, read by every node of its op."""
    x, readers = input_operand(graph.fx_node(layer.node))
    aq = SearchableQuantizer(candidates[(layer.name, "activation")], "activation",
                             block_axis=-1, unsigned=is_nonneg(x), scale_mode=scale_mode)
    path = unique_attr(graph.gm, sanitize(layer.name) + "_aq")
    q = _quantizer_node(graph.gm, x, readers[0], path, aq)
    for reader in readers:
        reader.replace_input_with(x, q)
    graph.space.quantizers[(layer.name, "activation")] = path


@contract(requires=[layers_discovered, decisions_cover_searched_layers, nonneg_annotated],
          ensures=[searched_layers_quantized, quantizers_belong_to_decisions])
def insert_quantizers(graph: Graph, scale_mode: str = "learned") -> Graph:
    """Requires: ``layers_discovered``, ``decisions_cover_searched_layers`` (run
    ``group_decisions``), ``nonneg_annotated`` (``annotate_fusion``). Ensures:
    ``searched_layers_quantized``, ``quantizers_belong_to_decisions``.

    One SearchableQuantizer per (searched layer, role) member of ``graph.space``, wired
    between the tensor and the layer, named ``<sanitized name>_wq`` / ``_aq`` (suffixed
    ``_1``... on a clash), recorded in ``graph.space.quantizers``; the active candidate is the
    first one. Outputs change (the model now quantizes)."""
    if scale_mode not in ("learned", "calibrated"):
        raise FliqsError(f"scale mode {scale_mode!r}: use 'learned' or 'calibrated'")
    gm = graph.gm
    candidates = {m: d.candidates for d in graph.space.decisions for m in d.members}
    for layer in graph.searched_layers():
        node = graph.fx_node(layer.node)
        if (layer.name, roles_of(layer)[0]) in graph.space.quantizers:
            continue  # already inserted
        if layer.attrs.get("input_only"):
            _insert_input_only(graph, layer, candidates, scale_mode)
            continue
        w = ir.get_arg(node, "weight")
        rank = len(layer.weight_shape)
        if layer.params > 0:
            out_axis, red_axis = ir.weight_axes(layer.op, rank)
            wq = SearchableQuantizer(candidates[(layer.name, "weight")], "weight",
                                     channels=layer.weight_shape[out_axis], axis=out_axis,
                                     block_axis=red_axis, scale_mode=scale_mode)
        else:  # activation x activation matmul: second operand, per tensor
            wq = SearchableQuantizer(candidates[(layer.name, "weight")], "weight",
                                     block_axis=rank - 2, unsigned=is_nonneg(w),
                                     scale_mode=scale_mode)
        x = ir.get_arg(node, "input")
        block = 1 if layer.op.startswith("conv") else -1
        aq = SearchableQuantizer(candidates[(layer.name, "activation")], "activation",
                                 block_axis=block, unsigned=is_nonneg(x), scale_mode=scale_mode)
        base = sanitize(layer.name)
        for (role, arg), suffix, mod in zip(_ROLE_ARGS, ("_wq", "_aq"), (wq, aq)):
            path = unique_attr(gm, base + suffix)
            _insert(gm, node, arg, path, mod)
            graph.space.quantizers[(layer.name, role)] = path
    check_graph(graph)
    return graph
