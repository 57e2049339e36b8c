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


_INPUT_OPS = "layernorm,softmax,gelu"
_WIDE = ["int2", "int4", "fp4_e2m1", "int8", "fp8_e4m3", "bf16"]


def _decisions(graph) -> list:
    return [(d.name, d.candidates, d.members) for d in graph.space.decisions]


def test_quantize_inputs_makes_ln_softmax_gelu_inputs_decisions(tmp_path):
    """Both ONNX forms (LayerNormalization, the exported erf GELU) get one activation-only
    decision per op input; the candidates follow OPERAND_RULES; off, nothing changes."""
    import fliqs_compiler as fq
    from onnx_models import make_vit
    g = fq.load(make_vit(tmp_path))
    off = P.prepare(g, P.PrepareOptions(formats=_WIDE))
    assert _decisions(off) == _decisions(P.prepare(g, P.PrepareOptions(formats=_WIDE,
                                                                       quantize_inputs="none")))
    assert not any(la.attrs.get("input_only") for la in off.layers.values())
    on = P.prepare(g, P.PrepareOptions(formats=_WIDE, quantize_inputs=_INPUT_OPS,
                                       check_numerics=True))
    inputs = [la for la in on.layers.values() if la.attrs.get("input_only")]
    assert sorted(la.op for la in inputs) == ["gelu"] * 2 + ["layer_norm"] * 5 + ["softmax"] * 2
    cands = {m[0]: d.candidates for d in on.space.decisions for m in d.members}
    for la in inputs:
        assert [m for d in on.space.decisions for m in d.members if m[0] == la.name] == \
            [(la.name, "activation")]  # no weight
        assert (la.macs, la.params) == (0, 0)
        assert cands[la.name] == (("int8", "fp8_e4m3", "bf16") if la.op == "softmax"
                                  else ("int4", "fp4_e2m1", "int8", "fp8_e4m3", "bf16"))
    # the other decisions are today's
    assert [d for d in _decisions(on) if not on.layers[d[2][0][0]].attrs.get("input_only")] == \
        _decisions(off)
    # every node of the op reads the quantizer; the residual Add beside the LayerNorm does not
    gm = on.gm
    for la in inputs:
        path = on.space.quantizers[(la.name, "activation")]
        q = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
        readers = {u.name for u in q.users}
        assert la.node in readers or la.op == "gelu"
        assert len(readers) == (2 if la.op == "gelu" else 1)  # erf GELU: x/√2 and x·(…)
    ln = next(la for la in inputs if la.op == "layer_norm")
    q = next(n for n in gm.graph.nodes if n.target == on.space.quantizers[(ln.name, "activation")])
    assert any(u.op == "call_function" and "add" in str(u.target) for u in q.args[0].users)
    on(torch.randn(3, 1, 8, 8)).sum().backward()
    # they cost nothing: BOPs / size of the all-int8 reference are unchanged
    from fliqs_compiler.cost.model import config_cost
    int8 = {la.name: {"weight": "int8", "activation": "int8"} for la in on.searched_layers()}
    assert config_cost(on, int8, "bops") == config_cost(off, int8, "bops") > 0
    assert config_cost(on, on.space.formats_of([0] * on.space.num_decisions), "size") == \
        config_cost(off, off.space.formats_of([0] * off.space.num_decisions), "size")
    # the config of an input-only layer says its (absent) weight is float
    formats = on.space.formats_of(on.space.uniform_choice("int8"))
    assert formats[ln.name] == {"weight": "float", "activation": "int8"}


def test_quantize_inputs_torch_frontend(export_graph):
    """aten.layer_norm / aten.gelu / aten.softmax of a torch.export graph."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(self.norm(x))
            return F.gelu(y) + torch.softmax(y, -1)

    g = export_graph(Block(), (1, 4, 8))
    p = P.prepare(g, P.PrepareOptions(quantize_inputs=["gelu", "layernorm"], **_BASE))
    assert [la.op for la in p.layers.values()] == ["layer_norm", "linear", "gelu"]
    p(torch.randn(1, 4, 8)).sum().backward()


@pytest.mark.parametrize("value", ["batchnorm", "layernorm,relu", ["gelu", "attention"]])
def test_quantize_inputs_bad_value_is_one_line(value):
    with pytest.raises(FliqsError, match="quantize_inputs .*unknown op; use a comma-separated "
                                         "list of layernorm, softmax, gelu"):
        P.PrepareOptions(quantize_inputs=value).validate()
