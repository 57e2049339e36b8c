"""A small quantized CNN for the QDQ export and onnxruntime tests (every quantizer role, the
post-ReLU activations unsigned), and the one-output-step tolerance those tests hold ORT to."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import nn

from fliqs_compiler.backends.ort_backend import grid_step
from fliqs_compiler.ir.graph import Graph, InputSpec
from fliqs_compiler.numerics.quantizers import SearchableQuantizer

QUANTIZERS = ("q_in", "q_w1", "q_a2", "q_w2", "q_a3", "q_wf", "q_out")


class Net(nn.Module):
    """conv → relu → conv (+ skip) → relu → pool → linear; a quantizer on every weight, on the
    input, on the post-ReLU activations (unsigned) and on the output."""

    def __init__(self, fmts: dict):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

        def w(name, m):
            return SearchableQuantizer([fmts[name]], "weight", channels=m.weight.shape[0], axis=0,
                                       block_axis=1, scale_mode="calibrated")

        def a(name, block_axis, unsigned=False):
            return SearchableQuantizer([fmts[name]], "activation", block_axis=block_axis,
                                       unsigned=unsigned, scale_mode="calibrated")

        self.q_in, self.q_out = a("q_in", 1), a("q_out", -1)
        self.q_a2, self.q_a3 = a("q_a2", 1, True), a("q_a3", -1, True)
        self.q_w1, self.q_w2, self.q_wf = w("q_w1", self.c1), w("q_w2", self.c2), w("q_wf", self.fc)

    def forward(self, x):
        h = Fn.relu(Fn.conv2d(self.q_in(x), self.q_w1(self.c1.weight), self.c1.bias, padding=1))
        h2 = Fn.conv2d(self.q_a2(h), self.q_w2(self.c2.weight), self.c2.bias, padding=1)
        h = Fn.adaptive_avg_pool2d(Fn.relu(h2 + h), 1).flatten(1)
        return self.q_out(Fn.linear(self.q_a3(h), self.q_wf(self.fc.weight), self.fc.bias))


def make_graph(fmt, shape=(2, 3, 8, 8), names=("images", "logits")):
    """A materialized test Graph: ``fmt`` (one name for all quantizers, or a dict per quantizer)
    calibrated on one batch, fixed with ``to_fixed()``, then ``torch.export``-ed."""
    fmts = fmt if isinstance(fmt, dict) else {q: fmt for q in QUANTIZERS}
    torch.manual_seed(0)
    m = Net(fmts).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        m(x)
    for name in QUANTIZERS:
        setattr(m, name, getattr(m, name).to_fixed())
    gm = torch.export.export(m, (x,)).module()
    graph = Graph(gm, [InputSpec(names[0], tuple(shape))], name="net", output_names=[names[1]],
                  source="torch")
    return graph, x, m.q_out


def lsb(values: np.ndarray, quantizer) -> np.ndarray:
    """One step of the output quantizer's grid at each value (the tolerance ORT must meet)."""
    return grid_step(quantizer.fmt, float(quantizer.scale.reshape(-1)[0]), values)


def assert_within_lsb(ref: np.ndarray, got: np.ndarray, quantizer):
    tol = np.maximum(lsb(ref, quantizer), lsb(got, quantizer)) * (1 + 1e-6)
    assert np.all(np.abs(ref - got) <= tol), float(np.max(np.abs(ref - got) - tol))
