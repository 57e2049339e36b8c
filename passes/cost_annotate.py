"""Cost annotation: per searched layer, the BOPs of every (weight, activation) candidate pair
and the weight bytes of every weight candidate, via ``fliqs_compiler.cost``.

Stored as a table on the graph (``LayerInfo.attrs`` stays the latency signature)::

    graph.meta["cost_table"][layer] = {"bops": {"<fw>/<fa>": int}, "size_bytes": {fw: float},
                                       "float_bops": int}
"""
from __future__ import annotations

from fliqs_compiler import cost
from fliqs_compiler.graph import Graph

from .manager import numeric

__all__ = ["annotate_costs"]


@numeric
def annotate_costs(graph: Graph) -> Graph:
    """Requires: ``graph.layers`` with MACs/params and ``graph.space`` (candidates).
    Guarantees: ``graph.meta['cost_table']`` for every layer (kept-float layers: only
    ``float_bops``); ``graph.meta['float_bops']`` = BOPs of the kept-float layers; the fx graph
    is unchanged."""
    cands = {}
    for d in graph.space.decisions if graph.space is not None else []:
        for layer, role in d.members:
            cands.setdefault(layer, {}).setdefault(role, d.candidates)
    table = {}
    for layer in graph.layers.values():
        entry = {"float_bops": int(cost.layer_bops(layer, "float", "float"))}
        roles = cands.get(layer.name)
        if roles and not layer.keep_float:
            fws, fas = roles.get("weight", ()), roles.get("activation", ())
            entry["bops"] = {f"{fw}/{fa}": int(cost.layer_bops(layer, fw, fa))
                             for fw in fws for fa in fas}
            entry["size_bytes"] = {fw: float(cost.layer_size_bytes(layer, fw)) for fw in fws}
        table[layer.name] = entry
    graph.meta["cost_table"] = table
    graph.meta["float_bops"] = cost.float_bops(graph)
    return graph
