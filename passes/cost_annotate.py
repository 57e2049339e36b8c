"""Cost annotation: per searched layer, the BOPs of every (weight, activation) candidate pair
and the weight bytes of every weight candidate, via ``fliqs_compiler.cost.model``.

Stored as a table on the graph (``LayerInfo.attrs`` stays the latency signature)::

    graph.meta["cost_table"][layer] = {"bops": {"<fw>/<fa>": int}, "size_bytes": {fw: float},
                                       "float_bops": int}
"""
from __future__ import annotations

from fliqs_compiler.cost import model as cost
from fliqs_compiler.ir.graph import Graph

from fliqs_compiler.passes.grouping import decisions_cover_searched_layers
from fliqs_compiler.passes.manager import contract, numeric

__all__ = ["annotate_costs", "costs_for_every_layer"]


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- contract conditions --------------------------------------------------------------------
def costs_for_every_layer(graph: Graph):
    """Every layer has integer ``macs`` / ``params`` >= 0 and a ``cost_table`` row with
    ``float_bops``; searched layers also with ``bops`` and ``size_bytes``; ``meta['float_bops']``
    is set."""
    table = graph.meta.get("cost_table")
    if table is None or "float_bops" not in graph.meta:
        return "graph.meta has no cost_table / float_bops"
    for layer in graph.layers.values():
        if not (_count(layer.macs) and _count(layer.params)):
            return f"layer {layer.name}: macs={layer.macs!r} params={layer.params!r}"
        row = table.get(layer.name, {})
        needed = ("float_bops",) if layer.keep_float else ("float_bops", "bops", "size_bytes")
        missing = next((k for k in needed if k not in row), None)
        if missing is not None:
            return f"layer {layer.name}: cost_table row has no {missing!r}"
    return None


@numeric
@contract(requires=[decisions_cover_searched_layers], ensures=[costs_for_every_layer])
def annotate_costs(graph: Graph) -> Graph:
    """Requires: ``decisions_cover_searched_layers`` (``graph.layers`` with MACs/params and
    ``graph.space`` with candidates). Ensures: ``costs_for_every_layer``.

    ``graph.meta['cost_table']`` for every layer (kept-float layers: only ``float_bops``);
    ``graph.meta['float_bops']`` = BOPs of the kept-float layers; the fx graph is unchanged."""
    cands = {}
    for d in graph.space.decisions if graph.space is not None else []:
        for layer, role in d.members:
            cands.setdefault(layer, {}).setdefault(role, d.candidates)
    table = {}
    for layer in graph.layers.values():
        entry = {"float_bops": int(cost.layer_bops(layer, "float", "float"))}
        roles = cands.get(layer.name)
        if roles and not layer.keep_float:
            # an input-only layer (no weight) has no weight candidates: it reads as float
            fws, fas = roles.get("weight", ("float",)), roles.get("activation", ())
            entry["bops"] = {f"{fw}/{fa}": int(cost.layer_bops(layer, fw, fa))
                             for fw in fws for fa in fas}
            entry["size_bytes"] = {fw: float(cost.layer_size_bytes(layer, fw)) for fw in fws}
        table[layer.name] = entry
    graph.meta["cost_table"] = table
    graph.meta["float_bops"] = cost.float_bops(graph)
    return graph
