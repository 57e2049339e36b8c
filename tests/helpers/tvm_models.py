"""Small materialized graphs for the TVM lowering tests: a conv → ReLU → pool → linear model in
any (weight, activation) formats, a lone activation quantizer, their Graph wrappers and inputs."""
from __future__ import annotations

import torch
from torch import nn

from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
from fliqs_compiler.numerics.quant import absmax_scale
from fliqs_compiler.numerics.quantizers import FormatQuantizer


def weight_quantizer(fmt, w):
    return FormatQuantizer(fmt, absmax_scale(w, fmt, 0), axis=0, role="weight") if fmt != "float" else nn.Identity()


def act_quantizer(fmt, scale=0.03):
    if fmt == "float":
        return nn.Identity()
    zp = torch.zeros(1) if fmt.startswith("uint") else None
    return FormatQuantizer(fmt, torch.tensor([scale]), zero_point=zp)


class ConvLinear(nn.Module):
    """conv(3x3, pad 1) → ReLU → maxpool → flatten → linear: the shape of a materialized graph."""

    def __init__(self, fw="int8", fa="int8", cin=4, cout=16, nout=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.fc = nn.Linear(cout * 4 * 4, nout)
        self.wq1, self.wq2 = weight_quantizer(fw, self.conv.weight), weight_quantizer(fw, self.fc.weight)
        self.aq1 = act_quantizer(fa, 0.03)
        self.aq2 = act_quantizer("uint8" if fa == "int8" else fa, 0.01)

    def forward(self, x):
        y = nn.functional.conv2d(self.aq1(x), self.wq1(self.conv.weight), self.conv.bias, padding=1)
        y = nn.functional.max_pool2d(torch.relu(y), 2).flatten(1)
        return nn.functional.linear(self.aq2(y), self.wq2(self.fc.weight), self.fc.bias)


def graph_of(m, shape=(1, 4, 8, 8)):
    gm = torch.fx.symbolic_trace(m.eval())
    g = Graph(gm, [InputSpec("x", shape)], name="tiny")
    order = [n for n in gm.graph.nodes if n.op == "call_function"
             and getattr(n.target, "__name__", "") in ("conv2d", "linear")]
    for public, node in zip(("features.conv", "head.fc"), order):
        g.layers[public] = LayerInfo(public, node.target.__name__, node.name)
    return g


def example_input(shape=(1, 4, 8, 8), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class ActOnly(nn.Module):
    def __init__(self, fmt, scale):
        super().__init__()
        self.q = act_quantizer(fmt, scale)

    def forward(self, x):
        return self.q(x)


def lower_all_int8(onnx_path, tmp_path, data="digits", options=None):
    """``fliqs lower`` of the ONNX model with every searched layer (``passes.analyze`` under the
    ``PrepareOptions`` ``options``) at int8 weights and activations, attention MatMuls included:
    the ``LowerResult``."""
    import json

    import fliqs_compiler as fq
    from fliqs_compiler import passes as P
    from fliqs_compiler.driver import api
    graph = fq.load(onnx_path)
    names = [la.name for la in P.analyze(graph, options).searched_layers()]
    config = tmp_path / "int8.json"
    config.write_text(json.dumps({"model": graph.name, "formats": {
        n: {"weight": "int8", "activation": "int8"} for n in names}}))
    return api.lower_config(str(onnx_path), str(config), target="llvm", data=data,
                            out=tmp_path / "out")
