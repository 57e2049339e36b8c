"""insert_quantizers: placement, names and axes of the SearchableQuantizers; the searchable graph
trains and switches formats; the contract (requires layers_discovered,
decisions_cover_searched_layers, nonneg_annotated; ensures searched_layers_quantized and
quantizers_belong_to_decisions)."""
from __future__ import annotations

import copy

import pytest
import torch

from fliqs_compiler import passes as P
from fliqs_compiler.numerics.quantizers import SearchableQuantizer
from fliqs_compiler.passes.grouping import quantizers_belong_to_decisions
from fliqs_compiler.passes.insert_quant import searched_layers_quantized
from fliqs_compiler.passes.manager import PassContractError


def test_quantizer_placement_and_names(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int8", "fp8_e4m3"]))
    searched = [layer.name for layer in p.searched_layers()]
    assert set(p.space.quantizers) == {(n, r) for n in searched for r in ("weight", "activation")}
    for (name, role), path in p.space.quantizers.items():
        assert path == name + ("_wq" if role == "weight" else "_aq")
        q = p.gm.get_submodule(path)
        assert isinstance(q, SearchableQuantizer) and q.candidates == ("int4", "int8", "fp8_e4m3")
        qnode = next(n for n in p.gm.graph.nodes if n.op == "call_module" and n.target == path)
        assert list(qnode.users)[0].name == p.layers[name].node
        if role == "weight":
            assert (q.axis, q.block_axis) == (0, 1)
            assert q.channels == p.layers[name].weight_shape[0]
            assert qnode.args[0].op == "get_attr"
        else:
            assert q.channels is None
    n_q = sum(isinstance(m, SearchableQuantizer) for m in p.gm.modules())
    assert n_q == 2 * len(searched)


def test_searchable_graph_forward_backward_and_switching(cnn, cnn_shape):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int8", "fp8_e4m3", "mxfp4_e2m1"]))
    p.gm.train()  # works although the graph came from ExportedProgram.module()
    assert all(m.training for m in p.gm.modules())
    x = torch.randn(cnn_shape)
    outs = []
    weight = dict(p.gm.named_parameters())["conv2d_1_folded_weight"]
    for i, fmt in enumerate(("int4", "int8", "fp8_e4m3", "mxfp4_e2m1")):
        p.space.apply(p.gm, p.space.uniform_choice(fmt))
        p.gm.zero_grad()
        y = p(x)
        y.square().mean().backward()
        outs.append(y.detach())
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        scale = p.gm.get_submodule("conv2d_1_wq").log_scales[i]  # learned as its logarithm
        assert (scale.grad is not None) == (fmt != "mxfp4_e2m1")  # MX: no learned scale
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_ensures_hold_on_an_exported_graph(cnn):
    _, g = cnn
    a = P.analyze(g, P.PrepareOptions(formats=["int8"], keep_float_first=False))
    assert searched_layers_quantized(a) == "layer conv2d: no weight quantizer recorded"
    p = P.run_passes(copy.deepcopy(a), [P.insert_quantizers])
    assert searched_layers_quantized(p) is None and quantizers_belong_to_decisions(p) is None
    assert len(p.space.quantizers) == 2 * len(p.searched_layers()) == 6
    again = P.run_passes(copy.deepcopy(p), [P.insert_quantizers])  # idempotent
    assert again.space.quantizers == p.space.quantizers
    unwired = copy.deepcopy(p)
    node = unwired.fx_node(unwired.layers["conv2d_1"].node)
    q = node.args[0]  # the activation quantizer: bypass it
    node.replace_input_with(q, q.args[0])
    assert searched_layers_quantized(unwired) == \
        "layer conv2d_1: its input does not come from 'conv2d_1_aq'"


def test_requires_refused_by_the_manager(cnn):
    _, g = cnn  # insert_quantizers before discovery
    with pytest.raises(PassContractError, match="pass insert_quantizers: requires "
                       "layers_discovered does not hold: layer node conv2d is missing"):
        P.run_passes(copy.deepcopy(g), [P.insert_quantizers])
    discovered = P.run_passes(copy.deepcopy(g), [P.propagate_shapes, P.fold_batchnorm,
                                                 P.propagate_shapes, P.discover_quantizable])
    with pytest.raises(PassContractError, match="pass insert_quantizers: requires "
                       "decisions_cover_searched_layers does not hold: graph.space is None"):
        P.run_passes(copy.deepcopy(discovered), [P.insert_quantizers])
    grouped = P.run_passes(discovered, [P.group_decisions])
    with pytest.raises(PassContractError, match="pass insert_quantizers: requires "
                       "nonneg_annotated does not hold"):
        P.run_passes(grouped, [P.insert_quantizers])
