"""functionalize_modules: symbolic_trace ``call_module`` layers → ``torch.nn.functional`` calls;
its contract (requires submodules_resolve, ensures no_functionalizable_module)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fliqs_compiler import passes as P
from fliqs_compiler.passes.functionalize import no_functionalizable_module, submodules_resolve
from fliqs_compiler.passes.manager import PassContractError


def test_symbolic_trace_modules_are_functionalized(small_cnn_class, trace_graph, cnn_shape):
    torch.manual_seed(0)
    model = small_cnn_class().eval()
    g = trace_graph(model, cnn_shape)
    assert any(n.op == "call_module" for n in g.gm.graph.nodes)
    a = P.analyze(g, P.PrepareOptions(check_numerics=True))  # functionalize + fold are exact
    assert list(a.layers) == ["c1", "c2", "c3", "fc"]  # public names = module paths
    assert len(a.meta["bn_folded"]) == 2
    assert a.layers["c2"].macs == 2 * 8 * 16 * 16 * 8 * 9
    x = torch.randn(cnn_shape)
    with torch.no_grad():
        assert torch.allclose(a(x), model(x), atol=1e-5)
    p = P.prepare(g, P.PrepareOptions(formats=["int8"]))
    assert set(p.space.quantizers) == {("c2", "weight"), ("c2", "activation"),
                                       ("c3", "weight"), ("c3", "activation")}
    p(x).sum().backward()


def test_ensures_hold_on_a_traced_graph(small_cnn_class, trace_graph, cnn_shape):
    g = trace_graph(small_cnn_class().eval(), cnn_shape)
    assert "still calls module 'c1'" in no_functionalizable_module(g)  # the check is not vacuous
    out = P.run_passes(g, [P.functionalize_modules])
    assert no_functionalizable_module(out) is None and submodules_resolve(out) is None
    assert not any(n.op == "call_module" for n in out.gm.graph.nodes)
    publics = {n.meta.get("public_name") for n in out.gm.graph.nodes}
    assert {"c1", "bn1", "c2", "bn2", "c3", "fc"} <= publics


def test_unsupported_module_options_are_left_alone(trace_graph):
    m = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    out = P.run_passes(trace_graph(m, (1, 2, 5, 5)), [P.functionalize_modules])
    assert [n.target for n in out.gm.graph.nodes if n.op == "call_module"] == ["0"]


def test_requires_refused_by_the_manager(small_cnn_class, trace_graph, cnn_shape):
    g = trace_graph(small_cnn_class().eval(), cnn_shape)
    bad = copy.deepcopy(g)
    x = next(n for n in bad.gm.graph.nodes if n.op == "placeholder")
    with bad.gm.graph.inserting_after(x):
        bad.gm.graph.create_node("call_module", "no_such_layer", (x,), name="ghost")
    with pytest.raises(PassContractError, match="pass functionalize_modules: requires "
                       "submodules_resolve does not hold: node ghost calls 'no_such_layer'"):
        P.run_passes(bad, [P.functionalize_modules])
