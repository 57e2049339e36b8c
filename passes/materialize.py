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

from fliqs_compiler.config import validate_formats
from fliqs_compiler.graph import Graph
from fliqs_compiler.quantizers import SearchableQuantizer

from .bn_fold import finalize_qat_bn
from .manager import check_graph, enable_train_eval, set_training

__all__ = ["materialize"]


def _set_module(gm, path: str, module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def materialize(graph: Graph, formats: dict) -> Graph:
    """Requires: a graph from ``prepare`` (SearchableQuantizers recorded in ``graph.space``);
    ``formats`` = ``{node: {"weight": fmt, "activation": fmt}}`` (a whole config object is
    accepted too). Unknown nodes / formats → FliqsError naming them.
    Guarantees: returns a NEW Graph (the input is untouched) where each quantizer is a
    FormatQuantizer or gone; ``space.quantizers`` lists the remaining ones;
    ``meta['formats_config']`` holds the normalised formats (every layer, float included);
    no QAT BN modules remain; the graph lints and runs."""
    if isinstance(formats, dict) and isinstance(formats.get("formats"), dict) and \
            "model" in formats:
        formats = formats["formats"]
    if graph.space is None or (graph.searched_layers() and not graph.space.quantizers):
        raise ValueError("materialize needs a graph from passes.prepare (it has no quantizers)")
    if not all(isinstance(graph.gm.get_submodule(p), SearchableQuantizer)
               for p in graph.space.quantizers.values()):
        raise ValueError("materialize needs a searchable graph; this one is already materialized")
    formats = validate_formats(formats, graph, source="formats")
    new = copy.deepcopy(graph)
    gm = new.gm
    enable_train_eval(gm)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    chosen = {}
    for (layer, role), path in list(new.space.quantizers.items()):
        fmt = formats.get(layer, {}).get(role, "float")
        if fmt == "float":
            node = nodes[path]
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            del new.space.quantizers[(layer, role)]
        else:
            chosen[path] = fmt
    gm.delete_all_unused_submodules()
    check_graph(new)
    pending = False
    for path, fmt in chosen.items():
        q: SearchableQuantizer = gm.get_submodule(path)
        q.set_format(fmt)
        pending |= not bool(q.initialized[q.active])
    if pending:  # some chosen candidate never ran: calibrate its scale on example inputs
        training = gm.training
        set_training(gm, False)
        with torch.no_grad():
            gm(*new.example_inputs())
        set_training(gm, training)
    for path in chosen:
        _set_module(gm, path, gm.get_submodule(path).to_fixed())
    finalize_qat_bn(new)
    check_graph(new)
    new.meta["formats_config"] = {name: formats.get(name, {"weight": "float",
                                                           "activation": "float"})
                                  for name in new.layers}
    return new
