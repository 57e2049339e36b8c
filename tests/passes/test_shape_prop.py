"""propagate_shapes: shape/dtype meta from fake tensors; its contract (requires
inputs_have_static_shapes, ensures tensor_nodes_have_shape)."""
from __future__ import annotations

import copy

import pytest

from fliqs_compiler import passes as P
from fliqs_compiler.ir.graph import InputSpec
from fliqs_compiler.passes.manager import PassContractError
from fliqs_compiler.passes.shape_prop import inputs_have_static_shapes, tensor_nodes_have_shape


def test_ensures_hold_on_an_exported_graph(cnn, cnn_shape):
    _, g = cnn
    g = copy.deepcopy(g)
    assert "has no meta['shape']" in tensor_nodes_have_shape(g)  # not vacuous
    out = P.run_passes(g, [P.propagate_shapes])
    assert tensor_nodes_have_shape(out) is None and inputs_have_static_shapes(out) is None
    x = next(n for n in out.gm.graph.nodes if n.op == "placeholder")
    assert x.meta["shape"] == cnn_shape and x.meta["dtype"] == "float32"
    convs = [n for n in out.gm.graph.nodes if "conv2d" in str(n.target)]
    assert [n.meta["shape"] for n in convs] == [(2, 8, 16, 16), (2, 8, 16, 16), (2, 16, 7, 7)]
    assert "propagate_shapes" in out.meta["pass_times"]


@pytest.mark.parametrize("inputs, detail", [
    ([InputSpec("x", ("n", 3, 16, 16))], "input 'x' has a non-static shape"),
    ([], "1 placeholders but 0 input specs"),
])
def test_requires_refused_by_the_manager(cnn, inputs, detail):
    _, g = cnn
    bad = copy.deepcopy(g)
    bad.inputs = inputs
    with pytest.raises(PassContractError, match="pass propagate_shapes: requires "
                       f"inputs_have_static_shapes does not hold: {detail}"):
        P.run_passes(bad, [P.propagate_shapes])
