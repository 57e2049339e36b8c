"""Functionalize standard ``call_module`` layers (graphs from ``torch.fx.symbolic_trace`` of
ordinary ``nn.Module`` models) into the ``torch.nn.functional`` vocabulary the other passes read.

Table-driven: ``_MODULES`` maps a module class to a function building the ``F.*`` call from the
module's attributes; parameters become ``get_attr`` nodes on the module's own tensors. Modules not
in the table (or with options the functional form does not cover, e.g. ``padding_mode='reflect'``)
are left unchanged. BatchNorm's training flag is taken from the module's current mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fliqs_compiler.ir.graph import Graph

from fliqs_compiler.passes.manager import check_graph, contract, numeric

__all__ = ["functionalize_modules", "submodules_resolve", "no_functionalizable_module"]


def _param(gm, node, attr):
    mod = gm.get_submodule(node.target)
    if getattr(mod, attr, None) is None:
        return None
    return gm.graph.get_attr(f"{node.target}.{attr}")


def _conv(fn):
    def build(gm, node, m):
        return fn, (node.args[0], _param(gm, node, "weight"), _param(gm, node, "bias"), m.stride,
                    m.padding, m.dilation, m.groups)
    return build


def _conv_t(fn):
    def build(gm, node, m):
        return fn, (node.args[0], _param(gm, node, "weight"), _param(gm, node, "bias"), m.stride,
                    m.padding, m.output_padding, m.groups, m.dilation)
    return build


def _bn(gm, node, m):
    training = m.training or m.running_mean is None
    return F.batch_norm, (node.args[0], _param(gm, node, "running_mean"),
                          _param(gm, node, "running_var"), _param(gm, node, "weight"),
                          _param(gm, node, "bias"), training,
                          0.1 if m.momentum is None else m.momentum, m.eps)


_MODULES = {
    nn.Conv1d: _conv(F.conv1d), nn.Conv2d: _conv(F.conv2d), nn.Conv3d: _conv(F.conv3d),
    nn.ConvTranspose1d: _conv_t(F.conv_transpose1d),
    nn.ConvTranspose2d: _conv_t(F.conv_transpose2d),
    nn.Linear: lambda gm, node, m: (F.linear, (node.args[0], _param(gm, node, "weight"),
                                               _param(gm, node, "bias"))),
    nn.BatchNorm1d: _bn, nn.BatchNorm2d: _bn, nn.BatchNorm3d: _bn,
    nn.ReLU: lambda gm, node, m: (F.relu, (node.args[0],)),
    nn.ReLU6: lambda gm, node, m: (F.relu6, (node.args[0],)),
    nn.Flatten: lambda gm, node, m: (torch.flatten, (node.args[0], m.start_dim, m.end_dim)),
    nn.MaxPool2d: lambda gm, node, m: (F.max_pool2d, (node.args[0], m.kernel_size, m.stride,
                                                      m.padding, m.dilation, m.ceil_mode)),
    nn.AdaptiveAvgPool2d: lambda gm, node, m: (F.adaptive_avg_pool2d,
                                               (node.args[0], m.output_size)),
}


def _functionalizable(node, module) -> bool:
    """A table module called with one positional input, in an option form ``F.*`` covers."""
    return (type(module) in _MODULES and len(node.args) == 1 and not node.kwargs
            and getattr(module, "padding_mode", "zeros") == "zeros")


# ---- contract conditions --------------------------------------------------------------------
def submodules_resolve(graph: Graph):
    """Every ``call_module`` target names a submodule of the graph module."""
    for node in graph.gm.graph.nodes:
        if node.op != "call_module":
            continue
        try:
            graph.gm.get_submodule(node.target)
        except AttributeError:
            return f"node {node.name} calls {node.target!r}, which is not a submodule"
    return None


def no_functionalizable_module(graph: Graph):
    """No ``call_module`` left that :func:`functionalize_modules` turns into an ``F.*`` call."""
    for node in graph.gm.graph.nodes:
        if node.op == "call_module" and _functionalizable(node,
                                                          graph.gm.get_submodule(node.target)):
            return f"node {node.name} still calls module {node.target!r}"
    return None


@numeric
@contract(requires=[submodules_resolve], ensures=[no_functionalizable_module])
def functionalize_modules(graph: Graph) -> Graph:
    """Requires: ``submodules_resolve``. Ensures: ``no_functionalizable_module``.

    Every ``call_module`` of a class in ``_MODULES`` (called with one positional input) is
    replaced by the equivalent ``call_function`` reading the same parameters through
    ``get_attr`` and ``meta['public_name']`` = the module path (the layer's config.json name);
    outputs are unchanged; other nodes are untouched."""
    gm = graph.gm
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not _functionalizable(node, mod):
            continue
        with gm.graph.inserting_before(node):
            fn, args = _MODULES[type(mod)](gm, node, mod)
            new = gm.graph.call_function(fn, args)
        new.meta.update(node.meta)
        new.meta.setdefault("public_name", node.target)  # the module path, e.g. "layer1.0.conv1"
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    check_graph(graph)
    return graph
