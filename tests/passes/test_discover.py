"""discover_quantizable: layers, MACs/params/shapes in both vocabularies, keep-float rules,
act × act MatMuls; its contract (requires tensor_nodes_have_shape, ensures layers_discovered)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fliqs_compiler import passes as P
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import LayerInfo
from fliqs_compiler.passes.discover import layers_discovered
from fliqs_compiler.passes.manager import PassContractError


def test_macs_params_of_known_layers(cnn):
    _, g = cnn
    a = P.analyze(g)
    c1, c2, c3, fc = a.layers.values()
    assert (c1.op, c1.macs, c1.params) == ("conv2d", 2 * 8 * 16 * 16 * 3 * 9, 8 * 3 * 9)
    assert c2.macs == 2 * 8 * 16 * 16 * 8 * 9 and c2.attrs["bias"]  # folded BN made a bias
    assert c3.output_shape == (2, 16, 7, 7) and c3.macs == 2 * 16 * 7 * 7 * 8 * 9
    assert c3.attrs["stride"] == (2, 2)
    assert (fc.op, fc.macs, fc.params, fc.weight_shape) == ("linear", 2 * 10 * 16, 160, (10, 16))
    assert a.meta["pass_times"]["propagate_shapes"] >= 0
    assert g.layers == {}  # analyze returns a new graph


class Mixed(nn.Module):
    """Depthwise conv, conv-transpose, conv1d-free matmul with a constant weight (functional)."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.ct = nn.Parameter(torch.randn(4, 6, 2, 2))
        self.m = nn.Parameter(torch.randn(12, 5))
        self.pw = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x):
        x = F.conv2d(x, self.pw)
        x = F.conv2d(x, self.dw, None, 1, 1, 1, 4)
        x = F.conv_transpose2d(x, self.ct, stride=2)
        x = torch.flatten(x, 2)[:, :, :12]
        return torch.matmul(x, self.m)


def test_macs_grouped_conv_transpose_matmul_fx_vocabulary(trace_graph):
    g = trace_graph(Mixed(), (1, 4, 5, 5))
    a = P.analyze(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False))
    pw, dw, ct, mm = a.layers.values()
    assert (pw.op, dw.op, ct.op, mm.op) == ("conv2d", "conv2d", "conv_transpose2d", "matmul")
    assert dw.macs == 1 * 4 * 5 * 5 * (4 // 4) * 9 and dw.attrs["groups"] == 4
    assert ct.macs == (1 * 4 * 5 * 5) * 6 * 4 and ct.output_shape == (1, 6, 10, 10)
    assert mm.macs == 1 * 6 * 5 * 12 and mm.params == 60
    p = P.prepare(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False))
    wq = p.gm.get_submodule(p.space.quantizers[(ct.name, "weight")])
    assert (wq.axis, wq.channels, wq.block_axis) == (1, 6, 0)  # conv-transpose: [Cin, Cout..]
    wq = p.gm.get_submodule(p.space.quantizers[(mm.name, "weight")])
    assert (wq.axis, wq.channels, wq.block_axis) == (1, 5, 0)  # matmul [K, N]


def test_keep_float_rules(cnn):
    _, g = cnn
    a = P.analyze(g)
    assert [layer.keep_float for layer in a.layers.values()] == [True, False, False, True]
    assert [layer.group for layer in a.layers.values()][0] == ""
    a = P.analyze(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False,
                                      keep_float_patterns=["^conv2d_1$"]))
    assert [layer.keep_float for layer in a.layers.values()] == [False, True, False, False]
    with pytest.raises(FliqsError, match="keep-float pattern"):
        P.analyze(g, P.PrepareOptions(keep_float_patterns=["("]))


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        s = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return s @ x


_BASE = dict(keep_float_first=False, keep_float_last=False)


def test_act_x_act_matmuls_searched_by_default(export_graph):
    g = export_graph(_Attn(), (1, 4, 8))
    assert [layer.op for layer in P.analyze(g, P.PrepareOptions(quantize_act_matmul=False,
                                                                **_BASE)).layers.values()] == \
        ["linear", "linear"]
    p = P.prepare(g, P.PrepareOptions(**_BASE))
    ops = [(layer.op, layer.params) for layer in p.layers.values()]
    assert ops == [("linear", 72 - 8), ("linear", 64), ("matmul", 0), ("matmul", 0)]
    scores, ctx = list(p.layers.values())[2:]
    assert scores.attrs["act_x_act"] and ctx.attrs["act_x_act"]
    assert p.gm.get_submodule(p.space.quantizers[(ctx.name, "activation")]).unsigned  # softmax
    # BOPs of an activation x activation MatMul count both operands' widths
    row = p.meta["cost_table"][scores.name]["bops"]
    assert row["int4/int8"] == scores.macs * 4 * 8 and row["int8/int8"] == scores.macs * 64
    x = torch.randn(1, 4, 8)
    p(x).sum().backward()


