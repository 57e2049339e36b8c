"""annotate_costs: the BOPs / size table; its contract (requires decisions_cover_searched_layers,
ensures costs_for_every_layer)."""
from __future__ import annotations

import copy

import pytest

from fliqs_compiler import passes as P
from fliqs_compiler.passes.cost_annotate import costs_for_every_layer
from fliqs_compiler.passes.manager import PassContractError


def test_cost_table(cnn):
    _, g = cnn
    a = P.analyze(g, P.PrepareOptions(formats=["int4", "fp8_e4m3"]))
    layer = a.layers["conv2d_1"]
    row = a.meta["cost_table"]["conv2d_1"]
    assert row["bops"]["int4/fp8_e4m3"] == layer.macs * 4 * 8
    assert row["size_bytes"]["int4"] == layer.params * 4 / 8
    assert a.meta["float_bops"] == sum(x.macs * 1024 for x in a.layers.values() if x.keep_float)
    assert "bops" not in a.meta["cost_table"]["conv2d"]  # kept in float


def test_ensures_hold_on_an_exported_graph(cnn):
    _, g = cnn
    a = P.analyze(g, P.PrepareOptions(formats=["int4", "int8"]))
    assert costs_for_every_layer(a) is None
    assert set(a.meta["cost_table"]) == set(a.layers)
    dropped = copy.deepcopy(a)
    del dropped.meta["cost_table"]["conv2d_1"]["bops"]
    assert costs_for_every_layer(dropped) == "layer conv2d_1: cost_table row has no 'bops'"
    unset = copy.deepcopy(a)
    unset.layers["linear"].macs = None
    assert costs_for_every_layer(unset).startswith("layer linear: macs=None")


def test_requires_refused_by_the_manager(cnn):
    _, g = cnn  # layers discovered, but no decisions yet
    g = P.run_passes(copy.deepcopy(g), [P.propagate_shapes, P.discover_quantizable])
    with pytest.raises(PassContractError, match="pass annotate_costs: requires "
                       "decisions_cover_searched_layers does not hold: graph.space is None"):
        P.run_passes(g, [P.annotate_costs])
