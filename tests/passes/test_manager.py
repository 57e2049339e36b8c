"""The pass manager: pass times, the numerics check, and contract checking (requires before a
pass, ensures after, PassContractError naming the pass and the condition)."""
from __future__ import annotations

import copy

import pytest
import torch

from fliqs_compiler import passes as P
from fliqs_compiler.passes.manager import PassContractError, bind, check_conditions, contract
from fliqs_compiler.passes.materialize import fix_formats


def test_pass_manager_times_and_numeric_check(cnn):
    _, g = cnn

    def breaks(graph):
        for n in graph.gm.graph.nodes:
            if n.op == "output":
                with graph.gm.graph.inserting_before(n):
                    neg = graph.gm.graph.call_function(torch.neg, (n.args[0][0],))
                n.args = ((neg,),)
        return graph

    ok = P.run_passes(copy.deepcopy(g), [P.propagate_shapes], check_numerics=True)
    assert "propagate_shapes" in ok.meta["pass_times"]
    bad = P.manager.numeric(breaks)
    with pytest.raises(RuntimeError, match="breaks changed"):
        P.run_passes(copy.deepcopy(g), [bad], check_numerics=True)


def has_marker(graph):
    """graph.meta['marker'] is set."""
    return None if "marker" in graph.meta else "graph.meta has no 'marker'"


def test_requires_checked_before_the_pass_runs(cnn):
    _, g = cnn
    ran = []

    @contract(requires=[has_marker])
    def needs_marker(graph):
        ran.append(True)
        return graph

    with pytest.raises(PassContractError) as e:
        P.run_passes(copy.deepcopy(g), [needs_marker])
    assert str(e.value) == ("pass needs_marker: requires has_marker does not hold: "
                            "graph.meta has no 'marker'")
    assert not ran  # refused before running
    assert isinstance(e.value, RuntimeError)
    marked = copy.deepcopy(g)
    marked.meta["marker"] = 1
    P.run_passes(marked, [needs_marker])
    assert ran == [True]


def test_ensures_checked_after_the_pass_and_kept_by_bind(cnn):
    _, g = cnn

    @contract(ensures=[has_marker])
    def marks(graph, value=None):
        if value is not None:
            graph.meta["marker"] = value
        return graph

    with pytest.raises(PassContractError, match="^pass forgets: ensures has_marker does not hold"):
        P.run_passes(copy.deepcopy(g), [bind(marks, "forgets")])
    bound = bind(marks, "marks_1", value=1)
    assert bound.ensures == (has_marker,) and bound.requires == ()
    assert P.run_passes(copy.deepcopy(g), [bound]).meta["marker"] == 1


def test_pipeline_passes_all_declare_contracts():
    for p in P.pipeline(P.PrepareOptions(bn="qat")) + P.pipeline(P.PrepareOptions()):
        assert p.requires and p.ensures, p.__name__
        assert all(callable(c) and c.__doc__ for c in (*p.requires, *p.ensures)), p.__name__
    assert P.finalize_qat_bn.ensures and fix_formats.requires and fix_formats.ensures


def test_check_conditions_stops_at_the_first_failure(cnn):
    _, g = cnn
    calls = []

    def first(graph):
        """Always fails."""
        calls.append("first")
        return "node x is wrong"

    def second(graph):
        """Never reached."""
        calls.append("second")

    with pytest.raises(PassContractError, match="pass p: ensures first does not hold: node x"):
        check_conditions("p", g, [first, second], "ensures")
    assert calls == ["first"]