def test_softmax_output_takes_only_8_bit_formats(export_graph):
    g = export_graph(_Attn(), (1, 4, 8))
    formats = ["int2", "int4", "fp4_e2m1", "fp6_e3m2", "int8", "fp8_e4m3", "bf16"]
    p = P.analyze(g, P.PrepareOptions(formats=formats, **_BASE))
    by_layer = {d.members[0][0]: d.candidates for d in p.space.decisions}
    scores, ctx = list(p.layers)[2:]
    assert by_layer[ctx] == ("int8", "fp8_e4m3", "bf16")  # A·V: its input is the softmax
    assert by_layer[scores] == tuple(formats)  # Q·Kᵀ: untouched
    # untied: only the softmax operand's decision is restricted
    p = P.analyze(g, P.PrepareOptions(formats=formats, tie_weight_activation=False, **_BASE))
    cands = {m: d.candidates for d in p.space.decisions for m in d.members}
    assert cands[(ctx, "activation")] == ("int8", "fp8_e4m3", "bf16")
    assert cands[(ctx, "weight")] == tuple(formats)
    # an explicit config (operand_rules=False) may put the softmax output anywhere
    p = P.analyze(g, P.PrepareOptions(formats=formats, operand_rules=False, **_BASE))
    assert all(d.candidates == tuple(formats) for d in p.space.decisions)


def test_softmax_operand_with_no_admitted_format_stays_float(export_graph):
    g = export_graph(_Attn(), (1, 4, 8))
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int2"], **_BASE))
    ctx = list(p.layers.values())[3]
    assert ctx.keep_float and ctx.group == ""
    assert "softmax output" in p.meta["keep_float_reasons"][ctx.name]
    assert all(m[0] != ctx.name for d in p.space.decisions for m in d.members)
    assert len(p.space.decisions) == 3
    p(torch.randn(1, 4, 8)).sum().backward()


def test_ensures_hold_on_an_exported_graph(cnn):
    _, g = cnn
    out = P.run_passes(copy.deepcopy(g), [P.propagate_shapes, P.fold_batchnorm,
                                          P.propagate_shapes, P.discover_quantizable])
    assert layers_discovered(out) is None
    assert list(out.layers) == ["conv2d", "conv2d_1", "conv2d_2", "linear"]
    nodes = {n.name for n in out.gm.graph.nodes}
    assert all(layer.node in nodes for layer in out.layers.values())
    # the check is not vacuous: a layer missing from graph.layers, or a stale LayerInfo.node
    missing = copy.deepcopy(out)
    del missing.layers["conv2d_1"]
    assert layers_discovered(missing) == "layer node conv2d_1 is missing from graph.layers"
    stale = copy.deepcopy(out)
    stale.layers["ghost"] = LayerInfo(name="ghost", op="linear", node="gone")
    assert layers_discovered(stale) == "layer ghost: fx node 'gone' is not in the graph"


def test_requires_refused_by_the_manager(cnn):
    _, g = cnn  # no shape propagation yet
    with pytest.raises(PassContractError, match="pass discover_quantizable: requires "
                       "tensor_nodes_have_shape does not hold: node .* has no meta"):
        P.run_passes(copy.deepcopy(g), [P.discover_quantizable])


def test_uniform_choice_takes_the_nearest_wider_format_where_a_rule_forbids_it(export_graph):
    g = export_graph(_Attn(), (1, 4, 8))
    p = P.analyze(g, P.PrepareOptions(formats=["int4", "int8", "bf16"], **_BASE))
    ctx = list(p.layers)[3]
    with pytest.raises(ValueError, match="not a candidate"):
        p.space.uniform_choice("int4")
    formats = p.space.formats_of(p.space.uniform_choice("int4", nearest=True))
    assert formats[ctx] == {"weight": "int8", "activation": "int8"}  # 8 bits: the nearest wider
    assert all(f == {"weight": "int4", "activation": "int4"} for n, f in formats.items() if n != ctx)
    assert p.space.substitutes("int4") == {ctx: "int8"} and p.space.substitutes("int8") == {}
