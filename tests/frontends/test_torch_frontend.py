"""torch nn.Module → Graph via torch.export (BN kept, parameters trainable, fallback, errors)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fliqs_compiler as fq
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.frontends.torch_import import import_module

import onnx_models as M


def _targets(graph):
    return [n.target for n in graph.gm.graph.nodes if n.op == "call_function"]


def test_resnet_export_keeps_bn_and_trains():
    model = M.seeded_resnet().train()
    x = torch.randn(2, 3, 16, 16)
    graph = fq.load(model, (x,))
    assert model.training  # mode restored
    assert graph.source == "torch" and graph.name == "ResNetish"
    assert [(s.name, s.shape, s.dtype) for s in graph.inputs] == [("x", (2, 3, 16, 16),
                                                                    "float32")]
    targets = _targets(graph)
    assert targets.count(torch.ops.aten.batch_norm.default) == 6
    assert targets.count(torch.ops.aten.conv2d.default) == 7
    with torch.no_grad():
        assert torch.equal(graph(x), model.eval()(x))
    params = list(graph.gm.parameters())
    assert params and all(p.requires_grad for p in params)
    graph(x).square().mean().backward()
    assert all(p.grad is not None for p in params)


def test_batch_dimension_is_dynamic_even_from_a_batch_of_one():
    """Search and evaluation run the graph on data batches; an example of batch 1 must not pin it."""
    model = M.seeded_resnet().eval()
    graph = fq.load(model, (torch.randn(1, 3, 16, 16),))
    assert graph.inputs[0].shape == (1, 3, 16, 16)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)


def test_batch_baked_into_a_reshape_falls_back_to_a_static_export():
    class Pinned(nn.Module):
        def forward(self, x):
            return x.reshape(1, -1).relu()
    graph = fq.load(Pinned(), (torch.randn(1, 2, 3),))
    assert torch.equal(graph(torch.ones(1, 2, 3)), torch.ones(1, 6))


def test_weights_are_get_attr_read():
    graph = import_module(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    lin = next(n for n in graph.gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert all(a.op == "get_attr" for a in lin.args[1:3])
    assert graph.output_names == ["output"]


class _DataDependent(nn.Module):
    """Data-dependent python control flow: torch.export fails, symbolic_trace fails too."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class _TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)

    def forward(self, x, y):
        return self.conv(x), y + 1


def test_multiple_inputs_outputs():
    x, y = torch.randn(1, 2, 8), torch.randn(4)
    graph = import_module(_TwoOut(), (x, y))
    assert [s.name for s in graph.inputs] == ["x", "y"]
    assert graph.output_names == ["output_0", "output_1"]
    a, b = graph(x, y)
    assert torch.allclose(b, y + 1) and a.shape == (1, 3, 6)


def test_export_failure_is_one_line():
    with pytest.raises(FliqsError) as e:
        import_module(_DataDependent(), (torch.randn(3),))
    msg = str(e.value)
    assert "_DataDependent" in msg and "torch.export failed" in msg and "\n" not in msg


def test_bad_arguments():
    with pytest.raises(FliqsError):
        import_module(nn.ReLU(), None)
    with pytest.raises(FliqsError):
        import_module(nn.ReLU(), ([1, 2],))
    graph = import_module(nn.ReLU(), torch.randn(3))  # a bare tensor is accepted
    assert graph.inputs[0].shape == (3,)
