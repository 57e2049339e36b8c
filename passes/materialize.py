"""materialize: fix a format assignment into the graph.

Every ``SearchableQuantizer`` becomes its ``to_fixed()`` ``FormatQuantizer`` for the format the
config gives its (layer, role); quantizers whose format is ``float`` (or whose layer is absent
from the config) are removed. QAT-form BN folds become eval folds. Candidates whose scale was
never initialised (never ran in the search) are calibrated by one forward pass on
``graph.example_inputs()`` first.
"""
from __future__ import annotations

import copy

import torch

from fliqs_compiler.ir.config import validate_formats
from fliqs_compiler.ir.graph import Graph
from fliqs_compiler.numerics.quantizers import FormatQuantizer, SearchableQuantizer

from fliqs_compiler.passes.bn_fold import finalize_qat_bn, no_qat_bn_modules
from fliqs_compiler.passes.insert_quant import searched_layers_quantized
from fliqs_compiler.passes.manager import (bind, check_conditions, check_graph, contract,
                                           enable_train_eval, run_passes, set_training)

__all__ = ["materialize", "fix_formats", "no_searchable_quantizer", "quantizers_fixed"]


def _set_module(gm, path: str, module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


# ---- contract conditions --------------------------------------------------------------------
def no_searchable_quantizer(graph: Graph):
    """No SearchableQuantizer module is left in the graph module."""
    for name, module in graph.gm.named_modules():
        if isinstance(module, SearchableQuantizer):
            return f"module {name!r} is still a SearchableQuantizer"
    return None


def quantizers_fixed(graph: Graph):
    """Every quantizer ``graph.space.quantizers`` records is a FormatQuantizer the graph calls."""
    called = {n.target for n in graph.gm.graph.nodes if n.op == "call_module"}
    for member, path in graph.space.quantizers.items():
        if path not in called:
            return f"quantizer {path!r} of {member} is not called by the graph"
        if not isinstance(graph.gm.get_submodule(path), FormatQuantizer):
            return f"quantizer {path!r} of {member} is not a FormatQuantizer"
    return None


def _calibrate(graph: Graph) -> None:
    """One eval forward on example inputs (initialises the scales of candidates never run)."""
    gm = graph.gm
    training = gm.training
    set_training(gm, False)
    with torch.no_grad():
        gm(*graph.example_inputs())
    set_training(gm, training)


@contract(requires=[searched_layers_quantized],
          ensures=[no_searchable_quantizer, quantizers_fixed, no_qat_bn_modules])
def fix_formats(graph: Graph, formats: dict) -> Graph:
    """The in-place step of :func:`materialize` on a copy, ``formats`` already validated.
    Requires: ``searched_layers_quantized``. Ensures: ``no_searchable_quantizer``,
    ``quantizers_fixed``, ``no_qat_bn_modules``."""
    gm = graph.gm
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    chosen = {}
    for (layer, role), path in list(graph.space.quantizers.items()):
        fmt = formats.get(layer, {}).get(role, "float")
        if fmt == "float":
            node = nodes[path]
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            del graph.space.quantizers[(layer, role)]
        else:
            chosen[path] = fmt
    gm.delete_all_unused_submodules()
    check_graph(graph)
    pending = False
    for path, fmt in chosen.items():
        q: SearchableQuantizer = gm.get_submodule(path)
        q.set_format(fmt)
        pending |= not bool(q.initialized[q.active])
    if pending:  # some chosen candidate never ran: calibrate its scale on example inputs
        _calibrate(graph)
    for path in chosen:
        _set_module(gm, path, gm.get_submodule(path).to_fixed())
    finalize_qat_bn(graph)
    check_graph(graph)
    graph.meta["formats_config"] = {name: formats.get(name, {"weight": "float",
                                                             "activation": "float"})
                                    for name in graph.layers}
    return graph


def materialize(graph: Graph, formats: dict) -> Graph:
    """Requires: ``searched_layers_quantized`` (a graph from ``prepare``; else
    PassContractError); ``formats`` = ``{node: {"weight": fmt, "activation": fmt}}`` (a whole
    config object is accepted too). Unknown nodes / formats → FliqsError naming them.
    Ensures (on the result): ``no_searchable_quantizer``, ``quantizers_fixed``,
    ``no_qat_bn_modules``.

    Returns a NEW Graph (the input is untouched) where each quantizer is a FormatQuantizer or
    gone; ``space.quantizers`` lists the remaining ones; ``meta['formats_config']`` holds the
    normalised formats (every layer, float included); the graph lints and runs."""
    if isinstance(formats, dict) and isinstance(formats.get("formats"), dict) and \
            "model" in formats:
        formats = formats["formats"]
    check_conditions("materialize", graph, fix_formats.requires, "requires")
    formats = validate_formats(formats, graph, source="formats")
    new = copy.deepcopy(graph)
    enable_train_eval(new.gm)
    return run_passes(new, [bind(fix_formats, "materialize", formats=formats)])
