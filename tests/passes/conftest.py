"""Shared small graphs for the pass tests: a conv-BN-ReLU CNN with a residual block (torch.export
and symbolic_trace forms) and factories that wrap a module's graph in a ``Graph``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch import fx

from fliqs_compiler.ir.graph import Graph, InputSpec

SHAPE = (2, 3, 16, 16)


class SmallCNN(nn.Module):
    """conv-bn-relu stem, a residual block, a strided conv, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16, 10)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(y + self.bn2(self.c2(y)))
        y = torch.relu(self.c3(y)).mean((2, 3))
        return self.fc(y)


def _exported(module: nn.Module, shape=SHAPE, train=False) -> Graph:
    torch.manual_seed(0)
    module.train(train)
    gm = torch.export.export(module, (torch.randn(shape),)).module()
    return Graph(gm, [InputSpec("x", shape)], name="net", source="torch")


def _traced(fn_module: nn.Module, shape) -> Graph:
    return Graph(fx.symbolic_trace(fn_module), [InputSpec("x", shape)], name="fx")


@pytest.fixture(scope="session")
def cnn_shape():
    """The input shape of :class:`SmallCNN` graphs."""
    return SHAPE


@pytest.fixture(scope="session")
def small_cnn_class():
    """The :class:`SmallCNN` class (build fresh instances under your own seed)."""
    return SmallCNN


@pytest.fixture(scope="session")
def export_graph():
    """``export_graph(module, shape=SHAPE, train=False)``: a ``Graph`` of
    ``torch.export.export(module).module()`` (aten vocabulary)."""
    return _exported


@pytest.fixture(scope="session")
def trace_graph():
    """``trace_graph(module, shape)``: a ``Graph`` of ``fx.symbolic_trace(module)``
    (``torch.nn.functional`` / ``call_module`` vocabulary)."""
    return _traced


@pytest.fixture(scope="module")
def cnn():
    """(eval SmallCNN, its exported Graph); tests must not mutate the graph (copy it)."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    return model, _exported(model)
