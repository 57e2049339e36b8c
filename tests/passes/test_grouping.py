"""group_decisions: tied / untied decisions, regex groups, Add/Concat tying; its contract
(requires layers_discovered, ensures decisions_cover_searched_layers and
quantizers_belong_to_decisions)."""
from __future__ import annotations

import copy

import pytest

from fliqs_compiler import passes as P
from fliqs_compiler.ir.graph import Graph
from fliqs_compiler.passes.grouping import (decisions_cover_searched_layers,
                                            quantizers_belong_to_decisions)
from fliqs_compiler.passes.manager import PassContractError


def test_grouping_tied_untied_regex_and_add_concat(cnn):
    _, g = cnn
    base = dict(keep_float_first=False, keep_float_last=False, formats=["int8", "int4"])
    tied = P.analyze(g, P.PrepareOptions(**base)).space
    assert [d.name for d in tied.decisions] == ["conv2d", "conv2d_1", "conv2d_2", "linear"]
    assert tied.decisions[0].members == [("conv2d", "weight"), ("conv2d", "activation")]
    untied = P.analyze(g, P.PrepareOptions(tie_weight_activation=False, **base))
    assert len(untied.space.decisions) == 8
    assert untied.layers["conv2d"].group == "conv2d.weight"
    rx = P.analyze(g, P.PrepareOptions(group_patterns=["^conv2d"], **base))
    assert [d.name for d in rx.space.decisions] == ["^conv2d", "linear"]
    assert {layer.group for layer in rx.layers.values()} == {"^conv2d", "linear"}
    # residual add: c2 reads relu(c1); c3 reads relu(add(relu(c1), c2)) -> tied
    add = P.analyze(g, P.PrepareOptions(tie_add_concat_inputs=True, **base))
    assert [d.name for d in add.space.decisions] == ["conv2d", "conv2d_1", "linear"]
    assert add.layers["conv2d_1"].group == add.layers["conv2d_2"].group == "conv2d_1"
    choice = add.space.uniform_choice("int4")
    assert add.space.formats_of(choice)["conv2d_2"] == {"weight": "int4", "activation": "int4"}


def test_untied_add_concat_groups_activations_only(cnn):
    _, g = cnn
    a = P.analyze(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False,
                                      tie_weight_activation=False, tie_add_concat_inputs=True))
    names = [d.name for d in a.space.decisions]
    assert names == ["conv2d.weight", "conv2d.activation", "conv2d_1.weight",
                     "conv2d_1.activation", "conv2d_2.weight", "linear.weight",
                     "linear.activation"]
    tied = a.space.decisions[3]
    assert tied.members == [("conv2d_1", "activation"), ("conv2d_2", "activation")]


@pytest.mark.parametrize("options", [
    dict(), dict(tie_weight_activation=False, tie_add_concat_inputs=True),
    dict(group_patterns=["^conv2d"], keep_float_first=False, keep_float_last=False),
])
def test_ensures_hold_on_an_exported_graph(cnn, options):
    _, g = cnn
    a = P.analyze(g, P.PrepareOptions(**options))
    assert decisions_cover_searched_layers(a) is None
    assert quantizers_belong_to_decisions(a) is None
    p = P.prepare(g, P.PrepareOptions(**options))
    assert decisions_cover_searched_layers(p) is None and quantizers_belong_to_decisions(p) is None


def test_conditions_name_what_is_wrong(cnn):
    _, g = cnn
    a = P.analyze(g)
    assert decisions_cover_searched_layers(Graph(a.gm, a.inputs)) == \
        "graph.space is None (group_decisions has not run)"
    twice = copy.deepcopy(a)
    twice.space.decisions[1].members.append(twice.space.decisions[0].members[0])
    assert decisions_cover_searched_layers(twice) == \
        "('conv2d_1', 'weight') is in decisions 'conv2d_1' and 'conv2d_2'"
    regrouped = copy.deepcopy(a)
    regrouped.layers["conv2d_1"].group = "conv2d_2"
    assert "layer conv2d_1: group 'conv2d_2'" in decisions_cover_searched_layers(regrouped)
    stray = copy.deepcopy(a)
    stray.space.quantizers[("nope", "weight")] = "nope_wq"
    assert "belongs to no decision" in quantizers_belong_to_decisions(stray)


def test_requires_refused_by_the_manager(cnn):
    _, g = cnn  # shapes known but no discovery: the conv layers are not in graph.layers
    g = P.run_passes(copy.deepcopy(g), [P.propagate_shapes])
    with pytest.raises(PassContractError, match="pass group_decisions: requires "
                       "layers_discovered does not hold: layer node conv2d is missing"):
        P.run_passes(g, [P.group_decisions])
